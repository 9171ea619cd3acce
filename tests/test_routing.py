"""The multiplexer: many client sessions sharing one child."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.child.supervisor import ChildState
from mcptwist.config.model import RestartPolicy, ServerConfig
from mcptwist.mcp import jsonrpc
from mcptwist.routing.backends import SessionBackend, SharedBackend
from mcptwist.routing.upstream import ABANDONED_GRACE, Upstream, oversize_response_id

from .support.children import INIT_RESULT, FakeProcessReactor
from .support.router import FakeSession, call, initialize, send


def make(reactor: FakeProcessReactor, **kwargs: Any) -> Upstream:
    server = ServerConfig(name="fake", command="fake-mcp", **kwargs)
    upstream = Upstream(server, reactor, {"PATH": "/bin", "SECRET_TOKEN": "x"})
    upstream.startService()
    return upstream


def one_client(
    hold: bool = True, **kwargs: Any
) -> tuple[FakeProcessReactor, Upstream, FakeSession]:
    """A started upstream over a fake child, with one initialized session."""
    reactor = FakeProcessReactor(hold=hold)
    upstream = make(reactor, **kwargs)
    a = FakeSession("a")
    upstream.attach(a)
    initialize(upstream, a)
    return reactor, upstream, a


class HandshakeTests(SynchronousTestCase):
    def test_child_initialized_once_and_clients_answered_from_it(self) -> None:
        """The child sees one initialize; each client gets the child's result, negotiated."""
        reactor = FakeProcessReactor()
        upstream = make(reactor)
        a, b = FakeSession("a"), FakeSession("b")
        upstream.attach(a)
        upstream.attach(b)
        ra = initialize(upstream, a, "2025-06-18")
        rb = initialize(upstream, b, "1999-01-01")
        self.assertEqual(len(reactor.child.requests("initialize")), 1)
        self.assertEqual(len(reactor.child.notifications("notifications/initialized")), 1)
        self.assertEqual(ra["result"]["protocolVersion"], "2025-06-18")
        self.assertEqual(rb["result"]["protocolVersion"], "2025-11-25")
        self.assertEqual(ra["result"]["serverInfo"], {"name": "fake", "version": "1.0"})
        self.assertEqual(ra["result"]["instructions"], "a fake server")
        self.assertEqual(a.protocol_version, "2025-06-18")
        self.assertEqual(upstream.state, ChildState.RUNNING)

    def test_client_never_promised_more_than_the_child_speaks(self) -> None:
        reactor = FakeProcessReactor()
        reactor.on_spawn = lambda child: child.init_result.update(protocolVersion="2025-03-26")
        upstream = make(reactor)
        a = FakeSession("a")
        upstream.attach(a)
        self.assertEqual(
            initialize(upstream, a, "2025-11-25")["result"]["protocolVersion"], "2025-03-26"
        )

    def test_bridge_declares_routable_client_capabilities(self) -> None:
        reactor = FakeProcessReactor()
        make(reactor)
        params = reactor.child.requests("initialize")[0]["params"]
        self.assertEqual(set(params["capabilities"]), {"sampling", "elicitation", "roots"})
        self.assertEqual(params["clientInfo"]["name"], "mcptwist")

    def test_child_environment_is_allow_listed(self) -> None:
        reactor = FakeProcessReactor()
        server = ServerConfig(
            name="fake", command="fake-mcp", env={"API_KEY": "k"}, env_passthrough=("EXTRA",)
        )
        Upstream(
            server, reactor, {"PATH": "/bin", "SECRET_TOKEN": "x", "EXTRA": "e", "LISTEN_FDS": "3"}
        ).startService()
        env = reactor.child.env
        self.assertEqual(env["PATH"], "/bin")
        self.assertEqual(env["API_KEY"], "k")
        self.assertEqual(env["EXTRA"], "e")
        self.assertNotIn("SECRET_TOKEN", env)
        self.assertNotIn("LISTEN_FDS", env)
        self.assertEqual(reactor.child.args[-1:], ["fake-mcp"])

    def test_initialize_waits_for_a_slow_child(self) -> None:
        reactor = FakeProcessReactor()
        reactor.on_spawn = lambda child: setattr(child, "init_result", None)
        held: list[Any] = []
        reactor.on_message = lambda child, m: held.append((child, m))  # type: ignore[method-assign]
        upstream = make(reactor)
        a = FakeSession("a")
        upstream.attach(a)
        send(upstream, a, jsonrpc.request(1, "initialize", {"protocolVersion": "2025-11-25"}))
        send(upstream, a, call(2, "early"))
        self.assertEqual(a.got, [])
        child, init = held[0]
        child.init_result = dict(INIT_RESULT)
        child.answer(init)
        self.assertIn(1, a.responses())
        self.assertEqual(child.requests("tools/call")[0]["params"]["arguments"], {"text": "early"})

    def test_handshake_timeout_kills_and_restarts(self) -> None:
        """A child that never answers initialize is killed and restarted."""
        reactor = FakeProcessReactor(hold=True)
        reactor.on_message = lambda child, m: None  # type: ignore[method-assign]
        upstream = make(reactor, startup_timeout=5.0)
        first = reactor.child
        reactor.advance(5)
        self.assertTrue(first.exited)
        self.assertEqual(upstream.state, ChildState.RESTARTING)
        self.assertIn("initialize", upstream.supervisor.last_exit or "")
        reactor.advance(1)
        self.assertEqual(len(reactor.children), 2)


