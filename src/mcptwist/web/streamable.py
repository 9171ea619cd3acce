# -*- test-case-name: tests.test_web -*-
"""Streamable HTTP (2025-03-26 to 2025-11-25) at C{/servers/NAME/mcp}.

POST carries client messages: notifications and responses get 202, requests
are answered as C{application/json} or as an SSE stream (which also carries
the progress notifications and server-to-client requests of that request).
GET opens the session's own stream for everything else. DELETE ends the
session. Every stream is a numbered L{EventChannel}, so a client that lost
one resumes it with a GET carrying C{Last-Event-ID}.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from typing import Final

from twisted.internet.defer import CancelledError
from twisted.web.server import NOT_DONE_YET, Request

from mcptwist.mcp import jsonrpc, protocol
from mcptwist.mcp.jsonrpc import Kind, Message, RequestId
from mcptwist.routing.backends import Backend
from mcptwist.routing.sessions import ClientSession

from .context import TransportContext
from .http import HTTPProblem, finish_with, header, negotiate, refuse_head
from .sse import EventChannel, parse_event_id

RETAINED_CHANNELS: Final = 16
# What a session's own stream keeps before its client first opens it: the few
# notifications sent right after initialize, not a hoard for a client that never will.
UNATTACHED_BACKLOG: Final = (16, 64 * 1024)
SESSION_HEADER: Final = b"mcp-session-id"
VERSION_HEADER: Final = b"mcp-protocol-version"


class Reply:
    """The answer to one POST: the responses to its requests, as JSON or SSE.

    For a client that takes either, the choice waits for the first message:
    the answers alone are JSON; a notification or a question first opens
    the stream (L{promote}), as does an answer slow in coming.
    """

    def __init__(self, ids: list[RequestId], batch: bool, channel: EventChannel | None) -> None:
        self.waiting = set(ids)
        self.batch = batch
        self.channel = channel
        self.responses: list[Message] = []
        # A JSON reply's body once every response is in, and who waits for it.
        self.body: bytes | None = None
        self.on_body: Callable[[bytes], None] | None = None
        # Opens the stream of a reply still undecided (None: decided).
        self.promote: Callable[[], None] | None = None

    def stream(self, channel: EventChannel) -> None:
        """Go on as SSE, on C{channel}: the answers taken so far first."""
        self.promote = None
        self.on_body = None
        self.channel = channel
        for message in self.responses:
            channel.emit(jsonrpc.dumps(message))
        self.responses.clear()

    def respond(self, message: Message) -> bool:
        """Take a response; True once every request of the POST is answered."""
        self.waiting.discard(message.get("id"))
        if self.channel is not None:
            self.channel.emit(jsonrpc.dumps(message))
        else:
            self.responses.append(message)
        return self._maybe_done()

    def abandon(self, request_id: RequestId) -> bool:
        """The client cancelled a request: it gets no response (a JSON reply
        still needs a body, so there it is a -32800 error the client ignores)."""
        if self.channel is None:
            return self.respond(
                jsonrpc.error(request_id, jsonrpc.REQUEST_CANCELLED, "Request cancelled")
            )
        self.waiting.discard(request_id)
        return self._maybe_done()

    def _maybe_done(self) -> bool:
        if self.waiting:
            return False
        if self.channel is not None:
            self.channel.finish()
        elif self.body is None:
            self.body = jsonrpc.dumps(self.responses if self.batch else self.responses[0])
            if self.on_body is not None:
                self.on_body(self.body)
        return True


class StreamableSink:
    """A Streamable HTTP session's streams: POST replies and the GET channel."""

    def __init__(self, keep: int, max_bytes: int) -> None:
        self.keep = keep
        self.max_bytes = max_bytes
        self.standalone = EventChannel(0, keep, max_bytes, until_attached=UNATTACHED_BACKLOG)
        self._numbers = itertools.count(1)
        self._channels: dict[int, EventChannel] = {0: self.standalone}
        self._retired: deque[int] = deque()
        self._replies: dict[RequestId, Reply] = {}

    @property
    def connected(self) -> bool:
        """A stream is open, or a request is in flight (its POST may still be open)."""
        return bool(self._replies) or any(c.connection is not None for c in self._channels.values())

    def busy(self, ids: list[RequestId]) -> bool:
        return any(i in self._replies for i in ids)

    def open_reply(self, ids: list[RequestId], batch: bool, sse: bool) -> Reply:
        reply = Reply(ids, batch, self.new_channel() if sse else None)
        for request_id in ids:
            self._replies[request_id] = reply
        return reply

    def new_channel(self) -> EventChannel:
        channel = EventChannel(next(self._numbers), self.keep, self.max_bytes)
        self._channels[channel.number] = channel
        return channel

    def channel(self, number: int) -> EventChannel | None:
        return self._channels.get(number)

    def deliver(
        self, message: Message, related: RequestId | None, encoded: bytes | None = None
    ) -> None:
        reply = self._replies.get(related) if related is not None else None
        if reply is None or "method" in message:
            if reply is not None and reply.promote is not None:
                reply.promote()
            data = encoded if encoded is not None else jsonrpc.dumps(message)
            channel = reply.channel if reply is not None else None
            (channel or self.standalone).emit(data)
        else:
            self._replies.pop(message.get("id"), None)  # type: ignore[arg-type]
            self._settle(reply, lambda: reply.respond(message))

    def forget(self, ids: list[RequestId]) -> None:
        """Drop the replies of a POST that failed, so its ids can be used again."""
        for request_id in ids:
            reply = self._replies.pop(request_id, None)
            if reply is not None and reply.channel is not None:
                self._channels.pop(reply.channel.number, None)

    def cancelled(self, request_id: RequestId) -> None:
        reply = self._replies.pop(request_id, None)
        if reply is not None:
            self._settle(reply, lambda: reply.abandon(request_id))

    def _settle(self, reply: Reply, step: Callable[[], bool]) -> None:
        """Apply a response (or cancellation) to a reply; drop or keep its channel when done."""
        channel = reply.channel
        lost = channel is not None and not channel.delivered
        if step() and channel is not None:
            if lost:
                self._retire(channel)
            else:
                self._channels.pop(channel.number, None)

    def _retire(self, channel: EventChannel) -> None:
        """Keep a channel that lost its connection a while, for a client that resumes it."""
        self._retired.append(channel.number)
        while len(self._retired) > RETAINED_CHANNELS:
            self._channels.pop(self._retired.popleft(), None)

    def close(self) -> None:
        for request_id, reply in list(self._replies.items()):
            reply.respond(
                jsonrpc.error(request_id, jsonrpc.SESSION_TERMINATED, "Session terminated")
            )
        self._replies.clear()
        for channel in self._channels.values():
            channel.finish()


