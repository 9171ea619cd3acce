# -*- test-case-name: tests.test_service -*-
"""The service tree: listeners, the web app, sessions and every server's children.

Start order: bind the listeners (refusing a non-loopback one unless the
config says C{insecure = true}), then spawn the children. Stop order: stop
listening, end every session and stream (answering what is in flight), then
stop the children and wait for them to exit.
"""

from __future__ import annotations

import collections
import functools
import gc
import signal
from collections.abc import Mapping
from typing import Any

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.resource import IResource

from mcptwist.config.load import load_config
from mcptwist.config.model import (
    AuthConfig,
    BridgeConfig,
    ConfigError,
    ListenerConfig,
    ServerConfig,
)
from mcptwist.ops.audit import AuditError, AuditTrail
from mcptwist.ops.metrics import Metrics, ServerSnapshot, Snapshot
from mcptwist.ops.notify import SystemdNotifier, status_line
from mcptwist.routing.backends import Backend, make_backend
from mcptwist.routing.sessions import ClientSession, SessionRegistry
from mcptwist.routing.stateless import StatelessSink
from mcptwist.security.auth import revoked
from mcptwist.security.origin import is_local_address
from mcptwist.security.tls import TLSLoadError
from mcptwist.service.control import BridgeControl
from mcptwist.service.listener import Listener, ListenerError, describe_address
from mcptwist.service.site import BridgeSite, MetricsOnly
from mcptwist.web.access import AccessControl
from mcptwist.web.admin import AdminAPI
from mcptwist.web.app import BridgeApp
from mcptwist.web.channel import ConnectionCounter

log = Logger(namespace="mcptwist.service")


class ReloadRefused(Exception):
    """A new configuration that must not be applied to the running bridge."""


