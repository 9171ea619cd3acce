# -*- test-case-name: tests.test_rest -*-
"""The REST face of a server's tools: C{POST /servers/NAME/tools/TOOL} and
C{GET /servers/NAME/openapi.json}.

A REST call is a stateless C{tools/call} on the principal's hub (the one
2026-07-28 requests use): the same child, sharing mode, credentials, tool
view, in-flight caps, audit records, metrics and traces. It is served by a
L{ModernCall} whose client declared no capabilities, so a child that asks
its client a question (elicitation, sampling, roots) gets an error, and the
REST caller a 501 that says so. The arguments are checked against the
tool's input schema (from the server's L{Catalog}) before the child sees
them. The document is made from the same catalog, as this client may see
it, at each request: a C{list_changed} refetches the catalog, and the next
document shows the change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Final

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.web.server import Request

from mcptwist import __version__
from mcptwist.mcp import era, jsonrpc
from mcptwist.mcp.jsonrpc import Message
from mcptwist.routing.backends import Backend
from mcptwist.routing.catalog import Unavailable
from mcptwist.routing.members import AggregateBackend
from mcptwist.routing.sessions import ClientSession
from mcptwist.routing.stateless import ModernCall

from . import openapi
from .admission import admission_of, peer_of
from .context import TransportContext
from .http import HTTPProblem, json_body, read_body, require_json, trace_headers
from .modern import open_hub

# The id of a REST call's request (it is alone in its call).
CALL_ID: Final = 1
CLIENT_INFO: Final = {"name": "mcptwist-rest", "version": __version__}


class RestResponder:
    """Where a REST call's answer goes: a Deferred of (message, status).
    Progress and log lines have no place in a REST answer."""

    def __init__(self) -> None:
        self.done: Deferred[tuple[Message, int]] = Deferred()

    def notify(self, message: Message) -> None:
        pass

    def answer(self, message: Message, status: int = 200) -> None:
        if not self.done.called:
            self.done.callback((message, status))


def _request(tool: str, arguments: dict[str, Any]) -> era.ModernRequest:
    """A REST call as the stateless request it is served as: a client that
    declares no capabilities."""
    meta = {
        era.META_VERSION: era.MODERN,
        era.META_CAPABILITIES: {},
        era.META_CLIENT: CLIENT_INFO,
    }
    message = jsonrpc.request(
        CALL_ID, "tools/call", {"name": tool, "arguments": arguments, "_meta": meta}
    )
    return era.ModernRequest(message, CALL_ID, "tools/call", era.MODERN, {}, CLIENT_INFO, None)


def _server_backend(ctx: TransportContext, name: str) -> Backend:
    backend = ctx.backend(name)
    if isinstance(backend, AggregateBackend):
        raise HTTPProblem(
            404,
            jsonrpc.INVALID_REQUEST,
            "Not Found: the REST face serves a server's tools; use /servers/NAME/",
        )
    return backend


async def _tools(
    ctx: TransportContext, request: Request, name: str, checked: era.ModernRequest
) -> tuple[ClientSession, dict[str, dict[str, Any]]]:
    """The principal's hub on the server, and the tools it may see there (by name)."""
    backend = _server_backend(ctx, name)
    hub = open_hub(ctx, request, name, checked)
    upstream = hub.upstream
    assert upstream is not None
    view = ctx.tool_view(request, backend)
    if view is not None:
        blocked = view.blocked()
        if blocked is not None:
            raise HTTPProblem(
                503, jsonrpc.SERVER_UNAVAILABLE, f"Service Unavailable: '{name}' is {blocked}"
            )
    listed = upstream.catalog.get("tools/list")
    listed.addTimeout(backend.server.request_timeout, ctx.clock)
    try:
        tools = await listed
    except Unavailable as e:
        raise HTTPProblem(
            503, jsonrpc.SERVER_UNAVAILABLE, f"Service Unavailable: {e}", headers=_RETRY
        ) from None
    except TimeoutError:
        raise HTTPProblem(
            504,
            jsonrpc.REQUEST_TIMEOUT,
            f"Gateway Timeout: MCP server '{name}' did not list its tools within "
            f"{backend.server.request_timeout:g}s",
        ) from None
    shown = view.shown(tools) if view is not None else tools
    return hub, openapi.served_tools(shown)


