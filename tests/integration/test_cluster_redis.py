# -*- test-case-name: tests.integration.test_cluster_redis -*-
"""The cluster's shared state on a real redis-server: the token-bucket and
registry scripts, the store's outage and recovery, and three real bridge
nodes sharing one principal's rate limit, falling back to their own limits
(and saying degraded) while Redis is stopped, and listing each other."""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs
from twisted.trial.unittest import TestCase

from mcptwist.cluster.store import Bucket, RedisStore
from mcptwist.config.model import ClusterConfig

from .redis_support import RedisServer, start_redis

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
        wrong = RedisServer.__new__(RedisServer)
        wrong.port, wrong.password = self.redis.port, "not-the-password"
        store = RedisStore(cluster(wrong.url), reactor)
        with capturedLogs() as events:
            store.start()
            self.addCleanup(store.stop)
            await sleep(1.5)
        self.assertFalse(store.up)
        self.assertNotIn("not-the-password", repr(events))
