"""Nodes of a cluster in memory: the cluster's key, a registry of nodes, and
two nodes over fake children where one reaches the other over the hop."""

from __future__ import annotations

from typing import Any

import orjson
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.config.load import parse_config
from mcptwist.mcp import jsonrpc
from mcptwist.mcp.jsonrpc import Message

from .bridge import Service
from .children import FakeChild
from .messages import headers

KEY = "k" * 16 + "0123456789abcdef"


def cluster_doc(**cluster: Any) -> dict[str, Any]:
    return {"servers": {"s": {"command": "fake"}}, "cluster": {"keys": [KEY], **cluster}}


class Directory:
    """The registry of nodes, as a forwarder asks it."""

    def __init__(self, addresses: dict[str, str]) -> None:
        self.addresses = addresses

    def address(self, node: str) -> Deferred[str | None]:
        return succeed(self.addresses.get(node))

    def node_ids(self) -> Deferred[list[str]]:
        return succeed(list(self.addresses))


class TwoNodes(SynchronousTestCase):
    """Two nodes of a cluster, n1 and n2, over children that hold their
    requests; n2 reaches n1 (and only n1) over the hop."""

    # Server s's table, on both nodes.
    server: dict[str, Any] = {"command": "fake"}

    def document(self, node: str) -> dict[str, Any]:
        """Node C{node}'s configuration."""
        return {**cluster_doc(node_id=node), "servers": {"s": self.server}}

    def setUp(self) -> None:
        def held(child: FakeChild) -> None:
            child.hold = True

        self.n1 = Service(self, parse_config(self.document("n1"), "c", {}), on_spawn=held)
        self.n2 = Service(self, parse_config(self.document("n2"), "c", {}), on_spawn=held)
        self.hop = StubTreq(self.n1.service.resource)
        forwarder = self.n2.service.web.forwarder
        assert forwarder is not None
        forwarder.directory = Directory({"n1": "http://n1.example"})
        forwarder._client = self.hop  # type: ignore[assignment]

    def post(self, node: Service, message: Message, **extra: str) -> Deferred[Any]:
        treq: Any = node.client
        d: Deferred[Any] = treq.request(
            "POST",
            "http://127.0.0.1/servers/s/mcp",
            data=jsonrpc.dumps(message),
            headers=headers(message, "application/json", **extra),
        )
        treq.flush()
        return d

    def flush(self) -> None:
        for _ in range(3):
            self.n1.client.flush()
            self.hop.flush()
            self.n2.client.flush()

    def answer(self, node: Service, d: Deferred[Any]) -> tuple[int, Any]:
        self.flush()
        response = self.successResultOf(d)
        d = node.client.content(response)
        self.flush()
        return response.code, orjson.loads(self.successResultOf(d))