class MultiplexTests(SynchronousTestCase):
    @given(
        clients=st.integers(min_value=1, max_value=8),
        calls=st.integers(min_value=1, max_value=6),
        order=st.randoms(use_true_random=False),
    )
    def test_same_ids_many_clients_each_gets_its_own(
        self, clients: int, calls: int, order: Any
    ) -> None:
        """Clients that all use ids 1..n each get exactly their own answers, in any order."""
        reactor = FakeProcessReactor(hold=True)
        upstream = make(reactor)
        sessions = [FakeSession(f"s{i}") for i in range(clients)]
        for s in sessions:
            upstream.attach(s)
            initialize(upstream, s)
        for s in sessions:
            for i in range(1, calls + 1):
                send(upstream, s, call(i, f"{s.id}:{i}"))
        child = reactor.child
        ids = [m["id"] for m in child.held]
        self.assertEqual(len(set(ids)), clients * calls, "ids on the child side must be unique")
        held = list(child.held)
        order.shuffle(held)
        for message in held:
            child.answer(message)
        for s in sessions:
            responses = s.responses()
            self.assertEqual(sorted(k for k in responses if k != 0), list(range(1, calls + 1)))
            for i in range(1, calls + 1):
                self.assertEqual(
                    responses[i]["result"]["content"][0]["text"], repr({"text": f"{s.id}:{i}"})
                )

    def test_duplicate_id_in_flight_refused(self) -> None:
        reactor, upstream, a = one_client()
        send(upstream, a, call(7, "one"))
        send(upstream, a, call(7, "two"))
        self.assertEqual(a.responses()[7]["error"]["code"], jsonrpc.INVALID_REQUEST)
        self.assertEqual(len(reactor.child.held), 1)

    def test_progress_tokens_mapped_back_and_extend_timeout(self) -> None:
        reactor = FakeProcessReactor(hold=True)
        upstream = make(reactor, request_timeout=10.0, max_request_timeout=25.0)
        a, b = FakeSession("a"), FakeSession("b")
        for s in (a, b):
            upstream.attach(s)
            initialize(upstream, s)
        send(upstream, a, call(1, "x", token="tok"))
        send(upstream, b, call(1, "y", token="tok"))
        ma, mb = reactor.child.held
        self.assertNotEqual(
            ma["params"]["_meta"]["progressToken"], mb["params"]["_meta"]["progressToken"]
        )
        for step in range(1, 4):
            reactor.advance(8)
            reactor.child.send(
                jsonrpc.notification(
                    "notifications/progress",
                    {"progressToken": ma["params"]["_meta"]["progressToken"], "progress": step},
                )
            )
        progress = a.notifications("notifications/progress")
        self.assertEqual([p["params"]["progressToken"] for p in progress], ["tok"] * 3)
        self.assertEqual(
            [related for m, related in a.got if m.get("method") == "notifications/progress"],
            [1, 1, 1],
        )
        self.assertEqual(b.notifications("notifications/progress"), [])
        # b made no progress: it timed out at 10 s; a was extended, but only to 25 s.
        self.assertEqual(b.responses()[1]["error"]["code"], jsonrpc.REQUEST_TIMEOUT)
        self.assertNotIn(1, a.responses())
        reactor.advance(1.5)
        self.assertEqual(a.responses()[1]["error"]["code"], jsonrpc.REQUEST_TIMEOUT)

    def test_timeout_answers_client_and_cancels_on_child(self) -> None:
        reactor, upstream, a = one_client(request_timeout=30.0)
        send(upstream, a, call(5, "slow"))
        reactor.advance(29)
        self.assertNotIn(5, a.responses())
        reactor.advance(1)
        error = a.responses()[5]["error"]
        self.assertEqual(error["code"], jsonrpc.REQUEST_TIMEOUT)
        self.assertIn("30s", error["message"])
        cancelled = reactor.child.notifications("notifications/cancelled")
        self.assertEqual(cancelled[0]["params"]["requestId"], reactor.child.held[0]["id"])
        # A late answer from the child reaches nobody.
        reactor.child.answer(reactor.child.held[0])
        self.assertEqual(len([m for m, _ in a.got if m.get("id") == 5]), 1)

    def test_client_cancellation_forwarded_with_child_id(self) -> None:
        reactor, upstream, a = one_client()
        send(upstream, a, call("abc", "x"))
        send(
            upstream,
            a,
            jsonrpc.notification("notifications/cancelled", {"requestId": "abc", "reason": "user"}),
        )
        cancelled = reactor.child.notifications("notifications/cancelled")[0]
        self.assertEqual(
            cancelled["params"], {"requestId": reactor.child.held[0]["id"], "reason": "user"}
        )
        # A cancelled request gets no response; its wait ends.
        self.assertEqual(a.cancelled_ids, ["abc"])
        reactor.child.answer(reactor.child.held[0])
        self.assertNotIn("abc", a.responses())

    def test_session_detach_cancels_its_requests_only(self) -> None:
        reactor = FakeProcessReactor(hold=True)
        upstream = make(reactor)
        a, b = FakeSession("a"), FakeSession("b")
        for s in (a, b):
            upstream.attach(s)
            initialize(upstream, s)
        send(upstream, a, call(1, "a"))
        send(upstream, b, call(1, "b"))
        upstream.detach(a)
        cancelled = reactor.child.notifications("notifications/cancelled")
        self.assertEqual(
            [c["params"]["requestId"] for c in cancelled], [reactor.child.held[0]["id"]]
        )
        for message in reactor.child.held:
            reactor.child.answer(message)
        self.assertNotIn(1, a.responses())
        self.assertIn(1, b.responses())


