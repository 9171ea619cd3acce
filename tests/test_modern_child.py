"""ModernUpstream: a child that speaks only 2026-07-28, behind clients of both eras.

The child here is a L{FakeChild} on a L{ModernReactor}: it answers
C{server/discover} itself and holds every other request for the test to
answer, so each test plays the child's side of the revision by hand.
"""

from __future__ import annotations

import copy
from typing import Any

import attrs
from twisted.trial.unittest import SynchronousTestCase

from mcptwist import __version__
from mcptwist.child.supervisor import ChildState
from mcptwist.config.model import ServerConfig
from mcptwist.mcp import era, jsonrpc
from mcptwist.mcp.jsonrpc import Message, RequestId
from mcptwist.routing.backends import SessionBackend, SharedBackend
from mcptwist.routing.modern import ModernUpstream
from mcptwist.routing.sessions import ClientSession
from mcptwist.routing.stateless import ModernCall, StatelessSink, StateSigner
from mcptwist.routing.upstream import BRIDGE_CAPABILITIES, Upstream

from .support.children import FakeChild
from .support.messages import modern
from .support.modern import (
    DISCOVER,
    GREET_QUESTIONS,
    SERVER_INFO,
    ModernReactor,
    greet,
    held,
    input_required,
)
from .support.router import FakeSession, call, initialize, send

BOTH = {"sampling": {}, "elicitation": {}}


def server(**kwargs: Any) -> ServerConfig:
    kwargs.setdefault("era", "modern")
    return ServerConfig(name="fake", command="fake-mcp", **kwargs)


def make(reactor: ModernReactor, **kwargs: Any) -> ModernUpstream:
    upstream = ModernUpstream(server(**kwargs), reactor, {"PATH": "/bin"})
    upstream.startService()
    return upstream


def one_client(
    caps: dict[str, Any] | None = None, **kwargs: Any
) -> tuple[ModernReactor, ModernUpstream, FakeSession]:
    """A ready modern upstream with one initialized session-era client."""
    reactor = ModernReactor()
    upstream = make(reactor, **kwargs)
    a = FakeSession("a")
    upstream.attach(a)
    initialize(upstream, a, caps=dict(BOTH) if caps is None else caps)
    return reactor, upstream, a


def questions(session: FakeSession) -> list[tuple[Message, RequestId | None]]:
    """The server-to-client requests a session was sent, with their related id."""
    return [(m, r) for m, r in session.got if "method" in m and "id" in m]


def responses_to(session: FakeSession, id: RequestId) -> list[Message]:
    """Every response a session got to one of its requests (a test expects one)."""
    return [m for m, _ in session.got if "method" not in m and m["id"] == id]


def answer_for(message: Message) -> dict[str, Any]:
    if message["method"] == "elicitation/create":
        return {"action": "accept", "content": {"name": "Ada"}}
    return {"role": "assistant", "content": {"type": "text", "text": "Onward"}, "model": "m"}


def modern_request(id: RequestId, method: str, params: dict[str, Any] | None = None) -> Message:
    """A request as a 2026-07-28 client that takes elicitations sends it, at log level info."""
    return modern(id, method, params, caps={"elicitation": {}}, level="info")


class HandshakeTests(SynchronousTestCase):
    def test_discover_with_the_bridges_meta_never_initialize(self) -> None:
        """The child's first (and only) handshake request is server/discover,
        carrying the bridge's own _meta of the revision."""
        reactor = ModernReactor()
        upstream = make(reactor)
        child = reactor.child
        discover, *rest = child.requests()
        self.assertEqual(discover["method"], "server/discover")
        # Nothing else: the bridge's listen stream waits for a session-era client.
        self.assertEqual(rest, [])
        self.assertEqual(
            discover["params"]["_meta"],
            {
                era.META_VERSION: "2026-07-28",
                era.META_CAPABILITIES: BRIDGE_CAPABILITIES,
                era.META_CLIENT: {"name": "mcptwist", "version": __version__},
            },
        )
        self.assertEqual(child.requests("initialize"), [])
        self.assertEqual(child.notifications(), [])
        self.assertEqual(upstream.state, ChildState.RUNNING)

    def test_initialize_answered_from_discover(self) -> None:
        """capabilities, serverInfo (from _meta) and instructions come from the discover
        result; the version is negotiated in the session era."""
        reactor = ModernReactor()
        upstream = make(reactor)
        a, b = FakeSession("a"), FakeSession("b")
        upstream.attach(a)
        upstream.attach(b)
        ra = initialize(upstream, a, "2025-06-18", caps={"sampling": {}})
        rb = initialize(upstream, b, "2026-07-28")
        self.assertEqual(
            ra["result"],
            {
                "protocolVersion": "2025-06-18",
                "capabilities": DISCOVER["capabilities"],
                "serverInfo": SERVER_INFO,
                "instructions": "a modern fake",
            },
        )
        # The revision is no session-era version: such a client gets the newest one.
        self.assertEqual(rb["result"]["protocolVersion"], "2025-11-25")
        self.assertEqual(a.capabilities, {"sampling": {}})
        self.assertEqual(a.client_info, {"name": "a"})
        self.assertEqual(len(reactor.child.requests("server/discover")), 1)
        self.assertEqual(reactor.child.requests("initialize"), [])

    def test_initialize_waits_for_discover(self) -> None:
        reactor = ModernReactor(discover=None)
        upstream = make(reactor)
        a = FakeSession("a")
        upstream.attach(a)
        send(upstream, a, jsonrpc.request(1, "initialize", {"protocolVersion": "2025-11-25"}))
        send(upstream, a, call(2, "early"))
        self.assertEqual(a.got, [])
        self.assertEqual(upstream.state, ChildState.STARTING)
        [discover] = reactor.child.held
        reactor.child.send(jsonrpc.result(discover["id"], DISCOVER))
        self.assertEqual(a.responses()[1]["result"]["serverInfo"], SERVER_INFO)
        [early] = held(reactor.child, "tools/call")
        self.assertEqual(early["params"]["arguments"], {"text": "early"})

    def test_discover_error_abandons_the_child(self) -> None:
        reactor = ModernReactor(discover=None)
        upstream = make(reactor)
        first = reactor.child
        [discover] = first.held
        first.send(jsonrpc.error(discover["id"], jsonrpc.METHOD_NOT_FOUND, "no such method"))
        self.assertTrue(first.exited)
        self.assertEqual(upstream.state, ChildState.RESTARTING)
        self.assertIn("refused server/discover: no such method", upstream.supervisor.last_exit)
        reactor.advance(1)
        self.assertEqual(len(reactor.children), 2)
        self.assertEqual(reactor.child.held[0]["method"], "server/discover")

    def test_discover_timeout_abandons_the_child(self) -> None:
        reactor = ModernReactor(discover=None)
        upstream = make(reactor, startup_timeout=5.0)
        first = reactor.child
        reactor.advance(4.9)
        self.assertFalse(first.exited)
        reactor.advance(0.1)
        self.assertTrue(first.exited)
        self.assertEqual(upstream.state, ChildState.RESTARTING)
        self.assertIn("server/discover within 5s", upstream.supervisor.last_exit)

    def test_late_discover_of_a_replaced_child_is_ignored(self) -> None:
        """A discover answer from a child that is no longer current changes nothing."""
        reactor = ModernReactor(discover=None)
        upstream = make(reactor, startup_timeout=5.0)
        first = reactor.child
        [discover] = first.held
        reactor.advance(5)
        reactor.advance(1)
        self.assertIsNot(reactor.child, first)
        # The old child's answer is not the current child's: dropped on the way in.
        first.send(jsonrpc.result(discover["id"], DISCOVER))
        self.assertIsNone(upstream.init_result)
        self.assertEqual(upstream.state, ChildState.STARTING)


