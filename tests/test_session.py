"""The session registry: unguessable ids, the global and per-principal limits,
idle reaping, each principal's stateless hub, and the order a session ends in.

Sessions are opened on real backends over fake children, on a Clock; what a
session hands its transport goes to a recording sink.
"""

from __future__ import annotations

import base64
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from mcptwist.config.model import LimitsConfig, ServerConfig
from mcptwist.mcp import jsonrpc
from mcptwist.mcp.era import MODERN
from mcptwist.mcp.jsonrpc import Kind, Message, RequestId
from mcptwist.routing.backends import Backend, make_backend
from mcptwist.routing.record import RequestEnded
from mcptwist.routing.sessions import (
    ClientSession,
    PrincipalLimitError,
    SessionLimitError,
    SessionRegistry,
)
from mcptwist.routing.upstream import CapacityError
from mcptwist.security.ratelimit import Caps

from .support.bridge import Bridge, Client
from .support.children import FakeProcessReactor
from .support.messages import JSON, call

IDLE = 60.0


class Sink:
    """What a transport would do with a session's messages: keep them, and say
    whether a client stream is open (a request in flight keeps one open)."""

    def __init__(self, log: list[Any]) -> None:
        self.log = log
        self.delivered: list[Message] = []
        self.connected = False
        self.closed = False

    def deliver(
        self, message: Message, related: RequestId | None, encoded: bytes | None = None
    ) -> None:
        self.delivered.append(message)

    def cancelled(self, request_id: RequestId) -> None:
        pass

    def close(self) -> None:
        self.closed = True
        self.log.append("sink closed")


class Recorder:
    """Stands in for the audit trail: every event it is told of, in order."""

    recording = True
    detailed = True

    def __init__(self, log: list[Any]) -> None:
        self.log = log

    def request_ended(self, ended: RequestEnded) -> None:
        self.log.append(("request", ended.method, ended.status))

    def session_opened(self, **fields: Any) -> None:
        self.log.append(("session_opened", fields["transport"], fields["protocol_version"]))

    def session_closed(self, **fields: Any) -> None:
        self.log.append(("session_closed", fields["reason"]))

    def child_spawned(self, **fields: Any) -> None:
        pass

    def child_exited(self, **fields: Any) -> None:
        pass


class Sessions:
    """A registry over the backends of servers C{s} and C{t}, on a Clock."""

    def __init__(
        self,
        test: SynchronousTestCase,
        max_sessions: int = 100,
        limits: LimitsConfig | None = None,
        hold: bool = False,
        **server: Any,
    ) -> None:
        self.reactor = FakeProcessReactor(hold=hold)
        self.log: list[Any] = []
        self.recorder = Recorder(self.log)
        self.backends: dict[str, Backend] = {}
        for name in ("s", "t"):
            config = ServerConfig(name=name, command="fake", session_idle_timeout=IDLE, **server)
            self.backends[name] = make_backend(config, self.reactor, {})
            self.backends[name].startService()
        # The shared child of server s (a server with a child per session has none yet).
        self.child = self.reactor.children[0] if self.reactor.children else None
        caps = Caps.from_limits(limits) if limits is not None else None
        self.registry = SessionRegistry(
            self.reactor, max_sessions, reap_interval=10.0, caps=caps, recorder=self.recorder
        )
        self.sinks: dict[str, Sink] = {}
        test.addCleanup(self.registry.stopService)

    def sink(self, session_id: str) -> Sink:
        self.sinks[session_id] = Sink(self.log)
        return self.sinks[session_id]

    def open(self, principal: str = "anonymous", server: str = "s") -> ClientSession:
        return self.registry.create(self.backends[server], "streamable", self.sink, principal)

    def hub(self, principal: str = "anonymous", server: str = "s") -> ClientSession:
        return self.registry.hub(self.backends[server], self.sink, principal)


def initialized(session: ClientSession, now: float) -> None:
    """The session's client initializes, as a transport would pass it on."""
    init = jsonrpc.request(
        0, "initialize", {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {}}
    )
    session.receive(init, Kind.REQUEST, now)


