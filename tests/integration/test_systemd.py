"""The bridge as systemd runs it: sockets it inherits, sd_notify, and the unit files.

C{systemd-socket-activate} stands in for systemd (see C{systemd_support}):
the bridge adopts the sockets it binds through
C{systemd:domain=INET:name=NAME} listeners, and accepts the first
connection, which made it start, too. sd_notify goes to a datagram socket
each test binds, given as C{NOTIFY_SOCKET}.
"""

from __future__ import annotations

import http.client
import json
import os
import shlex
import shutil
import signal
import socket
import ssl
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.config.load import load_config
from mcptwist.config.model import ServerConfig
from mcptwist.service.bridge import BridgeService

from ..support import certs
from . import harness as h
from .systemd_support import (
    UNITS,
    ActivatedBridge,
    NotifySocket,
    one,
    read_unit,
    start,
    values,
    verify_units,
)

NOTIFY_TIMEOUT = 20.0


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def example_server() -> str:
    return h.python_server_toml("example", ["-m", "mcptwist.example"])


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(e.decode(errors="replace").split("=", 1) for e in raw.split(b"\0") if b"=" in e)


class SocketActivationTests(SynchronousTestCase):
    """The bridge serves on sockets systemd bound, found by their names."""

    def sdk_call(self, url: str, *extra: str) -> None:
        result = h.run_client(
            "sdk_client.py",
            "--url",
            url,
            "--transport",
            "http",
            *extra,
            "call",
            "current_time",
            '{"timezone": "UTC"}',
        )
        self.assertTrue(result.get("ok"), json.dumps(result)[:3000])
        self.assertFalse(result["call"]["is_error"], result["call"])

    def test_http_on_an_inherited_socket(self) -> None:
        port = free_port()
        notify = NotifySocket(self)
        config = '[[listeners]]\nendpoint = "systemd:domain=INET:name=http"\n\n' + example_server()
        bridge = start(self, config, [("http", port)], env={"NOTIFY_SOCKET": notify.address})
        self.assertIn(f"listening on 127.0.0.1:{port} (systemd:domain=INET:name=http)", bridge.log)
        # systemd-socket-activate exec'd twistd: the socket's LISTEN_PID is the bridge.
        cmdline = Path(f"/proc/{bridge.pid}/cmdline").read_bytes().split(b"\0")
        self.assertIn(b"mcpbridge", cmdline)
        bridge.wait_state("example", "running")
        status, _, body = h.http("GET", f"http://127.0.0.1:{port}/health")
        self.assertEqual((status, json.loads(body)["status"]), (200, "ok"))
        self.sdk_call(bridge.mcp_url("example"))
        # What systemd gave the bridge is not handed on to its children.
        children = bridge.children()
        self.assertTrue(children)
        for pid in children:
            leaked = {k for k in environ_of(pid) if k.startswith("LISTEN_") or k == "NOTIFY_SOCKET"}
            self.assertEqual(leaked, set(), f"child {pid}")

    def test_http_and_https_by_name(self) -> None:
        """Two named sockets (given in the other order), TLS on one: as the shipped units."""
        directory = Path(tempfile.mkdtemp(prefix="mcptwist-sd-tls-"))
        self.addCleanup(shutil.rmtree, directory, True)
        ca = certs.make_ca(str(directory))
        cert, key = certs.make_server_cert(str(directory), ca, "one")
        http_port, https_port = free_port(), free_port()
        config = (
            '[[listeners]]\nendpoint = "systemd:domain=INET:name=http"\n\n'
            '[[listeners]]\nendpoint = "systemd:domain=INET:name=https"\n'
            f"tls = {{ certificate = {h.toml_str(cert)}, key = {h.toml_str(key)} }}\n\n"
            + example_server()
        )
        bridge = start(self, config, [("https", https_port), ("http", http_port)])
        self.assertIn(
            f"listening on 127.0.0.1:{http_port} (systemd:domain=INET:name=http)", bridge.log
        )
        self.assertIn(
            f"listening on 127.0.0.1:{https_port} (systemd:domain=INET:name=https (TLS))",
            bridge.log,
        )
        bridge.wait_state("example", "running")
        context = ssl.create_default_context(cafile=ca.path)
        connection = http.client.HTTPSConnection(
            "127.0.0.1", https_port, context=context, timeout=10
        )
        self.addCleanup(connection.close)
        connection.request("GET", "/health")
        response = connection.getresponse()
        response.read()
        self.assertEqual(response.status, 200)
        peer = connection.sock.getpeercert()  # type: ignore[union-attr]
        self.assertEqual(dict(x[0] for x in peer["subject"])["commonName"], "one")  # type: ignore[index]
        # The https socket speaks only TLS; the http one only plain HTTP.
        self.assertRaises(
            (OSError, http.client.HTTPException),
            h.http,
            "GET",
            f"http://127.0.0.1:{https_port}/health",
            timeout=5,
        )
        self.assertRaises(
            (OSError, http.client.HTTPException),
            h.http,
            "GET",
            f"https://127.0.0.1:{http_port}/health",
            timeout=5,
            context=context,
        )
        self.sdk_call(f"https://127.0.0.1:{https_port}/servers/example/mcp", "--cafile", ca.path)
        self.sdk_call(bridge.mcp_url("example"))


