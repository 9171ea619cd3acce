"""Stateless calls on session-era children: signed state, error mapping, listen
filters, and multi round-trip requests (input_required, then the retry)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ResponseNeverReceived

from mcptwist.config.model import (
    AuditConfig,
    AuthConfig,
    LimitsConfig,
    ServerConfig,
    TokenConfig,
)
from mcptwist.mcp import era, jsonrpc
from mcptwist.mcp.era import ModernRequest
from mcptwist.mcp.jsonrpc import Message, RequestId
from mcptwist.ops.audit import AuditTrail
from mcptwist.routing.stateless import (
    INPUT_GATHER,
    Listen,
    StatelessSink,
    StateSigner,
    modern_error,
    request_digest,
)
from mcptwist.routing.upstream import ABANDONED_GRACE
from mcptwist.security.auth import hash_token

from .support.bridge import Bridge, Client, send
from .support.children import FakeChild
from .support.messages import BOTH, call, events, modern

B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
NAME = {"action": "accept", "content": {"name": "Ada"}}


def elicit(id: RequestId, text: str = "Your name?") -> Message:
    return jsonrpc.request(id, "elicitation/create", {"message": text, "requestedSchema": {}})


def answers_to(child: FakeChild, id: RequestId) -> list[Message]:
    """What the bridge answered to the child's own request with this id."""
    return [m for m in child.received if "method" not in m and m.get("id") == id]


def retry(id: RequestId, state: Any, responses: Any = None, **params: Any) -> Message:
    extra: dict[str, Any] = {"requestState": state}
    if responses is not None:
        extra["inputResponses"] = responses
    return call(id, **extra, **params)


class StateSignerTests(SynchronousTestCase):
    signer = StateSigner(b"k" * 32)

    @given(st.text())
    def test_round_trip(self, payload: str) -> None:
        self.assertEqual(self.signer.verify(self.signer.sign(payload)), payload)

    @given(st.one_of(st.text(), st.text(alphabet=B64URL + ".="), st.integers(), st.none()))
    def test_never_raises(self, token: object) -> None:
        self.assertIsNone(self.signer.verify(token))

    @given(st.text(), st.data())
    def test_rejects_any_altered_token(self, payload: str, data: Any) -> None:
        token = self.signer.sign(payload)
        index = data.draw(st.integers(0, len(token) - 1))
        altered = token[:index] + data.draw(st.sampled_from(B64URL + ".=")) + token[index + 1 :]
        if altered != token:
            self.assertIsNone(self.signer.verify(altered), (token, altered))

    def test_other_key_and_oversize_rejected(self) -> None:
        token = self.signer.sign("p")
        self.assertIsNone(StateSigner(b"j" * 32).verify(token))
        self.assertIsNone(self.signer.verify(self.signer.sign("x" * 4000)))
        self.assertEqual(StateSigner().verify(StateSigner().sign("p")), None)