class EnvelopeTests(SynchronousTestCase):
    def test_session_request_gets_the_revisions_meta(self) -> None:
        reactor, upstream, a = one_client()
        send(upstream, a, call(1, "x", token="tok"))
        [request] = held(reactor.child, "tools/call")
        self.assertEqual(
            request["params"]["_meta"],
            {
                "progressToken": request["id"],
                era.META_VERSION: "2026-07-28",
                era.META_CAPABILITIES: BOTH,
                era.META_CLIENT: {"name": "a"},
            },
        )
        self.assertNotIn(era.META_LOG_LEVEL, request["params"]["_meta"])
        self.assertEqual(request["params"]["arguments"], {"text": "x"})

    def test_params_less_request_gets_the_envelope(self) -> None:
        reactor, upstream, a = one_client()
        send(upstream, a, jsonrpc.request(1, "tools/list"))
        [request] = held(reactor.child, "tools/list")
        self.assertEqual(request["params"]["_meta"][era.META_VERSION], era.MODERN)

    def test_each_session_its_own_envelope(self) -> None:
        reactor, upstream, a = one_client()
        b = FakeSession("b")
        upstream.attach(b)
        initialize(upstream, b, caps={"roots": {}})
        send(upstream, a, call(1, "a"))
        send(upstream, b, call(1, "b"))
        ma, mb = held(reactor.child, "tools/call")
        self.assertEqual(ma["params"]["_meta"][era.META_CAPABILITIES], BOTH)
        self.assertEqual(mb["params"]["_meta"][era.META_CAPABILITIES], {"roots": {}})
        self.assertEqual(mb["params"]["_meta"][era.META_CLIENT], {"name": "b"})
        reactor.child.send(jsonrpc.result(mb["id"], {"content": [], "resultType": "complete"}))
        reactor.child.send(jsonrpc.result(ma["id"], {"content": []}))
        # Results as the child sent them (revision fields left in), with each client's id.
        self.assertEqual(b.responses()[1]["result"], {"content": [], "resultType": "complete"})
        self.assertEqual(a.responses()[1]["result"], {"content": []})

    def test_set_level_answered_by_the_bridge_and_carried_by_each_request(self) -> None:
        reactor, upstream, a = one_client()
        b = FakeSession("b")
        upstream.attach(b)
        initialize(upstream, b)
        send(upstream, a, jsonrpc.request(1, "logging/setLevel", {"level": "warning"}))
        self.assertEqual(a.responses()[1]["result"], {})
        self.assertEqual(reactor.child.requests("logging/setLevel"), [])
        send(upstream, a, call(2, "a"))
        send(upstream, b, call(2, "b"))
        ma, mb = held(reactor.child, "tools/call")
        self.assertEqual(ma["params"]["_meta"][era.META_LOG_LEVEL], "warning")
        # The level is the session's own: another session's requests carry none.
        self.assertNotIn(era.META_LOG_LEVEL, mb["params"]["_meta"])
        send(upstream, a, jsonrpc.request(3, "logging/setLevel", {"level": "debug"}))
        send(upstream, a, call(4, "a"))
        self.assertEqual(
            held(reactor.child, "tools/call")[-1]["params"]["_meta"][era.META_LOG_LEVEL], "debug"
        )

    def test_bad_level_refused(self) -> None:
        _, upstream, a = one_client()
        send(upstream, a, jsonrpc.request(1, "logging/setLevel", {"level": "loud"}))
        self.assertEqual(a.responses()[1]["error"]["code"], jsonrpc.INVALID_PARAMS)
        self.assertIsNone(a.log_level)

    def test_log_lines_by_level(self) -> None:
        """The child logs for requests that carried a level; sessions get lines at
        or above their own level."""
        reactor, upstream, a = one_client()
        send(upstream, a, jsonrpc.request(1, "logging/setLevel", {"level": "error"}))
        for level in ("info", "error"):
            reactor.child.send(
                jsonrpc.notification("notifications/message", {"level": level, "data": level})
            )
        self.assertEqual(
            [m["params"]["level"] for m in a.notifications("notifications/message")], ["error"]
        )

    def test_stateless_request_passes_unchanged(self) -> None:
        """A stateless downstream's request keeps its own _meta; only the id changes."""
        reactor = ModernReactor()
        upstream = make(reactor)
        s = FakeSession("s", stateless=True, log_level="info")
        upstream.attach(s)
        message = modern_request(
            "m-1", "tools/call", {"name": "greet", "arguments": {}, "requestState": "opaque"}
        )
        send(upstream, s, copy.deepcopy(message))
        [request] = held(reactor.child, "tools/call")
        self.assertEqual(request["params"], message["params"])
        self.assertNotEqual(request["id"], "m-1")
        # The child's answer comes back as it is, input_required included.
        result = input_required(GREET_QUESTIONS, "child-state")
        reactor.child.send(jsonrpc.result(request["id"], copy.deepcopy(result)))
        self.assertEqual(s.responses()["m-1"]["result"], result)
        self.assertEqual(questions(s), [])

    def test_cancellation_goes_through_with_the_child_id(self) -> None:
        reactor, upstream, a = one_client()
        send(upstream, a, call("c", "x"))
        [request] = held(reactor.child, "tools/call")
        send(
            upstream,
            a,
            jsonrpc.notification("notifications/cancelled", {"requestId": "c", "reason": "bye"}),
        )
        [cancelled] = reactor.child.notifications("notifications/cancelled")
        self.assertEqual(cancelled["params"], {"requestId": request["id"], "reason": "bye"})
        self.assertEqual(a.cancelled_ids, ["c"])


