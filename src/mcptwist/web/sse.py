# -*- test-case-name: tests.test_sse -*-
"""Server-sent events: the one encoder and reader, bounded connections, replayable channels.

An L{EventConnection} is one open HTTP response carrying SSE. It is a push
producer: when the client reads slowly, frames queue up to a byte limit, and
a client that falls further behind is disconnected (and logged) rather than
letting memory grow. It can be held, its frames queued until the one that
must come first is known. An L{EventReader} reads the events of a stream
that another node sends, chunk by chunk. A L{Heartbeat} writes a comment on quiet connections so
that proxies and dead peers are noticed. An L{EventChannel} is a logical
stream with event ids and a bounded log, so a client that reconnects with
C{Last-Event-ID} gets what it missed.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.server import Request
from zope.interface import implementer

from mcptwist.mcp import jsonrpc
from mcptwist.mcp.jsonrpc import Message

log = Logger(namespace="mcptwist.sse")

HEARTBEAT: Final = b": keep-alive\n\n"
# How soon (ms) a client should reconnect a stream it lost.
RETRY_MS: Final = 1000


def encode_event(
    data: bytes, event: bytes | None = None, id: bytes | None = None, retry: int | None = None
) -> bytes:
    """One SSE event. Each line of C{data} becomes its own C{data:} field."""
    parts: list[bytes] = []
    if id is not None:
        parts += [b"id: ", id, b"\n"]
    if retry is not None:
        parts += [b"retry: ", str(retry).encode(), b"\n"]
    if event is not None:
        parts += [b"event: ", event, b"\n"]
    if b"\n" in data or b"\r" in data:
        for line in data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n"):
            parts += [b"data: ", line, b"\n"]
    else:
        parts += [b"data: ", data, b"\n"]
    parts.append(b"\n")
    return b"".join(parts)


def message_event(message: Message) -> bytes:
    """One JSON-RPC message as one SSE event, without an id (as 2026-07-28 streams send them)."""
    return encode_event(jsonrpc.dumps(message))


def start_stream(request: IRequest) -> None:
    """Set the headers of an SSE response."""
    request.setHeader(b"content-type", b"text/event-stream")
    request.setHeader(b"cache-control", b"no-cache, no-transform")
    request.setHeader(b"x-accel-buffering", b"no")


@implementer(IPushProducer)
class EventConnection:
    """One HTTP response streaming SSE frames, with a bounded send queue.

    @ivar done: fires when the response ends, whoever ended it.
    """

    def __init__(
        self, request: Request, clock: IReactorTime, max_queued: int, label: str = ""
    ) -> None:
        self.request = request
        self.clock = clock
        self.max_queued = max_queued
        self.label = label
        self.last_write = clock.seconds()
        self.open = True
        self._paused = False
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._finish_when_drained = False
        self._held = False
        self.done: Deferred[None] = Deferred()
        request.notifyFinish().addBoth(self._ended)
        start_stream(request)
        request.registerProducer(self, True)

    def send(self, frame: bytes) -> None:
        if not self.open:
            return
        if self._paused or self._queue or self._held:
            self._queue.append(frame)
            self._queued += len(frame)
            # One frame may exceed the limit on its own; a reader that is more
            # than the limit behind is dropped.
            if self._queued > self.max_queued and len(self._queue) > 1:
                log.warn(
                    "dropped a slow SSE reader {label}: {queued} bytes waiting (stream_buffer is {limit})",
                    label=self.label,
                    queued=self._queued,
                    limit=self.max_queued,
                )
                self.abort()
            return
        self._write(frame)

    def heartbeat(self, now: float, interval: float) -> None:
        if self.open and not self._paused and not self._queue and now - self.last_write >= interval:
            self._write(HEARTBEAT)

    def finish(self) -> None:
        """End the response once everything queued has been written."""
        if not self.open:
            return
        if self._queue or self._held:
            self._finish_when_drained = True
            return
        self.open = False
        self._unregister()
        self.request.finish()

    def hold(self) -> None:
        """Queue every frame sent from now on until L{release}."""
        self._held = True

    def release(self, first: bytes) -> None:
        """Send C{first}, then the frames queued while held (and finish, if
        L{finish} was called meanwhile)."""
        if not self._held:
            return
        self._held = False
        if not self.open:
            return
        self._queue.appendleft(first)
        self._queued += len(first)
        if not self._paused:
            self._drain()

    def abort(self) -> None:
        self.open = False
        self._queue.clear()
        self._queued = 0
        request = self.request
        # Every transport twisted.web serves on can abort (ITransport does not say so).
        transport: Any = request.transport or (request.channel and request.channel.transport)
        if transport is not None:
            transport.abortConnection()
        else:
            self.request.finish()

    def _write(self, frame: bytes) -> None:
        self.last_write = self.clock.seconds()
        self.request.write(frame)

    def _unregister(self) -> None:
        try:
            self.request.unregisterProducer()
        except (AttributeError, RuntimeError):
            pass

    def _ended(self, result: object) -> None:
        self.open = False
        self._queue.clear()
        self._queued = 0
        self.done.callback(None)

    # IPushProducer

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if not self._held:
            self._drain()

    def _drain(self) -> None:
        while self._queue and not self._paused and self.open:
            frame = self._queue.popleft()
            self._queued -= len(frame)
            self._write(frame)
        if self._finish_when_drained and not self._queue:
            self.finish()

    def stopProducing(self) -> None:
        self._queue.clear()
        self._queued = 0


class EventTooLarge(ValueError):
    """An event of a stream being read grew past the reader's bound."""


