# -*- test-case-name: tests.test_rest -*-
"""The REST face of a server's tools: C{POST /servers/NAME/tools/TOOL} and
C{GET /servers/NAME/openapi.json}; and of an endpoint's, on C{/endpoints/NAME/}.

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

An endpoint's document holds its members' tools as its C{tools/list} shows
them to this client (renamed, filtered, granted). A call is routed as a
2026-07-28 C{tools/call} to the endpoint is: to the member that owns the
name, as the member's own tool, where the member's tool view, limits and
schema apply as on the member's own URL.
"""

from __future__ import annotations

from typing import Any, Final

import attrs
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.web.server import Request

from mcptwist import __version__
from mcptwist.mcp import era, jsonrpc
from mcptwist.mcp.jsonrpc import Message
from mcptwist.routing.aggregate import Refused, cached_lists, gather_lists
from mcptwist.routing.catalog import Unavailable
from mcptwist.routing.members import AggregateBackend
from mcptwist.routing.sessions import ClientSession
from mcptwist.routing.stateless import ModernCall
from mcptwist.routing.tools import ToolView

from . import openapi
from .admission import admission_of, peer_of, principal_id, principal_of
from .context import TransportContext
from .http import HTTPProblem, json_body, read_body, require_json, trace_context
from .modern import member_catalog, open_hub

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


async def _tools(
    ctx: TransportContext, request: Request, name: str, checked: era.ModernRequest
) -> tuple[ClientSession, dict[str, dict[str, Any]]]:
    """The principal's hub on the server, and the tools it may see there (by name)."""
    hub, view, tools = await _listed(ctx, request, name, checked)
    shown = view.shown(tools) if view is not None else tools
    return hub, openapi.served_tools(shown)


async def _tool(
    ctx: TransportContext, request: Request, name: str, checked: era.ModernRequest, tool: str
) -> tuple[ClientSession, dict[str, Any] | None]:
    """The principal's hub on the server, and the tool of this name if it may
    call it there: found by name in the child's kept list (a call does not
    go through the whole list), and judged as a call over MCP is."""
    hub, view, _ = await _listed(ctx, request, name, checked)
    assert hub.upstream is not None
    found = hub.upstream.catalog.tool(tool)
    if found is None or not openapi.served(tool) or (view is not None and not view.allows(tool)):
        return hub, None
    return hub, found


async def _listed(
    ctx: TransportContext, request: Request, name: str, checked: era.ModernRequest
) -> tuple[ClientSession, ToolView | None, list[Any]]:
    """The principal's hub on the server, what it may see there, and the
    child's tools (listed first if they are not kept)."""
    backend = ctx.backend(name)
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
    kept = upstream.catalog.cached("tools/list")
    if kept is not None:
        return hub, view, kept
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
    return hub, view, tools


_RETRY: Final = {b"retry-after": b"5"}


async def document(ctx: TransportContext, request: Request, name: str) -> bytes:
    """C{GET .../openapi.json}: the tools this client may call, as operations."""
    base = request.path.decode("ascii").rsplit("/", 1)[0]
    backend = ctx.backend(name)
    if isinstance(backend, AggregateBackend):
        tools = await _endpoint_tools(ctx, request, backend)
        info = backend.aggregate.server_info()
        doc = openapi.document(backend.aggregate.name, base, tools, ctx.config.auth.enabled, info)
    else:
        hub, served = await _tools(ctx, request, name, _request("", {}))
        assert hub.upstream is not None
        init = hub.upstream.init_result or {}
        instructions = init.get("instructions")
        doc = openapi.document(
            name,
            base,
            served.values(),
            ctx.config.auth.enabled,
            init.get("serverInfo") if isinstance(init.get("serverInfo"), dict) else None,
            instructions if isinstance(instructions, str) else None,
        )
    request.setHeader(b"cache-control", b"no-store")
    return json_body(request, doc)


async def _endpoint_tools(
    ctx: TransportContext, request: Request, backend: AggregateBackend
) -> list[dict[str, Any]]:
    """An endpoint's tools as its C{tools/list} shows them to this client (a
    member that is down, blocked or too slow to list them has none)."""
    aggregate = backend.aggregate
    guard = ctx.access.guard(principal_of(request), peer_of(request))
    checked = _request("", {})
    catalogs = aggregate.catalogs(
        guard, lambda server: member_catalog(ctx, request, server, checked)
    )
    lists = cached_lists("tools/list", catalogs)
    if lists is None:
        lists = await gather_lists(aggregate, "tools/list", catalogs, ctx.clock)
    merged = aggregate.listing("tools/list", lists, guard)
    return [tool for _, items in merged for tool in items]


async def call(ctx: TransportContext, request: Request, name: str) -> bytes:
    """C{POST .../tools/TOOL}: the tool called with the body as its arguments."""
    admission = admission_of(request)
    assert admission is not None
    tool = admission.parts[4].decode("utf-8", "replace")
    backend = ctx.backend(name)
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
    if isinstance(backend, AggregateBackend):
        name, checked = _routed(ctx, request, backend, checked, tool)
    return await _call(ctx, request, name, checked, tool)


def _routed(
    ctx: TransportContext,
    request: Request,
    backend: AggregateBackend,
    checked: era.ModernRequest,
    shown: str,
) -> tuple[str, era.ModernRequest]:
    """An endpoint's call: the member it is for, and the call as it gets it
    (the member's own name for the tool); refused as on C{/endpoints/NAME/mcp}."""
    aggregate = backend.aggregate
    guard = ctx.access.guard(principal_of(request), peer_of(request))
    try:
        route = aggregate.route(
            checked.message, guard, lambda server: member_catalog(ctx, request, server, checked)
        )
    except Refused as refused:
        aggregate.tool_refused(shown, principal_id(request), refused.text)
        status = _refused_status(refused)
        raise HTTPProblem(
            status,
            refused.code,
            f"Not Found: unknown tool {shown!r}" if status == 404 else refused.text,
            data=refused.data,
        ) from None
    return route.server, attrs.evolve(checked, message=route.message)


def _refused_status(refused: Refused) -> int:
    """The status of an endpoint's refusal: a name it does not show (404), a
    member blocked by its pins (503), a member's rate limit (429)."""
    if refused.status is not None:
        return refused.status
    if refused.code in (jsonrpc.INVALID_PARAMS, jsonrpc.METHOD_NOT_FOUND):
        return 404
    return 502


async def _call(
    ctx: TransportContext, request: Request, name: str, checked: era.ModernRequest, shown: str
) -> bytes:
    """A checked call on server C{name} (C{shown}: the tool's name as its
    client knows it)."""
    tool = checked.message["params"]["name"]
    hub, found = await _tool(ctx, request, name, checked, tool)
    if found is None:
        raise HTTPProblem(404, jsonrpc.INVALID_PARAMS, f"Not Found: unknown tool {shown!r}")
    arguments = checked.message["params"]["arguments"]
    errors = openapi.argument_errors(found, arguments)
    if errors:
        raise HTTPProblem(
            422,
            jsonrpc.INVALID_PARAMS,
            f"Unprocessable Content: the arguments do not match {shown!r}'s input schema",
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
    with trace_context(ctx.tracer, request):
        modern_call.start(None)
    try:
        message, _ = await responder.done
    except CancelledError:
        modern_call.abandon("the client closed the HTTP response")
        raise
    return _answer(request, found, message)


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
