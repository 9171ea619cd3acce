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

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import attrs
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mcptwist.cluster.keys import SessionIds
from mcptwist.mcp.describe import argument_digest, request_name
from mcptwist.mcp.era import MODERN
from mcptwist.mcp.jsonrpc import Kind, Message, RequestId
from mcptwist.routing.backends import Backend
from mcptwist.routing.record import Described, Recorder, RequestEnded, Status, ToolEvent
from mcptwist.routing.tools import ToolView
from mcptwist.routing.upstream import Pending, Upstream

if TYPE_CHECKING:
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
    # session_opened was recorded (once; session_closed only follows it).
    announced: bool = False
    # Where its sessions and requests are recorded, if anywhere, and the clock.
    recorder: Recorder | None = None
    clock: IReactorTime | None = None
    # Where an authenticated principal's requests in flight are counted.
    caps: Caps | None = None
    # What of the server's tools this client may see and call (None: all).
    view: ToolView | None = None
    # The credentials (a Principal) and address its view or guard was given for.
    admitted_as: object = None
    # Its principal's JWT claims (what a child per principal reads as ${claim:NAME}).
    claims: Mapping[str, str] = attrs.field(factory=dict, repr=False)
    # Its tools/list requests in flight (their answers pass through the view).
    _listing: set[RequestId] = attrs.field(factory=set)
    # Its requests in flight (the router holds them).
    _requests: int = 0
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
        return self._requests + self._calls

    def deliver(
        self, message: Message, related: RequestId | None, encoded: bytes | None = None
    ) -> None:
        if self.closed:
            return
        if self._listing and "method" not in message and message.get("id") in self._listing:
            self._listing.discard(message["id"])
            assert self.view is not None
            message, encoded = self.view.listed(message), None
        self.sink.deliver(message, related, encoded)

    def cancelled(self, request_id: RequestId) -> None:
        self._listing.discard(request_id)
        if not self.closed:
            self.sink.cancelled(request_id)

    def receive(self, message: Message, kind: Kind, now: float) -> None:
        """A message from the client, for the child."""
        self.last_active = now
        assert self.upstream is not None
        view = self.view
        if view is not None and kind is Kind.REQUEST:
            method = message["method"]
            if method == "tools/call":
                refusal = view.refusal(message, self.upstream.catalog.lists_tool)
                if refusal is not None:
                    self.refuse(message, refusal)
                    return
            elif method == "tools/list":
                self._listing.add(message["id"])
            elif method not in ("initialize", "ping"):
                refusal = view.blocked_refusal(message)
                if refusal is not None:
                    self.refuse(message, refusal)
                    return
        self.upstream.handle(self, message, kind)

    def refuse(self, message: Message, answer: Message, peer: str | None = None) -> None:
        """A request the bridge refuses itself: recorded like any other (a
        refused tool is told to the recorder too), and answered, except on a
        stateless hub, whose caller answers its HTTP request itself."""
        error = answer["error"]
        if self.stateless:
            started = self.clock.seconds() if self.clock is not None else 0.0
            self.record_call(
                message["method"], message.get("params"), "error", error["code"], started, peer
            )
        else:
            p = Pending(
                method=message["method"],
                started=self.clock.seconds() if self.clock is not None else 0.0,
                session=self,
                client_id=message["id"],
            )
            self.request_started(p, message)
            self.request_ended(p, "error", error["code"])
        recorder = self.backend.recorder
        params = message.get("params")
        name = params.get("name") if isinstance(params, dict) else None
        if recorder is not None and message["method"] == "tools/call":
            recorder.tool_event(
                ToolEvent(
                    "tool_refused",
                    self.server,
                    str(name),
                    detail=error["message"],
                    principal=self.principal,
                )
            )
        if not self.stateless:
            self.deliver(answer, message["id"])

    def close(self) -> None:
        """End the session: its requests in flight end with it (cancelled)."""
        if self.closed:
            return
        self.closed = True
        if self.upstream is not None:
            self.backend.close(self, self.upstream)
        self.sink.close()

    # The router tells the session of each of its requests: when it takes it,
    # and how it ends (answered by the child or by the bridge, failed, timed
    # out, cancelled, or cut by the session's end). A hub's own requests (the
    # subscriptions of its listen streams) are the bridge's: neither counted
    # nor recorded.

    def request_started(
        self, request: Pending, message: Message, audit_arguments: bool | None = None
    ) -> None:
        """One of its requests was taken; C{audit_arguments} is the setting of
        the server that serves it, on an endpoint."""
        if self.stateless:
            return
        self._requests += 1
        if self.caps is not None:
            self.caps.request_started(self.principal)
        if self.recorder is not None:
            request.described = self._describe(
                request.method, message.get("params"), audit_arguments
            )

    def request_ended(
        self,
        request: Pending,
        status: Status,
        error_code: int | None,
        server: str | None = None,
        child_pid: int | None = None,
    ) -> None:
        """How one of its requests ended; C{server} and C{child_pid} name the
        member that served it, on an endpoint."""
        if self.stateless:
            return
        self._requests -= 1
        if self.caps is not None:
            self.caps.request_ended(self.principal)
        if request.described is None:
            return
        if request.method == "initialize" and status == "ok" and not self.announced:
            self.announced = True
            assert self.recorder is not None
            self.recorder.session_opened(
                session=self.id,
                server=self.server,
                principal=self.principal,
                peer=self.peer,
                transport=self.transport,
                protocol_version=self.protocol_version,
            )
        self._record(
            request.method,
            request.described,
            status,
            error_code,
            request.started,
            self.peer,
            server,
            child_pid,
            request,
        )

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

    def record_call(
        self,
        method: str,
        params: Any,
        status: Status,
        error_code: int | None,
        started: float,
        peer: str | None,
    ) -> None:
        """Record a request that did not pass through L{receive} (one round of a
        hub's call, or a listen stream, each from its own peer)."""
        if self.recorder is not None:
            self._record(method, self._describe(method, params), status, error_code, started, peer)

    def _describe(self, method: str, params: Any, audit_arguments: bool | None = None) -> Described:
        """What a request's record says it asked for (from its params as the
        client sent them, before the bridge rewrites anything in them)."""
        assert self.recorder is not None
        if not self.recorder.detailed:  # counting needs only the name
            return Described(request_name(method, params))
        size, digest = argument_digest(params)
        arguments = None
        if audit_arguments is None:
            audit_arguments = self.backend.server.audit_arguments
        if audit_arguments and isinstance(params, dict):
            arguments = params.get("arguments", params)
        return Described(request_name(method, params), size, digest, arguments)

    def _record(
        self,
        method: str,
        described: Described,
        status: Status,
        error_code: int | None,
        started: float,
        peer: str | None,
        server: str | None = None,
        child_pid: int | None = None,
        request: Pending | None = None,
    ) -> None:
        assert self.recorder is not None and self.clock is not None
        if server is None and child_pid is None:
            supervisor = getattr(self.upstream, "supervisor", None)
            child_pid = supervisor.pid if supervisor is not None else None
        now = self.clock.seconds()
        child_ms = None
        tool_error = False
        if request is not None:
            tool_error = request.tool_error
            if request.sent_at:
                child_ms = (now - request.sent_at) * 1000.0
        self.recorder.request_ended(
            RequestEnded(
                session=self.id,
                server=server or self.server,
                principal=self.principal,
                peer=peer,
                method=method,
                name=described.name,
                arg_size=described.arg_size,
                arg_sha256=described.arg_sha256,
                status=status,
                error_code=error_code,
                latency_ms=(now - started) * 1000.0,
                child_pid=child_pid,
                arguments=described.arguments,
                child_ms=child_ms,
                tool_error=tool_error,
            )
        )


