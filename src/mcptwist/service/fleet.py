# -*- test-case-name: tests.test_service -*-
"""The fleet: the servers the bridge runs, each a backend and its children.

A server added (by a reload or the admin API) starts at once; one removed
or changed is retired: no new session reaches it, its sessions finish what
they do and are closed after C{drain_timeout}, then its children stop.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from mcptwist.child.credentials import Secrets
from mcptwist.config.model import BridgeConfig, ServerConfig, endpoint_key
from mcptwist.ops.metrics import ServerSnapshot, Snapshot
from mcptwist.ops.notify import status_line
from mcptwist.routing.aggregate import Aggregate, endpoint_settings
from mcptwist.routing.backends import Backend, make_backend
from mcptwist.routing.members import AggregateBackend
from mcptwist.routing.pins import PinBook
from mcptwist.routing.record import Recorder
from mcptwist.routing.sessions import ClientSession, SessionRegistry
from mcptwist.routing.stateless import StatelessSink
from mcptwist.routing.trace import Tracer
from mcptwist.web.access import AccessControl

log = Logger(namespace="mcptwist.service")


class Fleet(MultiService):
    """Every backend the bridge runs, each a child service: the servers it
    serves, by name (L{backends}, which the web app reads), and the retired
    ones whose sessions drain (L{draining}).

    Stopping it ends the drains at once and waits for every child to exit,
    those of backends already stopping included.
    """

    def __init__(
        self,
        config: BridgeConfig,
        reactor: Any,
        environ: Mapping[str, str],
        recorder: Recorder,
        registry: SessionRegistry,
        access: AccessControl,
        pins: PinBook | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        super().__init__()
        # Follows every request in spans (None: not traced).
        self.tracer = tracer
        # The pins of every server's tools; an accepted change refreshes its lists.
        self.pins = pins
        if pins is not None:
            pins.on_accept.append(self._accepted)
        # The configuration in force (a reload replaces it, L{apply}).
        self.config = config
        self.reactor = reactor
        self.environ = environ
        # Where every backend reports its children and their requests.
        self.recorder = recorder
        self.registry = registry
        self.access = access
        self.backends: dict[str, Backend] = {}
        # Servers added through the admin API: kept until the next reload.
        self.runtime_added: set[str] = set()
        # Backends of removed or changed servers, finishing their sessions.
        self.draining: dict[Backend, IDelayedCall] = {}
        # Told the name of each server started while the fleet runs.
        self.serving: Callable[[str], None] = lambda name: None
        self._stopping: set[Deferred[Any]] = set()
        registry.on_closed = self._session_closed
        # Each principal's secrets, for children per principal.
        self.secrets = Secrets(config.secrets.file, config.secrets.directory)
        # The aggregating endpoints, by "endpoints/NAME" (the web app reads them).
        self.endpoints: dict[str, AggregateBackend] = {}
        for server in config.servers.values():
            self._serve(server)
        self._set_endpoints(config)

    def _set_endpoints(self, config: BridgeConfig) -> None:
        """Build the endpoints of a configuration, in place of the last ones
        (their sessions keep what they had; new ones get the new rules)."""
        endpoints: dict[str, AggregateBackend] = {}
        for endpoint in config.endpoints.values():
            key = endpoint_key(endpoint.name)
            old = self.endpoints.get(key)
            settings = endpoint_settings(endpoint, config.servers)
            if old is not None and old.aggregate.config == endpoint and old.server == settings:
                endpoints[key] = old
                continue
            aggregate = Aggregate(endpoint, self._server_config, self.pins, self.recorder)
            endpoints[key] = AggregateBackend(
                aggregate, settings, self.backends, self.reactor, self.recorder, self.tracer
            )
        # The sessions of an endpoint that changed or went end now: the new
        # rules hold at once (a client initializes again, as after any 404).
        for key, old in self.endpoints.items():
            if endpoints.get(key) is not old:
                for session in self.registry.of_backend(old):
                    self.registry.close(session, "closed: the endpoint was reconfigured")
        self.endpoints.clear()
        self.endpoints.update(endpoints)

    def _accepted(self, server: str) -> None:
        """A tool change was accepted: the server's lists are reviewed again."""
        backend = self.backends.get(server)
        if backend is not None:
            for upstream in backend.upstreams():
                upstream.catalog.refresh_tools()

    def review_tools(self) -> None:
        """The pins were read again: every server's tools are reviewed again."""
        for name in self.backends:
            self._accepted(name)

    def _server_config(self, name: str) -> ServerConfig | None:
        backend = self.backends.get(name)
        return backend.server if backend is not None else None

    def _serve(self, server: ServerConfig) -> Backend:
        backend = make_backend(
            server, self.reactor, self.environ, self.recorder, self.pins, self.tracer
        )
        backend.secrets = self.secrets
        self.backends[server.name] = backend
        # Started now if the fleet runs.
        backend.setServiceParent(self)
        return backend

    def startService(self) -> None:
        super().startService()
        for name in [*self.backends, *self.endpoints]:
            self.serving(name)

    def stopService(self) -> Deferred[None]:
        for timer in self.draining.values():
            if timer.active():
                timer.cancel()
        self.draining.clear()
        stopped: Deferred[Any] = DeferredList([super().stopService(), *self._stopping])
        return stopped.addCallback(lambda _: log.info("every child has stopped"))

    def is_server(self, name: str) -> bool:
        """Whether a server (or endpoint) of this name is served, or drains."""
        return (
            name in self.backends
            or name in self.endpoints
            or any(b.server.name == name for b in self.draining)
        )

    def add(self, server: ServerConfig) -> Backend:
        """Serve a server from now on (a reload, or the admin API)."""
        self.access.server_added(server)
        backend = self._serve(server)
        if self.running:
            self.serving(server.name)
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
            self._stop(backend)
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

    def apply(self, new: BridgeConfig) -> dict[str, list[str]]:
        """Take a reloaded configuration: unchanged servers keep their children
        and sessions; changed ones restart, and their sessions drain, as do
        those of removed ones. Servers added at run time are forgotten."""
        self.config = new
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
                self.add(server)
                result["added"].append(name)
            elif backend.server == server and name not in self.runtime_added:
                result["unchanged"].append(name)
            else:
                self.retire(name, "reconfigured")
                self.add(server)
                result["restarted"].append(name)
        self.runtime_added.clear()
        self.secrets.file, self.secrets.directory = new.secrets.file, new.secrets.directory
        self._set_endpoints(new)
        return result

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
        self._stop(backend)

    def _stop(self, backend: Backend) -> None:
        """Let a retired backend go; the fleet's stop waits for its children."""
        stopping = self.removeService(backend)
        if stopping is not None:
            self._stopping.add(stopping)
            stopping.addBoth(lambda _: self._stopping.discard(stopping))

    # What the metrics and the status line read

    def settled(self) -> list[Deferred[None]]:
        """One Deferred for each child: it has started serving, or failed."""
        return [
            upstream.supervisor.settled()
            for backend in self.backends.values()
            for upstream in backend.upstreams()
        ]

    def snapshot(self, streams: int) -> Snapshot:
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
            streams=streams,
            sessions_total=len(self.registry.sessions),
        )

    def status_line(self) -> str:
        states = {name: b.state for name, b in self.backends.items()}
        return status_line(states, len(self.registry.sessions))