class DigestAndErrorTests(SynchronousTestCase):
    def test_request_digest(self) -> None:
        base = call(1)
        same = call(2, requestState="s", inputResponses={"k": {}}, _meta={"progressToken": 1})
        digest = request_digest("s", "token:alice", base)
        self.assertEqual(request_digest("s", "token:alice", same), digest)
        for server, principal, message in [
            ("t", "token:alice", base),
            ("s", "token:bob", base),
            ("s", "token:alice", call(1, arguments={"x": 2})),
            ("s", "token:alice", call(1, name="other")),
            ("s", "token:alice", modern(1, "prompts/get", {"name": "echo", "arguments": {"x": 1}})),
        ]:
            self.assertNotEqual(request_digest(server, principal, message), digest)

    def test_modern_error(self) -> None:
        def checked(method: str, params: dict[str, Any]) -> ModernRequest:
            message = modern(1, method, params)
            headers = {
                "mcp-protocol-version": era.MODERN,
                "mcp-method": method,
                "mcp-name": params.get("uri") or params.get("name"),
            }
            return era.check(message, lambda h: [headers[h]] if headers.get(h) else [])

        read = checked("resources/read", {"uri": "file:///x"})
        tool = checked("tools/call", {"name": "t"})
        cases: list[tuple[dict[str, Any], ModernRequest, tuple[int, str, Any]]] = [
            ({"code": -32002, "message": "gone"}, read, (-32602, "gone", {"uri": "file:///x"})),
            ({"code": -32002, "message": "big", "data": 1}, tool, (-32603, "big", 1)),
            ({"code": -32042, "message": "url"}, tool, (-32603, "url", None)),
            ({"code": True, "message": 5}, tool, (-32603, "Error", None)),
            ({"code": -32601, "message": "no"}, tool, (-32601, "no", None)),
            ({"code": 7, "message": "app", "data": [1]}, tool, (7, "app", [1])),
        ]
        for error, request, expected in cases:
            self.assertEqual(modern_error(error, request), expected, error)

    def test_listen_wants_and_tags(self) -> None:
        sent: list[Message] = []
        listen = Listen(
            "L", {"toolsListChanged": True, "resourceSubscriptions": ["a"]}, sent.append, print
        )
        wanted = {
            "notifications/tools/list_changed": True,
            "notifications/prompts/list_changed": False,
            "notifications/message": False,
        }
        for method, expected in wanted.items():
            self.assertIs(listen.wants(jsonrpc.notification(method)), expected, method)
        updated = "notifications/resources/updated"
        self.assertTrue(listen.wants(jsonrpc.notification(updated, {"uri": "a"})))
        self.assertFalse(listen.wants(jsonrpc.notification(updated, {"uri": "b"})))
        self.assertFalse(listen.wants(jsonrpc.notification(updated)))
        tagged = listen.tagged(jsonrpc.notification(updated, {"uri": "a", "_meta": {"k": 1}}))
        self.assertEqual(
            tagged["params"], {"uri": "a", "_meta": {"k": 1, era.META_SUBSCRIPTION: "L"}}
        )


