# -*- test-case-name: tests.test_session -*-
"""Client sessions: who is connected, through which transport, to what.

A L{ClientSession} is one MCP session of one client on one server. The
router sees it as a L{Downstream}: it receives what the child sends to this
client, and hands it to the transport's L{Sink} (a Streamable HTTP session's
streams, or a legacy SSE connection). The L{SessionRegistry} creates them
with unguessable ids, finds them, enforces the global limit and reaps idle
ones.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import attrs
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mcptwist.mcp import jsonrpc
from mcptwist.mcp.describe import argument_digest, request_name
from mcptwist.mcp.era import MODERN
from mcptwist.mcp.jsonrpc import Kind, Message, RequestId
from mcptwist.routing.backends import Backend
from mcptwist.routing.upstream import Upstream

if TYPE_CHECKING:
    from mcptwist.routing.record import Recorder
    from mcptwist.security.ratelimit import Caps

log = Logger(namespace="mcptwist.session")


class Sink(Protocol):
    """Where a transport puts what the child sends to one session."""

    def deliver(
        self, message: Message, related: RequestId | None, encoded: bytes | None = None
    ) -> None: ...

    def cancelled(self, request_id: RequestId) -> None:
        """The client cancelled this request: end its wait without a response."""

    def close(self) -> None: ...

    @property
    def connected(self) -> bool:
        """Whether a client connection (a stream) is open right now."""


class SessionLimitError(Exception):
    """The bridge already holds max_sessions sessions."""


class PrincipalLimitError(SessionLimitError):
    """This principal already holds its share of sessions."""


@attrs.define(eq=False)
class ClientSession:
    """One client's MCP session with one server."""

    id: str
    transport: str
    backend: Backend
    sink: Sink
    last_active: float
    upstream: Upstream | None = None
    protocol_version: str | None = None
    capabilities: dict[str, Any] = attrs.field(factory=dict)
    client_info: dict[str, Any] = attrs.field(factory=dict)
    log_level: str | None = None
    closed: bool = False
    principal: str = "anonymous"
    peer: str | None = None
    opened: float = 0.0
    # session_opened was written (once; session_closed only follows it).
    announced: bool = False
    # With an audit trail: the clock.
    audit: Recorder | None = None
    clock: IReactorTime | None = None
    # Where an authenticated principal's requests in flight are counted.
    caps: Caps | None = None
    # Each request in flight by its id, with what the audit trail needs of it.
    _in_flight: dict[RequestId, _Audited | None] = attrs.field(factory=dict)
    # A stateless hub's calls in flight (each a downstream of its own).
    _calls: int = 0
    # A stateless hub: the session the bridge keeps for one principal's
    # 2026-07-28 requests to one server (read for every log line and question).
    stateless: bool = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.stateless = self.transport == "stateless"

    @property
    def server(self) -> str:
        return self.backend.server.name

    @property
    def in_flight(self) -> int:
        """Requests of this session (or calls of this hub) not answered yet."""
        return len(self._in_flight) + self._calls

    def deliver(
        self, message: Message, related: RequestId | None, encoded: bytes | None = None
    ) -> None:
        if related in self._in_flight and "method" not in message:
            self._ended(related, message)
        if not self.closed:
            self.sink.deliver(message, related, encoded)

    def cancelled(self, request_id: RequestId) -> None:
        if request_id in self._in_flight:
            self._ended(request_id, None)
        if not self.closed:
            self.sink.cancelled(request_id)

    def receive(self, message: Message, kind: Kind, now: float) -> None:
        """A message from the client, for the child."""
        self.last_active = now
        if kind is Kind.REQUEST:
            request_id = message["id"]
            if request_id in self._in_flight:
                # Refused here, so that the refusal cannot be taken for the
                # answer of the request in flight (and end its count).
                self.sink.deliver(
                    jsonrpc.error(
                        request_id,
                        jsonrpc.INVALID_REQUEST,
                        f"Invalid Request: id {request_id!r} is already in use by a request "
                        "in progress",
                    ),
                    request_id,
                )
                return
            self._started(message, now)
        assert self.upstream is not None
        self.upstream.handle(self, message, kind)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.upstream is not None:
            self.backend.close(self, self.upstream)
        for request_id in list(self._in_flight):
            self._ended(request_id, None)
        self.sink.close()

    def call_started(self) -> None:
        """A stateless call on this hub was sent on (room was checked before)."""
        self._calls += 1
        if self.caps is not None:
            self.caps.request_started(self.principal)

    def call_ended(self) -> None:
        if self._calls > 0:
            self._calls -= 1
            if self.caps is not None:
                self.caps.request_ended(self.principal)

    def _started(self, message: Message, now: float) -> None:
        self._in_flight[message["id"]] = (
            self._audit_record(message["method"], message.get("params"), now)
            if self.audit is not None
            else None
        )
        if self.caps is not None:
            self.caps.request_started(self.principal)

    def _ended(self, request_id: RequestId | None, answer: Message | None) -> None:
        started = self._in_flight.pop(request_id, None)  # type: ignore[arg-type]
        if self.caps is not None:
            self.caps.request_ended(self.principal)
        if started is not None:
            self._audit_end(started, answer)

    def audit_call(
        self,
        method: str,
        params: Any,
        status: str,
        error_code: int | None,
        started: float,
        peer: str | None,
    ) -> None:
        """Audit a request that did not pass through L{receive} (a hub's calls and
        streams, each from its own peer)."""
        if self.audit is not None:
            self._audit_write(self._audit_record(method, params, started), status, error_code, peer)

    # The audit trail: one event per request, however it ends (answered by the
    # child or by the bridge, failed, timed out, cancelled, or cut by the session's end).

    def _audit_record(self, method: str, params: Any, now: float) -> _Audited:
        """What the trail needs of a request, taken when it starts."""
        assert self.audit is not None
        size, digest, arguments = 0, "", None
        if self.audit.enabled:  # metrics alone need none of this
            size, digest = argument_digest(params)
            if self.backend.server.audit_arguments and isinstance(params, dict):
                arguments = params.get("arguments", params)
        return _Audited(method, now, request_name(method, params), size, digest, arguments)

    def _audit_write(
        self, started: _Audited, status: str, code: int | None, peer: str | None
    ) -> None:
        assert self.audit is not None and self.clock is not None
        self.audit.request(
            session=self.id,
            server=self.server,
            principal=self.principal,
            peer=peer,
            method=started.method,
            name=started.name,
            arg_size=started.size,
            arg_sha256=started.digest,
            status=status,
            error_code=code,
            latency_ms=(self.clock.seconds() - started.at) * 1000.0,
            child_pid=self.upstream.supervisor.pid if self.upstream is not None else None,
            arguments=started.arguments,
        )

    def _audit_end(self, started: _Audited, answer: Message | None) -> None:
        assert self.audit is not None
        code = None
        if answer is None:
            status = "cancelled"
        elif "error" in answer:
            error = answer["error"]
            code = error.get("code") if isinstance(error, dict) else None
            status = "timeout" if code == jsonrpc.REQUEST_TIMEOUT else "error"
        else:
            status = "ok"
        if started.method == "initialize" and status == "ok" and not self.announced:
            self.announced = True
            self.audit.session_opened(
                session=self.id,
                server=self.server,
                principal=self.principal,
                peer=self.peer,
                transport=self.transport,
                protocol_version=self.protocol_version,
            )
        self._audit_write(started, status, code, self.peer)