class PingTests(SynchronousTestCase):
    def test_ping_answered_while_ready(self) -> None:
        reactor, upstream, a = one_client()
        send(upstream, a, jsonrpc.request("p", "ping"))
        self.assertEqual(a.responses()["p"]["result"], {})
        self.assertEqual([(m["id"], r) for m, r in a.got if m.get("id") == "p"], [("p", "p")])
        self.assertEqual(reactor.child.requests("ping"), [])

    def test_ping_refused_while_the_child_is_down(self) -> None:
        reactor, upstream, a = one_client()
        reactor.child.exit(1)
        send(upstream, a, jsonrpc.request("p", "ping"))
        self.assertEqual(a.responses()["p"]["error"]["code"], jsonrpc.SERVER_UNAVAILABLE)
        reactor.advance(1)
        send(upstream, a, jsonrpc.request("q", "ping"))
        self.assertEqual(a.responses()["q"]["result"], {})


class InputRoundTests(SynchronousTestCase):
    def ask(self, **kwargs: Any) -> tuple[ModernReactor, ModernUpstream, FakeSession, Message]:
        """A session's greet, answered by the child with input_required (two questions)."""
        reactor, upstream, a = one_client(**kwargs)
        send(upstream, a, greet(5))
        [first] = held(reactor.child, "tools/call")
        reactor.child.send(
            jsonrpc.result(first["id"], input_required(copy.deepcopy(GREET_QUESTIONS)))
        )
        return reactor, upstream, a, first

    def test_questions_become_server_requests_then_a_retry(self) -> None:
        reactor, upstream, a, first = self.ask()
        asked = questions(a)
        self.assertEqual(
            [(m["method"], m["params"], related) for m, related in asked],
            [
                ("elicitation/create", GREET_QUESTIONS["name"]["params"], 5),
                ("sampling/createMessage", GREET_QUESTIONS["motto"]["params"], 5),
            ],
        )
        # Not an answer yet: the client waits for its call.
        self.assertNotIn(5, a.responses())
        # Answered out of order; the retry waits for both.
        send(upstream, a, jsonrpc.result(asked[1][0]["id"], answer_for(asked[1][0])))
        self.assertEqual(len(held(reactor.child, "tools/call")), 1)
        send(upstream, a, jsonrpc.result(asked[0][0]["id"], answer_for(asked[0][0])))
        _, retry = held(reactor.child, "tools/call")
        self.assertNotEqual(retry["id"], first["id"])
        self.assertEqual(retry["params"]["name"], "greet")
        self.assertEqual(retry["params"]["arguments"], {"loud": True})
        self.assertEqual(
            retry["params"]["inputResponses"],
            {"name": answer_for(asked[0][0]), "motto": answer_for(asked[1][0])},
        )
        self.assertEqual(retry["params"]["requestState"], "state-1")
        self.assertEqual(retry["params"]["_meta"], first["params"]["_meta"])
        # The client's answers are the bridge's business: none reaches the child as a response.
        self.assertEqual([m for m in reactor.child.received if "method" not in m], [])
        final = {"content": [{"type": "text", "text": "Hello, Ada! Motto: Onward"}]}
        reactor.child.send(jsonrpc.result(retry["id"], final))
        self.assertEqual(a.responses()[5], jsonrpc.result(5, final))
        self.assertEqual(responses_to(a, 5), [jsonrpc.result(5, final)])

    def test_rounds_repeat_as_long_as_the_child_asks(self) -> None:
        reactor, upstream, a, first = self.ask()
        for m, _ in questions(a):
            send(upstream, a, jsonrpc.result(m["id"], answer_for(m)))
        retry = held(reactor.child, "tools/call")[-1]
        again = {"confirm": {"method": "elicitation/create", "params": {"message": "Sure?"}}}
        reactor.child.send(jsonrpc.result(retry["id"], input_required(again, "state-2")))
        [(third, related)] = questions(a)[2:]
        self.assertEqual(
            (third["method"], third["params"], related),
            ("elicitation/create", {"message": "Sure?"}, 5),
        )
        send(upstream, a, jsonrpc.result(third["id"], {"action": "accept", "content": {}}))
        last = held(reactor.child, "tools/call")[-1]
        self.assertEqual(len({first["id"], retry["id"], last["id"]}), 3)
        self.assertEqual(
            last["params"]["inputResponses"], {"confirm": {"action": "accept", "content": {}}}
        )
        self.assertEqual(last["params"]["requestState"], "state-2")
        reactor.child.send(jsonrpc.result(last["id"], {"content": []}))
        self.assertEqual(a.responses()[5]["result"], {"content": []})

    def test_retry_without_state_when_the_child_gave_none(self) -> None:
        reactor, upstream, a = one_client()
        send(upstream, a, greet(5))
        [first] = held(reactor.child, "tools/call")
        only = {"name": GREET_QUESTIONS["name"]}
        reactor.child.send(jsonrpc.result(first["id"], input_required(only, state=None)))
        [(question, _)] = questions(a)
        send(upstream, a, jsonrpc.result(question["id"], answer_for(question)))
        retry = held(reactor.child, "tools/call")[-1]
        self.assertNotIn("requestState", retry["params"])
        self.assertEqual(list(retry["params"]["inputResponses"]), ["name"])

    def test_progress_of_the_retry_reaches_the_client_with_its_token(self) -> None:
        reactor, upstream, a = one_client()
        send(upstream, a, greet(5, token="tok"))
        [first] = held(reactor.child, "tools/call")
        reactor.child.send(
            jsonrpc.result(first["id"], input_required({"name": GREET_QUESTIONS["name"]}))
        )
        [(question, _)] = questions(a)
        send(upstream, a, jsonrpc.result(question["id"], answer_for(question)))
        retry = held(reactor.child, "tools/call")[-1]
        token = retry["params"]["_meta"]["progressToken"]
        self.assertEqual(token, retry["id"])
        reactor.child.send(
            jsonrpc.notification("notifications/progress", {"progressToken": token, "progress": 1})
        )
        [progress] = a.notifications("notifications/progress")
        self.assertEqual(progress["params"]["progressToken"], "tok")

    def test_cancelling_after_a_retry_names_the_retry(self) -> None:
        reactor, upstream, a, _ = self.ask()
        for m, _ in questions(a):
            send(upstream, a, jsonrpc.result(m["id"], answer_for(m)))
        retry = held(reactor.child, "tools/call")[-1]
        send(upstream, a, jsonrpc.notification("notifications/cancelled", {"requestId": 5}))
        [cancelled] = reactor.child.notifications("notifications/cancelled")
        self.assertEqual(cancelled["params"]["requestId"], retry["id"])

    def test_roots_asked_of_the_calling_session_alone(self) -> None:
        """roots/list too, even with other sessions on the shared child: the
        question belongs to the call, so there is no one else to ask."""
        reactor, upstream, a = one_client(caps={"roots": {}})
        b = FakeSession("b")
        upstream.attach(b)
        initialize(upstream, b, caps={"roots": {}})
        send(upstream, a, greet(5))
        [first] = held(reactor.child, "tools/call")
        roots = {"where": {"method": "roots/list"}}
        reactor.child.send(jsonrpc.result(first["id"], input_required(roots)))
        [(question, related)] = questions(a)
        self.assertEqual((question["method"], related), ("roots/list", 5))
        self.assertNotIn("params", question)
        self.assertEqual(questions(b), [])
        send(upstream, a, jsonrpc.result(question["id"], {"roots": [{"uri": "file:///a"}]}))
        retry = held(reactor.child, "tools/call")[-1]
        self.assertEqual(
            retry["params"]["inputResponses"], {"where": {"roots": [{"uri": "file:///a"}]}}
        )

    def test_undeclared_capability_fails_the_call(self) -> None:
        reactor, upstream, a = one_client(caps={"elicitation": {}})
        send(upstream, a, greet(5))
        [first] = held(reactor.child, "tools/call")
        reactor.child.send(
            jsonrpc.result(first["id"], input_required(copy.deepcopy(GREET_QUESTIONS)))
        )
        error = a.responses()[5]["error"]
        self.assertEqual(error["code"], jsonrpc.INTERNAL_ERROR)
        self.assertIn("sampling/createMessage", error["message"])
        # Nothing was asked (not even the question the client could answer), nothing retried.
        self.assertEqual(questions(a), [])
        self.assertEqual(len(held(reactor.child, "tools/call")), 1)
        self.assertEqual(upstream.in_flight, 0)

    def test_a_question_of_no_known_kind_fails_the_call(self) -> None:
        reactor, upstream, a = one_client()
        send(upstream, a, greet(5))
        [first] = held(reactor.child, "tools/call")
        odd = {"x": {"method": "tasks/get", "params": {}}}
        reactor.child.send(jsonrpc.result(first["id"], input_required(odd)))
        self.assertEqual(a.responses()[5]["error"]["code"], jsonrpc.INTERNAL_ERROR)
        self.assertEqual(questions(a), [])

    def test_client_error_fails_the_call(self) -> None:
        reactor, upstream, a, _ = self.ask()
        (name_q, _), (motto_q, _) = questions(a)
        send(upstream, a, jsonrpc.error(name_q["id"], -32099, "user declined"))
        error = a.responses()[5]["error"]
        self.assertEqual(error["code"], -32099)
        self.assertIn("user declined", error["message"])
        # The other answer, coming later, starts nothing.
        send(upstream, a, jsonrpc.result(motto_q["id"], answer_for(motto_q)))
        self.assertEqual(len(held(reactor.child, "tools/call")), 1)
        self.assertEqual(responses_to(a, 5), [a.responses()[5]])

    def test_timeout_during_a_round_fails_the_call_and_drops_late_answers(self) -> None:
        reactor, upstream, a, _ = self.ask(request_timeout=10.0)
        reactor.advance(9.9)
        self.assertNotIn(5, a.responses())
        reactor.advance(0.1)
        self.assertEqual(a.responses()[5]["error"]["code"], jsonrpc.REQUEST_TIMEOUT)
        for m, _ in questions(a):
            send(upstream, a, jsonrpc.result(m["id"], answer_for(m)))
        self.assertEqual(len(held(reactor.child, "tools/call")), 1)
        self.assertEqual([m for m in reactor.child.received if "method" not in m], [])
        self.assertEqual(responses_to(a, 5), [a.responses()[5]])
        self.assertEqual(upstream.in_flight, 0)

    def test_answer_from_another_session_is_not_taken(self) -> None:
        reactor, upstream, a, _ = self.ask()
        b = FakeSession("b")
        upstream.attach(b)
        initialize(upstream, b, caps=dict(BOTH))
        for m, _ in questions(a):
            send(upstream, b, jsonrpc.result(m["id"], {"forged": True}))
        self.assertEqual(len(held(reactor.child, "tools/call")), 1)
        self.assertNotIn(5, a.responses())

    def test_a_forged_answer_does_not_spoil_the_genuine_one(self) -> None:
        """Another session answering a's questions (their ids are small integers)
        must not stop a's own answers from completing its call."""
        reactor, upstream, a, _ = self.ask()
        b = FakeSession("b")
        upstream.attach(b)
        initialize(upstream, b, caps=dict(BOTH))
        for m, _ in questions(a):
            send(upstream, b, jsonrpc.result(m["id"], {"forged": True}))
        for m, _ in questions(a):
            send(upstream, a, jsonrpc.result(m["id"], answer_for(m)))
        calls = held(reactor.child, "tools/call")
        self.assertEqual(len(calls), 2)
        self.assertEqual(
            calls[-1]["params"]["inputResponses"],
            {"name": answer_for(questions(a)[0][0]), "motto": answer_for(questions(a)[1][0])},
        )

    def test_child_lost_during_a_round_fails_the_call(self) -> None:
        reactor, upstream, a, _ = self.ask()
        reactor.child.exit(1)
        self.assertEqual(a.responses()[5]["error"]["code"], jsonrpc.SERVER_UNAVAILABLE)
        for m, _ in questions(a):
            send(upstream, a, jsonrpc.result(m["id"], answer_for(m)))
        reactor.advance(1)
        self.assertEqual(held(reactor.child, "tools/call"), [])

    def test_detach_during_a_round_forgets_it(self) -> None:
        _, upstream, a, _ = self.ask()
        upstream.detach(a)
        self.assertEqual(upstream._rounds, {})
        self.assertEqual(upstream.in_flight, 0)


