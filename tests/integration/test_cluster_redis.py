# -*- test-case-name: tests.integration.test_cluster_redis -*-
"""The cluster's shared state on a real redis-server: the token-bucket and
registry scripts, the store's outage and recovery, and three real bridge
nodes sharing one principal's rate limit, falling back to their own limits
(and saying degraded) while Redis is stopped, and listing each other."""

from __future__ import annotations

import gc
import json
import time
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mcptwist.cluster.store import Bucket, RedisStore
from mcptwist.config.keys import digest_text
from mcptwist.config.model import ClusterConfig
from mcptwist.security.auth import hash_token

from . import harness as h
from .redis_support import RedisServer, free_port, start_redis

PASSWORD = "integration-redis-password"


def cluster(url: str, **kwargs: Any) -> ClusterConfig:
    return ClusterConfig(
        node_id="n1", keys=(b"k" * 32,), redis=url, advertise="http://127.0.0.1:1", **kwargs
    )


def sleep(seconds: float) -> Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


class StoreOnRedisTests(TestCase):
    """RedisStore against Debian's redis-server."""

    timeout = 60

    def setUp(self) -> None:
        self.redis = start_redis(self, PASSWORD)

    async def store(self, server: RedisServer | None = None, **kwargs: Any) -> RedisStore:
        store = RedisStore(cluster((server or self.redis).url, **kwargs), reactor)
        store.start()
        self.addCleanup(store.stop)
        for _ in range(100):
            if store.up:
                return store
            await sleep(0.05)
        raise AssertionError("the store never came up")

    async def test_bucket(self) -> None:
        """Burst 3 at one token a minute: three takes pass, the fourth waits
        about a minute; a take over two buckets spends neither when one is empty."""
        store = await self.store()
        bucket = Bucket("principal:alice", 1 / 60, 3)
        waits = [await store.take([bucket]) for _ in range(4)]
        self.assertEqual(waits[:3], [(0.0,), (0.0,), (0.0,)])
        assert waits[3] is not None
        self.assertTrue(59.0 < waits[3][0] <= 60.0, waits)
        other = Bucket("ip:10.0.0.1", 1, 5)
        both = await store.take([other, bucket], cost=1)
        assert both is not None
        self.assertEqual(both[0], 0.0)
        self.assertGreater(both[1], 0)
        # Nothing was taken from the first bucket: five more pass.
        for _ in range(5):
            self.assertEqual(await store.take([other]), (0.0,))
        self.assertGreater(self.redis.command("PTTL", "mcptwist:limit:ip:10.0.0.1"), 0)

    async def test_retry_after_pays_again(self) -> None:
        """The wait is for cost + paid tokens, what the retry of a batch pays."""
        store = await self.store()
        bucket = Bucket("principal:bob", 1, 4)
        self.assertEqual(await store.take([bucket], cost=1), (0.0,))
        waits = await store.take([bucket], cost=4, paid=1)
        assert waits is not None
        self.assertTrue(1.9 < waits[0] <= 2.0, waits)

    async def test_registry(self) -> None:
        """A record lives for its TTL; the set of ids forgets an expired one."""
        store = await self.store()
        self.assertTrue(await store.announce("n1", {"node_id": "n1"}, 0.5))
        self.assertTrue(await store.announce("n2", {"node_id": "n2"}, 30))
        self.assertEqual(set(await store.nodes() or ()), {"n1", "n2"})
        await sleep(0.7)
        self.assertEqual(await store.nodes(), {"n2": {"node_id": "n2"}})
        self.assertEqual(self.redis.command("SMEMBERS", "mcptwist:nodes"), ["n2"])
        self.assertTrue(await store.withdraw("n2"))
        self.assertEqual(await store.nodes(), {})

    async def test_outage(self) -> None:
        """Redis stopped: the next command is unavailable within redis_timeout
        and the store is down; restarted: the store is up again by itself."""
        store = await self.store()
        self.redis.stop()
        began = time.monotonic()
        with capturedLogs() as events:
            waits = await store.take([Bucket("ip:x", 1, 1)])
            self.assertIsNone(waits)
            self.assertLess(time.monotonic() - began, 1.0)
            self.assertFalse(store.up)
            self.redis.start()
            for _ in range(200):
                if store.up:
                    break
                await sleep(0.05)
        self.assertTrue(store.up)
        self.assertEqual(await store.take([Bucket("ip:x", 1, 1)]), (0.0,))
        self.assertNotIn(PASSWORD, repr(events))

    async def test_wrong_password(self) -> None:
        """A password Redis refuses: the store stays down, and says so without it."""
        wrong = f"redis://:not-the-password@127.0.0.1:{self.redis.port}/0"
        store = RedisStore(cluster(wrong), reactor)
        with capturedLogs() as events:
            store.start()
            self.addCleanup(store.stop)
            await sleep(1.5)
            gc.collect()
        self.assertFalse(store.up)
        self.assertNotIn("not-the-password", repr(events))
        said = [e for e in events if "Redis refused this node" in str(e.get("log_format"))]
        self.assertEqual(len(said), 1, events)


