# -*- test-case-name: tests.test_cluster_service -*-
"""A node among others, on an in-memory store: rate limits shared by every
node (the same answers as one node), the fall back to each node's own
limits while Redis is unavailable and the return to shared ones, the
heartbeat of the node's record and its withdrawal, GET /admin/cluster,
/health's view of the cluster, and the metrics."""

from __future__ import annotations

import os
from typing import Any

import attrs
import orjson
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.config.model import (
    AuditConfig,
    AuthConfig,
    Bucket,
    ClusterConfig,
    LimitsConfig,
    ServerConfig,
    ServerLimits,
    TokenConfig,
)
from mcptwist.mcp import jsonrpc
from mcptwist.security.auth import hash_token
from mcptwist.service.site import BridgeSite

from .support import bridge as harness
from .support.bridge import Service
from .support.children import FakeProcessReactor
from .support.messages import JSON, bearer
from .support.store import FakeStore

TOKENS = {"alice": "mcpt_alice_token", "ops": "mcpt_ops_token"}
# One call a minute, three at once.
SLOW = Bucket(1 / 60, 3)
INIT_BATCHING = jsonrpc.request(
    1,
    "initialize",
    {"protocolVersion": "2025-03-26", "capabilities": {}, "clientInfo": {"name": "t"}},
)


def cluster(node: str = "n1", **kwargs: Any) -> ClusterConfig:
    return ClusterConfig(
        node_id=node,
        keys=(b"k" * 32,),
        redis="redis://:pw@127.0.0.1:6379/0",
        advertise=f"http://{node}.example:8080",
        **kwargs,
    )


class Node(harness.Bridge):
    """One node's HTTP surface, with two tokens and an audit file."""

    def __init__(self, test: SynchronousTestCase, store: FakeStore | None, **settings: Any) -> None:
        directory = test.mktemp()
        os.makedirs(directory)
        self.audit_path = os.path.join(directory, "audit.jsonl")
        auth = AuthConfig(
            tokens=(
                TokenConfig("alice", hash_token(TOKENS["alice"]), frozenset({"s"})),
                TokenConfig("ops", hash_token(TOKENS["ops"]), frozenset({"*"}), admin=True),
            )
        )
        settings.setdefault("limits", LimitsConfig(per_principal=SLOW, per_ip=None))
        servers = settings.pop("servers", ())
        super().__init__(
            test,
            *servers,
            store=store,
            auth=auth,
            audit=AuditConfig(path=self.audit_path),
            **settings,
        )

    def get(self, token: str = "alice") -> tuple[int, Any, Any]:
        return self.exchange("GET", "/", None, bearer(TOKENS[token]))

    def events(self) -> list[dict[str, Any]]:
        self.audit.flush_refusals(everything=True)
        with open(self.audit_path, "rb") as f:
            return [orjson.loads(line) for line in f if b'"rate_limited"' in line]


def nodes(test: SynchronousTestCase, store: FakeStore, count: int = 3, **kw: Any) -> list[Node]:
    found = [Node(test, store, **kw) for _ in range(count)]
    # The store's clock is the first node's (every node's clock stands still).
    store.clock = found[0].reactor
    return found


def tool_calls(first: int, count: int) -> list[jsonrpc.Message]:
    return [
        jsonrpc.request(i, "tools/call", {"name": "echo", "arguments": {"i": i}})
        for i in range(first, first + count)
    ]


def session(node: Node, init: jsonrpc.Message = INIT_BATCHING) -> dict[str, str]:
    headers = {**JSON, **bearer(TOKENS["alice"])}
    status, response_headers, _ = node.exchange("POST", "/servers/s/mcp", init, headers)
    assert status == 200, status
    headers["mcp-session-id"] = response_headers.getRawHeaders("mcp-session-id")[0]
    node.exchange(
        "POST", "/servers/s/mcp", jsonrpc.notification("notifications/initialized"), headers
    )
    return headers


