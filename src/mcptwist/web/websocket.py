# -*- test-case-name: tests.test_websocket -*-
"""MCP over WebSocket at C{/servers/NAME/ws} and C{/endpoints/NAME/ws}.

The upgrade is a GET that the gate judges like any other request (Host,
Origin, address, credentials, grants, rate limit), so every refusal is an
HTTP answer with its headers (401 with C{WWW-Authenticate}, 429 with
C{Retry-After}). The client must offer the C{mcp} subprotocol, as the
official TypeScript SDK's C{WebSocketClientTransport} does. One connection is
one session of the session era, opened when the upgrade is accepted and
ended when the socket closes (its requests in flight are cancelled, as a
DELETE would): each text frame carries one JSON-RPC message (or a batch,
where the session's protocol version allows one), from the client to the
router and from the router back, the child's requests and notifications
included.

Each frame is charged to the rate limits a POSTed message is charged to.
Frames and messages over the server's C{max_message_size} close the socket
with 1009. Pings every C{heartbeat_interval} find dead peers. What waits to
be sent is bounded by C{stream_buffer}: a reader further behind is dropped
(its socket closed, its session ended), as on an SSE stream.

The stateless revision (2026-07-28) has no sessions and no connection to
hold: a message of it on a socket is answered with an error that says to
POST it to C{/mcp}.

Autobahn is imported on the first upgrade: a bridge that serves no
WebSocket never loads it.
"""

from __future__ import annotations

import functools
from collections import deque
from typing import Any, Final

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from mcptwist import __version__
from mcptwist.mcp import era, jsonrpc, protocol
from mcptwist.mcp.jsonrpc import Kind, Message, RequestId
from mcptwist.routing.sessions import ClientSession

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


def upgrade(ctx: TransportContext, request: Request, name: str) -> bytes | int:
    """Open a session and hand the connection to a WebSocket, or refuse in HTTP."""
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
    connection.session = ctx.open_session(request, backend, TRANSPORT, lambda _: connection)
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
        ctx.registry.close(connection.session, "refused: the WebSocket could not be opened")
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
    """One MCP WebSocket: the session's sink, its frames in and out, and the
    push producer that bounds what waits for a slow reader."""

    def __init__(self, ctx: TransportContext, request: Request, name: str, max_queued: int) -> None:
        self.ctx = ctx
        # The upgrade request: who the client is, for every message's limits.
        self.request = request
        self.name = name
        self.max_queued = max_queued
        self.session: ClientSession | None = None
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
            self._close(GOING_AWAY, "the session has ended")
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
        """The connection is gone: the session ends, as a DELETE ends it."""
        self.open = False
        self._out.clear()
        self._queued = 0
        self._waiting.clear()
        session = self.session
        if session is not None and not self.ended:
            self.ctx.registry.close(session, "socket closed")
        self.ended = True
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
        session = self.session
        assert session is not None
        requests = [m["id"] for m, k in zip(messages, kinds, strict=True) if k is Kind.REQUEST]
        first = None if batch or not requests else requests[0]
        try:
            if refusal is not None:
                raise refusal
            self._check_era(session, messages, batch)
            if requests:
                self.ctx.access.admit_requests(self.request, session, len(requests), first)
                self.ctx.refresh(self.request, session, first)
        except HTTPProblem as problem:
            for request_id in requests or [None]:
                self._send_error(request_id, problem)
            return
        now = self.ctx.clock.seconds()
        for message, kind in zip(messages, kinds, strict=True):
            session.receive(message, kind, now)

    def _check_era(self, session: ClientSession, messages: list[Message], batch: bool) -> None:
        if batch and session.protocol_version not in protocol.BATCH_VERSIONS:
            raise HTTPProblem(
                400,
                jsonrpc.INVALID_REQUEST,
                "Invalid Request: batches are not allowed in protocol version "
                f"{session.protocol_version}",
            )
        if session.protocol_version is None and era.is_modern(None, None, messages[0]):
            raise HTTPProblem(
                400,
                jsonrpc.UNSUPPORTED_VERSION,
                f"Unsupported protocol version: {era.MODERN} is stateless and has no "
                "WebSocket transport; POST its requests to the server's /mcp URL, or "
                "send initialize to open a session on this socket",
            )

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
        if self.ended:
            return
        self.ended = True
        if not self._out:
            self._close(GOING_AWAY, "the session has ended")

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
        self.send(jsonrpc.dumps(jsonrpc.error(request_id, problem.code, problem.message)))

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
            self._close(GOING_AWAY, "the session has ended")

    def stopProducing(self) -> None:
        self._out.clear()
        self._queued = 0


__all__ = ["SUBPROTOCOL", "TRANSPORT", "Connection", "offered", "upgrade"]
