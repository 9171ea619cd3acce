"""Token buckets, the bridge's rate limiter, concurrency caps and Retry-After."""

from __future__ import annotations

import math
from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.config.model import Bucket, LimitsConfig, ServerLimits
from mcptwist.security.ratelimit import (
    CAPACITY_RETRY,
    Caps,
    RateLimiter,
    Refusal,
    TokenBucket,
    retry_after_header,
)

from .support.store import FakeStore

NO_LIMITS = LimitsConfig(per_principal=None, per_ip=None)


def limiter(
    limits: LimitsConfig = NO_LIMITS,
    servers: dict[str, ServerLimits] | None = None,
    **kwargs: object,
) -> tuple[RateLimiter, Clock]:
    clock = Clock()
    clock.advance(1000)
    return RateLimiter(limits, servers or {}, clock, **kwargs), clock  # type: ignore[arg-type]


class TokenBucketTests(SynchronousTestCase):
    def test_burst_then_refusal(self) -> None:
        """Exactly burst requests pass at once; the next waits 1/rate."""
        bucket = TokenBucket(rate=4.0, burst=3, now=10.0)
        self.assertEqual([bucket.take(10.0) for _ in range(3)], [0.0, 0.0, 0.0])
        self.assertAlmostEqual(bucket.take(10.0), 0.25)
        self.assertAlmostEqual(bucket.take(10.1), 0.15)
        self.assertEqual(bucket.take(10.25), 0.0)
        self.assertAlmostEqual(bucket.take(10.25), 0.25)

    def test_refills_up_to_burst_only(self) -> None:
        bucket = TokenBucket(rate=1.0, burst=2, now=0.0)
        bucket.take(0.0)
        bucket.take(0.0)
        self.assertFalse(bucket.full(1.0))
        self.assertTrue(bucket.full(1000.0))
        self.assertEqual([bucket.take(1000.0) for _ in range(2)], [0.0, 0.0])
        self.assertGreater(bucket.take(1000.0), 0.0)

    def test_cost(self) -> None:
        bucket = TokenBucket(rate=2.0, burst=5, now=0.0)
        self.assertEqual(bucket.take(0.0, cost=4.0), 0.0)
        self.assertAlmostEqual(bucket.take(0.0, cost=2.0), 0.5)
        self.assertEqual(bucket.peek(0.5, cost=2.0), 0.0)
        self.assertAlmostEqual(bucket.tokens, 2.0)

    def test_clock_going_back_refills_nothing(self) -> None:
        bucket = TokenBucket(rate=1.0, burst=1, now=100.0)
        bucket.take(100.0)
        self.assertGreater(bucket.take(50.0), 0.0)
        self.assertAlmostEqual(bucket.take(50.5), 0.5)
        self.assertEqual(bucket.take(51.0), 0.0)

    def test_bad_parameters(self) -> None:
        self.assertRaises(ValueError, TokenBucket, 0.0, 1, 0.0)
        self.assertRaises(ValueError, TokenBucket, 1.0, 0, 0.0)
        self.assertRaises(ValueError, RateLimiter, LimitsConfig(per_ip=Bucket(1.0, 0)), {}, Clock())

    @given(
        rate=st.floats(min_value=0.01, max_value=1000),
        burst=st.integers(min_value=1, max_value=50),
        steps=st.lists(st.floats(min_value=0, max_value=5), max_size=60),
    )
    def test_waiting_retry_after_is_enough(
        self, rate: float, burst: int, steps: list[float]
    ) -> None:
        """After any history, waiting exactly the advertised time lets a request pass."""
        now = 12345.678
        bucket = TokenBucket(rate, burst, now)
        for dt in steps:
            now += dt
            wait = bucket.take(now)
            if wait:
                self.assertGreater(wait, 0.0)
                self.assertLessEqual(wait, 1 / rate + 1e-9)
                self.assertEqual(bucket.take(now + wait), 0.0)
                now += wait


