# -*- test-case-name: tests.test_web -*-
"""HTTP plumbing shared by the transports: errors, bodies, content negotiation."""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES, datetimeToString, parse_qs
from twisted.web.iweb import IRequest
from twisted.web.resource import _IEncodingResource
from twisted.web.server import Request

from mcptwist.mcp import jsonrpc
from mcptwist.mcp.jsonrpc import RequestId

if TYPE_CHECKING:
    from mcptwist.routing.trace import Tracer


class HTTPProblem(Exception):
    """A request refused with an HTTP status and a JSON-RPC error body."""

    def __init__(
        self,
        status: int,
        code: int,
        message: str,
        id: RequestId | None = None,
        headers: dict[bytes, bytes] | None = None,
        data: Any = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.id = id
        self.headers = headers or {}
        self.data = data

    def render(self, request: IRequest) -> bytes:
        request.setResponseCode(self.status)
        for name, value in self.headers.items():
            request.setHeader(name, value)
        return json_body(request, jsonrpc.error(self.id, self.code, self.message, self.data))


def header(request: IRequest, name: bytes) -> str | None:
    """A request header as text (latin-1, as HTTP defines), or None."""
    value = request.getHeader(name)
    if value is None:
        return None
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


def trace_headers(request: IRequest) -> dict[str, str]:
    """The W3C trace context fields of a request's headers, if any."""
    found: dict[str, str] = {}
    for field in (b"traceparent", b"tracestate", b"baggage"):
        value = request.getHeader(field)
        if value is not None:
            found[field.decode()] = value.decode("latin-1")
    return found


def trace_context(tracer: Tracer | None, request: IRequest) -> AbstractContextManager[None]:
    """The HTTP request's trace context, current while its messages are
    handed to the router (nothing to do without a tracer or trace headers)."""
    if tracer is not None:
        headers = trace_headers(request)
        if headers:
            return tracer.incoming(headers)
    return nullcontext()


def json_body(request: IRequest, value: Any) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    return jsonrpc.dumps(value)


log = Logger(namespace="mcptwist.web")

# Every answer's Server header: no version for a scanner to match.
SERVER: Final = b"mcptwist"


class BoundedRequest(Request):
    """A request whose body is capped: past C{body_limit} bytes it is discarded.

    The channel sets each request's limit when its headers have arrived (the
    limit of the server its path names, or a small one before credentials
    are known good) and answers 413 as soon as the limit is passed; memory
    never holds more than the limit.
    """

    body_limit = 64 * 1024
    body_size = 0
    body_too_large = False

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        self.body_size += len(data)
        if self.body_size > self.body_limit:
            self.body_too_large = True
            if self.content is not None:
                self.content.seek(0)
                self.content.truncate()
            over = getattr(self.channel, "body_over_limit", None)
            if over is not None:
                over(self)
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        """twisted.web's, but the Server header is ours from the start and the
        Date is formatted once a second, not once a request."""
        self.site = self.channel.site  # type: ignore[attr-defined]
        headers = self.responseHeaders
        headers.setRawHeaders(b"server", [SERVER])
        headers.setRawHeaders(b"date", [http_date()])
        self.prepath = []
        self.postpath = list(map(unquote_to_bytes, self.path[1:].split(b"/")))
        if self.path == b"*":
            self._handleStar()
            return
        try:
            resrc = self.site.getResourceFor(self)
            if _IEncodingResource.providedBy(resrc):
                encoder = resrc.getEncoder(self)
                if encoder is not None:
                    self._encoder = encoder
            self.render(resrc)
        except BaseException:
            self.processingFailed(Failure())

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            self.responseHeaders.setRawHeaders(b"server", [SERVER])
        super().write(data)


_date: list[Any] = [None, b""]


def http_date() -> bytes:
    """Now as an HTTP date (RFC 9110), formatted anew each second."""
    now = int(time.time())
    if _date[0] != now:
        _date[0] = now
        _date[1] = datetimeToString(now)
    date: bytes = _date[1]
    return date


def finish_with(request: IRequest, body: bytes) -> None:
    """Answer with this whole body: its length given, so that the head and
    the body leave in one write (not chunked, nothing after them)."""
    if not request.startedWriting and request.code not in NO_BODY_CODES:  # type: ignore[attr-defined]
        request.setHeader(b"content-length", b"%d" % len(body))
    if body:
        request.write(body)
    request.finish()


def too_large(limit: int) -> HTTPProblem:
    """The 413 of a body over C{limit} bytes."""
    return HTTPProblem(
        413,
        jsonrpc.INVALID_REQUEST,
        f"Request body too large: the limit is {limit} bytes",
    )


def query_names(uri: bytes, name: bytes) -> bool:
    """Whether the query of C{uri} has a parameter C{name}, as twisted.web
    parses it into a request's C{args} (read before it has, from the head)."""
    _, _, query = uri.partition(b"?")
    return bool(query) and name in parse_qs(query, 1)


def read_body(request: IRequest, limit: int) -> bytes:
    if isinstance(request, BoundedRequest) and request.body_too_large:
        raise too_large(limit)
    body: bytes = request.content.read()
    if len(body) > limit:
        raise too_large(limit)
    return body


def media_types(value: str | None) -> set[str]:
    """The media types of an Accept or Content-Type header, without parameters."""
    if not value:
        return set()
    types = set()
    for item in value.split(","):
        kind = item.split(";", 1)[0].strip().lower()
        if kind:
            types.add(kind)
    return types


def negotiate(request: IRequest) -> tuple[bool, bool]:
    """Which of JSON and SSE the client accepts, as (json, sse); 406 if neither."""
    accept = header(request, b"accept")
    if accept is None:
        return True, True
    kinds = media_types(accept)
    anything = "*/*" in kinds
    json_ok = anything or "application/json" in kinds or "application/*" in kinds
    sse_ok = anything or "text/event-stream" in kinds or "text/*" in kinds
    if not (json_ok or sse_ok):
        raise HTTPProblem(
            406,
            jsonrpc.INVALID_REQUEST,
            "Not Acceptable: the client must accept application/json or text/event-stream",
        )
    return json_ok, sse_ok


def refuse_head(request: IRequest) -> None:
    """A stream cannot be opened by a HEAD request (it would open a session)."""
    if request.method == b"HEAD":
        raise HTTPProblem(
            405,
            jsonrpc.INVALID_REQUEST,
            "Method Not Allowed: open the stream with GET",
            headers={b"allow": b"GET"},
        )


def require_json(request: IRequest) -> None:
    # One media type (not a list): "text/plain;,application/json" is text/plain
    # to a browser, which may then send it cross-site without a preflight.
    value = header(request, b"content-type") or ""
    if value.split(";", 1)[0].strip().lower() != "application/json":
        raise HTTPProblem(
            415,
            jsonrpc.INVALID_REQUEST,
            "Unsupported Media Type: the body must be application/json",
        )


def parse_messages(
    body: bytes, charge: Callable[[int], None] | None = None
) -> tuple[list[jsonrpc.Message], list[jsonrpc.Kind], bool]:
    """Parse a POST body into its messages and their kinds (400 on bad input).

    C{charge} is told how many messages there are before they are looked at
    (it refuses a batch that is too long, or that its client cannot pay for).
    """
    try:
        parsed = jsonrpc.loads(body)
    except jsonrpc.ProtocolError as e:
        raise HTTPProblem(400, e.code, e.message) from None
    batch = isinstance(parsed, list)
    messages = parsed if batch else [parsed]
    if batch and not messages:
        raise HTTPProblem(400, jsonrpc.INVALID_REQUEST, "Invalid Request: empty batch")
    if charge is not None:
        charge(len(messages))
    kinds = []
    for message in messages:
        try:
            kinds.append(jsonrpc.classify(message))
        except jsonrpc.ProtocolError as e:
            id = message.get("id") if isinstance(message, dict) else None
            raise HTTPProblem(
                400, e.code, e.message, id if isinstance(id, str | int) else None
            ) from None
    return messages, kinds, batch


Handler = Callable[..., Any]


class Undecided(Exception):
    """A request that cannot be answered yet: its admission waits for
    something (a cluster's shared rate limit, in Redis). Raised by a
    synchronous handler, which is run again once C{ready} has fired."""

    def __init__(self, ready: Deferred[Any]) -> None:
        super().__init__("waiting")
        self.ready = ready


def catching(handler: Handler, on_error: Callable[[Request, Exception], bytes | None]) -> Handler:
    """C{handler} (a method taking the request first) with any exception but a
    cancellation answered by C{on_error(request, error)}.

    A synchronous handler stays synchronous: most message POSTs are answered
    at once, and a coroutine per request costs more than the work itself.
    """
    if inspect.iscoroutinefunction(handler):

        @functools.wraps(handler)
        async def wrapper(self: object, request: Request, *args: Any, **kwargs: Any) -> Any:
            try:
                return await handler(self, request, *args, **kwargs)
            except CancelledError:
                raise
            except Exception as error:
                return on_error(request, error)

        return wrapper

    @functools.wraps(handler)
    def sync_wrapper(self: object, request: Request, *args: Any, **kwargs: Any) -> Any:
        try:
            return handler(self, request, *args, **kwargs)
        except Undecided:
            raise
        except Exception as error:
            return on_error(request, error)

    return sync_wrapper


def route_not_found(self: object, request: IRequest, failure: Failure) -> bytes:
    """A Klein error handler: no route matched the path."""
    return HTTPProblem(404, jsonrpc.INVALID_REQUEST, "Not Found").render(request)


def route_not_allowed(self: object, request: IRequest, failure: Failure) -> bytes:
    """A Klein error handler: the path matched, the method did not."""
    allowed = getattr(failure.value, "valid_methods", None) or []
    headers = {b"allow": ", ".join(allowed).encode()} if allowed else {}
    return HTTPProblem(405, jsonrpc.INVALID_REQUEST, "Method Not Allowed", headers=headers).render(
        request
    )


def answered(handler: Handler) -> Handler:
    """Turn an L{HTTPProblem}, or any unexpected error, into a JSON-RPC answer."""

    def problem_answer(request: Request, error: Exception) -> bytes | None:
        if not isinstance(error, HTTPProblem):
            log.failure(
                "while handling {method} {path}",
                Failure(error),
                method=request.method,
                path=request.path,
            )
            error = HTTPProblem(
                500, jsonrpc.INTERNAL_ERROR, "Internal error in the bridge (logged)"
            )
        if request.startedWriting:
            return None
        return error.render(request)

    return catching(handler, problem_answer)
