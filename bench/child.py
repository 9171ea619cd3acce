#!/usr/bin/env python3
"""The benchmark's stdio MCP server: fast, standard library (+ orjson when present).

One JSON-RPC message per line on stdin/stdout; every line is written with one
unbuffered os.write(). Lifecycle of the session-era revisions (initialize,
notifications/initialized, ping); tools:

  echo   {text, mode?}      -> the text back; mode "digest" -> only "len:sha256" of the text
  blob   {size, seed?}      -> a text of `size` bytes (see pattern()), for large results
  sleep  {ms}               -> answers after ms milliseconds (other calls go on meanwhile)
  notify {count, kind?}     -> sends `count` notifications/progress (when the request has a
                               progressToken; else notifications/message) before answering

Run: python3 -u bench/child.py   (stderr gets one line at start and at end)
     python3 -u bench/child.py --extra-tools N   (also lists extra_1..extra_N, which echo:
                                                  longer lists for the aggregate scenario)
"""

from __future__ import annotations

import hashlib
import heapq
import os
import select
import sys
import time

try:
    import orjson

    def dumps(obj: object) -> bytes:
        return orjson.dumps(obj)

    loads = orjson.loads
except ImportError:  # pragma: no cover - the bench venv has orjson
    import json

    def dumps(obj: object) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

    loads = json.loads

VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
OUT = sys.stdout.fileno()

TOOLS = [
    {
        "name": "echo",
        "description": "Echo the text back (mode=digest: only its length and sha256).",
        "inputSchema": {
            "type": "object",
            "properties": {"text": {"type": "string"}, "mode": {"type": "string"}},
            "required": ["text"],
        },
    },
    {
        "name": "blob",
        "description": "Return a text of `size` bytes.",
        "inputSchema": {
            "type": "object",
            "properties": {"size": {"type": "integer"}, "seed": {"type": "string"}},
            "required": ["size"],
        },
    },
    {
        "name": "sleep",
        "description": "Answer after `ms` milliseconds.",
        "inputSchema": {
            "type": "object",
            "properties": {"ms": {"type": "number"}},
            "required": ["ms"],
        },
    },
    {
        "name": "notify",
        "description": "Send `count` progress (or log) notifications, then answer.",
        "inputSchema": {
            "type": "object",
            "properties": {"count": {"type": "integer"}, "kind": {"type": "string"}},
            "required": ["count"],
        },
    },
]


def extra_tool(n: int) -> dict:
    """A listed tool of about the size of a real one's definition (it echoes)."""
    return {
        "name": f"extra_{n}",
        "description": f"Extra tool {n}: echoes its text back; it is here to make the list "
        "as long as a real server's.",
        "inputSchema": {
            "type": "object",
            "properties": {
                "text": {"type": "string", "description": "What to echo back."},
                "limit": {"type": "integer", "minimum": 1, "description": "Unused."},
            },
            "required": ["text"],
        },
    }


def pattern(size: int, seed: str = "") -> str:
    """A deterministic ASCII text of `size` bytes (the driver builds the same one)."""
    unit = hashlib.sha256(seed.encode()).hexdigest()  # 64 bytes
    return (unit * (size // 64 + 1))[:size]


def write(message: object) -> None:
    data = dumps(message) + b"\n"
    view = memoryview(data)
    while view:
        n = os.write(OUT, view)
        view = view[n:]


def text_result(text: str) -> dict:
    return {"content": [{"type": "text", "text": text}], "isError": False}


def call_tool(rid, params: dict, timers: list) -> dict | None:
    name = params.get("name")
    args = params.get("arguments") or {}
    if name == "echo" or (isinstance(name, str) and name.startswith("extra_")):
        text = args.get("text", "")
        if args.get("mode") == "digest":
            raw = text.encode()
            return text_result(f"{len(raw)}:{hashlib.sha256(raw).hexdigest()}")
        return text_result(text)
    if name == "blob":
        return text_result(pattern(int(args.get("size", 0)), str(args.get("seed", ""))))
    if name == "sleep":
        due = time.monotonic() + float(args.get("ms", 0)) / 1000.0
        heapq.heappush(timers, (due, id(params), rid))
        return None
    if name == "notify":
        count = int(args.get("count", 0))
        token = (params.get("_meta") or {}).get("progressToken")
        for i in range(count):
            if token is not None and args.get("kind") != "message":
                write(
                    {
                        "jsonrpc": "2.0",
                        "method": "notifications/progress",
                        "params": {"progressToken": token, "progress": i + 1, "total": count},
                    }
                )
            else:
                write(
                    {
                        "jsonrpc": "2.0",
                        "method": "notifications/message",
                        "params": {"level": "info", "logger": "bench", "data": f"{i + 1}/{count}"},
                    }
                )
        return text_result(f"sent {count}")
    return {"content": [{"type": "text", "text": f"unknown tool {name}"}], "isError": True}


def handle(message: dict, timers: list) -> None:
    method = message.get("method")
    rid = message.get("id")
    if method is None or rid is None:
        return  # a notification or a response: nothing to do
    params = message.get("params") or {}
    if method == "tools/call":
        result = call_tool(rid, params, timers)
        if result is None:
            return
    elif method == "initialize":
        asked = params.get("protocolVersion")
        result = {
            "protocolVersion": asked if asked in VERSIONS else VERSIONS[-2],
            "capabilities": {"tools": {}, "logging": {}},
            "serverInfo": {"name": "bench-child", "version": "1.0.0"},
        }
    elif method == "ping" or method == "logging/setLevel":
        result = {}
    elif method == "tools/list":
        result = {"tools": TOOLS}
    elif method in ("resources/list", "prompts/list"):
        result = {method.split("/")[0]: []}
    else:
        write(
            {
                "jsonrpc": "2.0",
                "id": rid,
                "error": {"code": -32601, "message": f"Method not found: {method}"},
            }
        )
        return
    write({"jsonrpc": "2.0", "id": rid, "result": result})


def main() -> int:
    if "--extra-tools" in sys.argv:
        count = int(sys.argv[sys.argv.index("--extra-tools") + 1])
        TOOLS.extend(extra_tool(n) for n in range(1, count + 1))
    fd = sys.stdin.fileno()
    os.set_blocking(fd, True)
    timers: list = []
    parts: list[bytes] = []
    print(f"bench-child {os.getpid()} ready", file=sys.stderr, flush=True)
    while True:
        timeout = None
        if timers:
            timeout = max(0.0, timers[0][0] - time.monotonic())
            ready, _, _ = select.select([fd], [], [], timeout)
            now = time.monotonic()
            while timers and timers[0][0] <= now:
                _, _, rid = heapq.heappop(timers)
                write({"jsonrpc": "2.0", "id": rid, "result": text_result("slept")})
            if not ready:
                continue
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        if b"\n" not in chunk:
            parts.append(chunk)  # a long line arrives in many reads: join once
            continue
        if parts:
            parts.append(chunk)
            chunk = b"".join(parts)
            parts = []
        lines = chunk.split(b"\n")
        if lines[-1]:
            parts.append(lines[-1])
        lines.pop()
        for line in lines:
            if not line.strip():
                continue
            try:
                message = loads(line)
            except ValueError:
                write(
                    {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "Parse error"}}
                )
                continue
            if isinstance(message, list):
                for m in message:
                    if isinstance(m, dict):
                        handle(m, timers)
            elif isinstance(message, dict):
                handle(message, timers)
    print("bench-child: stdin closed", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
