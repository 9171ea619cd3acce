"""Drive the bridge with the official MCP Python SDK (mcp 2.x); print one JSON line.

    python sdk_client.py --url URL --transport http|sse [--mode legacy|auto|2026-07-28]
                         [--barrier DIR --parties N] SCENARIO [ARGS]

Scenarios:
  example                     the built-in example server's tools
  time                        mcp-server-time
  everything                  server-everything: tools, sampling, elicitation,
                              progress and logging
  questions                   server-everything: tools, sampling, elicitation and
                              progress (no logging: fits every mode)
  call TOOL JSON_ARGS         one tools/call; prints the result or the error
  timeout_then_echo S T       (stdio_fixture) sleep S s with a T s client timeout,
                              then echo on the same session
  roots                       server-everything's get-roots-list (asks for roots)
  info                        just connect: protocol version and server info
  list_and_call [TOOL JSON_ARGS]...
                              tools/list, then each call in turn, each with its
                              result or error and when it started and ended
  progress TOOL JSON_ARGS     one tools/call with a progress callback: its result,
                              the progress it got and when it started and ended

--mode is the SDK Client's mode: "legacy" (initialize), "auto" (server/discover,
falling back to initialize) or a modern protocol version such as "2026-07-28".
With --barrier DIR --parties N, the client connects, then waits until N
clients have connected (each writes a file in DIR) before its scenario, so
that the requests of clients started together overlap.

With --prefix P, the everything and questions scenarios call server-everything's
tools as P + their name (e.g. "ev__echo" through an aggregating endpoint).
The environment variable SAMPLING_DELAY (seconds) slows the sampling callback.
Elicitation answers fill the requested schema's properties from ANSWERS.
seen["posts"] has one line per JSON-RPC POST the client sent:
its JSON-RPC method and params.name, its MCP-Protocol-Version header, whether
it carried Mcp-Session-Id, the keys of its inputResponses and whether it
carried a requestState (a 2026-07-28 client's input_required rounds), and its
progress token.

The JSON printed on stdout has C{ok: true} and what was seen, or C{ok: false}
and the error (JSON-RPC code and message when there is one). The whole run is
bounded by --timeout (default 45 s), so it never hangs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import ssl
import sys
import time
import traceback
from typing import Any

import anyio
import httpx2
import mcp_types as types
from mcp import Client
from mcp.client.session import ClientRequestContext
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

seen: dict[str, list[Any]] = {
    "sampling": [],
    "elicitation": [],
    "logs": [],
    "notifications": [],
    "progress": [],
    # [method, request id] of every question the server asked this client: the
    # JSON-RPC id (legacy) or the input request's key (2026-07-28 input_required).
    "asked": [],
    "posts": [],
}

# What the "user" answers to an elicitation, by property name.
ANSWERS: dict[str, Any] = {
    "name": "Ada",
    "check": True,
    "email": "ada@example.com",
    "color": "teal",
    "ok": True,
    "context": "bridged context",
}

# Put before server-everything's tool names (--prefix).
naming = {"prefix": ""}


def tool(name: str) -> str:
    return naming["prefix"] + name


# server-everything's simulated log lines, e.g. "Info-level message".
SIMULATED_LOG = re.compile(r"-level message|level-message")


async def on_sampling(ctx: ClientRequestContext, params: types.CreateMessageRequestParams) -> Any:
    content = params.messages[0].content
    seen["sampling"].append(getattr(content, "text", repr(content)))
    seen["asked"].append(["sampling/createMessage", ctx.request_id])
    # A slow "LLM", so that requests of concurrent clients overlap.
    await anyio.sleep(float(os.environ.get("SAMPLING_DELAY", "0")))
    return types.CreateMessageResult(
        role="assistant",
        content=types.TextContent(type="text", text="sampled-by-test"),
        model="test-model",
        stop_reason="endTurn",
    )


async def on_elicitation(ctx: ClientRequestContext, params: types.ElicitRequestParams) -> Any:
    seen["elicitation"].append(params.message)
    seen["asked"].append(["elicitation/create", ctx.request_id])
    schema = getattr(params, "requested_schema", None)
    properties = schema.get("properties") if isinstance(schema, dict) else None
    wanted = ANSWERS if not isinstance(properties, dict) else properties
    content = {k: v for k, v in ANSWERS.items() if k in wanted}
    return types.ElicitResult(action="accept", content=content)


async def on_list_roots(ctx: ClientRequestContext) -> Any:
    seen.setdefault("roots", []).append("roots/list")
    seen["asked"].append(["roots/list", ctx.request_id])
    return types.ListRootsResult(
        roots=[types.Root(uri="file:///tmp/mcptwist-root", name="test root")]
    )


async def on_log(params: types.LoggingMessageNotificationParams) -> None:
    seen["logs"].append([params.level, params.data])


async def on_message(message: Any) -> None:
    if isinstance(message, Exception):
        seen["notifications"].append("EXC " + repr(message))
    else:
        seen["notifications"].append(getattr(message, "method", repr(message)))


def texts(result: types.CallToolResult) -> list[str]:
    return [c.text for c in result.content if isinstance(c, types.TextContent)]


def call_summary(result: types.CallToolResult) -> dict[str, Any]:
    return {
        "is_error": bool(result.is_error),
        "texts": texts(result),
        "structured": result.structured_content,
    }


def error_summary(error: BaseException) -> dict[str, Any]:
    """The MCPError inside (possibly nested) exception groups, else the repr."""
    stack = [error]
    while stack:
        e = stack.pop()
        if isinstance(e, MCPError):
            return {"code": e.code, "message": e.message, "data": _jsonable(e.data)}
        if isinstance(e, BaseExceptionGroup):
            stack.extend(e.exceptions)
    return {"code": None, "message": repr(error), "data": None}


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


async def scenario_example(c: Client, args: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["tools"] = sorted(t.name for t in (await c.list_tools()).tools)
    out["calculate"] = call_summary(
        await c.call_tool("calculate", {"expression": "2 * (3 + 4) ** 2 / sqrt(16)"})
    )
    out["calculate_bad"] = call_summary(await c.call_tool("calculate", {"expression": "1 +"}))
    out["hash_text"] = call_summary(
        await c.call_tool("hash_text", {"text": "abc", "algorithm": "sha256"})
    )
    out["uuid"] = call_summary(await c.call_tool("uuid", {"count": 3}))
    out["encode"] = call_summary(
        await c.call_tool("encode", {"text": "héllo", "encoding": "base64"})
    )
    out["decode"] = call_summary(
        await c.call_tool("decode", {"text": "aMOpbGxv", "encoding": "base64"})
    )
    out["current_time"] = call_summary(await c.call_tool("current_time", {"timezone": "UTC"}))
    try:
        await c.call_tool("no-such-tool", {})
        out["unknown_tool"] = {"raised": False}
    except MCPError as e:
        out["unknown_tool"] = {"raised": True, "code": e.code, "message": e.message}
    return out


async def scenario_time(c: Client, args: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["tools"] = sorted(t.name for t in (await c.list_tools()).tools)
    out["get_current_time"] = call_summary(
        await c.call_tool("get_current_time", {"timezone": "UTC"})
    )
    out["convert_time"] = call_summary(
        await c.call_tool(
            "convert_time",
            {"source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"},
        )
    )
    out["bad_timezone"] = call_summary(
        await c.call_tool("get_current_time", {"timezone": "Not/AZone"})
    )
    return out


async def scenario_questions(c: Client, args: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["tools"] = sorted(t.name for t in (await c.list_tools()).tools)
    out["echo"] = call_summary(await c.call_tool(tool("echo"), {"message": "hello bridge"}))
    out["get_sum"] = call_summary(await c.call_tool(tool("get-sum"), {"a": 2, "b": 40}))
    out["sampling"] = call_summary(
        await c.call_tool(
            tool("trigger-sampling-request"), {"prompt": "hello sampler", "maxTokens": 10}
        )
    )
    out["elicitation"] = call_summary(await c.call_tool(tool("trigger-elicitation-request"), {}))

    progress: list[list[Any]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append([value, total, message])

    out["long_running"] = call_summary(
        await c.call_tool(
            tool("trigger-long-running-operation"),
            {"duration": 1, "steps": 4},
            progress_callback=on_progress,
        )
    )
    out["progress"] = progress
    return out


async def scenario_everything(c: Client, args: list[str]) -> dict[str, Any]:
    out = await scenario_questions(c, args)
    await c.set_logging_level("debug")
    out["toggle_logging"] = call_summary(await c.call_tool(tool("toggle-simulated-logging"), {}))
    # The first simulated message is sent at once; wait for it (bounded). Other
    # log lines (server-everything also logs root updates) may come first.
    with anyio.move_on_after(8):
        while not any(SIMULATED_LOG.search(str(data)) for _, data in seen["logs"]):
            await anyio.sleep(0.05)
    out["toggle_logging_off"] = call_summary(
        await c.call_tool(tool("toggle-simulated-logging"), {})
    )
    try:
        await c.read_resource("demo://no/such/resource")
        out["bad_resource"] = {"raised": False}
    except MCPError as e:
        out["bad_resource"] = {"raised": True, "code": e.code, "message": e.message}
    return out


async def scenario_call(c: Client, args: list[str]) -> dict[str, Any]:
    name, arguments = args[0], json.loads(args[1]) if len(args) > 1 else {}
    started = time.time()
    try:
        result = await c.call_tool(name, arguments)
        return {"call": call_summary(result), "started": started, "ended": time.time()}
    except MCPError as e:
        return {
            "call_error": {"code": e.code, "message": e.message, "data": _jsonable(e.data)},
            "started": started,
            "ended": time.time(),
        }


async def scenario_progress(c: Client, args: list[str]) -> dict[str, Any]:
    progress: list[list[Any]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append([value, total, message])

    started = time.time()
    result = await c.call_tool(args[0], json.loads(args[1]), progress_callback=on_progress)
    return {
        "call": call_summary(result),
        "progress": progress,
        "started": started,
        "ended": time.time(),
    }


async def scenario_timeout_then_echo(c: Client, args: list[str]) -> dict[str, Any]:
    """A call the client gives up on (it sends notifications/cancelled), then another."""
    out: dict[str, Any] = {}
    started = time.time()
    try:
        await c.call_tool("sleep", {"seconds": float(args[0])}, read_timeout_seconds=float(args[1]))
        out["slow"] = {"raised": False}
    except MCPError as e:
        out["slow"] = {"raised": True, "code": e.code, "message": e.message}
    out["slow_seconds"] = time.time() - started
    out["echo"] = call_summary(await c.call_tool("echo", {"message": "after the timeout"}))
    return out


async def scenario_roots(c: Client, args: list[str]) -> dict[str, Any]:
    """server-everything's get-roots-list asks this client for its roots."""
    return {"roots": call_summary(await c.call_tool("get-roots-list", {}))}


