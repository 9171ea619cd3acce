# -*- test-case-name: tests.test_web -*-
"""HTTP+SSE (2024-11-05) at C{/servers/NAME/sse} and C{/servers/NAME/messages}.

A GET opens a session and its one stream; the first event, C{endpoint},
gives the relative URL to POST messages to. POSTs are answered 202 and
everything for the session arrives on the stream as C{message} events. The
session ends when the stream closes.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.web.server import Request

from mcptwist.config.model import url_path
from mcptwist.mcp import jsonrpc, protocol
from mcptwist.mcp.jsonrpc import Kind, Message, RequestId

from .context import TransportContext
from .http import HTTPProblem, negotiate, parse_messages, read_body, refuse_head, require_json
from .sse import EventConnection, encode_event


class LegacySink:
    """A legacy session's single stream."""

    def __init__(self) -> None:
        self.connection: EventConnection | None = None

    @property
    def connected(self) -> bool:
        return self.connection is not None and self.connection.open

    def deliver(
        self, message: Message, related: RequestId | None, encoded: bytes | None = None
    ) -> None:
        if self.connection is not None:
            data = encoded if encoded is not None else jsonrpc.dumps(message)
            self.connection.send(encode_event(data, event=b"message"))

    def cancelled(self, request_id: RequestId) -> None:
        """A cancelled request gets no response."""

    def close(self) -> None:
        if self.connection is not None:
            self.connection.finish()


async def stream(ctx: TransportContext, request: Request, name: str) -> None:
    backend = ctx.backend(name)
    refuse_head(request)
    _, sse_ok = negotiate(request)
    if not sse_ok:
        raise HTTPProblem(
            406,
            jsonrpc.INVALID_REQUEST,
            "Not Acceptable: the client must accept text/event-stream",
        )
    sink = LegacySink()
    session = ctx.open_session(request, backend, "sse", lambda _: sink)
    try:
        connection = ctx.stream(request, f"{name} SSE")
    except HTTPProblem:
        ctx.registry.close(session, "refused: too many streams")
        raise
    sink.connection = connection
    endpoint = f"{url_path(name)}/messages?session_id={session.id}"
    connection.send(encode_event(endpoint.encode(), event=b"endpoint"))
    try:
        await connection.done
    except CancelledError:
        pass
    finally:
        ctx.registry.close(session, "stream closed")


def post(ctx: TransportContext, request: Request, name: str) -> bytes:
    backend = ctx.backend(name, draining=True)
    args = request.args
    values = args.get(b"session_id") or args.get(b"sessionId")
    if not values:
        raise HTTPProblem(400, jsonrpc.BAD_SESSION, "Bad Request: session_id is required")
    session = ctx.find_session(request, values[0].decode("latin-1"), name)
    if session is None or session.transport != "sse":
        raise HTTPProblem(
            404,
            jsonrpc.SESSION_NOT_FOUND,
            f"Session not found: open a new stream at {url_path(name)}/sse",
        )
    require_json(request)
    messages, kinds, batch = parse_messages(
        read_body(request, backend.server.max_message_size),
        lambda count: ctx.access.charge_messages(request, name, count),
    )
    if batch and session.protocol_version not in protocol.BATCH_VERSIONS:
        raise HTTPProblem(
            400,
            jsonrpc.INVALID_REQUEST,
            f"Invalid Request: batches are not allowed in protocol version {session.protocol_version}",
        )
    requests = [m["id"] for m, k in zip(messages, kinds, strict=True) if k is Kind.REQUEST]
    if requests:
        ctx.access.admit_requests(request, session, len(requests), None if batch else requests[0])
        ctx.refresh(request, session, None if batch else requests[0])
    now = ctx.clock.seconds()
    for message, kind in zip(messages, kinds, strict=True):
        session.receive(message, kind, now)
    request.setResponseCode(202)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return b"Accepted"