TOKEN = "mcpt_cluster_integration_user"
ADMIN = "mcpt_cluster_integration_admin"
KEY = "integration-cluster-key-0123456789abcdef"
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def node_config(node: str, port: int, redis: RedisServer, per_principal: str) -> str:
    """One node of the cluster: the example server, a user and an admin token,
    its limits, and [cluster] with the shared Redis."""
    return (
        # A node drains on SIGTERM: the sessions these tests leave open need not wait.
        "drain_timeout = 1\n"
        "[limits]\n"
        f"per_principal = {per_principal}\n"
        "[[auth.tokens]]\n"
        'name = "user"\n'
        f'hash = "{digest_text(hash_token(TOKEN))}"\n'
        "[[auth.tokens]]\n"
        'name = "ops"\n'
        f'hash = "{digest_text(hash_token(ADMIN))}"\n'
        "admin = true\n"
        "[cluster]\n"
        f'node_id = "{node}"\n'
        f"keys = [{h.toml_str(KEY)}]\n"
        f"redis = {h.toml_str(redis.url)}\n"
        f'advertise = "http://127.0.0.1:{port}"\n'
        "heartbeat = 0.5\n"
        "node_ttl = 2\n" + h.python_server_toml("example", ["-m", "mcptwist.example"])
    )


class Cluster:
    """Three real bridge nodes sharing one real Redis."""

    def __init__(self, test: SynchronousTestCase, per_principal: str) -> None:
        self.redis = start_redis(test, PASSWORD)
        self.nodes: list[h.Bridge] = []
        for name in ("n1", "n2", "n3"):
            port = free_port()
            bridge = h.start_bridge(
                test,
                node_config(name, port, self.redis, per_principal),
                listen=f"tcp:{port}:interface=127.0.0.1",
            )
            bridge.headers = {"Authorization": f"Bearer {ADMIN}"}
            self.nodes.append(bridge)
        for bridge in self.nodes:
            bridge.wait_state("example", "running")
            h.wait_for(lambda b=bridge: b.get_json("/health")[1]["status"] == "ok", 10, "health ok")

    def post(self, bridge: h.Bridge, message: dict[str, Any], session: str | None = None) -> Any:
        headers = {**HEADERS, "Authorization": f"Bearer {TOKEN}"}
        if session is not None:
            headers["Mcp-Session-Id"] = session
            headers["MCP-Protocol-Version"] = "2025-06-18"
        return h.http("POST", bridge.mcp_url("example"), message, headers)

    def session(self, bridge: h.Bridge) -> tuple[str, int]:
        """A session on this node: its id, and how many requests were admitted."""
        status, headers, _ = self.post(bridge, INIT)
        assert status == 200, status
        session = headers["mcp-session-id"]
        status, _, body = self.post(bridge, NOTIFIED, session)
        assert status == 202, (status, body)
        return session, 2

    def call(self, bridge: h.Bridge, session: str, i: int) -> tuple[int, dict[str, str], bytes]:
        message = {
            "jsonrpc": "2.0",
            "id": i,
            "method": "tools/call",
            "params": {"name": "calculate", "arguments": {"expression": f"{i} + 1000"}},
        }
        return self.post(bridge, message, session)

    def health(self, bridge: h.Bridge) -> tuple[int, Any]:
        status, _, body = h.http("GET", bridge.url("/health"))
        return status, json.loads(body)


INIT = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "it"}},
}
NOTIFIED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