@attrs.frozen
class _Audited:
    """What the audit trail needs of a request until it ends."""

    method: str
    at: float
    name: str | None
    size: int
    digest: str
    arguments: Any


class SessionRegistry(Service):
    """Every open session, by id; the global limit and idle reaping."""

    def __init__(
        self,
        clock: IReactorTime,
        max_sessions: int,
        reap_interval: float = 30.0,
        caps: Caps | None = None,
        audit: Recorder | None = None,
    ) -> None:
        self.clock = clock
        self.max_sessions = max_sessions
        self.caps = caps
        self.audit = audit
        # Told of every session that ends (the service finishes draining with it).
        self.on_closed: Callable[[ClientSession], None] | None = None
        self.sessions: dict[str, ClientSession] = {}
        # Each principal's stateless hub on each backend.
        self._hubs: dict[tuple[Backend, str], ClientSession] = {}
        self._reaper = LoopingCall(self.reap)
        self._reaper.clock = clock
        self._reap_interval = reap_interval

    def startService(self) -> None:
        super().startService()
        self._reaper.start(self._reap_interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._reaper.running:
            self._reaper.stop()
        for session in list(self.sessions.values()):
            self.close(session)

    def create(
        self,
        backend: Backend,
        transport: str,
        sink_factory: Callable[[str], Sink],
        principal: str = "anonymous",
        peer: str | None = None,
    ) -> ClientSession:
        """Open a session on a server for a principal; the backend may refuse (CapacityError)."""
        if len(self.sessions) >= self.max_sessions:
            raise SessionLimitError(
                f"the bridge already holds {len(self.sessions)} sessions (max_sessions)"
            )
        # Without authentication there is no principal to hold to a share.
        caps = self.caps if principal != "anonymous" else None
        if caps is not None and not caps.open_session(principal):
            raise PrincipalLimitError(
                "this client already holds its share of sessions "
                "(limits.max_sessions_per_principal)"
            )
        session_id = secrets.token_urlsafe(32)
        now = self.clock.seconds()
        session = ClientSession(
            id=session_id,
            transport=transport,
            backend=backend,
            sink=sink_factory(session_id),
            last_active=now,
            principal=principal,
            peer=peer,
            opened=now,
        )
        if self.audit is not None and (self.audit.enabled or self.audit.metrics is not None):
            session.audit, session.clock = self.audit, self.clock
        session.caps = caps
        try:
            session.upstream = backend.open(session)
        except BaseException:
            if caps is not None:
                caps.close_session(principal)
            raise
        self.sessions[session_id] = session
        log.info(
            "session {prefix} opened on {server} ({transport})",
            prefix=session_id[:8],
            server=backend.server.name,
            transport=transport,
        )
        return session

    def hub(
        self,
        backend: Backend,
        sink_factory: Callable[[str], Sink],
        principal: str = "anonymous",
        peer: str | None = None,
    ) -> ClientSession:
        """The principal's stateless hub on a backend, opened on first use.

        Stateless clients have no session; the bridge keeps one for them per
        principal, so that a server with a child per session gives each
        principal a child of its own, and idle hubs are reaped like sessions.
        """
        hub = self._hubs.get((backend, principal))
        if hub is not None and not hub.closed:
            hub.last_active = self.clock.seconds()
            return hub
        hub = self.create(backend, "stateless", sink_factory, principal, peer)
        self._hubs[(backend, principal)] = hub
        if hub.audit is not None:
            hub.announced = True
            hub.audit.session_opened(
                session=hub.id,
                server=hub.server,
                principal=principal,
                peer=peer,
                transport="stateless",
                protocol_version=MODERN,
            )
        return hub

    def hubs(self, server: str, principal: str) -> list[ClientSession]:
        """A principal's open stateless hubs on a server (a reload may leave two)."""
        return [
            hub
            for (backend, who), hub in self._hubs.items()
            if who == principal and backend.server.name == server and not hub.closed
        ]

    def get(
        self, session_id: str | None, server: str, principal: str = "anonymous"
    ) -> ClientSession | None:
        """The open session with this id on this server, if this principal opened it.

        Another principal's session is not found, exactly as if it did not exist.
        """
        session = self.sessions.get(session_id) if session_id else None
        if (
            session is None
            or session.closed
            or session.server != server
            or session.principal != principal
        ):
            return None
        return session

    def close(self, session: ClientSession, why: str = "closed") -> None:
        if session.stateless and self._hubs.get((session.backend, session.principal)) is session:
            del self._hubs[(session.backend, session.principal)]
        if self.sessions.pop(session.id, None) is not None:
            log.info(
                "session {prefix} on {server} {why}",
                prefix=session.id[:8],
                server=session.server,
                why=why,
            )
            if self.caps is not None and session.principal != "anonymous":
                self.caps.close_session(session.principal)
            # First its requests end (audited as cancelled), then the session.
            session.close()
            if session.audit is not None and session.announced:
                session.audit.session_closed(
                    session=session.id,
                    server=session.server,
                    principal=session.principal,
                    reason=why,
                    duration=self.clock.seconds() - session.opened,
                    transport=session.transport,
                )
            if self.on_closed is not None:
                self.on_closed(session)
            return
        session.close()

    def reap(self) -> None:
        """Close sessions without an open stream that have been idle too long."""
        now = self.clock.seconds()
        for session in list(self.sessions.values()):
            idle = now - session.last_active
            if not session.sink.connected and idle > session.backend.server.session_idle_timeout:
                self.close(session, f"expired after {idle:.0f}s idle")

    def of_backend(self, backend: Backend) -> list[ClientSession]:
        """The open sessions a backend serves."""
        return [s for s in self.sessions.values() if s.backend is backend]

    def count(self, server: str) -> int:
        return sum(1 for s in self.sessions.values() if s.server == server)