class IdTests(SynchronousTestCase):
    def test_ids_are_256_random_bits_in_url_safe_text(self) -> None:
        sessions = Sessions(self, max_sessions=1000)
        ids = [sessions.open().id for _ in range(500)]
        self.assertEqual(len(set(ids)), len(ids))
        for session_id in ids:
            self.assertRegex(session_id, r"^[A-Za-z0-9_-]{43}$")
            self.assertEqual(len(base64.urlsafe_b64decode(session_id + "=")), 32)
        # Nothing in them is shared or counted: every position takes many values
        # (the last holds the last 4 bits).
        for position in range(42):
            self.assertGreater(len({i[position] for i in ids}), 20, position)

    def test_ids_do_not_follow_the_clock(self) -> None:
        """Two registries at the same moment give different ids."""
        first, second = Sessions(self), Sessions(self)
        self.assertNotEqual(first.open().id, second.open().id)

    def test_the_sink_is_made_for_the_id(self) -> None:
        sessions = Sessions(self)
        session = sessions.open()
        self.assertIs(session.sink, sessions.sinks[session.id])
        self.assertEqual(list(sessions.sinks), [session.id])

    def test_a_session_is_found_only_by_who_opened_it_on_its_server(self) -> None:
        sessions = Sessions(self)
        session = sessions.open("token:alice")
        registry = sessions.registry
        self.assertIs(registry.get(session.id, "s", "token:alice"), session)
        self.assertIsNone(registry.get(session.id, "s", "token:bob"))
        self.assertIsNone(registry.get(session.id, "s"))
        self.assertIsNone(registry.get(session.id, "t", "token:alice"))
        self.assertIsNone(registry.get(None, "s", "token:alice"))
        self.assertIsNone(registry.get(session.id[:-1], "s", "token:alice"))
        registry.close(session)
        self.assertIsNone(registry.get(session.id, "s", "token:alice"))


class LimitTests(SynchronousTestCase):
    def test_the_global_limit(self) -> None:
        sessions = Sessions(self, max_sessions=2)
        first = sessions.open("token:alice")
        sessions.open("token:bob", "t")
        with self.assertRaises(SessionLimitError) as raised:
            sessions.open("token:carol")
        self.assertNotIsInstance(raised.exception, PrincipalLimitError)
        self.assertIn("max_sessions", str(raised.exception))
        # Refused before anything was made for it.
        self.assertEqual(len(sessions.registry.sessions), 2)
        self.assertEqual(len(sessions.sinks), 2)
        sessions.registry.close(first)
        sessions.open("token:carol")
        self.assertEqual(len(sessions.registry.sessions), 2)

    def test_the_global_limit_counts_hubs(self) -> None:
        sessions = Sessions(self, max_sessions=1)
        sessions.hub("token:alice")
        self.assertRaises(SessionLimitError, sessions.open, "token:bob")

    def test_each_principal_holds_its_share(self) -> None:
        sessions = Sessions(self, limits=LimitsConfig(max_sessions_per_principal=2))
        alice = [sessions.open("token:alice"), sessions.open("token:alice", "t")]
        with self.assertRaises(PrincipalLimitError) as raised:
            sessions.open("token:alice")
        self.assertIsInstance(raised.exception, SessionLimitError)
        self.assertIn("max_sessions_per_principal", str(raised.exception))
        self.assertEqual(len(sessions.registry.sessions), 2)
        # Another principal has a share of its own.
        sessions.open("token:bob")
        sessions.open("token:bob")
        # Ending a session gives its principal room again.
        sessions.registry.close(alice[0])
        sessions.open("token:alice")

    def test_a_hub_takes_a_share(self) -> None:
        sessions = Sessions(self, limits=LimitsConfig(max_sessions_per_principal=1))
        sessions.hub("token:alice")
        self.assertRaises(PrincipalLimitError, sessions.open, "token:alice")

    def test_without_authentication_there_is_no_share(self) -> None:
        sessions = Sessions(self, limits=LimitsConfig(max_sessions_per_principal=1))
        for _ in range(3):
            sessions.open()
        self.assertEqual(len(sessions.registry.sessions), 3)

    def test_a_session_the_server_refuses_gives_its_share_back(self) -> None:
        sessions = Sessions(
            self,
            limits=LimitsConfig(max_sessions_per_principal=1),
            sharing="session",
            max_children=1,
        )
        alice = sessions.open("token:alice")
        self.assertRaises(CapacityError, sessions.open, "token:bob")
        self.assertEqual(list(sessions.registry.sessions), [alice.id])
        sessions.registry.close(alice)
        sessions.open("token:bob")


