# -*- test-case-name: tests.test_pins -*-
"""What one client may see and call of one server's tools.

The same rules hold on a server's own URL and through an endpoint: the
server's C{include} and C{exclude} filters, the tools the client's grants
name, and what the server's pins hide or block (L{PinBook}). A tool a
client may not use is absent from its lists, and a call to it is refused
as a call to a tool that does not exist is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mcptwist.config.model import ServerConfig
from mcptwist.mcp import jsonrpc
from mcptwist.mcp.jsonrpc import Message, RequestId
from mcptwist.mcp.naming import NameFilter
from mcptwist.routing.pins import PinBook


class ToolView:
    """One client's view of one server's tools."""

    def __init__(
        self,
        server: ServerConfig,
        grants: tuple[str, ...] | None = None,
        pins: PinBook | None = None,
    ) -> None:
        self.server = server
        self.filter = NameFilter(server.include, server.exclude)
        self.grants = grants
        # The tools the grants name (None: all).
        self.granted = NameFilter(include=grants) if grants is not None else None
        self.pins = pins
        # Whether a call can be refused at all (or every tool may be called).
        self.checks = (
            not self.filter.everything
            or grants is not None
            or (pins is not None and server.on_tool_change in ("hide", "block"))
        )

    @classmethod
    def of(
        cls, server: ServerConfig, grants: tuple[str, ...] | None, pins: PinBook | None
    ) -> ToolView | None:
        """The view, or None when it would show everything and review nothing."""
        if pins is None and grants is None and not (server.include or server.exclude):
            return None
        return cls(server, grants, pins)

    def allows(self, name: str) -> bool:
        """Whether this client may see and call the tool C{name}."""
        if not self.filter.allows(name):
            return False
        if self.granted is not None and not self.granted.allows(name):
            return False
        return self.pins is None or not self.pins.hidden(self.server, name)

    def blocked(self) -> str | None:
        """Why the server may not be used now (its pins block it), if so."""
        return self.pins.blocked(self.server) if self.pins is not None else None

    def shown(self, tools: list[Any]) -> list[Any]:
        """A tools list as this client sees it (reviewed against the pins first)."""
        listed = [t for t in tools if isinstance(t, dict)]
        if self.pins is not None:
            listed = self.pins.review(self.server, listed)
        return [t for t in listed if isinstance(t.get("name"), str) and self.allows(t["name"])]

    def refusal(
        self, message: Message, listed: Callable[[str], bool | None] | None = None
    ) -> Message | None:
        """The answer to a call this client may not make (None: it may).

        Where a tool can be hidden, a name the child does not list (C{listed},
        when its tools are known) is refused in the same words: a hidden tool
        cannot be told from one that does not exist.
        """
        if not self.checks:
            return None
        params = message.get("params")
        name = params.get("name") if isinstance(params, dict) else None
        blocked = self.blocked_refusal(message)
        if blocked is not None:
            return blocked
        if (
            isinstance(name, str)
            and self.allows(name)
            and (listed is None or listed(name) is not False)
        ):
            return None
        return unknown_tool(message["id"], name)

    def blocked_refusal(self, message: Message) -> Message | None:
        """The answer to any request while the pins block the server (None: they do not)."""
        blocked = self.blocked() if self.checks else None
        if blocked is None:
            return None
        return jsonrpc.error(
            message["id"],
            jsonrpc.SERVER_UNAVAILABLE,
            f"MCP server '{self.server.name}' is {blocked}",
            {"server": self.server.name, "state": "blocked"},
        )

    def listed(self, message: Message) -> Message:
        """A tools/list answer as this client sees it (changed in place)."""
        result = message.get("result")
        if isinstance(result, dict) and isinstance(result.get("tools"), list):
            result["tools"] = self.shown(result["tools"])
        return message


def unknown_tool(request_id: RequestId, name: object) -> Message:
    """The one answer to a call of a tool that does not exist, or may not be used."""
    return jsonrpc.error(request_id, jsonrpc.INVALID_PARAMS, f"Unknown tool: {name}")
