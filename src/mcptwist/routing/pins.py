# -*- test-case-name: tests.test_pins -*-
"""Tool pinning: noticing when a server quietly changes what a tool does.

The bridge keeps a digest of each tool's definition (name, title,
description, input and output schemas, annotations) from the first time it
sees the tool, or from a pin file (C{pin_file}, written by the bridge as it
pins, or by C{python -m mcptwist pin}). When a child later serves a
different definition, the server's C{on_tool_change} policy applies:

  - C{warn}: the change is logged, audited and counted; the tool stays;
  - C{hide}: the tool disappears (from lists, and calls to it are refused
    as if it did not exist) until an operator accepts the change;
  - C{block}: the whole server is unhealthy, and its calls are refused,
    until an operator accepts.

An operator accepts a change through the admin API or the command line; the
new definition becomes the pin.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs
from twisted.logger import Logger

from mcptwist.config.model import ServerConfig
from mcptwist.mcp.describe import TOOL_FIELDS, tool_digest
from mcptwist.routing.record import Recorder, ToolEvent

log = Logger(namespace="mcptwist.pins")

FORMAT: Final = 1


class PinFileError(Exception):
    """A pin file that cannot be read or written (the message says which and why)."""


@attrs.define
class Pin:
    """A tool's accepted definition, and its digest."""

    digest: str
    definition: dict[str, Any]


@attrs.define
class Change:
    """A tool served with a definition other than its pin."""

    pinned: Pin
    current: Pin

    def fields(self) -> list[str]:
        """The parts of the definition that differ."""
        old, new = self.pinned.definition, self.current.definition
        return [f for f in TOOL_FIELDS if old.get(f) != new.get(f)]

    def describe(self) -> dict[str, Any]:
        return {
            "pinned_sha256": self.pinned.digest,
            "current_sha256": self.current.digest,
            "changed": self.fields(),
            "pinned": self.pinned.definition,
            "current": self.current.definition,
        }


def definition(tool: Mapping[str, Any]) -> dict[str, Any]:
    """What of a tool is pinned."""
    return {k: tool[k] for k in TOOL_FIELDS if k in tool}


def read_pin_file(path: str) -> dict[str, dict[str, Pin]]:
    """The pins of a pin file ({} if there is none yet)."""
    try:
        with open(path, "rb") as f:
            document = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise PinFileError(f"{path}: cannot read the pin file: {e}") from None
    servers = document.get("servers") if isinstance(document, dict) else None
    if not isinstance(servers, dict) or document.get("format") != FORMAT:
        raise PinFileError(
            f"{path}: not a pin file of format {FORMAT} (write it again with python -m mcptwist pin)"
        )
    pins: dict[str, dict[str, Pin]] = {}
    for server, tools in servers.items():
        if not isinstance(tools, dict):
            raise PinFileError(f"{path}: servers.{server} must map tool names to pins")
        for name, entry in tools.items():
            if not (
                isinstance(entry, dict)
                and isinstance(entry.get("sha256"), str)
                and isinstance(entry.get("definition"), dict)
            ):
                raise PinFileError(f"{path}: servers.{server}.{name} needs sha256 and definition")
            pins.setdefault(server, {})[name] = Pin(entry["sha256"], entry["definition"])
    return pins


