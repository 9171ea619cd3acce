# -*- test-case-name: tests.test_ratelimit -*-
"""Rate limits (token buckets) and concurrency caps per principal and IP.

A request is checked against the bridge-wide buckets of its principal and
its IP, then the buckets of the server it addresses (per principal, per IP,
total). It spends one token from each only if every one of them allows it,
so a request refused by a rate limit costs the client nothing (one refused
later, by anything else, keeps what it paid). A JSON-RPC batch costs one
token per message: the request's admission pays for the first, the batch's
parse for the others.

Buckets exist only for keys that were seen recently: a bucket that has
refilled to its burst is indistinguishable from a new one, so it is dropped
by L{RateLimiter.prune}, which runs every minute and whenever the table is
full.

In a cluster with a Redis (L{RateLimiter.decide}), the bridge-wide buckets
(per principal, per IP) live in Redis, shared by every node, and a
server's own buckets stay on the node (they guard that node's children);
while Redis is unavailable the node uses its own bridge-wide buckets too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mcptwist.cluster.store import Bucket as SharedBucket
from mcptwist.cluster.store import Store, Waits
from mcptwist.config.model import Bucket, LimitsConfig, ServerLimits

log = Logger(namespace="mcptwist.ratelimit")

MAX_KEYS: Final = 100_000
PRUNE_INTERVAL: Final = 60.0
# When the table is full, prune again on demand at most this often, and tell
# refused new clients to retry after this long.
CAPACITY_RETRY: Final = 1.0
# Slack for float rounding: waiting exactly the advertised Retry-After
# must be enough.
_EPSILON: Final = 1e-9
_MAX_RETRY_AFTER: Final = 86_400


class TokenBucket:
    """C{burst} tokens at most, refilled continuously at C{rate} per second."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if not rate > 0 or not burst >= 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, not {rate}, {burst}")
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.updated = now

    def _refill(self, now: float) -> None:
        # A clock that went back refills nothing, and counts from the new time.
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.updated = now

    def peek(self, now: float, cost: float = 1.0) -> float:
        """Like L{take}, but spends nothing."""
        self._refill(now)
        missing = cost - self.tokens
        return 0.0 if missing <= _EPSILON else missing / self.rate

    def take(self, now: float, cost: float = 1.0) -> float:
        """Spend C{cost} tokens if there are enough.

        @return: 0.0 if they were spent, else the seconds until there are
            enough (for C{Retry-After}); nothing is spent then.
        """
        wait = self.peek(now, cost)
        if wait == 0.0:
            self.spend(cost)
        return wait

    def spend(self, cost: float = 1.0) -> None:
        """Spend C{cost} tokens that a L{peek} at the current time allowed."""
        self.tokens = max(0.0, self.tokens - cost)

    def full(self, now: float) -> bool:
        """Whether the bucket is back at C{burst}, like a new one."""
        self._refill(now)
        return self.tokens >= self.burst


@attrs.frozen
class Refusal:
    """Why a request was refused, and when to retry.

    C{scope} is the first limit that refused, in check order:
    C{"principal"}, C{"ip"}, C{"server-principal"}, C{"server-ip"},
    C{"server-total"}, or C{"capacity"} (the bucket table is full).
    C{retry_after} is the longest wait among all refusing limits, so that a
    retry after it passes unless others spent the tokens meanwhile.
    C{burst} is set when the cost is more than that limit's bucket can ever
    hold (a batch larger than its burst): no retry will pass.
    """

    scope: str
    retry_after: float
    burst: int | None = None


_Key = tuple[str, str, str]  # (scope, server or "", principal or IP or "")
_Limits = list[tuple[_Key, Bucket]]
# The scopes whose buckets a cluster shares through its store (they come
# first in check order).
SHARED_SCOPES: Final = frozenset({"principal", "ip"})