async def scenario_info(c: Client, args: list[str]) -> dict[str, Any]:
    return {}


async def scenario_list_and_call(c: Client, args: list[str]) -> dict[str, Any]:
    """tools/list, then each TOOL JSON_ARGS pair in turn."""
    out: dict[str, Any] = {"tools": sorted(t.name for t in (await c.list_tools()).tools)}
    calls = []
    for name, arguments in zip(args[::2], args[1::2], strict=True):
        started = time.time()
        try:
            call: dict[str, Any] = call_summary(await c.call_tool(name, json.loads(arguments)))
        except MCPError as e:
            call = {"error": {"code": e.code, "message": e.message, "data": _jsonable(e.data)}}
        calls.append({"tool": name, **call, "started": started, "ended": time.time()})
    out["calls"] = calls
    return out


async def barrier(directory: str, parties: int) -> float:
    """Say this client is here, then wait (bounded by --timeout) for all parties."""
    started = time.monotonic()
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, str(os.getpid())), "w"):
        pass
    while len(os.listdir(directory)) < parties:
        await anyio.sleep(0.02)
    return time.monotonic() - started


async def record_post(request: httpx2.Request) -> None:
    """One line of seen["posts"] for a JSON-RPC POST (what the client put on the wire)."""
    if request.method != "POST":
        return
    try:
        body = json.loads(request.content)
    except (httpx2.RequestNotRead, ValueError):
        return
    if not isinstance(body, dict):
        return
    params = body.get("params") if isinstance(body.get("params"), dict) else {}
    responses = params.get("inputResponses")
    meta = params.get("_meta") if isinstance(params.get("_meta"), dict) else {}
    seen["posts"].append(
        {
            "method": body.get("method"),
            "name": params.get("name"),
            "version": request.headers.get("mcp-protocol-version"),
            "session": "mcp-session-id" in request.headers,
            "input_responses": sorted(responses) if isinstance(responses, dict) else None,
            "request_state": "requestState" in params,
            "progress_token": meta.get("progressToken"),
        }
    )


