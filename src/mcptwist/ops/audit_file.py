# -*- test-case-name: tests.test_audit -*-
"""The audit file: appended one whole line at a time, rotated by size.

A line that would take the file past C{max_size} goes to a fresh file, and
C{path.1} … C{path.keep} hold the older ones (C{path.1} the newest). A line
is never split across files.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Final

from twisted.logger import ILogObserver, LogEvent, Logger
from zope.interface import implementer

from mcptwist.ops.audit_encoding import encode_record

FILE_MODE: Final = 0o640
# Lines kept in memory while the file cannot be written, retried with the
# next event; beyond this the oldest are dropped (and counted).
BACKLOG_BYTES: Final = 8 * 1024 * 1024

# Problems with the audit file itself go to the main log. Module level: a
# Logger bound as a class attribute takes C{module.Class} as its namespace.
_writerLog = Logger(namespace="mcptwist.audit.writer")


class _RotatingFile:
    """An append-only file rotated by size, written with whole-line C{write}s.

    Not L{twisted.python.logfile.LogFile}: that rotates only once the file
    has reached C{rotateLength} (so files exceed it), ignores short writes
    (which would leave a torn line), gives up rotation silently when the
    directory is not writable, and sets the process-wide umask to create the
    file. Not thread-safe on its own; L{AuditFileObserver} holds a lock.
    """

    def __init__(self, path: str, max_size: int, keep: int) -> None:
        self.path = os.path.abspath(path)
        self.max_size = max_size
        self.keep = keep
        self.size = 0
        self.fd: int | None = None
        self.rotation_failing = False
        # Swapped in tests to simulate short writes and full disks.
        self.os_write: Callable[[int, memoryview], int] = os.write

    def open(self) -> None:
        """Open (or create, mode 0640) the file for appending."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except FileExistsError:
            fd = os.open(self.path, flags)
        else:
            try:
                os.fchmod(fd, FILE_MODE)  # exactly 0640, whatever the umask
            except OSError:
                pass
        self.fd = fd
        try:
            self.size = os.fstat(fd).st_size
            if self.size and not self._ends_with_newline():
                # A line torn by an earlier crash: end it, so the next is whole.
                self._write_all(b"\n")
        except OSError:
            self.fd = None
            os.close(fd)
            raise

    def _ends_with_newline(self) -> bool:
        try:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                return f.read(1) == b"\n"
        except OSError:
            return True

    def write(self, line: bytes) -> None:
        """Append one whole line, rotating first if it would not fit.

        @raise OSError: if the line could not be written; the file is then
            as it was before the call (a short write is truncated away).
        """
        if self.fd is None:
            self.open()
        if self.size > 0 and self.size + len(line) > self.max_size:
            try:
                self.rotate()
            except OSError as e:
                # Better a file past max_size than a lost audit event.
                if not self.rotation_failing:
                    self.rotation_failing = True
                    _writerLog.warn(
                        "cannot rotate the audit trail {path}: {error}; appending to it "
                        "and trying again with the next event",
                        path=self.path,
                        error=str(e),
                    )
                if self.fd is None:
                    self.open()
            else:
                self.rotation_failing = False
        self._write_all(line)

    def _write_all(self, data: bytes) -> None:
        assert self.fd is not None
        start = self.size
        view = memoryview(data)
        try:
            while view:
                written = self.os_write(self.fd, view)
                view = view[written:]
                self.size += written
        except OSError:
            # Take back whatever part of the line was written.
            try:
                if os.fstat(self.fd).st_size != start:
                    os.ftruncate(self.fd, start)
                self.size = start
            except OSError:
                pass
            raise

    def rotate(self) -> None:
        """Close, shift C{path.N} to C{path.N+1} (dropping beyond C{keep}), reopen."""
        self.close()
        directory, base = os.path.split(self.path)
        numbered = []
        for name in os.listdir(directory):
            suffix = name[len(base) + 1 :]
            if name.startswith(base + ".") and suffix.isdigit() and suffix[0] != "0":
                numbered.append(int(suffix))
        for n in sorted(numbered, reverse=True):
            old = f"{self.path}.{n}"
            if n >= self.keep:
                os.remove(old)
            else:
                os.rename(old, f"{self.path}.{n + 1}")
        if self.keep > 0:
            os.rename(self.path, f"{self.path}.1")
        else:
            os.remove(self.path)
        self.open()

    def close(self) -> None:
        """Sync and close (never raises); the next L{write} opens the file again."""
        fd, self.fd = self.fd, None
        if fd is not None:
            try:
                os.fsync(fd)
            except OSError:
                pass
            try:
                os.close(fd)
            except OSError:
                pass  # the descriptor is released whatever close() says