class NotifyTests(SynchronousTestCase):
    """sd_notify from a real bridge: READY, RELOADING...READY, STOPPING, WATCHDOG.

    The contract: the bridge builds a L{mcptwist.ops.notify.SystemdNotifier} from
    its environment; it calls C{ready(status)} once it answers HTTP and its
    servers' children run, C{reloading(status)} then C{ready(status)} around a
    SIGHUP reload, C{stopping(status)} when it is told to stop, and
    C{start_watchdog()} when it starts.
    """

    def setUp(self) -> None:
        self.notify = NotifySocket(self)

    def start(self, **env: str) -> ActivatedBridge:
        config = '[[listeners]]\nendpoint = "systemd:domain=INET:name=http"\n\n' + example_server()
        return start(
            self,
            config,
            [("http", free_port())],
            env={"NOTIFY_SOCKET": self.notify.address, **env},
            wait=False,
        )

    def wait_message(
        self,
        bridge: ActivatedBridge,
        what: str,
        predicate: Callable[[list[dict[str, str]]], Any],
    ) -> Any:
        def check() -> Any:
            found = predicate(self.notify.poll())
            if not found:
                bridge.alive()
            return found

        return h.wait_for(check, NOTIFY_TIMEOUT, what)

    def wait_ready(self, bridge: ActivatedBridge) -> dict[str, str]:
        ready: dict[str, str] = self.wait_message(
            bridge,
            "READY=1 on NOTIFY_SOCKET",
            lambda messages: next((m for m in messages if m.get("READY") == "1"), None),
        )
        return ready

    def test_ready_once_serving(self) -> None:
        """READY=1, with a STATUS=, comes when HTTP answers and the child runs."""
        bridge = self.start()
        ready = self.wait_ready(bridge)
        # Asked at once: the answers must already be there, not merely queued.
        status, _, body = h.http("GET", bridge.url("/health"), timeout=2.0)
        self.assertEqual((status, json.loads(body)["status"]), (200, "ok"), body)
        self.assertEqual(bridge.status("example")["state"], "running")
        self.assertTrue(bridge.children())
        self.assertIn("listening on 127.0.0.1:", bridge.log)
        self.assertTrue(ready.get("STATUS"), ready)
        self.assertEqual([m for m in self.notify.poll() if m.get("READY")], [ready])

    def test_reloading_around_sighup(self) -> None:
        bridge = self.start()
        self.wait_ready(bridge)
        seen = len(self.notify.poll())
        before = monotonic_usec()
        os.kill(bridge.pid, signal.SIGHUP)

        def reload_done(messages: list[dict[str, str]]) -> list[dict[str, str]] | None:
            new = messages[seen:]
            starts = [i for i, m in enumerate(new) if m.get("RELOADING") == "1"]
            if starts and any(m.get("READY") == "1" for m in new[starts[0] :]):
                return new[starts[0] :]
            return None

        messages = self.wait_message(bridge, "RELOADING=1, then READY=1", reload_done)
        after = monotonic_usec()
        reloading = messages[0]
        self.assertTrue(before <= int(reloading["MONOTONIC_USEC"]) <= after, reloading)
        self.assertEqual(h.http("GET", bridge.url("/health"), timeout=2.0)[0], 200)

    def test_stopping_on_sigterm(self) -> None:
        bridge = self.start()
        self.wait_ready(bridge)
        bridge.stop()  # SIGTERM; checks the exit and that no child is left
        messages = self.notify.poll()
        stopping = [i for i, m in enumerate(messages) if m.get("STOPPING") == "1"]
        self.assertTrue(stopping, messages)
        self.assertFalse([m for m in messages[stopping[0] :] if m.get("READY")], messages)

    def test_watchdog(self) -> None:
        """With WATCHDOG_USEC (and no WATCHDOG_PID), WATCHDOG=1 every half of it."""
        bridge = self.start(WATCHDOG_USEC="400000")
        self.wait_ready(bridge)
        started = time.monotonic()
        count = len([m for m in self.notify.poll() if m.get("WATCHDOG") == "1"])
        self.wait_message(
            bridge,
            "three more WATCHDOG=1",
            lambda messages: len([m for m in messages if m.get("WATCHDOG") == "1"]) >= count + 3,
        )
        # Three pings 0.2 s apart take about 0.6 s; far less would mean a busy loop.
        self.assertGreater(time.monotonic() - started, 0.3)