SCENARIOS = {
    "example": scenario_example,
    "time": scenario_time,
    "everything": scenario_everything,
    "questions": scenario_questions,
    "progress": scenario_progress,
    "call": scenario_call,
    "timeout_then_echo": scenario_timeout_then_echo,
    "roots": scenario_roots,
    "info": scenario_info,
    "list_and_call": scenario_list_and_call,
}


async def main_async(opts: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "mode": opts.mode,
        "sampling_callback": on_sampling,
        "elicitation_callback": on_elicitation,
        "logging_callback": on_log,
        "list_roots_callback": on_list_roots,
        "message_handler": on_message,
        "read_timeout_seconds": opts.read_timeout,
    }
    result: dict[str, Any] = {"ok": False}
    with anyio.fail_after(opts.timeout):
        try:
            headers = {"Authorization": f"Bearer {opts.bearer}"} if opts.bearer else None
            verify: Any = ssl.create_default_context(cafile=opts.cafile) if opts.cafile else True

            def client_factory(
                headers: dict[str, str] | None = None,
                timeout: httpx2.Timeout | None = None,
                auth: httpx2.Auth | None = None,
            ) -> httpx2.AsyncClient:
                return httpx2.AsyncClient(
                    headers=headers,
                    timeout=timeout or httpx2.Timeout(30.0, read=300.0),
                    auth=auth,
                    verify=verify,
                    event_hooks={"request": [record_post]},
                )

            if opts.transport == "http":
                async with client_factory(headers) as h:
                    transport = streamable_http_client(opts.url, http_client=h)
                    async with Client(transport, **kwargs) as c:
                        result = await run_scenario(c, opts)
            else:
                transport = sse_client(
                    opts.url,
                    headers=headers,
                    timeout=5.0,
                    sse_read_timeout=300.0,
                    httpx_client_factory=client_factory,
                )
                async with Client(transport, **kwargs) as c:
                    result = await run_scenario(c, opts)
        except Exception as e:
            # Keep what the scenario got before the error (e.g. during close).
            result = {
                **result,
                "ok": False,
                "error": error_summary(e),
                "traceback": traceback.format_exc()[-3000:],
            }
    result["seen"] = seen
    return result


