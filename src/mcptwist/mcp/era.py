# -*- test-case-name: tests.test_era -*-
"""The stateless revision (2026-07-28): how a request is told apart and checked,
and how answers are shaped for it.

A modern request carries everything in itself: its protocol version, the
client's capabilities and identity, and its log level are in C{params._meta}
and repeated in HTTP headers. L{check} validates one such request in the
order the revision's errors are defined (the first failure wins) and returns
a L{ModernRequest}; L{complete} and L{discover} shape results for it. Nothing
here touches HTTP or the child: the transport (C{web.modern}) and the call
(C{stateless}) build on these rules.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs

from mcptwist.mcp import jsonrpc, protocol
from mcptwist.mcp.jsonrpc import Message, RequestId

MODERN: Final = "2026-07-28"
MODERN_VERSIONS: Final = (MODERN,)
# Every version a client may ask for on a bridged endpoint, oldest first.
SUPPORTED_VERSIONS: Final = (*protocol.LEGACY_VERSIONS, *MODERN_VERSIONS)

META_VERSION: Final = "io.modelcontextprotocol/protocolVersion"
META_CAPABILITIES: Final = "io.modelcontextprotocol/clientCapabilities"
META_CLIENT: Final = "io.modelcontextprotocol/clientInfo"
META_LOG_LEVEL: Final = "io.modelcontextprotocol/logLevel"
META_SERVER: Final = "io.modelcontextprotocol/serverInfo"
META_SUBSCRIPTION: Final = "io.modelcontextprotocol/subscriptionId"
CLIENT_META: Final = (META_VERSION, META_CAPABILITIES, META_CLIENT, META_LOG_LEVEL)

# Methods of the session era that the stateless revision removed.
REMOVED_METHODS: Final = frozenset(
    {"initialize", "ping", "logging/setLevel", "resources/subscribe", "resources/unsubscribe"}
)
# Requests that may be answered with input_required (multi round-trip requests).
INPUT_METHODS: Final = frozenset({"tools/call", "prompts/get", "resources/read"})
# Results that carry caching hints (ttlMs, cacheScope).
CACHED_METHODS: Final = frozenset(
    {
        "server/discover",
        "tools/list",
        "prompts/list",
        "resources/list",
        "resources/templates/list",
        "resources/read",
    }
)
# The tasks extension (SEP-2663): its id, and its methods.
TASKS_EXTENSION: Final = "io.modelcontextprotocol/tasks"
TASK_METHODS: Final = frozenset({"tasks/get", "tasks/update", "tasks/cancel"})
# Methods of the experimental tasks of 2025-11-25 that the extension removed.
REMOVED_TASK_METHODS: Final = frozenset({"tasks/result", "tasks/list"})
# Every tasks/* method a client may send, served by the bridge or refused.
ANY_TASK_METHOD: Final = TASK_METHODS | REMOVED_TASK_METHODS
# The parameter whose value the Mcp-Name header repeats.
NAMED_PARAM: Final = {
    "tools/call": "name",
    "prompts/get": "name",
    "resources/read": "uri",
    **dict.fromkeys(TASK_METHODS, "taskId"),
}
# Capabilities of the session era that mean nothing to a stateless client.
LEGACY_ONLY_CAPABILITIES: Final = frozenset({"tasks"})

_ENCODED: Final = re.compile(r"=\?base64\?([A-Za-z0-9+/=]*)\?=")


class Refusal(Exception):
    """A modern request refused: the HTTP status and the JSON-RPC error to answer with."""

    def __init__(
        self,
        status: int,
        code: int,
        message: str,
        data: Any = None,
        id: RequestId | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.data = data
        self.id = id


@attrs.frozen
class ModernRequest:
    """A checked modern request: its message, and what its C{_meta} said."""

    message: Message
    id: RequestId
    method: str
    version: str
    capabilities: dict[str, Any]
    client_info: dict[str, Any]
    log_level: str | None


def is_modern(version_header: str | None, session_header: str | None, message: Any) -> bool:
    """Whether a POST belongs to the stateless revision.

    The header decides when it names a known version. A version the bridge
    does not know is refused by the rules of the client's era: the session
    era's inside a session, this revision's (which list what is supported)
    outside one. Without the header, a request outside any session that
    carries a protocol version in C{_meta} is modern too.
    """
    if version_header is not None:
        version = version_header.strip()
        if version in MODERN_VERSIONS:
            return True
        return version not in protocol.LEGACY_VERSIONS and not session_header
    if session_header:
        return False
    return isinstance(message, dict) and META_VERSION in _meta_of(message)


def decode_header(value: str) -> str:
    """A header value with the revision's C{=?base64?...?=} encoding undone."""
    value = value.strip(" \t")
    match = _ENCODED.fullmatch(value)
    if match is None:
        return value
    try:
        return base64.b64decode(match.group(1), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise Refusal(
            400, jsonrpc.HEADER_MISMATCH, "Header mismatch: a base64-encoded header is not valid"
        ) from None


def check(message: Message, headers: Callable[[str], list[str]] | None) -> ModernRequest:
    """Validate one modern request (already a JSON-RPC request) and its headers.

    C{headers(name)} gives every value of a request header; None on a
    transport whose messages carry no headers (a WebSocket, as stdio), where
    the body alone speaks. The order of the checks is the revision's:
    headers present once, C{_meta} shape, headers matching the body,
    protocol version, log level, then the method.
    """
    id = message["id"]
    method = message["method"]

    def refuse(status: int, code: int, text: str, data: Any = None) -> Refusal:
        return Refusal(status, code, text, data, id)

    values: dict[str, str | None] = {}
    for name in ("mcp-protocol-version", "mcp-method", "mcp-name"):
        found = headers(name) if headers is not None else []
        if len(found) > 1:
            raise refuse(
                400, jsonrpc.HEADER_MISMATCH, f"Header mismatch: {name} is sent more than once"
            )
        try:
            values[name] = decode_header(found[0]) if found else None
        except Refusal as refusal:
            raise refuse(refusal.status, refusal.code, refusal.message) from None

    def invalid(text: str) -> Refusal:
        return refuse(400, jsonrpc.INVALID_PARAMS, f"Invalid params: {text}")

    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    if not isinstance(meta, dict):
        raise invalid(f"params._meta with {META_VERSION} and {META_CAPABILITIES} is required")
    version = meta.get(META_VERSION)
    if not isinstance(version, str) or not version:
        raise invalid(f"_meta {META_VERSION} is required")
    capabilities = meta.get(META_CAPABILITIES)
    if not isinstance(capabilities, dict):
        raise invalid(f"_meta {META_CAPABILITIES} is required (an object)")
    client_info = meta.get(META_CLIENT)
    if client_info is not None and not isinstance(client_info, dict):
        raise invalid(f"_meta {META_CLIENT} must be an object")
    header_version = values["mcp-protocol-version"] if headers is not None else version
    if header_version != version:
        raise refuse(
            400,
            jsonrpc.HEADER_MISMATCH,
            f"Header mismatch: MCP-Protocol-Version is {header_version!r} but _meta says {version!r}",
        )
    header_method = values["mcp-method"] if headers is not None else method
    if header_method != method:
        raise refuse(
            400,
            jsonrpc.HEADER_MISMATCH,
            f"Header mismatch: Mcp-Method is {header_method!r} but the body's method is {method!r}",
        )
    named = NAMED_PARAM.get(method)
    if named is not None and headers is not None:
        expected = params.get(named) if isinstance(params, dict) else None
        header_name = values["mcp-name"]
        if header_name != expected:
            raise refuse(
                400,
                jsonrpc.HEADER_MISMATCH,
                f"Header mismatch: Mcp-Name is {header_name!r} but params.{named} is {expected!r}",
            )
    if version not in MODERN_VERSIONS:
        raise refuse(
            400,
            jsonrpc.UNSUPPORTED_VERSION,
            f"Unsupported protocol version {version!r}; this server supports "
            + ", ".join(SUPPORTED_VERSIONS),
            {"supported": list(SUPPORTED_VERSIONS), "requested": version},
        )
    level = meta.get(META_LOG_LEVEL)
    if level is not None and (not isinstance(level, str) or level not in protocol.LOG_RANK):
        raise invalid(f"_meta {META_LOG_LEVEL} must be one of {', '.join(protocol.LOG_LEVELS)}")
    if method in REMOVED_METHODS:
        raise refuse(
            404,
            jsonrpc.METHOD_NOT_FOUND,
            f"Method not found: {method} does not exist in protocol version {version}",
        )
    return ModernRequest(
        message=message,
        id=id,
        method=method,
        version=version,
        capabilities=capabilities,
        client_info=client_info or {},
        log_level=level,
    )


def declares_tasks(capabilities: Mapping[str, Any]) -> bool:
    """Whether a client's capabilities declare the tasks extension."""
    extensions = capabilities.get("extensions")
    return isinstance(extensions, dict) and isinstance(extensions.get(TASKS_EXTENSION), dict)


def without_tasks(message: Message) -> Message:
    """A request whose client capabilities no longer declare the tasks
    extension: the bridge runs the task, and the child the call alone."""
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    capabilities = meta.get(META_CAPABILITIES) if isinstance(meta, dict) else None
    extensions = capabilities.get("extensions") if isinstance(capabilities, dict) else None
    if not isinstance(extensions, dict) or TASKS_EXTENSION not in extensions:
        return message
    assert isinstance(params, dict) and isinstance(meta, dict) and isinstance(capabilities, dict)
    capabilities = {
        **capabilities,
        "extensions": {k: v for k, v in extensions.items() if k != TASKS_EXTENSION},
    }
    return {**message, "params": {**params, "_meta": {**meta, META_CAPABILITIES: capabilities}}}


def for_child(message: Message) -> Message:
    """The request as a session-era child gets it: without the client's C{_meta}
    of this revision (the child's session carries those) or a retry's inputs."""
    params = message.get("params")
    if not isinstance(params, dict):
        return message
    params = {k: v for k, v in params.items() if k not in ("inputResponses", "requestState")}
    meta = params.get("_meta")
    if isinstance(meta, dict):
        meta = {k: v for k, v in meta.items() if k not in CLIENT_META}
        if meta:
            params["_meta"] = meta
        else:
            del params["_meta"]
    return {**message, "params": params}


def complete(method: str, result: Any, server_info: Mapping[str, Any]) -> dict[str, Any]:
    """A child's (session-era) result as this revision shapes it (in place: a
    result has one recipient)."""
    shaped: dict[str, Any] = result if isinstance(result, dict) else {}
    shaped.setdefault("resultType", "complete")
    meta = shaped.get("_meta")
    if not isinstance(meta, dict):
        meta = shaped["_meta"] = {}
    meta[META_SERVER] = server_info
    if method in CACHED_METHODS:
        # Answers may differ by client (a shared child, per-principal access):
        # nothing is cached unless the child says so.
        shaped.setdefault("ttlMs", 0)
        shaped.setdefault("cacheScope", "private")
    return shaped


def discover(init_result: Mapping[str, Any], server_info: Mapping[str, Any]) -> dict[str, Any]:
    """C{server/discover}, answered from a session-era child's C{initialize} result."""
    capabilities = init_result.get("capabilities")
    capabilities = {
        k: v
        for k, v in (capabilities if isinstance(capabilities, dict) else {}).items()
        if k not in LEGACY_ONLY_CAPABILITIES
    }
    result: dict[str, Any] = {
        "supportedVersions": list(SUPPORTED_VERSIONS),
        "capabilities": capabilities,
    }
    instructions = init_result.get("instructions")
    if isinstance(instructions, str):
        result["instructions"] = instructions
    return complete("server/discover", result, server_info)


def _meta_of(message: Message) -> dict[str, Any]:
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    return meta if isinstance(meta, dict) else {}


LIST_CHANGED: Final = {
    "notifications/tools/list_changed": ("toolsListChanged", "tools"),
    "notifications/prompts/list_changed": ("promptsListChanged", "prompts"),
    "notifications/resources/list_changed": ("resourcesListChanged", "resources"),
}


def agreed_filter(wanted: dict[str, Any], capabilities: Any) -> dict[str, Any]:
    """The part of a listen filter the child can honour, by its capabilities."""
    caps = capabilities if isinstance(capabilities, dict) else {}
    agreed: dict[str, Any] = {}
    for field, capability in LIST_CHANGED.values():
        declared = caps.get(capability)
        if wanted.get(field) is True and isinstance(declared, dict) and declared.get("listChanged"):
            agreed[field] = True
    uris = wanted.get("resourceSubscriptions")
    resources = caps.get("resources")
    if isinstance(uris, list) and isinstance(resources, dict) and resources.get("subscribe"):
        agreed["resourceSubscriptions"] = [u for u in uris if isinstance(u, str)]
    return agreed