def _session(
    ctx: TransportContext, request: Request, name: str, version: str | None, session_id: str | None
) -> ClientSession:
    if not session_id:
        raise HTTPProblem(
            400,
            jsonrpc.BAD_SESSION,
            "Bad Request: Mcp-Session-Id header is required",
        )
    session = ctx.find_session(request, session_id, name)
    if session is None:
        raise HTTPProblem(
            404,
            jsonrpc.SESSION_NOT_FOUND,
            "Session not found: it has ended or expired; send initialize again",
        )
    if session.transport != "streamable":
        raise HTTPProblem(
            400,
            jsonrpc.BAD_SESSION,
            "Bad Request: this session belongs to the HTTP+SSE transport",
        )
    _check_version(version)
    return session


def _check_version(version: str | None) -> None:
    if version is not None and version not in protocol.LEGACY_VERSIONS:
        raise HTTPProblem(
            400,
            jsonrpc.INVALID_REQUEST,
            f"Bad Request: unsupported MCP-Protocol-Version {version!r}; supported: "
            + ", ".join(protocol.LEGACY_VERSIONS),
        )


def _sink(session: ClientSession) -> StreamableSink:
    sink = session.sink
    assert isinstance(sink, StreamableSink)
    return sink


def post(
    ctx: TransportContext,
    request: Request,
    name: str,
    backend: Backend,
    messages: list[Message],
    kinds: list[Kind],
    batch: bool,
    json_ok: bool,
    sse_ok: bool,
    version: str | None,
    session_id: str | None,
) -> bytes | int:
    """The messages of a POST (read and parsed by the dispatch), in a session
    or opening one (initialize)."""
    initialize = any(
        m.get("method") == "initialize"
        for m, k in zip(messages, kinds, strict=True)
        if k is Kind.REQUEST
    )
    if initialize:
        ctx.backend(name)  # a new session: not on a server that is draining
        if batch:
            raise HTTPProblem(
                400,
                jsonrpc.INVALID_REQUEST,
                "Invalid Request: initialize must not be part of a batch",
            )
        _check_version(version)
        session = ctx.open_session(
            request,
            backend,
            "streamable",
            lambda _: StreamableSink(ctx.config.replay_events, ctx.config.stream_buffer),
            messages[0].get("id"),
        )
        if not json_ok:
            # An SSE-only client: the header must go out before the answer is known.
            request.setHeader(SESSION_HEADER, session.id.encode())
    else:
        session = _session(ctx, request, name, version, session_id)
        if batch and session.protocol_version not in protocol.BATCH_VERSIONS:
            raise HTTPProblem(
                400,
                jsonrpc.INVALID_REQUEST,
                f"Invalid Request: batches are not allowed in protocol version {session.protocol_version}",
            )
    sink = _sink(session)
    ids = [m["id"] for m, k in zip(messages, kinds, strict=True) if k is Kind.REQUEST]
    now = ctx.clock.seconds()
    if not ids:
        for message, kind in zip(messages, kinds, strict=True):
            session.receive(message, kind, now)
        request.setResponseCode(202)
        return b""
    if sink.busy(ids) or len(set(ids)) != len(ids):
        raise HTTPProblem(
            400,
            jsonrpc.INVALID_REQUEST,
            "Invalid Request: a request id is already in use in this session",
        )
    if not initialize:
        ctx.access.admit_requests(request, session, len(ids), None if batch else ids[0])
        ctx.refresh(request, session, None if batch else ids[0])
    # initialize is answered as JSON when the client takes it, so that the
    # session id is sent only with a successful result. A client that takes
    # either gets JSON unless a message for it comes before the answer.
    use_sse = sse_ok and not json_ok
    undecided = sse_ok and json_ok and not (backend.server.json_response or initialize)
    reply = sink.open_reply(ids, batch, use_sse)
    connection = None
    if reply.channel is not None:
        try:
            connection = ctx.stream(request, f"{name} POST")
        except HTTPProblem:
            # Refused (too many streams): nothing of this POST may linger.
            sink.forget(ids)
            if initialize:
                request.responseHeaders.removeHeader(SESSION_HEADER)
                ctx.registry.close(session, "refused: too many streams")
            raise
        reply.channel.attach(connection)
        if session.protocol_version in protocol.PRIMING_VERSIONS:
            reply.channel.prime()
    elif undecided:
        reply.promote = _promoter(ctx, request, name, session, reply)
    try:
        for message, kind in zip(messages, kinds, strict=True):
            session.receive(message, kind, now)
    except Exception:
        sink.forget(ids)
        raise
    # No coroutine here: most answers come back at once, and one per request
    # cost more than the rest of the handler. A client that goes away does not
    # cancel (under these revisions), so the request simply goes on.

    def settled(_: object = None) -> None:
        if initialize and session.protocol_version is None:
            ctx.registry.close(session, "failed to initialize")

    if connection is not None:
        connection.done.addBoth(settled)
        return NOT_DONE_YET

    def json_answer(body: bytes) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        if initialize and session.protocol_version is not None:
            request.setHeader(SESSION_HEADER, session.id.encode())
        settled()
        return body

    if reply.body is not None:
        return json_answer(reply.body)
    if reply.channel is not None:
        # A question or notification came first, before this returned.
        return NOT_DONE_YET
    gone: list[bool] = []

    def undecide() -> None:
        if reply.promote is not None:
            ctx.heartbeat.drop(reply.promote)
            reply.promote = None

    def vanished(_: object) -> None:
        gone.append(True)
        undecide()
        if initialize and reply.body is None:
            # Nobody can ever learn this session's id: end it (and its child).
            ctx.registry.close(session, "failed to initialize: the client left before the answer")

    request.notifyFinish().addErrback(vanished)

    def answer_later(body: bytes) -> None:
        undecide()
        body = json_answer(body)
        if not gone:
            finish_with(request, body)

    reply.on_body = answer_later
    if reply.promote is not None:
        # A slow answer goes out on a stream: resumable, and kept alive.
        ctx.heartbeat.soon(reply.promote)
    return NOT_DONE_YET


