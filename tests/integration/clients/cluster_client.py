"""Many sessions of the official MCP Python SDK (mcp 2.x) at once, in one
process; driven through stdin, reporting JSON lines on stdout.

    python cluster_client.py --base URL --sessions KIND=N[,KIND=N...]
                             [--server NAME] [--calls N] [--pause S] [--bearer TOKEN]

KIND is how a session speaks: "http" (Streamable HTTP, the initialize
handshake: a session), "modern" (Streamable HTTP, 2026-07-28: no session) or
"sse" (HTTP+SSE: a session). Every call is the example server's hash_text of a
text naming the session and the call, and its answer must be that text's
SHA-256: an answer meant for another call or another session is counted in
"wrong", never as a success.

Every session connects and makes --calls calls; then the script prints
{"event": "ready", ...} and reads commands, one per line:

  calls   every session makes --calls more calls; prints {"event": "called", ...}
  loop    every session calls again and again (--pause between calls) until "stop";
          a session whose call fails records the error, connects again (a new
          SDK Client, so a new session) and goes on
  stop    ends the loop once every session's call in progress has ended;
          prints {"event": "stopped", ...}
  close   (or the end of stdin) closes every session, prints {"event": "closed", ...}

Each report holds every session: its kind, the session ids it used in order
(the Mcp-Session-Id or the legacy session_id its requests carried; none for
"modern"), its good calls per session id, "wrong" answers and "errors" (each
with the session id, when the call started and ended, the JSON-RPC code and
message). A failure to connect before "ready" ends the script with
{"event": "failed", ...}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import ssl
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import httpx2
import mcp_types as types
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

E = TypeVar("E", bound=BaseException)

KINDS = {"http": "legacy", "modern": "2026-07-28", "sse": "legacy"}


class Session:
    """One simulated user: its calls, and the sessions it went through."""

    def __init__(self, index: int, kind: str) -> None:
        self.index = index
        self.kind = kind
        self.ids: list[str] = []
        self.good: dict[str, int] = {}
        self.wrong: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.connects = 0
        self.calls = 0
        self.round = 0
        # Gave up (a failure outside the loop): takes part in no command again.
        self.dead = False

    @property
    def current(self) -> str:
        return self.ids[-1] if self.ids else "-"

    async def saw_request(self, request: httpx2.Request) -> None:
        """The session id a POST carries (header or legacy query)."""
        if request.method != "POST":
            return
        sent = request.headers.get("mcp-session-id")
        if sent is None:
            query = urllib.parse.parse_qs(request.url.query.decode())
            sent = (query.get("session_id") or query.get("sessionId") or [None])[0]
        if sent is not None and (not self.ids or self.ids[-1] != sent):
            self.ids.append(sent)

    def report(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "kind": self.kind,
            "ids": self.ids,
            "good": self.good,
            "wrong": self.wrong,
            "errors": self.errors,
            "connects": self.connects,
        }


def find(error: BaseException, kind: type[E]) -> E | None:
    """The first exception of C{kind} in (possibly nested) exception groups."""
    stack = [error]
    while stack:
        e = stack.pop()
        if isinstance(e, kind):
            return e
        if isinstance(e, BaseExceptionGroup):
            stack.extend(e.exceptions)
    return None


def error_of(error: BaseException) -> dict[str, Any]:
    """The MCPError inside (possibly nested) exception groups, else the
    innermost exceptions' reprs."""
    found = find(error, MCPError)
    if found is not None:
        return {"code": found.code, "message": found.message}
    stack, leaves = [error], []
    while stack:
        e = stack.pop()
        if isinstance(e, BaseExceptionGroup):
            stack.extend(e.exceptions)
        else:
            leaves.append(e)
    return {"code": None, "message": "; ".join(repr(e)[:300] for e in leaves)}


class CallFailed(Exception):
    """A call that failed, with what the report says of it."""


