# -*- test-case-name: tests.test_routing,tests.test_modern_child -*-
"""The sharing modes: one upstream per server, one per session, or one per
principal.

A backend owns a server's upstreams and their children; the sessions and the
stateless calls of the web side ask it for the upstream to use.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from mcptwist.child.credentials import MissingCredential, Secrets, resolve
from mcptwist.child.supervisor import ChildState
from mcptwist.config.model import ServerConfig
from mcptwist.routing.modern import ModernUpstream
from mcptwist.routing.pins import PinBook
from mcptwist.routing.record import Recorder
from mcptwist.routing.trace import Tracer
from mcptwist.routing.upstream import (
    CapacityError,
    CredentialError,
    Downstream,
    PrincipalCapacityError,
    Upstream,
    downstream_principal,
)

log = Logger(namespace="mcptwist.routing")


class Backend(MultiService):
    """How one configured server is served: the interface transports use."""

    @property
    def per_principal(self) -> bool:
        """A child per principal: each request checks its principal's credentials."""
        return False

    def __init__(
        self,
        server: ServerConfig,
        reactor: Any,
        environ: Mapping[str, str],
        recorder: Recorder | None = None,
        pins: PinBook | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        super().__init__()
        self.server = server
        self.reactor = reactor
        self.environ = environ
        self.recorder = recorder
        self.pins = pins
        self.tracer = tracer
        # Stopped by an operator (admin API): stays stopped until started.
        self.held = False
        # Each principal's secrets (${secret:NAME}), when the file configures them.
        self.secrets: Secrets | None = None
        self.build()

    def build(self) -> None:
        """Set up what this sharing mode needs (called once, by the constructor)."""

    def _upstream(
        self, stateless: bool, label: str | None = None, server: ServerConfig | None = None
    ) -> Upstream:
        """A new upstream for the sessions of one era (a child speaks it, or is
        translated for); C{server}: the settings its child runs with, if not the server's."""
        era = self.server.era
        cls = _upstream_class(era == "modern" or (era == "dual" and stateless))
        upstream = cls(server or self.server, self.reactor, self.environ, label, self.recorder)
        upstream.tracer = self.tracer
        pins = self.pins
        if pins is not None:
            server = self.server
            upstream.catalog.review = lambda tools: pins.review(server, tools)
        return upstream

    def open(self, session: Downstream) -> Upstream:
        """Give a new session the upstream that will serve it."""
        raise NotImplementedError

    def close(self, session: Downstream, upstream: Upstream) -> None:
        """The session has ended."""
        raise NotImplementedError

    def refresh(self, session: Downstream, upstream: Upstream) -> None:
        """Before each of a session's requests: nothing, except for a child
        per principal (its credentials may have changed)."""

    def upstreams(self) -> Iterator[Upstream]:
        for service in self:
            assert isinstance(service, Upstream)
            yield service

    @property
    def state(self) -> str:
        """The server's state as a whole (a L{ChildState} value), without building
        its L{status} (which copies every child's stderr)."""
        raise NotImplementedError

    def status(self) -> dict[str, Any]:
        raise NotImplementedError


class SharedBackend(Backend):
    """One child for every session (the default)."""

    def build(self) -> None:
        self.upstream = self._upstream(stateless=False)
        self.upstream.setServiceParent(self)
        # A child of a dual-era server for stateless clients, spoken to in their revision.
        self.modern: Upstream | None = None
        if self.server.era == "dual":
            self.modern = self._upstream(stateless=True, label=f"{self.server.name}[2026]")
            self.modern.setServiceParent(self)

    def open(self, session: Downstream) -> Upstream:
        upstream = self.modern if session.stateless and self.modern else self.upstream
        upstream.attach(session)
        return upstream

    def close(self, session: Downstream, upstream: Upstream) -> None:
        upstream.detach(session)

    @property
    def state(self) -> str:
        return self.upstream.supervisor.state.value

    def status(self) -> dict[str, Any]:
        status = {"name": self.server.name, "sharing": "shared", **self.upstream.status()}
        if self.modern is not None:
            status["modern_child"] = self.modern.status()
        return status


class PoolBackend(Backend):
    """Children that come and go (one per session, or per principal), up to
    max_children: what the two such sharing modes have in common."""

    # Its sharing mode, as its status says.
    sharing = ""

    def build(self) -> None:
        # Children retired that are still stopping: shutdown waits for them.
        self._stopping: set[Deferred[Any]] = set()

    def _retire(self, upstream: Upstream) -> None:
        """Stop a child and forget it (shutdown still waits for its end)."""
        if upstream.parent is not self:
            return
        stopping = upstream.disownServiceParent()
        if stopping is not None and not stopping.called:
            self._stopping.add(stopping)
            stopping.addBoth(lambda _: self._stopping.discard(stopping))

    def stopService(self) -> Deferred[Any]:
        return DeferredList([super().stopService(), *self._stopping])

    @property
    def state(self) -> str:
        """Failed when every child has failed; otherwise running (no children
        yet included: the next session, or principal, spawns one)."""
        states = {u.supervisor.state for u in self.upstreams()}
        if states == {ChildState.FAILED}:
            return ChildState.FAILED.value
        return ChildState.RUNNING.value

    def _child_status(self, upstream: Upstream) -> dict[str, Any]:
        return upstream.status()

    def status(self) -> dict[str, Any]:
        children = [self._child_status(u) for u in self.upstreams()]
        running = sum(1 for c in children if c["state"] == ChildState.RUNNING.value)
        silent = sum(1 for c in children if c["unresponsive"])
        return {
            "name": self.server.name,
            "sharing": self.sharing,
            "state": self.state,
            "children": children,
            "running_children": running,
            "unresponsive_children": silent,
            # Like failed: only when it holds for every child.
            "unresponsive": bool(children) and silent == len(children),
            "max_children": self.server.max_children,
            "sessions": sum(c["sessions"] for c in children),
        }


class SessionBackend(PoolBackend):
    """A child of its own for each session, up to max_children."""

    sharing = "session"

    def build(self) -> None:
        super().build()
        # How many children each authenticated principal holds.
        self._held_by: dict[str, int] = {}

    def open(self, session: Downstream) -> Upstream:
        if self.held:
            raise CapacityError(f"MCP server '{self.server.name}' was stopped by an operator")
        count = len(list(self))
        if count >= self.server.max_children:
            raise CapacityError(
                f"MCP server '{self.server.name}' already runs {count} children, its max_children"
            )
        # Without authentication there is no principal to hold to a share.
        principal = downstream_principal(session)
        if principal == "anonymous":
            principal = None
        if principal is not None:
            held = self._held_by.get(principal, 0)
            if held >= self.server.children_per_principal:
                raise PrincipalCapacityError(
                    f"this client already holds {held} children of MCP server "
                    f"'{self.server.name}', its max_children_per_principal"
                )
        upstream = self._upstream(session.stateless, f"{self.server.name}[{session.id[:8]}]")
        upstream.attach(session)
        upstream.setServiceParent(self)
        if principal is not None:
            self._held_by[principal] = self._held_by.get(principal, 0) + 1
        return upstream

    def close(self, session: Downstream, upstream: Upstream) -> None:
        principal = downstream_principal(session)
        if principal is not None and principal in self._held_by:
            self._held_by[principal] -= 1
            if not self._held_by[principal]:
                del self._held_by[principal]
        upstream.detach(session)
        self._retire(upstream)


class PrincipalBackend(PoolBackend):
    """A child of its own for each principal, shared by all of that
    principal's sessions and stateless requests, up to max_children; a
    child whose principal has no session left stops after
    child_idle_timeout. Two principals never share a child (without
    authentication every client is the one principal "anonymous")."""

    sharing = "principal"

    @property
    def per_principal(self) -> bool:
        return True

    def build(self) -> None:
        super().build()
        # Each principal's child (a dual-era server's stateless clients have a second).
        self._children: dict[tuple[str, bool], Upstream] = {}
        # The environment each child was started with (its principal's credentials).
        self._env: dict[Upstream, Mapping[str, str]] = {}
        # The idle timer of a child whose principal has no session left.
        self._idle: dict[Upstream, IDelayedCall] = {}

    def open(self, session: Downstream) -> Upstream:
        if self.held:
            raise CapacityError(f"MCP server '{self.server.name}' was stopped by an operator")
        principal = downstream_principal(session) or "anonymous"
        key = (principal, self.server.era == "dual" and session.stateless)
        env = self._credentials(principal, session)
        upstream = self._children.get(key)
        if upstream is None:
            count = len(self._children)
            if count >= self.server.max_children:
                raise CapacityError(
                    f"MCP server '{self.server.name}' already runs {count} children, one per "
                    "client, its max_children"
                )
            label = f"{self.server.name}[{principal}{'/2026' if key[1] else ''}]"
            upstream = self._upstream(session.stateless, label, attrs.evolve(self.server, env=env))
            upstream.principal = principal
            self._children[key] = upstream
            self._env[upstream] = env
            upstream.setServiceParent(self)
        else:
            timer = self._idle.pop(upstream, None)
            if timer is not None and timer.active():
                timer.cancel()
            self._renew(upstream, env)
        upstream.attach(session)
        return upstream

    def refresh(self, session: Downstream, upstream: Upstream) -> None:
        """Before a request: the principal's credentials as they are now; a
        change restarts its child (CredentialError: one is missing now)."""
        if upstream.parent is self and upstream.principal is not None:
            self._renew(upstream, self._credentials(upstream.principal, session))

    def _credentials(self, principal: str, session: Downstream) -> Mapping[str, str]:
        """The environment of this principal's child: the server's env, its
        references resolved for the principal."""
        try:
            return resolve(
                self.server.env,
                principal,
                getattr(session, "claims", None) or {},
                self.secrets,
                self.environ,
            )
        except MissingCredential as e:
            raise CredentialError(f"MCP server '{self.server.name}' cannot start: {e}") from None

    def _renew(self, upstream: Upstream, env: Mapping[str, str]) -> None:
        """Credentials that changed restart the child, once its requests in
        flight have been answered; its sessions go on with the new child."""
        if self._env.get(upstream) == env:
            return
        self._env[upstream] = env
        log.info(
            "{server}: the credentials of {principal} changed; its child restarts once its "
            "requests in flight are answered",
            server=self.server.name,
            principal=upstream.principal,
        )
        upstream.renew(attrs.evolve(self.server, env=env))

    def close(self, session: Downstream, upstream: Upstream) -> None:
        upstream.detach(session)
        if upstream.sessions or upstream.parent is not self or upstream in self._idle:
            return
        self._idle[upstream] = self.reactor.callLater(
            self.server.child_idle_timeout, self._reap, upstream
        )

    def _reap(self, upstream: Upstream, force: bool = False) -> None:
        """A principal's child idle for child_idle_timeout (or stopped by an
        operator, C{force}): it stops."""
        self._idle.pop(upstream, None)
        if upstream.sessions and not force:
            return
        self._env.pop(upstream, None)
        for key, child in list(self._children.items()):
            if child is upstream:
                del self._children[key]
        self._retire(upstream)

    def stop_child(self, principal: str) -> bool:
        """Stop one principal's child (its sessions must have been closed
        first); False if it has none. Its next request starts a new one."""
        children = [u for (who, _), u in self._children.items() if who == principal]
        for upstream in children:
            timer = self._idle.pop(upstream, None)
            if timer is not None and timer.active():
                timer.cancel()
            self._reap(upstream, force=True)
        return bool(children)

    def stopService(self) -> Deferred[Any]:
        for timer in self._idle.values():
            if timer.active():
                timer.cancel()
        self._idle.clear()
        return super().stopService()

    def _child_status(self, upstream: Upstream) -> dict[str, Any]:
        return {"principal": upstream.principal, **upstream.status()}


def _upstream_class(modern: bool) -> type[Upstream]:
    """The upstream for a child that speaks 2026-07-28, or the session era."""
    return ModernUpstream if modern else Upstream


def make_backend(
    server: ServerConfig,
    reactor: Any,
    environ: Mapping[str, str],
    recorder: Recorder | None = None,
    pins: PinBook | None = None,
    tracer: Tracer | None = None,
) -> Backend:
    cls = {"session": SessionBackend, "principal": PrincipalBackend}.get(
        server.sharing, SharedBackend
    )
    return cls(server, reactor, environ, recorder, pins, tracer)