class ReapTests(SynchronousTestCase):
    def test_an_idle_session_is_reaped_after_its_servers_timeout(self) -> None:
        sessions = Sessions(self)
        session = sessions.open()
        sessions.reactor.advance(IDLE)
        sessions.registry.reap()
        self.assertIn(session.id, sessions.registry.sessions, "idle for exactly the timeout")
        sessions.reactor.advance(1)
        sessions.registry.reap()
        self.assertEqual(sessions.registry.sessions, {})
        self.assertTrue(session.closed)
        self.assertTrue(sessions.sinks[session.id].closed)

    def test_what_the_client_sends_keeps_it(self) -> None:
        sessions = Sessions(self)
        session = sessions.open()
        sessions.reactor.advance(IDLE - 1)
        initialized(session, sessions.reactor.seconds())
        sessions.reactor.advance(IDLE - 1)
        sessions.registry.reap()
        self.assertIn(session.id, sessions.registry.sessions)

    def test_a_session_with_an_open_stream_is_not_reaped(self) -> None:
        """A request in flight keeps its stream open: however long it takes,
        its session stays; once answered, the session is idle again."""
        sessions = Sessions(self, hold=True)
        session = sessions.open()
        initialized(session, sessions.reactor.seconds())
        session.receive(jsonrpc.request(1, "tools/call", {"name": "slow"}), Kind.REQUEST, 0)
        sink = sessions.sinks[session.id]
        sink.connected = True
        sessions.reactor.advance(IDLE * 4)
        sessions.registry.reap()
        self.assertIn(session.id, sessions.registry.sessions)
        self.assertEqual(session.in_flight, 1)
        child = sessions.child
        assert child is not None
        child.answer(child.held[0])
        sink.connected = False
        self.assertEqual(session.in_flight, 0)
        sessions.registry.reap()
        self.assertEqual(sessions.registry.sessions, {})

    def test_the_reaper_runs_on_the_clock_once_started(self) -> None:
        sessions = Sessions(self)
        session = sessions.open()
        sessions.reactor.advance(IDLE * 2)
        self.assertIn(session.id, sessions.registry.sessions, "not started: nothing is reaped")
        sessions.registry.startService()
        sessions.reactor.advance(10)
        self.assertEqual(sessions.registry.sessions, {})
        closed = [e for e in sessions.log if e[0] == "session_closed"]
        self.assertEqual(closed, [])  # never initialized: never announced

    def test_the_reason_is_audited(self) -> None:
        sessions = Sessions(self)
        session = sessions.open()
        initialized(session, 0)
        sessions.reactor.advance(IDLE + 30)
        sessions.registry.reap()
        self.assertEqual(sessions.log[-1], ("session_closed", "expired after 90s idle"))

    def test_session_with_a_request_in_flight_is_not_reaped(self) -> None:
        bridge = Bridge(
            self, ServerConfig(name="s", command="fake", session_idle_timeout=60), hold=True
        )
        sid = bridge.open_session()
        d = bridge.client.request(
            "POST",
            "http://127.0.0.1/servers/s/mcp",
            data=jsonrpc.dumps(jsonrpc.request(2, "tools/call", {"name": "slow"})),
            headers={**JSON, "mcp-session-id": sid},
        )
        bridge.client.flush()
        bridge.reactor.advance(100)
        bridge.registry.reap()
        child = bridge.reactor.child
        child.answer(child.held[0])
        bridge.client.flush()
        response = self.successResultOf(d)
        self.assertIn("result", bridge.json(response))
        bridge.reactor.advance(100)
        bridge.registry.reap()
        self.assertEqual(bridge.registry.sessions, {}, "idle once answered: reaped")

    def test_a_call_in_flight_keeps_its_hub(self) -> None:
        """Over the 2026-07-28 revision: a stateless client's hub stays while
        one of its calls is in flight, and goes once idle."""
        bridge = Bridge(
            self, ServerConfig(name="s", command="fake", session_idle_timeout=60), hold=True
        )
        client = Client(bridge)
        d = client.start(call(1), accept="application/json")
        [hub] = bridge.registry.sessions.values()
        bridge.reactor.advance(200)
        bridge.registry.reap()
        self.assertEqual(list(bridge.registry.sessions.values()), [hub])
        client.child.answer(client.held("tools/call"))
        self.assertEqual(client.finish(d)[0], 200)
        bridge.reactor.advance(61)
        bridge.registry.reap()
        self.assertEqual(bridge.registry.sessions, {})
        self.assertTrue(hub.closed)


