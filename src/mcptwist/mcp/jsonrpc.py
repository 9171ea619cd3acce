# -*- test-case-name: tests.test_jsonrpc -*-
"""The JSON-RPC 2.0 message model: parse once, classify, build errors; the error codes.

A message is kept as the plain C{dict} that the parser produced, so that id
rewriting edits the parsed form and serialisation happens once on the way
out. orjson does the parsing and serialising: every message crosses the
bridge twice, and it is several times faster than the standard library.
"""

from __future__ import annotations

import enum
from typing import Any, Final

import orjson

Message = dict[str, Any]
RequestId = str | int

# Every JSON-RPC error code the bridge sends or reads: one name per meaning.
# The number is what clients see, and it never changes; several meanings
# share a number, so the number alone does not say what happened.
#
# JSON-RPC 2.0's:
PARSE_ERROR: Final = -32700  # a body or a message that is not JSON
INVALID_REQUEST: Final = -32600  # not a request the bridge takes (shape, HTTP method, path, size)
METHOD_NOT_FOUND: Final = -32601  # no such method, or a question the client cannot take
INVALID_PARAMS: Final = -32602  # params missing, malformed or not allowed
INTERNAL_ERROR: Final = -32603  # the bridge or the MCP server failed (no other code says why)
UNANSWERABLE: Final = -32603  # to an MCP server: its question, which no client will answer
# The bridge's (JSON-RPC's range for servers, -32000 to -32099):
SERVER_UNAVAILABLE: Final = -32000  # the MCP server cannot take requests now (down, full, stopping)
BAD_SESSION: Final = -32000  # HTTP 400: no session id, or that of another transport's session
SESSION_TERMINATED: Final = -32000  # the session ended before its request was answered
FORBIDDEN: Final = -32000  # HTTP 403: this client, address or origin may not use this
MISDIRECTED: Final = -32000  # HTTP 421: the Host header names a host not served here
RATE_LIMITED: Final = -32000  # HTTP 429 or 503 with Retry-After: a rate limit or a cap
AUTH_UNAVAILABLE: Final = -32000  # HTTP 503: credentials cannot be checked now (no keys)
REQUEST_TIMEOUT: Final = -32001  # the MCP server did not answer within request_timeout
UNAUTHORIZED: Final = -32001  # HTTP 401: credentials missing or not valid
SESSION_NOT_FOUND: Final = -32001  # HTTP 404: no open session has this id (ended or expired)
MESSAGE_TOO_LARGE: Final = -32002  # a message or a response over max_message_size
RESOURCE_NOT_FOUND: Final = -32002  # a session-era MCP server's: no such resource
# The stateless revision's (2026-07-28):
HEADER_MISMATCH: Final = -32020  # an Mcp-* header malformed, repeated or unlike the body
MISSING_CAPABILITY: Final = -32021  # the request needs a capability its client did not declare
UNSUPPORTED_VERSION: Final = -32022  # a protocol version the bridge does not speak
URL_ELICITATION_REQUIRED: Final = -32042  # a session-era MCP server's: it needs a URL elicitation
# MCP's:
REQUEST_CANCELLED: Final = -32800  # the client cancelled the request


class Kind(enum.Enum):
    REQUEST = "request"
    NOTIFICATION = "notification"
    RESPONSE = "response"


class ProtocolError(Exception):
    """A message that cannot be accepted, carrying the JSON-RPC error to send."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


def loads(raw: bytes | str) -> Any:
    """Parse JSON text, raising a -32700 L{ProtocolError} on bad input."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ProtocolError(PARSE_ERROR, f"Parse error: {e}") from None


def dumps(message: Any) -> bytes:
    """Serialise to compact JSON; the result never contains a newline."""
    return orjson.dumps(message)


def classify(message: Any) -> Kind:
    """Check the JSON-RPC 2.0 shape of one message and say what it is.

    @raise ProtocolError: -32600 when it is not a request, notification or
        response.
    """
    if not isinstance(message, dict):
        raise ProtocolError(INVALID_REQUEST, "Invalid Request: a message must be a JSON object")
    if message.get("jsonrpc") != "2.0":
        raise ProtocolError(INVALID_REQUEST, 'Invalid Request: "jsonrpc" must be "2.0"')
    has_id = "id" in message
    if has_id and not _valid_id(message["id"]):
        raise ProtocolError(INVALID_REQUEST, "Invalid Request: id must be a string or an integer")
    if "method" in message:
        method = message["method"]
        if not isinstance(method, str) or not method:
            raise ProtocolError(
                INVALID_REQUEST, 'Invalid Request: "method" must be a non-empty string'
            )
        params = message.get("params")
        if params is not None and not isinstance(params, dict):
            # JSON-RPC also allows an array; MCP's params are always objects.
            raise ProtocolError(INVALID_PARAMS, 'Invalid params: MCP "params" must be an object')
        return Kind.REQUEST if has_id else Kind.NOTIFICATION
    if has_id and (("result" in message) != ("error" in message)):
        if "error" in message and not isinstance(message["error"], dict):
            raise ProtocolError(INVALID_REQUEST, 'Invalid Request: "error" must be an object')
        return Kind.RESPONSE
    raise ProtocolError(
        INVALID_REQUEST,
        "Invalid Request: neither a request, a notification nor a response",
    )


def _valid_id(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def error(id: RequestId | None, code: int, message: str, data: Any = None) -> Message:
    """The one constructor of JSON-RPC error responses."""
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "id": id, "error": err}


def result(id: RequestId, value: Any) -> Message:
    return {"jsonrpc": "2.0", "id": id, "result": value}


def request(id: RequestId, method: str, params: dict[str, Any] | None = None) -> Message:
    msg: Message = {"jsonrpc": "2.0", "id": id, "method": method}
    if params is not None:
        msg["params"] = params
    return msg


def notification(method: str, params: dict[str, Any] | None = None) -> Message:
    msg: Message = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        msg["params"] = params
    return msg