async def run_scenario(c: Client, opts: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ok": True,
        "protocol_version": c.protocol_version,
        "server_name": c.server_info.name if c.server_info else None,
        "discover_result": c.session.discover_result is not None,
        "initialize_result": c.session.initialize_result is not None,
    }
    if opts.barrier:
        out["barrier_wait"] = await barrier(opts.barrier, opts.parties)
    out.update(await SCENARIOS[opts.scenario](c, opts.args))
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--transport", choices=["http", "sse"], required=True)
    parser.add_argument("--mode", default="legacy", help='"legacy", "auto" or "2026-07-28"')
    parser.add_argument(
        "--barrier", help="a directory: wait for --parties clients before the scenario"
    )
    parser.add_argument("--parties", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=45.0)
    parser.add_argument("--read-timeout", type=float, default=30.0)
    parser.add_argument("--bearer", help="send Authorization: Bearer with every request")
    parser.add_argument("--cafile", help="trust this CA (PEM) for https URLs")
    parser.add_argument("--prefix", default="", help="put before server-everything's tool names")
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("args", nargs="*")
    opts = parser.parse_args()
    naming["prefix"] = opts.prefix
    try:
        result = anyio.run(main_async, opts)
    except TimeoutError:
        result = {
            "ok": False,
            "error": {"code": None, "message": f"timed out after {opts.timeout}s"},
        }
        result["seen"] = seen
    print(json.dumps(result, default=repr))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