class InputRequiredTests(SynchronousTestCase):
    """A child's questions while serving a modern request: multi round-trip requests."""

    def setUp(self) -> None:
        self.client = Client(Bridge(self, hold=True))

    @property
    def child(self) -> FakeChild:
        return self.client.child

    def ask(
        self, message: Message, *questions: Message, **extra: str
    ) -> tuple[Message, dict[str, Any]]:
        """Send a request; the child asks these questions: (the child's request, result)."""
        d = self.client.start(message, accept="application/json", **extra)
        held = [m for m in self.child.held if m["method"] == message["method"]][-1]
        return held, self.questions(d, *questions)

    def questions(self, d: Deferred[Any], *questions: Message) -> dict[str, Any]:
        for question in questions:
            self.child.send(question)
        self.assertNoResult(d)
        self.client.bridge.reactor.advance(INPUT_GATHER)
        status, body = self.client.finish(d)
        self.assertEqual(status, 200, body)
        return body["result"]  # type: ignore[no-any-return]

    def refused(self, message: Message, **extra: str) -> None:
        status, body = self.client.post(message, accept="application/json", **extra)
        self.assertEqual((status, body["id"]), (400, message["id"]), body)
        self.assertEqual(body["error"]["code"], jsonrpc.INVALID_PARAMS)

    def test_question_then_retry(self) -> None:
        held, result = self.ask(call(1), elicit("user_name"))
        self.assertEqual(result["resultType"], "input_required")
        self.assertEqual(
            result["inputRequests"],
            {"user_name": {"method": "elicitation/create", "params": elicit(0)["params"]}},
        )
        self.assertEqual(result["_meta"][era.META_SERVER], {"name": "fake", "version": "1.0"})
        self.assertEqual(answers_to(self.child, "user_name"), [])
        d = self.client.start(retry(2, result["requestState"], {"user_name": NAME}))
        [answer] = answers_to(self.child, "user_name")
        self.assertEqual(answer["result"], NAME)
        self.assertNoResult(d)
        self.child.answer(held)
        status, body = self.client.finish(d)
        self.assertEqual((status, body["id"], body["result"]["resultType"]), (200, 2, "complete"))

    def test_progress_after_a_retry_carries_the_retrys_token(self) -> None:
        held, result = self.ask(call(1, _meta={"progressToken": "first"}), elicit("a"))
        d = self.client.start(
            retry(2, result["requestState"], {"a": NAME}, _meta={"progressToken": "second"})
        )
        progress = {"progressToken": held["params"]["_meta"]["progressToken"], "progress": 1}
        self.child.send(jsonrpc.notification("notifications/progress", progress))
        self.client.bridge.client.flush()
        chunks = self.client.bridge.stream(self.successResultOf(d))
        self.child.answer(held)
        self.client.bridge.client.flush()
        note, answer = events(chunks)
        self.assertEqual(note["params"]["progressToken"], "second")
        self.assertEqual(answer["id"], 2)

    def test_questions_sent_together_are_gathered(self) -> None:
        _, result = self.ask(call(1), elicit("a"), elicit("b", "Your age?"))
        self.assertEqual(sorted(result["inputRequests"]), ["a", "b"])
        self.assertEqual(result["inputRequests"]["b"]["params"]["message"], "Your age?")

    def test_missing_answer_asked_again(self) -> None:
        held, first = self.ask(call(1), elicit("a"), elicit("b"))
        status, body = self.client.post(retry(2, first["requestState"], {"a": NAME}))
        again = body["result"]
        self.assertEqual((status, body["id"], again["resultType"]), (200, 2, "input_required"))
        self.assertEqual(list(again["inputRequests"]), ["b"])
        self.assertNotEqual(again["requestState"], first["requestState"])
        self.assertEqual(len(answers_to(self.child, "a")), 1)
        d = self.client.start(retry(3, again["requestState"], {"b": NAME}))
        self.assertEqual(len(answers_to(self.child, "b")), 1)
        self.child.answer(held)
        self.assertEqual(self.client.finish(d)[1]["result"]["resultType"], "complete")

    def test_second_round_and_replayed_state(self) -> None:
        held, first = self.ask(call(1), elicit("name"))
        d = self.client.start(retry(2, first["requestState"], {"name": NAME}))
        second = self.questions(d, elicit("age"))
        self.assertEqual(list(second["inputRequests"]), ["age"])
        self.assertNotEqual(second["requestState"], first["requestState"])
        self.refused(retry(3, first["requestState"], {"name": NAME}))
        d = self.client.start(retry(4, second["requestState"], {"age": {"action": "decline"}}))
        self.child.answer(held)
        _, body = self.client.finish(d)
        self.assertEqual((body["id"], body["result"]["resultType"]), (4, "complete"))
        self.assertEqual(len(answers_to(self.child, "name")), 1, "the replay reached nobody")

    def test_altered_or_foreign_state_refused(self) -> None:
        held, result = self.ask(call(1), elicit("q"))
        state = result["requestState"]
        altered = state[:2] + ("A" if state[2] != "A" else "B") + state[3:]
        self.refused(retry(2, altered, {"q": NAME}))
        self.refused(retry(3, "not-a-state", {"q": NAME}))
        self.refused(retry(4, 12, {"q": NAME}))
        self.refused(retry(5, state, {"q": NAME}, arguments={"x": 2}))
        self.refused(retry(6, state, {"q": NAME}, name="other"))
        self.assertEqual(answers_to(self.child, "q"), [])
        # The genuine retry still finds its call.
        d = self.client.start(retry(7, state, {"q": NAME}))
        self.child.answer(held)
        self.assertEqual(self.client.finish(d)[1]["result"]["resultType"], "complete")

    def test_state_of_another_principal_refused(self) -> None:
        tokens = tuple(
            TokenConfig(name, hash_token(f"mcpt_{name}"), frozenset({"*"}))
            for name in ("alice", "bob")
        )
        self.client = Client(Bridge(self, hold=True, auth=AuthConfig(tokens=tokens)))
        alice, bob = "Bearer mcpt_alice", "Bearer mcpt_bob"
        _, result = self.ask(call(1), elicit("q"), authorization=alice)
        self.refused(retry(2, result["requestState"], {"q": NAME}), authorization=bob)
        self.assertEqual(answers_to(self.child, "q"), [])

    def test_input_responses_must_be_objects(self) -> None:
        for responses in [[], "x", {"q": "yes"}, {"q": [1]}]:
            self.refused(call(1, inputResponses=responses))
        self.assertEqual(self.child.requests("tools/call"), [])

    def test_preanswered_question_answered_at_once(self) -> None:
        d = self.client.start(call(1, inputResponses={"user_name": NAME}))
        held = self.client.held("tools/call")
        self.child.send(elicit("user_name"))
        [answer] = answers_to(self.child, "user_name")
        self.assertEqual(answer["result"], NAME)
        self.client.bridge.reactor.advance(INPUT_GATHER)
        self.assertNoResult(d)
        self.child.answer(held)
        self.assertEqual(self.client.finish(d)[1]["result"]["resultType"], "complete")

    def test_undeclared_capability(self) -> None:
        d = self.client.start(call(1, caps={}))
        held = self.client.held("tools/call")
        self.child.send(elicit("q"))
        status, body = self.client.finish(d)
        self.assertEqual((status, body["id"], body["error"]["code"]), (400, 1, -32021))
        self.assertEqual(body["error"]["data"], {"requiredCapabilities": {"elicitation": {}}})
        [answer] = answers_to(self.child, "q")
        self.assertEqual(answer["error"]["code"], jsonrpc.METHOD_NOT_FOUND)
        self.child.answer(held)
        self.assertEqual(self.client.calls(), [])

    def test_no_input_during_tools_list(self) -> None:
        d = self.client.start(modern(1, "tools/list", caps={"elicitation": {}}))
        held = self.client.held("tools/list")
        self.child.send(elicit("q"))
        [answer] = answers_to(self.child, "q")
        self.assertEqual(answer["error"]["code"], jsonrpc.METHOD_NOT_FOUND)
        self.client.bridge.reactor.advance(INPUT_GATHER)
        self.assertNoResult(d)
        self.child.answer(held)
        self.assertEqual(self.client.finish(d)[1]["result"]["resultType"], "complete")

    def test_input_timeout(self) -> None:
        server = ServerConfig(name="s", command="fake", input_timeout=30)
        self.client = Client(Bridge(self, server, hold=True))
        held, result = self.ask(call(1), elicit("a"), elicit("b"))
        self.client.bridge.reactor.advance(29)
        self.assertEqual(self.child.notifications("notifications/cancelled"), [])
        self.client.bridge.reactor.advance(1)
        for key in ("a", "b"):
            [answer] = answers_to(self.child, key)
            self.assertEqual(answer["error"]["code"], jsonrpc.INTERNAL_ERROR)
            self.assertIn("input_timeout", answer["error"]["message"])
        [cancel] = self.child.notifications("notifications/cancelled")
        self.assertEqual(cancel["params"]["requestId"], held["id"])
        self.refused(retry(2, result["requestState"], {"a": NAME, "b": NAME}))

    def test_parked_call_does_not_time_out(self) -> None:
        server = ServerConfig(name="s", command="fake", request_timeout=10, input_timeout=100)
        self.client = Client(Bridge(self, server, hold=True))
        _, result = self.ask(call(1), elicit("q"))
        self.client.bridge.reactor.advance(60)
        self.assertEqual(self.child.notifications("notifications/cancelled"), [])
        d = self.client.start(retry(2, result["requestState"], {"q": NAME}))
        self.assertEqual(len(answers_to(self.child, "q")), 1)
        # Answered, the child has request_timeout again to finish.
        self.client.bridge.reactor.advance(10)
        _, body = self.client.finish(d)
        self.assertEqual((body["id"], body["error"]["code"]), (2, jsonrpc.REQUEST_TIMEOUT))
        self.assertEqual(len(self.child.notifications("notifications/cancelled")), 1)

    def test_undeclared_capability_while_parked(self) -> None:
        """A question the client cannot answer, asked between rounds: the retry
        is still answered."""
        held, result = self.ask(call(1), elicit("q"))
        self.child.send(jsonrpc.request("s", "sampling/createMessage", {"messages": []}))
        [refusal] = answers_to(self.child, "s")
        self.assertEqual(refusal["error"]["code"], jsonrpc.METHOD_NOT_FOUND)
        # The child finishes (with the error it was given) before the retry comes.
        self.child.answer(held)
        d = self.client.start(retry(2, result["requestState"], {"q": NAME}))
        status, body = self.client.finish(d)
        self.assertEqual((status, body["id"]), (400, 2))
        self.assertEqual(body["error"]["code"], jsonrpc.MISSING_CAPABILITY)
        self.assertEqual(body["error"]["data"], {"requiredCapabilities": {"sampling": {}}})
        self.assertEqual(self.client.calls(), [])