class UnitFileTests(SynchronousTestCase):
    """etc/systemd: the socket and service units and the config they go with."""

    def load_example(self) -> Any:
        directory = self.mktemp()
        os.makedirs(directory)
        ca = certs.make_ca(directory)
        cert, key = certs.make_server_cert(directory, ca)
        os.rename(cert, os.path.join(directory, "cert.pem"))
        os.rename(key, os.path.join(directory, "key.pem"))
        environ = {"CREDENTIALS_DIRECTORY": directory, "LOGS_DIRECTORY": directory}
        return directory, load_config(UNITS / "bridge.toml", environ)

    def test_bridge_toml_loads(self) -> None:
        directory, config = self.load_example()
        self.assertEqual(
            [listener.endpoint for listener in config.listeners],
            ["systemd:domain=INET:name=http", "systemd:domain=INET:name=https"],
        )
        http_listener, https_listener = config.listeners
        self.assertIsNone(http_listener.tls)
        assert https_listener.tls is not None
        self.assertEqual(https_listener.tls.certificate, os.path.join(directory, "cert.pem"))
        self.assertEqual(https_listener.tls.key, os.path.join(directory, "key.pem"))
        self.assertEqual(config.audit.path, os.path.join(directory, "audit.jsonl"))
        # A listener on 0.0.0.0 is allowed only with authentication.
        self.assertTrue(config.auth.enabled)
        BridgeService(config, MemoryReactorClock(), {})

    def test_units_agree_with_the_config(self) -> None:
        _, config = self.load_example()
        wanted = {}
        for listener in config.listeners:
            options = dict(p.split("=", 1) for p in listener.endpoint.split(":")[1:])
            wanted[options["name"]] = options["domain"]
        sockets = sorted(UNITS.glob("*.socket"))
        found = {}
        for path in sockets:
            unit = read_unit(path)
            name = one(unit, "Socket", "FileDescriptorName")
            address = one(unit, "Socket", "ListenStream")
            host = address.rpartition(":")[0]
            # An IPv4 literal is an AF_INET socket; a bare port would be dual-stack INET6.
            self.assertRegex(host, r"^\d+\.\d+\.\d+\.\d+$", path.name)
            found[name] = "INET"
            self.assertEqual(one(unit, "Socket", "Service"), "mcpbridge.service")
            self.assertEqual(one(unit, "Socket", "NoDelay"), "true")
        self.assertEqual(found, wanted)

        service = read_unit(UNITS / "mcpbridge.service")
        names = {p.name for p in sockets}
        for key in ("Requires", "After"):
            listed = {u for v in values(service, "Unit", key) for u in v.split()}
            self.assertTrue(names <= listed, (key, listed))
        self.assertEqual(one(service, "Service", "Type"), "notify-reload")
        self.assertEqual(one(service, "Service", "NotifyAccess"), "main")
        argv = shlex.split(one(service, "Service", "ExecStart"))
        self.assertEqual(
            argv[1:], ["-n", "--pidfile=", "mcpbridge", "--config", "/etc/mcptwist/bridge.toml"]
        )
        self.assertEqual(one(service, "Service", "ConfigurationDirectory"), "mcptwist")
        self.assertEqual(one(service, "Service", "KillMode"), "mixed")
        stop = float(one(service, "Service", "TimeoutStopSec"))
        defaults = ServerConfig(name="x", command="x")
        self.assertGreater(stop, defaults.term_after + defaults.kill_after + 10)
        self.assertEqual(one(service, "Service", "CapabilityBoundingSet"), "")
        # The credentials the unit loads are the files the config reads.
        credentials = {v.split(":", 1)[0] for v in values(service, "Service", "LoadCredential")}
        tls = config.listeners[1].tls
        self.assertEqual(
            credentials, {os.path.basename(tls.certificate), os.path.basename(tls.key)}
        )
        self.assertEqual(one(service, "Service", "LogsDirectory"), "mcptwist")

    def test_systemd_analyze_verify(self) -> None:
        """systemd-analyze verify accepts the units (ExecStart made to exist here)."""
        directory = Path(self.mktemp())
        directory.mkdir()
        for path in UNITS.glob("mcpbridge*"):
            text = path.read_text().replace("/opt/mcptwist/bin/twistd", h.TWISTD)
            (directory / path.name).write_text(text)
        units = sorted(p.name for p in directory.iterdir())
        self.assertEqual(verify_units(directory, units), (0, []))
