# -*- test-case-name: tests.test_cluster -*-
"""[cluster]: node ids, the cluster's keys, session ids and request states
that name their node, and key rotation."""

from __future__ import annotations

import string
from typing import Any
from unittest.mock import patch
from urllib.parse import urlsplit

import attrs
import orjson
from hypothesis import assume, given
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.cluster.keys import ClusterKeys, SessionIds
from mcptwist.config.load import parse_config
from mcptwist.config.model import ConfigError
from mcptwist.mcp import era, jsonrpc
from mcptwist.mcp.jsonrpc import Message
from mcptwist.routing.stateless import StateSigner
from mcptwist.web.forward import Forwarder

from .support.bridge import Service
from .support.children import FakeChild
from .support.cluster import KEY, Directory, TwoNodes, cluster_doc
from .support.messages import INIT, JSON, call

OTHER = "x" * 16 + "fedcba9876543210"
# A client's capabilities that declare the tasks extension.
TASKS = {"elicitation": {}, "extensions": {era.TASKS_EXTENSION: {}}}


def ids(node: str = "n1", *keys: str) -> SessionIds:
    return SessionIds(node, ClusterKeys([k.encode() for k in keys or (KEY,)]))


class ConfigTests(SynchronousTestCase):
    def error(self, **cluster: Any) -> ConfigError:
        return self.assertRaises(ConfigError, parse_config, cluster_doc(**cluster), "c.toml", {})

    def test_defaults(self) -> None:
        config = parse_config(cluster_doc(node_id="n1"), "c.toml", {})
        assert config.cluster is not None
        self.assertEqual(config.cluster.node_id, "n1")
        self.assertEqual(config.cluster.keys, (KEY.encode(),))
        self.assertIsNone(config.cluster.redis)
        self.assertNotIn(KEY, repr(config))
        self.assertIsNone(parse_config({"servers": {"s": {"command": "c"}}}, "c", {}).cluster)

    def test_node_id_from_hostname(self) -> None:
        config = parse_config(cluster_doc(), "c.toml", {})
        assert config.cluster is not None
        self.assertRegex(config.cluster.node_id, r"^[A-Za-z0-9_-]+$")

    def test_keys_from_the_environment(self) -> None:
        doc = cluster_doc(node_id="n1", keys=["${CLUSTER_KEY}"])
        config = parse_config(doc, "c.toml", {"CLUSTER_KEY": OTHER})
        assert config.cluster is not None
        self.assertEqual(config.cluster.keys, (OTHER.encode(),))

    def test_errors(self) -> None:
        for cluster, key, fix in (
            ({"node_id": "n.1"}, "cluster.node_id", "no dot"),
            ({"keys": []}, "cluster.keys", "token_urlsafe"),
            ({"keys": [KEY, "short"]}, "cluster.keys[1]", "token_urlsafe"),
            ({"redis": "http://h"}, "cluster.redis", "redis://"),
            ({"redis": "redis://h:6379/x"}, "cluster.redis", "redis://"),
            ({"redis": "redis://h:6379/0"}, "cluster.advertise", "advertise = "),
            ({"advertise": "http://h:1/path"}, "cluster.advertise", "no path"),
            ({"node_ttl": 3}, "cluster.node_ttl", "node_ttl = 10"),
            ({"colour": "red"}, "cluster.colour", "remove it"),
        ):
            error = self.error(**cluster)
            self.assertEqual(error.key, key, cluster)
            self.assertIn(fix, error.fix, cluster)
            self.assertIn("c.toml", str(error))

    def test_a_password_is_not_repeated(self) -> None:
        error = self.error(redis="redis://:hunter2-secret@h:99999/0")
        self.assertNotIn("hunter2", str(error))