class EventReader:
    """The events of an SSE stream, read chunk by chunk as they arrive.

    Reads what the WHATWG event-stream format defines that a JSON-RPC stream
    uses: each event's C{data} lines, joined by newlines, dispatched at the
    blank line that ends it (an event without data is not); comments and
    the other fields are skipped. Lines end in CRLF, LF or CR, even when a
    chunk splits a CRLF. An event (with the line being read) larger than
    C{max_event} bytes raises L{EventTooLarge}: a stream is not let to grow
    this process's memory.
    """

    def __init__(self, max_event: int) -> None:
        self.max_event = max_event
        self._partial = b""
        self._data: list[bytes] = []
        self._size = 0
        self._after_cr = False

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of each event that C{chunk} completes."""
        buffer = self._partial + chunk
        start = 1 if self._after_cr and buffer.startswith(b"\n") else 0
        self._after_cr = False
        events: list[bytes] = []
        end = len(buffer)
        while (found := _LINE_END.search(buffer, start)) is not None:
            at = found.start()
            line = buffer[start:at]
            start = at + 1
            if buffer[at] == _CR:
                if start == end:
                    self._after_cr = True
                elif buffer[start] == _LF:
                    start += 1
            data = self._line(line)
            if data is not None:
                events.append(data)
        self._partial = buffer[start:]
        if self._size + len(self._partial) > self.max_event:
            raise EventTooLarge(f"an event of more than {self.max_event} bytes")
        return events

    def _line(self, line: bytes) -> bytes | None:
        if not line:
            data = b"\n".join(self._data)
            self._data.clear()
            self._size = 0
            return data or None
        field, colon, value = line.partition(b":")
        if field == b"data":
            if colon and value.startswith(b" "):
                value = value[1:]
            self._data.append(value)
            self._size += len(value) + 1
        return None


_LINE_END: Final = re.compile(rb"[\r\n]")
_CR: Final = ord("\r")
_LF: Final = ord("\n")


class Heartbeat:
    """One timer that keeps every quiet SSE connection alive."""

    def __init__(self, clock: IReactorTime, interval: float) -> None:
        self.clock = clock
        self.interval = interval
        self.connections: set[EventConnection] = set()
        # What is due at the next beat, and what at the one after it.
        self._due: set[Callable[[], None]] = set()
        self._next: set[Callable[[], None]] = set()
        self._loop = LoopingCall(self.beat)
        self._loop.clock = clock

    def add(self, connection: EventConnection) -> None:
        self.connections.add(connection)
        connection.done.addBoth(lambda _: self.connections.discard(connection))

    def start(self) -> None:
        self._loop.start(self.interval / 2, now=False)

    @property
    def running(self) -> bool:
        return bool(self._loop.running)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def soon(self, action: Callable[[], None]) -> None:
        """Run C{action} at a beat between half an interval and an interval
        from now, unless it is L{dropped<drop>} first (no timer of its own)."""
        self._next.add(action)

    def drop(self, action: Callable[[], None]) -> None:
        self._next.discard(action)
        self._due.discard(action)

    def beat(self) -> None:
        now = self.clock.seconds()
        due, self._due, self._next = self._due, self._next, set()
        for action in due:
            action()
        for connection in list(self.connections):
            connection.heartbeat(now, self.interval)

    def close_all(self) -> None:
        for connection in list(self.connections):
            connection.finish()


class EventChannel:
    """A logical stream of events with ids, resumable with Last-Event-ID.

    Event ids are C{"<channel>-<seq>"}; a session numbers its channels, so
    ids are unique within the session and name the stream they belong to.
    """

    def __init__(
        self,
        number: int,
        keep: int,
        max_bytes: int,
        until_attached: tuple[int, int] | None = None,
    ) -> None:
        """C{until_attached}, if given, is a smaller (keep, max_bytes) to use
        until a client first attaches: a backlog nobody may ever read stays small."""
        self.number = number
        self.seq = 0
        self.sent = 0
        self.complete = False
        self.connection: EventConnection | None = None
        self._limits = (keep, max_bytes)
        self._keep, self._max_bytes = until_attached or self._limits
        self._bytes = 0
        self._log: deque[tuple[int, bytes]] = deque()

    @property
    def delivered(self) -> bool:
        """Whether every event went out on a connection that is still open."""
        return self.sent == self.seq and self.connection is not None and self.connection.open

    def emit(self, data: bytes) -> None:
        self.seq += 1
        frame = encode_event(data, id=f"{self.number}-{self.seq}".encode())
        self._log.append((self.seq, frame))
        self._bytes += len(frame)
        # Bounded in events and bytes; the newest event is always kept.
        while len(self._log) > 1 and (len(self._log) > self._keep or self._bytes > self._max_bytes):
            self._bytes -= len(self._log.popleft()[1])
        if self.connection is not None and self.connection.open:
            self.connection.send(frame)
            self.sent = self.seq

    def prime(self) -> None:
        """An event with an id and no data, so the client can resume at once."""
        if self.connection is not None:
            self.connection.send(
                encode_event(b"", id=f"{self.number}-{self.seq}".encode(), retry=RETRY_MS)
            )

    def attach(self, connection: EventConnection, after: int | None = None) -> None:
        """Send events after C{after} (or those never sent) then follow live."""
        start = self.sent if after is None else after
        self.connection = connection
        self._keep, self._max_bytes = self._limits
        for seq, frame in self._log:
            if seq > start:
                connection.send(frame)
        self.sent = self.seq
        connection.done.addBoth(lambda _: self.detach(connection))
        if self.complete:
            connection.finish()

    def detach(self, connection: EventConnection) -> None:
        if self.connection is connection:
            self.connection = None

    def finish(self) -> None:
        """No more events will come: end the live connection, keep the log."""
        self.complete = True
        if self.connection is not None:
            self.connection.finish()


def parse_event_id(value: str | None) -> tuple[int, int] | None:
    """Split a C{Last-Event-ID} into (channel, seq), or None if it is not ours."""
    if not value:
        return None
    match = _EVENT_ID.fullmatch(value.strip())
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


_EVENT_ID: Final = re.compile(r"([0-9]{1,18})-([0-9]{1,18})")