class SessionRegistry(Service):
    """Every open session, by id; the global limit and idle reaping."""

    def __init__(
        self,
        clock: IReactorTime,
        max_sessions: int,
        reap_interval: float = 30.0,
        caps: Caps | None = None,
        recorder: Recorder | None = None,
        ids: SessionIds | None = None,
    ) -> None:
        self.clock = clock
        # Makes session ids (in a cluster, ids that name this node).
        self.ids = ids or SessionIds()
        self.max_sessions = max_sessions
        self.caps = caps
        # Where the sessions opened from now on, and their requests, are recorded.
        self.recorder = recorder
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
        claims: Mapping[str, str] | None = None,
    ) -> ClientSession:
        """Open a session on a server for a principal; the backend may refuse
        (CapacityError, or MissingCredential for a child per principal)."""
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
        session_id = self.ids.new()
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
            claims=claims or {},
        )
        if self.recorder is not None and self.recorder.recording:
            session.recorder, session.clock = self.recorder, self.clock
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
        claims: Mapping[str, str] | None = None,
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
        hub = self.create(backend, "stateless", sink_factory, principal, peer, claims)
        self._hubs[(backend, principal)] = hub
        if hub.recorder is not None:
            hub.announced = True
            hub.recorder.session_opened(
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
            # First its requests end (recorded as cancelled), then the session.
            session.close()
            if session.recorder is not None and session.announced:
                session.recorder.session_closed(
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