@implementer(ILogObserver)
class AuditFileObserver:
    """Writes the C{audit} record of each event as one JSON line.

    Each line reaches the kernel in one C{write} as soon as the event is
    observed, so lines never interleave and a crash of the bridge loses
    nothing already logged. A failed write is reported once to the main log;
    the line is kept (up to L{BACKLOG_BYTES}) and the file is reopened with
    the next event, so a full or vanished disk never stops the bridge.

    Events normally arrive on the reactor thread, but the writer holds a lock
    so that an event emitted from a worker thread (code that did not go
    through C{callFromThread}) can neither interleave a line nor corrupt the
    rotation state. Uncontended, the lock costs well under a microsecond.
    """

    def __init__(self, path: str, max_size: int, keep: int) -> None:
        self._file = _RotatingFile(path, max_size, keep)
        self._lock = threading.Lock()
        self._backlog: deque[bytes] = deque()
        self._backlog_bytes = 0
        self._running = False
        self._failing = False
        self._warned_stopped = False
        self.lost = 0
        """Events dropped: backlog overflow, or emitted while not running."""

    @property
    def path(self) -> str:
        return self._file.path

    def open(self) -> None:
        """Open the file and accept events.

        @raise OSError: if it cannot be opened.
        """
        with self._lock:
            self._file.open()
            self._running = True
            self._warned_stopped = False

    def close(self) -> None:
        """Write what is pending (one last try), sync, close, accept no more."""
        with self._lock:
            if self._running and self._backlog:
                self._drain()
            self._running = False
            self._file.close()

    def reopen(self) -> None:
        """Close and open the same path again, for logrotate; never raises."""
        with self._lock:
            if not self._running:
                return
            self._file.close()
            try:
                self._file.open()
            except OSError as e:
                self._failed(e)
                return
            if self._backlog:
                self._drain()

    def __call__(self, event: LogEvent) -> None:
        record = event.get("audit")
        if not isinstance(record, dict):
            return
        line = encode_record(record)
        with self._lock:
            if not self._running:
                self.lost += 1
                if not self._warned_stopped:
                    self._warned_stopped = True
                    _writerLog.warn(
                        "audit event {event} dropped: the audit trail {path} is not running",
                        event=record.get("event"),
                        path=self.path,
                    )
                return
            self._backlog.append(line)
            self._backlog_bytes += len(line)
            while self._backlog_bytes > BACKLOG_BYTES and len(self._backlog) > 1:
                self._backlog_bytes -= len(self._backlog.popleft())
                self.lost += 1
            self._drain()

    def _drain(self) -> None:
        try:
            while self._backlog:
                self._file.write(self._backlog[0])
                self._backlog_bytes -= len(self._backlog.popleft())
        except OSError as e:
            self._file.close()
            self._failed(e)
            return
        if self._failing:
            self._failing = False
            _writerLog.info(
                "audit trail {path} is written again ({lost} events lost so far)",
                path=self.path,
                lost=self.lost,
            )

    def _failed(self, error: OSError) -> None:
        if not self._failing:
            self._failing = True
            _writerLog.error(
                "cannot write the audit trail {path}: {error}; "
                "keeping events in memory and retrying with the next one",
                path=self.path,
                error=str(error),
            )
