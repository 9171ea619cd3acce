"""Writing at once: to a client's TCP connection and to a child's stdin, over
real sockets and pipes, with Twisted's buffer taking what they do not."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import tcp
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.process import ProcessWriter
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.child.direct import send_now, write_to_child


def drain(read: Callable[[], bytes]) -> bytes:
    got = b""
    while True:
        try:
            chunk = read()
        except BlockingIOError:
            return got
        if not chunk:
            return got
        got += chunk


def pattern(sizes: list[int]) -> list[bytes]:
    return [bytes([n % 251]) * size for n, size in enumerate(sizes)]


SIZES = st.lists(st.integers(min_value=1, max_value=3 << 20), min_size=1, max_size=6)


class SocketTests(SynchronousTestCase):
    def connection(self) -> tuple[tcp.Server, socket.socket, MemoryReactor]:
        reactor = MemoryReactor()
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        self.addCleanup(theirs.close)
        transport = tcp.Server(ours, Protocol(), ("127.0.0.1", 1), None, 1, reactor)
        transport.protocol.makeConnection(transport)
        self.addCleanup(transport.connectionLost, Failure(ConnectionDone()))
        return transport, theirs, reactor

    def test_sent_at_once_without_the_reactor(self) -> None:
        transport, peer, reactor = self.connection()
        send_now(transport, b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertEqual(drain(lambda: peer.recv(1 << 20)), b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertEqual(reactor.writers, set())

    @settings(max_examples=20, deadline=None)
    @given(SIZES)
    def test_what_the_socket_does_not_take_waits_in_order(self, sizes: list[int]) -> None:
        transport, peer, reactor = self.connection()
        chunks = pattern(sizes)
        for chunk in chunks:
            send_now(transport, chunk)
        got = drain(lambda: peer.recv(1 << 20))
        while len(got) < sum(sizes):
            self.assertEqual(reactor.writers, {transport})
            transport.doWrite()
            got += drain(lambda: peer.recv(1 << 20))
        self.assertEqual(got, b"".join(chunks))

    def test_a_closed_peer_is_left_to_twisted(self) -> None:
        """The send fails: the bytes wait in Twisted's buffer, whose own write
        then finds the connection gone (and closes it as usual)."""
        transport, peer, reactor = self.connection()
        peer.close()
        send_now(transport, b"x")
        self.assertEqual(reactor.writers, {transport})
        self.assertIsInstance(transport.doWrite(), ConnectionLost)

    def test_other_transports_write_as_usual(self) -> None:
        transport = StringTransport()
        send_now(transport, b"abc")
        send_now(transport, b"")
        self.assertEqual(transport.value(), b"abc")


class _Process:
    """What a ProcessWriter tells its process."""

    def __init__(self) -> None:
        self.pipes: dict[int, Any] = {}
        self.lost: list[int] = []

    def childConnectionLost(self, fd: int, reason: Failure) -> None:
        self.lost.append(fd)


class PipeTests(SynchronousTestCase):
    def pipe(self) -> tuple[_Process, int, MemoryReactor]:
        reactor = MemoryReactor()
        theirs, ours = os.pipe()
        os.set_blocking(theirs, False)
        self.addCleanup(os.close, theirs)
        process = _Process()
        writer = ProcessWriter(reactor, process, 0, ours)
        process.pipes[0] = writer
        self.addCleanup(writer.connectionLost, Failure(ConnectionDone()))
        return process, theirs, reactor

    def test_written_at_once_without_the_reactor(self) -> None:
        process, child, reactor = self.pipe()
        write_to_child(process, b'{"jsonrpc":"2.0","id":1,"method":"ping"}\n')
        self.assertEqual(
            drain(lambda: os.read(child, 1 << 20)), b'{"jsonrpc":"2.0","id":1,"method":"ping"}\n'
        )
        self.assertEqual(reactor.writers, set())

    @settings(max_examples=20, deadline=None)
    @given(SIZES)
    def test_what_the_pipe_does_not_take_waits_in_order(self, sizes: list[int]) -> None:
        process, child, reactor = self.pipe()
        writer = process.pipes[0]
        chunks = pattern(sizes)
        for chunk in chunks:
            write_to_child(process, chunk)
        got = drain(lambda: os.read(child, 1 << 20))
        while len(got) < sum(sizes):
            self.assertIn(writer, reactor.writers)
            writer.doWrite()
            got += drain(lambda: os.read(child, 1 << 20))
        self.assertEqual(got, b"".join(chunks))

    def test_other_transports_write_as_usual(self) -> None:
        transport = StringTransport()
        write_to_child(transport, b"abc")
        self.assertEqual(transport.value(), b"abc")