class SessionIdTests(SynchronousTestCase):
    def test_without_a_cluster(self) -> None:
        plain = SessionIds()
        made = plain.new()
        self.assertNotIn(".", made)
        self.assertIsNone(plain.owner(made))
        self.assertNotEqual(made, plain.new())

    def test_never_read_as_an_option(self) -> None:
        """One id in 64 would begin with a dash, which a command line
        (C{mcptwist admin close ID}) takes for an option."""
        plain = SessionIds()
        with patch("secrets.token_urlsafe", side_effect=["-abc", "_abc"]):
            self.assertEqual(plain.new(), "_abc")

    def test_names_its_node(self) -> None:
        made = ids("n1").new()
        node, random, _ = made.split(".")
        self.assertEqual(node, "n1")
        self.assertGreaterEqual(len(random), 32)
        self.assertEqual(ids("n2").owner(made), "n1", "every node tells whose it is")
        self.assertIsNone(ids("n2", OTHER).owner(made), "another cluster's key does not")

    def test_rotation(self) -> None:
        """The first key signs, all verify: an id made before a rotation
        stays genuine while its key is listed."""
        old = ids("n1", KEY).new()
        rotated = ids("n1", OTHER, KEY)
        self.assertEqual(rotated.owner(old), "n1")
        new = rotated.new()
        self.assertIsNone(ids("n1", KEY).owner(new))
        self.assertIsNone(ids("n1", OTHER).owner(old), "dropped: unknown")

    @given(st.data())
    def test_any_alteration_is_unknown(self, data: st.DataObject) -> None:
        made = ids("n1").new()
        i = data.draw(st.integers(0, len(made) - 1))
        c = data.draw(st.sampled_from(string.ascii_letters + string.digits + "-_."))
        altered = made[:i] + c + made[i + 1 :]
        assume(altered != made)
        self.assertIsNone(ids("n2").owner(altered))

    @given(st.text(max_size=300))
    def test_forgeries_are_unknown(self, text: str) -> None:
        self.assertIsNone(ids("n2").owner(text))
        self.assertIsNone(ids("n2").owner("n1." + text))


class StateTests(SynchronousTestCase):
    def signer(self, node: str = "n1", *keys: str) -> StateSigner:
        return StateSigner(node=node, keys=ClusterKeys([k.encode() for k in keys or (KEY,)]))

    def test_names_its_node(self) -> None:
        state = self.signer("n1").sign('{"p": 1}')
        self.assertTrue(state.startswith("n1."))
        self.assertEqual(self.signer("n1").verify(state), '{"p": 1}')
        other = self.signer("n2")
        self.assertIsNone(other.verify(state), "its parked call is not on n2")
        self.assertEqual(other.owner(state), "n1")

    def test_forged_and_rotated(self) -> None:
        state = self.signer("n1").sign('{"p": 1}')
        node, body, mac = state.split(".")
        for forged in (f"n2.{body}.{mac}", f"n1.{body}x.{mac}", f"{node}.{body}", state + "."):
            self.assertIsNone(self.signer("n2").owner(forged), forged)
            self.assertIsNone(self.signer("n1").verify(forged), forged)
        rotated = self.signer("n1", OTHER, KEY)
        self.assertEqual(rotated.verify(state), '{"p": 1}')
        self.assertIsNone(StateSigner().verify(state), "a node without the cluster's keys")

    @given(st.text(max_size=300))
    def test_forgeries(self, text: str) -> None:
        self.assertIsNone(self.signer("n2").owner(text))
        self.assertIsNone(self.signer("n1").verify(text))