class QuestionRoutingTests(SynchronousTestCase):
    """Which client a shared child's question goes to, with modern calls about."""

    def legacy(self, bridge: Bridge, id: int, capability: str = "elicitation") -> list[bytes]:
        """A session-era client with a tools/call in flight: its POST's stream
        (open from the start: the client takes nothing else)."""
        caps: dict[str, Any] = {capability: {}}
        init = jsonrpc.request(
            1, "initialize", {"protocolVersion": "2025-11-25", "capabilities": caps}
        )
        sid = bridge.open_session(init=init)
        message = jsonrpc.request(id, "tools/call", {"name": "legacy"})
        headers = {**BOTH, "accept": "text/event-stream", "mcp-session-id": sid}
        d = send(bridge, message, headers)
        return bridge.stream(self.successResultOf(d))

    def asked(self, chunks: list[bytes]) -> list[RequestId]:
        return [
            m["params"]["message"]
            for m in events(chunks)
            if m.get("method") == "elicitation/create"
        ]

    def test_question_goes_to_the_running_request_not_the_parked_one(self) -> None:
        bridge = Bridge(self, hold=True)
        client = Client(bridge)
        d = client.start(call(1), accept="application/json")
        client.child.send(elicit("m", "for modern"))
        bridge.reactor.advance(INPUT_GATHER)
        self.assertEqual(client.finish(d)[1]["result"]["resultType"], "input_required")
        chunks = self.legacy(bridge, 5)
        client.child.send(elicit("l", "for legacy"))
        bridge.client.flush()
        self.assertEqual(self.asked(chunks), ["for legacy"])
        self.assertEqual(answers_to(client.child, "l"), [])

    def test_abandoned_call_of_anonymous_clients_blurs_the_picture(self) -> None:
        """A child may ignore a cancellation: its question may belong to the
        abandoned call, and anonymous clients may be anyone, so nobody is asked
        until the child answers the abandoned request (or request_timeout)."""
        bridge = Bridge(self, hold=True)
        client = Client(bridge)
        d = client.start(call(1), accept="application/json")
        abandoned = client.held("tools/call")
        client.hang_up()
        self.failureResultOf(d, ResponseNeverReceived)
        chunks = self.legacy(bridge, 5)
        client.child.send(elicit("early"))
        [refused] = answers_to(client.child, "early")
        self.assertEqual(refused["error"]["code"], jsonrpc.INTERNAL_ERROR)
        bridge.reactor.advance(ABANDONED_GRACE + 1)
        client.child.send(elicit("later"))
        [refused] = answers_to(client.child, "later")
        self.assertEqual(refused["error"]["code"], jsonrpc.INTERNAL_ERROR)
        client.child.answer(abandoned)  # its late answer: the child has let it go
        client.child.send(elicit("last", "after the late answer"))
        bridge.client.flush()
        self.assertEqual(self.asked(chunks), ["after the late answer"])

    def test_roots_of_whom(self) -> None:
        """A shared child used by a stateless principal and a session-era client
        may not ask for roots: whose would they be?"""
        bridge = Bridge(self, hold=True)
        client = Client(bridge)
        d = client.start(modern(1, "tools/list"))
        client.child.answer(client.held("tools/list"))
        self.assertEqual(client.finish(d)[0], 200)
        chunks = self.legacy(bridge, 5, "roots")
        client.child.send(jsonrpc.request("r", "roots/list"))
        bridge.client.flush()
        asked = [m for m in events(chunks) if m.get("method") == "roots/list"]
        self.assertEqual(asked, [])
        [refused] = answers_to(client.child, "r")
        self.assertIn("roots belong to each client", refused["error"]["message"])