_RETRY: Final = {b"retry-after": b"5"}


async def document(ctx: TransportContext, request: Request, name: str) -> bytes:
    """C{GET .../openapi.json}: the tools this client may call, as operations."""
    hub, tools = await _tools(ctx, request, name, _request("", {}))
    assert hub.upstream is not None
    init = hub.upstream.init_result or {}
    instructions = init.get("instructions")
    base = request.path.decode("ascii").rsplit("/", 1)[0]
    doc = openapi.document(
        name,
        base,
        tools.values(),
        ctx.config.auth.enabled,
        init.get("serverInfo") if isinstance(init.get("serverInfo"), dict) else None,
        instructions if isinstance(instructions, str) else None,
    )
    request.setHeader(b"cache-control", b"no-store")
    return json_body(request, doc)


async def call(ctx: TransportContext, request: Request, name: str) -> bytes:
    """C{POST .../tools/TOOL}: the tool called with the body as its arguments."""
    admission = admission_of(request)
    assert admission is not None
    tool = admission.parts[4].decode("utf-8", "replace")
    backend = _server_backend(ctx, name)
    require_json(request)
    body = read_body(request, backend.server.max_message_size)
    try:
        arguments = jsonrpc.loads(body) if body.strip() else {}
    except jsonrpc.ProtocolError as e:
        raise HTTPProblem(400, e.code, e.message) from None
    if not isinstance(arguments, dict):
        raise HTTPProblem(
            400,
            jsonrpc.INVALID_PARAMS,
            "Bad Request: the body must be a JSON object: the tool's arguments",
        )
    checked = _request(tool, arguments)
    hub, tools = await _tools(ctx, request, name, checked)
    found = tools.get(tool)
    if found is None:
        raise HTTPProblem(404, jsonrpc.INVALID_PARAMS, f"Not Found: unknown tool {tool!r}")
    errors = openapi.argument_errors(found, arguments)
    if errors:
        raise HTTPProblem(
            422,
            jsonrpc.INVALID_PARAMS,
            f"Unprocessable Content: the arguments do not match {tool!r}'s input schema",
            data={"errors": errors},
        )
    if hub.closed:
        raise HTTPProblem(503, jsonrpc.SERVER_UNAVAILABLE, "Service Unavailable", headers=_RETRY)
    ctx.access.admit_requests(request, hub, 1)
    responder = RestResponder()
    modern_call = ModernCall(
        hub,
        checked,
        responder,
        ctx.clock,
        ctx.signer,
        hub.backend.server.input_timeout,
        peer_of(request),
    )
    with _traced(ctx, request):
        modern_call.start(None)
    try:
        message, _ = await responder.done
    except CancelledError:
        modern_call.abandon("the client closed the HTTP response")
        raise
    return _answer(request, found, message)


@contextlib.contextmanager
def _traced(ctx: TransportContext, request: Request) -> Iterator[None]:
    """The request's trace context, current while its call is handed to the
    router (the call may start after the tools list was awaited)."""
    tracer = ctx.tracer
    headers = trace_headers(request) if tracer is not None else None
    if tracer is None or not headers:
        yield
        return
    with tracer.incoming(headers):
        yield


def _answer(request: Request, tool: dict[str, Any], message: Message) -> bytes:
    """The REST answer to the call's final message."""
    error = message.get("error")
    if isinstance(error, dict):
        code = error.get("code")
        text = error.get("message")
        text = text if isinstance(text, str) else "Error"
        data = error.get("data")
        if code == jsonrpc.MISSING_CAPABILITY:
            text = (
                "Not Implemented: the tool asked its client a question "
                f"({text}), which a REST call cannot answer; call it over MCP"
            )
        raise HTTPProblem(
            openapi.status_of(code),
            code if isinstance(code, int) else jsonrpc.INTERNAL_ERROR,
            text,
            data=data,
        )
    result = message.get("result")
    if isinstance(result, dict) and result.get("isError") is True:
        content = result.get("content")
        raise HTTPProblem(
            500,
            jsonrpc.INTERNAL_ERROR,
            openapi.error_text(result),
            data={"content": content if isinstance(content, list) else []},
        )
    return json_body(request, openapi.answer(tool, result))


__all__ = ["call", "document"]