class NodeTests(SynchronousTestCase):
    """A node's sessions, as its clients see them."""

    def setUp(self) -> None:
        self.config = parse_config(cluster_doc(node_id="n1"), "c.toml", {})
        self.bridge = Service(self, self.config)

    def post(self, session: str) -> int:
        headers = {**JSON, "mcp-session-id": session}
        return self.bridge.exchange("POST", "/servers/s/mcp", jsonrpc.request(2, "ping"), headers)[
            0
        ]

    def test_session_ids_name_the_node(self) -> None:
        session = self.bridge.open_session(init=INIT)
        self.assertTrue(session.startswith("n1."))
        self.assertEqual(self.post(session), 200)

    def test_unknown_ids(self) -> None:
        """Another node's genuine id, and any forged or altered id: 404."""
        session = self.bridge.open_session(init=INIT)
        _, random, mac = session.split(".")
        other = ids("n2").new()
        altered = mac[:-1] + ("A" if mac[-1] != "A" else "B")
        for unknown in (other, f"n2.{random}.{mac}", f"n1.{random}.{altered}", random):
            self.assertEqual(self.post(unknown), 404, unknown)

    def test_rotation_by_reload(self) -> None:
        """A reload adds a key: sessions go on, new ids are signed with it;
        the node id cannot change by a reload."""
        session = self.bridge.open_session(init=INIT)
        rotated = parse_config(cluster_doc(node_id="n1", keys=[OTHER, KEY]), "c.toml", {})
        service = self.bridge.service
        self.successResultOf(Deferred.fromCoroutine(service.apply(rotated)))
        self.assertEqual(self.post(session), 200)
        new = self.bridge.open_session(init=INIT)
        self.assertEqual(ids("n9", OTHER).owner(new), "n1")
        renamed = attrs.evolve(rotated, cluster=attrs.evolve(rotated.cluster, node_id="n2"))
        failure = self.failureResultOf(Deferred.fromCoroutine(service.apply(renamed)))
        self.assertIn("node_id", str(failure.value))


class DrainTests(SynchronousTestCase):
    """A node drains: health says so, its sessions go on until they end (or
    drain_timeout), then it stops."""

    def setUp(self) -> None:
        doc = {**cluster_doc(node_id="n1"), "drain_timeout": 5}
        self.bridge = Service(self, parse_config(doc, "c.toml", {}))
        self.reactor = self.bridge.reactor

    def health(self) -> tuple[int, Any]:
        status, _, body = self.bridge.exchange("GET", "/health")
        return status, body

    def ping(self, session: str) -> int:
        headers = {**JSON, "mcp-session-id": session}
        return self.bridge.exchange("POST", "/servers/s/mcp", jsonrpc.request(9, "ping"), headers)[
            0
        ]

    def test_sessions_go_on_until_they_end(self) -> None:
        session = self.bridge.open_session(init=INIT)
        self.assertEqual(self.health()[0], 200)
        drained = self.bridge.service.drain("test")
        status, body = self.health()
        self.assertEqual((status, body["status"]), (503, "draining"))
        self.assertEqual(self.ping(session), 200, "a session held goes on")
        self.reactor.advance(2)
        self.assertNoResult(drained)
        self.bridge.exchange("DELETE", "/servers/s/mcp", None, {"mcp-session-id": session})
        self.reactor.advance(1)
        self.successResultOf(drained)

    def test_drain_timeout(self) -> None:
        session = self.bridge.open_session(init=INIT)
        stopping = self.bridge.service.stopService()
        self.assertEqual(self.health()[0], 503)
        self.reactor.advance(4)
        self.assertEqual(self.ping(session), 200, "still served while draining")
        self.assertNoResult(stopping)
        self.reactor.advance(1)
        self.reactor.advance(10)
        self.successResultOf(stopping)
        self.assertFalse(self.bridge.service.registry.sessions)

    def test_a_call_in_flight_is_not_cut(self) -> None:
        """Past drain_timeout an idle session ends, while one whose call is
        being answered ends once it is answered; a new session meanwhile is
        refused with 503 (the balancer tries another node)."""
        idle = self.bridge.open_session(init=INIT)
        busy = self.bridge.open_session(init=INIT)
        [child] = self.reactor.children
        child.hold = True
        treq: Any = self.bridge.client
        call = jsonrpc.request(5, "tools/call", {"name": "echo", "arguments": {}})
        d = treq.request(
            "POST",
            "http://127.0.0.1/servers/s/mcp",
            data=jsonrpc.dumps(call),
            headers={**JSON, "mcp-session-id": busy},
        )
        treq.flush()
        stopping = self.bridge.service.stopService()
        response = self.bridge.request("POST", "/servers/s/mcp", INIT, JSON)
        self.assertEqual(response.code, 503)
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["1"])
        self.reactor.advance(5.5)
        self.assertEqual(self.ping(idle), 404, "idle: ended at drain_timeout")
        self.assertNoResult(stopping)
        [held] = [m for m in child.held if m["method"] == "tools/call"]
        child.hold = False
        child.answer(held)
        treq.flush()
        self.assertEqual(self.successResultOf(d).code, 200, "the call was answered")
        self.reactor.advance(1)
        self.reactor.advance(10)
        self.successResultOf(stopping)

    def test_admin_drain_then_stop(self) -> None:
        stopped: list[bool] = []
        self.reactor.running = True  # type: ignore[attr-defined]
        self.reactor.stop = lambda: stopped.append(True)  # type: ignore[attr-defined]
        session = self.bridge.open_session(init=INIT)
        status, _, body = self.bridge.exchange("POST", "/admin/drain", None, JSON)
        self.assertEqual(status, 202, body)
        self.assertEqual(body["sessions"], 1)
        self.assertFalse(body["already"])
        self.assertEqual(
            self.bridge.exchange("POST", "/admin/drain", None, JSON)[2]["already"], True
        )
        self.assertEqual(self.ping(session), 200)
        self.reactor.advance(5)
        self.assertEqual(stopped, [True])


