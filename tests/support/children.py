"""Test doubles: a reactor that spawns in-memory MCP children, on a Clock.

L{FakeProcessReactor} provides C{spawnProcess} (which the real reactor has
and C{MemoryReactorClock} lacks), C{killpg} (so that no real process group
is ever signalled) and the time of a L{Clock}. Each spawned L{FakeChild}
answers like a small MCP server, and a test can also hold its requests and
answer them itself, in any order. An L{Owner} stands in for a real child's
supervisor and records what it is told.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

from mcptwist.child.process import Child
from mcptwist.mcp import jsonrpc

# Far above the kernel's pid_max, so that a stray signal could reach nothing.
_pids = itertools.count(50_000_000)

INIT_RESULT: dict[str, Any] = {
    "protocolVersion": "2025-11-25",
    "capabilities": {"tools": {}, "logging": {}, "resources": {"subscribe": True}},
    "serverInfo": {"name": "fake", "version": "1.0"},
    "instructions": "a fake server",
}


@implementer(IProcessTransport)
class FakeProcessTransport:
    def __init__(self, child: FakeChild) -> None:
        self.child = child
        self.pid: int | None = child.pid
        self.stdin_closed = False
        self.producer: Any = None

    def write(self, data: bytes) -> None:
        # Like Twisted's, writes to a stdin that is gone are lost.
        if not self.child.stdin_gone:
            self.child.stdin_data(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def writeSequence(self, seq: list[bytes]) -> None:
        self.write(b"".join(seq))

    def closeStdin(self) -> None:
        self.stdin_closed = True
        self.child.stdin_closed()

    def closeStdout(self) -> None:
        pass

    def closeStderr(self) -> None:
        pass

    def closeChildFD(self, fd: int) -> None:
        pass

    def writeToChild(self, fd: int, data: bytes) -> None:
        self.write(data)

    def loseConnection(self) -> None:
        pass

    def signalProcess(self, signal: Any) -> None:
        pass

    def getPeer(self) -> Any:
        return None

    def getHost(self) -> Any:
        return None


class FakeChild:
    """An in-memory MCP server behind a fake process transport."""

    def __init__(
        self,
        reactor: FakeProcessReactor,
        proto: ProcessProtocol,
        args: list[str],
        env: dict[str, str],
    ):
        self.reactor = reactor
        self.proto = proto
        self.args = args
        self.env = env
        self.pid = next(_pids)
        self.received: list[jsonrpc.Message] = []
        self.held: list[jsonrpc.Message] = []
        self.exited = False
        self.stdin_is_closed = False
        # The child closed its end of stdin: what the bridge writes is lost.
        self.stdin_gone = False
        # While False, what the bridge writes waits in self.unread (a full pipe).
        self.reading = True
        self.unread: list[bytes] = []
        self.init_result = dict(INIT_RESULT)
        # What it lists, by list method (tools/list: its tools), and how
        # many items a page holds (0: all in one).
        self.lists: dict[str, list[dict[str, Any]]] = {}
        self.page_size = 0
        # When True, requests other than initialize wait in self.held.
        self.hold = reactor.hold
        self.transport = FakeProcessTransport(self)
        self._buffer = b""

    # What the bridge writes.

    def stdin_data(self, data: bytes) -> None:
        if not self.reading:
            self.unread.append(data)
            return
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            message = jsonrpc.loads(line)
            self.received.append(message)
            self.reactor.on_message(self, message)

    def stdin_closed(self) -> None:
        self.stdin_is_closed = True
        if self.reactor.exit_on_eof:
            self.exit(0)

    # What a test makes it do.

    def answer(self, message: jsonrpc.Message) -> None:
        method = message.get("method")
        if method == "initialize":
            self.send(jsonrpc.result(message["id"], self.init_result))
        elif method == "tools/call":
            args = message["params"].get("arguments", {})
            self.send(
                jsonrpc.result(message["id"], {"content": [{"type": "text", "text": repr(args)}]})
            )
        elif method in self.lists:
            self.send(jsonrpc.result(message["id"], self.list_page(method, message)))
        else:
            self.send(jsonrpc.result(message["id"], {}))

    def list_page(self, method: str, message: jsonrpc.Message) -> dict[str, Any]:
        """One page of a list it offers; the cursor is the offset, as text."""
        key = {"resources/templates/list": "resourceTemplates"}.get(method, method.split("/")[0])
        items = self.lists[method]
        start = int((message.get("params") or {}).get("cursor") or 0)
        size = self.page_size or len(items)
        result: dict[str, Any] = {key: items[start : start + size]}
        if start + size < len(items):
            result["nextCursor"] = str(start + size)
        return result

    def send(self, message: jsonrpc.Message) -> None:
        self.send_raw(jsonrpc.dumps(message) + b"\n")

    def send_raw(self, data: bytes, fd: int = 1) -> None:
        self.proto.childDataReceived(fd, data)

    def requests(self, method: str | None = None) -> list[jsonrpc.Message]:
        return [
            m
            for m in self.received
            if "method" in m and "id" in m and (method is None or m["method"] == method)
        ]

    def notifications(self, method: str | None = None) -> list[jsonrpc.Message]:
        return [
            m
            for m in self.received
            if "method" in m and "id" not in m and (method is None or m["method"] == method)
        ]

    def close_pipe(self, fd: int) -> None:
        """The child closes its stdin (0), stdout (1) or stderr (2) and runs on."""
        if fd == 0:
            self.stdin_gone = True
            if self.transport.producer is not None:
                self.transport.producer.stopProducing()
                self.transport.producer = None
        self.proto.childConnectionLost(fd)

    def stop_reading(self) -> None:
        """The child stops reading its stdin: the pipe fills and Twisted pauses the writer."""
        self.reading = False
        self.transport.producer.pauseProducing()

    def resume_reading(self) -> None:
        self.reading = True
        unread, self.unread = self.unread, []
        for data in unread:
            self.stdin_data(data)
        self.transport.producer.resumeProducing()

    def exit(self, code: int = 0, signal: int | None = None) -> None:
        if self.exited:
            return
        self.exited = True
        reason = (
            Failure(ProcessDone(0))
            if code == 0 and signal is None
            else Failure(ProcessTerminated(code, signal))
        )
        self.proto.processExited(reason)
        self.proto.processEnded(reason)


class FakeProcessReactor(Clock):
    """A Clock that can spawn L{FakeChild}ren and records group signals."""

    def __init__(self, hold: bool = False, exit_on_eof: bool = True) -> None:
        super().__init__()
        self.hold = hold
        self.exit_on_eof = exit_on_eof
        self.children: list[FakeChild] = []
        self.signals: list[tuple[int, int]] = []
        self.spawn_error: Exception | None = None
        self.on_spawn: Callable[[FakeChild], None] | None = None

    def spawnProcess(
        self,
        proto: ProcessProtocol,
        executable: str,
        args: list[str],
        env: dict[str, str] | None = None,
        path: str | None = None,
        uid: Any = None,
        gid: Any = None,
        usePTY: bool = False,
        childFDs: Any = None,
    ) -> FakeProcessTransport:
        if self.spawn_error is not None:
            raise self.spawn_error
        child = FakeChild(self, proto, list(args), dict(env or {}))
        self.children.append(child)
        proto.makeConnection(child.transport)
        if self.on_spawn is not None:
            self.on_spawn(child)
        return child.transport

    def killpg(self, pid: int, sig: int) -> None:
        self.signals.append((pid, sig))
        for child in self.children:
            if child.pid == pid and not child.exited and sig in (9, 15):
                child.exit(0, sig)
                return
        raise ProcessLookupError(pid)

    def on_message(self, child: FakeChild, message: jsonrpc.Message) -> None:
        if "method" not in message or "id" not in message:
            return
        if child.hold and message["method"] != "initialize":
            child.held.append(message)
        else:
            child.answer(message)

    @property
    def child(self) -> FakeChild:
        """The most recently spawned child."""
        return self.children[-1]


class Owner:
    """A child's owner that records what it is told of its end, and when."""

    def __init__(self) -> None:
        self.lost: list[str] = []
        self.lost_at: list[float] = []
        self.lost_once: Deferred[None] = Deferred()

    def child_spawned(self, child: Child) -> None:
        pass

    def child_message(self, child: Child, message: jsonrpc.Message) -> None:
        pass

    def child_oversize(self, child: Child, size: int, head: bytes, tail: bytes) -> None:
        pass

    def child_lost(self, child: Child, why: str) -> None:
        self.lost.append(why)
        self.lost_at.append(reactor.seconds())
        if not self.lost_once.called:
            self.lost_once.callback(None)
