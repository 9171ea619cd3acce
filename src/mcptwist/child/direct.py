# -*- test-case-name: tests.test_direct -*-
"""Writing to a descriptor at once, when nothing waits to be written.

Twisted's descriptors buffer every write until the reactor's next turn: the
descriptor is registered for writing, written when the poll says it may be,
and unregistered, two more system calls and a turn of the loop for each
message. When nothing is buffered, L{write_now} writes straight away, and
leaves to Twisted only what the descriptor does not take, behind which
every later write then waits: nothing overtakes what is buffered.

It serves the child's stdin (a C{ProcessWriter}) and, in the web layer, a
client's plain TCP connection. Any other transport (TLS, a wrapper, a test
double) is written to as usual.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.process import ProcessWriter
from twisted.internet.tcp import Server


def write_now(descriptor: FileDescriptor, data: bytes, write: Callable[[bytes], int]) -> None:
    """Write C{data} to C{descriptor}: through C{write} at once while nothing
    is buffered, and whatever it does not take through Twisted."""
    if not data:
        return
    if (
        descriptor.connected
        and not descriptor.disconnecting
        and not descriptor._writeDisconnected
        and not descriptor._tempDataLen
        and descriptor.offset == len(descriptor.dataBuffer)
    ):
        try:
            written = write(data)
        except OSError:
            # Full (EAGAIN), or broken: Twisted finds out which when it writes.
            written = 0
        if written == len(data):
            return
        data = data[written:]
    descriptor.write(data)


def send_now(transport: Any, data: bytes) -> None:
    """Write to a client's connection: at once on a plain TCP one."""
    if type(transport) is Server:
        write_now(transport, data, transport.socket.send)
    elif data and transport is not None:
        transport.write(data)


def write_to_child(transport: Any, data: bytes) -> None:
    """Write to a child's stdin: at once on a real process's pipe."""
    pipes = getattr(transport, "pipes", None)
    writer = pipes.get(0) if isinstance(pipes, dict) else None
    if type(writer) is ProcessWriter:
        fd = writer.fd
        write_now(writer, data, lambda chunk: os.write(fd, chunk))
    else:
        transport.write(data)