class ListenTests(SynchronousTestCase):
    def listens(self, child: FakeChild) -> list[Message]:
        return child.requests("subscriptions/listen")

    def cancelled(self, child: FakeChild) -> list[Any]:
        return [m["params"]["requestId"] for m in child.notifications("notifications/cancelled")]

    def test_listen_opened_for_the_first_session_era_client(self) -> None:
        reactor = ModernReactor()
        upstream = make(reactor)
        upstream.attach(FakeSession("s", stateless=True))
        self.assertEqual(self.listens(reactor.child), [], "stateless clients listen for themselves")
        upstream.attach(FakeSession("a"))
        [listen] = self.listens(reactor.child)
        self.assertEqual(listen["params"]["notifications"], {"toolsListChanged": True})
        self.assertEqual(listen["params"]["_meta"][era.META_VERSION], era.MODERN)

    def test_no_listen_when_nothing_is_declared(self) -> None:
        reactor = ModernReactor(discover={**DISCOVER, "capabilities": {"tools": {}}})
        make(reactor)
        self.assertEqual(self.listens(reactor.child), [])

    def test_subscribe_reopens_the_listen_once_per_set(self) -> None:
        reactor, upstream, a = one_client()
        b = FakeSession("b")
        upstream.attach(b)
        initialize(upstream, b)
        child = reactor.child
        [opened] = self.listens(child)
        send(upstream, a, jsonrpc.request(1, "resources/subscribe", {"uri": "r://1"}))
        self.assertEqual(a.responses()[1]["result"], {})
        self.assertEqual(child.requests("resources/subscribe"), [])
        _, second = self.listens(child)
        self.assertEqual(self.cancelled(child), [opened["id"]])
        self.assertEqual(
            second["params"]["notifications"],
            {"toolsListChanged": True, "resourceSubscriptions": ["r://1"]},
        )
        # Another subscriber of the same resource: the stream stays as it is.
        send(upstream, b, jsonrpc.request(1, "resources/subscribe", {"uri": "r://1"}))
        self.assertEqual(b.responses()[1]["result"], {})
        self.assertEqual(len(self.listens(child)), 2)
        # A new resource: reopened with both.
        send(upstream, b, jsonrpc.request(2, "resources/subscribe", {"uri": "r://0"}))
        third = self.listens(child)[-1]
        self.assertEqual(
            third["params"]["notifications"]["resourceSubscriptions"], ["r://0", "r://1"]
        )
        self.assertEqual(self.cancelled(child), [opened["id"], second["id"]])
        # r://1 is still wanted by b when a leaves it.
        send(upstream, a, jsonrpc.request(2, "resources/unsubscribe", {"uri": "r://1"}))
        self.assertEqual(len(self.listens(child)), 3)
        # The last subscriber leaves: reopened without it.
        send(upstream, b, jsonrpc.request(3, "resources/unsubscribe", {"uri": "r://1"}))
        self.assertEqual(b.responses()[3]["result"], {})
        fourth = self.listens(child)[-1]
        self.assertEqual(fourth["params"]["notifications"]["resourceSubscriptions"], ["r://0"])
        self.assertEqual(self.cancelled(child)[-1], third["id"])
        self.assertEqual(child.requests("resources/unsubscribe"), [])

    def test_last_unsubscribe_closes_a_stream_with_nothing_else_to_follow(self) -> None:
        reactor = ModernReactor(
            discover={**DISCOVER, "capabilities": {"resources": {"subscribe": True}}}
        )
        upstream = make(reactor)
        a = FakeSession("a")
        upstream.attach(a)
        initialize(upstream, a)
        child = reactor.child
        self.assertEqual(self.listens(child), [])
        send(upstream, a, jsonrpc.request(1, "resources/subscribe", {"uri": "r://1"}))
        [listen] = self.listens(child)
        self.assertEqual(listen["params"]["notifications"], {"resourceSubscriptions": ["r://1"]})
        send(upstream, a, jsonrpc.request(2, "resources/unsubscribe", {"uri": "r://1"}))
        self.assertEqual(self.cancelled(child), [listen["id"]])
        self.assertEqual(len(self.listens(child)), 1)

    def test_subscribe_without_uri_refused(self) -> None:
        reactor, upstream, a = one_client()
        send(upstream, a, jsonrpc.request(1, "resources/subscribe", {}))
        self.assertEqual(a.responses()[1]["error"]["code"], jsonrpc.INVALID_PARAMS)
        self.assertEqual(len(self.listens(reactor.child)), 1)

    def test_resources_not_asked_for_when_the_child_has_no_subscribe(self) -> None:
        reactor = ModernReactor(
            discover={**DISCOVER, "capabilities": {"tools": {"listChanged": True}}}
        )
        upstream = make(reactor)
        a = FakeSession("a")
        upstream.attach(a)
        initialize(upstream, a)
        send(upstream, a, jsonrpc.request(1, "resources/subscribe", {"uri": "r://1"}))
        self.assertEqual(a.responses()[1]["result"], {})
        [listen] = self.listens(reactor.child)
        self.assertEqual(listen["params"]["notifications"], {"toolsListChanged": True})
        self.assertEqual(self.cancelled(reactor.child), [], "nothing to reopen it for")

    def test_the_last_subscriber_leaving_reopens(self) -> None:
        reactor, upstream, a = one_client()
        upstream.attach(FakeSession("b"))
        send(upstream, a, jsonrpc.request(1, "resources/subscribe", {"uri": "r://1"}))
        before = self.listens(reactor.child)[-1]
        upstream.detach(a)
        after = self.listens(reactor.child)[-1]
        self.assertNotEqual(after["id"], before["id"])
        self.assertNotIn("resourceSubscriptions", after["params"]["notifications"])
        self.assertEqual(self.cancelled(reactor.child)[-1], before["id"])

    def test_the_last_session_era_client_leaving_closes_the_listen(self) -> None:
        reactor, upstream, a = one_client()
        [listen] = self.listens(reactor.child)
        upstream.detach(a)
        self.assertEqual(self.listens(reactor.child), [listen])
        self.assertEqual(self.cancelled(reactor.child), [listen["id"]])

    def test_the_last_subscriber_leaving_sends_no_removed_method(self) -> None:
        """resources/unsubscribe does not exist in 2026-07-28: the child never gets it."""
        reactor, upstream, a = one_client()
        send(upstream, a, jsonrpc.request(1, "resources/subscribe", {"uri": "r://1"}))
        upstream.detach(a)
        self.assertEqual(reactor.child.requests("resources/unsubscribe"), [])

    def test_restart_reopens_with_the_subscriptions(self) -> None:
        reactor, upstream, a = one_client()
        send(upstream, a, jsonrpc.request(1, "resources/subscribe", {"uri": "r://1"}))
        reactor.child.exit(1)
        reactor.advance(1)
        child = reactor.child
        self.assertEqual(len(reactor.children), 2)
        [listen] = self.listens(child)
        self.assertEqual(
            listen["params"]["notifications"],
            {"toolsListChanged": True, "resourceSubscriptions": ["r://1"]},
        )
        # No cancellation of the old child's stream is sent to the new one.
        self.assertEqual(self.cancelled(child), [])

    def notify(self, child: FakeChild, method: str, subscription: Any, **params: Any) -> None:
        params["_meta"] = {era.META_SUBSCRIPTION: subscription}
        child.send(jsonrpc.notification(method, params))

    def test_list_changed_to_every_session_without_the_subscription_id(self) -> None:
        reactor, upstream, a = one_client()
        b = FakeSession("b")
        upstream.attach(b)
        initialize(upstream, b)
        child = reactor.child
        [listen] = self.listens(child)
        self.notify(
            child,
            "notifications/subscriptions/acknowledged",
            listen["id"],
            notifications={"toolsListChanged": True},
        )
        self.notify(child, "notifications/tools/list_changed", listen["id"])
        for s in (a, b):
            self.assertEqual(
                [m for m, _ in s.got if "method" in m],
                [{"jsonrpc": "2.0", "method": "notifications/tools/list_changed", "params": {}}],
            )

    def test_other_meta_of_a_notification_stays(self) -> None:
        reactor, _, a = one_client()
        [listen] = self.listens(reactor.child)
        reactor.child.send(
            jsonrpc.notification(
                "notifications/tools/list_changed",
                {"_meta": {era.META_SUBSCRIPTION: listen["id"], "x/y": 1}},
            )
        )
        [changed] = a.notifications("notifications/tools/list_changed")
        self.assertEqual(changed["params"], {"_meta": {"x/y": 1}})

    def test_resource_updates_only_to_subscribers(self) -> None:
        reactor, upstream, a = one_client()
        b = FakeSession("b")
        upstream.attach(b)
        initialize(upstream, b)
        send(upstream, a, jsonrpc.request(1, "resources/subscribe", {"uri": "r://1"}))
        listen = self.listens(reactor.child)[-1]
        self.notify(reactor.child, "notifications/resources/updated", listen["id"], uri="r://1")
        [updated] = a.notifications("notifications/resources/updated")
        self.assertEqual(updated["params"], {"uri": "r://1"})
        self.assertEqual(b.got[1:], [])

    def test_acknowledgement_of_a_replaced_stream_reaches_nobody(self) -> None:
        """Two subscriptions in a row: the first stream's acknowledgement, written by the
        child before it read the cancellation, is not passed on either."""
        reactor, upstream, a = one_client()
        send(upstream, a, jsonrpc.request(1, "resources/subscribe", {"uri": "r://1"}))
        send(upstream, a, jsonrpc.request(2, "resources/subscribe", {"uri": "r://2"}))
        _, replaced, current = self.listens(reactor.child)
        for listen in (replaced, current):
            self.notify(
                reactor.child,
                "notifications/subscriptions/acknowledged",
                listen["id"],
                notifications=listen["params"]["notifications"],
            )
        self.assertEqual([m for m, _ in a.got if "method" in m], [])

    def test_stateless_listen_gets_its_own_notifications(self) -> None:
        """A stateless client's own listen goes to the child as it is, and its
        notifications come back to it alone, with its own id."""
        reactor, upstream, a = one_client()
        s = FakeSession("s", stateless=True)
        upstream.attach(s)
        message = modern_request(
            "L-7", "subscriptions/listen", {"notifications": {"toolsListChanged": True}}
        )
        send(upstream, s, copy.deepcopy(message))
        upstream.pause_timer(s, "L-7")
        theirs = self.listens(reactor.child)[-1]
        self.assertEqual(theirs["params"], message["params"])
        self.notify(
            reactor.child,
            "notifications/subscriptions/acknowledged",
            theirs["id"],
            notifications={"toolsListChanged": True},
        )
        self.notify(reactor.child, "notifications/tools/list_changed", theirs["id"])
        got = [(m["method"], m["params"]["_meta"], related) for m, related in s.got]
        self.assertEqual(
            got,
            [
                ("notifications/subscriptions/acknowledged", {era.META_SUBSCRIPTION: "L-7"}, "L-7"),
                ("notifications/tools/list_changed", {era.META_SUBSCRIPTION: "L-7"}, "L-7"),
            ],
        )
        self.assertEqual([m for m, _ in a.got if "method" in m], [])
        # It lasts: no timeout.
        reactor.advance(upstream.server.request_timeout * 2)
        self.assertNotIn("L-7", s.responses())

    def test_renewal_does_not_wait_for_a_listen_stream(self) -> None:
        """A child renewed with new settings (a principal's new credentials)
        restarts once the calls it works on are answered: a stateless
        client's listen stream, which never ends, does not hold it back; it
        ends with the old child, and the call sent meanwhile goes to the new one."""
        reactor, upstream, _ = one_client()
        s = FakeSession("s", stateless=True)
        upstream.attach(s)
        listen = {"notifications": {"toolsListChanged": True}}
        send(upstream, s, modern_request("L-7", "subscriptions/listen", listen))
        upstream.pause_timer(s, "L-7")
        send(upstream, s, modern_request("C-1", "tools/call", {"name": "t"}))
        old = reactor.child
        upstream.renew(attrs.evolve(upstream.server, env={"TOKEN": "new"}))
        send(upstream, s, modern_request("C-2", "tools/call", {"name": "t"}))
        reactor.advance(0)
        self.assertFalse(old.stdin_is_closed, "C-1 is still in flight")
        [c1] = [m for m in old.held if m["method"] == "tools/call"]
        old.send(jsonrpc.result(c1["id"], {"content": []}))
        reactor.advance(0)
        self.assertTrue(old.stdin_is_closed)
        reactor.advance(10)
        new = reactor.child
        self.assertIsNot(new, old)
        self.assertEqual(new.env["TOKEN"], "new")
        self.assertEqual(len([m for m in new.held if m["method"] == "tools/call"]), 1)
        responses = s.responses()
        self.assertIn("result", responses["C-1"])
        self.assertEqual(responses["L-7"]["error"]["code"], jsonrpc.SERVER_UNAVAILABLE)
        self.assertNotIn("C-2", responses)

    def test_a_closed_stateless_listen_is_not_shown_to_session_clients(self) -> None:
        """Notifications the child still sends to a stateless client's listen stream
        after it closed go to nobody, and never to session-era clients."""
        reactor, upstream, a = one_client()
        s = FakeSession("s", stateless=True)
        upstream.attach(s)
        send(
            upstream,
            s,
            modern_request(
                "L-7", "subscriptions/listen", {"notifications": {"toolsListChanged": True}}
            ),
        )
        theirs = self.listens(reactor.child)[-1]
        upstream.detach(s)
        self.assertIn(theirs["id"], self.cancelled(reactor.child))
        self.notify(reactor.child, "notifications/tools/list_changed", theirs["id"])
        self.assertEqual([m for m, _ in a.got if "method" in m], [])
        self.assertEqual(s.got, [])


