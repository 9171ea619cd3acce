"""An in-memory cluster store on a Clock: the L{Store} interface of
L{mcptwist.cluster.store}, with the token buckets of its Lua script and the
node registry's TTLs, and a switch for Redis going away and coming back."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from mcptwist.cluster.store import FALLBACK_REASONS, Bucket, Waits
from mcptwist.config.model import ClusterConfig


class FakeStore:
    """What a cluster's Redis holds, kept in memory.

    Set L{available} False to make it unreachable (every command answers
    "unavailable", as a L{RedisStore} that is down does) and True to bring
    it back; L{hold} makes commands wait until L{release} (or L{step}).
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, time)
        self.records: dict[str, tuple[str, float]] = {}  # node -> (JSON, expiry)
        self.started = False
        self.config: ClusterConfig | None = None
        self.takes: list[tuple[tuple[Bucket, ...], int, int, bool]] = []
        self._up = True
        self._fallbacks = dict.fromkeys(FALLBACK_REASONS, 0)
        self._watchers: list[Callable[[bool], None]] = []
        self._held: list[tuple[Deferred[Any], Callable[[], Any]]] | None = None

    @property
    def up(self) -> bool:
        return self._up

    @property
    def fallbacks(self) -> Mapping[str, int]:
        return self._fallbacks

    def set_up(self, up: bool) -> None:
        """Redis becomes reachable, or not (watchers are told)."""
        if up != self._up:
            self._up = up
            for watcher in list(self._watchers):
                watcher(up)

    def watch(self, watcher: Callable[[bool], None]) -> None:
        self._watchers.append(watcher)

    def hold(self) -> None:
        """Commands from now on wait for L{release} (a slow Redis)."""
        self._held = []

    def release(self) -> None:
        """Answer what waits, and stop holding."""
        held, self._held = self._held or [], None
        for d, command in held:
            d.callback(command())

    def step(self) -> int:
        """Answer what waits now, holding what comes next; how many were answered."""
        held, self._held = self._held or [], []
        for d, command in held:
            d.callback(command())
        return len(held)

    def _run(self, command: Callable[[], Any]) -> Deferred[Any]:
        if self._held is not None:
            d: Deferred[Any] = Deferred()
            self._held.append((d, command))
            return d
        return succeed(command())

    def take(
        self, buckets: Sequence[Bucket], cost: int = 1, paid: int = 0, spend: bool = True
    ) -> Deferred[Waits]:
        self.takes.append((tuple(buckets), cost, paid, spend))
        if not self._up:
            self._fallbacks["down"] += 1
            return succeed(None)
        return self._run(lambda: self._take(buckets, cost, paid, spend))

    def _take(self, buckets: Sequence[Bucket], cost: int, paid: int, spend: bool) -> Waits:
        if not self._up:
            self._fallbacks["error"] += 1
            return None
        now = self.clock.seconds()
        tokens = []
        waits = []
        for bucket in buckets:
            have, then = self.buckets.get(bucket.key, (bucket.burst, now))
            have = min(bucket.burst, have + max(0.0, now - then) * bucket.rate)
            tokens.append(have)
            waits.append(0.0 if cost - have <= 1e-9 else (cost + paid - have) / bucket.rate)
        if spend and not any(waits):
            for bucket, have in zip(buckets, tokens, strict=True):
                self.buckets[bucket.key] = (max(0.0, have - cost), now)
        return tuple(waits)

    def announce(self, node_id: str, record: Mapping[str, Any], ttl: float) -> Deferred[bool]:
        if not self._up:
            return succeed(False)
        body = json.dumps(record)
        return self._run(lambda: self._write(node_id, body, ttl))

    def _write(self, node_id: str, body: str, ttl: float) -> bool:
        self.records[node_id] = (body, self.clock.seconds() + ttl)
        return True

    def withdraw(self, node_id: str) -> Deferred[bool]:
        if not self._up:
            return succeed(False)
        return self._run(lambda: self.records.pop(node_id, None) is not None or True)

    def nodes(self) -> Deferred[dict[str, dict[str, Any]] | None]:
        if not self._up:
            return succeed(None)
        return self._run(self._live)

    def _live(self) -> dict[str, dict[str, Any]]:
        now = self.clock.seconds()
        return {
            node: copy.deepcopy(json.loads(body))
            for node, (body, expiry) in self.records.items()
            if expiry > now
        }

    def start(self) -> None:
        self.started = True

    def reconfigure(self, config: ClusterConfig) -> None:
        self.config = config

    def stop(self) -> Deferred[None]:
        self.started = False
        return succeed(None)
