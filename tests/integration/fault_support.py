"""Helpers for the fault suite: resource probes, raw sockets, asyncio MCP clients.

Resource probes read C{/proc} of the bridge: its resident memory, its open
file descriptors and its descendant processes, so that a test can take a
L{Baseline} and later check that everything settled back to it.

The clients run in the test's own process (C{asyncio.run} inside a
synchronous trial test; trial runs no reactor for those), speak raw
JSON-RPC over C{httpx2} and bound every wait, so that a test never hangs:
L{StreamableClient} (Streamable HTTP, answers as JSON or SSE) and
L{LegacyClient} (HTTP+SSE: one GET stream, answers routed by id).
L{FaultTestMixin} makes calls through the official SDK's client instead, in
a process of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import httpx2

from . import harness as h

PROTOCOL = "2025-11-25"
ACCEPT_BOTH = "application/json, text/event-stream"
FIXTURE = str(h.FIXTURES / "fault_fixture.py")
STDIO_FIXTURE = str(h.FIXTURES / "stdio_fixture.py")
FAST_RESTART = "[servers.{name}.restart]\ninitial_delay = 0.1\nmax_delay = 0.5\ncrash_limit = 3\ncrash_window = 60\n"
PROMPT = 3.0  # seconds: how soon a caller must hear that its child died

# Exceptions that mean "the connection was closed" (not a hang, not an answer).
CLOSED_ERRORS: tuple[type[BaseException], ...] = (
    httpx2.ConnectError,
    httpx2.ReadError,
    httpx2.WriteError,
    httpx2.RemoteProtocolError,
    httpx2.CloseError,
    ConnectionError,
)


def initialize(
    request_id: Any = "init", name: str = "fault-suite", version: str = PROTOCOL
) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "initialize",
        "params": {
            "protocolVersion": version,
            "capabilities": {},
            "clientInfo": {"name": name, "version": "1"},
        },
    }


INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


def tool_call(request_id: Any, tool: str, args: Any, token: Any = None) -> dict[str, Any]:
    params: dict[str, Any] = {"name": tool, "arguments": args}
    if token is not None:
        params["_meta"] = {"progressToken": token}
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}


def text_of(message: Mapping[str, Any]) -> str | None:
    """The first text of a tools/call result, or None for an error."""
    result = message.get("result")
    if not isinstance(result, dict):
        return None
    content = result.get("content") or []
    return content[0].get("text") if content else ""


def url_for(bridge: h.Bridge, name: str, transport: str) -> str:
    return bridge.mcp_url(name) if transport == "http" else bridge.sse_url(name)


class FaultTestMixin:
    bridge: h.Bridge

    def call(
        self, name: str, transport: str, tool: str, args: Any, timeout: float = 60
    ) -> dict[str, Any]:
        return h.run_client(
            "sdk_client.py",
            "--url",
            url_for(self.bridge, name, transport),
            "--transport",
            transport,
            "call",
            tool,
            json.dumps(args),
            timeout=timeout,
        )

    def start_call(self, name: str, transport: str, tool: str, args: Any) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            h.client_argv(
                "sdk_client.py",
                "--url",
                url_for(self.bridge, name, transport),
                "--transport",
                transport,
                "call",
                tool,
                json.dumps(args),
            ),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=h.python_env(),
        )
        self.addCleanup(_reap, proc)
        return proc

    def wait_in_flight(self, name: str, proc: subprocess.Popen[str]) -> None:
        def in_flight() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"the client ended early: {proc.communicate()}")
            return bool(self.bridge.status(name)["in_flight"] == 1)

        h.wait_for(in_flight, 20, f"a request in flight on {name}")

    def finish(self, proc: subprocess.Popen[str], timeout: float = 20) -> dict[str, Any]:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(
                f"the client did not finish within {timeout}s: {out[-2000:]} {err[-2000:]}"
            ) from None
        return h.parse_client_output(
            subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        )


def _reap(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def fixture_server(name: str, *options: str, extra: str = "", fixture: str = FIXTURE) -> str:
    return h.python_server_toml(name, [fixture, *options], extra)


def restart_policy(name: str, **values: float) -> str:
    settings = {"initial_delay": 0.1, "max_delay": 0.5, "crash_limit": 3, "crash_window": 60}
    settings.update(values)
    body = "".join(f"{k} = {v}\n" for k, v in settings.items())
    return f"[servers.{name}.restart]\n{body}"


# /proc probes


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def fd_targets(pid: int) -> list[str]:
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return sorted(targets)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def servers_status(bridge: h.Bridge) -> dict[str, dict[str, Any]]:
    code, body = bridge.get_json("/servers")
    if code != 200:
        raise AssertionError(f"GET /servers gave {code}: {body}")
    return {s["name"]: s for s in body["servers"]}


def total_sessions(bridge: h.Bridge) -> int:
    return sum(s["sessions"] for s in servers_status(bridge).values())


def health(bridge: h.Bridge) -> tuple[int, Any]:
    code, _, body = h.http("GET", bridge.url("/health"), timeout=5)
    return code, json.loads(body)


@attrs.define
class Baseline:
    """What the bridge held at a quiet moment."""

    rss_kib: int
    fds: int
    fd_targets: list[str]
    descendants: set[int]

    @classmethod
    def take(cls, bridge: h.Bridge, settle: float = 0.3) -> Baseline:
        """Sampled over C{settle} seconds: the fewest fds seen (the connection of a
        status request that just ended may still be open for a moment)."""
        deadline = time.monotonic() + settle
        fds = fd_targets(bridge.pid)
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = fd_targets(bridge.pid)
            if len(now) < len(fds):
                fds = now
        return cls(
            rss_kib=rss_kib(bridge.pid),
            fds=len(fds),
            fd_targets=fds,
            descendants=set(bridge.children()),
        )

    def check(
        self,
        test: Any,
        bridge: h.Bridge,
        rss_bound_mib: float,
        fd_slack: int = 2,
        descendants: set[int] | None = None,
        timeout: float = 15.0,
    ) -> dict[str, Any]:
        """The bridge answers, and fds, processes and memory came back within bounds."""
        test.assertIsNone(bridge.proc.poll(), "the bridge exited")
        code, body = health(bridge)
        test.assertEqual(code, 200, f"/health: {body}")

        def fds_settled() -> bool:
            return fd_count(bridge.pid) <= self.fds + fd_slack

        try:
            h.wait_for(fds_settled, timeout, "the bridge's fds to come back to baseline")
        except AssertionError:
            raise AssertionError(
                f"fd leak: {fd_count(bridge.pid)} open, baseline {self.fds} (+{fd_slack})\n"
                f"now:    {fd_targets(bridge.pid)}\nbefore: {self.fd_targets}"
            ) from None
        wanted = self.descendants if descendants is None else descendants
        try:
            h.wait_for(
                lambda: set(bridge.children()) == wanted, timeout, "the descendants to settle"
            )
        except AssertionError:
            raise AssertionError(
                f"the bridge's descendants are {sorted(bridge.children())}, expected {sorted(wanted)}"
            ) from None
        bridge.assert_no_zombies()
        grown = (rss_kib(bridge.pid) - self.rss_kib) / 1024
        test.assertLess(
            grown,
            rss_bound_mib,
            f"the bridge's RSS grew by {grown:.1f} MiB (bound {rss_bound_mib})",
        )
        return {"rss_growth_mib": round(grown, 1), "fds": fd_count(bridge.pid)}


def terminate(bridge: h.Bridge, budget: float) -> tuple[int, float, dict[int, str]]:
    """SIGTERM the bridge; its exit code, how long it took, and what was left behind.

    Takes over from L{h.Bridge.stop} (marks the bridge stopped): it checks the
    exit code too, which C{stop} does not. Whatever is left over is killed.
    """
    children = bridge.children()
    bridge.stopped = True
    started = time.monotonic()
    bridge.proc.send_signal(signal.SIGTERM)
    try:
        code = bridge.proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        os.killpg(bridge.proc.pid, signal.SIGKILL)
        bridge.proc.wait(timeout=5)
        code = -999
    seconds = time.monotonic() - started
    # Children killed with their group are reaped by init shortly after.
    deadline = time.monotonic() + h.ORPHAN_REAP_GRACE
    left = bridge._leftovers(children)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = bridge._leftovers(children)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    bridge._log_file.close()
    return code, seconds, left


def children_gone_at(pids: Mapping[int, str], deadline: float) -> dict[int, str]:
    """Poll until every one of C{pids} is gone (or a zombie of init) or the deadline."""
    while True:
        left = {}
        for pid, start in pids.items():
            stat = h._stat(pid)
            if stat is not None and stat[2] == start and stat[0] != "Z":
                left[pid] = stat[0]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.02)


# Raw sockets


def connect(port: int, timeout: float = 5.0, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    return sock


def http_request(
    method: str,
    path: str,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    host: str = "127.0.0.1",
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if (body or method == "POST") and not any(k.lower() == "content-length" for k in headers or {}):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def read_until(sock: socket.socket, marker: bytes, timeout: float, limit: int = 1 << 20) -> bytes:
    """Read until C{marker} has arrived (or EOF/limit); raise on timeout."""
    deadline = time.monotonic() + timeout
    data = b""
    while marker not in data and len(data) < limit:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def read_to_end(sock: socket.socket, timeout: float) -> tuple[bytes, str]:
    """Read until the peer closes: (data, "eof" | "reset" | "timeout")."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return data, "timeout"
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(1 << 20)
        except TimeoutError:
            return data, "timeout"
        except ConnectionResetError:
            return data, "reset"
        if not chunk:
            return data, "eof"
        data += chunk