class Responder:
    def __init__(self) -> None:
        self.notified: list[Message] = []
        self.answers: list[tuple[Message, int]] = []

    def notify(self, message: Message) -> None:
        self.notified.append(message)

    def answer(self, message: Message, status: int = 200) -> None:
        self.answers.append((message, status))


class ModernCallTests(SynchronousTestCase):
    """A stateless call (ModernCall) on a modern child: its request and answers pass through."""

    def setUp(self) -> None:
        self.reactor = ModernReactor()
        self.backend = SharedBackend(server(), self.reactor, {})
        self.backend.startService()
        sink = StatelessSink()
        self.hub = ClientSession(
            id="hub-0001-aaaa",
            transport="stateless",
            backend=self.backend,
            sink=sink,
            last_active=0.0,
        )
        sink.session = self.hub
        self.hub.upstream = self.backend.open(self.hub)
        self.assertIsInstance(self.hub.upstream, ModernUpstream)

    def start(self, message: Message) -> tuple[ModernCall, Responder]:
        params = message.get("params") or {}
        headers = {
            "mcp-protocol-version": [era.MODERN],
            "mcp-method": [message["method"]],
            "mcp-name": [params["name"]] if "name" in params else [],
        }
        checked = era.check(copy.deepcopy(message), lambda name: headers.get(name, []))
        responder = Responder()
        call = ModernCall(self.hub, checked, responder, self.reactor, StateSigner(b"k" * 32), 300.0)
        call.start()
        return call, responder

    def test_request_and_input_required_pass_through(self) -> None:
        message = modern_request(41, "tools/call", {"name": "greet", "arguments": {}})
        _, responder = self.start(message)
        [request] = held(self.reactor.child, "tools/call")
        self.assertEqual(request["params"], message["params"])
        result = input_required(copy.deepcopy(GREET_QUESTIONS), "child-state")
        self.reactor.child.send(jsonrpc.result(request["id"], copy.deepcopy(result)))
        self.assertEqual(responder.answers, [(jsonrpc.result(41, result), 200)])

    def test_listen_notifications_get_the_clients_id(self) -> None:
        message = modern_request(
            "sub-1", "subscriptions/listen", {"notifications": {"toolsListChanged": True}}
        )
        _, responder = self.start(message)
        theirs = self.reactor.child.requests("subscriptions/listen")[-1]
        self.assertEqual(theirs["params"], message["params"])
        self.reactor.child.send(
            jsonrpc.notification(
                "notifications/tools/list_changed",
                {"_meta": {era.META_SUBSCRIPTION: theirs["id"]}},
            )
        )
        self.assertEqual(
            responder.notified,
            [
                jsonrpc.notification(
                    "notifications/tools/list_changed",
                    {"_meta": {era.META_SUBSCRIPTION: "sub-1"}},
                )
            ],
        )