class ForwardTests(TwoNodes):
    """A 2026-07-28 retry that reaches a node other than the one whose call
    waits for it is forwarded there, once."""

    def asked(self) -> tuple[FakeChild, Message, str]:
        """A call on n1 whose child asks its client a question: the child, the
        call as the child got it, and the requestState."""
        d = self.post(self.n1, call(1))
        [child] = self.n1.reactor.children
        [held] = [m for m in child.held if m["method"] == "tools/call"]
        question = {"message": "Your name?", "requestedSchema": {}}
        child.send(jsonrpc.request("q", "elicitation/create", question))
        self.n1.reactor.advance(0.1)
        status, body = self.answer(self.n1, d)
        self.assertEqual(status, 200, body)
        state = body["result"]["requestState"]
        self.assertTrue(state.startswith("n1."))
        return child, held, state

    def retry(self, state: str) -> Message:
        answers = {"q": {"action": "accept", "content": {"name": "Ada"}}}
        return call(2, requestState=state, inputResponses=answers)

    def test_retry_on_another_node(self) -> None:
        child, held, state = self.asked()
        d = self.post(self.n2, self.retry(state))
        self.flush()
        [answer] = [m for m in child.received if m.get("id") == "q" and "method" not in m]
        self.assertEqual(answer["result"]["content"], {"name": "Ada"})
        child.answer(held)
        status, body = self.answer(self.n2, d)
        self.assertEqual((status, body["id"]), (200, 2), body)
        self.assertEqual(body["result"]["resultType"], "complete")
        [own] = self.n2.reactor.children
        self.assertEqual(own.requests("tools/call"), [], "n2's child never saw it")

    def test_owner_gone(self) -> None:
        """A state of a node the registry does not know: the error for a lost state."""
        _, _, state = self.asked()
        forwarder = self.n2.service.web.forwarder
        assert forwarder is not None
        forwarder.directory = Directory({})
        status, body = self.answer(self.n2, self.post(self.n2, self.retry(state)))
        self.assertEqual((status, body["error"]["code"]), (400, jsonrpc.INVALID_PARAMS))
        self.assertIn("send the request again without it", body["error"]["message"])

    def test_forwarded_once(self) -> None:
        """A genuine hop is never forwarded again; a forged hop is ignored."""
        child, held, state = self.asked()
        retry = self.retry(state)
        forwarder = self.n2.service.web.forwarder
        assert forwarder is not None
        n3 = Forwarder("n3", ClusterKeys([KEY.encode()]), self.n2.reactor)
        hop = n3.hop(jsonrpc.dumps(retry)).decode()
        status, body = self.answer(self.n2, self.post(self.n2, retry, **{"mcp-twist-hop": hop}))
        self.assertEqual((status, body["error"]["code"]), (400, jsonrpc.INVALID_PARAMS))
        # A forged hop: the client's own request, forwarded to n1 as any other.
        d = self.post(self.n2, retry, **{"mcp-twist-hop": "n3.1.AAAA"})
        self.flush()
        child.answer(held)
        status, body = self.answer(self.n2, d)
        self.assertEqual((status, body["result"]["resultType"]), (200, "complete"))

    def test_forged_state(self) -> None:
        """A state no node of this cluster made is invalid; nothing is forwarded."""
        _, _, state = self.asked()
        _, body, mac = state.split(".")
        forwarder = self.n2.service.web.forwarder
        assert forwarder is not None
        asked: list[str] = []
        forwarder.directory = Directory({})
        forwarder.directory.address = lambda node: asked.append(node) or succeed(None)  # type: ignore[method-assign]
        for forged in (f"n1.{body}.{mac[:-2]}AA", f"n1.{body[:-1]}.{mac}", ids("n1", OTHER).new()):
            status, _ = self.answer(self.n2, self.post(self.n2, self.retry(forged)))
            self.assertEqual(status, 400, forged)
        self.assertEqual(asked, [], "nothing was forwarded")


