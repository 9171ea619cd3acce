"""A child that speaks only the 2026-07-28 revision, played by hand: a reactor
whose children answer C{server/discover} and hold everything else, and a
tool that asks its client for input (its call, its questions, the result)."""

from __future__ import annotations

import copy
from typing import Any

from mcptwist.mcp import era, jsonrpc
from mcptwist.mcp.jsonrpc import Message, RequestId

from .children import FakeChild, FakeProcessReactor

SERVER_INFO = {"name": "modern-fake", "version": "2.0"}
DISCOVER: dict[str, Any] = {
    "resultType": "complete",
    "supportedVersions": [era.MODERN],
    "capabilities": {
        "tools": {"listChanged": True},
        "resources": {"subscribe": True},
        "logging": {},
    },
    "instructions": "a modern fake",
    "ttlMs": 0,
    "cacheScope": "private",
    "_meta": {era.META_SERVER: SERVER_INFO},
}
GREET_QUESTIONS: dict[str, Any] = {
    "name": {
        "method": "elicitation/create",
        "params": {"message": "What is your name?", "requestedSchema": {"type": "object"}},
    },
    "motto": {
        "method": "sampling/createMessage",
        "params": {"messages": [{"role": "user", "content": {"type": "text", "text": "?"}}]},
    },
}


class ModernReactor(FakeProcessReactor):
    """Children that answer C{server/discover} with L{discover} (unless it is
    None) and C{initialize} as the session era does; everything else waits in
    C{child.held}."""

    def __init__(self, discover: dict[str, Any] | None = DISCOVER) -> None:
        super().__init__(hold=True)
        self.discover = discover

    def on_message(self, child: FakeChild, message: Message) -> None:
        if "method" not in message or "id" not in message:
            return
        if message["method"] == "server/discover" and self.discover is not None:
            child.send(jsonrpc.result(message["id"], copy.deepcopy(self.discover)))
        elif message["method"] == "initialize":
            child.answer(message)
        else:
            child.held.append(message)


def held(child: FakeChild, method: str) -> list[Message]:
    """The requests of this method the child holds."""
    return [m for m in child.held if m["method"] == method]


def input_required(inputs: dict[str, Any], state: Any = "state-1") -> dict[str, Any]:
    """The child's result that asks the client for these inputs first."""
    result: dict[str, Any] = {"resultType": "input_required", "inputRequests": inputs}
    if state is not None:
        result["requestState"] = state
    return result


def greet(id: RequestId = 5, token: Any = None) -> Message:
    """A call of the greet tool (which asks for input), with a progress token if given."""
    params: dict[str, Any] = {"name": "greet", "arguments": {"loud": True}}
    if token is not None:
        params["_meta"] = {"progressToken": token}
    return jsonrpc.request(id, "tools/call", params)