class BackendTests(SynchronousTestCase):
    def test_modern_shared_one_modern_child(self) -> None:
        reactor = ModernReactor()
        backend = SharedBackend(server(), reactor, {})
        backend.startService()
        self.assertIsInstance(backend.upstream, ModernUpstream)
        self.assertIsNone(backend.modern)
        legacy, stateless = FakeSession("a"), FakeSession("s", stateless=True)
        self.assertIs(backend.open(legacy), backend.upstream)
        self.assertIs(backend.open(stateless), backend.upstream)
        self.assertEqual(len(reactor.children), 1)
        self.assertEqual(reactor.child.requests("initialize"), [])

    def test_dual_shared_a_child_for_each_era(self) -> None:
        reactor = ModernReactor()
        backend = SharedBackend(server(era="dual"), reactor, {})
        backend.startService()
        self.assertIs(type(backend.upstream), Upstream)
        self.assertIsInstance(backend.modern, ModernUpstream)
        assert backend.modern is not None
        self.assertEqual(backend.modern.label, "fake[2026]")
        self.assertIs(backend.open(FakeSession("a")), backend.upstream)
        self.assertIs(backend.open(FakeSession("s", stateless=True)), backend.modern)
        first, second = reactor.children
        self.assertEqual([m["method"] for m in first.requests()], ["initialize"])
        self.assertEqual(second.requests()[0]["method"], "server/discover")
        self.assertIn("modern_child", backend.status())

    def test_session_sharing_by_era(self) -> None:
        reactor = ModernReactor()
        dual = SessionBackend(server(era="dual", sharing="session"), reactor, {})
        modern = SessionBackend(server(era="modern", sharing="session"), reactor, {})
        for backend in (dual, modern):
            backend.startService()
        self.assertIs(type(dual.open(FakeSession("aaaaaaaa"))), Upstream)
        self.assertIsInstance(dual.open(FakeSession("ssssssss", stateless=True)), ModernUpstream)
        self.assertIsInstance(modern.open(FakeSession("bbbbbbbb")), ModernUpstream)
        self.assertIsInstance(modern.open(FakeSession("tttttttt", stateless=True)), ModernUpstream)


