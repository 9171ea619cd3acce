# -*- test-case-name: tests.test_service -*-
"""The service tree: the audit trail, the admission rules, this node in its
cluster, every server's children, the sessions, the listeners, the reloader
and the report to systemd.

Start order: bind the listeners (refusing a non-loopback one unless the
config says C{insecure = true}), then spawn the children. Stop order: stop
listening, end every session and stream (answering what is in flight), then
stop the children and wait for them to exit.
"""

from __future__ import annotations

import gc
import signal
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.web.resource import IResource

from mcptwist.cluster.keys import SessionIds, cluster_keys
from mcptwist.cluster.store import RedisStore, Store
from mcptwist.config.model import BridgeConfig, ConfigError, ListenerConfig, url_path
from mcptwist.ops.audit import AuditError, AuditTrail
from mcptwist.ops.history import CallHistory
from mcptwist.ops.metrics import ClusterSnapshot, Metrics, Snapshot
from mcptwist.ops.notify import SystemdNotifier
from mcptwist.ops.record import Recorders
from mcptwist.routing.backends import Backend
from mcptwist.routing.pins import PinBook, PinFileError, read_pin_file
from mcptwist.routing.record import Recorder
from mcptwist.routing.sessions import SessionRegistry
from mcptwist.service.cluster import ClusterService
from mcptwist.service.control import BridgeControl
from mcptwist.service.fleet import Fleet
from mcptwist.service.listener import Listener, ListenerError, ListenerGroup, describe_address
from mcptwist.service.reload import (
    Reloader,
    ReloadRefused,
    changed_settings,
    refuse_exposure,
    revoke,
)
from mcptwist.service.site import BridgeSite, MetricsOnly
from mcptwist.web.access import AccessControl
from mcptwist.web.admin import AdminAPI
from mcptwist.web.app import BridgeApp
from mcptwist.web.channel import ConnectionCounter
from mcptwist.web.dashboard import Dashboard
from mcptwist.web.sse import Heartbeat

if TYPE_CHECKING:
    from mcptwist.ops.telemetry import Telemetry

log = Logger(namespace="mcptwist.service")

# How often a draining node looks whether its sessions have ended.
DRAIN_POLL: Final = 0.5


