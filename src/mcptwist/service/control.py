# -*- test-case-name: tests.test_control -*-
"""What an operator can do to a running bridge: the admin API's actions.

L{BridgeControl} implements L{mcptwist.web.admin.AdminControl} on the
bridge's L{Fleet} and L{SessionRegistry}: status, start, stop and restart a
server, read its stderr, list and close sessions, add (one of the
configuration's [admin.commands]) or remove a server until the next reload,
and reload the configuration file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed

from mcptwist.child.supervisor import ChildState
from mcptwist.config.load import ADMIN_SOURCE, requested_server
from mcptwist.config.model import ConfigError
from mcptwist.routing.backends import Backend, PrincipalBackend, SessionBackend
from mcptwist.routing.sessions import ClientSession, SessionRegistry
from mcptwist.service.fleet import Fleet


class BridgeControl:
    """The admin API's view of the bridge."""

    def __init__(
        self,
        fleet: Fleet,
        registry: SessionRegistry,
        reload: Callable[[], Deferred[dict[str, Any]]],
        running: Callable[[], bool],
        cluster: Callable[[], Deferred[dict[str, Any]]] | None = None,
        drain: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.fleet = fleet
        # Every node's record (the cluster's registry, or this node alone).
        self._cluster = cluster
        self.registry = registry
        # Re-reads the configuration file (as SIGHUP does).
        self._reload = reload
        # Drains the node, then stops it.
        self._drain = drain
        # Whether the bridge runs: false from the moment it begins to stop.
        self._bridge_running = running

    def _running(self) -> None:
        # A keep-alive connection can still carry a request while the bridge
        # stops: nothing may start then, or it would outlive the shutdown.
        if not self._bridge_running():
            raise RuntimeError("the bridge is stopping")

    def _backend(self, name: str) -> Backend:
        backend = self.fleet.backends.get(name)
        if backend is None:
            raise KeyError(name)
        return backend

    # The cluster

    def cluster(self) -> Deferred[dict[str, Any]]:
        if self._cluster is None:
            return succeed({"node_id": None, "redis": None, "nodes": []})
        return self._cluster()

    # Tool pins

    def pins(self) -> dict[str, dict[str, Any]]:
        pins = self.fleet.pins
        result: dict[str, dict[str, Any]] = {}
        for name, backend in self.fleet.backends.items():
            status = pins.status(name) if pins is not None else {"pinned": 0, "changed": {}}
            status["on_tool_change"] = backend.server.on_tool_change
            status["blocked"] = pins.blocked(backend.server) if pins is not None else None
            result[name] = status
        return result

    def accept_tools(self, server: str, tools: list[str] | None) -> list[str]:
        self._backend(server)
        pins = self.fleet.pins
        return pins.accept(server, tools) if pins is not None else []

    # Servers

    def servers(self) -> list[dict[str, Any]]:
        return [self._status(b) for b in self.fleet.backends.values()]

    def server(self, name: str) -> dict[str, Any] | None:
        backend = self.fleet.backends.get(name)
        return None if backend is None else self._status(backend)

    def _status(self, backend: Backend) -> dict[str, Any]:
        server = backend.server
        status = backend.status()
        status["sessions"] = self.registry.count(server.name)
        status["stopped_by_operator"] = backend.held
        status["added_at_runtime"] = server.name in self.fleet.runtime_added
        # What runs as the file wrote it: never a value from the environment
        # (${VAR} stays as written), nor the environment's values.
        written = server.written
        status["config"] = {
            "command": written.get("command", server.command),
            "args": list(written.get("args", server.args)),
            "env": sorted(server.env),
            "env_passthrough": list(server.env_passthrough),
            "sharing": server.sharing,
            "cwd": written.get("cwd", server.cwd),
        }
        return status

    def start(self, name: str) -> Deferred[dict[str, Any]]:
        self._running()
        backend = self._backend(name)
        backend.held = False
        for upstream in backend.upstreams():
            if upstream.supervisor.state is ChildState.STOPPED:
                upstream.supervisor.startService()
        return succeed(self._status(backend))

    def stop(self, name: str) -> Deferred[dict[str, Any]]:
        """Stop a server's children and keep them stopped until started again:
        requests get an error naming the operator's stop."""
        backend = self._backend(name)
        backend.held = True
        if isinstance(backend, SessionBackend):
            for session in self.registry.of_backend(backend):
                self.registry.close(session, "closed: the server was stopped")
        stops = [u.supervisor.stopService() for u in backend.upstreams() if u.supervisor.running]
        d = DeferredList(stops)
        return d.addCallback(lambda _: self._status(backend))

    def stop_child(self, name: str, principal: str) -> dict[str, Any]:
        """Stop one principal's child of a server in principal mode (its
        sessions end); KeyError if the server is unknown, LookupError if
        that principal has no child there."""
        backend = self._backend(name)
        if not isinstance(backend, PrincipalBackend):
            raise LookupError(f"MCP server '{name}' does not run a child per principal")
        for session in self.registry.of_backend(backend):
            if session.principal == principal:
                self.registry.close(session, "closed: its child was stopped by an operator")
        if not backend.stop_child(principal):
            raise LookupError(f"no child of MCP server '{name}' runs for {principal!r}")
        return self._status(backend)

    def restart(self, name: str) -> Deferred[dict[str, Any]]:
        self._running()
        backend = self._backend(name)
        backend.held = False
        restarts = []
        for upstream in backend.upstreams():
            supervisor = upstream.supervisor
            if supervisor.running:
                restarts.append(supervisor.restart())
            else:
                supervisor.startService()
        d = DeferredList(restarts)
        return d.addCallback(lambda _: self._status(backend))

    def stderr(self, name: str, lines: int) -> list[str]:
        backend = self._backend(name)
        out: list[str] = []
        upstreams = list(backend.upstreams())
        for upstream in upstreams:
            tail = list(upstream.supervisor.stderr)
            if len(upstreams) > 1:
                tail = [f"{upstream.label}: {line}" for line in tail]
            out.extend(tail)
        return out[-lines:] if lines > 0 else []

    # Sessions

    def sessions(self, server: str | None) -> list[dict[str, Any]]:
        now = self.registry.clock.seconds()
        return [
            _session_info(s, now)
            for s in self.registry.sessions.values()
            if server is None or s.server == server
        ]

    def close_session(self, session_id: str) -> bool:
        session = self.registry.sessions.get(session_id)
        if session is None:
            return False
        self.registry.close(session, "closed by an operator")
        return True

    # Configuration

    def add_server(self, name: str, table: dict[str, Any]) -> Deferred[dict[str, Any]]:
        """Start a server of one of the configuration's [admin.commands]: a
        request chooses among the programs the file names, and never names one."""
        self._running()
        commands = self.fleet.config.admin.commands
        if not commands:
            raise PermissionError(
                "adding servers at run time is off; the configuration file can allow it by "
                "naming the programs it may start in [admin.commands.NAME] tables"
            )
        if name in self.fleet.backends:
            raise ValueError(f"a server named {name!r} exists")
        server = requested_server(
            name, table, commands, authenticated=self.fleet.config.auth.enabled
        )
        if server is None:
            raise ConfigError(ADMIN_SOURCE, f"servers.{name}.disabled", "is true", "remove it")
        backend = self.fleet.add(server)
        self.fleet.runtime_added.add(name)
        return succeed(self._status(backend))

    def remove_server(self, name: str) -> Deferred[dict[str, Any]]:
        backend = self._backend(name)
        status = self._status(backend)
        self.fleet.retire(name, "removed by an operator")
        self.fleet.runtime_added.discard(name)
        return succeed(status)

    def reload(self) -> Deferred[dict[str, Any]]:
        return self._reload()

    def drain(self) -> dict[str, Any]:
        """Drain the node (health 503 draining while its sessions end), then stop it."""
        self._running()
        if self._drain is None:
            raise RuntimeError("this bridge cannot drain")
        return self._drain()


def _session_info(session: ClientSession, now: float) -> dict[str, Any]:
    return {
        "id": session.id,
        "server": session.server,
        "transport": session.transport,
        "principal": session.principal,
        "peer": session.peer,
        "protocol_version": session.protocol_version,
        "client": session.client_info.get("name"),
        "opened": session.opened,
        "age": round(now - session.opened, 3),
        "idle": round(now - session.last_active, 3),
        "stream_open": session.sink.connected,
    }
