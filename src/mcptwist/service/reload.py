# -*- test-case-name: tests.test_service -*-
"""Reloading the configuration of a running bridge: on SIGHUP, or when the
admin API asks.

The file is read again; a file that does not load, or that must not be
applied (L{ReloadRefused}), changes nothing. Otherwise the bridge moves to
it (L{Reconfigurable.apply}) and says what changed.
"""

from __future__ import annotations

import signal
from collections.abc import Coroutine, Iterable, Mapping
from typing import Any, Protocol

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from mcptwist.config.load import load_config
from mcptwist.config.model import AuthConfig, BridgeConfig, ConfigError, ListenerConfig
from mcptwist.ops.audit import AuditTrail
from mcptwist.ops.notify import SystemdNotifier
from mcptwist.routing.members import AggregateBackend
from mcptwist.routing.sessions import SessionRegistry
from mcptwist.security.auth import revoked
from mcptwist.security.origin import is_local_address
from mcptwist.service.listener import Listener

log = Logger(namespace="mcptwist.service")


class ReloadRefused(Exception):
    """A new configuration that must not be applied to the running bridge."""


class Reconfigurable(Protocol):
    """The running bridge, as a reload sees it."""

    @property
    def config(self) -> BridgeConfig:
        """The configuration in force."""

    def apply(self, new: BridgeConfig) -> Coroutine[Any, Any, dict[str, Any]]:
        """Move to C{new}; what changed. ReloadRefused if it must not."""

    def status_line(self) -> str:
        """How the bridge is, in one line (for systemd)."""


class Reloader(Service):
    """Reloads the configuration, one reload at a time (a reload asked for
    meanwhile reads the file once more when it ends).

    Started after the listeners, it stops before them: SIGHUP no longer
    reloads, and a reload under way ends before the bridge stops listening.
    """

    def __init__(
        self,
        bridge: Reconfigurable,
        reactor: Any,
        environ: Mapping[str, str],
        notifier: SystemdNotifier,
        audit: AuditTrail,
        config_path: str | None = None,
        listen_override: tuple[ListenerConfig, ...] | None = None,
        handle_sighup: bool = False,
    ) -> None:
        self.bridge = bridge
        self.reactor = reactor
        self.environ = environ
        self.notifier = notifier
        self.audit = audit
        self.config_path = config_path
        # Listeners given on the command line: they replace the file's.
        self.listen_override = listen_override
        self.handle_sighup = handle_sighup
        self._reloading: Deferred[dict[str, Any]] | None = None
        self._reload_again = False

    def startService(self) -> None:
        super().startService()
        if self.handle_sighup:
            signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self._sighup))

    def stopService(self) -> Deferred[dict[str, Any]] | None:
        super().stopService()
        if self.handle_sighup:
            # Not the default action (which kills): a HUP from logrotate may come now.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        return self._reloading

    def _sighup(self) -> None:
        """SIGHUP: reload, and put the outcome in the audit trail (the admin
        API writes its own reloads there)."""

        def audit(result: dict[str, Any]) -> None:
            self.audit.admin_action(
                principal="signal",
                peer=None,
                action="reload",
                target=self.config_path,
                outcome="ok" if result["ok"] else f"error: {result['error']}",
            )

        self.reload().addCallback(audit)

    def reload(self) -> Deferred[dict[str, Any]]:
        """Re-read the configuration file and apply it; a bad file changes nothing.

        Returns what changed: C{{"ok": bool, "error": str | None, "changes": {...}}}.
        """
        if not self.running:
            return succeed({"ok": False, "error": "the bridge is stopping", "changes": {}})
        if self._reloading is not None:
            # One at a time; the file may have changed again meanwhile: read it once more.
            self._reload_again = True
            return self._reloading
        d = Deferred.fromCoroutine(self._reload())

        def done(result: dict[str, Any]) -> dict[str, Any]:
            self._reloading = None
            if self._reload_again and self.running:
                self._reload_again = False
                self.reload()
            return result

        d.addBoth(done)
        if not d.called:
            self._reloading = d
        return d

    async def _reload(self) -> dict[str, Any]:
        self.notifier.reloading("reloading the configuration")
        if self.config_path is None:
            log.info("reload: no configuration file; re-reading certificates only")
            new = self.bridge.config
        else:
            try:
                new = load_config(self.config_path, self.environ)
            except ConfigError as e:
                log.error("reload refused, the running configuration stays: {error}", error=str(e))
                self.notifier.ready(f"reload failed: {e.key}: {e.problem}")
                return {"ok": False, "error": str(e), "changes": {}}
        if self.listen_override is not None:
            new = attrs.evolve(new, listeners=self.listen_override)
        try:
            changes = await self.bridge.apply(new)
        except ReloadRefused as e:
            log.error("reload refused, the running configuration stays: {error}", error=str(e))
            self.notifier.ready(f"reload refused: {e}")
            return {"ok": False, "error": str(e), "changes": {}}
        except Exception as e:
            log.failure("reload failed part way")
            self.notifier.ready(f"reload failed: {e}")
            return {"ok": False, "error": f"reload failed: {e!r}", "changes": {}}
        failed = [f for kind in ("listeners", "metrics_listeners") for f in changes[kind]["failed"]]
        log.info("reload done: {changes}", changes=changes)
        self.notifier.ready(self.bridge.status_line())
        if failed:
            return {"ok": False, "error": "; ".join(failed), "changes": changes}
        return {"ok": True, "error": None, "changes": changes}


def refuse_exposure(listeners: Iterable[Listener], new: BridgeConfig) -> None:
    """Refuse a configuration without authentication (nor C{insecure}) while
    a listener listens beyond loopback: the reload cannot close that port.

    @raise ReloadRefused: then.
    """
    if new.insecure or new.auth.enabled:
        return
    for listener in listeners:
        port = listener.port
        if port is not None and not is_local_address(port.getHost()):
            raise ReloadRefused(
                f"{listener.config.endpoint} listens beyond loopback, and the new "
                "configuration has no authentication (and no insecure = true); "
                "keep [auth], or move the listener to loopback and restart"
            )


def revoke(registry: SessionRegistry, old: AuthConfig, new: AuthConfig) -> list[str]:
    """Close the sessions, and so the streams, that the new credentials no
    longer allow (L{revoked}); each is audited with its reason.

    Returns who lost what, as C{"PRINCIPAL on SERVER"}.
    """
    if old == new:
        return []
    lost: set[str] = set()
    for session in list(registry.sessions.values()):
        backend = session.backend
        # A session of an endpoint goes on while any of its servers is granted.
        servers = (
            backend.aggregate.members
            if isinstance(backend, AggregateBackend)
            else (session.server,)
        )
        reasons = [revoked(old, new, session.principal, server) for server in servers]
        why = None if None in reasons else reasons[0]
        if why is not None:
            registry.close(session, why)
            lost.add(f"{session.principal} on {session.server}")
    return sorted(lost)


def changed_settings(old: BridgeConfig, new: BridgeConfig) -> list[str]:
    """The bridge-wide settings a reload changed, by name."""
    skip = {"servers", "listeners", "source"}
    return [
        field.name
        for field in attrs.fields(BridgeConfig)
        if field.name not in skip and getattr(old, field.name) != getattr(new, field.name)
    ]