def drain_count(sock: socket.socket, timeout: float) -> tuple[int, str]:
    """Read and discard until the peer closes: (bytes read, how it ended)."""
    deadline = time.monotonic() + timeout
    total = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return total, "timeout"
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(1 << 20)
        except TimeoutError:
            return total, "timeout"
        except ConnectionResetError:
            return total, "reset"
        if not chunk:
            return total, "eof"
        total += len(chunk)


def decode_chunked(body: bytes) -> bytes | None:
    """The payload of a complete chunked body, or None if it is not complete."""
    out = b""
    rest = body
    while True:
        line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            return None
        try:
            size = int(line.split(b";")[0], 16)
        except ValueError:
            return None
        if size == 0:
            return out
        if len(rest) < size + 2:
            return None
        out += rest[:size]
        rest = rest[size + 2 :]


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and (de-chunked when complete) body of one raw HTTP response."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError(f"incomplete response head: {data[:300]!r}")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP status line: {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            raise ValueError(f"bad header line {line!r}")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        decoded = decode_chunked(body)
        if decoded is not None:
            body = decoded
    elif "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return int(parts[1]), headers, body


def sse_events(text: str) -> list[tuple[str, str]]:
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
        if data and any(d.strip() for d in data):
            events.append((name, "\n".join(data)))
    return events