class RateLimiterTests(SynchronousTestCase):
    def test_bridge_wide_burst_and_retry_after(self) -> None:
        """The principal bucket passes burst requests, then says when to retry."""
        rl, clock = limiter(LimitsConfig(per_principal=Bucket(2.0, 3), per_ip=None))
        self.assertEqual([rl.check("alice", "192.0.2.1", None) for _ in range(3)], [None] * 3)
        self.assertEqual(rl.check("alice", "192.0.2.2", None), Refusal("principal", 0.5))
        clock.advance(0.5)
        self.assertIsNone(rl.check("alice", "192.0.2.1", None))
        self.assertIsNotNone(rl.check("alice", "192.0.2.1", None))
        self.assertIsNone(rl.check("bob", "192.0.2.1", None))

    def test_per_ip_is_independent_of_principal(self) -> None:
        """One IP is limited whoever it claims to be; another IP is not affected."""
        rl, _ = limiter(LimitsConfig(per_principal=None, per_ip=Bucket(1.0, 2)))
        self.assertIsNone(rl.check("alice", "192.0.2.1", None))
        self.assertIsNone(rl.check("bob", "192.0.2.1", None))
        refusal = rl.check("carol", "192.0.2.1", None)
        self.assertEqual(refusal, Refusal("ip", 1.0))
        self.assertIsNone(rl.check("alice", "192.0.2.2", None))

    def test_ip_charged_before_authentication_is_not_charged_again(self) -> None:
        """Charged once before authentication, the address is not charged
        twice; a per-server per-IP bucket still applies after."""
        rl, _ = limiter(
            LimitsConfig(per_principal=None, per_ip=Bucket(1.0, 2)),
            {"s": ServerLimits(per_ip=Bucket(1.0, 1))},
        )
        self.assertIsNone(rl.check(None, "192.0.2.1", None))
        self.assertIsNone(rl.check("alice", "192.0.2.1", "s", ip_charged=True))
        self.assertIsNone(rl.check(None, "192.0.2.1", None))
        self.assertEqual(
            rl.check("alice", "192.0.2.1", "s", ip_charged=True), Refusal("server-ip", 1.0)
        )
        self.assertEqual(rl.check(None, "192.0.2.1", None), Refusal("ip", 1.0))

    def test_no_token_spent_when_a_later_bucket_refuses(self) -> None:
        """A refusal by the IP bucket leaves the principal's tokens alone."""
        rl, _ = limiter(LimitsConfig(per_principal=Bucket(1.0, 5), per_ip=Bucket(1.0, 1)))
        self.assertIsNone(rl.check("alice", "192.0.2.1", None))
        for _ in range(10):
            self.assertEqual(rl.check("alice", "192.0.2.1", None), Refusal("ip", 1.0))
        # Four tokens are left for alice, from other addresses.
        for n in range(2, 6):
            self.assertIsNone(rl.check("alice", f"192.0.2.{n}", None))
        self.assertEqual(rl.check("alice", "192.0.2.9", None), Refusal("principal", 1.0))

    def test_no_token_spent_when_a_server_bucket_refuses(self) -> None:
        rl, _ = limiter(
            LimitsConfig(per_principal=Bucket(1.0, 3), per_ip=None),
            {"a": ServerLimits(total=Bucket(1.0, 1))},
        )
        self.assertIsNone(rl.check("alice", "ip", "a"))
        self.assertEqual(rl.check("alice", "ip", "a"), Refusal("server-total", 1.0))
        self.assertEqual(rl.check("alice", "ip", "a"), Refusal("server-total", 1.0))
        self.assertIsNone(rl.check("alice", "ip", "b"))
        self.assertIsNone(rl.check("alice", "ip", "b"))
        self.assertEqual(rl.check("alice", "ip", "b"), Refusal("principal", 1.0))

    def test_server_scopes_are_isolated(self) -> None:
        """Throttled on server A is not throttled on server B, nor bridge-wide."""
        servers = {
            "a": ServerLimits(per_principal=Bucket(1.0, 1), per_ip=Bucket(1.0, 2)),
            "b": ServerLimits(per_principal=Bucket(1.0, 1)),
        }
        rl, _ = limiter(LimitsConfig(per_principal=Bucket(100.0, 100), per_ip=None), servers)
        self.assertIsNone(rl.check("alice", "10.0.0.1", "a"))
        self.assertEqual(rl.check("alice", "10.0.0.1", "a"), Refusal("server-principal", 1.0))
        self.assertIsNone(rl.check("alice", "10.0.0.1", "b"))
        self.assertIsNone(rl.check("alice", "10.0.0.1", None))
        self.assertIsNone(rl.check("alice", "10.0.0.1", "unlimited"))
        self.assertIsNone(rl.check("bob", "10.0.0.1", "a"))
        self.assertEqual(rl.check("carol", "10.0.0.1", "a"), Refusal("server-ip", 1.0))
        self.assertIsNone(rl.check("carol", "10.0.0.2", "a"))

    def test_a_batch_costs_every_bucket_its_length(self) -> None:
        """C{cost} tokens from every bucket, or none from any; C{paid} tokens
        (spent by the request already) count in the wait and the burst."""
        rl, clock = limiter(
            LimitsConfig(per_principal=Bucket(1.0, 10), per_ip=Bucket(1.0, 20)),
            {"a": ServerLimits(total=Bucket(2.0, 8))},
        )
        self.assertIsNone(rl.check("alice", "ip", "a", cost=5))
        self.assertEqual(rl.check("alice", "ip", "a", cost=4, paid=1), Refusal("server-total", 1.0))
        self.assertIsNone(rl.check("alice", "ip", None, cost=5))  # the principal's last 5
        self.assertEqual(rl.check("alice", "ip", None), Refusal("principal", 1.0))
        clock.advance(1.5)
        self.assertIsNone(rl.check("bob", "ip", "a", cost=6))  # 3 + 3 refilled
        # The per-IP bucket paid 16 of its 20.
        self.assertEqual(rl.check("carol", "ip", None, cost=6), Refusal("ip", 0.5))

    def test_a_cost_beyond_a_burst_can_never_pass(self) -> None:
        rl, _ = limiter(LimitsConfig(per_principal=Bucket(1.0, 10), per_ip=None))
        refusal = rl.check("alice", None, None, cost=10, paid=1)
        self.assertEqual((refusal.scope, refusal.burst), ("principal", 10))  # type: ignore[union-attr]
        self.assertIsNone(rl.check("alice", None, None, cost=9, paid=1))

    def test_refusal_names_first_scope_and_longest_wait(self) -> None:
        rl, _ = limiter(
            LimitsConfig(per_principal=Bucket(1.0, 1), per_ip=Bucket(0.1, 1)),
        )
        self.assertIsNone(rl.check("alice", "ip", None))
        self.assertEqual(rl.check("alice", "ip", None), Refusal("principal", 10.0))

    def test_pruning_full_buckets(self) -> None:
        """Every minute, buckets that are back at burst are dropped, losslessly."""
        rl, clock = limiter(LimitsConfig(per_principal=Bucket(1.0, 10), per_ip=Bucket(1.0, 10)))
        rl.start()
        self.addCleanup(rl.stop)
        for n in range(1000):
            rl.check(f"p{n}", f"ip{n}", None)
        self.assertEqual(len(rl), 2000)
        clock.advance(59)
        self.assertEqual(len(rl), 2000)
        for _ in range(10):
            rl.check("busy", "busy-ip", None)
        clock.advance(1)
        self.assertEqual(len(rl), 2)  # busy has not refilled yet
        clock.advance(60)
        self.assertEqual(len(rl), 0)
        rl.stop()
        rl.stop()

    def test_capacity_never_throttles_known_clients(self) -> None:
        """A full table refuses new keys ("capacity"), never the clients it holds."""
        rl, clock = limiter(LimitsConfig(per_principal=Bucket(1.0, 5), per_ip=None), max_keys=3)
        for name in ("a", "b", "c"):
            self.assertIsNone(rl.check(name, "ip", None))
        self.assertEqual(rl.check("d", "ip", None), Refusal("capacity", CAPACITY_RETRY))
        for _ in range(4):
            self.assertIsNone(rl.check("a", "ip", None))
        self.assertEqual(rl.check("a", "ip", None), Refusal("principal", 1.0))
        self.assertEqual(len(rl), 3)
        # Once b and c have refilled, a forced prune makes room.
        clock.advance(1.5)
        self.assertIsNone(rl.check("d", "ip", None))
        self.assertEqual(len(rl), 2)

    def test_forced_prune_of_the_requests_own_buckets(self) -> None:
        """A forced prune may drop a full bucket the request uses: the token
        is then spent from a new bucket in the table, not a dropped one."""
        limits = LimitsConfig(per_principal=Bucket(1.0, 2), per_ip=Bucket(1.0, 2))
        rl, clock = limiter(limits, max_keys=2)
        self.assertIsNone(rl.check("a", "ip", None))
        clock.advance(1.5)  # both of a's buckets are full again
        self.assertIsNone(rl.check("b", "ip", None))
        self.assertEqual(len(rl), 2)
        self.assertIsNone(rl.check("b", "ip", None))
        self.assertEqual(rl.check("b", "ip", None), Refusal("principal", 1.0))

    def test_forced_prunes_are_rate_limited(self) -> None:
        rl, clock = limiter(LimitsConfig(per_principal=Bucket(1.0, 1), per_ip=None), max_keys=1)
        self.assertIsNone(rl.check("a", "ip", None))
        calls: list[int] = []
        prune = rl.prune

        def counting_prune() -> int:
            calls.append(1)
            return prune()

        self.patch(rl, "prune", counting_prune)
        for _ in range(100):
            self.assertEqual(rl.check("new", "ip", None), Refusal("capacity", CAPACITY_RETRY))
        self.assertEqual(len(calls), 1)
        clock.advance(CAPACITY_RETRY)
        self.assertIsNone(rl.check("new", "ip", None))
        self.assertEqual(len(calls), 2)

    @settings(max_examples=150)
    @given(
        rate=st.sampled_from([0.5, 1.0, 3.0, 10.0]),
        burst=st.integers(min_value=1, max_value=5),
        server_rate=st.sampled_from([0.25, 2.0]),
        server_burst=st.integers(min_value=1, max_value=4),
        tight=st.booleans(),
        steps=st.lists(
            st.tuples(
                st.sampled_from(["alice", "bob", "carol"]),
                st.sampled_from(["10.0.0.1", "10.0.0.2"]),
                st.sampled_from([None, "a", "b"]),
                st.sampled_from([0.0, 0.0, 0.01, 0.1, 0.3, 1.0, 7.0, 100.0]),
            ),
            max_size=120,
        ),
    )
    def test_invariants(
        self,
        rate: float,
        burst: int,
        server_rate: float,
        server_burst: int,
        tight: bool,
        steps: list[tuple[str, str, str | None, float]],
    ) -> None:
        """No key ever passes more than burst + rate * window; a refusal's
        retry_after is positive and, unless the table is tight, enough; the
        table never exceeds max_keys and empties once everyone has refilled;
        a client whose buckets all exist is never refused for capacity."""
        bridge = Bucket(rate, burst)
        server = Bucket(server_rate, server_burst)
        servers = {"a": ServerLimits(per_principal=server, per_ip=server, total=server)}
        max_keys = 8 if tight else 1000  # 11 keys can exist
        rl, clock = limiter(
            LimitsConfig(per_principal=bridge, per_ip=bridge), servers, max_keys=max_keys
        )
        rl.start()
        self.addCleanup(rl.stop)
        passed: dict[tuple[str, str], list[float]] = defaultdict(list)
        specs: dict[tuple[str, str], Bucket] = {}

        def attempt(principal: str, ip: str, name: str | None) -> Refusal | None:
            known = all(key in rl._buckets for key, _ in rl._applicable(principal, ip, name))
            refusal = rl.check(principal, ip, name)
            self.assertLessEqual(len(rl), max_keys)
            if known:
                self.assertNotEqual(getattr(refusal, "scope", None), "capacity")
            if refusal is None:
                now = clock.seconds()
                keys = [("principal", principal), ("ip", ip)]
                for key in keys:
                    specs[key] = bridge
                if name == "a":
                    for key in [("a-principal", principal), ("a-ip", ip), ("a-total", "")]:
                        keys.append(key)
                        specs[key] = server
                for key in keys:
                    passed[key].append(now)
            return refusal

        for principal, ip, name, dt in steps:
            clock.advance(dt)
            refusal = attempt(principal, ip, name)
            if refusal is not None:
                self.assertGreater(refusal.retry_after, 0.0)
                clock.advance(refusal.retry_after)
                second = attempt(principal, ip, name)
                if not tight:
                    self.assertIsNone(second, refusal)
        for key, times in passed.items():
            spec = specs[key]
            for i in range(len(times)):
                for j in range(i, len(times)):
                    allowed = spec.burst + spec.rate * (times[j] - times[i])
                    self.assertLessEqual(j - i + 1, allowed + 1e-6, key)
        clock.advance(max(burst / rate, server_burst / server_rate) + 60)
        self.assertEqual(len(rl), 0)