class OutcomeTests(SynchronousTestCase):
    def test_each_request_ends_once_and_says_how(self) -> None:
        """The router tells a session how each of its requests ended, once, whoever
        answered it and whatever the number of the error."""
        reactor, upstream, a = one_client(request_timeout=10.0)
        send(upstream, a, call(1, "answered"))
        send(upstream, a, call(2, "its own -32001"))
        send(upstream, a, call(3, "slow"))
        send(upstream, a, call(4, "cancelled"))
        send(upstream, a, jsonrpc.request(5, "logging/setLevel", {"level": "nope"}))
        send(upstream, a, call(2, "refused: its id is in flight"))
        self.assertEqual(a.in_flight, 4)
        first, second, _, _ = reactor.child.held
        reactor.child.answer(first)
        reactor.child.send(jsonrpc.error(second["id"], jsonrpc.REQUEST_TIMEOUT, "gave up"))
        send(upstream, a, jsonrpc.notification("notifications/cancelled", {"requestId": 4}))
        reactor.advance(10)
        self.assertEqual(
            a.ended,
            [
                (0, "ok", None),
                (5, "error", jsonrpc.INVALID_PARAMS),
                (1, "ok", None),
                (2, "error", -32001),
                (4, "cancelled", None),
                (3, "timeout", -32001),
            ],
        )
        self.assertEqual(a.in_flight, 0)

    def test_a_queued_request_ends_once_when_its_child_stops(self) -> None:
        reactor = FakeProcessReactor()
        reactor.on_message = lambda child, message: None  # type: ignore[method-assign]
        upstream = make(reactor)
        a = FakeSession("a")
        upstream.attach(a)
        send(upstream, a, call(1, "queued"))
        upstream.stopService()
        self.assertEqual(a.ended, [(1, "error", jsonrpc.SERVER_UNAVAILABLE)])
        # One answer reaches the client, not one per list the request was on.
        answers = [m for m, _ in a.got if "method" not in m]
        self.assertEqual([m["id"] for m in answers], [1])

    def test_a_detached_sessions_requests_end_cancelled(self) -> None:
        reactor = FakeProcessReactor(hold=True)
        reactor.on_message = lambda child, message: None  # type: ignore[method-assign]
        upstream = make(reactor)
        a = FakeSession("a")
        upstream.attach(a)
        send(upstream, a, jsonrpc.request(0, "initialize", {"protocolVersion": "2025-11-25"}))
        send(upstream, a, call(1, "queued"))
        upstream.detach(a)
        self.assertEqual(a.ended, [(0, "cancelled", None), (1, "cancelled", None)])
        self.assertEqual(a.responses(), {})


class ServerToClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeProcessReactor(hold=True)
        self.upstream = make(self.reactor)
        self.a = FakeSession("a")
        self.b = FakeSession("b")
        for s in (self.a, self.b):
            self.upstream.attach(s)
            initialize(self.upstream, s, caps={"sampling": {}})

    def test_request_goes_to_the_busy_client_and_answer_back(self) -> None:
        send(self.upstream, self.b, call(3, "needs sampling"))
        child = self.reactor.child
        child.send(jsonrpc.request(900, "sampling/createMessage", {"messages": []}))
        [(request, related)] = [
            (m, r) for m, r in self.b.got if m.get("method") == "sampling/createMessage"
        ]
        self.assertEqual(related, 3)
        self.assertEqual([m for m, _ in self.a.got if m.get("method")], [])
        send(
            self.upstream,
            self.b,
            jsonrpc.result(
                request["id"], {"role": "assistant", "content": {"type": "text", "text": "hi"}}
            ),
        )
        answer = [m for m in child.received if m.get("id") == 900]
        self.assertEqual(answer[0]["result"]["content"]["text"], "hi")

    def test_ambiguous_request_refused_not_misrouted(self) -> None:
        send(self.upstream, self.a, call(1, "a"))
        send(self.upstream, self.b, call(1, "b"))
        self.reactor.child.send(jsonrpc.request(901, "elicitation/create", {"message": "?"}))
        self.assertEqual(
            [m for m, _ in self.a.got + self.b.got if m.get("method") == "elicitation/create"], []
        )
        answer = next(m for m in self.reactor.child.received if m.get("id") == 901)
        self.assertIn("session", answer["error"]["message"])

    def test_request_of_an_abandoned_call_not_sent_to_another_client(self) -> None:
        """a's call timed out at the bridge, but the child goes on and asks for sampling:
        b, the only client still waiting, must not be asked on a's behalf."""
        upstream = make(self.reactor, request_timeout=10.0)
        a, b = FakeSession("a"), FakeSession("b")
        for s in (a, b):
            upstream.attach(s)
            initialize(upstream, s, caps={"sampling": {}})
        send(upstream, a, call(1, "a's secret document"))
        self.reactor.advance(10)
        send(upstream, b, call(1, "b"))
        self.reactor.children[-1].send(jsonrpc.request(905, "sampling/createMessage", {}))
        self.assertEqual([m for m, _ in b.got if m.get("method")], [])
        answer = next(m for m in self.reactor.children[-1].received if m.get("id") == 905)
        self.assertIn("cannot tell which", answer["error"]["message"])

    def test_abandoned_call_of_the_same_client_still_routes_to_it(self) -> None:
        upstream = make(self.reactor, request_timeout=10.0)
        a = FakeSession("a")
        upstream.attach(a)
        initialize(upstream, a, caps={"sampling": {}})
        send(upstream, a, jsonrpc.notification("notifications/cancelled", {"requestId": 1}))
        send(upstream, a, call(1, "x"))
        send(upstream, a, jsonrpc.notification("notifications/cancelled", {"requestId": 1}))
        send(upstream, a, call(2, "y"))
        self.reactor.children[-1].send(jsonrpc.request(906, "sampling/createMessage", {}))
        [(_, related)] = [(m, r) for m, r in a.got if m.get("method") == "sampling/createMessage"]
        self.assertEqual(related, 2)

    def test_roots_only_asked_of_a_sole_client(self) -> None:
        self.reactor.child.send(jsonrpc.request(907, "roots/list"))
        answer = next(m for m in self.reactor.child.received if m.get("id") == 907)
        self.assertIn("roots belong to each client", answer["error"]["message"])
        self.upstream.detach(self.b)
        self.a.capabilities["roots"] = {}
        self.reactor.child.send(jsonrpc.request(908, "roots/list"))
        self.assertEqual(
            [m["method"] for m, _ in self.a.got if m.get("method") == "roots/list"], ["roots/list"]
        )

    def test_client_without_capability_gets_nothing(self) -> None:
        send(self.upstream, self.a, call(1, "a"))
        self.reactor.child.send(jsonrpc.request(902, "elicitation/create", {"message": "?"}))
        answer = next(m for m in self.reactor.child.received if m.get("id") == 902)
        self.assertEqual(answer["error"]["code"], jsonrpc.METHOD_NOT_FOUND)

    def test_child_ping_answered_by_bridge(self) -> None:
        self.reactor.child.send(jsonrpc.request(903, "ping"))
        answer = next(m for m in self.reactor.child.received if m.get("id") == 903)
        self.assertEqual(answer["result"], {})

    def test_response_from_the_wrong_session_ignored(self) -> None:
        send(self.upstream, self.b, call(3, "x"))
        self.reactor.child.send(jsonrpc.request(904, "sampling/createMessage", {}))
        [request] = [m for m, _ in self.b.got if m.get("method") == "sampling/createMessage"]
        send(self.upstream, self.a, jsonrpc.result(request["id"], {"forged": True}))
        self.assertEqual([m for m in self.reactor.child.received if m.get("id") == 904], [])


class NotificationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.upstream = make(self.reactor)
        self.a, self.b = FakeSession("a"), FakeSession("b")
        for s in (self.a, self.b):
            self.upstream.attach(s)
            initialize(self.upstream, s)

    def test_list_changed_to_everyone(self) -> None:
        self.reactor.child.send(jsonrpc.notification("notifications/tools/list_changed"))
        self.assertEqual(len(self.a.notifications("notifications/tools/list_changed")), 1)
        self.assertEqual(len(self.b.notifications("notifications/tools/list_changed")), 1)

    def test_resource_updates_only_to_subscribers(self) -> None:
        send(self.upstream, self.a, jsonrpc.request(1, "resources/subscribe", {"uri": "r://1"}))
        send(self.upstream, self.b, jsonrpc.request(1, "resources/subscribe", {"uri": "r://2"}))
        send(self.upstream, self.b, jsonrpc.request(2, "resources/subscribe", {"uri": "r://1"}))
        # The child hears of each uri once.
        self.assertEqual(
            [m["params"]["uri"] for m in self.reactor.child.requests("resources/subscribe")],
            ["r://1", "r://2"],
        )
        self.assertIn("result", self.b.responses()[2])
        self.reactor.child.send(
            jsonrpc.notification("notifications/resources/updated", {"uri": "r://2"})
        )
        self.assertEqual(self.a.notifications("notifications/resources/updated"), [])
        self.assertEqual(len(self.b.notifications("notifications/resources/updated")), 1)
        send(self.upstream, self.b, jsonrpc.request(3, "resources/unsubscribe", {"uri": "r://1"}))
        self.assertEqual(self.reactor.child.requests("resources/unsubscribe"), [])
        send(self.upstream, self.a, jsonrpc.request(4, "resources/unsubscribe", {"uri": "r://1"}))
        self.assertEqual(len(self.reactor.child.requests("resources/unsubscribe")), 1)

    def test_unsubscribe_by_a_non_subscriber_keeps_the_child_subscribed(self) -> None:
        send(self.upstream, self.a, jsonrpc.request(1, "resources/subscribe", {"uri": "r://1"}))
        send(self.upstream, self.b, jsonrpc.request(1, "resources/unsubscribe", {"uri": "r://1"}))
        self.assertEqual(self.reactor.child.requests("resources/unsubscribe"), [])
        self.assertEqual(self.b.responses()[1]["result"], {})
        self.reactor.child.send(
            jsonrpc.notification("notifications/resources/updated", {"uri": "r://1"})
        )
        self.assertEqual(len(self.a.notifications("notifications/resources/updated")), 1)

    def test_subscribers_share_the_childs_answer(self) -> None:
        """A second subscriber waits for the child's answer, and shares a refusal."""
        reactor = FakeProcessReactor(hold=True)
        upstream = make(reactor)
        a, b = FakeSession("a"), FakeSession("b")
        for s in (a, b):
            upstream.attach(s)
            initialize(upstream, s)
        send(upstream, a, jsonrpc.request(1, "resources/subscribe", {"uri": "r://x"}))
        send(upstream, b, jsonrpc.request(9, "resources/subscribe", {"uri": "r://x"}))
        self.assertEqual(b.got[1:], [])
        [request] = reactor.child.held
        reactor.child.send(jsonrpc.error(request["id"], jsonrpc.INVALID_PARAMS, "no such resource"))
        self.assertEqual(a.responses()[1]["error"]["message"], "no such resource")
        self.assertEqual(b.responses()[9]["error"]["message"], "no such resource")
        reactor.child.send(
            jsonrpc.notification("notifications/resources/updated", {"uri": "r://x"})
        )
        self.assertEqual(
            a.notifications("notifications/resources/updated")
            + b.notifications("notifications/resources/updated"),
            [],
        )

    def test_child_quieter_when_the_verbose_client_leaves(self) -> None:
        send(self.upstream, self.a, jsonrpc.request(1, "logging/setLevel", {"level": "error"}))
        send(self.upstream, self.b, jsonrpc.request(1, "logging/setLevel", {"level": "debug"}))
        self.upstream.detach(self.b)
        levels = [m["params"]["level"] for m in self.reactor.child.requests("logging/setLevel")]
        self.assertEqual(levels, ["error", "debug", "error"])

    def test_log_messages_by_each_client_level(self) -> None:
        send(self.upstream, self.a, jsonrpc.request(1, "logging/setLevel", {"level": "error"}))
        send(self.upstream, self.b, jsonrpc.request(1, "logging/setLevel", {"level": "debug"}))
        levels = [m["params"]["level"] for m in self.reactor.child.requests("logging/setLevel")]
        self.assertEqual(levels, ["error", "debug"])
        for level in ("debug", "warning", "error"):
            self.reactor.child.send(
                jsonrpc.notification("notifications/message", {"level": level, "data": level})
            )
        self.assertEqual(
            [m["params"]["level"] for m in self.a.notifications("notifications/message")], ["error"]
        )
        self.assertEqual(len(self.b.notifications("notifications/message")), 3)

    def test_bad_log_level_refused(self) -> None:
        send(self.upstream, self.a, jsonrpc.request(1, "logging/setLevel", {"level": "loud"}))
        self.assertEqual(self.a.responses()[1]["error"]["code"], jsonrpc.INVALID_PARAMS)