# asyncio clients


class Closed(Exception):
    """The bridge closed the connection (a clean close, not an answer)."""


class HTTPStatus(Exception):
    """The bridge answered a POST with an HTTP error status."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status
        self.body = body


def new_http(connections: int = 200) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(
        timeout=httpx2.Timeout(30.0),
        limits=httpx2.Limits(max_connections=connections, max_keepalive_connections=0),
    )


def _messages(response: httpx2.Response) -> list[dict[str, Any]]:
    kind = response.headers.get("content-type", "")
    if kind.startswith("text/event-stream"):
        return [json.loads(data) for _, data in sse_events(response.text)]
    if not response.content.strip():
        return []
    parsed = json.loads(response.content)
    return parsed if isinstance(parsed, list) else [parsed]


class StreamableClient:
    """One Streamable HTTP session; every request is its own POST."""

    def __init__(self, http: httpx2.AsyncClient, url: str, sse: bool = True) -> None:
        self.http = http
        self.url = url
        self.sse = sse
        self.session: str | None = None
        self.headers: dict[str, str] = {}
        self.strays: list[dict[str, Any]] = []

    async def open(self, timeout: float = 15.0) -> StreamableClient:
        r = await asyncio.wait_for(
            self.http.post(
                self.url,
                content=json.dumps(initialize()),
                headers={"Accept": "application/json", "Content-Type": "application/json"},
            ),
            timeout,
        )
        if r.status_code != 200 or "mcp-session-id" not in r.headers:
            raise AssertionError(f"initialize gave {r.status_code}: {r.text[:500]}")
        self.session = r.headers["mcp-session-id"]
        self.headers = {
            "Accept": ACCEPT_BOTH if self.sse else "application/json",
            "Content-Type": "application/json",
            "Mcp-Session-Id": self.session,
            "MCP-Protocol-Version": PROTOCOL,
        }
        await self.notify(INITIALIZED["method"])
        return self

    async def notify(self, method: str, params: Any = None, timeout: float = 10.0) -> None:
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        r = await asyncio.wait_for(
            self.http.post(self.url, content=json.dumps(message), headers=self.headers), timeout
        )
        if r.status_code != 202:
            raise AssertionError(f"notification {method} gave {r.status_code}: {r.text[:300]}")

    async def request(self, message: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
        try:
            r = await asyncio.wait_for(
                self.http.post(self.url, content=json.dumps(message), headers=self.headers),
                timeout,
            )
        except CLOSED_ERRORS as e:
            raise Closed(repr(e)) from None
        if r.status_code != 200:
            raise HTTPStatus(r.status_code, r.text)
        try:
            return _messages(r)
        except ValueError as e:
            # A stream cut short by the bridge going away: a clean close.
            raise Closed(f"incomplete answer: {e}") from None

    async def call(self, request_id: Any, tool: str, args: Any, timeout: float) -> dict[str, Any]:
        """The response to one tools/call (anything else in the reply is checked)."""
        messages = await self.request(tool_call(request_id, tool, args), timeout)
        responses = [m for m in messages if "method" not in m]
        mine = [m for m in responses if m.get("id") == request_id]
        self.strays += [m for m in responses if m.get("id") != request_id]
        if len(mine) != 1:
            raise AssertionError(f"expected one answer for id {request_id!r}, got {messages!r}")
        return mine[0]

    async def delete(self, timeout: float = 10.0) -> int:
        r = await asyncio.wait_for(self.http.delete(self.url, headers=self.headers), timeout)
        return r.status_code


class LegacyClient:
    """One HTTP+SSE session: a GET stream, POSTs answered 202, answers by id."""

    def __init__(self, http: httpx2.AsyncClient, base: str, name: str) -> None:
        self.http = http
        self.base = base
        self.name = name
        self.post_url = ""
        self.waiters: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self.strays: list[dict[str, Any]] = []
        self.notifications = 0
        self.closed = False
        self._endpoint: asyncio.Future[str] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stream: Any = None

    async def open(self, timeout: float = 15.0) -> LegacyClient:
        loop = asyncio.get_running_loop()
        self._endpoint = loop.create_future()
        self._stream = self.http.stream(
            "GET", f"{self.base}/servers/{self.name}/sse", headers={"Accept": "text/event-stream"}
        )
        response = await asyncio.wait_for(self._stream.__aenter__(), timeout)
        if response.status_code != 200:
            raise AssertionError(f"GET /sse gave {response.status_code}")
        self._task = asyncio.create_task(self._read(response))
        self.post_url = self.base + await asyncio.wait_for(self._endpoint, timeout)
        answer = await self._request(initialize("init"), timeout)
        if "result" not in answer:
            raise AssertionError(f"initialize failed: {answer}")
        await self.notify(INITIALIZED["method"])
        return self

    async def _read(self, response: httpx2.Response) -> None:
        buffer = ""
        try:
            async for chunk in response.aiter_text():
                buffer += chunk.replace("\r\n", "\n")
                while "\n\n" in buffer:
                    block, buffer = buffer.split("\n\n", 1)
                    for name, data in sse_events(block + "\n\n"):
                        self._event(name, data)
        except CLOSED_ERRORS:
            pass
        finally:
            self.closed = True
            for future in self.waiters.values():
                if not future.done():
                    future.set_exception(Closed("the SSE stream closed"))
            self.waiters.clear()

    def _event(self, name: str, data: str) -> None:
        if name == "endpoint":
            assert self._endpoint is not None
            if not self._endpoint.done():
                self._endpoint.set_result(data)
            return
        message = json.loads(data)
        if "method" in message:
            self.notifications += 1
            return
        future = self.waiters.pop(message.get("id"), None)
        if future is None or future.done():
            self.strays.append(message)
        else:
            future.set_result(message)

    async def notify(self, method: str, params: Any = None, timeout: float = 10.0) -> None:
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        await self._post(message, timeout)

    async def _post(self, message: dict[str, Any], timeout: float) -> None:
        try:
            r = await asyncio.wait_for(
                self.http.post(
                    self.post_url,
                    content=json.dumps(message),
                    headers={"Content-Type": "application/json"},
                ),
                timeout,
            )
        except CLOSED_ERRORS as e:
            raise Closed(repr(e)) from None
        if r.status_code != 202:
            raise HTTPStatus(r.status_code, r.text)

    async def _request(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        if self.closed:
            raise Closed("the SSE stream is closed")
        request_id = message["id"]
        if request_id in self.waiters:
            raise AssertionError(f"id {request_id!r} already waiting")
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiters[request_id] = future
        try:
            await self._post(message, timeout)
            return await asyncio.wait_for(future, timeout)
        finally:
            if self.waiters.get(request_id) is future:
                del self.waiters[request_id]
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()  # retrieved, even when nobody waited for it

    async def call(self, request_id: Any, tool: str, args: Any, timeout: float) -> dict[str, Any]:
        return await self._request(tool_call(request_id, tool, args), timeout)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except BaseException:
                pass
        if self._stream is not None:
            try:
                await asyncio.wait_for(self._stream.__aexit__(None, None, None), 5)
            except BaseException:
                pass