class ThreeNodeTests(SynchronousTestCase):
    """Three bridge nodes, one Redis: what a client and an operator see."""

    def test_shared_limit(self) -> None:
        """Ten calls a minute for one principal, spread over three nodes: ten
        are admitted in all (one more if a token refilled meanwhile), not thirty."""
        cluster = Cluster(self, "{ rate = 0.16667, burst = 10 }")
        admitted = 0
        sessions = []
        for bridge in cluster.nodes:
            session, count = cluster.session(bridge)
            sessions.append(session)
            admitted += count
        refused = []
        for i in range(12):
            status, headers, body = cluster.call(cluster.nodes[i % 3], sessions[i % 3], i)
            if status == 200:
                admitted += 1
                self.assertIn(f'"text":"{i + 1000}"', body.decode())
            else:
                self.assertEqual(status, 429)
                refused.append((headers, json.loads(body)))
        self.assertIn(admitted, (10, 11))
        headers, body = refused[0]
        self.assertIn("the principal rate limit is reached", body["error"]["message"])
        self.assertTrue(1 <= int(headers["retry-after"]) <= 6, headers["retry-after"])

    def test_redis_loss(self) -> None:
        """Redis stopped: every node keeps serving on its own limits and says
        degraded (200); Redis back: each node is ok again, and shares again."""
        cluster = Cluster(self, "{ rate = 100, burst = 1000 }")
        sessions = [cluster.session(bridge)[0] for bridge in cluster.nodes]
        cluster.redis.stop()
        for i, bridge in enumerate(cluster.nodes):
            status, _, body = cluster.call(bridge, sessions[i], i)
            self.assertEqual(status, 200)
            self.assertIn(f'"text":"{i + 1000}"', body.decode())
        for bridge in cluster.nodes:
            status, health = h.wait_for(
                lambda b=bridge: (lambda r: r if r[1]["status"] == "degraded" else None)(
                    cluster.health(b)
                ),
                10,
                "health to say degraded",
            )
            self.assertEqual(status, 200)
            self.assertEqual(health["cluster"]["redis"], "down")
            for i in range(3):
                self.assertEqual(
                    cluster.call(bridge, sessions[cluster.nodes.index(bridge)], i)[0], 200
                )
        metrics = h.http(
            "GET", cluster.nodes[0].url("/metrics"), headers={"Authorization": f"Bearer {ADMIN}"}
        )[2].decode()
        self.assertIn("mcptwist_cluster_redis_up 0.0", metrics)
        fallbacks = [
            line
            for line in metrics.splitlines()
            if line.startswith("mcptwist_cluster_limit_fallbacks_total")
        ]
        self.assertGreater(sum(float(line.split()[-1]) for line in fallbacks), 0)
        # Said once per node, however many requests fell back.
        for bridge in cluster.nodes:
            self.assertEqual(bridge.log.count("is unavailable"), 1, bridge.log[-3000:])
            self.assertNotIn(PASSWORD, bridge.log)
        cluster.redis.start()
        for bridge in cluster.nodes:
            h.wait_for(lambda b=bridge: cluster.health(b)[1]["status"] == "ok", 15, "health ok")
            self.assertEqual(cluster.health(bridge)[1]["cluster"]["redis"], "up")
        # Shared again: the limits' buckets are back in Redis.
        cluster.call(cluster.nodes[0], sessions[0], 99)
        self.assertIsNotNone(
            cluster.redis.command("HGET", "mcptwist:limit:principal:token:user", "tokens")
        )

    def test_admin_cluster(self) -> None:
        """GET /admin/cluster on any node lists the three, that node marked;
        a killed node disappears after node_ttl."""
        cluster = Cluster(self, "{ rate = 100, burst = 1000 }")
        first = cluster.nodes[0]

        def listed() -> list[str]:
            status, view = first.get_json("/admin/cluster")
            assert status == 200, view
            return [n["node_id"] for n in view["nodes"]]

        h.wait_for(lambda: listed() == ["n1", "n2", "n3"], 10, "three nodes listed")

        def healthy() -> Any:
            _, view = cluster.nodes[1].get_json("/admin/cluster")
            return view if all(n["health"] == "ok" for n in view["nodes"]) else None

        # Each node's record says ok from its first heartbeat after its child runs.
        view = h.wait_for(healthy, 5, "every record to say ok")
        self.assertEqual((view["node_id"], view["redis"]), ("n2", "up"))
        marked = {n["node_id"]: n["self"] for n in view["nodes"]}
        self.assertEqual(marked, {"n1": False, "n2": True, "n3": False})
        record = next(n for n in view["nodes"] if n["node_id"] == "n3")
        self.assertEqual(record["url"], cluster.nodes[2].base)
        self.assertEqual(record["health"], "ok")
        self.assertEqual(record["servers"]["example"]["state"], "running")
        cluster.nodes[2].kill()
        killed = time.monotonic()
        h.wait_for(lambda: listed() == ["n1", "n2"], 10, "the killed node to disappear")
        # Gone once its record's TTL (2 s) ran out, not before its last heartbeat's.
        self.assertLess(time.monotonic() - killed, 4.0)
        # A node that stops says goodbye at once.
        cluster.nodes[1].stop()
        self.assertEqual(listed(), ["n1"])
