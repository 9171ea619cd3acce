# -*- test-case-name: tests.test_jsonrpc -*-
"""MCP facts the bridge relies on: protocol versions, log levels, methods."""

from __future__ import annotations

from typing import Final

# Session-era ("legacy") revisions the bridge serves, oldest first.
LEGACY_VERSIONS: Final = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
LATEST_LEGACY: Final = LEGACY_VERSIONS[-1]
BATCH_VERSIONS: Final = frozenset({"2025-03-26"})
PRIMING_VERSIONS: Final = frozenset({"2025-11-25"})

LOG_LEVELS: Final = (
    "debug",
    "info",
    "notice",
    "warning",
    "error",
    "critical",
    "alert",
    "emergency",
)
LOG_RANK: Final = {level: rank for rank, level in enumerate(LOG_LEVELS)}

# Server-to-client requests that a client must have declared a capability for.
CLIENT_CAPABILITY_FOR: Final = {
    "sampling/createMessage": "sampling",
    "elicitation/create": "elicitation",
    "roots/list": "roots",
}

BRIDGE_NAME: Final = "mcptwist"


def negotiate(requested: object, ceiling: object = LATEST_LEGACY) -> str:
    """The version to answer an C{initialize} with, per the lifecycle rules.

    The client gets the version it asked for when the bridge serves it and
    the child speaks at least that (C{ceiling}, the version the child
    answered); otherwise the newest version both the bridge and child speak.
    """
    top = ceiling if isinstance(ceiling, str) and ceiling in LEGACY_VERSIONS else LATEST_LEGACY
    if isinstance(requested, str) and requested in LEGACY_VERSIONS and requested <= top:
        return requested
    return top