class TaskForwardTests(TwoNodes):
    """A task lives on the node that accepted it: its id names that node, and
    another node sends the task's requests there."""

    server = {"command": "fake", "task_tools": ["echo"]}

    def task_request(self, id: int, method: str, task_id: str) -> Message:
        message = call(id)
        message["method"] = method
        message["params"] = {"_meta": message["params"]["_meta"], "taskId": task_id}
        return message

    def test_a_task_through_another_node(self) -> None:
        message = call(1)
        message["params"]["_meta"][era.META_CAPABILITIES] = TASKS
        status, body = self.answer(self.n1, self.post(self.n1, message))
        self.assertEqual(status, 200, body)
        task_id = body["result"]["taskId"]
        self.assertTrue(task_id.startswith("n1."), task_id)
        get = self.task_request(2, "tasks/get", task_id)
        get["params"]["_meta"][era.META_CAPABILITIES] = TASKS
        status, body = self.answer(self.n2, self.post(self.n2, get, **{"mcp-name": task_id}))
        self.assertEqual((status, body["result"]["status"]), (200, "working"), body)
        cancel = self.task_request(3, "tasks/cancel", task_id)
        cancel["params"]["_meta"][era.META_CAPABILITIES] = TASKS
        self.answer(self.n2, self.post(self.n2, cancel, **{"mcp-name": task_id}))
        [child] = self.n1.reactor.children
        [cancelled] = child.notifications("notifications/cancelled")
        [held] = [m for m in child.held if m["method"] == "tools/call"]
        self.assertEqual(cancelled["params"]["requestId"], held["id"])
        [own] = self.n2.reactor.children
        self.assertEqual(own.requests("tools/call"), [], "n2's child never saw it")

    def test_a_task_of_a_node_that_is_gone(self) -> None:
        """An id naming a node the registry does not know: an unknown task."""
        get = self.task_request(2, "tasks/get", "n9.abcdef")
        get["params"]["_meta"][era.META_CAPABILITIES] = TASKS
        status, body = self.answer(self.n2, self.post(self.n2, get, **{"mcp-name": "n9.abcdef"}))
        self.assertEqual((status, body["error"]["code"]), (200, jsonrpc.INVALID_PARAMS), body)
        self.assertIn("no task 'n9.abcdef'", body["error"]["message"])


