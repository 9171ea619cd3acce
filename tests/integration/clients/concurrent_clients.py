"""Many raw MCP clients at once on one server, all using the same JSON-RPC ids.

    python concurrent_clients.py --base http://127.0.0.1:PORT --server NAME \
        --clients 20 --calls 10 --tool echo|calculate --transport http|sse|mixed \
        [--bearer TOKEN]...

Every client initializes with the id C{"init"}, then sends C{--calls}
tools/call requests at once with the ids 1..N (the same ids in every client)
and arguments unique to the client and call. Each answer is checked: its id
must be one the client sent and not yet answered, and its content must be the
one for that client's own arguments. Prints one JSON line: per client what
was wrong (foreign answers, missing answers, duplicates) and the totals.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import httpx2

PROTOCOL = "2025-11-25"
ACCEPT = "application/json, text/event-stream"


def arguments(tool: str, client: int, call: int) -> tuple[dict[str, Any], str]:
    """The arguments of one call, and the text its answer must carry."""
    if tool == "calculate":
        value = client * 1000 + call
        return {"expression": f"{client} * 1000 + {call}"}, str(value)
    if tool == "echo":
        message = f"client-{client}-call-{call}"
        return {"message": message}, f"Echo: {message}"
    if tool == "trigger-long-running-operation":
        steps = progress_steps(client, call)
        return (
            {"duration": 0.5, "steps": steps},
            f"Long running operation completed. Duration: 0.5 seconds, Steps: {steps}.",
        )
    raise SystemExit(f"unknown tool {tool}")


def progress_steps(client: int, call: int) -> int:
    """How many progress notifications a long-running call must bring."""
    return 2 + (client + call) % 4


def sse_events(text: str) -> list[tuple[str, str]]:
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
        if data:
            events.append((name, "\n".join(data)))
    return events


def initialize(request_id: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "initialize",
        "params": {
            "protocolVersion": PROTOCOL,
            "capabilities": {},
            "clientInfo": {"name": "concurrent-test", "version": "1"},
        },
    }


def call(request_id: int, tool: str, args: dict[str, Any]) -> dict[str, Any]:
    # The progress token is the request id: the same in every client too.
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": tool, "arguments": args, "_meta": {"progressToken": request_id}},
    }


class Checker:
    def __init__(self, client: int, tool: str, calls: int) -> None:
        self.client = client
        self.tool = tool
        self.expected = {k: arguments(tool, client, k)[1] for k in range(1, calls + 1)}
        self.answered: dict[int, str] = {}
        self.progress: dict[Any, list[Any]] = {}
        self.problems: list[str] = []

    def take(self, message: dict[str, Any]) -> None:
        if message.get("method") == "notifications/progress":
            params = message.get("params", {})
            token = params.get("progressToken")
            if token not in self.expected:
                self.problems.append(f"progress for a token it never sent: {message!r}"[:300])
            elif token in self.answered:
                self.problems.append(f"progress after the answer: {message!r}"[:300])
            else:
                self.progress.setdefault(token, []).append(
                    [params.get("progress"), params.get("total")]
                )
            return
        if "method" in message:
            return  # other notifications (e.g. list_changed) are fine
        request_id = message.get("id")
        if request_id == "init":
            return
        if request_id not in self.expected:
            self.problems.append(f"answer with an id it never sent: {message!r}"[:300])
            return
        if request_id in self.answered:
            self.problems.append(f"second answer for id {request_id}: {message!r}"[:300])
            return
        if "error" in message:
            text = "ERROR " + json.dumps(message["error"])
        else:
            content = message.get("result", {}).get("content", [])
            text = content[0].get("text", "") if content else ""
        self.answered[request_id] = text
        if text != self.expected[request_id]:
            self.problems.append(
                f"id {request_id}: got {text!r}, expected {self.expected[request_id]!r}"
            )

    @property
    def done(self) -> bool:
        return len(self.answered) == len(self.expected)

    def check_progress(self) -> None:
        if self.tool != "trigger-long-running-operation":
            if self.progress:
                self.problems.append(f"unexpected progress: {self.progress!r}"[:300])
            return
        for k in self.expected:
            steps = progress_steps(self.client, k)
            wanted = [[i, steps] for i in range(1, steps + 1)]
            if self.progress.get(k) != wanted:
                self.problems.append(
                    f"progress for id {k}: got {self.progress.get(k)}, expected {wanted}"
                )

    def report(self, transport: str) -> dict[str, Any]:
        self.check_progress()
        missing = sorted(set(self.expected) - set(self.answered))
        return {
            "client": self.client,
            "transport": transport,
            "answered": len(self.answered),
            "missing": missing,
            "problems": self.problems,
        }


async def http_client(
    h: httpx2.AsyncClient, url: str, client: int, tool: str, calls: int, auth: dict[str, str]
) -> dict[str, Any]:
    checker = Checker(client, tool, calls)
    headers = {"Accept": ACCEPT, "Content-Type": "application/json", **auth}
    r = await h.post(url, json=initialize("init"), headers=headers)
    r.raise_for_status()
    session = r.headers["mcp-session-id"]
    headers = {**headers, "Mcp-Session-Id": session, "MCP-Protocol-Version": PROTOCOL}
    r = await h.post(
        url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers
    )
    assert r.status_code == 202, r.status_code

    async def one(k: int) -> None:
        args, _ = arguments(tool, client, k)
        response = await h.post(url, json=call(k, tool, args), headers=headers)
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            for _, data in sse_events(response.text):
                if data.strip():
                    checker.take(json.loads(data))
        else:
            body = response.json()
            for message in body if isinstance(body, list) else [body]:
                checker.take(message)

    await asyncio.gather(*(one(k) for k in range(1, calls + 1)))
    await h.delete(url, headers=headers)
    return checker.report("http")


async def sse_client(
    h: httpx2.AsyncClient,
    base: str,
    name: str,
    client: int,
    tool: str,
    calls: int,
    auth: dict[str, str],
) -> dict[str, Any]:
    checker = Checker(client, tool, calls)
    queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    async with h.stream(
        "GET", f"{base}/servers/{name}/sse", headers={"Accept": "text/event-stream", **auth}
    ) as r:
        r.raise_for_status()

        async def reader() -> None:
            buffer = ""
            async for chunk in r.aiter_text():
                buffer += chunk.replace("\r\n", "\n")
                while "\n\n" in buffer:
                    block, buffer = buffer.split("\n\n", 1)
                    for event in sse_events(block + "\n\n"):
                        await queue.put(event)

        task = asyncio.create_task(reader())
        try:
            name_, endpoint = await queue.get()
            assert name_ == "endpoint", (name_, endpoint)
            post_url = base + endpoint
            headers = {"Content-Type": "application/json", **auth}
            await h.post(post_url, json=initialize("init"), headers=headers)
            while True:
                _, data = await queue.get()
                if json.loads(data).get("id") == "init":
                    break
            await h.post(
                post_url,
                json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                headers=headers,
            )
            posts = [
                h.post(post_url, json=call(k, tool, arguments(tool, client, k)[0]), headers=headers)
                for k in range(1, calls + 1)
            ]
            for response in await asyncio.gather(*posts):
                assert response.status_code == 202, response.status_code
            while not checker.done:
                _, data = await queue.get()
                checker.take(json.loads(data))
            # Anything more that arrives soon after is a stray answer.
            try:
                while True:
                    _, data = await asyncio.wait_for(queue.get(), 0.3)
                    checker.take(json.loads(data))
            except TimeoutError:
                pass
        finally:
            task.cancel()
    return checker.report("sse")


async def main_async(opts: argparse.Namespace) -> dict[str, Any]:
    url = f"{opts.base}/servers/{opts.server}/mcp"
    limits = httpx2.Limits(max_connections=1000, max_keepalive_connections=100)
    started = time.monotonic()
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(30.0), limits=limits) as h:
        jobs = []
        for c in range(1, opts.clients + 1):
            transport = opts.transport
            if transport == "mixed":
                transport = "http" if c % 2 else "sse"
            auth = {}
            if opts.bearer:
                auth = {"Authorization": f"Bearer {opts.bearer[(c - 1) % len(opts.bearer)]}"}
            if transport == "http":
                jobs.append(http_client(h, url, c, opts.tool, opts.calls, auth))
            else:
                jobs.append(sse_client(h, opts.base, opts.server, c, opts.tool, opts.calls, auth))
        outcomes = await asyncio.wait_for(
            asyncio.gather(*jobs, return_exceptions=True), opts.timeout
        )
    reports = []
    for c, outcome in enumerate(outcomes, 1):
        if isinstance(outcome, BaseException):
            reports.append({"client": c, "exception": repr(outcome), "missing": [], "problems": []})
        else:
            reports.append(outcome)
    return {
        "seconds": time.monotonic() - started,
        "clients": reports,
        "answers": sum(r.get("answered", 0) for r in reports),
        "bad": [r for r in reports if r.get("exception") or r["missing"] or r["problems"]],
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--server", required=True)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--tool", default="echo")
    parser.add_argument("--transport", default="http", choices=["http", "sse", "mixed"])
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument(
        "--bearer",
        action="append",
        default=[],
        help="a token to present; given several times, client N presents the Nth in turn",
    )
    opts = parser.parse_args()
    try:
        result = asyncio.run(main_async(opts))
    except TimeoutError:
        result = {"error": f"timed out after {opts.timeout}s"}
    print(json.dumps(result))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
