"""A stdio MCP server that misbehaves on request, for the fault suite (stdlib only).

    python fault_fixture.py [--record FILE] [--exit-at-once] [--slow-start S]

Tools (every tools/call runs in a thread, so several can be in flight):
  echo {message}              "Echo: MESSAGE"
  sleep {seconds, message}    answers "slept MESSAGE" after sleeping
  hang {}                     never answers
  pid {}                      its process id
  flood {count, kind, size}   COUNT notifications (kind "message": notifications/message;
                              "progress": notifications/progress with the call's token),
                              each with SIZE bytes of data, as fast as it can; then answers
                              "flooded COUNT"
  partial {message, pieces, pause}
                              the answer "Partial: MESSAGE", written in PIECES writes
                              PAUSE seconds apart (a line split across writes)
  huge {size, order}          an answer whose line is SIZE bytes and more; ORDER is the
                              key order of the response object: "jir" (jsonrpc, id,
                              result), "rji" (result, jsonrpc, id) or "jri" (jsonrpc,
                              result, id)
  junk {size}                 a SIZE-byte line that is not JSON, garbage lines, a
                              response with an unknown id, then answers "junked"
  badnote {}                  well-formed JSON-RPC notifications with wrongly typed
                              params (a log level that is a list, a resource uri that is an
                              object...), then answers "noted"
  raw {lines}                 writes each of LINES (strings) verbatim on stdout, then
                              answers "raw"
  exit {code}                 exits at once with CODE (mid-call)

Options:
  --record FILE      append every line received on stdin to FILE (flushed at once), so
                     that a test can see what the bridge sent (notifications/cancelled)
  --exit-at-once     exit with status 3 before reading anything (a crash loop)
  --slow-start S     sleep S seconds before reading stdin (a slow handshake)
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

_lock = threading.Lock()
_record: Any = None


def arg(name: str) -> str | None:
    if name in sys.argv:
        return sys.argv[sys.argv.index(name) + 1]
    return None


def write_raw(data: str) -> None:
    with _lock:
        sys.stdout.write(data)
        sys.stdout.flush()


def send(message: dict[str, Any]) -> None:
    write_raw(json.dumps(message, separators=(",", ":")) + "\n")


def text(value: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": value}], "isError": False}


def answer(request_id: Any, value: str) -> None:
    send({"jsonrpc": "2.0", "id": request_id, "result": text(value)})


def call_tool(request_id: Any, params: dict[str, Any]) -> None:
    name = params.get("name")
    args = params.get("arguments") or {}
    token = (params.get("_meta") or {}).get("progressToken")
    if name == "echo":
        answer(request_id, f"Echo: {args.get('message')}")
    elif name == "sleep":
        time.sleep(float(args.get("seconds", 1)))
        answer(request_id, f"slept {args.get('message', '')}".strip())
    elif name == "hang":
        return
    elif name == "pid":
        answer(request_id, str(os.getpid()))
    elif name == "flood":
        count = int(args.get("count", 1000))
        kind = args.get("kind", "message")
        pad = "f" * int(args.get("size", 100))
        lines = []
        for i in range(count):
            if kind == "progress" and token is not None:
                note = {
                    "jsonrpc": "2.0",
                    "method": "notifications/progress",
                    "params": {"progressToken": token, "progress": i + 1, "message": pad},
                }
            else:
                note = {
                    "jsonrpc": "2.0",
                    "method": "notifications/message",
                    "params": {"level": "info", "logger": "flood", "data": f"{i} {pad}"},
                }
            lines.append(json.dumps(note, separators=(",", ":")))
            if len(lines) >= 200:
                write_raw("\n".join(lines) + "\n")
                lines = []
        if lines:
            write_raw("\n".join(lines) + "\n")
        answer(request_id, f"flooded {count}")
    elif name == "partial":
        line = json.dumps(
            {"jsonrpc": "2.0", "id": request_id, "result": text(f"Partial: {args['message']}")},
            separators=(",", ":"),
        )
        pieces = max(1, int(args.get("pieces", 3)))
        step = max(1, len(line) // pieces)
        with _lock:  # nothing else may be written into the middle of the line
            for start in range(0, len(line), step):
                sys.stdout.write(line[start : start + step])
                sys.stdout.flush()
                time.sleep(float(args.get("pause", 0.2)))
            sys.stdout.write("\n")
            sys.stdout.flush()
    elif name == "huge":
        size = int(args["size"])
        result = json.dumps(text("h" * size), separators=(",", ":"))
        jid = json.dumps(request_id)
        order = args.get("order", "jir")
        if order == "rji":
            line = f'{{"result":{result},"jsonrpc":"2.0","id":{jid}}}'
        elif order == "jri":
            line = f'{{"jsonrpc":"2.0","result":{result},"id":{jid}}}'
        else:
            line = f'{{"jsonrpc":"2.0","id":{jid},"result":{result}}}'
        # Written in several chunks, as a big write is on a pipe anyway.
        with _lock:
            for start in range(0, len(line), 65536):
                sys.stdout.write(line[start : start + 65536])
            sys.stdout.write("\n")
            sys.stdout.flush()
    elif name == "junk":
        size = int(args.get("size", 1 << 20))
        write_raw("x" * size + "\n")
        write_raw("not json\n{broken\n[1,2]\n\n")
        send({"jsonrpc": "2.0", "id": 987654321, "result": text("nobody asked")})
        send({"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "x"}})
        answer(request_id, "junked")
    elif name == "badnote":
        for note in (
            {"method": "notifications/message", "params": {"level": ["info"], "data": "x"}},
            {"method": "notifications/message", "params": {"level": {"a": 1}, "data": "x"}},
            {"method": "notifications/message", "params": {"level": 7, "data": "x"}},
            {"method": "notifications/resources/updated", "params": {"uri": {"a": 1}}},
            {"method": "notifications/resources/updated", "params": {"uri": [1]}},
            {"method": "notifications/progress", "params": {"progressToken": [1]}},
            {"method": "notifications/progress", "params": {"progressToken": True}},
            {"method": "notifications/cancelled", "params": {"requestId": {"a": 1}}},
            {"method": "notifications/tools/list_changed", "params": {"x": [1, {"y": None}]}},
        ):
            send({"jsonrpc": "2.0", **note})
        answer(request_id, "noted")
    elif name == "raw":
        for line in args.get("lines", []):
            write_raw(line + "\n")
        answer(request_id, "raw")
    elif name == "exit":
        os._exit(int(args.get("code", 1)))
    else:
        send(
            {
                "jsonrpc": "2.0",
                "id": request_id,
                "error": {"code": -32602, "message": f"Unknown tool: {name}"},
            }
        )


TOOLS = [
    {"name": n, "description": n, "inputSchema": {"type": "object"}}
    for n in (
        "echo",
        "sleep",
        "hang",
        "pid",
        "flood",
        "partial",
        "huge",
        "junk",
        "badnote",
        "raw",
        "exit",
    )
]


def main() -> int:
    global _record
    record = arg("--record")
    if record:
        _record = open(record, "a", buffering=1)  # noqa: SIM115
    print(f"fault_fixture {os.getpid()} starting", file=sys.stderr, flush=True)
    if "--exit-at-once" in sys.argv:
        print("fault_fixture: exiting at once", file=sys.stderr, flush=True)
        return 3
    slow = arg("--slow-start")
    if slow:
        time.sleep(float(slow))
    for raw in sys.stdin:
        line = raw.strip()
        if not line:
            continue
        if _record is not None:
            _record.write(line + "\n")
        try:
            message = json.loads(line)
        except ValueError:
            continue
        method = message.get("method")
        request_id = message.get("id")
        if method is None or request_id is None:
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
                        "capabilities": {"tools": {}, "logging": {}, "resources": {}},
                        "serverInfo": {"name": "fault-fixture", "version": "1.0"},
                    },
                }
            )
        elif method in ("ping", "logging/setLevel", "resources/subscribe"):
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