class HubTests(SynchronousTestCase):
    def test_one_hub_per_principal_and_server(self) -> None:
        sessions = Sessions(self)
        hub = sessions.hub("token:alice")
        self.assertEqual((hub.transport, hub.stateless), ("stateless", True))
        self.assertIs(sessions.hub("token:alice"), hub)
        self.assertEqual(len(sessions.sinks), 1, "its sink is made once")
        others = {sessions.hub("token:bob"), sessions.hub("token:alice", "t"), sessions.hub()}
        self.assertNotIn(hub, others)
        self.assertEqual(len(others), 3)
        self.assertEqual(len(sessions.registry.sessions), 4)
        self.assertEqual(sessions.registry.hubs("s", "token:alice"), [hub])
        self.assertEqual(sessions.registry.hubs("t", "token:bob"), [])

    def test_a_hub_is_not_a_session(self) -> None:
        """Opening a session leaves the hub alone, and the hub is not a session."""
        sessions = Sessions(self)
        hub = sessions.hub("token:alice")
        session = sessions.open("token:alice")
        self.assertIsNot(session, hub)
        self.assertIs(sessions.hub("token:alice"), hub)
        self.assertFalse(session.stateless)

    def test_reuse_keeps_it_from_the_reaper(self) -> None:
        sessions = Sessions(self)
        hub = sessions.hub("token:alice")
        sessions.reactor.advance(IDLE)
        self.assertIs(sessions.hub("token:alice"), hub)
        self.assertEqual(hub.last_active, IDLE)
        sessions.reactor.advance(IDLE)
        sessions.registry.reap()
        self.assertIn(hub.id, sessions.registry.sessions)

    def test_a_closed_hub_is_replaced(self) -> None:
        sessions = Sessions(self)
        hub = sessions.hub("token:alice")
        sessions.registry.close(hub)
        self.assertEqual(sessions.registry.hubs("s", "token:alice"), [])
        again = sessions.hub("token:alice")
        self.assertIsNot(again, hub)
        self.assertNotEqual(again.id, hub.id)
        self.assertEqual(sessions.registry.hubs("s", "token:alice"), [again])

    def test_closing_an_old_hub_again_leaves_its_successor(self) -> None:
        sessions = Sessions(self)
        old = sessions.hub("token:alice")
        sessions.registry.close(old)
        new = sessions.hub("token:alice")
        sessions.registry.close(old)
        self.assertIs(sessions.hub("token:alice"), new)
        self.assertEqual(sessions.registry.hubs("s", "token:alice"), [new])

    def test_a_hub_closed_by_itself_is_replaced(self) -> None:
        """A hub that ended without the registry (its backend went) is not reused."""
        sessions = Sessions(self)
        hub = sessions.hub("token:alice")
        hub.close()
        self.assertIsNot(sessions.hub("token:alice"), hub)

    def test_a_hub_is_announced_at_once(self) -> None:
        """It has no initialize of its own: it is audited as opened when made."""
        sessions = Sessions(self)
        sessions.hub("token:alice")
        sessions.hub("token:alice")
        self.assertEqual(sessions.log, [("session_opened", "stateless", MODERN)])


