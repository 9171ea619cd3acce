# -*- test-case-name: tests.test_cluster_listen -*-
"""A listen stream that follows tasks held on other nodes of a cluster."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import formatEvent, globalLogPublisher

from mcptwist.cluster.keys import ClusterKeys
from mcptwist.mcp import era, jsonrpc
from mcptwist.mcp.jsonrpc import Message
from mcptwist.security.auth import hash_token
from mcptwist.web.forward import Forwarder
from mcptwist.web.remote_tasks import ACK_WAIT, hop_listen

from .support.bridge import Service
from .support.cluster import KEY, Directory, TwoNodes
from .support.messages import ACCEPT_BOTH, events, headers, modern

TASKS = {"extensions": {era.TASKS_EXTENSION: {}}}
ALICE, BOB = "Bearer mcpt_alice", "Bearer mcpt_bob"
ACKNOWLEDGED = "notifications/subscriptions/acknowledged"


def token(name: str) -> dict[str, Any]:
    return {"name": name, "hash": "sha256:" + hash_token(f"mcpt_{name}").hex()}


def statuses(messages: list[Message]) -> list[tuple[str, str]]:
    return [
        (m["params"]["taskId"], m["params"]["status"])
        for m in messages
        if m.get("method") == "notifications/tasks"
    ]


class Silent:
    """An HTTP client whose requests are never answered (a node that hangs)."""

    def __init__(self) -> None:
        self.cancelled: list[str] = []

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        return Deferred(lambda _: self.cancelled.append(url))


class ListenTests(TwoNodes):
    """A listen stream on n2 whose filter names tasks held on n1 (and on n2)."""

    server = {"command": "fake", "task_tools": ["echo"]}

    def document(self, node: str) -> dict[str, Any]:
        doc = super().document(node)
        doc["servers"]["t"] = {"command": "fake"}
        doc["endpoints"] = {"team": {"servers": ["s", "t"]}}
        doc["auth"] = {"tokens": [token("alice"), token("bob")]}
        return doc

    def setUp(self) -> None:
        super().setUp()
        self.logged: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_namespace") == "mcptwist.cluster":
                self.logged.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def task(self, node: Service, who: str = ALICE) -> str:
        """A task of C{who} on C{node}: its id."""
        message = modern(1, "tools/call", {"name": "echo", "arguments": {}}, TASKS)
        status, body = self.answer(node, self.post(node, message, authorization=who))
        self.assertEqual(status, 200, body)
        task_id: str = body["result"]["taskId"]
        return task_id

    def listen(
        self, task_ids: list[str], who: str = ALICE, path: str = "/servers/s/mcp"
    ) -> tuple[Any, list[bytes]]:
        """A listen stream on n2: its response and the chunks read from it."""
        message = modern(
            "L", "subscriptions/listen", {"notifications": {"taskIds": task_ids}}, TASKS
        )
        treq: Any = self.n2.client
        d = treq.request(
            "POST",
            "http://127.0.0.1" + path,
            data=jsonrpc.dumps(message),
            headers=headers(message, ACCEPT_BOTH, authorization=who),
        )
        self.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/event-stream"])
        return response, self.n2.stream(response)

    def seen(self, chunks: list[bytes]) -> list[Message]:
        self.flush()
        return events(chunks)

    def finish(self, node: Service) -> None:
        """Every call held by node's children answered."""
        for child in node.reactor.children:
            for held in [m for m in child.held if m["method"] == "tools/call"]:
                child.held.remove(held)
                child.answer(held)
        self.flush()

    def hop_streams(self, node: Service) -> list[Any]:
        return [c for c in node.service.web.heartbeat.connections if c.label.endswith("(hop)")]

    def test_a_task_on_another_node(self) -> None:
        """The stream on n2 agrees n1's task with its own, in the order asked,
        and carries both tasks' notifications, n1's tagged with the stream's id."""
        there, here = self.task(self.n1), self.task(self.n2)
        _, chunks = self.listen([there, "n1.unknown", here, "n9.gone"])
        first, *rest = self.seen(chunks)
        self.assertEqual(first["method"], ACKNOWLEDGED)
        self.assertEqual(first["params"]["notifications"], {"taskIds": [there, here]})
        self.assertEqual(first["params"]["_meta"], {era.META_SUBSCRIPTION: "L"})
        self.assertEqual(sorted(statuses(rest)), sorted([(there, "working"), (here, "working")]))
        self.assertEqual(len(self.hop_streams(self.n1)), 1)
        self.finish(self.n1)
        seen = self.seen(chunks)
        self.assertEqual(statuses(seen)[-1], (there, "completed"))
        last = seen[-1]["params"]
        self.assertEqual(last["_meta"], {era.META_SUBSCRIPTION: "L"})
        self.assertEqual(last["result"]["content"][0]["type"], "text")
        # Every task of n1 it followed ended: the hop is closed; n2's stream goes on.
        self.assertEqual(self.hop_streams(self.n1), [])
        self.finish(self.n2)
        self.assertEqual(statuses(self.seen(chunks))[-1], (here, "completed"))
        self.assertIn("n9", " ".join(self.logged))

    def test_on_an_endpoint(self) -> None:
        there = self.task(self.n1)
        _, chunks = self.listen([there], path="/endpoints/team/mcp")
        [ack, working] = self.seen(chunks)
        self.assertEqual(ack["params"]["notifications"]["taskIds"], [there])
        self.assertEqual(statuses([working]), [(there, "working")])
        self.finish(self.n1)
        self.assertEqual(statuses(self.seen(chunks))[-1], (there, "completed"))

    def test_another_principals_task_is_not_agreed(self) -> None:
        """The hop carries the client's own credentials: n1 judges them."""
        there = self.task(self.n1)
        _, chunks = self.listen([there], who=BOB)
        [ack] = self.seen(chunks)
        self.assertEqual(ack["params"]["notifications"], {})
        self.assertEqual(self.hop_streams(self.n1), [], "nothing to follow: closed")
        self.finish(self.n1)
        self.assertEqual(statuses(self.seen(chunks)), [])

    def test_closing_the_stream_closes_the_hop(self) -> None:
        there = self.task(self.n1)
        _, chunks = self.listen([there])
        self.assertEqual(len(self.hop_streams(self.n1)), 1)
        [stream] = [c for c in self.n2.service.web.heartbeat.connections if c.label == "s listen"]
        stream.request.channel.transport.loseConnection()
        self.flush()
        self.assertEqual(self.hop_streams(self.n1), [])
        self.finish(self.n1)
        self.assertEqual(statuses(self.seen(chunks)), [(there, "working")])

    def test_a_hop_that_breaks_off(self) -> None:
        """n1's stream is cut: logged, and n2's stream goes on with its own task."""
        there, here = self.task(self.n1), self.task(self.n2)
        _, chunks = self.listen([there, here])
        [hop] = self.hop_streams(self.n1)
        hop.request.channel.transport.loseConnection()
        self.flush()
        self.finish(self.n1)
        self.finish(self.n2)
        self.assertEqual(
            statuses(self.seen(chunks)),
            [(there, "working"), (here, "working"), (here, "completed")],
        )
        self.assertIn("the listen stream of node n1 broke off", " ".join(self.logged))

    def test_a_node_that_does_not_answer_in_time(self) -> None:
        """The acknowledgement waits ACK_WAIT seconds at most, then agrees what
        answered; what happened meanwhile follows it."""
        there, here = self.task(self.n1), self.task(self.n2)
        forwarder = self.n2.service.web.forwarder
        assert forwarder is not None
        silent = Silent()
        forwarder._client = silent  # type: ignore[assignment]
        message = modern(
            "L", "subscriptions/listen", {"notifications": {"taskIds": [there, here]}}, TASKS
        )
        treq: Any = self.n2.client
        d = treq.request(
            "POST",
            "http://127.0.0.1/servers/s/mcp",
            data=jsonrpc.dumps(message),
            headers=headers(message, ACCEPT_BOTH, authorization=ALICE),
        )
        self.flush()
        self.finish(self.n2)
        self.assertNoResult(d)
        self.n2.reactor.advance(ACK_WAIT)
        self.flush()
        chunks = self.n2.stream(self.successResultOf(d))
        first, *rest = self.seen(chunks)
        self.assertEqual(first["params"]["notifications"], {"taskIds": [here]})
        self.assertEqual(statuses(rest), [(here, "working"), (here, "completed")])
        self.assertEqual(silent.cancelled, ["http://n1.example/servers/s/mcp"])
        self.assertIn("node n1 did not acknowledge a listen stream", " ".join(self.logged))

    def test_a_hop_is_never_forwarded_again(self) -> None:
        """A listen that came over a genuine hop serves this node's tasks
        only: no child, no hop further (a forged hop is the client's own)."""
        there = self.task(self.n1)
        n3 = Forwarder("n3", ClusterKeys([KEY.encode()]), self.n2.reactor)
        forwarder = self.n2.service.web.forwarder
        assert forwarder is not None
        asked: list[str] = []
        forwarder.directory = Directory({"n1": "http://n1.example"})
        forwarder.directory.address = lambda node: asked.append(node) or Directory({}).address(node)  # type: ignore[method-assign]
        message = modern(
            "L", "subscriptions/listen", {"notifications": {"taskIds": [there]}}, TASKS
        )
        body = hop_listen(message, [there])
        treq: Any = self.n2.client
        d = treq.request(
            "POST",
            "http://127.0.0.1/servers/s/mcp",
            data=body,
            headers=headers(
                message,
                ACCEPT_BOTH,
                authorization=ALICE,
                **{"mcp-twist-hop": n3.hop(body).decode()},
            ),
        )
        self.flush()
        [ack] = events(self.n2.stream(self.successResultOf(d)))
        self.assertEqual(ack["params"]["notifications"], {})
        self.assertEqual(asked, [])
        self.assertEqual([c.label for c in self.hop_streams(self.n2)], ["s listen (hop)"])
        # A forged hop: the client's own listen, which follows n1's task.
        d = treq.request(
            "POST",
            "http://127.0.0.1/servers/s/mcp",
            data=body,
            headers=headers(
                message, ACCEPT_BOTH, authorization=ALICE, **{"mcp-twist-hop": "n3.1.AAAA"}
            ),
        )
        self.flush()
        self.assertEqual(asked, ["n1"])