class ReviewRegressionTests(SynchronousTestCase):
    def test_log_lines_only_for_clients_that_asked(self) -> None:
        """The child logs only for requests that carried a level: a session-era
        client that set none sees none of another client's lines."""
        reactor, upstream, a = one_client()
        s = FakeSession("bob", stateless=True, log_level="debug")
        upstream.attach(s)
        send(upstream, s, modern_request(1, "tools/call", {"name": "secret", "arguments": {}}))
        line = {"level": "debug", "data": "bob's line"}
        reactor.child.send(jsonrpc.notification("notifications/message", line))
        self.assertEqual(a.notifications("notifications/message"), [])
        self.assertEqual(len(s.notifications("notifications/message")), 1)

    def test_stateless_requests_do_not_reopen_the_listen(self) -> None:
        reactor, upstream, _ = one_client()
        before = reactor.child.requests("subscriptions/listen")
        for i in range(5):
            s = FakeSession(f"s{i}", stateless=True)
            upstream.attach(s)
            send(upstream, s, modern_request(i, "tools/list"))
            [req] = held(reactor.child, "tools/list")
            reactor.child.held.remove(req)
            reactor.child.send(jsonrpc.result(req["id"], {"tools": []}))
            upstream.detach(s)
        self.assertEqual(reactor.child.requests("subscriptions/listen"), before)
        self.assertEqual(reactor.child.notifications("notifications/cancelled"), [])