def write_pin_file(path: str, pins: Mapping[str, Mapping[str, Pin]]) -> None:
    """Write the pins whole (a new file renamed over the old, mode 0600)."""
    document = {
        "format": FORMAT,
        "servers": {
            server: {
                name: {"sha256": pin.digest, "definition": pin.definition}
                for name, pin in sorted(tools.items())
            }
            for server, tools in sorted(pins.items())
        },
    }
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, temporary = tempfile.mkstemp(prefix=".pins-", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(document, f, indent=1, sort_keys=True)
                f.write("\n")
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as e:
        raise PinFileError(f"{path}: cannot write the pin file: {e}") from None


class PinBook:
    """Every tool's pin, by server; what differs from them; the policies' effects."""

    def __init__(self, path: str | None = None, recorder: Recorder | None = None) -> None:
        self.path = path
        self.recorder = recorder
        self.pins: dict[str, dict[str, Pin]] = read_pin_file(path) if path else {}
        self.changes: dict[str, dict[str, Change]] = {}
        # Told (with the server's name) when an accepted change alters what is shown.
        self.on_accept: list[Callable[[str], None]] = []

    def reopen(self, path: str | None, pins: dict[str, dict[str, Pin]]) -> None:
        """The pin file read again (a reload): its pins win, then those seen
        since start that it lacks (and it is written with them). A change
        whose served definition the file now pins is no longer a change."""
        for server, tools in self.pins.items():
            for name, pin in tools.items():
                pins.setdefault(server, {}).setdefault(name, pin)
        self.path, self.pins = path, pins
        for server, changes in self.changes.items():
            for name, change in list(changes.items()):
                now = pins.get(server, {}).get(name)
                if now is not None and now.digest == change.current.digest:
                    del changes[name]
        self._save()

    def review(self, server: ServerConfig, tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Check a child's tools against their pins: pin new ones, note changes,
        and give the tools clients may see (without those a policy hides)."""
        known = self.pins.setdefault(server.name, {})
        changes = self.changes.setdefault(server.name, {})
        shown: list[dict[str, Any]] = []
        pinned_now = []
        for tool in tools:
            name = tool.get("name")
            if not isinstance(name, str):
                continue
            digest = tool_digest(tool)
            pin = known.get(name)
            if pin is None:
                known[name] = Pin(digest, definition(tool))
                pinned_now.append(name)
            elif pin.digest != digest:
                change = changes.get(name)
                if change is None or change.current.digest != digest:
                    changes[name] = Change(pin, Pin(digest, definition(tool)))
                    self._changed(server, name, changes[name])
                if server.on_tool_change == "hide":
                    continue
            else:
                changes.pop(name, None)
            shown.append(tool)
        served = {t.get("name") for t in tools}
        for name in [n for n in changes if n not in served]:
            # A changed tool no longer served holds nothing back.
            del changes[name]
        if pinned_now:
            for name in pinned_now:
                self._event("tool_pinned", server.name, name, current=known[name].digest)
            self._save()
        return shown

    def _changed(self, server: ServerConfig, name: str, change: Change) -> None:
        fields = ", ".join(change.fields()) or "definition"
        log.warn(
            "{server}: tool {tool!r} changed since it was pinned ({fields}); "
            "on_tool_change = {policy}",
            server=server.name,
            tool=name,
            fields=fields,
            policy=server.on_tool_change,
        )
        self._event(
            "tool_changed",
            server.name,
            name,
            detail=f"changed: {fields}",
            pinned=change.pinned.digest,
            current=change.current.digest,
            policy=server.on_tool_change,
        )

    def hidden(self, server: ServerConfig, name: str) -> bool:
        """Whether the hide policy keeps this tool from clients now."""
        return server.on_tool_change == "hide" and name in self.changes.get(server.name, {})

    def blocked(self, server: ServerConfig) -> str | None:
        """Why the block policy holds this server back (None: it does not)."""
        if server.on_tool_change != "block":
            return None
        changed = sorted(self.changes.get(server.name, {}))
        if not changed:
            return None
        return (
            f"blocked: tool {', '.join(repr(c) for c in changed)} changed since it was pinned "
            "(on_tool_change = block); an operator must accept the change"
        )

    def accept(self, server: str, tools: list[str] | None = None) -> list[str]:
        """Make the definitions served now the pins of these tools (all changed
        ones by default); the names accepted."""
        changes = self.changes.get(server, {})
        names = sorted(changes) if tools is None else [t for t in tools if t in changes]
        for name in names:
            change = changes.pop(name)
            self.pins.setdefault(server, {})[name] = change.current
            self._event(
                "tool_accepted",
                server,
                name,
                pinned=change.pinned.digest,
                current=change.current.digest,
            )
        if names:
            self._save()
            for listener in list(self.on_accept):
                listener(server)
        return names

    def status(self, server: str) -> dict[str, Any]:
        return {
            "pinned": len(self.pins.get(server, {})),
            "changed": {
                name: change.describe() for name, change in self.changes.get(server, {}).items()
            },
        }

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            write_pin_file(self.path, self.pins)
        except PinFileError as e:
            log.error("{problem}", problem=str(e))

    def _event(self, kind: Any, server: str, tool: str, **fields: Any) -> None:
        if self.recorder is not None:
            self.recorder.tool_event(ToolEvent(kind, server, tool, **fields))