class BridgeService(MultiService):
    """The root of the bridge's service tree; SIGHUP reloads its configuration."""

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
    ) -> None:
        super().__init__()
        self.freeze_gc = freeze_gc
        self.config = config
        self.reactor = reactor
        self.environ = environ
        self.handle_sighup = handle_sighup
        self.config_path = config_path
        self.notifier = notifier if notifier is not None else SystemdNotifier({}, reactor)
        self.listen_override = listen_override
        self.audit = AuditTrail(config.audit, reactor)
        self.backends: dict[str, Backend] = {
            name: make_backend(server, reactor, environ, self.audit)
            for name, server in config.servers.items()
        }
        # Servers added through the admin API: kept until the next reload.
        self.runtime_added: set[str] = set()
        # Backends of removed or changed servers, finishing their sessions.
        self.draining: dict[Backend, IDelayedCall] = {}
        self._stopping: set[Deferred[Any]] = set()
        self._reloading: Deferred[dict[str, Any]] | None = None
        self.access = AccessControl.from_config(config, reactor, self.audit)
        # Open connections by client address, over every listener.
        self.connections = ConnectionCounter(config.limits.max_connections_per_ip)
        # Reap often enough that no session outlives its idle timeout by much.
        shortest = min(s.session_idle_timeout for s in config.servers.values())
        self.registry = SessionRegistry(
            reactor,
            config.max_sessions,
            max(1.0, min(30.0, shortest / 4)),
            caps=self.access.caps,
            audit=self.audit,
        )
        self.registry.on_closed = self._session_closed
        self.web = BridgeApp(config, self.backends, self.registry, reactor, self.access)
        self.web.draining = self.draining
        self.control = BridgeControl(self)
        self.web.admin = AdminAPI(self.control, self.audit).resource()
        self.metrics: Metrics | None = None
        self._metrics_root: IResource | None = None
        if config.metrics.enabled:
            self.metrics = Metrics(start_time=reactor.seconds())
            self.metrics.set_source(self._snapshot)
            self.audit.metrics = self.metrics
            # One resource (a leaf that only renders), at /metrics and on metrics listeners.
            self.web.metrics = self.metrics.resource()
            self._metrics_root = MetricsOnly(self.web.metrics, self.web)
        self.resource = self.web.resource()
        self.listeners = [self._listener(listener) for listener in config.listeners]
        self.metrics_listeners: list[Listener] = []
        if self.metrics is not None:
            self.metrics_listeners = [
                self._listener(listener, self._metrics_root)
                for listener in config.metrics.listeners
            ]
        # systemd: endpoints adopted so far (each inherited socket can be adopted once).
        self._adopted = {
            listener.config.endpoint
            for listener in [*self.listeners, *self.metrics_listeners]
            if listener.config.endpoint.startswith("systemd:")
        }
        self._reload_again = False
        self._status_loop = LoopingCall(self._report_status)
        self._status_loop.clock = reactor

    def _listener(self, config: ListenerConfig, resource: IResource | None = None) -> Listener:
        # The bridge takes JSON bodies only: Twisted's form parsing would read
        # them twice, and it raises on some malformed Content-Type values.
        site = BridgeSite(
            resource or self.resource, reactor=self.reactor, parsePOSTFormSubmission=False
        )
        site.metrics = self.metrics
        site.is_server = self._is_server
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

    def _is_server(self, name: str) -> bool:
        return name in self.backends or any(b.server.name == name for b in self.draining)

    @property
    def site(self) -> BridgeSite:
        """The first listener's site (what tests drive directly)."""
        site = self.listeners[0].site
        assert isinstance(site, BridgeSite)
        return site

    # Starting and stopping

    def privilegedStartService(self) -> None:
        # Opened before privileges are dropped, as log files are.
        try:
            self.audit.start()
        except AuditError as e:
            raise ListenerError(f"mcpbridge: {e}") from None
        for listener in [*self.listeners, *self.metrics_listeners]:
            listener.privilegedStartService()
        super().privilegedStartService()

    def startService(self) -> None:
        Service.startService(self)
        self.access.start()
        if self.handle_sighup:
            signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self._sighup))
        for listener in [*self.listeners, *self.metrics_listeners]:
            listener.startService()
        self.registry.startService()
        self.web.heartbeat.start()
        for backend in self.backends.values():
            backend.startService()
        for name in self.backends:
            self._log_urls(name)
        Deferred.fromCoroutine(self._announce_ready())

    async def _announce_ready(self) -> None:
        """READY=1 once every listener is up and every server's child has
        started serving or failed (for systemd's Type=notify)."""
        await DeferredList([d for d in self._settled()], consumeErrors=True)
        if not self.running:
            return
        status = self.status_line()
        log.info("ready: {status}", status=status)
        self.notifier.ready(status)
        self.notifier.start_watchdog()
        if self.freeze_gc:
            # What startup built lives as long as the bridge: out of the collector's
            # way, so that its full collections stop rescanning it.
            gc.freeze()
        self._status_loop.start(30.0, now=False)

    def _settled(self) -> list[Deferred[None]]:
        settled = []
        for backend in self.backends.values():
            for upstream in backend.upstreams():
                settled.append(upstream.supervisor.settled())
        return settled

    def _snapshot(self) -> Snapshot:
        """The live state the metrics read at each scrape."""
        servers = []
        sessions = collections.Counter(s.server for s in self.registry.sessions.values())
        for name, backend in self.backends.items():
            upstreams = list(backend.upstreams())
            states = [u.supervisor.state.value for u in upstreams]
            uptimes = [u.supervisor.uptime() for u in upstreams]
            servers.append(
                ServerSnapshot(
                    name=name,
                    sharing=backend.server.sharing,
                    state=backend.state,
                    children=len(upstreams),
                    running_children=states.count("running"),
                    restarts=sum(u.supervisor.restarts for u in upstreams),
                    uptime=max((t for t in uptimes if t is not None), default=None),
                    in_flight=sum(u.in_flight for u in upstreams),
                    stdin_queue=sum(u.queued for u in upstreams),
                    sessions=sessions[name],
                )
            )
        return Snapshot(
            servers=tuple(servers),
            streams=len(self.web.heartbeat.connections),
            sessions_total=len(self.registry.sessions),
        )

    def status_line(self) -> str:
        states = {name: b.state for name, b in self.backends.items()}
        return status_line(states, len(self.registry.sessions))

    def _report_status(self) -> None:
        self.notifier.status(self.status_line())

    def _log_urls(self, name: str) -> None:
        for listener in self.listeners:
            if listener.port is None:
                continue
            address = listener.port.getHost()
            if getattr(address, "host", None) is not None:
                scheme = "https" if listener.config.tls is not None else "http"
                log.info(
                    "serving {server}: {scheme}://{address}/servers/{server}/mcp (Streamable HTTP), "
                    "/servers/{server}/sse (HTTP+SSE)",
                    server=name,
                    scheme=scheme,
                    address=describe_address(address),
                )

    def stopService(self) -> Deferred[Any]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self.notifier.stopping(f"stopping: {len(self.registry.sessions)} sessions to end")
        self.notifier.stop_watchdog()
        if self._status_loop.running:
            self._status_loop.stop()
        if self.handle_sighup:
            # Not the default action (which kills): a HUP from logrotate may come now.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if self._reloading is not None:
            await self._reloading
        await DeferredList(
            [
                d
                for d in (
                    listener.stopService()
                    for listener in [*self.listeners, *self.metrics_listeners]
                )
                if d is not None
            ]
        )
        self.registry.stopService()
        self.web.heartbeat.close_all()
        self.web.heartbeat.stop()
        for backend, timer in list(self.draining.items()):
            if timer.active():
                timer.cancel()
            self._stop_backend(backend)
        self.draining.clear()
        await DeferredList([*(b.stopService() for b in self.backends.values()), *self._stopping])
        log.info("every child has stopped")
        self.access.stop()
        self.audit.stop()

    # Reload (SIGHUP, or the admin API)

    def _sighup(self) -> None:
        """SIGHUP: reload, and put the outcome in the audit trail (the admin
        API writes its own reloads there)."""

        def audit(result: dict[str, Any]) -> None:
            self.audit.admin_action(
                principal="signal",
                peer=None,
                action="reload",
                target=self.config_path,
                outcome="ok" if result["ok"] else f"error: {result['error']}",
            )

        self.reload().addCallback(audit)

    def reload(self) -> Deferred[dict[str, Any]]:
        """Re-read the configuration file and apply it; a bad file changes nothing.

        Returns what changed: C{{"ok": bool, "error": str | None, "changes": {...}}}.
        """
        if not self.running:
            return succeed({"ok": False, "error": "the bridge is stopping", "changes": {}})
        if self._reloading is not None:
            # One at a time; the file may have changed again meanwhile: read it once more.
            self._reload_again = True
            return self._reloading
        d = Deferred.fromCoroutine(self._reload())

        def done(result: dict[str, Any]) -> dict[str, Any]:
            self._reloading = None
            if self._reload_again and self.running:
                self._reload_again = False
                self.reload()
            return result

        d.addBoth(done)
        if not d.called:
            self._reloading = d
        return d

    async def _reload(self) -> dict[str, Any]:
        self.notifier.reloading("reloading the configuration")
        if self.config_path is None:
            log.info("reload: no configuration file; re-reading certificates only")
            new = self.config
        else:
            try:
                new = load_config(self.config_path, self.environ)
            except ConfigError as e:
                log.error("reload refused, the running configuration stays: {error}", error=str(e))
                self.notifier.ready(f"reload failed: {e.key}: {e.problem}")
                return {"ok": False, "error": str(e), "changes": {}}
        if self.listen_override is not None:
            new = attrs.evolve(new, listeners=self.listen_override)
        try:
            changes = await self.apply(new)
        except ReloadRefused as e:
            log.error("reload refused, the running configuration stays: {error}", error=str(e))
            self.notifier.ready(f"reload refused: {e}")
            return {"ok": False, "error": str(e), "changes": {}}
        except Exception as e:
            log.failure("reload failed part way")
            self.notifier.ready(f"reload failed: {e}")
            return {"ok": False, "error": f"reload failed: {e!r}", "changes": {}}
        failed = [f for kind in ("listeners", "metrics_listeners") for f in changes[kind]["failed"]]
        log.info("reload done: {changes}", changes=changes)
        self.notifier.ready(self.status_line())
        if failed:
            return {"ok": False, "error": "; ".join(failed), "changes": changes}
        return {"ok": True, "error": None, "changes": changes}

    async def apply(self, new: BridgeConfig) -> dict[str, Any]:
        """Move the running bridge to C{new}: unchanged servers keep their
        children and sessions; changed ones restart, their sessions drain.

        @raise ReloadRefused: when C{new} must not be applied (nothing changed).
        """
        if not (new.insecure or new.auth.enabled):
            for listener in self.listeners:
                port = listener.port
                if port is not None and not is_local_address(port.getHost()):
                    raise ReloadRefused(
                        f"{listener.config.endpoint} listens beyond loopback, and the new "
                        "configuration has no authentication (and no insecure = true); "
                        "keep [auth], or move the listener to loopback and restart"
                    )
        old = self.config
        # What can fail (new authenticators, keys) is built before anything changes.
        self.access.reconfigure(new, self.reactor)
        self.config = new
        # Who lost a credential or a grant loses its sessions and streams now.
        lost = self._revoke(old.auth, new.auth)
        changes: dict[str, Any] = {"servers": self._apply_servers(new), "revoked": lost}
        try:
            self.audit.reconfigure(new.audit)
        except AuditError as e:
            log.error("reload: kept the old audit trail: {error}", error=str(e))
            changes["audit"] = f"kept the old one: {e}"
        self.web.reconfigure(new)
        self.registry.max_sessions = new.max_sessions
        self.connections.limit = new.limits.max_connections_per_ip
        for listener in [*self.listeners, *self.metrics_listeners]:
            site = listener.site
            if isinstance(site, BridgeSite):
                site.access_log = new.access_log
                site.configure(new.limits)
        for listener in self.listeners:
            listener.open_to_network = new.insecure or new.auth.enabled
        self.listeners, changes["listeners"] = await self._apply_listeners(
            self.listeners, new.listeners, None
        )
        metrics_wanted = new.metrics.listeners if self.metrics is not None else ()
        self.metrics_listeners, changes["metrics_listeners"] = await self._apply_listeners(
            self.metrics_listeners, metrics_wanted, self._metrics_root
        )
        changes["settings"] = _changed_settings(old, new)
        return changes

    def _revoke(self, old: AuthConfig, new: AuthConfig) -> list[str]:
        """Close the sessions, and so the streams, that the new credentials no
        longer allow (L{revoked}); each is audited with its reason.

        Returns who lost what, as C{"PRINCIPAL on SERVER"}.
        """
        if old == new:
            return []
        lost: set[str] = set()
        for session in list(self.registry.sessions.values()):
            why = revoked(old, new, session.principal, session.server)
            if why is not None:
                self.registry.close(session, why)
                lost.add(f"{session.principal} on {session.server}")
        return sorted(lost)

    def _apply_servers(self, new: BridgeConfig) -> dict[str, list[str]]:
        result: dict[str, list[str]] = {
            "added": [],
            "removed": [],
            "restarted": [],
            "unchanged": [],
        }
        for name in list(self.backends):
            if name not in new.servers:
                self.retire(name, "removed from the configuration")
                result["removed"].append(name)
        for name, server in new.servers.items():
            backend = self.backends.get(name)
            if backend is None:
                self.add_backend(server)
                result["added"].append(name)
            elif backend.server == server and name not in self.runtime_added:
                result["unchanged"].append(name)
            else:
                self.retire(name, "reconfigured")
                self.add_backend(server)
                result["restarted"].append(name)
        self.runtime_added.clear()
        return result

    def add_backend(self, server: ServerConfig) -> Backend:
        """Serve a server from now on (a reload, or the admin API)."""
        backend = make_backend(server, self.reactor, self.environ, self.audit)
        self.backends[server.name] = backend
        self.access.server_added(server)
        if self.running:
            backend.startService()
            self._log_urls(server.name)
        return backend

    def retire(self, name: str, why: str) -> None:
        """Stop serving a server: new sessions cannot reach it; its sessions
        finish what they do, and are closed after C{drain_timeout}."""
        backend = self.backends.pop(name)
        # A stateless hub serves no one between requests: it closes when idle.
        for session in self.registry.of_backend(backend):
            if isinstance(session.sink, StatelessSink):
                session.sink.when_idle(functools.partial(self._close_hub, session, why))
        if not self.registry.of_backend(backend):
            self._stop_backend(backend)
            return
        log.info(
            "{server}: {why}; its sessions may finish within {grace:g}s",
            server=name,
            why=why,
            grace=self.config.drain_timeout,
        )
        self.draining[backend] = self.reactor.callLater(
            self.config.drain_timeout, self._drained, backend, why
        )

    def _close_hub(self, hub: ClientSession, why: str) -> None:
        self.registry.close(hub, f"closed: the server was {why}")

    def _session_closed(self, session: ClientSession) -> None:
        backend = session.backend
        if backend in self.draining and not self.registry.of_backend(backend):
            self._drained(backend, "its last session ended")

    def _drained(self, backend: Backend, why: str) -> None:
        timer = self.draining.pop(backend, None)
        if timer is not None and timer.active():
            timer.cancel()
        for session in self.registry.of_backend(backend):
            self.registry.close(session, f"closed: the server was {why}")
        self._stop_backend(backend)

    def _stop_backend(self, backend: Backend) -> None:
        if not backend.running:
            return
        d = backend.stopService()
        self._stopping.add(d)
        d.addBoth(lambda _: self._stopping.discard(d))

    async def _apply_listeners(
        self,
        current: list[Listener],
        wanted: tuple[ListenerConfig, ...],
        resource: IResource | None,
    ) -> tuple[list[Listener], dict[str, list[str]]]:
        """Diff listeners by endpoint: keep and update in place, close the
        removed ones (and wait for their ports), then open the new ones."""
        result: dict[str, list[str]] = {
            "added": [],
            "removed": [],
            "updated": [],
            "unchanged": [],
            "failed": [],
        }
        by_endpoint = {listener.config.endpoint: listener for listener in current}
        configs = {config.endpoint: config for config in wanted}
        kept: list[Listener] = []
        stopping: list[Deferred[None]] = []
        for endpoint, listener in by_endpoint.items():
            config = configs.get(endpoint)
            if config is None:
                d = listener.stopService()
                if d is not None:
                    stopping.append(d)
                result["removed"].append(endpoint)
                continue
            kept.append(listener)
            if config == listener.config:
                listener.reload_tls()
                result["unchanged"].append(endpoint)
                continue
            try:
                listener.update(config)
            except TLSLoadError as e:
                log.error("reload: {listener}: {error}", listener=endpoint, error=str(e))
                result["failed"].append(f"{endpoint}: {e}")
            else:
                result["updated"].append(endpoint)
        await DeferredList(stopping)
        for endpoint, config in configs.items():
            if endpoint in by_endpoint:
                continue
            if endpoint.startswith("systemd:") and endpoint in self._adopted:
                # Twisted closes an inherited socket's descriptor once adopted.
                message = (
                    "an inherited socket is adopted once: restart the service to adopt it again"
                )
                log.error("reload: {listener}: {error}", listener=endpoint, error=message)
                result["failed"].append(f"{endpoint}: {message}")
                continue
            listener = self._listener(config, resource)
            try:
                listener.privilegedStartService()
            except ListenerError as e:
                log.error("reload: {error}", error=str(e))
                result["failed"].append(f"{endpoint}: {e}")
                continue
            listener.startService()
            kept.append(listener)
            result["added"].append(endpoint)
            if endpoint.startswith("systemd:"):
                self._adopted.add(endpoint)
        return kept, result


def _changed_settings(old: BridgeConfig, new: BridgeConfig) -> list[str]:
    """The bridge-wide settings a reload changed, by name."""
    skip = {"servers", "listeners", "source"}
    return [
        field.name
        for field in attrs.fields(BridgeConfig)
        if field.name not in skip and getattr(old, field.name) != getattr(new, field.name)
    ]
