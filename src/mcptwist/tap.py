# -*- test-case-name: tests.test_tap -*-
"""twistd glue: C{twistd -n --pidfile= mcpbridge [--config FILE] [--listen ENDPOINT]}."""

from __future__ import annotations

import os

import attrs
from twisted.application.service import IService
from twisted.python import usage

from mcptwist.config.endpoints import listener_from_string
from mcptwist.config.load import load_config
from mcptwist.config.model import ConfigError, default_config


class Options(usage.Options):
    synopsis = "[--config FILE] [--listen ENDPOINT]..."
    longdesc = (
        "Supervise stdio MCP servers and serve each at /servers/NAME/mcp (Streamable HTTP) "
        "and /servers/NAME/sse (HTTP+SSE). Without --config, serves the built-in example "
        "server on 127.0.0.1:8080."
    )
    optParameters = [
        [
            "config",
            "c",
            None,
            "Configuration file: TOML, or JSON in the mcpServers format.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Listen on this Twisted endpoint (repeatable; replaces the config's listeners)."""
        self["listen"].append(endpoint)

    opt_l = opt_listen


def makeService(options: Options) -> IService:
    from mcptwist.service.lazytls import import_twisted_without_tls

    # Before anything imports the reactor or Twisted's endpoints (the
    # configuration's listeners are checked with them).
    import_twisted_without_tls()
    from twisted.internet import reactor

    from mcptwist.ops.notify import SystemdNotifier
    from mcptwist.service.bridge import BridgeService

    try:
        config = (
            load_config(options["config"], os.environ) if options["config"] else default_config()
        )
        listeners = tuple(
            listener_from_string("--listen", f"--listen[{i}]", endpoint)
            for i, endpoint in enumerate(options["listen"])
        )
    except ConfigError as e:
        raise SystemExit(f"mcpbridge: {e}") from None
    if listeners:
        config = attrs.evolve(config, listeners=listeners)
    return BridgeService(
        config,
        reactor,
        os.environ,
        handle_sighup=True,
        config_path=options["config"],
        notifier=SystemdNotifier(os.environ, reactor),
        listen_override=listeners or None,
        freeze_gc=True,
    )