class RefusalWhileParkedTests(SynchronousTestCase):
    def test_the_retry_hears_of_it_and_the_child_is_not_left_waiting(self) -> None:
        server = ServerConfig(
            name="s", command="fake", request_timeout=10, input_timeout=30, session_idle_timeout=60
        )
        bridge = Bridge(self, server, hold=True)
        client = Client(bridge)
        d = client.start(call(1), accept="application/json")
        client.child.send(elicit("q"))
        bridge.reactor.advance(INPUT_GATHER)
        state = client.finish(d)[1]["result"]["requestState"]
        # While parked, the child asks for something the client did not declare.
        client.child.send(jsonrpc.request("s", "sampling/createMessage", {"messages": []}))
        [q] = answers_to(client.child, "q")
        self.assertIn("error", q, "its other questions are answered: it can finish")
        status, body = client.finish(
            client.start(retry(2, state, {"q": NAME}), accept="application/json")
        )
        self.assertEqual((status, body["id"]), (400, 2))
        self.assertEqual(body["error"]["code"], jsonrpc.MISSING_CAPABILITY)
        self.assertEqual(body["error"]["data"], {"requiredCapabilities": {"sampling": {}}})
        bridge.reactor.advance(server.request_timeout + 1)
        self.assertEqual(client.calls(), [])
        self.assertTrue(client.child.notifications("notifications/cancelled"))


