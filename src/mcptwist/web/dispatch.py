# -*- test-case-name: tests.test_web -*-
"""The message endpoints: one table from path and method to a transport.

Every request to C{/servers/NAME/mcp}, C{/servers/NAME/sse},
C{/servers/NAME/messages} and C{/servers/NAME/ws}, whatever its method, is dispatched from
L{ENDPOINTS} (the gate looks the last segment up; no URL map is consulted:
these carry every message, and werkzeug's matching cost a fifth of the
bridge's CPU). Here too, and only here, is it decided which era a request to
C{/mcp} belongs to: the stateless revision (2026-07-28,
L{modern<mcptwist.web.modern>}) or the session era (L{streamable
<mcptwist.web.streamable>}).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.server import NOT_DONE_YET, Request

from mcptwist.mcp import era, jsonrpc

from . import legacy_sse, modern, rest, streamable, websocket
from .context import TransportContext
from .http import (
    Handler,
    HTTPProblem,
    Undecided,
    catching,
    finish_with,
    header,
    negotiate,
    parse_messages,
    read_body,
    require_json,
    trace_context,
)

log = Logger(namespace="mcptwist.web")


def internal_error(request: IRequest) -> bytes:
    """The 500 answer to an unexpected error, which the caller has logged."""
    return HTTPProblem(500, jsonrpc.INTERNAL_ERROR, "Internal error in the bridge (logged)").render(
        request
    )


def guarded(handler: Handler) -> Handler:
    """Turn an L{HTTPProblem}, or any unexpected error, into a JSON-RPC answer.

    A synchronous handler stays synchronous: most message POSTs are answered
    at once, and a coroutine per request costs more than the work itself.
    """

    def problem_answer(request: Request, error: Exception) -> bytes | None:
        if isinstance(error, HTTPProblem):
            return None if request.startedWriting else error.render(request)
        log.failure("while handling {method} {path}", method=request.method, path=request.path)
        if request.startedWriting:
            # Every transport twisted.web serves on can abort (ITransport does not say so).
            transport: Any = request.transport
            transport.abortConnection()
            return None
        return internal_error(request)

    return catching(handler, problem_answer)


def _versions(request: IRequest) -> tuple[str | None, str | None]:
    """The MCP-Protocol-Version and Mcp-Session-Id headers, read once."""
    return header(request, streamable.VERSION_HEADER), header(request, streamable.SESSION_HEADER)


def _modern(version: str | None, session_id: str | None) -> bool:
    """A GET or DELETE of a 2026-07-28 client (by its version header)."""
    return version is not None and era.is_modern(version, session_id, None)


# /servers/NAME/mcp


def mcp_post(ctx: TransportContext, request: Request, name: str) -> bytes | int:
    """Messages for a server: to the era the headers, or the message, name."""
    backend = ctx.backend(name, draining=True)
    json_ok, sse_ok = negotiate(request)
    require_json(request)
    messages, kinds, batch = parse_messages(
        read_body(request, backend.server.max_message_size),
        lambda count: ctx.access.charge_messages(request, name, count),
    )
    version, session_id = _versions(request)
    if era.is_modern(version, session_id, None if batch else messages[0]):
        return modern.post(ctx, request, name, messages, kinds, batch, json_ok, sse_ok)
    return streamable.post(
        ctx, request, name, backend, messages, kinds, batch, json_ok, sse_ok, version, session_id
    )


async def mcp_get(ctx: TransportContext, request: Request, name: str) -> bytes | None:
    """A session's own stream; a 2026-07-28 client has none."""
    ctx.backend(name, draining=True)
    version, session_id = _versions(request)
    if _modern(version, session_id):
        return modern.not_allowed(request)
    return await streamable.get(ctx, request, name, version, session_id)


def mcp_delete(ctx: TransportContext, request: Request, name: str) -> bytes:
    """The end of a session; a 2026-07-28 client has none."""
    ctx.backend(name, draining=True)
    version, session_id = _versions(request)
    if _modern(version, session_id):
        return modern.not_allowed(request)
    return streamable.delete(ctx, request, name, version, session_id)


def not_allowed(allowed: bytes) -> Callable[[TransportContext, Request, str], bytes]:
    """The 405 handler of the methods an endpoint does not take."""
    problem = HTTPProblem(
        405, jsonrpc.INVALID_REQUEST, "Method Not Allowed", headers={b"allow": allowed}
    )

    def refuse(ctx: TransportContext, request: Request, name: str) -> bytes:
        return problem.render(request)

    return refuse


