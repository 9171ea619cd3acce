# -*- test-case-name: tests.test_process -*-
"""One child process: spawn it, frame its output, stop it cleanly.

A L{Child} is one incarnation of an MCP server. It runs in its own process
group (so that a C{npx} or shell wrapper's whole tree is stopped), gets an
allow-listed environment (never the bridge's own secrets), frames stdout as
newline-delimited JSON-RPC and stderr as log lines (kept in a ring buffer),
and stops with the sequence the MCP lifecycle recommends: close stdin, then
SIGTERM the group, then SIGKILL it.

A child that closes its stdout or its stdin while it keeps running can no
longer be talked to: it is reported as broken (and the supervisor stops and
restarts it). What the bridge writes to a child that does not read its stdin
is bounded (by the server's C{max_message_size}): beyond it, messages are
refused rather than buffered without end.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol, cast

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IProcessTransport,
    IPushProducer,
    IReactorProcess,
    IReactorTime,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mcptwist.child.direct import write_to_child
from mcptwist.child.framing import LineFramer
from mcptwist.config.model import ServerConfig
from mcptwist.mcp import jsonrpc

# The variables a child inherits from the bridge's environment when set; the
# rest (tokens, keys, LISTEN_FDS...) stays with the bridge.
INHERITED_ENV: Final = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "TERM",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "LC_MESSAGES",
    "TZ",
    "TMPDIR",
    "XDG_RUNTIME_DIR",
    "XDG_CACHE_HOME",
    "XDG_CONFIG_HOME",
    "XDG_DATA_HOME",
    "NODE_EXTRA_CA_CERTS",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
)
DEFAULT_CHILD_ENV: Final = {"PYTHONUNBUFFERED": "1"}
MAX_STDERR_LINE: Final = 8192
# Seconds after a child's exit that its pipes may stay open (output still in
# flight) before the bridge closes them.
PIPE_DRAIN: Final = 1.0
# Seconds a child whose stdout or stdin closed has to exit (an exiting process
# closes its pipes just before the bridge hears of its exit) before it is taken
# for one that stopped talking while it runs.
EOF_GRACE: Final = 0.5
# The names of the pipes a child may close, by file descriptor.
_PIPES: Final = {0: "stdin", 1: "stdout", 2: "stderr"}

# Run the configured command in a new session (so in its own process group,
# pgid == pid) without forking: the pid Twisted knows stays the server's.
_SETSID_EXEC: Final = (
    "import os, sys\n"
    "os.setsid()\n"
    "try:\n"
    "    os.execvp(sys.argv[1], sys.argv[1:])\n"
    "except OSError as e:\n"
    "    sys.stderr.write(f'mcptwist: cannot run {sys.argv[1]!r}: {e.strerror}\\n')\n"
    "    sys.exit(127)\n"
)

log = Logger(namespace="mcptwist.process")


def child_environment(server: ServerConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """The complete environment of a child: allow-list, defaults, then config."""
    env = {k: environ[k] for k in INHERITED_ENV if k in environ}
    env.setdefault("PATH", os.defpath)
    env.update(DEFAULT_CHILD_ENV)
    env.update({k: environ[k] for k in server.env_passthrough if k in environ})
    env.update(server.env)
    return env


def describe_exit(reason: Failure) -> str:
    """A short human description of how a process ended."""
    value = reason.value
    if isinstance(value, ProcessDone):
        return "exited with code 0"
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            try:
                name = signal.Signals(value.signal).name
            except ValueError:
                name = str(value.signal)
            return f"killed by {name}"
        return f"exited with code {value.exitCode}"
    return str(value)


class ChildListener(Protocol):
    """What a L{Child} reports to (the supervisor, and through it the router)."""

    def child_message(self, child: Child, message: jsonrpc.Message) -> None: ...

    def child_oversize(self, child: Child, size: int, head: bytes, tail: bytes) -> None: ...

    def child_exited(self, child: Child, reason: Failure) -> None: ...

    def child_broken(self, child: Child, why: str) -> None:
        """The child runs but can no longer be talked to (C{why} says how)."""


@implementer(IPushProducer)
class _StdinBacklog:
    """What a child has left unread on its stdin, as far as the bridge can tell.

    Registered as the producer of the child's stdin: Twisted pauses it when its
    buffer for the pipe passes its size (64 KiB) and resumes it once that buffer
    is empty, so the bytes written while paused wait, unread, on top of that.
    """

    def __init__(self) -> None:
        self.paused = False
        self.unread = 0
        # Messages were refused since the last pause (the log says so once).
        self.refusing = False
        self.server = ""

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        if self.refusing:
            log.info("{server}: the child reads its stdin again", server=self.server)
        self.paused = self.refusing = False
        self.unread = 0

    def stopProducing(self) -> None:
        """The pipe is gone (the child closed it, or the bridge did)."""


class _ChildProtocol(ProcessProtocol):
    def __init__(self, child: Child) -> None:
        self.child = child

    def connectionMade(self) -> None:
        self.child._connected(getattr(self.transport, "pid", None))

    def outReceived(self, data: bytes) -> None:
        self.child._stdout.feed(data)

    def errReceived(self, data: bytes) -> None:
        self.child._stderr.feed(data)

    def childConnectionLost(self, childFD: int) -> None:
        self.child._pipe_closed(childFD)

    def processExited(self, reason: Failure) -> None:
        self.child._exited(reason)

    def processEnded(self, reason: Failure) -> None:
        self.child._ended(reason)


@attrs.define(eq=False)
class Child:
    """One running incarnation of a server's process."""

    server: ServerConfig
    listener: ChildListener
    reactor: Any  # IReactorProcess & IReactorTime
    stderr_tail: deque[str]
    transport: IProcessTransport | None = None
    pid: int | None = None
    started: float = 0.0
    exit_reason: Failure | None = None
    ended: Deferred[None] = attrs.field(factory=Deferred)
    killpg: Callable[[int, int], None] = os.killpg
    _stdout: LineFramer = attrs.field(init=False)
    _stderr: LineFramer = attrs.field(init=False)
    _stderr_log: Logger = attrs.field(init=False)
    _timers: list[IDelayedCall] = attrs.field(factory=list)
    _backlog: _StdinBacklog = attrs.field(factory=_StdinBacklog)
    # The bridge is stopping the child: the pipes it closes are no news.
    _stopping: bool = False

    def __attrs_post_init__(self) -> None:
        self._stdout = LineFramer(self.server.max_message_size, self._line, self._oversize)
        self._stderr = LineFramer(MAX_STDERR_LINE, self._stderr_line, self._stderr_oversize)
        # Each server's stderr has a log namespace of its own, to filter on.
        self._stderr_log = Logger(namespace=f"mcptwist.child.{self.server.name}")
        self._backlog.server = self.server.name

    def spawn(self, environ: Mapping[str, str]) -> None:
        """Start the process. Raises if the reactor cannot spawn it."""
        proto = _ChildProtocol(self)
        args = [
            sys.executable,
            "-c",
            _SETSID_EXEC,
            self.server.command,
            *self.server.args,
        ]
        reactor: IReactorProcess = self.reactor
        self.transport = reactor.spawnProcess(
            proto,
            sys.executable,
            args,
            env=child_environment(self.server, environ),
            path=self.server.cwd,
            childFDs={0: "w", 1: "r", 2: "r"},
        )
        self.pid = self.transport.pid
        self._stdin().registerProducer(self._backlog, True)

    @property
    def unread(self) -> int:
        """Bytes written to the child's stdin that it has not read (beyond 64 KiB)."""
        return self._backlog.unread if self._backlog.paused else 0

    def send(self, message: jsonrpc.Message, at_once: bool = True) -> bool:
        """Write one message to the child's stdin: C{at_once} when the child
        is idle (it waits for nothing else), else with whatever else is
        written to it in this turn of the reactor, in one write.

        Returns False, writing nothing, when the child has left more than
        max_message_size bytes unread: a child that stops reading must not
        make the bridge buffer without bound.
        """
        if self.transport is None or self.exit_reason is not None:
            return True
        backlog = self._backlog
        if backlog.paused and backlog.unread >= self.server.max_message_size:
            if not backlog.refusing:
                backlog.refusing = True
                log.warn(
                    "{server}: child (pid {pid}) is not reading its stdin: more than {limit} "
                    "bytes (max_message_size) wait unread; refusing what the bridge would "
                    "write to it until it reads again",
                    server=self.server.name,
                    pid=self.pid,
                    limit=self.server.max_message_size,
                )
            return False
        data = jsonrpc.dumps(message)
        if backlog.paused:
            backlog.unread += len(data) + 1
        if at_once:
            write_to_child(self.transport, data + b"\n")
        else:
            self.transport.writeSequence([data, b"\n"])
        return True

    def stop(self) -> Deferred[None]:
        """Close stdin, SIGTERM the group after term_after, SIGKILL after kill_after.

        The Deferred fires once the process has exited and its pipes closed.
        """
        if self.ended.called or self.transport is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self.ended.addBoth(lambda r: d.callback(None))
        if self.exit_reason is not None or self._stopping:
            # Already exited (its pipes are being drained), or being stopped.
            return d
        self._stopping = True
        try:
            self._close_stdin()
        except Exception:
            log.failure("closing stdin of {server}", server=self.server.name)
        if self.exit_reason is not None:
            # It left as soon as its stdin closed: nothing to escalate.
            return d
        clock: IReactorTime = self.reactor
        term = self.server.term_after
        self._timers += [
            clock.callLater(term, self.signal_group, signal.SIGTERM),
            clock.callLater(term + self.server.kill_after, self.signal_group, signal.SIGKILL),
        ]
        return d

    def _stdin(self) -> IConsumer:
        """The transport as the consumer of the child's stdin (which Twisted's
        process transports are, without declaring it)."""
        return cast(IConsumer, self.transport)

    def _close_stdin(self) -> None:
        assert self.transport is not None
        # A paused producer would keep the pipe open until it is unregistered.
        self._stdin().unregisterProducer()
        self.transport.closeStdin()

    def kill(self) -> None:
        """SIGKILL the child's whole process group now."""
        self.signal_group(signal.SIGKILL)

    def signal_group(self, sig: int) -> None:
        if self.pid is None:
            return
        if self.exit_reason is not None and os.path.exists(f"/proc/{self.pid}"):
            # Our process was reaped, so a process with its pid is a newcomer
            # leading a group of its own: the number is no longer ours.
            return
        try:
            self.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    # Callbacks from the process protocol.

    def _connected(self, pid: int | None) -> None:
        log.info("{server}: child started (pid {pid})", server=self.server.name, pid=pid)

    def _line(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            message = jsonrpc.loads(line)
            jsonrpc.classify(message)
        except jsonrpc.ProtocolError as e:
            log.warn(
                "{server}: skipped a stdout line that is not JSON-RPC ({problem}): {excerpt}",
                server=self.server.name,
                problem=e.message,
                excerpt=line[:200].decode("utf-8", "replace"),
            )
            return
        try:
            self.listener.child_message(self, message)
        except Exception:
            # A message the router cannot handle must not stop the reading of
            # this child's output (Twisted would close the pipe).
            log.failure(
                "{server}: failed to route a message from the child: {excerpt}",
                server=self.server.name,
                excerpt=line[:200].decode("utf-8", "replace"),
            )

    def _oversize(self, size: int, head: bytes, tail: bytes) -> None:
        log.warn(
            "{server}: dropped a {size}-byte message from the child (max_message_size is {limit})",
            server=self.server.name,
            size=size,
            limit=self.server.max_message_size,
        )
        self.listener.child_oversize(self, size, head, tail)

    def _stderr_line(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        self.stderr_tail.append(text)
        self._stderr_log.info(
            "{server} stderr: {line}", server=self.server.name, line=text, pid=self.pid
        )

    def _stderr_oversize(self, size: int, head: bytes, tail: bytes) -> None:
        self._stderr_line(head[:MAX_STDERR_LINE] + f" ... ({size} bytes)".encode())

    def _pipe_closed(self, fd: int) -> None:
        """One of the child's pipes closed (the child closed it, or is exiting).

        An exiting process closes its pipes just before its exit is seen: only
        a child still running EOF_GRACE later closed one itself.
        """
        # The stream has ended: a last line without its newline is complete.
        if fd == 1:
            self._stdout.flush()
        elif fd == 2:
            self._stderr.flush()
        if self.exit_reason is None and not self._stopping:
            clock: IReactorTime = self.reactor
            self._timers.append(clock.callLater(EOF_GRACE, self._pipe_lost, fd))

    def _pipe_lost(self, fd: int) -> None:
        """The child closed a pipe and runs on. Without stdin or stdout it can no
        longer be talked to: it is broken. Stderr is only its log."""
        if self.exit_reason is not None or self._stopping or self.ended.called:
            return
        name = _PIPES.get(fd, f"file descriptor {fd}")
        if fd not in (0, 1):
            log.info(
                "{server}: child (pid {pid}) closed its {name}; it goes on serving",
                server=self.server.name,
                pid=self.pid,
                name=name,
            )
            return
        try:
            self.listener.child_broken(self, f"closed its {name} while still running")
        except Exception:
            log.failure("{server}: while handling the child's broken pipe", server=self.server.name)

    def _exited(self, reason: Failure) -> None:
        # The server has exited; stray members of its group (grandchildren)
        # must not outlive it. Output still in the pipes is delivered before
        # processEnded, so the listener hears of the exit only then.
        self.exit_reason = reason
        self.signal_group(signal.SIGTERM)
        clock: IReactorTime = self.reactor
        self._timers += [
            clock.callLater(self.server.kill_after, self.signal_group, signal.SIGKILL),
            # A grandchild that left the group (setsid) can hold the pipes open
            # forever; after a short drain, close our ends so the exit is seen.
            clock.callLater(PIPE_DRAIN, self._close_pipes),
        ]

    def _close_pipes(self) -> None:
        if self.transport is not None and not self.ended.called:
            log.warn(
                "{server}: child (pid {pid}) exited but something still holds its output open; "
                "closing the pipes",
                server=self.server.name,
                pid=self.pid,
            )
            self._stdin().unregisterProducer()
            self.transport.loseConnection()

    def _ended(self, reason: Failure) -> None:
        if self.exit_reason is None:
            self.exit_reason = reason
        self._stdout.flush()
        self._stderr.flush()
        self._cancel_timers()
        self.signal_group(signal.SIGKILL)
        log.info(
            "{server}: child (pid {pid}) {how}",
            server=self.server.name,
            pid=self.pid,
            how=describe_exit(self.exit_reason),
        )
        try:
            self.listener.child_exited(self, self.exit_reason)
        except Exception:
            log.failure("{server}: while handling the child's exit", server=self.server.name)
        finally:
            self._cancel_timers()
            self.ended.callback(None)

    def _cancel_timers(self) -> None:
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers.clear()


def stderr_buffer(server: ServerConfig) -> deque[str]:
    return deque(maxlen=server.stderr_lines)
