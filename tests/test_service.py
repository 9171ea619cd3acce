"""The service tree in memory: what starts before what, what stops before
what, and a reload applied to a running bridge, over fake children and
fake ports."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.config.load import load_config
from mcptwist.mcp import jsonrpc
from mcptwist.ops.notify import SystemdNotifier
from mcptwist.routing.backends import SharedBackend
from mcptwist.routing.members import AggregateUpstream
from mcptwist.routing.sessions import ClientSession
from mcptwist.service.bridge import BridgeService
from mcptwist.service.listener import ListenerError

from .support.children import FakeChild, FakeProcessReactor


class Port:
    """A listening port; while its reactor holds ports, closing it ends
    when the test says (L{closed})."""

    def __init__(self, address: IPv4Address, reactor: Reactor) -> None:
        self.address = address
        self.reactor = reactor
        self.closing: Deferred[None] | None = None

    def getHost(self) -> IPv4Address:
        return self.address

    def stopListening(self) -> Deferred[None]:
        self.closing = Deferred() if self.reactor.hold_ports else succeed(None)
        return self.closing

    def closed(self) -> None:
        assert self.closing is not None
        self.closing.callback(None)


class Reactor(FakeProcessReactor, MemoryReactor):
    """Fake children (which exit when signalled, not when their stdin
    closes), and TCP ports on the interface asked for; a port number in
    L{taken} cannot be listened on."""

    def __init__(self) -> None:
        MemoryReactor.__init__(self)
        FakeProcessReactor.__init__(self, exit_on_eof=False)
        self.ports: dict[int, Port] = {}
        self.taken: set[int] = set()
        self.hold_ports = False

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Port:
        if port in self.taken:
            raise CannotListenError(
                interface, port, OSError(errno.EADDRINUSE, "Address already in use")
            )
        listening = Port(IPv4Address("TCP", interface or "0.0.0.0", port), self)
        self.ports[port] = listening
        return listening


class Notices(SystemdNotifier):
    """Records what the bridge tells systemd, each message's fields on one line."""

    def __init__(self, clock: Reactor) -> None:
        super().__init__({"NOTIFY_SOCKET": "/run/test/notify"}, clock)
        self.sent: list[str] = []

    def send_raw(self, message: str) -> bool:
        self.sent.append(" ".join(message.splitlines()))
        return True


class Sink:
    """A session's transport; C{on_close} is told when the session ends."""

    connected = False

    def __init__(self, on_close: Callable[[], None]) -> None:
        self.on_close = on_close

    def deliver(self, message: Any, related: Any, encoded: bytes | None = None) -> None:
        pass

    def cancelled(self, request_id: Any) -> None:
        pass

    def close(self) -> None:
        self.on_close()


def server(name: str, *lines: str) -> str:
    return f'[servers.{name}]\ncommand = "fake"\n' + "".join(f"{line}\n" for line in lines)


def listeners(*endpoints: str, **extra: str) -> str:
    """[[listeners]] tables on 127.0.0.1 at these ports; C{extra} adds lines to one."""
    return "".join(
        f'[[listeners]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\n{extra.get(port, "")}'
        for port in endpoints
    )


def endpoint(port: str) -> str:
    return f"tcp:{port}:interface=127.0.0.1"


class Bridge:
    """A BridgeService of a configuration file, over fake children and ports."""

    def __init__(self, test: SynchronousTestCase, text: str) -> None:
        self.test = test
        self.reactor = Reactor()
        self.directory = test.mktemp()
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "bridge.toml")
        self.audit_path = os.path.join(self.directory, "audit.jsonl")
        Path(self.path).write_text(text.replace("AUDIT", self.audit_path))
        self.notices = Notices(self.reactor)
        self.service = BridgeService(
            load_config(self.path, {}),
            self.reactor,
            {},
            config_path=self.path,
            notifier=self.notices,
        )
        test.addCleanup(self.stop)

    def start(self) -> None:
        self.service.privilegedStartService()
        self.service.startService()

    def stop(self) -> None:
        if self.service.running:
            self.reactor.hold_ports = False
            self.service.stopService()
            self.reactor.advance(10)

    def child(self, name: str) -> FakeChild:
        """The child of a shared server."""
        backend = self.service.backends[name]
        assert isinstance(backend, SharedBackend)
        [child] = [c for c in self.reactor.children if c.pid == backend.upstream.supervisor.pid]
        return child

    def session(self, name: str, on_close: Callable[[], None] = lambda: None) -> ClientSession:
        return self.service.registry.create(
            self.service.backends[name], "sse", lambda _: Sink(on_close)
        )

    def reload(self, text: str) -> dict[str, Any]:
        Path(self.path).write_text(text)
        result: dict[str, Any] = self.test.successResultOf(self.service.reloader.reload())
        return result

    def audit_events(self) -> list[str]:
        with open(self.audit_path, "rb") as f:
            return [json.loads(line)["event"] for line in f]