def _promoter(
    ctx: TransportContext, request: Request, name: str, session: ClientSession, reply: Reply
) -> Callable[[], None]:
    """What opens the stream of an undecided reply."""

    def promote() -> None:
        reply.promote = None
        ctx.heartbeat.drop(promote)
        try:
            connection = ctx.stream(request, f"{name} POST")
        except HTTPProblem:
            # No stream for this client now: the answer comes as JSON, and
            # what comes before it goes to the session's own stream.
            return
        channel = _sink(session).new_channel()
        channel.attach(connection)
        if session.protocol_version in protocol.PRIMING_VERSIONS:
            channel.prime()
        reply.stream(channel)
        if not request.startedWriting:
            # Nothing to send yet (an older revision has no priming event):
            # the stream opens now all the same.
            connection.send(b": stream open\n\n")

    return promote


async def get(
    ctx: TransportContext, request: Request, name: str, version: str | None, session_id: str | None
) -> bytes | None:
    """The session's own stream, or the one it lost (C{Last-Event-ID})."""
    refuse_head(request)
    _, sse_ok = negotiate(request)
    if not sse_ok:
        raise HTTPProblem(
            406,
            jsonrpc.INVALID_REQUEST,
            "Not Acceptable: the client must accept text/event-stream",
        )
    session = _session(ctx, request, name, version, session_id)
    sink = _sink(session)
    resume = parse_event_id(header(request, b"last-event-id"))
    channel = sink.channel(resume[0]) if resume is not None else sink.standalone
    if channel is None:
        channel = sink.standalone
        resume = None
    if channel.connection is not None and channel.connection.open:
        raise HTTPProblem(
            409,
            jsonrpc.INVALID_REQUEST,
            "Conflict: this session's stream is already open",
        )
    connection = ctx.stream(request, f"{name} GET")
    channel.attach(connection, resume[1] if resume is not None else None)
    if resume is None and session.protocol_version in protocol.PRIMING_VERSIONS:
        # After what was owed is replayed, so the priming id is never ahead of it.
        channel.prime()
    if not connection.request.startedWriting:
        connection.send(b": stream open\n\n")
    try:
        await connection.done
    except CancelledError:
        pass
    return None


def delete(
    ctx: TransportContext, request: Request, name: str, version: str | None, session_id: str | None
) -> bytes:
    """The end of a session, asked by its client."""
    session = _session(ctx, request, name, version, session_id)
    ctx.registry.close(session, "ended by the client")
    request.setResponseCode(200)
    return b""
