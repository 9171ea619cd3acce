"""A stdio MCP server that stops talking while it runs (standard library only).

Tools, each called in the main loop:
  echo {message}    "Echo: MESSAGE"
  close_stdout {}   closes its stdout (fd 1) and sleeps for ever
  close_stdin {}    closes its stdin (fd 0) and sleeps for ever
  close_stderr {}   closes its stderr (fd 2) and answers "closed stderr"
  hang {}           never answers (it goes on reading and answering the rest)
  pid {}            its process id
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def send(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def answer(request_id: Any, text: str) -> None:
    result = {"content": [{"type": "text", "text": text}], "isError": False}
    send({"jsonrpc": "2.0", "id": request_id, "result": result})


def forever() -> None:
    while True:
        time.sleep(3600)


TOOLS = [
    {"name": n, "description": n, "inputSchema": {"type": "object"}}
    for n in ("echo", "close_stdout", "close_stdin", "close_stderr", "hang", "pid")
]


def call_tool(request_id: Any, name: Any, args: dict[str, Any]) -> None:
    if name == "echo":
        answer(request_id, f"Echo: {args.get('message')}")
    elif name == "close_stdout":
        os.close(1)
        forever()
    elif name == "close_stdin":
        os.close(0)
        forever()
    elif name == "close_stderr":
        os.close(2)
        answer(request_id, "closed stderr")
    elif name == "pid":
        answer(request_id, str(os.getpid()))
    elif name != "hang":
        error = {"code": -32602, "message": f"Unknown tool: {name}"}
        send({"jsonrpc": "2.0", "id": request_id, "error": error})


def main() -> int:
    for raw in sys.stdin:
        try:
            message = json.loads(raw)
        except ValueError:
            continue
        method = message.get("method")
        request_id = message.get("id")
        if method is None or request_id is None:
            continue
        if method == "initialize":
            result = {
                "protocolVersion": message.get("params", {}).get("protocolVersion", "2025-11-25"),
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "mute-fixture", "version": "1.0"},
            }
            send({"jsonrpc": "2.0", "id": request_id, "result": result})
        elif method == "tools/list":
            send({"jsonrpc": "2.0", "id": request_id, "result": {"tools": TOOLS}})
        elif method == "tools/call":
            params = message.get("params") or {}
            call_tool(request_id, params.get("name"), params.get("arguments") or {})
        elif method == "ping":
            send({"jsonrpc": "2.0", "id": request_id, "result": {}})
        else:
            error = {"code": -32601, "message": f"Method not found: {method}"}
            send({"jsonrpc": "2.0", "id": request_id, "error": error})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