LOOPBACK = listeners("8001")


class StartTests(SynchronousTestCase):
    def test_listeners_bind_before_any_child_spawns(self) -> None:
        bridge = Bridge(self, LOOPBACK + server("s"))
        bridge.service.privilegedStartService()
        self.assertEqual(list(bridge.reactor.ports), [8001])
        self.assertEqual(bridge.reactor.children, [])
        bridge.service.startService()
        self.assertEqual(len(bridge.reactor.children), 1)

    def test_a_network_listener_without_authentication_is_refused_before_any_child(self) -> None:
        bridge = Bridge(self, 'listen = ["tcp:8001"]\n' + server("s"))
        error = self.assertRaises(ListenerError, bridge.service.privilegedStartService)
        self.assertIn("refusing to listen on 0.0.0.0:8001", str(error))
        self.assertIsNotNone(bridge.reactor.ports[8001].closing, "its port is closed again")
        self.assertEqual(bridge.reactor.children, [])

    def test_a_listener_that_cannot_listen_stops_the_start(self) -> None:
        bridge = Bridge(self, listeners("8001", "8002") + server("s"))
        bridge.reactor.taken.add(8002)
        error = self.assertRaises(ListenerError, bridge.service.privilegedStartService)
        self.assertIn(f"cannot listen on {endpoint('8002')}", str(error))
        self.assertIn("Address already in use", str(error))
        self.assertEqual(bridge.reactor.children, [])

    def test_an_audit_trail_that_cannot_open_stops_the_start_before_any_listener(self) -> None:
        bridge = Bridge(self, '[audit]\npath = "AUDIT"\n' + LOOPBACK + server("s"))
        os.mkdir(bridge.audit_path)  # no file can be opened there now
        error = self.assertRaises(ListenerError, bridge.service.privilegedStartService)
        self.assertTrue(str(error).startswith("mcpbridge: "), str(error))
        self.assertEqual(bridge.reactor.ports, {})
        self.assertEqual(bridge.reactor.children, [])

    def test_ready_once_every_child_serves(self) -> None:
        """READY=1 waits for every child's handshake."""
        bridge = Bridge(self, LOOPBACK + server("s") + server("t"))
        slow: list[FakeChild] = []

        def spawned(child: FakeChild) -> None:
            if not slow:
                child.reading = False
                slow.append(child)

        bridge.reactor.on_spawn = spawned
        bridge.start()
        self.assertEqual(len(bridge.reactor.children), 2)
        self.assertEqual(bridge.notices.sent, [])
        [child] = slow
        child.reading = True
        for data in child.unread:
            child.stdin_data(data)
        [ready] = bridge.notices.sent
        self.assertTrue(ready.startswith("READY=1 "), ready)


