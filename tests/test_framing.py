"""The line framer that splits a child's output."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.child.framing import KEEP, LineFramer

LIMIT = 64


class Collector:
    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.overflows: list[tuple[int, bytes, bytes]] = []

    def framer(self, limit: int = LIMIT) -> LineFramer:
        return LineFramer(
            limit, self.lines.append, lambda n, h, t: self.overflows.append((n, h, t))
        )


lines = st.lists(st.binary(max_size=3 * LIMIT).map(lambda b: b.replace(b"\n", b"")), max_size=20)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


class LineFramerTests(SynchronousTestCase):
    @given(lines, st.lists(st.integers(min_value=0, max_value=10_000), max_size=30))
    def test_any_chunking_gives_the_same_lines(self, items: list[bytes], cuts: list[int]) -> None:
        """Short lines arrive whole; long ones are reported, never delivered; memory stays bounded."""
        c = Collector()
        f = c.framer()
        for chunk in chunked(b"".join(item + b"\n" for item in items), cuts):
            f.feed(chunk)
            self.assertLessEqual(f.buffered, LIMIT)
        expected = [i[:-1] if i.endswith(b"\r") else i for i in items if len(i) <= LIMIT]
        self.assertEqual(c.lines, expected)
        self.assertEqual([n for n, _, _ in c.overflows], [len(i) for i in items if len(i) > LIMIT])

    @given(st.binary(max_size=200).map(lambda b: b.replace(b"\n", b"")))
    def test_unterminated_line_flushed_at_end(self, data: bytes) -> None:
        c = Collector()
        f = c.framer(limit=1000)
        f.feed(data)
        f.flush()
        self.assertEqual(c.lines, [data.removesuffix(b"\r")] if data else [])

    def test_oversize_keeps_head_and_tail(self) -> None:
        c = Collector()
        f = c.framer(limit=10_000)
        body = b'{"jsonrpc":"2.0","id":42,"result":"' + b"x" * 50_000 + b'"}'
        for i in range(0, len(body), 4096):
            f.feed(body[i : i + 4096])
        f.feed(b"\nnext\n")
        [(size, head, tail)] = c.overflows
        self.assertEqual(size, len(body))
        self.assertEqual(head, body[:KEEP])
        self.assertEqual(tail, body[-KEEP:])
        self.assertEqual(c.lines, [b"next"])

    def test_large_line_in_many_chunks_is_linear(self) -> None:
        """A 16 MiB line fed in 64 KiB pieces is assembled once."""
        c = Collector()
        f = c.framer(limit=16 * 1024 * 1024)
        piece = b"a" * 65536
        for _ in range(256):
            f.feed(piece)
        f.feed(b"\n")
        self.assertEqual([len(line) for line in c.lines], [16 * 1024 * 1024])