class RateLimiter:
    """The bridge's token buckets, created on demand and pruned when full.

    The table holds at most C{max_keys} buckets. When a request needs new
    buckets and the table is full, full buckets are pruned (at most once
    per L{CAPACITY_RETRY} seconds); if that frees too little, the request is
    refused with scope C{"capacity"}. That only refuses keys not seen
    recently: a client whose buckets all exist is never refused for
    capacity, and no limit is ever skipped, so flooding the table with new
    IPs or principals can neither lift nor reset anyone's limits.
    """

    def __init__(
        self,
        limits: LimitsConfig,
        server_limits: Mapping[str, ServerLimits],
        clock: IReactorTime,
        *,
        max_keys: int = MAX_KEYS,
        prune_interval: float = PRUNE_INTERVAL,
        store: Store | None = None,
    ) -> None:
        specs = [limits.per_principal, limits.per_ip]
        for s in server_limits.values():
            specs += [s.per_principal, s.per_ip, s.total]
        for spec in specs:
            if spec is not None and not (spec.rate > 0 and spec.burst >= 1):
                raise ValueError(f"rate limit {spec} needs rate > 0 and burst >= 1")
        self.limits = limits
        self.server_limits = dict(server_limits)
        self.max_keys = max_keys
        # A cluster's shared buckets (see decide); None: every bucket is local.
        self.store = store
        self._clock = clock
        self._buckets: dict[_Key, TokenBucket] = {}
        self._next_forced_prune = float("-inf")
        self._loop = LoopingCall(self.prune)
        self._loop.clock = clock
        self._interval = prune_interval

    def __len__(self) -> int:
        """How many buckets exist now."""
        return len(self._buckets)

    def start(self) -> None:
        """Prune full buckets every C{prune_interval} seconds."""
        if not self._loop.running:
            self._loop.start(self._interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def prune(self) -> int:
        """Drop the buckets that are full (as good as new); return how many."""
        now = self._clock.seconds()
        full = [key for key, bucket in self._buckets.items() if bucket.full(now)]
        for key in full:
            del self._buckets[key]
        return len(full)

    def _applicable(
        self,
        principal: str | None,
        ip: str | None,
        server: str | None,
        ip_charged: bool = False,
        server_only: bool = False,
    ) -> list[tuple[_Key, Bucket]]:
        found: list[tuple[_Key, Bucket]] = []
        if self.limits.per_principal is not None and principal is not None and not server_only:
            found.append((("principal", "", principal), self.limits.per_principal))
        if self.limits.per_ip is not None and ip is not None and not ip_charged and not server_only:
            found.append((("ip", "", ip), self.limits.per_ip))
        limits = self.server_limits.get(server) if server is not None else None
        if server is not None and limits is not None:
            if limits.per_principal is not None and principal is not None:
                found.append((("server-principal", server, principal), limits.per_principal))
            if limits.per_ip is not None and ip is not None:
                found.append((("server-ip", server, ip), limits.per_ip))
            if limits.total is not None:
                found.append((("server-total", server, ""), limits.total))
        return found

    def check(
        self,
        principal: str | None,
        ip: str | None,
        server: str | None,
        ip_charged: bool = False,
        cost: int = 1,
        paid: int = 0,
        server_only: bool = False,
    ) -> Refusal | None:
        """Spend C{cost} tokens of every applicable bucket, or refuse and spend none.

        C{principal} None (no authentication) skips the per-principal buckets,
        C{ip} None (a local peer) the per-IP ones; C{ip_charged} skips the
        bridge-wide per-IP bucket (already charged before authentication).
        C{paid}: tokens this request already spent, so that a bucket must
        be able to hold C{cost + paid} (or no retry could ever pass).
        C{server_only}: only the server's own buckets (a request an endpoint
        routes to one of its members, charged to the bridge-wide ones already).
        """
        applicable = self._applicable(principal, ip, server, ip_charged, server_only)
        return self._check(applicable, cost, paid)

    def _check(
        self, applicable: _Limits, cost: int, paid: int, spend: bool = True
    ) -> Refusal | None:
        """L{check} on these buckets; without C{spend}, only what it would answer
        (nothing is spent, nor any bucket made)."""
        too_costly = _too_costly(applicable, cost + paid)
        if too_costly is not None:
            return too_costly
        now = self._clock.seconds()
        buckets = self._buckets
        found = [buckets.get(key) for key, _ in applicable]
        scope: str | None = None
        wait = 0.0
        missing = 0
        for (key, _), bucket in zip(applicable, found, strict=True):
            if bucket is None:
                missing += 1  # a new bucket is full, so it allows
                continue
            if bucket.peek(now, cost) > 0.0:
                scope = scope or key[0]
                # A retry pays again what this request already paid.
                wait = max(wait, bucket.peek(now, cost + paid))
        if scope is not None:
            return Refusal(scope, wait)
        if not spend:
            return None
        if missing and len(buckets) + missing > self.max_keys:
            if now >= self._next_forced_prune:
                self._next_forced_prune = now + CAPACITY_RETRY
                self.prune()
                # The prune may have dropped some of this request's own buckets
                # (full ones: new ones in their place are the same).
                found = [buckets.get(key) for key, _ in applicable]
                missing = found.count(None)
            if len(buckets) + missing > self.max_keys:
                return Refusal("capacity", CAPACITY_RETRY)
        # Every bucket was refilled to now and allows: spend from each.
        for (key, spec), bucket in zip(applicable, found, strict=True):
            if bucket is None:
                bucket = buckets[key] = TokenBucket(spec.rate, spec.burst, now)
            bucket.spend(cost)
        return None

    def decide(
        self,
        principal: str | None,
        ip: str | None,
        server: str | None,
        ip_charged: bool = False,
        cost: int = 1,
        paid: int = 0,
    ) -> Deferred[Refusal | None]:
        """L{check} with the bridge-wide buckets in the cluster's store.

        The node's own buckets (a server's) are looked at first, spending
        nothing; then the store takes from the shared buckets, all or none,
        and only if the node's own allow too; then the node's own are spent.
        The answer is the one L{check} would give on one node holding every
        bucket (the first refusing scope, the longest wait), except that a
        request whose own buckets another request on this node emptied while
        the store answered is refused having paid the shared ones. When the
        store is unavailable (it answers at once while Redis is down), every
        bucket is the node's own.
        """
        store = self.store
        applicable = self._applicable(principal, ip, server, ip_charged)
        shared = [(key, spec) for key, spec in applicable if key[0] in SHARED_SCOPES]
        if store is None or not shared:
            return succeed(self._check(applicable, cost, paid))
        too_costly = _too_costly(applicable, cost + paid)
        if too_costly is not None:
            return succeed(too_costly)
        own = applicable[len(shared) :]
        refused = self._check(own, cost, paid, spend=False)
        buckets = [
            SharedBucket(f"{key[0]}:{key[2]}", spec.rate, spec.burst) for key, spec in shared
        ]
        d = store.take(buckets, cost, paid, spend=refused is None)

        def decided(waits: Waits) -> Refusal | None:
            if waits is None:
                return self._check(applicable, cost, paid)
            scope = next((key[0] for (key, _), w in zip(shared, waits, strict=True) if w), None)
            if scope is None:
                if refused is None:
                    return self._check(own, cost, paid)
                scope = refused.scope
            return Refusal(scope, max(0.0, *waits, refused.retry_after if refused else 0.0))

        def failed(failure: Failure) -> Refusal | None:
            log.failure(
                "while asking the cluster's store; limiting with this node's buckets", failure
            )
            return self._check(applicable, cost, paid)

        return d.addCallbacks(decided, failed)


def _too_costly(applicable: _Limits, cost: int) -> Refusal | None:
    """The refusal of a cost more than one of these buckets can ever hold."""
    for key, spec in applicable:
        if cost > spec.burst:
            return Refusal(key[0], float(_MAX_RETRY_AFTER), spec.burst)
    return None


class _Counter:
    """Open things per principal; a principal at zero has no entry."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.counts: dict[str, int] = {}
        # What each principal holds on the cluster's other nodes (as of their
        # last heartbeats): the cap is the cluster's.
        self.elsewhere: Mapping[str, int] = {}

    def held(self, principal: str) -> int:
        return self.counts.get(principal, 0) + self.elsewhere.get(principal, 0)

    def open(self, principal: str) -> bool:
        if self.held(principal) >= self.limit:
            return False
        self.counts[principal] = self.counts.get(principal, 0) + 1
        return True

    def close(self, principal: str) -> None:
        count = self.counts.get(principal, 0)
        if count <= 1:
            self.counts.pop(principal, None)
        else:
            self.counts[principal] = count - 1


class Caps:
    """How many SSE streams, sessions and requests in flight each principal
    holds at once; in a cluster, on all its nodes (the others' counts come
    with their heartbeats, L{held_elsewhere}, so a principal may pass a cap
    by what it opens elsewhere within one heartbeat).

    Every successful C{open_*} must be paired with one C{close_*}; closing
    more than was opened is harmless. Requests are counted as they start and
    end (L{request_started}, L{request_ended}); the transports check for
    room (L{requests}) before they deliver any of a POST's messages.
    """

    def __init__(self, max_streams: int, max_sessions: int, max_in_flight: int = 2**31 - 1) -> None:
        self._streams = _Counter(max_streams)
        self._sessions = _Counter(max_sessions)
        self._requests = _Counter(max_in_flight)

    @classmethod
    def from_limits(cls, limits: LimitsConfig) -> Caps:
        return cls(
            limits.max_streams_per_principal,
            limits.max_sessions_per_principal,
            limits.max_in_flight_per_principal,
        )

    def set_limits(
        self, max_streams: int, max_sessions: int, max_in_flight: int | None = None
    ) -> None:
        """New caps (a reload); what is open stays counted."""
        self._streams.limit = max_streams
        self._sessions.limit = max_sessions
        if max_in_flight is not None:
            self._requests.limit = max_in_flight

    @property
    def max_in_flight(self) -> int:
        return self._requests.limit

    def requests(self, principal: str) -> int:
        """The principal's requests in flight now (on the whole cluster)."""
        return self._requests.held(principal)

    def request_started(self, principal: str) -> None:
        """Count a request sent on (room was checked before)."""
        counts = self._requests.counts
        counts[principal] = counts.get(principal, 0) + 1

    def request_ended(self, principal: str) -> None:
        self._requests.close(principal)

    def open_stream(self, principal: str) -> bool:
        """Count a new stream, or return False if the principal is at its cap."""
        return self._streams.open(principal)

    def close_stream(self, principal: str) -> None:
        self._streams.close(principal)

    def open_session(self, principal: str) -> bool:
        """Count a new session, or return False if the principal is at its cap."""
        return self._sessions.open(principal)

    def close_session(self, principal: str) -> None:
        self._sessions.close(principal)

    def streams(self, principal: str) -> int:
        return self._streams.held(principal)

    def sessions(self, principal: str) -> int:
        return self._sessions.held(principal)

    def held_here(self) -> dict[str, dict[str, int]]:
        """What each principal holds on this node, by kind (what this node
        tells the cluster's other nodes)."""
        return {
            "sessions": dict(self._sessions.counts),
            "streams": dict(self._streams.counts),
            "requests": dict(self._requests.counts),
        }

    def held_elsewhere(self, held: Mapping[str, Mapping[str, int]]) -> None:
        """What each principal holds on the other nodes, by kind (their
        L{held_here}, summed): from now on each cap counts it too."""
        self._sessions.elsewhere = dict(held.get("sessions", {}))
        self._streams.elsewhere = dict(held.get("streams", {}))
        self._requests.elsewhere = dict(held.get("requests", {}))

    def __len__(self) -> int:
        """How many counters exist (principals with anything open)."""
        return len(self._streams.counts) + len(self._sessions.counts) + len(self._requests.counts)


def retry_after_header(seconds: float) -> bytes:
    """A C{Retry-After} value: whole seconds, rounded up, at least 1.

    Float noise just above a whole number is not rounded up; absurd values
    (NaN, infinite, beyond a day) become 1 or a day.
    """
    if math.isnan(seconds):
        return b"1"
    whole = math.ceil(min(seconds, _MAX_RETRY_AFTER) - _EPSILON)
    return str(max(1, whole)).encode("ascii")