class StopTests(SynchronousTestCase):
    def test_stop_listening_then_end_sessions_then_stop_children(self) -> None:
        """Stopping: STOPPING=1; the ports close (and are waited for); the
        sessions end; then the children are stopped, and waited for, while
        the audit trail still records their exits."""
        bridge = Bridge(self, '[audit]\npath = "AUDIT"\n' + LOOPBACK + server("s"))
        bridge.start()
        child = bridge.child("s")
        ended: list[bool] = []
        bridge.session("s", on_close=lambda: ended.append(child.stdin_is_closed))
        bridge.reactor.hold_ports = True

        stopped = bridge.service.stopService()

        self.assertTrue(bridge.notices.sent[-1].startswith("STOPPING=1 "))
        port = bridge.reactor.ports[8001]
        self.assertIsNotNone(port.closing, "it stops listening first")
        self.assertEqual(ended, [], "sessions wait for the ports to close")
        self.assertFalse(child.stdin_is_closed)
        port.closed()
        self.assertEqual(ended, [False], "the session ends before its child is stopped")
        self.assertTrue(child.stdin_is_closed)
        self.assertNoResult(stopped)
        bridge.reactor.advance(2)  # term_after: the child is signalled, and exits
        self.assertTrue(child.exited)
        self.successResultOf(stopped)
        self.assertEqual(bridge.audit_events()[-1], "child_exited")

    def test_a_reload_under_way_ends_before_listening_stops(self) -> None:
        bridge = Bridge(self, listeners("8001", "8002") + server("s"))
        bridge.start()
        bridge.reactor.hold_ports = True
        Path(bridge.path).write_text(LOOPBACK + server("s"))
        reloaded: list[dict[str, Any]] = []
        bridge.service.reloader.reload().addCallback(reloaded.append)
        self.assertEqual(reloaded, [], "it waits for port 8002 to close")
        stopped = bridge.service.stopService()
        self.assertEqual(
            self.successResultOf(bridge.service.reloader.reload())["error"],
            "the bridge is stopping",
        )
        self.assertIsNone(bridge.reactor.ports[8001].closing)
        bridge.reactor.ports[8002].closed()
        [result] = reloaded
        self.assertTrue(result["ok"], result)
        bridge.reactor.ports[8001].closed()
        bridge.reactor.advance(10)
        self.successResultOf(stopped)

    def test_the_admin_api_starts_nothing_once_stopping(self) -> None:
        bridge = Bridge(self, LOOPBACK + server("s"))
        bridge.start()
        bridge.reactor.hold_ports = True
        bridge.service.stopService()
        self.assertRaises(RuntimeError, bridge.service.control.restart, "s")


BASE = "drain_timeout = 5\n" + LOOPBACK + server("a") + server("b") + server("c")