class ChildFailureTests(SynchronousTestCase):
    def test_in_flight_requests_fail_at_once_with_stderr(self) -> None:
        reactor, upstream, a = one_client()
        send(upstream, a, call(1, "x"))
        with capturedLogs() as events:
            reactor.child.send_raw(b"Traceback: boom\n", fd=2)
        [logged] = [e for e in events if e.get("line") == "Traceback: boom"]
        self.assertEqual(logged["log_namespace"], "mcptwist.child.fake")
        reactor.child.exit(1)
        error = a.responses()[1]["error"]
        self.assertEqual(error["code"], jsonrpc.SERVER_UNAVAILABLE)
        self.assertIn("exited with code 1", error["message"])
        self.assertIn("Traceback: boom", error["message"])
        self.assertEqual(error["data"]["stderr"], ["Traceback: boom"])
        self.assertEqual(upstream.state, ChildState.RESTARTING)

    def test_restart_restores_subscriptions_and_serves_again(self) -> None:
        reactor, upstream, a = one_client(hold=False)
        send(upstream, a, jsonrpc.request(1, "resources/subscribe", {"uri": "r://1"}))
        send(upstream, a, jsonrpc.request(2, "logging/setLevel", {"level": "warning"}))
        reactor.child.exit(1)
        send(upstream, a, call(3, "while restarting"))
        reactor.advance(1)
        child = reactor.child
        self.assertEqual(len(reactor.children), 2)
        self.assertEqual(child.requests("resources/subscribe")[0]["params"], {"uri": "r://1"})
        self.assertEqual(child.requests("logging/setLevel")[0]["params"], {"level": "warning"})
        self.assertIn(3, a.responses())
        self.assertEqual(upstream.status()["restarts"], 1)

    def test_initialize_answered_when_the_server_cannot_even_spawn(self) -> None:
        reactor = FakeProcessReactor()
        reactor.spawn_error = OSError(24, "Too many open files")
        policy = RestartPolicy(initial_delay=0.1, max_delay=0.1, crash_limit=3, crash_window=60)
        upstream = make(reactor, restart=policy)
        a = FakeSession("a")
        upstream.attach(a)
        send(upstream, a, jsonrpc.request(1, "initialize", {"protocolVersion": "2025-11-25"}))
        send(upstream, a, call(2, "queued"))
        reactor.pump([0.1] * 10)
        self.assertEqual(upstream.state, ChildState.FAILED)
        self.assertIn("Too many open files", a.responses()[1]["error"]["message"])
        self.assertEqual(a.responses()[2]["error"]["code"], jsonrpc.SERVER_UNAVAILABLE)

    def test_waiting_initialize_has_a_deadline(self) -> None:
        reactor = FakeProcessReactor()
        reactor.on_message = lambda child, m: None  # type: ignore[method-assign]
        upstream = make(reactor, request_timeout=30.0, startup_timeout=3600.0)
        a = FakeSession("a")
        upstream.attach(a)
        send(upstream, a, jsonrpc.request(1, "initialize", {"protocolVersion": "2025-11-25"}))
        reactor.advance(29)
        self.assertEqual(a.got, [])
        reactor.advance(1)
        error = a.responses()[1]["error"]
        self.assertEqual(error["code"], jsonrpc.REQUEST_TIMEOUT)
        self.assertIn("did not become ready within 30s", error["message"])

    def test_oversize_response_fails_the_waiting_request(self) -> None:
        reactor, upstream, a = one_client(max_message_size=4096)
        send(upstream, a, call(1, "big"))
        child_id = reactor.child.held[0]["id"]
        reactor.child.send({"result": {"blob": "x" * 10_000}, "jsonrpc": "2.0", "id": child_id})
        error = a.responses()[1]["error"]
        self.assertEqual(error["code"], jsonrpc.MESSAGE_TOO_LARGE)
        self.assertEqual(upstream.state, ChildState.RUNNING)
        send(upstream, a, call(2, "small"))
        reactor.child.answer(reactor.child.held[1])
        self.assertIn("result", a.responses()[2])

    def test_oversize_request_from_the_child_fails_no_client(self) -> None:
        reactor = FakeProcessReactor(hold=True)
        upstream = make(reactor, max_message_size=4096)
        a = FakeSession("a", capabilities={"sampling": {}})
        upstream.attach(a)
        initialize(upstream, a, caps={"sampling": {}})
        send(upstream, a, call(7, "x"))
        child_id = reactor.child.held[0]["id"]
        reactor.child.send(
            jsonrpc.request(child_id, "sampling/createMessage", {"blob": "x" * 5000})
        )
        self.assertNotIn(7, a.responses())

    def test_stderr_kept_out_of_client_errors_when_asked(self) -> None:
        reactor, upstream, a = one_client(stderr_in_errors=False)
        send(upstream, a, call(1, "x"))
        reactor.child.send_raw(b"token=ghp_secret\n", fd=2)
        reactor.child.exit(1)
        error = a.responses()[1]["error"]
        self.assertNotIn("ghp_secret", jsonrpc.dumps(error).decode())
        self.assertEqual(upstream.status()["stderr"], ["token=ghp_secret"])

    def test_garbage_on_stdout_is_skipped(self) -> None:
        reactor, upstream, a = one_client()
        send(upstream, a, call(1, "x"))
        reactor.child.send_raw(b"Server ready!\n{not json\n[1,2]\n")
        reactor.child.answer(reactor.child.held[0])
        self.assertIn("result", a.responses()[1])
        self.assertEqual(upstream.state, ChildState.RUNNING)