class SharedLimitTests(SynchronousTestCase):
    def test_one_limit_over_three_nodes(self) -> None:
        """Three calls a minute for one principal, spread over three nodes:
        three pass in all, not three on each."""
        store = FakeStore(Clock())
        cluster_nodes = nodes(self, store)
        codes = [cluster_nodes[i % 3].get()[0] for i in range(9)]
        self.assertEqual(codes, [200] * 3 + [429] * 6)
        # Another principal has its own bucket.
        self.assertEqual(cluster_nodes[1].get("ops")[0], 200)
        # A minute refills one call, on any node.
        store.clock.advance(60)
        self.assertEqual([n.get()[0] for n in cluster_nodes], [200, 429, 429])

    def test_answers_as_one_node_does(self) -> None:
        """The 429, its Retry-After and the audit record are those of a single
        node with the same limit."""
        alone = Node(self, None)
        shared = nodes(self, FakeStore(Clock()))[0]
        for node in (alone, shared):
            for _ in range(3):
                node.get()
        _, alone_headers, alone_body = alone.get()
        _, shared_headers, shared_body = shared.get()
        self.assertEqual(shared_body, alone_body)
        self.assertEqual(
            shared_headers.getRawHeaders("retry-after"), alone_headers.getRawHeaders("retry-after")
        )
        self.assertEqual(shared_headers.getRawHeaders("retry-after"), ["60"])

        def strip(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [{k: v for k, v in e.items() if k not in ("time", "ts")} for e in events]

        self.assertEqual(strip(shared.events()), strip(alone.events()))
        self.assertEqual(len(shared.events()), 1)

    def test_a_request_waits_for_redis(self) -> None:
        """While Redis has not answered, the request is not answered either."""
        store = FakeStore(Clock())
        [node] = nodes(self, store, 1)
        store.hold()
        d = node.client.request("GET", "http://127.0.0.1/", headers=bearer(TOKENS["alice"]))
        node.client.flush()
        self.assertNoResult(d)
        store.release()
        node.client.flush()
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual(len(store.takes), 1)

    def test_batch(self) -> None:
        """Each message of a batch is charged to the shared bucket, the batch
        waiting for Redis; one that cannot be paid is refused whole, as on one node."""
        limits = LimitsConfig(per_principal=Bucket(1.0, 10), per_ip=None)
        store = FakeStore(Clock())
        one, two = nodes(self, store, 2, limits=limits)
        alice = session(one)  # 2 tokens
        store.hold()
        d = one.client.request(
            "POST",
            "http://127.0.0.1/servers/s/mcp",
            data=jsonrpc.dumps(tool_calls(2, 5)),
            headers=alice,
        )
        one.client.flush()
        self.assertNoResult(d)
        store.release()
        one.client.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(len(orjson.loads(self.successResultOf(response.content()))), 5)
        # 3 tokens left for alice on every node.
        other = session(two)  # 1 left
        status, headers, body = two.exchange("POST", "/servers/s/mcp", tool_calls(7, 5), other)
        self.assertEqual(status, 429)
        # The retry pays 5 again, and the bucket holds none (this request paid 1).
        self.assertEqual(headers.getRawHeaders("retry-after"), ["5"])
        self.assertIn("principal rate limit", body["error"]["message"])

    def test_server_limits_stay_on_the_node(self) -> None:
        """A server's own limit guards this node's child: counted per node."""
        servers = (ServerConfig(name="s", command="fake", limits=ServerLimits(total=Bucket(1, 1))),)
        store = FakeStore(Clock())
        one, two = nodes(self, store, 2, servers=servers, limits=LimitsConfig(per_ip=None))
        for node in (one, two):
            headers = {**JSON, **bearer(TOKENS["ops"])}
            codes = [node.exchange("POST", "/servers/s/mcp", INIT_BATCHING, headers)[0]]
            codes.append(node.exchange("POST", "/servers/s/mcp", INIT_BATCHING, headers)[0])
            self.assertEqual(codes, [200, 429])

    def test_fallback_and_recovery(self) -> None:
        """Redis unavailable: each node limits with its own buckets (counted
        as fallbacks), and serves; back: the shared bucket again."""
        store = FakeStore(Clock())
        one, two = nodes(self, store, 2)
        self.assertEqual([one.get()[0], two.get()[0]], [200, 200])
        store.set_up(False)
        self.assertEqual([one.get()[0] for _ in range(4)], [200, 200, 200, 429])
        self.assertEqual([two.get()[0] for _ in range(4)], [200, 200, 200, 429])
        self.assertEqual(store.fallbacks["down"], 8)
        store.set_up(True)
        # The shared bucket holds the one call left.
        self.assertEqual([one.get()[0], two.get()[0]], [200, 429])


def post(token: str, body: bytes) -> bytes:
    head = (
        "POST /servers/s/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Accept: application/json, text/event-stream\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class WireTests(SynchronousTestCase):
    """Through a real channel, from an address that is not loopback: the
    address is charged to its shared bucket before the credentials are
    checked, the principal after, and the body is read only then."""

    def test_head_waits_for_redis(self) -> None:
        store = FakeStore(Clock())
        limits = LimitsConfig(per_principal=SLOW, per_ip=Bucket(1 / 60, 2))
        [node] = nodes(self, store, 1, limits=limits)
        site = BridgeSite(node.app.resource(), reactor=node.reactor, parsePOSTFormSubmission=False)
        site.configure(node.config.limits)
        answers = []
        for _ in range(3):
            store.hold()
            address = IPv4Address("TCP", "192.0.2.1", 40000)
            channel = site.buildProtocol(address)
            transport = StringTransport(peerAddress=address)
            channel.makeConnection(transport)
            # The head and the body arrive together: the request is judged
            # from its head, and again once its body is in.
            channel.dataReceived(post(TOKENS["alice"], jsonrpc.dumps(INIT_BATCHING)))
            self.assertEqual(transport.value(), b"")
            while store.step():
                pass
            store.release()
            answers.append(transport.value().split(b" ", 2)[1])
            channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(answers, [b"200", b"200", b"429"])
        # Each charge was asked of Redis once: the address and the principal
        # of the first two, the address of the third.
        self.assertEqual(len(store.takes), 5)
        # The address was charged before the credentials, the principal after.
        keys = [tuple(b.key for b in take[0]) for take in store.takes]
        self.assertEqual(keys[:2], [("ip:192.0.2.1",), ("principal:token:alice",)])
        self.assertIn(b"the ip rate limit", transport.value())

    def test_judged_twice_asked_once(self) -> None:
        """A request whose body arrives while Redis decides its head is judged
        again, but Redis is asked once: it pays once."""
        store = FakeStore(Clock())
        [node] = nodes(self, store, 1)
        site = BridgeSite(node.app.resource(), reactor=node.reactor, parsePOSTFormSubmission=False)
        site.configure(node.config.limits)
        store.hold()
        address = IPv4Address("TCP", "192.0.2.1", 40000)
        channel = site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        channel.makeConnection(transport)
        channel.dataReceived(post(TOKENS["alice"], jsonrpc.dumps(INIT_BATCHING)))
        self.assertEqual(transport.value(), b"")
        store.release()
        self.assertEqual(transport.value().split(b" ", 2)[1], b"200")
        self.assertEqual(len(store.takes), 1)
        self.assertEqual(store.buckets["principal:token:alice"][0], 2.0)


class ServiceNode(Service):
    """A started node's service on a store whose clock is its own."""

    def __init__(
        self,
        test: SynchronousTestCase,
        store: FakeStore | None,
        node: str = "n1",
        servers: tuple[str, ...] = ("s",),
        auth: AuthConfig | None = None,
    ) -> None:
        reactor = store.clock if store is not None else FakeProcessReactor()
        assert isinstance(reactor, FakeProcessReactor)
        config = harness.BridgeConfig(
            servers={name: ServerConfig(name=name, command="fake") for name in servers},
            cluster=cluster(node),
            auth=auth or AuthConfig(),
        )
        super().__init__(test, config, store=store, reactor=reactor)

    def get_json(self, path: str) -> tuple[int, Any]:
        status, _, body = self.exchange("GET", path)
        return status, body


class HeartbeatTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = FakeStore(FakeProcessReactor())
        self.node = ServiceNode(self, self.store)

    def test_record(self) -> None:
        """Once started the node is in the registry, with what it runs and how."""
        self.assertTrue(self.store.started)
        self.assertIn("n1", self.store.records)
        self.store.clock.advance(2)
        record = orjson.loads(self.store.records["n1"][0])
        self.assertEqual(record["node_id"], "n1")
        self.assertEqual(record["url"], "http://n1.example:8080")
        self.assertEqual(record["health"], "ok")
        self.assertEqual(
            record["servers"], {"s": {"state": "running", "children": 1, "sessions": 0}}
        )
        self.assertEqual(record["sessions"], 0)
        self.assertIn("version", record)
        self.assertEqual(self.store.records["n1"][1], self.store.clock.seconds() + 10)

    def test_heartbeat_and_ttl(self) -> None:
        """Written again every heartbeat; a node that stops beating (killed)
        disappears after node_ttl."""
        self.node.open_session()
        self.store.clock.advance(2)
        record = orjson.loads(self.store.records["n1"][0])
        self.assertEqual(record["sessions"], 1)
        self.assertEqual(self.store.records["n1"][1], self.store.clock.seconds() + 10)
        beat = self.node.service.cluster._beat
        beat.stop()
        self.store.clock.advance(9.9)
        self.assertIn("n1", self.successResultOf(self.store.nodes()))
        self.store.clock.advance(0.2)
        self.assertEqual(self.successResultOf(self.store.nodes()), {})

    def test_withdrawn_on_stop(self) -> None:
        self.node.service.stopService()
        self.assertEqual(self.store.records, {})
        self.assertFalse(self.store.started)

    def test_resynchronised(self) -> None:
        """Redis back after an outage: the record is written at once."""
        self.store.set_up(False)
        self.store.records.clear()
        self.store.clock.advance(5)
        self.assertEqual(self.store.records, {})
        self.store.set_up(True)
        self.assertIn("n1", self.store.records)

    def test_draining(self) -> None:
        """Whatever drains the node says so in its record."""
        self.node.service.cluster.draining = lambda: True
        self.store.clock.advance(2)
        self.assertEqual(orjson.loads(self.store.records["n1"][0])["health"], "draining")

    def test_address(self) -> None:
        """A node's advertised URL, by id; cached for a heartbeat."""
        cluster_service = self.node.service.cluster
        self.store.records["n2"] = ('{"node_id": "n2", "url": "http://n2:1"}', 1e9)
        self.assertEqual(self.successResultOf(cluster_service.address("n2")), "http://n2:1")
        self.assertEqual(
            self.successResultOf(cluster_service.address("n1")), "http://n1.example:8080"
        )
        self.assertIsNone(self.successResultOf(cluster_service.address("n3")))
        del self.store.records["n2"]
        self.assertEqual(self.successResultOf(cluster_service.address("n2")), "http://n2:1")
        self.store.clock.advance(2)
        self.assertIsNone(self.successResultOf(cluster_service.address("n2")))
        self.store.set_up(False)
        self.assertIsNone(self.successResultOf(cluster_service.address("n2")))

    def test_reload_changes_the_heartbeat(self) -> None:
        service = self.node.service
        new = attrs.evolve(service.config, cluster=cluster(heartbeat=1.0, node_ttl=5.0))
        service.cluster.reconfigure(new.cluster)
        self.store.records.clear()
        self.store.clock.advance(1)
        self.assertEqual(self.store.records["n1"][1], self.store.clock.seconds() + 5)


class AdminClusterTests(SynchronousTestCase):
    def test_every_node(self) -> None:
        """GET /admin/cluster: every node's record, this one marked, Redis up."""
        store = FakeStore(FakeProcessReactor())
        one = ServiceNode(self, store, "n1")
        ServiceNode(self, store, "n2")
        status, view = one.get_json("/admin/cluster")
        self.assertEqual(status, 200)
        self.assertEqual((view["node_id"], view["redis"]), ("n1", "up"))
        self.assertEqual(
            [(n["node_id"], n["self"]) for n in view["nodes"]], [("n1", True), ("n2", False)]
        )
        self.assertEqual(view["nodes"][1]["url"], "http://n2.example:8080")
        store.set_up(False)
        status, view = one.get_json("/admin/cluster")
        self.assertEqual((view["redis"], [n["node_id"] for n in view["nodes"]]), ("down", ["n1"]))

    def test_without_redis(self) -> None:
        node = Service(
            self,
            harness.BridgeConfig(
                servers={"s": ServerConfig(name="s", command="fake")},
                cluster=attrs.evolve(cluster(), redis=None),
            ),
        )
        status, _, view = node.exchange("GET", "/admin/cluster")
        self.assertEqual(status, 200)
        self.assertIsNone(view["redis"])
        [own] = view["nodes"]
        self.assertEqual((own["node_id"], own["self"], own["health"]), ("n1", True, "ok"))

    def test_servers_follow_grants(self) -> None:
        """An admin sees, of each node, only the servers its grants name."""
        store = FakeStore(FakeProcessReactor())
        auth = AuthConfig(
            tokens=(TokenConfig("ops_s", hash_token("mcpt_ops_s"), frozenset({"s"}), admin=True),)
        )
        one = ServiceNode(self, store, "n1", auth=auth, servers=("s", "t"))
        ServiceNode(self, store, "n2", servers=("s", "t"))
        status, _, view = one.exchange("GET", "/admin/cluster", None, bearer("mcpt_ops_s"))
        self.assertEqual(status, 200)
        self.assertEqual([set(n["servers"]) for n in view["nodes"]], [{"s"}, {"s"}])


class HealthTests(SynchronousTestCase):
    def test_health(self) -> None:
        """/health names the node and Redis; with Redis down it says degraded
        and still answers 200 (the node serves, on its own limits)."""
        store = FakeStore(FakeProcessReactor())
        node = ServiceNode(self, store)
        status, body = node.get_json("/health")
        self.assertEqual((status, body["status"]), (200, "ok"))
        self.assertEqual(body["cluster"], {"node_id": "n1", "redis": "up"})
        store.set_up(False)
        status, body = node.get_json("/health")
        self.assertEqual((status, body["status"]), (200, "degraded"))
        self.assertEqual(body["cluster"], {"node_id": "n1", "redis": "down"})
        self.assertEqual(body["servers"], {"s": "running"})
        store.set_up(True)
        self.assertEqual(node.get_json("/health")[1]["status"], "ok")

    def test_without_a_cluster(self) -> None:
        node = Service(
            self, harness.BridgeConfig(servers={"s": ServerConfig(name="s", command="fake")})
        )
        _, _, body = node.exchange("GET", "/health")
        self.assertEqual(body, {"status": "ok", "servers": {"s": "running"}, "endpoints": {}})

    def test_metrics(self) -> None:
        """The availability of Redis, and the fallbacks to local limits by why."""
        store = FakeStore(FakeProcessReactor())
        node = ServiceNode(self, store)

        def scrape() -> str:
            response = node.request("GET", "/metrics")
            return node.content(response).decode()

        self.assertIn("mcptwist_cluster_redis_up 1.0", scrape())
        store.set_up(False)
        store.take([])
        text = scrape()
        self.assertIn("mcptwist_cluster_redis_up 0.0", text)
        self.assertIn('mcptwist_cluster_limit_fallbacks_total{reason="down"} 1.0', text)
        self.assertIn('mcptwist_cluster_limit_fallbacks_total{reason="timeout"} 0.0', text)


class ClusterCapTests(SynchronousTestCase):
    """A principal's caps count what it holds on every node: each node says
    so in its record, and reads the others' at each heartbeat."""

    def setUp(self) -> None:
        self.store = FakeStore(FakeProcessReactor())
        auth = AuthConfig(
            tokens=(
                TokenConfig("alice", hash_token(TOKENS["alice"]), frozenset({"*"})),
                TokenConfig("ops", hash_token(TOKENS["ops"]), frozenset({"*"}), admin=True),
            )
        )
        self.node = ServiceNode(self, self.store, auth=auth)
        limits = attrs.evolve(self.node.config.limits, max_sessions_per_principal=2)
        self.node.service.access.caps.set_limits(limits.max_streams_per_principal, 2)

    def open(self) -> int:
        response = self.node.request(
            "POST", "/servers/s/mcp", INIT_BATCHING, {**JSON, **bearer(TOKENS["alice"])}
        )
        self.node.content(response)
        return int(response.code)

    def test_held_here_is_published(self) -> None:
        self.assertEqual(self.open(), 200)
        self.store.clock.advance(2)
        record = orjson.loads(self.store.records["n1"][0])
        self.assertEqual(record["held"]["sessions"], {"token:alice": 1})
        status, _, view = self.node.exchange("GET", "/admin/cluster", None, bearer(TOKENS["ops"]))
        self.assertEqual(status, 200, view)
        self.assertNotIn("held", view["nodes"][0], "the admin view leaves it out")

    def test_held_elsewhere_counts(self) -> None:
        held = {"sessions": {"token:alice": 1}, "streams": {}, "requests": {}}
        self.store.records["n2"] = (orjson.dumps({"node_id": "n2", "held": held}).decode(), 1e9)
        self.store.clock.advance(2)
        self.assertEqual(self.open(), 200, "one here and one on n2: at the cap of 2")
        self.assertEqual(self.open(), 429)
        self.store.set_up(False)
        self.assertEqual(self.open(), 200, "Redis down: the caps are this node's own")
        self.store.set_up(True)
        del self.store.records["n2"]
        self.store.clock.advance(2)
        self.assertEqual(self.node.service.access.caps.sessions("token:alice"), 2)