class ReloadTests(SynchronousTestCase):
    """A reload of a running bridge, in memory (servers a, b and c, each
    with a session open)."""

    def setUp(self) -> None:
        self.bridge = Bridge(self, BASE)
        self.bridge.start()
        self.backends = dict(self.bridge.service.backends)
        self.children = {name: self.bridge.child(name) for name in "abc"}
        self.sessions = {name: self.bridge.session(name) for name in "abc"}

    def open_sessions(self) -> set[str]:
        return {s.server for s in self.bridge.service.registry.sessions.values()}

    def test_endpoints(self) -> None:
        """A reload adds, changes and removes endpoints; a new session follows
        the new rules, and a changed pin file is read (a bad one refuses the reload)."""
        endpoint = '[endpoints.team]\nservers = ["a", "b"]\n'
        self.assertTrue(self.bridge.reload(BASE + endpoint)["ok"])
        endpoints = self.bridge.service.fleet.endpoints
        self.assertEqual(endpoints["endpoints/team"].aggregate.members, ("a", "b"))
        same = endpoints["endpoints/team"]
        registry = self.bridge.service.registry
        open_ = registry.create(same, "sse", lambda _: Sink(lambda: None))
        upstream = open_.upstream
        assert isinstance(upstream, AggregateUpstream)
        upstream.open_links()
        self.assertTrue(self.bridge.reload(BASE + endpoint)["ok"])
        self.assertIs(endpoints["endpoints/team"], same)
        # A member reconfigured: the session goes on, on the new child.
        changed = BASE.replace(server("b"), server("b", 'args = ["-v"]')) + endpoint
        self.assertTrue(self.bridge.reload(changed)["ok"])
        self.assertFalse(open_.closed)
        upstream.open_links()
        self.assertIs(upstream.links["b"].backend, self.bridge.service.backends["b"])
        self.assertEqual(upstream.links["b"].upstream.state.value, "running")
        result = self.bridge.reload(BASE + '[endpoints.team]\nservers = ["c"]\nprefix = "none"\n')
        # The endpoint changed: its sessions end, so the new rules hold at once.
        self.assertTrue(open_.closed)
        self.assertIn("endpoints", result["changes"]["settings"])
        self.assertEqual(endpoints["endpoints/team"].aggregate.members, ("c",))
        self.assertTrue(self.bridge.reload(BASE)["ok"])
        self.assertEqual(endpoints, {})
        bad = Path(self.mktemp())
        bad.write_text("{not json")
        result = self.bridge.reload(f'pin_file = "{bad}"\n' + BASE)
        self.assertFalse(result["ok"])
        self.assertIn("cannot read the pin file", result["error"])
        self.assertIsNone(self.bridge.service.config.pin_file)
        good = self.mktemp()
        self.assertTrue(self.bridge.reload(f'pin_file = "{good}"\n' + BASE)["ok"])
        self.assertEqual(self.bridge.service.pins.path, good)
        self.assertTrue(Path(good).exists())

    def test_unchanged_changed_removed_and_added_servers(self) -> None:
        text = "drain_timeout = 5\n" + LOOPBACK + server("a") + server("b", 'args = ["-v"]')
        result = self.bridge.reload(text + server("d"))
        self.assertTrue(result["ok"], result)
        self.assertEqual(
            result["changes"]["servers"],
            {"added": ["d"], "removed": ["c"], "restarted": ["b"], "unchanged": ["a"]},
        )
        backends = self.bridge.service.backends
        # a: the same backend and child.
        self.assertIs(backends["a"], self.backends["a"])
        self.assertIs(self.bridge.child("a"), self.children["a"])
        # b: a new child for new sessions; c is gone for them; d is there.
        self.assertIsNot(backends["b"], self.backends["b"])
        self.assertEqual(self.bridge.child("b").args[-1], "-v")
        self.assertEqual(sorted(backends), ["a", "b", "d"])
        self.bridge.child("d")
        # The old b and c drain: their sessions and children go on for now.
        self.assertEqual(self.open_sessions(), {"a", "b", "c"})
        self.assertFalse(self.children["b"].stdin_is_closed or self.children["c"].stdin_is_closed)
        # Their requests still reach their children.
        self.sessions["c"].receive(
            jsonrpc.request(1, "ping"), jsonrpc.Kind.REQUEST, self.bridge.reactor.seconds()
        )
        self.assertEqual(len(self.children["c"].requests("ping")), 1)
        self.bridge.reactor.advance(5)  # drain_timeout
        self.assertEqual(self.open_sessions(), {"a"})
        self.assertTrue(self.children["b"].stdin_is_closed and self.children["c"].stdin_is_closed)
        self.assertFalse(self.children["a"].stdin_is_closed)
        self.assertFalse(self.sessions["a"].closed)

    def test_a_retired_server_stops_when_its_last_session_ends(self) -> None:
        self.bridge.reload("drain_timeout = 5\n" + LOOPBACK + server("a") + server("b"))
        self.assertFalse(self.children["c"].stdin_is_closed)
        self.bridge.service.registry.close(self.sessions["c"])
        self.assertTrue(self.children["c"].stdin_is_closed)

    def test_a_bad_file_changes_nothing(self) -> None:
        result = self.bridge.reload(server("a", "bogus = 1"))
        self.assertFalse(result["ok"])
        self.assertIn("servers.a.bogus", result["error"])
        self.assertEqual(self.bridge.service.backends, self.backends)
        self.assertEqual(self.open_sessions(), {"a", "b", "c"})
        self.assertFalse(any(child.stdin_is_closed for child in self.children.values()))
        self.assertIsNone(self.bridge.reactor.ports[8001].closing)
        self.assertTrue(self.bridge.notices.sent[-1].startswith("READY=1 STATUS=reload failed"))

    def test_listeners_change_by_endpoint(self) -> None:
        bridge = Bridge(self, listeners("8001", "8002") + server("s"))
        bridge.start()
        [first, _] = bridge.service.listeners
        allow = 'allow = ["127.0.0.1"]\n'
        result = bridge.reload(listeners("8001", "8003", **{"8001": allow}) + server("s"))
        self.assertTrue(result["ok"], result)
        self.assertEqual(
            result["changes"]["listeners"],
            {
                "added": [endpoint("8003")],
                "removed": [endpoint("8002")],
                "updated": [endpoint("8001")],
                "unchanged": [],
                "failed": [],
            },
        )
        # 8001 changed in place: the same port, not closed.
        self.assertIs(bridge.service.listeners[0], first)
        self.assertIsNone(bridge.reactor.ports[8001].closing)
        self.assertIsNotNone(bridge.reactor.ports[8002].closing)
        self.assertEqual(
            [listener.config.endpoint for listener in bridge.service.listeners],
            [endpoint("8001"), endpoint("8003")],
        )
        self.assertEqual([str(network) for network in first.config.allow], ["127.0.0.1/32"])

    def test_a_new_listener_that_cannot_listen_is_reported(self) -> None:
        self.bridge.reactor.taken.add(8003)
        result = self.bridge.reload(
            "drain_timeout = 5\n" + listeners("8001", "8003") + server("a") + server("b")
        )
        self.assertFalse(result["ok"])
        self.assertIn(f"{endpoint('8003')}: mcpbridge: cannot listen on", result["error"])
        # The rest applied.
        self.assertEqual(result["changes"]["servers"]["removed"], ["c"])
        self.assertEqual(
            [listener.config.endpoint for listener in self.bridge.service.listeners],
            [endpoint("8001")],
        )

    def test_exposing_a_port_without_authentication_is_refused(self) -> None:
        """Authentication cannot be dropped while a listener listens beyond
        loopback: the reload is refused, and the old configuration stays."""
        token = '[[auth.tokens]]\nname = "t"\nhash = "sha256:' + "0" * 64 + '"\n'
        bridge = Bridge(self, 'listen = ["tcp:8001"]\n' + token + server("s"))
        bridge.start()
        backends = dict(bridge.service.backends)
        result = bridge.reload('listen = ["tcp:8001"]\n' + server("s") + server("t"))
        self.assertFalse(result["ok"])
        self.assertIn("listens beyond loopback", result["error"])
        self.assertTrue(bridge.service.config.auth.enabled)
        self.assertEqual(bridge.service.backends, backends)
        self.assertIsNone(bridge.reactor.ports[8001].closing)


