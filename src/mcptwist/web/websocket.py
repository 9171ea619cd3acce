# -*- test-case-name: tests.test_websocket -*-
"""MCP over WebSocket at C{/servers/NAME/ws} and C{/endpoints/NAME/ws}.

The upgrade is a GET that the gate judges like any other request (Host,
Origin, address, credentials, grants, rate limit), so every refusal is an
HTTP answer with its headers (401 with C{WWW-Authenticate}, 429 with
C{Retry-After}). The client must offer the C{mcp} subprotocol, as the
official TypeScript SDK's C{WebSocketClientTransport} does. Each text frame
carries one JSON-RPC message (or a batch, where the era allows one).

The client's first message decides the connection's era, as a POST's does
without headers: one whose C{_meta} names a protocol version is of the
stateless revision (2026-07-28), any other of the session era; a message of
the other era later on the same socket is refused.

 - The session era: the connection is one session, opened by the first
   message and ended when the socket closes (its requests in flight are
   cancelled, as a DELETE would). Messages go to the router and back, the
   child's requests and notifications included.
 - 2026-07-28: each request is served on the principal's stateless hub
   exactly as a POST to C{/mcp} is (L{modern<mcptwist.web.modern>}), with a
   L{SocketRequest<mcptwist.web.modern.SocketRequest>} in place of the POST:
   its notifications and its answer come back as frames, requests run
   concurrently, an input_required retry is a new request on the socket.
   The revision cancels a request on HTTP by closing its response and on a
   byte stream by C{notifications/cancelled}: on a socket, as on stdio, that
   notification naming a request (a C{subscriptions/listen} included) ends
   it, and nothing more is sent for it. Closing the socket cancels all its
   requests. Retries and task requests are served by this node, never
   forwarded to another node of a cluster.

Each frame is charged to the rate limits a POSTed message is charged to.
Frames and messages over the server's C{max_message_size} close the socket
with 1009. Pings every C{heartbeat_interval} find dead peers. What waits to
be sent is bounded by C{stream_buffer}: a reader further behind is dropped
(its socket closed, its session ended), as on an SSE stream.

Autobahn is imported on the first upgrade: a bridge that serves no
WebSocket never loads it.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable
from io import BytesIO
from typing import Any, Final

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from mcptwist import __version__
from mcptwist.mcp import era, jsonrpc, protocol
from mcptwist.mcp.jsonrpc import Kind, Message, RequestId
from mcptwist.routing.sessions import ClientSession

from . import modern
from .admission import admission_of, admit
from .context import TransportContext
from .http import HTTPProblem, header, parse_messages

log = Logger(namespace="mcptwist.web.websocket")

SUBPROTOCOL: Final = "mcp"
TRANSPORT: Final = "websocket"
# Close codes (RFC 6455, section 7.4.1).
NORMAL: Final = 1000
GOING_AWAY: Final = 1001
UNSUPPORTED_DATA: Final = 1003
POLICY_VIOLATION: Final = 1008
TOO_BIG: Final = 1009
TRY_AGAIN_LATER: Final = 1013


def upgrade(ctx: TransportContext, request: Request, name: str) -> bytes | int:
    """Hand the connection to a WebSocket, or refuse in HTTP."""
    backend = ctx.backend(name)
    if (header(request, b"upgrade") or "").strip().lower() != "websocket":
        raise HTTPProblem(
            426,
            jsonrpc.INVALID_REQUEST,
            "Upgrade Required: open a WebSocket here, with the mcp subprotocol",
            headers={b"upgrade": b"websocket"},
        )
    if SUBPROTOCOL not in offered(request):
        raise HTTPProblem(
            400,
            jsonrpc.INVALID_REQUEST,
            "Bad Request: the WebSocket must offer the mcp subprotocol "
            "(Sec-WebSocket-Protocol: mcp)",
        )
    server = backend.server
    connection = Connection(ctx, request, name, ctx.config.stream_buffer)
    resource, factory_class, protocol_class = _autobahn()
    factory = factory_class(server=f"mcptwist/{__version__}", reactor=ctx.clock)
    factory.protocol = functools.partial(protocol_class, connection)
    interval = ctx.config.heartbeat_interval
    factory.setProtocolOptions(
        maxFramePayloadSize=server.max_message_size,
        maxMessagePayloadSize=server.max_message_size,
        autoPingInterval=interval,
        autoPingTimeout=interval,
        # Closed with 1009 (or 1002), not dropped: the client learns why.
        failByDrop=False,
    )
    # twisted.web's channel gives its transport to the socket, and is
    # released when the socket closes.
    connection.channel = request.channel
    try:
        answer: bytes | int = resource(factory).render(request)
    except BaseException:
        connection.channel = None
        raise
    return answer


def offered(request: Request) -> list[str]:
    """The subprotocols a WebSocket upgrade offers."""
    values = request.requestHeaders.getRawHeaders(b"sec-websocket-protocol") or []
    return [p.strip() for v in values for p in v.decode("latin-1").split(",")]


@functools.cache
def _autobahn() -> tuple[Any, Any, Any]:
    """Autobahn's resource and factory, and the protocol that hands what it
    hears to a L{Connection}: imported on the first upgrade."""
    from autobahn.twisted.resource import WebSocketResource
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol

    class MCPProtocol(WebSocketServerProtocol):
        """One MCP WebSocket: what Autobahn hears, told to its L{Connection}."""

        def __init__(self, connection: Connection) -> None:
            super().__init__()
            self.connection = connection

        def onConnect(self, request: Any) -> str:
            # The gate judged the upgrade, and upgrade() checked the offer.
            return SUBPROTOCOL

        def onOpen(self) -> None:
            self.connection.opened(self)

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            self.connection.received(payload, isBinary)

        def connectionLost(self, reason: Failure = connectionDone) -> None:
            super().connectionLost(reason)
            self.connection.lost(reason)

    return WebSocketResource, WebSocketServerFactory, MCPProtocol


@implementer(IPushProducer)
class Connection:
    """One MCP WebSocket: its frames in and out, the push producer that
    bounds what waits for a slow reader, and either the sink of its session
    (the session era) or its requests in progress (2026-07-28)."""

    def __init__(self, ctx: TransportContext, request: Request, name: str, max_queued: int) -> None:
        self.ctx = ctx
        # The upgrade request: who the client is, for every message's limits.
        self.request = request
        self.name = name
        self.max_queued = max_queued
        self.session: ClientSession | None = None
        # The era, once the first message told it (True: 2026-07-28).
        self.modern: bool | None = None
        # 2026-07-28: the requests in progress, by id.
        self.exchanges: dict[RequestId, Exchange] = {}
        # twisted.web's channel, released when the socket closes.
        self.channel: Any = None
        self.protocol: Any = None
        self.open = False
        self.ended = False
        self._paused = False
        self._out: deque[bytes] = deque()
        self._queued = 0
        # Frames that arrived while a cluster's rate limit was being decided.
        self._waiting: deque[tuple[bytes, bool]] = deque()
        self._deciding = False
        # How the socket closes once it has ended.
        self._closing = (GOING_AWAY, "the session has ended")

    # The socket

    def opened(self, protocol: Any) -> None:
        """The handshake is done: become the transport's producer (twisted.web's
        channel still is) and deliver what the session already has."""
        self.protocol = protocol
        transport = protocol.transport
        transport.unregisterProducer()
        transport.registerProducer(self, True)
        self.open = True
        if self.ended:
            self._close(*self._closing)
            return
        self.resumeProducing()

    def received(self, payload: bytes, binary: bool) -> None:
        """A whole message from the client."""
        if self.ended:
            return
        if binary:
            self._close(UNSUPPORTED_DATA, "MCP messages are JSON text frames")
            return
        if self._deciding:
            self._waiting.append((payload, binary))
            return
        self._take(payload)

    def lost(self, reason: Failure) -> None:
        """The connection is gone: the session ends, as a DELETE ends it; the
        requests in progress are cancelled, as closed responses are."""
        self.open = False
        self._out.clear()
        self._queued = 0
        self._waiting.clear()
        session = self.session
        if session is not None and not self.ended:
            self.ctx.registry.close(session, "socket closed")
        self.ended = True
        for exchange in list(self.exchanges.values()):
            exchange.gone("the client closed the WebSocket")
        channel, self.channel = self.channel, None
        if channel is not None:
            # twisted.web's channel lost its transport to the socket: it
            # releases its request and its count against the client's address.
            channel.connectionLost(reason)

    # Messages from the client

    def _take(self, payload: bytes) -> None:
        try:
            messages, kinds, batch = parse_messages(payload, self._check_batch)
        except HTTPProblem as problem:
            self._send_error(problem.id, problem)
            return
        verdict = self.ctx.access.charge_frame(self.request, self.name, len(messages))
        if isinstance(verdict, Deferred):
            self._deciding = True
            self.protocol.transport.pauseProducing()
            verdict.addCallback(self._decided, messages, kinds, batch)
            verdict.addErrback(lambda f: log.failure("while charging a WebSocket frame", f))
            return
        self._handle(verdict, messages, kinds, batch)

    def _decided(
        self, verdict: HTTPProblem | None, messages: list[Message], kinds: list[Kind], batch: bool
    ) -> None:
        self._deciding = False
        if self.ended:
            return
        self._handle(verdict, messages, kinds, batch)
        while self._waiting and not self._deciding and not self.ended:
            self.received(*self._waiting.popleft())
        if not self._deciding and self.protocol is not None and not self.ended:
            self.protocol.transport.resumeProducing()

    def _check_batch(self, count: int) -> None:
        limits = self.ctx.config.limits
        largest = min(limits.max_batch, limits.max_in_flight_per_session)
        if count > largest:
            raise HTTPProblem(
                413,
                jsonrpc.INVALID_REQUEST,
                f"Content Too Large: this batch holds {count} messages, more than "
                f"limits.max_batch or limits.max_in_flight_per_session ({largest})",
            )

    def _handle(
        self, refusal: HTTPProblem | None, messages: list[Message], kinds: list[Kind], batch: bool
    ) -> None:
        if self.modern is None:
            self.modern = not batch and era.is_modern(None, None, messages[0])
        if self.modern:
            self._handle_modern(refusal, messages, kinds, batch)
            return
        requests = [m["id"] for m, k in zip(messages, kinds, strict=True) if k is Kind.REQUEST]
        first = None if batch or not requests else requests[0]
        try:
            if refusal is not None:
                raise refusal
            if any(era.is_modern(None, None, m) for m in messages):
                raise HTTPProblem(
                    400,
                    jsonrpc.INVALID_REQUEST,
                    "Invalid Request: this WebSocket carries a session of the session era "
                    f"(its first message opened it); a {era.MODERN} request cannot be mixed in: "
                    "open another WebSocket for it",
                )
            session = self.session or self._open_session(first)
            if batch and session.protocol_version not in protocol.BATCH_VERSIONS:
                raise HTTPProblem(
                    400,
                    jsonrpc.INVALID_REQUEST,
                    "Invalid Request: batches are not allowed in protocol version "
                    f"{session.protocol_version}",
                )
            if requests:
                self.ctx.access.admit_requests(self.request, session, len(requests), first)
                self.ctx.refresh(self.request, session, first)
        except HTTPProblem as problem:
            if not self.ended:
                for request_id in requests or [None]:
                    self._send_error(request_id, problem)
            return
        now = self.ctx.clock.seconds()
        for message, kind in zip(messages, kinds, strict=True):
            session.receive(message, kind, now)

    def _open_session(self, request_id: RequestId | None) -> ClientSession:
        """The connection's session, opened by its first message; refused, the
        socket closes once the client has the refusal."""
        try:
            backend = self.ctx.backend(self.name)
            self.session = self.ctx.open_session(
                self.request, backend, TRANSPORT, lambda _: self, request_id
            )
        except HTTPProblem as problem:
            self._send_error(request_id, problem)
            # Full, or draining: the client may try again later (elsewhere).
            code = TRY_AGAIN_LATER if problem.status in (429, 503) else POLICY_VIOLATION
            self._end(code, "no session could be opened")
            raise
        return self.session

    def _handle_modern(
        self, refusal: HTTPProblem | None, messages: list[Message], kinds: list[Kind], batch: bool
    ) -> None:
        """2026-07-28: each request served as a POST to C{/mcp} would be."""
        if batch:
            problem = HTTPProblem(
                400,
                jsonrpc.INVALID_REQUEST,
                f"Invalid Request: a batch is not allowed in {era.MODERN}",
            )
            for message in messages:
                self._send_error(message.get("id"), problem)
            return
        [message], [kind] = messages, kinds
        if kind is Kind.NOTIFICATION:
            # Cancelling only ever frees: it is honoured even past a rate limit.
            if message["method"] == "notifications/cancelled":
                params = message.get("params")
                cancelled = params.get("requestId") if isinstance(params, dict) else None
                exchange = (
                    self.exchanges.get(cancelled) if isinstance(cancelled, str | int) else None
                )
                if exchange is not None:
                    exchange.gone("the client cancelled the request")
            return
        if kind is Kind.RESPONSE:
            self._send_error(
                message.get("id"),
                HTTPProblem(
                    400,
                    jsonrpc.INVALID_REQUEST,
                    f"Invalid Request: a client sends no responses in {era.MODERN}",
                ),
            )
            return
        request_id: RequestId = message["id"]
        try:
            if refusal is not None:
                raise refusal
            self._admit_modern(message, request_id)
            try:
                checked = era.check(message, None)
            except era.Refusal as refused:
                raise HTTPProblem(
                    refused.status, refused.code, refused.message, data=refused.data
                ) from None
        except HTTPProblem as problem:
            self._send_error(request_id, problem)
            return
        exchange = Exchange(self, request_id)
        self.exchanges[request_id] = exchange
        try:
            body = modern.handle(self.ctx, exchange, self.name, checked, True, True)
        except HTTPProblem as problem:
            if problem.id is None:
                problem.id = request_id
            body = problem.render(exchange)
        except Exception:
            log.failure("while serving {method} on a WebSocket", method=checked.method)
            body = jsonrpc.dumps(
                jsonrpc.error(
                    request_id, jsonrpc.INTERNAL_ERROR, "Internal error in the bridge (logged)"
                )
            )
        if body is not NOT_DONE_YET:
            assert isinstance(body, bytes)
            exchange.write(body)
            exchange.finish()

    def _admit_modern(self, message: Message, request_id: RequestId) -> None:
        """Refuse a request of the other era, an id already in progress, or
        one request too many on this socket."""
        if not era.is_modern(None, None, message):
            raise HTTPProblem(
                400,
                jsonrpc.INVALID_REQUEST,
                f"Invalid Request: this WebSocket speaks {era.MODERN} (its first request "
                f"carried _meta {era.META_VERSION}); a session-era message (initialize, or a "
                "request without that _meta) cannot be mixed in: open another WebSocket for it",
            )
        if request_id in self.exchanges:
            raise HTTPProblem(
                400,
                jsonrpc.INVALID_REQUEST,
                f"Invalid Request: request {request_id!r} is still in progress on this "
                "WebSocket; each request needs an id of its own",
            )
        largest = self.ctx.config.limits.max_in_flight_per_session
        if len(self.exchanges) >= largest:
            raise self.ctx.refused(
                self.request,
                self.name,
                "in-flight-session",
                429,
                f"Too Many Requests: this WebSocket already has {largest} requests in "
                "progress (limits.max_in_flight_per_session)",
                1,
            )

    def ended_exchange(self, exchange: Exchange) -> None:
        if self.exchanges.get(exchange.id) is exchange:
            del self.exchanges[exchange.id]

    # Messages to the client (the session's sink)

    @property
    def connected(self) -> bool:
        """Until the socket closes (its session is never reaped while it is open)."""
        return not self.ended

    def deliver(
        self, message: Message, related: RequestId | None, encoded: bytes | None = None
    ) -> None:
        self.send(encoded if encoded is not None else jsonrpc.dumps(message))

    def cancelled(self, request_id: RequestId) -> None:
        """A cancelled request gets no response."""

    def close(self) -> None:
        """The session ended (the bridge stops, the server went away): the
        socket closes once what is queued has been sent."""
        self._end(GOING_AWAY, "the session has ended")

    def _end(self, code: int, reason: str) -> None:
        """Take no more messages, and close once what is queued has been sent."""
        if self.ended:
            return
        self.ended = True
        self._closing = (code, reason)
        if not self._out:
            self._close(code, reason)

    def send(self, data: bytes) -> None:
        if self.protocol is None or self._paused or self._out:
            if self.ended and self.protocol is None:
                return
            self._out.append(data)
            self._queued += len(data)
            # One message may exceed the limit on its own; a reader that is
            # more than the limit behind is dropped.
            if self._queued > self.max_queued and len(self._out) > 1 and self.open:
                log.warn(
                    "dropped a slow WebSocket reader on {server}: {queued} bytes waiting "
                    "(stream_buffer is {limit})",
                    server=self.name,
                    queued=self._queued,
                    limit=self.max_queued,
                )
                self.abort()
            return
        self._write(data)

    def _write(self, data: bytes) -> None:
        protocol = self.protocol
        # Once a close frame has gone either way, nothing more may be sent.
        if self.open and protocol.state == protocol.STATE_OPEN:
            protocol.sendMessage(data, isBinary=False)

    def _send_error(self, request_id: RequestId | None, problem: HTTPProblem) -> None:
        error = jsonrpc.error(request_id, problem.code, problem.message, problem.data)
        self.send(jsonrpc.dumps(error))

    def _close(self, code: int, reason: str) -> None:
        protocol = self.protocol
        if self.open and protocol.state == protocol.STATE_OPEN:
            # sendClose takes only 1000 and the applications' codes (3000 to
            # 4999); the bridge speaks the protocol's own (1001, 1003).
            protocol.sendCloseFrame(code, reason.encode(), isReply=False)

    def abort(self) -> None:
        """Drop the connection now (its session ends when it is lost)."""
        self._out.clear()
        self._queued = 0
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.abortConnection()

    # IPushProducer

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        # pauseProducing may come inside sendMessage.
        while self._out and not self._paused and self.open:
            data = self._out.popleft()
            self._queued -= len(data)
            self._write(data)
        if self.ended and not self._out:
            self._close(*self._closing)

    def stopProducing(self) -> None:
        self._out.clear()
        self._queued = 0


class Exchange(modern.SocketRequest):
    """One 2026-07-28 request on a socket, served by L{modern} as its POST
    would be: what would be its response body is one frame, its
    notifications are frames, and the client leaving (the request cancelled,
    the socket closed) is its response closing."""

    def __init__(self, connection: Connection, request_id: RequestId) -> None:
        # Not Request.__init__: there is no HTTP channel of its own to take.
        # What the modern path reads of a request is here: the upgrade's
        # admission (who asks, from where), no headers (a frame has none).
        Componentized.__init__(self)
        upgrade = connection.request
        admission = admission_of(upgrade)
        if admission is not None:
            admit(self, admission)
        self.connection = connection
        self.id = request_id
        self.channel = upgrade.channel
        self.method = b"POST"
        self.uri = self.path = upgrade.path
        self.requestHeaders = Headers()
        self.responseHeaders = Headers()
        self.content = BytesIO()
        self.notifications: list[Deferred[None]] = []
        self.finished = 0
        self.code = 200
        self._body: list[bytes] = []

    def send(self, message: Message) -> None:
        """One message of this request, now."""
        if not self.finished:
            self.connection.send(jsonrpc.dumps(message))

    def write(self, data: bytes) -> None:
        if not self.finished:
            self._body.append(data)

    def finish(self) -> None:
        """The request is answered: what was written goes as one frame."""
        if self.finished:
            return
        self.finished = 1
        if self._body:
            self.connection.send(b"".join(self._body))
            self._body.clear()
        self._ended(None)

    def gone(self, why: str) -> None:
        """The client cancelled the request, or left: nothing more is sent for it."""
        if self.finished:
            return
        self.finished = 1
        self.why = why
        self._body.clear()
        self._ended(Failure(ConnectionDone(why)))

    def _ended(self, result: Failure | None) -> None:
        self.connection.ended_exchange(self)
        notifications, self.notifications = self.notifications, []
        for notification in notifications:
            if result is None:
                notification.callback(None)
            else:
                notification.errback(result)

    def responder(
        self, label: str, rewrite: Callable[[Message], Message] | None
    ) -> modern.Responding:
        return FrameResponder(self, rewrite)

    def stream(self, label: str) -> modern.MessageStream:
        release = self.connection.ctx.count_stream(self)
        stream = FrameStream(self)
        stream.done.addBoth(lambda _: release())
        return stream


class FrameResponder:
    """A call's responder on a socket: each notification, then the answer,
    one frame each."""

    def __init__(self, exchange: Exchange, rewrite: Callable[[Message], Message] | None) -> None:
        self.exchange = exchange
        self.rewrite = rewrite
        self.gone = False
        self.done = False

    def notify(self, message: Message) -> None:
        if not (self.done or self.gone):
            self.exchange.send(message)

    def answer(self, message: Message, status: int = 200) -> None:
        if self.done:
            return
        self.done = True
        if self.rewrite is not None:
            message = self.rewrite(message)
        if not self.gone:
            self.exchange.send(message)
            self.exchange.finish()


class FrameStream:
    """A listen stream on a socket: its messages as frames, until it ends or
    the client cancels it."""

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.done: Deferred[None] = Deferred()
        exchange.notifyFinish().addBoth(lambda _: self.done.callback(None))

    def send_message(self, message: Message) -> None:
        self.exchange.send(message)

    def finish(self) -> None:
        self.exchange.finish()


__all__ = ["SUBPROTOCOL", "TRANSPORT", "Connection", "Exchange", "offered", "upgrade"]