class CapsTests(SynchronousTestCase):
    def test_requests_in_flight(self) -> None:
        caps = Caps.from_limits(LimitsConfig(max_in_flight_per_principal=7))
        self.assertEqual(caps.max_in_flight, 7)
        for _ in range(3):
            caps.request_started("alice")
        caps.request_ended("alice")
        self.assertEqual((caps.requests("alice"), caps.requests("bob"), len(caps)), (2, 0, 1))
        caps.request_ended("alice")
        caps.request_ended("alice")
        caps.request_ended("alice")  # more ends than starts are harmless
        self.assertEqual((caps.requests("alice"), len(caps)), (0, 0))
        caps.set_limits(1, 1, 3)
        self.assertEqual(caps.max_in_flight, 3)

    def test_streams(self) -> None:
        caps = Caps(max_streams=2, max_sessions=1)
        self.assertTrue(caps.open_stream("alice"))
        self.assertTrue(caps.open_stream("alice"))
        self.assertFalse(caps.open_stream("alice"))
        self.assertTrue(caps.open_stream("bob"))
        caps.close_stream("alice")
        self.assertTrue(caps.open_stream("alice"))
        self.assertEqual(caps.streams("alice"), 2)

    def test_sessions_and_counters_removed_at_zero(self) -> None:
        caps = Caps.from_limits(LimitsConfig(max_sessions_per_principal=1))
        self.assertTrue(caps.open_session("alice"))
        self.assertFalse(caps.open_session("alice"))
        self.assertTrue(caps.open_stream("alice"))
        self.assertEqual(len(caps), 2)
        caps.close_session("alice")
        caps.close_stream("alice")
        self.assertEqual(len(caps), 0)
        caps.close_session("alice")  # more closes than opens are harmless
        caps.close_stream("nobody")
        self.assertEqual((caps.sessions("alice"), len(caps)), (0, 0))
        self.assertTrue(caps.open_session("alice"))
        self.assertFalse(caps.open_session("alice"))