class BridgeService(MultiService):
    """The root of the bridge's service tree; SIGHUP reloads its configuration.

    Its children start in this order, and stop in the reverse one:

     1. the audit trail (opened before privileges are dropped);
     2. the admission rules (their key refresh and rate limit timers);
     3. this node in its cluster (L{ClusterService}: with a cluster Redis,
        the connection and the heartbeat of its record; on stop, the record
        is withdrawn and the connection closed);
     4. the L{Fleet}: every server's backend, which spawns its children;
     5. the SSE streams' heartbeat (on stop, the streams left end);
     6. the L{SessionRegistry} (on stop, every session ends, answering
        what is in flight);
     7. the listeners, the bridge's and the metrics' (they bind before any
        child starts, in C{privilegedStartService}; on stop they stop
        listening, together);
     8. the L{Reloader} (on stop, a reload under way ends first);
     9. the report to systemd (L{Readiness}).

    Unlike a plain MultiService it waits for each child to stop before it
    stops the next (L{stopService}).
    """

    def __init__(
        self,
        config: BridgeConfig,
        reactor: Any,
        environ: Mapping[str, str],
        handle_sighup: bool = False,
        config_path: str | None = None,
        notifier: SystemdNotifier | None = None,
        listen_override: tuple[ListenerConfig, ...] | None = None,
        freeze_gc: bool = False,
        store: Store | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        # Traces and their metrics (None: not traced; OpenTelemetry is loaded
        # only when [telemetry] asks for it).
        if telemetry is None and config.telemetry is not None:
            from mcptwist.ops.telemetry import build

            telemetry = build(config.telemetry, environ)
        self.telemetry = telemetry
        self.notifier = notifier if notifier is not None else SystemdNotifier({}, reactor)
        self.audit = AuditTrail(config.audit, reactor)
        self.metrics: Metrics | None = None
        # The core's sessions, requests and children: written by the audit
        # trail (when it has a file, which a reload may give or take) and
        # counted by the metrics, each told once.
        recorders: list[Recorder] = [self.audit]
        if config.metrics.enabled:
            self.metrics = Metrics(start_time=reactor.seconds())
            self.metrics.set_source(self._snapshot)
            # The refusals only reach the audit trail, which counts them.
            self.audit.metrics = self.metrics
            recorders.append(self.metrics)
        # The dashboard's charts: the last minutes of calls, while an admin API may show them.
        self.history = CallHistory(reactor) if config.admin.enabled else None
        if self.history is not None:
            recorders.append(self.history)
        self.recorder: Recorder = recorders[0] if len(recorders) == 1 else Recorders(*recorders)
        cluster = config.cluster
        # The state shared with the cluster's other nodes (None: nothing is shared).
        if store is None and cluster is not None and cluster.redis:
            store = RedisStore(cluster, reactor)
        self.store = store
        self.access = AccessControl.from_config(config, reactor, self.audit, store=self.store)
        # Open connections by client address, over every listener.
        self.connections = ConnectionCounter(config.limits.max_connections_per_ip)
        # Reap often enough that no session outlives its idle timeout by much.
        shortest = min(s.session_idle_timeout for s in config.servers.values())
        self.registry = SessionRegistry(
            reactor,
            config.max_sessions,
            max(1.0, min(30.0, shortest / 4)),
            caps=self.access.caps,
            recorder=self.recorder,
            ids=session_ids(config),
        )
        self.pins = _pin_book(config, self.recorder)
        self.fleet = Fleet(
            config,
            reactor,
            environ,
            self.recorder,
            self.registry,
            self.access,
            self.pins,
            tracer=telemetry,
        )
        self.fleet.serving = self._log_urls
        self.web = BridgeApp(config, self.fleet.backends, self.registry, reactor, self.access)
        self.web.draining = self.fleet.draining
        self.web.endpoints = self.fleet.endpoints
        self.web.pins = self.pins
        self.web.tracer = telemetry
        self.cluster = ClusterService(
            cluster, self.store, reactor, self._snapshot, self.web.health_status
        )
        # Each principal's caps hold on the whole cluster.
        self.cluster.caps = self.access.caps
        if self.web.forwarder is not None:
            # Retries and admin requests for other nodes find them in the registry.
            self.web.forwarder.directory = self.cluster
        self.reloader = Reloader(
            self,
            reactor,
            environ,
            self.notifier,
            self.audit,
            config_path=config_path,
            listen_override=listen_override,
            handle_sighup=handle_sighup,
        )
        # Fires once a drain has ended (None: not draining); cut short by a second SIGTERM.
        self._drained: Deferred[None] | None = None
        self._cut = False
        self._stopping = False
        self.control = BridgeControl(
            self.fleet,
            self.registry,
            self.reloader.reload,
            lambda: bool(self.running),
            self.cluster.nodes,
            drain=self._drain_and_stop,
        )
        dashboard = Dashboard(
            self.control.servers, self._endpoint_statuses, self.audit, self.history
        )
        self.web.admin = AdminAPI(
            self.control, self.audit, self.web.forwarder, dashboard
        ).resource()
        self._metrics_root: IResource | None = None
        if self.metrics is not None:
            # One resource (a leaf that only renders), at /metrics and on metrics listeners.
            self.web.metrics = self.metrics.resource()
            self._metrics_root = MetricsOnly(self.web.metrics, self.web)
        self.resource = self.web.resource()
        metrics_listeners = config.metrics.listeners if self.metrics is not None else ()
        # systemd: endpoints adopted so far (each inherited socket can be adopted once).
        adopted = {
            listener.endpoint
            for listener in [*config.listeners, *metrics_listeners]
            if listener.endpoint.startswith("systemd:")
        }
        self.listening = ListenerGroup(self._listener, adopted)
        self.metrics_listening = ListenerGroup(
            lambda listener: self._listener(listener, self._metrics_root), adopted
        )
        for listener in config.listeners:
            self._listener(listener).setServiceParent(self.listening)
        for listener in metrics_listeners:
            self._listener(listener, self._metrics_root).setServiceParent(self.metrics_listening)
        # Both kinds stop listening at once.
        listening = MultiService()
        self.listening.setServiceParent(listening)
        self.metrics_listening.setServiceParent(listening)
        for child in (
            AuditService(self.audit),
            # Stopped after everything it traces: what is left is sent then.
            *([telemetry] if telemetry is not None else []),
            AccessService(self.access),
            self.cluster,
            self.fleet,
            HeartbeatService(self.web.heartbeat),
            self.registry,
            listening,
            self.reloader,
            Readiness(self.fleet, self.notifier, reactor, freeze_gc),
        ):
            child.setServiceParent(self)

    def _listener(self, config: ListenerConfig, resource: IResource | None = None) -> Listener:
        # The bridge takes JSON bodies only: Twisted's form parsing would read
        # them twice, and it raises on some malformed Content-Type values.
        site = BridgeSite(
            resource or self.resource, reactor=self.reactor, parsePOSTFormSubmission=False
        )
        site.metrics = self.metrics
        site.is_server = self.fleet.is_server
        site.audit = self.audit
        site.connections = self.connections
        site.configure(self.config.limits)
        site.noisy = False
        site.access_log = self.config.access_log
        site.listener = config
        # A metrics listener asks for no credentials: authentication elsewhere
        # does not open it to the network.
        open_to_network = self.config.insecure or (self.config.auth.enabled and resource is None)
        return Listener(config, site, self.reactor, open_to_network, self.audit)

    @property
    def config(self) -> BridgeConfig:
        """The configuration in force (a reload replaces it)."""
        return self.fleet.config

    @property
    def backends(self) -> dict[str, Backend]:
        """The servers served, by name."""
        return self.fleet.backends

    @property
    def listeners(self) -> list[Listener]:
        return list(self.listening)

    @property
    def metrics_listeners(self) -> list[Listener]:
        return list(self.metrics_listening)

    @property
    def site(self) -> BridgeSite:
        """The first listener's site (what tests drive directly)."""
        site = self.listeners[0].site
        assert isinstance(site, BridgeSite)
        return site

    def startService(self) -> None:
        super().startService()
        if self.config.cluster is not None and self.reloader.handle_sighup:
            # A node drains on SIGTERM; a second SIGTERM ends the drain. (Once
            # the reactor runs: it installs its own handler as it starts.)
            self.reactor.callWhenRunning(
                signal.signal,
                signal.SIGTERM,
                lambda *_: self.reactor.callFromThread(self._sigterm),
            )

    def _sigterm(self) -> None:
        if not self._stopping:
            self.reactor.stop()  # the stop drains first
        elif self._drained is not None and not self._drained.called and not self._cut:
            log.info("a second SIGTERM: the drain ends now")
            self._cut = True

    def stopService(self) -> Deferred[None]:
        """Stop the children one at a time, the last started first, each
        waited for: MultiService would stop them all at once, but a child
        must not stop while one started after it still runs (the sessions
        while a port listens, the audit trail while children exit).

        A node of a cluster drains first (L{drain}): its balancer moves new
        sessions elsewhere while those it holds finish."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._stopping = True
        if self.config.cluster is not None:
            await self.drain("the node is stopping")
        Service.stopService(self)
        for child in reversed(list(self)):
            await DeferredList([maybeDeferred(child.stopService)])

    def drain(self, why: str) -> Deferred[None]:
        """Take no new work from the balancer, and let the sessions held end.

        /health answers 503 C{draining}, so the balancer sends new sessions
        elsewhere; sessions and calls in flight go on until they end, or
        for C{drain_timeout} at most. Fires then (at once if drained already).
        """
        if self._drained is None:
            self.web.node_state = "draining"
            log.info(
                "draining ({why}): health says draining; sessions may go on for up to "
                "{timeout:g}s (drain_timeout)",
                why=why,
                timeout=self.config.drain_timeout,
            )
            self.notifier.status(f"draining ({why}): {self._held()} sessions held")
            self._drained = Deferred.fromCoroutine(self._drain())
        done: Deferred[None] = Deferred()

        def tell(result: object) -> object:
            done.callback(None)
            return result

        self._drained.addBoth(tell)
        return done

    async def _drain(self) -> None:
        deadline = self.reactor.seconds() + self.config.drain_timeout
        while await self._drain_step(deadline):
            pass
        # drain_timeout has passed: a session with nothing in flight ends now
        # (its client's next request gets 404 and it opens a new session
        # elsewhere); one whose requests are still being answered ends when
        # they are, for up to drain_timeout more, so that no call is cut.
        closing = self.reactor.seconds() + self.config.drain_timeout
        while True:
            for session in list(self.registry.sessions.values()):
                if not session.in_flight:
                    self.registry.close(session, "the node drained")
            if not await self._drain_step(closing):
                break
        held = self._held()
        if held:
            log.info("drained: closing {count} sessions still open", count=held)
        else:
            log.info("drained: no session left")

    async def _drain_step(self, deadline: float) -> bool:
        """Wait a little if sessions are held and C{deadline} is not passed
        (nor the drain cut short); whether it waited."""
        now = self.reactor.seconds()
        if not self._held() or now >= deadline or self._cut:
            return False
        await deferLater(self.reactor, min(DRAIN_POLL, deadline - now), lambda: None)
        return True

    def _held(self) -> int:
        """Sessions that still hold this node: open session-era sessions, and
        stateless hubs with calls in flight."""
        return sum(1 for s in self.registry.sessions.values() if not s.stateless or s.in_flight)

    def _drain_and_stop(self) -> dict[str, Any]:
        """The admin API's drain: drain, then stop the process."""
        first = self._drained is None
        if first:
            self.drain("the admin API asked").addCallback(lambda _: self._stop_process())
        return {
            "draining": True,
            "already": not first,
            "sessions": self._held(),
            "drain_timeout": self.config.drain_timeout,
        }

    def _stop_process(self) -> None:
        if getattr(self.reactor, "running", False):
            self.reactor.stop()

    def status_line(self) -> str:
        return self.fleet.status_line()

    def _endpoint_statuses(self) -> list[dict[str, Any]]:
        """Every aggregating endpoint's status, with its open sessions."""
        return [
            {**endpoint.status(), "sessions": self.registry.count(endpoint.server.name)}
            for endpoint in self.fleet.endpoints.values()
        ]

    def _snapshot(self) -> Snapshot:
        snapshot = self.fleet.snapshot(streams=len(self.web.heartbeat.connections))
        if self.store is None:
            return snapshot
        cluster = ClusterSnapshot(self.store.up, dict(self.store.fallbacks))
        return attrs.evolve(snapshot, cluster=cluster)

    def _log_urls(self, name: str) -> None:
        for listener in self.listening:
            if listener.port is None:
                continue
            address = listener.port.getHost()
            if getattr(address, "host", None) is not None:
                scheme = "https" if listener.config.tls is not None else "http"
                path = url_path(name)
                log.info(
                    "serving {server}: {scheme}://{address}{path}/mcp (Streamable HTTP), "
                    "{path}/sse (HTTP+SSE)",
                    server=name,
                    path=path,
                    scheme=scheme,
                    address=describe_address(address),
                )

    async def apply(self, new: BridgeConfig) -> dict[str, Any]:
        """Move the running bridge to C{new}: unchanged servers keep their
        children and sessions; changed ones restart, their sessions drain.

        @raise ReloadRefused: when C{new} must not be applied (nothing changed).
        """
        refuse_exposure(self.listening, new)
        old = self.config
        refuse_cluster_change(old, new)
        if old.telemetry != new.telemetry:
            log.warn(
                "[telemetry] changed: the change takes effect when the bridge restarts "
                "(the rest of the reload applies now)"
            )
        # What can fail (new authenticators, keys, pins) is built before anything changes.
        # The pin file is read again (python -m mcptwist pin may have written it).
        pins = None
        if new.pin_file:
            try:
                pins = read_pin_file(new.pin_file)
            except PinFileError as e:
                raise ReloadRefused(str(e)) from None
        self.access.reconfigure(new, self.reactor)
        if new.pin_file or old.pin_file:
            self.pins.reopen(new.pin_file, pins or {})
            self.fleet.review_tools()
        # Who lost a credential or a grant loses its sessions and streams now.
        lost = revoke(self.registry, old.auth, new.auth)
        changes: dict[str, Any] = {"servers": self.fleet.apply(new), "revoked": lost}
        try:
            self.audit.reconfigure(new.audit)
        except AuditError as e:
            log.error("reload: kept the old audit trail: {error}", error=str(e))
            changes["audit"] = f"kept the old one: {e}"
        self.web.reconfigure(new)
        self.cluster.reconfigure(new.cluster)
        keys = cluster_keys(new.cluster.keys if new.cluster is not None else None)
        if keys is not None:
            self.registry.ids.rekey(keys)
        self.registry.max_sessions = new.max_sessions
        self.connections.limit = new.limits.max_connections_per_ip
        for listener in [*self.listening, *self.metrics_listening]:
            site = listener.site
            if isinstance(site, BridgeSite):
                site.access_log = new.access_log
                site.configure(new.limits)
        for listener in self.listening:
            listener.open_to_network = new.insecure or new.auth.enabled
        changes["listeners"] = await self.listening.apply(new.listeners)
        metrics_wanted = new.metrics.listeners if self.metrics is not None else ()
        changes["metrics_listeners"] = await self.metrics_listening.apply(metrics_wanted)
        changes["settings"] = changed_settings(old, new)
        return changes


class AuditService(Service):
    """The audit trail: opened before privileges are dropped (as log files
    are), closed once every child has exited."""

    def __init__(self, audit: AuditTrail) -> None:
        self.audit = audit

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        try:
            self.audit.start()
        except AuditError as e:
            raise ListenerError(f"mcpbridge: {e}") from None

    def stopService(self) -> None:
        super().stopService()
        self.audit.stop()


class AccessService(Service):
    """The admission rules' timers: JWT key refresh and rate limit sweeps."""

    def __init__(self, access: AccessControl) -> None:
        self.access = access

    def startService(self) -> None:
        super().startService()
        self.access.start()

    def stopService(self) -> None:
        super().stopService()
        self.access.stop()


class HeartbeatService(Service):
    """Keeps quiet SSE streams alive; on stop, ends those still open."""

    def __init__(self, heartbeat: Heartbeat) -> None:
        self.heartbeat = heartbeat

    def startService(self) -> None:
        super().startService()
        self.heartbeat.start()

    def stopService(self) -> None:
        super().stopService()
        self.heartbeat.close_all()
        self.heartbeat.stop()


class Readiness(Service):
    """Tells systemd how the bridge is: READY=1 once every listener is up
    and every server's child has started serving or failed (for
    C{Type=notify}), then its status every 30s; started last, it stops
    first, saying STOPPING=1."""

    def __init__(
        self, fleet: Fleet, notifier: SystemdNotifier, clock: Any, freeze_gc: bool
    ) -> None:
        self.fleet = fleet
        self.notifier = notifier
        self.freeze_gc = freeze_gc
        self._status_loop = LoopingCall(self._report_status)
        self._status_loop.clock = clock

    def startService(self) -> None:
        super().startService()
        Deferred.fromCoroutine(self._announce_ready())

    async def _announce_ready(self) -> None:
        await DeferredList(self.fleet.settled(), consumeErrors=True)
        if not self.running:
            return
        status = self.fleet.status_line()
        log.info("ready: {status}", status=status)
        self.notifier.ready(status)
        self.notifier.start_watchdog()
        if self.freeze_gc:
            # What startup built lives as long as the bridge: out of the collector's
            # way, so that its full collections stop rescanning it.
            gc.freeze()
        self._status_loop.start(30.0, now=False)

    def _report_status(self) -> None:
        self.notifier.status(self.fleet.status_line())

    def stopService(self) -> None:
        super().stopService()
        self.notifier.stopping(f"stopping: {len(self.fleet.registry.sessions)} sessions to end")
        self.notifier.stop_watchdog()
        if self._status_loop.running:
            self._status_loop.stop()


def _pin_book(config: BridgeConfig, recorder: Recorder) -> PinBook:
    """The pins of tools, from C{pin_file} if there is one."""
    try:
        return PinBook(config.pin_file, recorder)
    except PinFileError as e:
        raise ConfigError(
            config.source,
            "pin_file",
            str(e),
            "fix or remove the file (python -m mcptwist pin writes one), or remove pin_file",
        ) from None


def session_ids(config: BridgeConfig) -> SessionIds:
    """Session ids as this node makes them: naming the node in a cluster."""
    cluster = config.cluster
    if cluster is None:
        return SessionIds()
    return SessionIds(cluster.node_id, cluster_keys(cluster.keys))


def refuse_cluster_change(old: BridgeConfig, new: BridgeConfig) -> None:
    """A node keeps its identity and its Redis while it runs: ids it gave out
    name it. Keys and timings may change (a key rotation is a reload)."""
    before, after = old.cluster, new.cluster
    if (before is None) != (after is None):
        raise ReloadRefused("[cluster] cannot be added or removed by a reload: restart the node")
    if before is not None and after is not None:
        for key in ("node_id", "redis", "advertise"):
            if getattr(before, key) != getattr(after, key):
                raise ReloadRefused(f"cluster.{key} cannot change by a reload: restart the node")