class CloseTests(SynchronousTestCase):
    def test_requests_end_then_the_sink_then_the_session(self) -> None:
        """A session ends in order: its requests in flight are audited as
        cancelled, its sink is closed, the session is audited as closed, and
        only then is the registry's owner told."""
        sessions = Sessions(self, hold=True)
        told: list[ClientSession] = []
        sessions.registry.on_closed = lambda s: (told.append(s), sessions.log.append("told"))
        session = sessions.open()
        initialized(session, 0)
        session.receive(jsonrpc.request(1, "tools/call", {"name": "slow"}), Kind.REQUEST, 0)
        session.receive(jsonrpc.request(2, "tools/list"), Kind.REQUEST, 0)
        del sessions.log[:]
        sessions.registry.close(session, "deleted by the client")
        self.assertEqual(
            sessions.log,
            [
                ("request", "tools/call", "cancelled"),
                ("request", "tools/list", "cancelled"),
                "sink closed",
                ("session_closed", "deleted by the client"),
                "told",
            ],
        )
        self.assertEqual(told, [session])
        self.assertEqual(sessions.registry.sessions, {})
        self.assertEqual(session.in_flight, 0)

    def test_its_child_lets_go_of_it(self) -> None:
        sessions = Sessions(self, hold=True)
        session = sessions.open()
        initialized(session, 0)
        session.receive(jsonrpc.request(1, "tools/call", {"name": "slow"}), Kind.REQUEST, 0)
        sessions.registry.close(session)
        child = sessions.child
        assert child is not None
        self.assertTrue(child.notifications("notifications/cancelled"))
        sink = sessions.sinks[session.id]
        delivered = list(sink.delivered)
        child.answer(child.held[0])
        self.assertEqual(sink.delivered, delivered, "nothing reaches a closed session")

    def test_closing_twice_ends_it_once(self) -> None:
        sessions = Sessions(self, limits=LimitsConfig(max_sessions_per_principal=1))
        told: list[ClientSession] = []
        sessions.registry.on_closed = told.append
        session = sessions.open("token:alice")
        initialized(session, 0)
        sessions.registry.close(session)
        sessions.registry.close(session)
        self.assertEqual(told, [session])
        self.assertEqual(
            [e for e in sessions.log if e[0] == "session_closed"], [("session_closed", "closed")]
        )
        # Its share was given back once: one session for alice, not two.
        sessions.open("token:alice")
        self.assertRaises(PrincipalLimitError, sessions.open, "token:alice")

    def test_a_session_never_initialized_closes_unannounced(self) -> None:
        sessions = Sessions(self)
        sessions.registry.close(sessions.open())
        self.assertEqual(sessions.log, ["sink closed"])

    def test_stopping_ends_every_session_and_the_reaper(self) -> None:
        sessions = Sessions(self)
        sessions.registry.startService()
        opened = [sessions.open(), sessions.hub("token:alice"), sessions.open("token:bob", "t")]
        sessions.registry.stopService()
        self.assertEqual(sessions.registry.sessions, {})
        self.assertTrue(all(s.closed for s in opened))
        self.assertEqual(sessions.registry.hubs("s", "token:alice"), [])
        late = sessions.open()
        sessions.reactor.advance(IDLE * 10)
        self.assertEqual(list(sessions.registry.sessions), [late.id], "no reaper runs")

    def test_sessions_of_a_backend_and_of_a_server(self) -> None:
        sessions = Sessions(self)
        a, b = sessions.open(), sessions.hub("token:alice")
        c = sessions.open(server="t")
        registry = sessions.registry
        self.assertEqual(registry.of_backend(sessions.backends["s"]), [a, b])
        self.assertEqual(registry.of_backend(sessions.backends["t"]), [c])
        self.assertEqual((registry.count("s"), registry.count("t")), (2, 1))
        registry.close(a)
        self.assertEqual(
            (registry.of_backend(sessions.backends["s"]), registry.count("s")), ([b], 1)
        )
