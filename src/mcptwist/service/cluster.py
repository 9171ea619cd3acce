# -*- test-case-name: tests.test_cluster_service -*-
"""This node among the others: its record in the cluster's registry, the
heartbeat that keeps it there, and what the other nodes' records say.

With C{[cluster] redis}, L{ClusterService} writes this node's record every
C{heartbeat} seconds with a TTL of C{node_ttl} (so a node that dies
disappears), at once when Redis comes back after an outage, and withdraws
it when the node stops. The record says where the node is reached
(C{advertise}), what it runs and how it is. Without a Redis the cluster
is this node alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mcptwist import __version__
from mcptwist.cluster.store import Store
from mcptwist.config.model import ClusterConfig
from mcptwist.ops.metrics import Snapshot
from mcptwist.security.ratelimit import Caps

log = Logger(namespace="mcptwist.cluster")


class ClusterService(Service):
    """This node's record in the cluster's registry, kept fresh.

    C{snapshot} gives the servers and sessions (what the metrics read);
    C{health} the word of C{/health} (C{ok}, C{degraded}, C{unhealthy}).
    L{draining} is asked too: a node that drains says C{draining}.
    """

    def __init__(
        self,
        cluster: ClusterConfig | None,
        store: Store | None,
        clock: IReactorTime,
        snapshot: Callable[[], Snapshot],
        health: Callable[[], str],
    ) -> None:
        self.cluster = cluster
        self.store = store
        self.clock = clock
        self.snapshot = snapshot
        self.health = health
        # Whether this node is draining (set by whatever drains it).
        self.draining: Callable[[], bool] = lambda: False
        self.started: float | None = None
        self._addresses: dict[str, str] = {}
        self._addresses_until = float("-inf")
        # The caps each principal holds here, shared with the other nodes.
        self.caps: Caps | None = None
        self._beat = LoopingCall(self.beat)
        self._beat.clock = clock
        if store is not None:
            store.watch(self._store_changed)

    @property
    def node_id(self) -> str | None:
        return self.cluster.node_id if self.cluster is not None else None

    @property
    def redis(self) -> str | None:
        """C{up} or C{down}; None without a cluster Redis."""
        if self.store is None:
            return None
        return "up" if self.store.up else "down"

    def startService(self) -> None:
        super().startService()
        self.started = self.clock.seconds()
        if self.store is None or self.cluster is None:
            return
        self.store.start()
        self._beat.start(self.cluster.heartbeat, now=True)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._beat.running:
            self._beat.stop()
        if self.store is None or self.node_id is None:
            return None
        store = self.store
        return store.withdraw(self.node_id).addBoth(lambda _: store.stop())

    def reconfigure(self, cluster: ClusterConfig | None) -> None:
        """A reload's keys and timings (the node's id, Redis and address are
        the same: the reload refuses to change them)."""
        self.cluster = cluster
        if cluster is None or self.store is None:
            return
        self.store.reconfigure(cluster)
        if self._beat.running and self._beat.interval != cluster.heartbeat:
            self._beat.stop()
            self._beat.start(cluster.heartbeat, now=True)

    def record(self) -> dict[str, Any]:
        """This node as the registry shows it."""
        snapshot = self.snapshot()
        cluster = self.cluster
        return {
            "node_id": self.node_id,
            "url": cluster.advertise if cluster is not None else None,
            "version": __version__,
            "started": self.started,
            "health": "draining" if self.draining() else self.health(),
            "servers": {
                s.name: {"state": s.state, "children": s.children, "sessions": s.sessions}
                for s in snapshot.servers
            },
            "sessions": snapshot.sessions_total,
            # What each principal holds here (the other nodes count it in its caps).
            "held": self.caps.held_here() if self.caps is not None else {},
        }

    def beat(self) -> Deferred[None]:
        """One heartbeat: write this node's record, then read the others'
        (their addresses, and what each principal holds there)."""
        if self.store is None or self.cluster is None or not self.store.up:
            return succeed(None)
        store = self.store

        def read(_: object) -> Deferred[None]:
            return store.nodes().addCallback(self._learn)

        return self.announce().addCallback(read)

    def _learn(self, records: dict[str, dict[str, Any]] | None) -> None:
        if records is None:
            return
        self._remember(records)
        if self.caps is None:
            return
        elsewhere: dict[str, dict[str, int]] = {}
        for node, record in records.items():
            held = record.get("held")
            if node == self.node_id or not isinstance(held, dict):
                continue
            for kind, counts in held.items():
                if not isinstance(counts, dict):
                    continue
                total = elsewhere.setdefault(str(kind), {})
                for principal, count in counts.items():
                    if isinstance(count, int):
                        total[principal] = total.get(principal, 0) + count
        self.caps.held_elsewhere(elsewhere)

    def announce(self) -> Deferred[bool]:
        """Write this node's record (while Redis is up): it lives C{node_ttl} seconds."""
        if self.store is None or self.cluster is None or not self.store.up:
            return succeed(False)
        return self.store.announce(self.cluster.node_id, self.record(), self.cluster.node_ttl)

    def _store_changed(self, up: bool) -> None:
        if not up and self.caps is not None:
            # The others' counts are not known any more: the caps are this node's.
            self.caps.held_elsewhere({})
        if up and self.running:
            # Back after an outage (or up for the first time): say so at once.
            self.announce()

    def nodes(self) -> Deferred[dict[str, Any]]:
        """Every node's record (this one marked C{"self": true}) and whether
        Redis is up; without Redis, or while it is down, this node alone.
        (What each principal holds is left out: it is the caps' business.)"""
        own = {**_shown(self.record()), "self": True}
        view: dict[str, Any] = {"node_id": self.node_id, "redis": self.redis, "nodes": [own]}
        if self.store is None:
            return succeed(view)

        def found(records: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
            view["redis"] = self.redis
            if records is None:
                return view
            self._remember(records)
            others = [
                {**_shown(record), "node_id": node, "self": False}
                for node, record in sorted(records.items())
                if node != self.node_id
            ]
            view["nodes"] = sorted([own, *others], key=lambda r: str(r["node_id"]))
            return view

        return self.store.nodes().addCallback(found)

    def node_ids(self) -> Deferred[list[str]]:
        """The ids of the live nodes, this one included (this one alone
        without Redis, or while it is down)."""
        return self.nodes().addCallback(lambda view: [str(r["node_id"]) for r in view["nodes"]])

    def address(self, node_id: str) -> Deferred[str | None]:
        """The URL a node advertises (None: no live node of that id, or Redis
        is unavailable); what the registry said is kept for a heartbeat (a
        node not in it is asked for again: it may have just joined)."""
        cluster = self.cluster
        if cluster is not None and node_id == cluster.node_id:
            return succeed(cluster.advertise)
        if self.clock.seconds() < self._addresses_until and node_id in self._addresses:
            return succeed(self._addresses[node_id])
        if self.store is None:
            return succeed(None)

        def found(records: dict[str, dict[str, Any]] | None) -> str | None:
            if records is None:
                return None
            self._remember(records)
            return self._addresses.get(node_id)

        return self.store.nodes().addCallback(found)

    def _remember(self, records: dict[str, dict[str, Any]]) -> None:
        self._addresses = {
            node: record["url"]
            for node, record in records.items()
            if isinstance(record.get("url"), str)
        }
        heartbeat = self.cluster.heartbeat if self.cluster is not None else 0.0
        self._addresses_until = self.clock.seconds() + heartbeat


def _shown(record: dict[str, Any]) -> dict[str, Any]:
    """A node's record as the admin API shows it."""
    return {k: v for k, v in record.items() if k != "held"}