@attrs.frozen
class Endpoint:
    """A message endpoint's handlers by method: those that answer at once,
    those that are coroutines (known here, not asked of each request), and
    the answer to any other method."""

    answers: Mapping[bytes, Handler]
    coroutines: Mapping[bytes, Handler]
    refuse: Callable[[TransportContext, Request, str], bytes]

    @classmethod
    def of(cls, methods: Mapping[bytes, Handler], allowed: bytes) -> Endpoint:
        handlers = {m: guarded(h) for m, h in methods.items()}
        return cls(
            {m: h for m, h in handlers.items() if not inspect.iscoroutinefunction(h)},
            {m: h for m, h in handlers.items() if inspect.iscoroutinefunction(h)},
            not_allowed(allowed),
        )


# The last segment of /servers/NAME/... -> its endpoint.
ENDPOINTS: Final[Mapping[bytes, Endpoint]] = {
    b"mcp": Endpoint.of(
        {b"GET": mcp_get, b"POST": mcp_post, b"DELETE": mcp_delete}, b"GET, POST, DELETE"
    ),
    # A HEAD is answered by the handler: it cannot open a stream.
    b"sse": Endpoint.of({b"GET": legacy_sse.stream, b"HEAD": legacy_sse.stream}, b"HEAD, GET"),
    b"messages": Endpoint.of({b"POST": legacy_sse.post}, b"POST"),
    b"ws": Endpoint.of({b"GET": websocket.upgrade}, b"GET"),
    # The REST face (web/rest.py): the tools as an OpenAPI document.
    b"openapi.json": Endpoint.of({b"GET": rest.document}, b"GET"),
}
# /servers/NAME/tools/TOOL: a tool called over REST.
TOOLS: Final = Endpoint.of({b"POST": rest.call}, b"POST")


def endpoint_of(parts: list[bytes]) -> Endpoint | None:
    """The endpoint of a path under /servers/NAME/ (split on "/"), if any."""
    if len(parts) == 4:
        return ENDPOINTS.get(parts[3])
    if len(parts) == 5 and parts[3] == b"tools":
        return TOOLS
    return None


def takes_body(parts: list[bytes], method: bytes) -> bool:
    """Whether C{method} on the endpoint of this path reads a body (of
    messages, or a tool's arguments)."""
    found = endpoint_of(parts)
    return method == b"POST" and found is not None and method in found.answers


def dispatch(ctx: TransportContext, request: Request, endpoint: Endpoint, name: str) -> bytes | int:
    """Run the endpoint's handler for the request's method, on server C{name}.

    An answer at once is returned to twisted.web; a coroutine is cancelled
    if the client goes away, and what it returns is written before the
    response is finished.
    """
    tracer = ctx.tracer
    if tracer is None:
        return _dispatch(ctx, request, endpoint, name)
    with trace_context(tracer, request):
        return _dispatch(ctx, request, endpoint, name)


def _dispatch(
    ctx: TransportContext, request: Request, endpoint: Endpoint, name: str
) -> bytes | int:
    method = request.method
    handler = endpoint.answers.get(method)
    if handler is not None:
        try:
            return handler(ctx, request, name) or b""
        except Undecided as undecided:
            undecided.ready.addCallback(_answer_again, ctx, request, handler, name)
            return NOT_DONE_YET
    handler = endpoint.coroutines.get(method)
    if handler is None:
        return endpoint.refuse(ctx, request, name)
    # Watched before the handler starts: a handler that ends because its
    # client left writes nothing. Cancelled after what the handler watches
    # itself (its stream ends, and the handler with it, before any cancellation).
    gone: list[bool] = []
    request.notifyFinish().addErrback(lambda _: gone.append(True))
    d = Deferred.fromCoroutine(handler(ctx, request, name))
    request.notifyFinish().addErrback(lambda _: d.cancel())

    def done(body: bytes | None) -> None:
        if request.finished or gone:
            return
        finish_with(request, body or b"")

    d.addCallback(done)
    d.addErrback(lambda f: f.trap(CancelledError))
    d.addErrback(lambda f: log.failure("while answering {path}", f, path=request.path))
    return NOT_DONE_YET


def _answer_again(
    _: object, ctx: TransportContext, request: Request, handler: Handler, name: str
) -> None:
    """Run a synchronous handler again, now that what it waited for is known
    (L{Undecided}): it reads the body again, and answers."""
    if request.finished or request.channel is None:
        return
    if request.content is not None:
        request.content.seek(0)
    try:
        with trace_context(ctx.tracer, request):
            body = handler(ctx, request, name)
    except Exception:
        log.failure("while answering {path}", path=request.path)
        body = internal_error(request)
    if body is not NOT_DONE_YET and not request.finished:
        finish_with(request, body)


__all__ = [
    "ENDPOINTS",
    "TOOLS",
    "Endpoint",
    "dispatch",
    "endpoint_of",
    "guarded",
    "internal_error",
    "takes_body",
]