class RetryAfterTests(SynchronousTestCase):
    def test_values(self) -> None:
        for seconds, header in [
            (0.0, b"1"),
            (-5.0, b"1"),
            (0.001, b"1"),
            (1.0, b"1"),
            (1.0000000001, b"1"),
            (1.01, b"2"),
            (59.5, b"60"),
            (float("inf"), b"86400"),
            (float("nan"), b"1"),
        ]:
            self.assertEqual(retry_after_header(seconds), header, seconds)

    @given(st.floats(min_value=0, max_value=86_000))
    def test_never_too_early(self, seconds: float) -> None:
        value = int(retry_after_header(seconds))
        self.assertGreaterEqual(value, 1)
        self.assertGreaterEqual(value, seconds - 1e-6)
        self.assertLess(value, max(seconds, 1.0) + 1)
        self.assertEqual(value, max(1, math.ceil(seconds - 1e-9)))


LIMITS = LimitsConfig(per_principal=Bucket(1.0, 3), per_ip=Bucket(2.0, 4))
SERVERS = {"s": ServerLimits(per_principal=Bucket(0.5, 2), total=Bucket(4.0, 5))}


class SharedTests(SynchronousTestCase):
    """With a cluster's store: the bridge-wide buckets in the store, a
    server's on the node, the answers of one node holding every bucket."""

    def shared(self) -> tuple[RateLimiter, FakeStore, Clock]:
        clock = Clock()
        clock.advance(1000)
        store = FakeStore(clock)
        return RateLimiter(LIMITS, SERVERS, clock, store=store), store, clock

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["alice", "bob", None]),
                st.sampled_from(["192.0.2.1", "192.0.2.2", None]),
                st.sampled_from(["s", "t", None]),
                st.integers(1, 6),
                st.integers(0, 1),
                st.sampled_from([0.0, 0.25, 0.5, 1.0, 3.0]),
            ),
            max_size=40,
        )
    )
    def test_answers_as_one_node(
        self, steps: list[tuple[str | None, str | None, str | None, int, int, float]]
    ) -> None:
        alone, clock = limiter(LIMITS, SERVERS)
        shared, _, shared_clock = self.shared()
        for principal, ip, server, cost, paid, wait in steps:
            clock.advance(wait)
            shared_clock.advance(wait)
            expected = alone.check(principal, ip, server, cost=cost, paid=paid)
            got = self.successResultOf(shared.decide(principal, ip, server, cost=cost, paid=paid))
            self.assertEqual(got is None, expected is None, (got, expected))
            if got is not None and expected is not None:
                self.assertEqual((got.scope, got.burst), (expected.scope, expected.burst))
                self.assertAlmostEqual(got.retry_after, expected.retry_after, places=9)

    def test_a_node_bucket_refusing_spends_nothing_shared(self) -> None:
        """A server's bucket on this node refuses: Redis is told not to spend."""
        limiter_, store, _ = self.shared()
        for _ in range(2):
            self.assertIsNone(self.successResultOf(limiter_.decide("alice", None, "s")))
        refusal = self.successResultOf(limiter_.decide("alice", None, "s"))
        self.assertEqual(refusal, Refusal("server-principal", 2.0))
        self.assertFalse(store.takes[-1][3])
        self.assertEqual(store.buckets["principal:alice"][0], 1.0)

    def test_unavailable(self) -> None:
        """Redis unavailable: every bucket is the node's own, decided at once."""
        limiter_, store, _ = self.shared()
        store.set_up(False)
        answers = [self.successResultOf(limiter_.decide("alice", None, None)) for _ in range(4)]
        self.assertEqual(answers, [None, None, None, Refusal("principal", 1.0)])
        self.assertEqual(store.fallbacks["down"], 4)
        self.assertEqual(store.buckets, {})

    def test_too_costly(self) -> None:
        """A cost no bucket can ever hold is refused without asking Redis."""
        limiter_, store, _ = self.shared()
        refusal = self.successResultOf(limiter_.decide("alice", None, None, cost=4))
        self.assertEqual(refusal.burst if refusal else None, 3)
        self.assertEqual(store.takes, [])
