#!/usr/bin/env python3
"""The benchmark's load driver: a raw asyncio HTTP/1.1 + SSE MCP client.

Runs one measurement and prints one JSON object on stdout. Modes:

  load     S sessions x K requests in flight each, tools/call echo (or tools/list), for a window
  once     one fresh session, N requests one after another, each timed (the first meets what
           the bridge has not cached yet); --since T: also the time from T to the first answer
  large    1 MiB / 16 MiB results (blob) and requests (echo, digest only), checked
  notify   progress notifications reach the caller only
  streams  open N idle SSE streams, report, hold until a line on stdin, report again
  direct   the child's own stdio rate (no bridge): sequential and K in flight
  stdio    as load, but the driver writes to a child of its own (no bridge): K in flight

Transports: streamable (Streamable HTTP), sse (HTTP+SSE), websocket (the mcp subprotocol,
one session per socket; --url ws://.../ws), rest (POST URL/tools/TOOL with the arguments,
one stateless call each; --url http://.../servers/NAME). --tokens gives the sessions bearer
tokens in turn (session i the i-th, modulo their number).

Every response is checked: the id must be one this session has in flight, and
the echoed text (which names the session and the request) must be the one that
session sent. A response that carries another session's text is counted in
`wrong_client`; one for no request in flight in `foreign` (another session's) or
`duplicates` (this session's, again); one never received in `lost`. A tools/list
answer must hold --expect-tools tools (else it counts in `bad_lists`).

The driver keeps one keep-alive connection per request slot (so a session with
K requests in flight has K connections; an HTTP+SSE session also holds its
GET stream; a WebSocket session has its one socket). It uses uvloop when installed. Its own CPU use over the window is
reported (getrusage) next to the bridge's (from /proc/PID/stat).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import resource
import shlex
import socket
import sys
import time
import urllib.parse

try:
    import orjson

    loads = orjson.loads
    dumps = orjson.dumps
except ImportError:  # pragma: no cover
    import json

    loads = json.loads

    def dumps(obj: object) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()


try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
ACCEPT_BOTH = b"application/json, text/event-stream"
STREAMABLE_VERSION = "2025-06-18"
SSE_VERSION = "2024-11-05"


# --------------------------------------------------------------------------- /proc


def proc_cpu(pid: int) -> float | None:
    """utime + stime of one process, seconds (its own, not its reaped children's)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def machine_busy() -> tuple[int, int]:
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


def all_cpu() -> dict[int, float]:
    """utime+stime of every process on the machine (to see who else is using the CPU)."""
    out: dict[int, float] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2 :].split()
        if fields[1] == b"2" or name == "2":  # kernel threads (loopback softirq work): not "others"
            continue
        out[int(name)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


class ProcSnapshot:
    """CPU of the bridge pid, of its descendants, of this driver, of others and of the machine;
    and of each of the --also-pids (another node, a balancer) and its descendants."""

    def __init__(self, pid: int | None, also: list[int] | None = None) -> None:
        self.also: dict[int, tuple[float, dict[int, float]]] = {}
        for other in also or []:
            kids = {k: c for k in descendants(other) if (c := proc_cpu(k)) is not None}
            self.also[other] = (proc_cpu(other) or 0.0, kids)
        self.everyone = all_cpu()
        self.t = time.monotonic()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.driver = ru.ru_utime + ru.ru_stime
        self.busy, self.total = machine_busy()
        self.pid = pid
        self.bridge = proc_cpu(pid) if pid else None
        self.kids: dict[int, float] = {}
        if pid:
            for k in descendants(pid):
                c = proc_cpu(k)
                if c is not None:
                    self.kids[k] = c

    def delta(self, before: ProcSnapshot) -> dict:
        wall = self.t - before.t
        out = {
            "wall_s": wall,
            "driver_cpu_s": self.driver - before.driver,
            "driver_core_share": (self.driver - before.driver) / wall if wall else None,
            "machine_busy_share": (self.busy - before.busy) / max(1, self.total - before.total),
        }
        if self.bridge is not None and before.bridge is not None:
            out["bridge_cpu_s"] = self.bridge - before.bridge
            # children alive at the end; those born during the window count from 0
            out["children_cpu_s"] = sum(c - before.kids.get(k, 0.0) for k, c in self.kids.items())
        if self.also:
            # pid -> [its own CPU s, its descendants' CPU s] over the window
            out["also_cpu_s"] = {
                str(p): [cpu - before.also.get(p, (0.0, {}))[0],
                         sum(c - before.also.get(p, (0.0, {}))[1].get(k, 0.0)
                             for k, c in kids.items())]
                for p, (cpu, kids) in self.also.items()
            }
        # Processes that are none of ours (another job on the machine) over the window.
        ours = {os.getpid(), *self.kids, *before.kids}
        for p, (_, kids) in (*self.also.items(), *before.also.items()):
            ours.update((p, *kids))
        if self.bridge is not None:
            ours.add(self.pid)
        other = 0.0
        for k, c in self.everyone.items():
            if k not in ours:  # (a process born during the window counts from 0)
                other += c - before.everyone.get(k, 0.0)
        out["other_processes_cores"] = other / wall if wall else None
        return out


class RssSampler:
    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.bridge_max = 0
        self.children_max = 0
        self.children_n = 0

    def sample(self) -> None:
        if not self.pid:
            return
        r = rss_kib(self.pid) or 0
        kids = descendants(self.pid)
        c = sum(rss_kib(k) or 0 for k in kids)
        self.bridge_max = max(self.bridge_max, r)
        self.children_max = max(self.children_max, c)
        self.children_n = max(self.children_n, len(kids))


# --------------------------------------------------------------------------- HTTP


class SSEParser:
    """Incremental text/event-stream parser (\\n or \\r\\n line ends)."""

    __slots__ = ("buf", "on_event", "scan")

    def __init__(self, on_event) -> None:
        self.buf = bytearray()
        self.scan = 0
        self.on_event = on_event

    def feed(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            a = buf.find(b"\n\n", self.scan)
            b = buf.find(b"\n\r\n", self.scan)
            if a < 0 and b < 0:
                self.scan = max(0, len(buf) - 2)
                return
            if a < 0 or (0 <= b < a):
                end, skip = b, 3
            else:
                end, skip = a, 2
            block = bytes(buf[:end])
            del buf[: end + skip]
            self.scan = 0
            event = b"message"
            data_lines = []
            for line in block.split(b"\n"):
                if line.endswith(b"\r"):
                    line = line[:-1]
                if not line or line[0] == 58:  # ':' comment
                    continue
                name, _, value = line.partition(b":")
                if value.startswith(b" "):
                    value = value[1:]
                if name == b"data":
                    data_lines.append(value)
                elif name == b"event":
                    event = value
            if data_lines:
                self.on_event(event, b"\n".join(data_lines))


class Response:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[bytes, bytes]) -> None:
        self.status = status
        self.headers = headers
        self.body = b""


HEAD, CHUNK_SIZE, CHUNK_DATA, CHUNK_CRLF, CHUNK_TRAILER, LENGTH, UNTIL_CLOSE = range(7)


class Conn(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport = None
        self.buf = bytearray()
        self.state = HEAD
        self.fut: asyncio.Future | None = None
        self.on_event = None
        self.on_headers = None
        self.resp: Response | None = None
        self.parts: list[bytes] = []
        self.sse: SSEParser | None = None
        self.remaining = 0
        self.closed: asyncio.Future = asyncio.get_running_loop().create_future()
        self.host_header = b""

    @classmethod
    async def open(cls, host: str, port: int) -> Conn:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(cls, host, port)
        sock = proto.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        proto.host_header = f"{host}:{port}".encode()
        return proto

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        if self.fut is not None and not self.fut.done():
            if self.state == UNTIL_CLOSE and self.resp is not None:
                self._complete()
            else:
                self.fut.set_exception(ConnectionError(f"connection lost: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def request(
        self, method: bytes, path: bytes, headers: bytes, body: bytes = b"",
        on_event=None, on_headers=None,
    ) -> asyncio.Future:
        if self.closed.done():
            raise ConnectionError("connection closed")
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n%sContent-Length: %d\r\n\r\n" % (
            method, path, self.host_header, headers, len(body),
        )
        if len(body) > 65536:
            self.transport.write(head)
            self.transport.write(body)
        else:
            self.transport.write(head + body)
        self.fut = asyncio.get_running_loop().create_future()
        self.on_event = on_event
        self.on_headers = on_headers
        self.state = HEAD
        return self.fut

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        try:
            self._parse()
        except Exception as e:  # a protocol error: fail the request, drop the connection
            if self.fut is not None and not self.fut.done():
                self.fut.set_exception(e)
            self.transport.close()

    def _body(self, data: bytes) -> None:
        if self.sse is not None:
            self.sse.feed(data)
        else:
            self.parts.append(data)

    def _complete(self) -> None:
        resp = self.resp
        if self.sse is None:
            resp.body = b"".join(self.parts)
        self.parts = []
        self.sse = None
        self.resp = None
        self.state = HEAD
        fut, self.fut = self.fut, None
        if fut is not None and not fut.done():
            fut.set_result(resp)

    def _parse(self) -> None:
        buf = self.buf
        while buf:
            st = self.state
            if st == HEAD:
                i = buf.find(b"\r\n\r\n")
                if i < 0:
                    return
                lines = bytes(buf[:i]).split(b"\r\n")
                del buf[: i + 4]
                status = int(lines[0].split(b" ", 2)[1])
                headers: dict[bytes, bytes] = {}
                for line in lines[1:]:
                    k, _, v = line.partition(b":")
                    headers[k.strip().lower()] = v.strip()
                if status == 100:
                    continue
                self.resp = Response(status, headers)
                if self.on_headers is not None:
                    self.on_headers(self.resp)
                if headers.get(b"content-type", b"").startswith(b"text/event-stream"):
                    self.sse = SSEParser(self.on_event)
                if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
                    self.state = CHUNK_SIZE
                elif b"content-length" in headers:
                    self.remaining = int(headers[b"content-length"])
                    self.state = LENGTH
                    if self.remaining == 0:
                        self._complete()
                elif status in (204, 304) or 100 <= status < 200:
                    self._complete()
                else:
                    self.state = UNTIL_CLOSE
            elif st == CHUNK_SIZE:
                i = buf.find(b"\r\n")
                if i < 0:
                    return
                size = int(bytes(buf[:i]).split(b";")[0], 16)
                del buf[: i + 2]
                if size == 0:
                    self.state = CHUNK_TRAILER
                else:
                    self.remaining = size
                    self.state = CHUNK_DATA
            elif st == CHUNK_DATA or st == LENGTH:
                n = min(len(buf), self.remaining)
                if n == len(buf):
                    data = bytes(buf)
                    buf.clear()
                else:
                    data = bytes(buf[:n])
                    del buf[:n]
                self.remaining -= n
                self._body(data)
                if self.remaining == 0:
                    if st == LENGTH:
                        self._complete()
                    else:
                        self.state = CHUNK_CRLF
            elif st == CHUNK_CRLF:
                if len(buf) < 2:
                    return
                del buf[:2]
                self.state = CHUNK_SIZE
            elif st == CHUNK_TRAILER:
                i = buf.find(b"\r\n")
                if i < 0:
                    return
                del buf[: i + 2]
                if i == 0:
                    self._complete()
            elif st == UNTIL_CLOSE:
                data = bytes(buf)
                buf.clear()
                self._body(data)


# --------------------------------------------------------------------------- MCP sessions


class Stats:
    def __init__(self) -> None:
        self.wrong_client = 0  # our id, another session's payload
        self.foreign = 0  # no request of ours with this id, another session's payload
        self.duplicates = 0  # our payload, delivered again
        self.http_errors: dict[str, int] = {}
        self.rpc_errors: dict[str, int] = {}
        self.timeouts = 0
        self.notifications = 0
        self.examples: list[str] = []
        self.bad_lists = 0  # tools/list answers without the expected number of tools

    def note(self, what: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(what[:300])

    def as_dict(self) -> dict:
        return {
            "wrong_client": self.wrong_client,
            "foreign": self.foreign,
            "duplicates": self.duplicates,
            "http_errors": self.http_errors,
            "rpc_errors": self.rpc_errors,
            "timeouts": self.timeouts,
            "notifications": self.notifications,
            "examples": self.examples,
            "bad_lists": self.bad_lists,
        }


class RpcError(Exception):
    pass


class HttpStatusError(Exception):
    pass


def result_text(msg: dict) -> str | None:
    try:
        return msg["result"]["content"][0]["text"]
    except (KeyError, IndexError, TypeError):
        return None


class Session:
    def __init__(self, sid: int, url: str, stats: Stats, slots: int,
                 token: str | None = None) -> None:
        self.sid = sid
        self.token = token
        self.auth = b"Authorization: Bearer %s\r\n" % token.encode() if token else b""
        self.prefix = f"s{sid}."
        u = urllib.parse.urlsplit(url)
        self.url = url
        self.host = u.hostname
        self.port = u.port
        self.path = (u.path or "/").encode() + (b"?" + u.query.encode() if u.query else b"")
        self.stats = stats
        self.slots = slots
        self.pending: dict = {}
        self.next_id = 0
        self.conns: list[Conn] = []
        self.notifications: list[dict] = []
        self.closed = False

    # messages from the bridge, whichever way they came
    def on_message(self, msg) -> None:
        if isinstance(msg, list):
            for m in msg:
                self.on_message(m)
            return
        if not isinstance(msg, dict):
            return
        if "method" in msg:
            self.stats.notifications += 1
            self.notifications.append(msg)
            return
        rid = msg.get("id")
        entry = self.pending.get(rid)
        text = result_text(msg)
        if entry is None:
            if text is not None and text.startswith(self.prefix):
                self.stats.duplicates += 1
            elif text is not None and text.startswith("s") and "." in text[:12]:
                self.stats.foreign += 1
                self.stats.note(f"session {self.sid} got id {rid!r} text {text[:40]!r} (not in flight)")
            else:
                self.stats.foreign += 1
                self.stats.note(f"session {self.sid} got unexpected {str(msg)[:200]}")
            return
        fut, expected, sent = entry
        if expected is not None and "result" in msg and text != expected:
            self.stats.wrong_client += 1
            self.stats.note(
                f"session {self.sid} request {rid!r} expected {expected[:40]!r} got {str(text)[:40]!r}"
            )
            return  # keep waiting for our own
        del self.pending[rid]
        if not fut.done():
            fut.set_result((msg, time.monotonic() - sent))

    async def call(self, slot: int, method: str, params: dict, expected: str | None = None,
                   timeout: float = 10.0):
        self.next_id += 1
        rid = self.next_id
        fut = asyncio.get_running_loop().create_future()
        body = dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
        self.pending[rid] = (fut, expected, time.monotonic())
        try:
            posted = await self.post(slot, body)
            if not fut.done() and posted is not None and posted.status >= 300:
                raise HttpStatusError(f"HTTP {posted.status}: {posted.body[:200]!r}")
            msg, latency = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            self.stats.timeouts += 1
            raise
        finally:
            self.pending.pop(rid, None)
        if "error" in msg:
            raise RpcError(str(msg["error"])[:300])
        return msg, latency

    async def notify_msg(self, method: str, params: dict | None = None) -> None:
        m = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            m["params"] = params
        resp = await self.post(0, dumps(m))
        if resp is not None and resp.status >= 300:
            raise HttpStatusError(f"HTTP {resp.status} for {method}: {resp.body[:200]!r}")

    async def initialize(self, version: str) -> dict:
        msg, _ = await self.call(
            0,
            "initialize",
            {
                "protocolVersion": version,
                "capabilities": {},
                "clientInfo": {"name": "mcptwist-bench", "version": "1"},
            },
            timeout=30,
        )
        await self.notify_msg("notifications/initialized")
        return msg


class StreamableSession(Session):
    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        self.session_id: bytes | None = None
        self.version = STREAMABLE_VERSION

    def _on_event(self, event: bytes, data: bytes) -> None:
        if event == b"message" and data:
            self.on_message(loads(data))

    def _headers(self) -> bytes:
        h = b"Content-Type: application/json\r\nAccept: " + ACCEPT_BOTH + b"\r\n" + self.auth
        if self.session_id is not None:
            h += b"Mcp-Session-Id: " + self.session_id + b"\r\nMcp-Protocol-Version: " + self.version.encode() + b"\r\n"
        return h

    async def start(self) -> None:
        self.conns = [await Conn.open(self.host, self.port)]
        await self.initialize(self.version)
        for _ in range(self.slots - 1):
            self.conns.append(await Conn.open(self.host, self.port))

    async def open_get(self) -> int:
        """The session's own GET stream (server messages not tied to a POST); its status."""
        self.get_conn = await Conn.open(self.host, self.port)
        status: asyncio.Future = asyncio.get_running_loop().create_future()

        def on_headers(resp: Response) -> None:
            if not status.done():
                status.set_result(resp.status)

        h = b"Accept: text/event-stream\r\n" + self.auth + b"Mcp-Session-Id: " + self.session_id + (
            b"\r\nMcp-Protocol-Version: " + self.version.encode() + b"\r\n"
        )
        done = self.get_conn.request(b"GET", self.path, h, on_event=self._on_event,
                                     on_headers=on_headers)
        done.add_done_callback(lambda f: f.cancelled() or f.exception())
        return await asyncio.wait_for(status, 5)

    async def post(self, slot: int, body: bytes) -> Response:
        conn = self.conns[slot]
        if conn.closed.done():
            conn = self.conns[slot] = await Conn.open(self.host, self.port)
        resp = await conn.request(b"POST", self.path, self._headers(), body, on_event=self._on_event)
        if self.session_id is None and b"mcp-session-id" in resp.headers:
            self.session_id = resp.headers[b"mcp-session-id"]
        if resp.status < 300 and resp.body and resp.headers.get(b"content-type", b"").startswith(
            b"application/json"
        ):
            self.on_message(loads(resp.body))
        return resp

    async def close(self) -> None:
        self.closed = True
        if getattr(self, "get_conn", None) is not None:
            self.get_conn.close()
        with contextlib.suppress(Exception):
            if self.session_id is not None and self.conns and not self.conns[0].closed.done():
                await asyncio.wait_for(
                    self.conns[0].request(b"DELETE", self.path, self._headers()), 5
                )
        for c in self.conns:
            c.close()


class SseSession(Session):
    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        self.stream: Conn | None = None
        self.endpoint: asyncio.Future = asyncio.get_running_loop().create_future()
        self.post_path = b""
        self.stream_status: int | None = None

    def _on_event(self, event: bytes, data: bytes) -> None:
        if event == b"endpoint":
            if not self.endpoint.done():
                self.endpoint.set_result(data.decode())
        elif event == b"message" and data:
            self.on_message(loads(data))

    def _on_headers(self, resp: Response) -> None:
        self.stream_status = resp.status
        if resp.status != 200 and not self.endpoint.done():
            self.endpoint.set_exception(HttpStatusError(f"SSE GET answered {resp.status}"))

    async def open_stream(self, timeout: float = 10.0) -> None:
        self.stream = await Conn.open(self.host, self.port)
        self.stream_done = self.stream.request(
            b"GET", self.path, b"Accept: text/event-stream\r\n" + self.auth,
            on_event=self._on_event, on_headers=self._on_headers,
        )
        self.stream_done.add_done_callback(self._stream_ended)
        endpoint = await asyncio.wait_for(asyncio.shield(self.endpoint), timeout)
        u = urllib.parse.urlsplit(urllib.parse.urljoin(self.url, endpoint))
        self.post_path = u.path.encode() + (b"?" + u.query.encode() if u.query else b"")

    def _stream_ended(self, fut: asyncio.Future) -> None:
        exc = fut.exception() if not fut.cancelled() else None  # (retrieved: no warning)
        if not self.endpoint.done():
            self.endpoint.set_exception(ConnectionError(f"SSE stream ended: {exc}"))
            self.endpoint.exception()

    async def start(self) -> None:
        await self.open_stream()
        for _ in range(self.slots):
            self.conns.append(await Conn.open(self.host, self.port))
        await self.initialize(SSE_VERSION)

    async def post(self, slot: int, body: bytes) -> Response:
        conn = self.conns[slot]
        if conn.closed.done():
            conn = self.conns[slot] = await Conn.open(self.host, self.port)
        return await conn.request(
            b"POST", self.post_path, b"Content-Type: application/json\r\n" + self.auth, body
        )

    async def close(self) -> None:
        self.closed = True
        if self.stream is not None:
            self.stream.close()
        for c in self.conns:
            c.close()


class WsSession(Session):
    """One WebSocket (the mcp subprotocol) is one session of the session era: every message
    a text frame, the answers of all its requests in flight on the one socket."""

    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        self.ws = None
        self.reader: asyncio.Task | None = None

    async def start(self) -> None:
        from websockets.asyncio.client import connect

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        # No compression (the bridge's frames are measured as they are), no size cap, no
        # pings: the window is short.
        self.ws = await connect(self.url, subprotocols=["mcp"], additional_headers=headers,
                                compression=None, max_size=None, ping_interval=None)
        self.reader = asyncio.ensure_future(self._read())
        await self.initialize(STREAMABLE_VERSION)

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            async for frame in self.ws:
                self.on_message(loads(frame))

    async def post(self, slot: int, body: bytes) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            await self.ws.send(body.decode())
        except ConnectionClosed as e:
            raise ConnectionError(f"WebSocket closed: {e}") from None

    async def close(self) -> None:
        self.closed = True
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(), 5)
        if self.reader is not None:
            self.reader.cancel()


class RestSession(Session):
    """The REST face: each tools/call a POST of its arguments to URL/tools/TOOL, answered by
    the tool's text as JSON (a text that is not JSON comes back as a JSON string); no
    session, no initialize, no JSON-RPC."""

    async def start(self) -> None:
        for _ in range(self.slots):
            self.conns.append(await Conn.open(self.host, self.port))

    async def call(self, slot: int, method: str, params: dict, expected: str | None = None,
                   timeout: float = 10.0):
        if method != "tools/call":
            raise RpcError(f"the REST face has no {method}")
        conn = self.conns[slot]
        if conn.closed.done():
            conn = self.conns[slot] = await Conn.open(self.host, self.port)
        path = self.path.rstrip(b"/") + b"/tools/" + params["name"].encode()
        sent = time.monotonic()
        try:
            resp = await asyncio.wait_for(
                conn.request(b"POST", path, b"Content-Type: application/json\r\n" + self.auth,
                             dumps(params["arguments"])), timeout)
        except asyncio.TimeoutError:
            self.stats.timeouts += 1
            conn.close()  # its answer may still come: never read it as the next one's
            raise
        latency = time.monotonic() - sent
        if resp.status != 200:
            raise HttpStatusError(f"HTTP {resp.status}: {resp.body[:200]!r}")
        text = loads(resp.body)
        if expected is not None and text != expected:
            self.stats.wrong_client += 1
            self.stats.note(f"session {self.sid} expected {expected[:40]!r} got {str(text)[:40]!r}")
        return {"result": {"content": [{"type": "text", "text": text}]}}, latency

    async def close(self) -> None:
        self.closed = True
        for c in self.conns:
            c.close()


SESSIONS = {"streamable": StreamableSession, "sse": SseSession, "websocket": WsSession,
            "rest": RestSession}


def make_session(transport: str, sid: int, url: str, stats: Stats, slots: int,
                 tokens: list[str] | None = None) -> Session:
    token = tokens[sid % len(tokens)] if tokens else None
    return SESSIONS[transport](sid, url, stats, slots, token)


async def start_sessions(transport, url, n, slots, stats, retries=1,
                         tokens=None) -> list[Session]:
    sem = asyncio.Semaphore(8)

    async def one(i: int) -> Session:
        async with sem:
            last = None
            for _ in range(retries):
                s = make_session(transport, i, url, stats, slots, tokens)
                try:
                    await s.start()
                    return s
                except Exception as e:  # noqa: BLE001
                    last = e
                    await s.close()
                    await asyncio.sleep(0.5)
            raise RuntimeError(f"session {i} failed to start: {type(last).__name__}: {last}")

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    v = sorted(values)

    def p(q: float) -> float:
        return v[min(len(v) - 1, int(q * len(v)))] * 1000.0

    return {
        "n": len(v),
        "p50_ms": p(0.50),
        "p90_ms": p(0.90),
        "p95_ms": p(0.95),
        "p99_ms": p(0.99),
        "max_ms": v[-1] * 1000.0,
        "mean_ms": sum(v) / len(v) * 1000.0,
    }


# --------------------------------------------------------------------------- modes


def list_size(msg: dict) -> int | None:
    try:
        tools = msg["result"]["tools"]
    except (KeyError, TypeError):
        return None
    return len(tools) if isinstance(tools, list) else None


def request_of(a, n: int, text: str) -> tuple[str, dict, str | None]:
    """The n-th request of a slot: (method, params, the text its answer must carry)."""
    if a.method == "list":
        return "tools/list", {}, None
    tool = a.tools[n % len(a.tools)]  # several: one after another (members of an endpoint)
    return "tools/call", {"name": tool, "arguments": {"text": text}}, text


def check_list(a, stats: Stats, msg: dict) -> None:
    if a.method == "list" and a.expect_tools is not None and list_size(msg) != a.expect_tools:
        stats.bad_lists += 1
        stats.note(f"tools/list answered {list_size(msg)} tools, want {a.expect_tools}")


async def mode_load(a) -> dict:
    stats = Stats()
    t_setup = time.monotonic()
    sessions = await start_sessions(a.transport, a.url, a.sessions, a.inflight, stats, retries=3,
                                    tokens=a.tokens)
    setup_s = time.monotonic() - t_setup
    latencies: list[float] = []
    calls = 0
    sent_total = 0
    done_total = 0
    errors = 0
    stop = False
    window = [0.0, 0.0]

    async def slot_loop(s: Session, slot: int) -> None:
        nonlocal calls, sent_total, done_total, errors
        n = 0
        while not stop and not s.closed:
            n += 1
            text = f"{s.prefix}{slot}.{n}"
            method, params, expected = request_of(a, n, text)
            sent_total += 1
            try:
                msg, lat = await s.call(slot, method, params, expected=expected,
                                        timeout=a.timeout)
                check_list(a, stats, msg)
            except asyncio.TimeoutError:
                continue
            except RpcError as e:
                errors += 1
                key = str(e)[:80]
                stats.rpc_errors[key] = stats.rpc_errors.get(key, 0) + 1
                await asyncio.sleep(0.01)
                continue
            except (HttpStatusError, ConnectionError, OSError) as e:
                errors += 1
                key = f"{type(e).__name__}: {str(e)[:80]}"
                stats.http_errors[key] = stats.http_errors.get(key, 0) + 1
                await asyncio.sleep(0.05)
                continue
            done_total += 1
            now = time.monotonic()
            if window[0] <= now < window[1]:
                calls += 1
                latencies.append(lat)

    rss = RssSampler(a.pid)
    t0 = time.monotonic()
    window[0] = t0 + a.warmup
    window[1] = window[0] + a.duration
    tasks = [asyncio.ensure_future(slot_loop(s, k)) for s in sessions for k in range(a.inflight)]
    await asyncio.sleep(a.warmup)
    before = ProcSnapshot(a.pid, a.also_pids)
    rss.sample()
    end = window[1]
    while True:
        left = end - time.monotonic()
        if left <= 0:
            break
        await asyncio.sleep(min(0.5, left))
        rss.sample()
    after = ProcSnapshot(a.pid, a.also_pids)
    stop = True
    done, pending = await asyncio.wait(tasks, timeout=a.timeout + 2)
    for t in pending:
        t.cancel()
    lost = sum(len(s.pending) for s in sessions)
    for s in sessions:
        await s.close()
    d = after.delta(before)
    wall = d["wall_s"]
    out = {
        "mode": "load",
        "method": "tools/list" if a.method == "list" else "tools/call",
        "transport": a.transport,
        "sessions": a.sessions,
        "inflight_per_session": a.inflight,
        "window_s": wall,
        "warmup_s": a.warmup,
        "setup_s": setup_s,
        "calls": calls,
        "calls_per_s": calls / wall if wall else 0.0,
        "sent_total": sent_total,
        "answered_total": done_total,
        "errors": errors,
        "lost": lost + stats.timeouts,
        "latency": percentiles(latencies),
        "rss_max_kib": {"bridge": rss.bridge_max, "children": rss.children_max,
                        "children_n": rss.children_n},
        **d,
        **stats.as_dict(),
    }
    if "bridge_cpu_s" in d and calls:
        out["bridge_cpu_us_per_call"] = d["bridge_cpu_s"] / calls * 1e6
        out["children_cpu_us_per_call"] = d["children_cpu_s"] / calls * 1e6
    out["driver_cpu_us_per_call"] = d["driver_cpu_s"] / calls * 1e6 if calls else None
    return out


async def mode_once(a) -> dict:
    """One fresh session, --count requests one after another, each timed."""
    stats = Stats()
    t0 = time.monotonic()
    out: dict = {"mode": "once", "transport": a.transport,
                 "method": "tools/list" if a.method == "list" else "tools/call"}
    s = make_session(a.transport, 0, a.url, stats, 1, a.tokens)
    try:
        while True:  # with --since the bridge may not listen yet: try again until it does
            try:
                await s.start()
                break
            except ConnectionRefusedError:
                await s.close()
                if a.since is None or time.monotonic() - t0 > a.timeout:
                    raise
                await asyncio.sleep(0.01)
                s = make_session(a.transport, 0, a.url, stats, 1, a.tokens)
        out["setup_s"] = time.monotonic() - t0
        lats, sizes = [], []
        for n in range(a.count):
            method, params, expected = request_of(a, n, f"{s.prefix}0.{n}")
            msg, lat = await s.call(0, method, params, expected=expected, timeout=a.timeout)
            check_list(a, stats, msg)
            lats.append(lat * 1000.0)
            if n == 0:
                if a.since is not None:  # a wall-clock time (time.time()) given by the caller
                    out["answered_after_s"] = time.time() - a.since
                if a.method == "list":
                    out["first_tools"] = [t.get("name") for t in msg["result"]["tools"]]
            sizes.append(list_size(msg))
        out.update(latencies_ms=lats, list_sizes=sizes, ok=True)
    except Exception as e:  # noqa: BLE001
        out.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
    await s.close()
    return {**out, **stats.as_dict()}


def pattern(size: int, seed: str = "") -> str:
    unit = hashlib.sha256(seed.encode()).hexdigest()
    return (unit * (size // 64 + 1))[:size]


async def mode_large(a) -> dict:
    results = []
    for size in a.sizes:
        for direction in ("result", "request"):
            stats = Stats()
            entry = {"size": size, "direction": direction}
            s = make_session(a.transport, 0, a.url, stats, 1)
            t = time.monotonic()
            try:
                await s.start()
                seed = f"seed-{size}-{direction}"
                t = time.monotonic()
                if direction == "result":
                    msg, _ = await s.call(
                        0, "tools/call", {"name": "blob", "arguments": {"size": size, "seed": seed}},
                        timeout=a.timeout,
                    )
                    got = result_text(msg)
                    want = pattern(size, seed)
                    entry["intact"] = got == want
                    if got != want:
                        entry["detail"] = f"got {len(got or '')} bytes, want {size}"
                else:
                    text = pattern(size, seed)
                    raw = text.encode()
                    msg, _ = await s.call(
                        0, "tools/call",
                        {"name": "echo", "arguments": {"text": text, "mode": "digest"}},
                        timeout=a.timeout,
                    )
                    want = f"{len(raw)}:{hashlib.sha256(raw).hexdigest()}"
                    got = result_text(msg)
                    entry["intact"] = got == want
                    if got != want:
                        entry["detail"] = f"child saw {got}, want {want}"
                entry["seconds"] = time.monotonic() - t
                entry["ok"] = bool(entry["intact"])
            except asyncio.TimeoutError:
                entry.update(ok=False, intact=False, error=f"no answer in {a.timeout:.0f} s",
                             seconds=time.monotonic() - t)
            except Exception as e:  # noqa: BLE001
                entry.update(ok=False, intact=False, error=f"{type(e).__name__}: {str(e)[:300]}",
                             seconds=time.monotonic() - t)
            entry["wrong_client"] = stats.wrong_client + stats.foreign
            await s.close()
            results.append(entry)
            await asyncio.sleep(0.2)
    return {"mode": "large", "transport": a.transport, "results": results}


async def mode_notify(a) -> dict:
    """Session A asks for 5 progress notifications; B (idle) must see none of them."""
    stats = Stats()
    sa, sb = await start_sessions(a.transport, a.url, 2, 1, stats, retries=2)
    out = {"mode": "notify", "transport": a.transport}
    try:
        if a.transport == "streamable":  # as real clients do: progress may travel there
            out["get_stream_status"] = [await s.open_get() for s in (sa, sb)]
        sa.notifications.clear()
        sb.notifications.clear()
        await sa.call(0, "tools/call", {"name": "notify", "arguments": {"count": 5},
                                        "_meta": {"progressToken": "tok-a"}}, timeout=10)
        await asyncio.sleep(0.3)
        mine = [m for m in sa.notifications if m.get("method") == "notifications/progress"]
        leaked = [m for m in sb.notifications if m.get("method") == "notifications/progress"]
        out.update(
            caller_got=len(mine),
            caller_tokens_ok=all(m["params"].get("progressToken") == "tok-a" for m in mine),
            other_session_got=len(leaked),
            ok=len(mine) == 5 and not leaked,
        )
    except Exception as e:  # noqa: BLE001
        out.update(ok=False, error=f"{type(e).__name__}: {str(e)[:200]}")
    for s in (sa, sb):
        await s.close()
    return out


async def mode_streams(a) -> dict:
    """Open N idle HTTP+SSE streams (each one waits for its endpoint event)."""
    sem = asyncio.Semaphore(a.concurrency)
    stats = Stats()
    sessions: list[SseSession] = []
    failures: dict[str, int] = {}
    t0 = time.monotonic()

    async def one(i: int) -> None:
        async with sem:
            for attempt in range(4):
                s = SseSession(i, a.url, stats, 0)
                try:
                    await s.open_stream(timeout=30)
                    sessions.append(s)
                    return
                except Exception as e:  # noqa: BLE001
                    await s.close()
                    if attempt == 3:
                        key = f"{type(e).__name__}: {str(e)[:80]}"
                        failures[key] = failures.get(key, 0) + 1
                    await asyncio.sleep(0.2 * (attempt + 1))

    await asyncio.gather(*(one(i) for i in range(a.count)))
    opened = {
        "mode": "streams",
        "requested": a.count,
        "opened": len(sessions),
        "open_seconds": time.monotonic() - t0,
        "failures": failures,
    }
    print(dumps(opened).decode(), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    still = sum(1 for s in sessions if s.stream is not None and not s.stream.closed.done())
    for s in sessions:
        await s.close()
    await asyncio.sleep(0.2)
    return {"mode": "streams", "still_open": still}


class StdioChild:
    """The child run by the driver itself, its stdin written straight (no bridge)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.waiters: dict[int, asyncio.Future] = {}
        self.next_id = 0
        self.reader = asyncio.ensure_future(self._read())

    @classmethod
    async def start(cls, argv: list[str]) -> StdioChild:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, limit=64 << 20,
        )
        child = cls(proc)
        await child.call("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                        "clientInfo": {"name": "bench", "version": "1"}})
        proc.stdin.write(b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n')
        return child

    async def _read(self) -> None:
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                return
            m = loads(line)
            f = self.waiters.pop(m.get("id"), None)
            if f is not None and not f.done():
                f.set_result(m)

    async def call(self, method: str, params: dict) -> dict:
        self.next_id += 1
        f = asyncio.get_running_loop().create_future()
        self.waiters[self.next_id] = f
        self.proc.stdin.write(dumps({"jsonrpc": "2.0", "id": self.next_id, "method": method,
                                     "params": params}) + b"\n")
        return await f

    async def window(self, inflight: int, warmup: float, duration: float) -> dict:
        """`inflight` callers of echo, one call each at a time, over a window after a warm-up:
        the calls answered inside it, their latencies, and the window's /proc figures (the
        child's CPU as the snapshot's "bridge")."""
        stop = False
        lats: list[float] = []
        count = bad = 0
        window = [time.monotonic() + warmup, 0.0]
        window[1] = window[0] + duration

        async def slot(j: int) -> None:
            nonlocal count, bad
            n = 0
            while not stop:
                n += 1
                text = f"d{j}.{n}"
                t = time.monotonic()
                m = await self.call("tools/call", {"name": "echo", "arguments": {"text": text}})
                now = time.monotonic()
                if result_text(m) != text:
                    bad += 1
                if window[0] <= now < window[1]:
                    count += 1
                    lats.append(now - t)

        tasks = [asyncio.ensure_future(slot(j)) for j in range(inflight)]
        await asyncio.sleep(warmup)
        before = ProcSnapshot(self.proc.pid)
        await asyncio.sleep(duration)
        after = ProcSnapshot(self.proc.pid)
        stop = True
        await asyncio.gather(*tasks)
        d = after.delta(before)
        child_s = d.pop("bridge_cpu_s", None)
        d.pop("children_cpu_s", None)
        return {"calls": count, "calls_per_s": count / d["wall_s"], "latency": percentiles(lats),
                "child_cpu_us_per_call": child_s / count * 1e6 if count and child_s else None,
                "bad": bad, **d}

    async def stop(self) -> None:
        self.proc.stdin.close()
        await self.proc.wait()
        self.reader.cancel()


async def mode_direct(a) -> dict:
    """The child alone: sequential, then 32 in flight."""
    child = await StdioChild.start(a.child)
    out: dict = {"mode": "direct"}
    for label, k in (("sequential", 1), ("inflight32", 32)):
        r = await child.window(k, a.warmup, a.duration)
        out[label] = {"calls_per_s": r["calls_per_s"], "latency": r["latency"],
                      "child_cpu_us_per_call": r["child_cpu_us_per_call"],
                      "driver_core_share": r["driver_core_share"],
                      "other_processes_cores": r["other_processes_cores"], "bad": r["bad"],
                      "window_s": r["wall_s"]}
    await child.stop()
    return out


async def mode_stdio(a) -> dict:
    """One load window on the child alone, --inflight callers at once: the figures of a load
    window (the child's CPU in children_cpu_us_per_call, no bridge), for the stdio hop."""
    t0 = time.monotonic()
    child = await StdioChild.start(a.child)
    setup_s = time.monotonic() - t0
    r = await child.window(a.inflight, a.warmup, a.duration)
    await child.stop()
    bad = r.pop("bad")
    return {"mode": "stdio", "method": "tools/call", "transport": "stdio", "sessions": 1,
            "inflight_per_session": a.inflight, "window_s": r["wall_s"], "warmup_s": a.warmup,
            "setup_s": setup_s, "errors": 0, "lost": 0, "wrong_client": bad, "foreign": 0,
            "duplicates": 0, "children_cpu_us_per_call": r.pop("child_cpu_us_per_call"),
            "driver_cpu_us_per_call": r["driver_cpu_s"] / r["calls"] * 1e6 if r["calls"] else None,
            **r}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("mode", choices=["load", "once", "large", "notify", "streams", "direct",
                                    "stdio"])
    p.add_argument("--transport", choices=list(SESSIONS), default="streamable")
    p.add_argument("--url", help="the /mcp, /sse or /ws URL; rest: the server's (/servers/NAME)")
    p.add_argument("--tokens", type=lambda s: [t for t in s.split(",") if t],
                   help="bearer tokens, comma-separated: session i sends the i-th (modulo)")
    p.add_argument("--pid", type=int, help="the bridge's pid, for /proc figures")
    p.add_argument("--also-pids", type=lambda s: [int(x) for x in s.split(",") if x],
                   default=[], help="load: more pids (comma-separated) whose CPU (and their "
                   "descendants') over the window is reported in also_cpu_s")
    p.add_argument("--sessions", type=int, default=1)
    p.add_argument("--inflight", type=int, default=1, help="requests in flight per session")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--timeout", type=float, default=10.0, help="per call, seconds")
    p.add_argument("--method", choices=["call", "list"], default="call",
                   help="load/once: tools/call (of --tool) or tools/list")
    p.add_argument("--tool", dest="tools", type=lambda s: s.split(","), default=["echo"],
                   help="the echo tool's name; several (comma-separated): called in turn")
    p.add_argument("--expect-tools", type=int, help="tools a tools/list answer must hold")
    p.add_argument("--since", type=float,
                   help="once: also report the seconds from this time.time() to the first answer")
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1 << 20, 16 << 20])
    p.add_argument("--count", type=int, default=1000, help="streams to open; once: requests")
    p.add_argument("--concurrency", type=int, default=64, help="streams opened at once")
    p.add_argument("--child", type=shlex.split,
                   help="direct, stdio: the child's command line")
    a = p.parse_args()
    run = {"load": mode_load, "once": mode_once, "large": mode_large, "notify": mode_notify,
           "streams": mode_streams, "direct": mode_direct, "stdio": mode_stdio}[a.mode]
    if uvloop is not None:
        uvloop.install()
    result = asyncio.run(run(a))
    result["uvloop"] = uvloop is not None
    print(dumps(result).decode(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
