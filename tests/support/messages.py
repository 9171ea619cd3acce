"""What MCP clients send over HTTP and read back: the initialize request,
request headers for each kind of answer, 2026-07-28 requests, and SSE."""

from __future__ import annotations

from typing import Any

from mcptwist.mcp import era, jsonrpc
from mcptwist.mcp.era import MODERN
from mcptwist.mcp.jsonrpc import Message, RequestId

ACCEPT_BOTH = "application/json, text/event-stream"
# Headers of a POST whose answer is JSON, or JSON or an event stream.
JSON = {"accept": "application/json", "content-type": "application/json"}
BOTH = {"accept": ACCEPT_BOTH, "content-type": "application/json"}
# Headers of a GET of an event stream, and of a POST of JSON to the admin API.
STREAM = {"accept": "text/event-stream"}
JSON_BODY = {"content-type": "application/json"}

# A session-era client's first request.
INIT = jsonrpc.request(
    1,
    "initialize",
    {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t"}},
)


def bearer(token: str) -> dict[str, str]:
    """The header that presents a bearer token."""
    return {"authorization": f"Bearer {token}"}


def decode(stream: bytes) -> list[dict[str, str]]:
    """The events of an SSE stream, parsed as the WHATWG spec describes (minimally)."""
    events = []
    for block in stream.decode().split("\n\n"):
        if not block:
            continue
        event: dict[str, str] = {}
        data: list[str] = []
        for line in block.split("\n"):
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "retry" and not value.isdigit():
                continue
            if field == "data":
                data.append(value)
            else:
                event[field] = value
        if data or event:
            event["data"] = "\n".join(data)
            events.append(event)
    return events


def modern(
    id: RequestId,
    method: str,
    params: dict[str, Any] | None = None,
    caps: dict[str, Any] | None = None,
    level: str | None = None,
) -> Message:
    """A request as a 2026-07-28 client sends it."""
    params = dict(params or {})
    meta: dict[str, Any] = dict(params.get("_meta") or {})
    meta.update(
        {
            era.META_VERSION: MODERN,
            era.META_CAPABILITIES: caps if caps is not None else {},
            era.META_CLIENT: {"name": "modern-client", "version": "1"},
        }
    )
    if level is not None:
        meta[era.META_LOG_LEVEL] = level
    params["_meta"] = meta
    return jsonrpc.request(id, method, params)


def call(id: RequestId, name: str = "echo", **params: Any) -> Message:
    caps = params.pop("caps", {"elicitation": {}})
    return modern(id, "tools/call", {"name": name, "arguments": {"x": 1}, **params}, caps)


def headers(message: Message, accept: str = ACCEPT_BOTH, **extra: str) -> dict[str, str]:
    found = {
        "accept": accept,
        "content-type": "application/json",
        "mcp-protocol-version": MODERN,
        "mcp-method": message["method"],
    }
    named = era.NAMED_PARAM.get(message["method"])
    if named is not None:
        found["mcp-name"] = str(message["params"][named])
    found.update(extra)
    return found


def events(chunks: list[bytes]) -> list[Message]:
    """The JSON-RPC messages of an SSE response's chunks."""
    return [jsonrpc.loads(e["data"]) for e in decode(b"".join(chunks)) if e["data"]]
