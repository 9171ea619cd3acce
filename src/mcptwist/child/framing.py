# -*- test-case-name: tests.test_framing -*-
"""Split a byte stream into newline-delimited lines, with a hard size cap.

Used for a child's stdout (one JSON-RPC message per line) and its stderr (log
lines). Memory stays bounded: a line longer than the limit is discarded as it
arrives, and only its first and last few bytes are kept so that the caller
can still tell which request it answered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

KEEP: Final = 4096


class LineFramer:
    """Feed bytes in, get complete lines out through C{on_line}.

    @ivar max_length: the longest line delivered, in bytes, excluding the
        newline. A longer one goes to C{on_overflow(size, head, tail)} instead.
    """

    def __init__(
        self,
        max_length: int,
        on_line: Callable[[bytes], None],
        on_overflow: Callable[[int, bytes, bytes], None],
    ) -> None:
        self.max_length = max_length
        self._on_line = on_line
        self._on_overflow = on_overflow
        self._parts: list[bytes] = []
        self._size = 0
        # While discarding an oversize line: its size so far, head and tail.
        self._dropped: int | None = None
        self._head = b""
        self._tail = b""

    @property
    def buffered(self) -> int:
        """Bytes held for the current partial line (never above max_length)."""
        return self._size

    def feed(self, data: bytes) -> None:
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                self._accumulate(data[start:])
                return
            self._accumulate(data[start:nl])
            self._end_line()
            start = nl + 1

    def _accumulate(self, chunk: bytes) -> None:
        if not chunk:
            return
        if self._dropped is not None:
            self._dropped += len(chunk)
            self._tail = (self._tail + chunk)[-KEEP:]
            return
        self._parts.append(chunk)
        self._size += len(chunk)
        if self._size > self.max_length:
            line = b"".join(self._parts)
            self._parts = []
            self._size = 0
            self._dropped = len(line)
            self._head = line[:KEEP]
            self._tail = line[-KEEP:]

    def _end_line(self) -> None:
        if self._dropped is not None:
            size, head, tail = self._dropped, self._head, self._tail
            self._dropped = None
            self._head = self._tail = b""
            self._on_overflow(size, head, tail.rstrip(b"\r"))
            return
        line = b"".join(self._parts)
        self._parts = []
        self._size = 0
        if line.endswith(b"\r"):
            line = line[:-1]
        self._on_line(line)

    def flush(self) -> None:
        """Deliver a final line that had no newline (the stream has ended)."""
        if self._parts or self._dropped is not None:
            self._end_line()
