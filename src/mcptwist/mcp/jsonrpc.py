# -*- test-case-name: tests.test_jsonrpc -*-
"""The JSON-RPC 2.0 message model: parse once, classify, build errors.

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

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
# Implementation-defined server errors (-32000 to -32099).
SERVER_UNAVAILABLE: Final = -32000
REQUEST_TIMEOUT: Final = -32001
MESSAGE_TOO_LARGE: Final = -32002
REQUEST_CANCELLED: Final = -32800


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