class ReapIntervalTests(SynchronousTestCase):
    def test_follows_the_shortest_idle_timeout(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from mcptwist.config.model import BridgeConfig, ServerConfig

        def interval(*timeouts: float) -> float:
            servers = {
                f"s{i}": ServerConfig(name=f"s{i}", command="x", session_idle_timeout=t)
                for i, t in enumerate(timeouts)
            }
            service = BridgeService(BridgeConfig(servers=servers), MemoryReactorClock(), {})
            return service.registry._reap_interval

        self.assertEqual(interval(1800), 30.0)
        self.assertEqual(interval(1800, 8), 2.0)
        self.assertEqual(interval(2), 1.0)


class AccessLogTests(SynchronousTestCase):
    def test_off_by_default_and_on_when_asked(self) -> None:
        from twisted.internet.testing import MemoryReactorClock
        from twisted.logger import capturedLogs
        from twisted.web.test.requesthelper import DummyRequest

        from mcptwist.config.model import BridgeConfig, ServerConfig

        servers = {"s": ServerConfig(name="s", command="x")}
        for enabled in (False, True):
            service = BridgeService(
                BridgeConfig(servers=servers, access_log=enabled), MemoryReactorClock(), {}
            )
            request = DummyRequest([b"servers"])
            request.uri = b"/servers?x=1"
            request.path = b"/servers"
            request.code, request.sentLength = 200, 42  # as a finished real request has
            with capturedLogs() as events:
                service.site.log(request)
            lines = [e for e in events if e["log_namespace"] == "mcptwist.access"]
            self.assertEqual(len(lines), int(enabled))
            if enabled:
                self.assertEqual((lines[0]["method"], lines[0]["path"]), ("GET", "/servers"))
