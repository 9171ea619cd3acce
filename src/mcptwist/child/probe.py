# -*- test-case-name: tests.test_pins -*-
"""Ask a server, outside the bridge, which tools it serves.

C{python -m mcptwist pin} runs each configured server once, as the bridge
would (its command, arguments, directory and allow-listed environment),
speaks its handshake, reads every page of C{tools/list}, and stops it. No
reactor is involved: a command-line tool waits on one child at a time.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import time
from collections.abc import Mapping
from typing import IO, Any

from mcptwist.child.process import child_environment
from mcptwist.config.model import ServerConfig
from mcptwist.mcp import era, protocol

CLIENT_INFO = {"name": f"{protocol.BRIDGE_NAME}-pin", "version": "1"}
MAX_PAGES = 100


class ProbeError(Exception):
    """The server could not be asked (it failed to start, refused, or took too long)."""


def probe_tools(
    server: ServerConfig, environ: Mapping[str, str], timeout: float | None = None
) -> list[dict[str, Any]]:
    """Every tool the server lists, after its handshake."""
    limit = server.startup_timeout if timeout is None else timeout
    try:
        child = subprocess.Popen(
            [server.command, *server.args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=child_environment(server, environ),
            cwd=server.cwd,
            start_new_session=True,
        )
    except OSError as e:
        raise ProbeError(f"cannot run {server.command!r}: {e.strerror}") from None
    assert child.stdin is not None and child.stdout is not None
    talk = _Conversation(child.stdin, child.stdout, time.monotonic() + limit)
    try:
        modern = server.era == "modern"
        meta = {
            era.META_VERSION: era.MODERN,
            era.META_CAPABILITIES: {},
            era.META_CLIENT: CLIENT_INFO,
        }
        if modern:
            talk.ask("server/discover", {"_meta": meta})
        else:
            talk.ask(
                "initialize",
                {
                    "protocolVersion": protocol.LATEST_LEGACY,
                    "capabilities": {},
                    "clientInfo": CLIENT_INFO,
                },
            )
            talk.tell("notifications/initialized")
        tools: list[dict[str, Any]] = []
        cursor: str | None = None
        for _ in range(MAX_PAGES):
            params: dict[str, Any] = {"cursor": cursor} if cursor else {}
            if modern:
                params["_meta"] = meta
            result = talk.ask("tools/list", params)
            tools += [t for t in result.get("tools") or [] if isinstance(t, dict)]
            cursor = result.get("nextCursor")
            if not isinstance(cursor, str) or not cursor:
                break
        return tools
    finally:
        _stop(child)


class _Conversation:
    """Requests to a child, one at a time, within a deadline."""

    def __init__(self, stdin: IO[bytes], stdout: IO[bytes], deadline: float) -> None:
        self.stdin = stdin
        self.stdout = stdout
        self.deadline = deadline
        self.ids = 0
        self.buffer = b""
        self.selector = selectors.DefaultSelector()
        self.selector.register(stdout, selectors.EVENT_READ)

    def tell(self, method: str) -> None:
        self._write({"jsonrpc": "2.0", "method": method})

    def ask(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self.ids += 1
        self._write({"jsonrpc": "2.0", "id": self.ids, "method": method, "params": params})
        while True:
            message = self._read()
            if "method" in message and "id" in message:
                # The child asks something of its client: there is none to ask.
                self._write(
                    {
                        "jsonrpc": "2.0",
                        "id": message["id"],
                        "error": {"code": -32601, "message": "not available while pinning"},
                    }
                )
            elif message.get("id") == self.ids and "method" not in message:
                result = message.get("result")
                if not isinstance(result, dict):
                    error = message.get("error") or {}
                    raise ProbeError(f"{method} failed: {error.get('message', message)}")
                return result

    def _write(self, message: dict[str, Any]) -> None:
        try:
            self.stdin.write(json.dumps(message).encode() + b"\n")
            self.stdin.flush()
        except OSError:
            raise ProbeError("it closed its stdin (did it exit?)") from None

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            left = self.deadline - time.monotonic()
            if left <= 0 or not self.selector.select(left):
                raise ProbeError("it did not answer in time (startup_timeout)")
            chunk = os.read(self.stdout.fileno(), 65536)
            if not chunk:
                raise ProbeError("it exited before answering")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        try:
            message = json.loads(line)
        except ValueError:
            return {}
        return message if isinstance(message, dict) else {}


def _stop(child: subprocess.Popen[bytes]) -> None:
    """Close its stdin, then TERM and KILL its process group if it lingers."""
    try:
        assert child.stdin is not None
        child.stdin.close()
    except OSError:
        pass
    for sig in (None, 15, 9):
        if sig is not None:
            try:
                os.killpg(child.pid, sig)
            except ProcessLookupError:
                break
        try:
            child.wait(timeout=2)
            break
        except subprocess.TimeoutExpired:
            continue
    if child.stdout is not None:
        child.stdout.close()