class BackendTests(SynchronousTestCase):
    def test_session_mode_gives_each_session_a_child_up_to_the_limit(self) -> None:
        from mcptwist.routing.upstream import CapacityError

        reactor = FakeProcessReactor()
        server = ServerConfig(name="per", command="fake", sharing="session", max_children=2)
        backend = SessionBackend(server, reactor, {})
        backend.startService()
        a, b, c = FakeSession("aaaaaaaa1"), FakeSession("bbbbbbbb2"), FakeSession("cccccccc3")
        ua = backend.open(a)
        ub = backend.open(b)
        self.assertIsNot(ua, ub)
        self.assertEqual(len(reactor.children), 2)
        self.assertRaises(CapacityError, backend.open, c)
        backend.close(a, ua)
        self.assertTrue(reactor.children[0].stdin_is_closed)
        backend.open(c)
        self.assertEqual(len(reactor.children), 3)
        self.assertEqual(backend.status()["sessions"], 2)

    def test_shutdown_waits_for_children_of_ended_sessions(self) -> None:
        reactor = FakeProcessReactor(exit_on_eof=False)
        reactor.killpg = lambda pid, sig: reactor.signals.append((pid, sig))  # type: ignore[method-assign]
        backend = SessionBackend(
            ServerConfig(name="per", command="fake", sharing="session"), reactor, {}
        )
        backend.startService()
        session = FakeSession("aaaaaaaa")
        backend.close(session, backend.open(session))
        stopped = backend.stopService()
        self.assertNoResult(stopped)
        reactor.child.exit(0, 15)
        self.successResultOf(stopped)

    def test_shared_mode_one_child(self) -> None:
        reactor = FakeProcessReactor()
        backend = SharedBackend(ServerConfig(name="s", command="fake"), reactor, {})
        backend.startService()
        backend.open(FakeSession("a"))
        backend.open(FakeSession("b"))
        self.assertEqual(len(reactor.children), 1)
        self.assertEqual(backend.status()["sessions"], 2)