class IdleHubTests(SynchronousTestCase):
    def test_when_idle_waits_for_the_last_call(self) -> None:
        """A reload closes a retired server's hubs as soon as nothing is in flight."""
        client = Client(Bridge(self, hold=True))
        d = client.start(call(1), accept="application/json")
        [hub] = client.bridge.registry.sessions.values()
        sink = hub.sink
        assert isinstance(sink, StatelessSink)
        idle: list[bool] = []
        sink.when_idle(lambda: idle.append(True))
        self.assertEqual(idle, [])
        client.child.answer(client.held("tools/call"))
        self.assertEqual(client.finish(d)[0], 200)
        self.assertEqual(idle, [True])
        sink.when_idle(lambda: idle.append(True))
        self.assertEqual(idle, [True, True], "an idle hub is told at once")


class InFlightTests(SynchronousTestCase):
    """A principal's stateless calls on a server count as its hub's requests in flight."""

    def test_calls_in_flight_are_capped_parked_ones_included(self) -> None:
        client = Client(Bridge(self, hold=True, limits=LimitsConfig(max_in_flight_per_session=2)))
        child = client.child
        asking = client.start(call(2), accept="application/json")
        [held] = child.held
        child.send(elicit("name"))
        client.bridge.reactor.advance(INPUT_GATHER)
        result = client.finish(asking)[1]["result"]
        self.assertEqual(result["resultType"], "input_required")
        first = client.start(call(1), accept="application/json")
        # One running, one parked: the hub holds two.
        status, body = client.post(call(3), accept="application/json")
        self.assertEqual((status, body["id"]), (429, 3))
        self.assertIn("limits.max_in_flight_per_session is 2", body["error"]["message"])
        self.assertEqual(len(child.requests("tools/call")), 2)
        # The retry of the parked call is the same call: not refused.
        again = client.start(
            retry(4, result["requestState"], {"name": NAME}), accept="application/json"
        )
        self.assertNoResult(again)
        child.answer(held)
        self.assertEqual(client.finish(again)[0], 200)
        # It ended: there is room for one more.
        self.assertNoResult(client.start(call(3), accept="application/json"))
        self.assertEqual(len(child.requests("tools/call")), 3)
        self.assertNoResult(first)


class RecordTests(SynchronousTestCase):
    """Each round of a call is one record, which says how the round ended."""

    def setUp(self) -> None:
        self.client = Client(Bridge(self, ServerConfig(name="s", command="fake"), hold=True))
        self.path = Path(self.mktemp())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.trail = AuditTrail(AuditConfig(path=str(self.path)), self.client.bridge.reactor)
        self.trail.start()
        self.addCleanup(self.trail.stop)
        self.client.bridge.registry.recorder = self.trail

    def requests(self) -> list[tuple[str, str, int | None]]:
        lines = [orjson.loads(line) for line in self.path.read_bytes().splitlines()]
        return [
            (e["method"], e["status"], e.get("error_code"))
            for e in lines
            if e["event"] == "request"
        ]

    def test_a_childs_error_numbered_like_a_timeout_is_an_error(self) -> None:
        d = self.client.start(call(1), accept="application/json")
        held = self.client.held("tools/call")
        self.client.child.send(jsonrpc.error(held["id"], -32001, "the tool gave up"))
        status, body = self.client.finish(d)
        self.assertEqual((status, body["error"]["code"]), (200, -32001))
        self.assertEqual(self.requests(), [("tools/call", "error", -32001)])

    def test_a_call_that_timed_out(self) -> None:
        d = self.client.start(call(1), accept="application/json")
        self.client.bridge.reactor.advance(ServerConfig(name="s", command="x").request_timeout)
        self.assertEqual(self.client.finish(d)[1]["error"]["code"], jsonrpc.REQUEST_TIMEOUT)
        self.assertEqual(self.requests(), [("tools/call", "timeout", -32001)])

    def test_each_round(self) -> None:
        d = self.client.start(call(1), accept="application/json")
        held = self.client.held("tools/call")
        self.client.child.send(elicit("q"))
        self.client.bridge.reactor.advance(INPUT_GATHER)
        result = self.client.finish(d)[1]["result"]
        d = self.client.start(retry(2, result["requestState"], {"q": NAME}))
        self.client.child.answer(held)
        self.client.finish(d)
        self.assertEqual(self.requests(), [("tools/call", "ok", None), ("tools/call", "ok", None)])
