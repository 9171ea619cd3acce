"""Greet through the bridge with the official MCP Python SDK (mcp 2.x), in every mode at once.

    python era_client.py [--timeout S] --mode MODE [--mode MODE]... URL [URL]...

For each URL and each mode ("legacy", "auto" or a modern version such as
"2026-07-28"), a C{Client} connects to the URL in that mode, concurrently
with all the others, and calls the fixture's tools: C{echo}, then C{greet},
which asks the user's name (elicitation, answered {"name": "Ada"}) and a
motto (sampling, answered "Onward"). A legacy client first sends C{ping} and
C{logging/setLevel}, which the bridge answers itself for a child that speaks
only 2026-07-28 (C{set_level} is true, or the error a child answered).

One JSON line is printed on stdout: C{{"runs": [...]}}, one entry per URL and
mode with C{ok}, the negotiated C{protocol_version}, the server's name and
instructions, the texts of each call, the questions the callbacks were asked,
and C{error} when the run failed. The whole run is bounded by --timeout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from typing import Any

import anyio
import mcp_types as types
from mcp import Client
from mcp.client.session import ClientRequestContext
from mcp.shared.exceptions import MCPError


def texts(result: types.CallToolResult) -> list[str]:
    return [c.text for c in result.content if isinstance(c, types.TextContent)]


def error_summary(error: BaseException) -> dict[str, Any]:
    """The MCPError inside (possibly nested) exception groups, else the repr."""
    stack = [error]
    while stack:
        e = stack.pop()
        if isinstance(e, MCPError):
            return {"code": e.code, "message": e.message}
        if isinstance(e, BaseExceptionGroup):
            stack.extend(e.exceptions)
    return {"code": None, "message": repr(error)}


async def run(url: str, mode: str, read_timeout: float) -> dict[str, Any]:
    out: dict[str, Any] = {"url": url, "mode": mode, "ok": False, "asked": []}

    async def on_elicitation(ctx: ClientRequestContext, params: Any) -> Any:
        out["asked"].append(["elicitation/create", params.message, ctx.request_id])
        return types.ElicitResult(action="accept", content={"name": "Ada"})

    async def on_sampling(ctx: ClientRequestContext, params: Any) -> Any:
        content = params.messages[0].content
        out["asked"].append(
            ["sampling/createMessage", getattr(content, "text", repr(content)), ctx.request_id]
        )
        return types.CreateMessageResult(
            role="assistant",
            content=types.TextContent(type="text", text="Onward"),
            model="test-model",
            stop_reason="endTurn",
        )

    started = time.monotonic()
    try:
        async with Client(
            url,
            mode=mode,  # type: ignore[arg-type]
            elicitation_callback=on_elicitation,
            sampling_callback=on_sampling,
            read_timeout_seconds=read_timeout,
        ) as c:
            out["protocol_version"] = c.protocol_version
            out["server_name"] = c.server_info.name if c.server_info else None
            out["instructions"] = c.instructions
            if mode == "legacy":
                await c.send_ping()
                out["ping"] = True
                try:
                    await c.set_logging_level("info")
                    out["set_level"] = True
                except MCPError as e:
                    # A session-era child that declares no logging may refuse it.
                    out["set_level"] = {"code": e.code, "message": e.message}
            out["echo"] = texts(await c.call_tool("echo", {"text": mode}))
            greeted = await c.call_tool("greet", {})
            out["greet"] = texts(greeted)
            out["greet_is_error"] = bool(greeted.is_error)
            out["ok"] = True
    except Exception as e:
        out["error"] = error_summary(e)
        out["traceback"] = traceback.format_exc()[-3000:]
    out["seconds"] = round(time.monotonic() - started, 3)
    return out


async def main_async(opts: argparse.Namespace) -> list[dict[str, Any]]:
    plan = [(url, mode) for url in opts.urls for mode in opts.mode]
    runs: list[dict[str, Any] | None] = [None] * len(plan)

    async def one(i: int, url: str, mode: str) -> None:
        runs[i] = await run(url, mode, opts.read_timeout)

    with anyio.move_on_after(opts.timeout):
        async with anyio.create_task_group() as tg:
            for i, (url, mode) in enumerate(plan):
                tg.start_soon(one, i, url, mode)
    return [
        r
        if r is not None
        else {"url": url, "mode": mode, "ok": False, "error": {"message": "timed out"}}
        for r, (url, mode) in zip(runs, plan, strict=True)
    ]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", action="append", required=True)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--read-timeout", type=float, default=20.0)
    parser.add_argument("urls", nargs="+")
    opts = parser.parse_args()
    runs = anyio.run(main_async, opts)
    print(json.dumps({"runs": runs}, default=repr))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