class OversizeIdTests(SynchronousTestCase):
    @given(st.integers(min_value=0, max_value=2**40), st.sampled_from(["result", "error"]))
    def test_response_shapes_of_both_sdks(self, child_id: int, key: str) -> None:
        body = '{"a": "' + "x" * 100 + '"}'
        python = f'{{"jsonrpc":"2.0","id":{child_id},"{key}":{body}}}'.encode()
        typescript = f'{{"{key}":{body},"jsonrpc":"2.0","id":{child_id}}}'.encode()
        for line in (python, typescript):
            self.assertEqual(oversize_response_id(line[:60], line[-60:]), child_id)

    @given(st.integers(min_value=0, max_value=2**40))
    def test_requests_are_not_responses(self, child_id: int) -> None:
        for line in (
            f'{{"jsonrpc":"2.0","id":{child_id},"method":"sampling/createMessage","params":{{}}}}'.encode(),
            f'{{"method":"x","params":{{"result":1}},"jsonrpc":"2.0","id":{child_id}}}'.encode(),
        ):
            self.assertIsNone(oversize_response_id(line[:60], line[-60:]))


class AbandonedQuestionTests(SynchronousTestCase):
    def test_a_question_of_an_abandoned_request_reaches_nobody_else(self) -> None:
        """A child may ignore a cancellation: while the abandoned request may
        still be what it asks about, another client is not asked."""
        reactor = FakeProcessReactor(hold=True)
        upstream = make(reactor, request_timeout=30)
        alice, bob = FakeSession("alice"), FakeSession("bob")
        for s in (alice, bob):
            upstream.attach(s)
            initialize(upstream, s, caps={"elicitation": {}})
        send(upstream, alice, call(1, "alice's task"))
        reactor.advance(30)  # alice's request times out; the child goes on
        send(upstream, bob, call(2, "bob's task"))
        reactor.advance(ABANDONED_GRACE + 1)
        question = {"message": "Alice: confirm the transfer", "requestedSchema": {}}
        reactor.child.send(jsonrpc.request("q", "elicitation/create", question))
        for session in (alice, bob):
            asked = [m for m, _ in session.got if m.get("method") == "elicitation/create"]
            self.assertEqual(asked, [], session.id)
        [refused] = [m for m in reactor.child.received if m.get("id") == "q"]
        self.assertEqual(refused["error"]["code"], jsonrpc.INTERNAL_ERROR)