class Nodes:
    """An HTTP client that reaches each in-memory node by its host name."""

    def __init__(self, stubs: dict[str, StubTreq]) -> None:
        self.stubs = stubs

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        host = urlsplit(url).hostname
        assert host is not None
        return self.stubs[host].request(method, url, **kwargs)  # type: ignore[no-any-return]

    def content(self, response: Any) -> Deferred[bytes]:
        return next(iter(self.stubs.values())).content(response)  # type: ignore[no-any-return]

    def collect(self, response: Any, collector: Any) -> Deferred[None]:
        return next(iter(self.stubs.values())).collect(response, collector)  # type: ignore[no-any-return]

    def flush(self) -> None:
        for stub in self.stubs.values():
            stub.flush()


class NodeAdminTests(SynchronousTestCase):
    """An admin request for one node of the cluster, or for all of them."""

    def setUp(self) -> None:
        self.n1 = Service(self, parse_config(cluster_doc(node_id="n1"), "c", {}))
        self.n2 = Service(self, parse_config(cluster_doc(node_id="n2"), "c", {}))
        self.nodes = Nodes(
            {"n1": StubTreq(self.n1.service.resource), "n2": StubTreq(self.n2.service.resource)}
        )
        for service in (self.n1, self.n2):
            forwarder = service.service.web.forwarder
            assert forwarder is not None
            forwarder.directory = Directory({"n1": "http://n1", "n2": "http://n2"})
            forwarder._client = self.nodes  # type: ignore[assignment]

    def ask(self, method: str, path: str) -> tuple[int, Any]:
        treq: Any = self.n1.client
        d = treq.request(method, "http://127.0.0.1" + path, headers=JSON)
        for _ in range(3):
            treq.flush()
            self.nodes.flush()
        response = self.successResultOf(d)
        d = treq.content(response)
        treq.flush()
        return response.code, orjson.loads(self.successResultOf(d))

    def test_one_node(self) -> None:
        [c1], [c2] = self.n1.reactor.children, self.n2.reactor.children
        status, body = self.ask("POST", "/admin/nodes/n2/servers/s/restart")
        self.assertEqual(status, 200, body)
        self.n2.reactor.advance(10)
        self.assertTrue(c2.exited, "n2's child restarted")
        self.assertFalse(c1.exited, "n1's did not")
        status, body = self.ask("GET", "/admin/nodes/n2/servers/s")
        self.assertEqual((status, body["name"]), (200, "s"))

    def test_all_nodes(self) -> None:
        status, body = self.ask("GET", "/admin/nodes/all/servers")
        self.assertEqual(status, 200)
        self.assertEqual(sorted(body["nodes"]), ["n1", "n2"])
        for answer in body["nodes"].values():
            self.assertEqual(answer["status"], 200)
            self.assertEqual([s["name"] for s in answer["body"]["servers"]], ["s"])

    def test_unknown_node(self) -> None:
        status, body = self.ask("GET", "/admin/nodes/n9/servers")
        self.assertEqual(status, 404)
        self.assertIn("n9", body["error"]["message"])

    def test_not_in_a_cluster(self) -> None:
        plain = Service(self, parse_config({"servers": {"s": {"command": "c"}}}, "c", {}))
        status, _, body = plain.exchange("GET", "/admin/nodes/all/servers")
        self.assertEqual(status, 404)
        self.assertIn("not part of a cluster", body["error"]["message"])

    def test_a_forwarded_request_is_not_sent_on(self) -> None:
        forwarder = self.n2.service.web.forwarder
        assert forwarder is not None
        hop = forwarder.hop(b"").decode()
        status, _, body = self.n1.exchange(
            "GET", "/admin/nodes/n2/servers", None, {**JSON, "mcp-twist-hop": hop}
        )
        self.assertEqual(status, 400, body)
