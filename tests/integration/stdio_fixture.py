"""A tiny stdio MCP server for the fault tests (standard library only).

Tools: C{echo {message}}, C{sleep {seconds}} (answers after sleeping),
C{pid} (its own process id), C{big {size}} (a text of C{size} "z"s) and
C{log {levels}} (one notifications/message per level, then the answer).
Every tools/call runs in a thread, so several can be in flight at once.

Options:
  --garbage     print junk lines on stdout before and after every message it
                sends (plain text, broken JSON, JSON that is not JSON-RPC,
                blank lines), to check the bridge skips them.
  --stubborn    ignore SIGTERM and do not exit when stdin closes (only
                SIGKILL ends it).
  --mute        never answer initialize (a child that hangs at startup).
  --grandchild  start a C{sleep 300} grandchild (in the same process group);
                the C{pid} tool then answers "PID GRANDCHILD_PID".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

GARBAGE = [
    "this is not JSON at all",
    "{broken json",
    "",
    "   ",
    "[1, 2, 3]",
    '{"hello": "world"}',
    '"a string"',
    "42",
    "\x1b[31mANSI colour\x1b[0m",
]

TOOLS = [
    {
        "name": "echo",
        "description": "Echo the message back.",
        "inputSchema": {
            "type": "object",
            "properties": {"message": {"type": "string"}},
            "required": ["message"],
        },
    },
    {
        "name": "sleep",
        "description": "Sleep for some seconds, then answer.",
        "inputSchema": {
            "type": "object",
            "properties": {"seconds": {"type": "number"}},
            "required": ["seconds"],
        },
    },
    {
        "name": "pid",
        "description": "The server's process id.",
        "inputSchema": {"type": "object", "properties": {}},
    },
    {
        "name": "big",
        "description": "A text of `size` characters.",
        "inputSchema": {
            "type": "object",
            "properties": {"size": {"type": "integer"}},
            "required": ["size"],
        },
    },
    {
        "name": "log",
        "description": "Send one log message per level, then answer.",
        "inputSchema": {
            "type": "object",
            "properties": {"levels": {"type": "array", "items": {"type": "string"}}},
            "required": ["levels"],
        },
    },
]

_lock = threading.Lock()
_garbage = "--garbage" in sys.argv
_junk = iter(range(1 << 62))
_grandchild: subprocess.Popen[bytes] | None = None


def send(message: dict[str, Any]) -> None:
    line = json.dumps(message, separators=(",", ":"))
    with _lock:
        if _garbage:
            sys.stdout.write(GARBAGE[next(_junk) % len(GARBAGE)] + "\n")
        sys.stdout.write(line + "\n")
        if _garbage:
            sys.stdout.write(GARBAGE[next(_junk) % len(GARBAGE)] + "\n")
        sys.stdout.flush()


def text(value: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": value}], "isError": False}


def call_tool(request_id: Any, params: dict[str, Any]) -> None:
    name = params.get("name")
    args = params.get("arguments") or {}
    if name == "echo":
        send({"jsonrpc": "2.0", "id": request_id, "result": text(f"Echo: {args.get('message')}")})
    elif name == "sleep":
        time.sleep(float(args.get("seconds", 1)))
        send({"jsonrpc": "2.0", "id": request_id, "result": text("slept")})
    elif name == "pid":
        pids = str(os.getpid())
        if _grandchild is not None:
            pids += f" {_grandchild.pid}"
        send({"jsonrpc": "2.0", "id": request_id, "result": text(pids)})
    elif name == "big":
        send({"jsonrpc": "2.0", "id": request_id, "result": text("z" * int(args["size"]))})
    elif name == "log":
        for level in args["levels"]:
            send(
                {
                    "jsonrpc": "2.0",
                    "method": "notifications/message",
                    "params": {"level": level, "logger": "fixture", "data": f"{level} message"},
                }
            )
        send({"jsonrpc": "2.0", "id": request_id, "result": text("logged")})
    else:
        send(
            {
                "jsonrpc": "2.0",
                "id": request_id,
                "error": {"code": -32602, "message": f"Unknown tool: {name}"},
            }
        )


def main() -> int:
    global _grandchild
    print(f"stdio_fixture {os.getpid()} starting", file=sys.stderr, flush=True)
    if "--stubborn" in sys.argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if "--grandchild" in sys.argv:
        _grandchild = subprocess.Popen(
            ["sleep", "300"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            message = json.loads(line)
        except ValueError:
            continue
        method = message.get("method")
        request_id = message.get("id")
        if method is None or request_id is None:
            continue  # responses and notifications
        if method == "initialize" and "--mute" in sys.argv:
            continue
        if method == "initialize":
            send(
                {
                    "jsonrpc": "2.0",
                    "id": request_id,
                    "result": {
                        "protocolVersion": message.get("params", {}).get(
                            "protocolVersion", "2025-11-25"
                        ),
                        "capabilities": {"tools": {}, "logging": {}},
                        "serverInfo": {"name": "stdio-fixture", "version": "1.0"},
                    },
                }
            )
        elif method in ("ping", "logging/setLevel"):
            send({"jsonrpc": "2.0", "id": request_id, "result": {}})
        elif method == "tools/list":
            send({"jsonrpc": "2.0", "id": request_id, "result": {"tools": TOOLS}})
        elif method == "tools/call":
            threading.Thread(
                target=call_tool, args=(request_id, message.get("params") or {}), daemon=True
            ).start()
        else:
            send(
                {
                    "jsonrpc": "2.0",
                    "id": request_id,
                    "error": {"code": -32601, "message": f"Method not found: {method}"},
                }
            )
    if "--stubborn" in sys.argv:
        while True:
            time.sleep(60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