class Driver:
    """Runs every session, each in its own task, and the commands on stdin."""

    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.sessions: list[Session] = []
        for spec in opts.sessions.split(","):
            kind, _, count = spec.partition("=")
            if kind not in KINDS:
                raise SystemExit(f"unknown kind {kind!r} (choose from {', '.join(KINDS)})")
            for _ in range(int(count)):
                self.sessions.append(Session(len(self.sessions), kind))
        self.command = "connect"
        self.generation = 0
        self.changed = anyio.Event()
        self.busy = 0
        self.settled = anyio.Event()
        self.verify: Any = ssl.create_default_context(cafile=opts.cafile) if opts.cafile else True

    def set_command(self, command: str) -> None:
        self.command = command
        self.generation += 1
        self.settled = anyio.Event()
        self.busy = sum(not s.dead for s in self.sessions)
        if self.busy == 0:
            self.settled.set()
        self.changed.set()
        self.changed = anyio.Event()

    def settle(self) -> None:
        """A session has done what the current command asks."""
        self.busy -= 1
        if self.busy == 0:
            self.settled.set()

    def http_client(
        self, session: Session, headers: dict[str, str] | None = None, **kw: Any
    ) -> httpx2.AsyncClient:
        all_headers = dict(headers or {})
        if self.opts.bearer:
            all_headers["Authorization"] = f"Bearer {self.opts.bearer}"
        return httpx2.AsyncClient(
            headers=all_headers,
            timeout=kw.get("timeout") or httpx2.Timeout(30.0, read=300.0),
            auth=kw.get("auth"),
            verify=self.verify,
            event_hooks={"request": [session.saw_request]},
        )

    @asynccontextmanager
    async def connect(self, session: Session) -> AsyncIterator[Client]:
        base = self.opts.base.rstrip("/") + f"/servers/{self.opts.server}"
        mode = KINDS[session.kind]
        session.connects += 1
        if session.kind == "sse":

            def factory(
                headers: Any = None, timeout: Any = None, auth: Any = None
            ) -> httpx2.AsyncClient:
                return self.http_client(session, headers, timeout=timeout, auth=auth)

            transport = sse_client(
                base + "/sse", timeout=5.0, sse_read_timeout=300.0, httpx_client_factory=factory
            )
            async with Client(transport, mode=mode, read_timeout_seconds=15) as client:
                yield client
        else:
            async with self.http_client(session) as h:
                transport = streamable_http_client(base + "/mcp", http_client=h)
                async with Client(transport, mode=mode, read_timeout_seconds=15) as client:
                    yield client

    async def call(self, client: Client, session: Session) -> None:
        """One checked call; an error is raised (the caller records it)."""
        session.calls += 1
        text = f"session {session.index} call {session.calls} {time.time_ns()}"
        expected = hashlib.sha256(text.encode()).hexdigest()
        used = session.current
        started = time.time()
        try:
            result = await client.call_tool("hash_text", {"text": text, "algorithm": "sha256"})
        except Exception as e:
            raise CallFailed(
                {
                    "session": session.current,
                    "started": started,
                    "ended": time.time(),
                    **error_of(e),
                }
            ) from e
        said = "".join(c.text for c in result.content if isinstance(c, types.TextContent))
        if result.is_error or said != expected:
            session.wrong.append({"session": used, "said": said[:200], "expected": expected})
        else:
            key = session.current
            session.good[key] = session.good.get(key, 0) + 1

    async def calls(self, client: Client, session: Session) -> None:
        for _ in range(self.opts.calls):
            await self.call(client, session)

    async def run_session(self, session: Session, ready: Any) -> None:
        first = True
        while True:
            try:
                async with self.connect(session) as client:
                    if first:
                        await self.calls(client, session)
                        first = False
                        ready()
                    if await self.serve(client, session):
                        return
            except Exception as e:
                failed = find(e, CallFailed)
                failure = (
                    failed.args[0]
                    if failed is not None
                    else {
                        "session": session.current,
                        "started": time.time(),
                        "ended": time.time(),
                        **error_of(e),
                    }
                )
                session.errors.append(failure)
                if first or self.command != "loop":
                    session.dead = True
                    if first:
                        ready(failed=True)
                    elif session.round < self.generation:
                        session.round = self.generation
                        self.settle()
                    return
                await anyio.sleep(0.05)

    async def serve(self, client: Client, session: Session) -> bool:
        """Follow the commands; True once told to close."""
        while True:
            command, generation = self.command, self.generation
            if command == "close":
                return True
            if command == "calls" and session.round < generation:
                await self.calls(client, session)
                session.round = generation
                self.settle()
                continue
            if command == "loop":
                await self.call(client, session)
                await anyio.sleep(self.opts.pause)
                continue
            if command == "idle" and session.round < generation:
                session.round = generation
                self.settle()
                continue
            await self.changed.wait()

    def emit(self, event: str, **extra: Any) -> None:
        print(
            json.dumps({"event": event, **extra, "sessions": [s.report() for s in self.sessions]}),
            flush=True,
        )

    async def main(self) -> None:
        waiting = {"count": len(self.sessions), "failed": False}
        all_ready = anyio.Event()

        def ready(failed: bool = False) -> None:
            waiting["count"] -= 1
            waiting["failed"] |= failed
            if waiting["count"] == 0:
                all_ready.set()

        async with anyio.create_task_group() as tg:
            for session in self.sessions:
                tg.start_soon(self.run_session, session, ready)
            await all_ready.wait()
            if waiting["failed"]:
                self.emit("failed")
                self.set_command("close")
                tg.cancel_scope.cancel()
                return
            self.emit("ready")
            while True:
                line = await anyio.to_thread.run_sync(sys.stdin.readline)
                word = line.strip() or "close"
                if word == "calls":
                    self.set_command("calls")
                    await self.settled.wait()
                    self.emit("called")
                elif word == "loop":
                    self.set_command("loop")
                    self.emit("looping", at=time.time())
                elif word == "stop":
                    self.set_command("idle")
                    await self.settled.wait()
                    self.emit("stopped", at=time.time())
                else:
                    self.set_command("close")
                    break
        self.emit("closed")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True, help="the balancer's (or a node's) base URL")
    parser.add_argument("--server", default="example")
    parser.add_argument("--sessions", required=True, help="KIND=N,...: http, modern, sse")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--pause", type=float, default=0.02, help="seconds between loop calls")
    parser.add_argument("--bearer", help="send Authorization: Bearer with every request")
    parser.add_argument("--cafile", help="trust this CA (PEM) for https URLs")
    opts = parser.parse_args()
    anyio.run(Driver(opts).main)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
