# -*- test-case-name: tests.test_notify -*-
"""Tell systemd how the bridge is doing: the sd_notify protocol, without a library.

Under C{Type=notify} (or C{notify-reload}) systemd passes C{NOTIFY_SOCKET},
the address of an C{AF_UNIX} datagram socket. Each message is one datagram
of C{KEY=VALUE} lines: C{READY=1} once the bridge serves, C{RELOADING=1}
and C{READY=1} around a reload, C{STOPPING=1} on the way out, C{STATUS=}
for C{systemctl status}, and C{WATCHDOG=1} every half C{WATCHDOG_USEC}
when C{WatchdogSec=} is set.

Notifying is best effort: a send never blocks and never raises. A failure
is logged once per kind (C{ENOENT}, C{ENOBUFS}, ...), since the same
failure usually repeats with every watchdog ping. Without C{NOTIFY_SOCKET}
every method returns at once.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import time
from collections.abc import Mapping

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger(namespace="mcptwist.notify")

_KEY = re.compile(r"^[A-Z_][A-Z0-9_]*$")
# Server states in the order a status line lists them; others follow, sorted.
_STATE_ORDER = ("running", "starting", "restarting", "failed", "stopped")
# How many servers a status line names per state before it only counts them.
_NAMES_SHOWN = 3


def one_line(text: str) -> str:
    """C{text} with every line break and other unprintable character made a space.

    C{STATUS=} is one line of the datagram: a newline in it would end the
    field and start another (a server name could otherwise inject fields).
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else " " for c in text)


def _notify_address(value: str) -> str | None:
    """The socket address in C{NOTIFY_SOCKET}: a path, or C{@name} (abstract)."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Seconds between C{WATCHDOG=1} pings (half of C{WATCHDOG_USEC}), or None.

    systemd sets C{WATCHDOG_PID} to the process it watches; a process that
    merely inherited the variables (a child, say) must not ping for it.
    """
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


def monotonic_usec() -> int:
    """C{CLOCK_MONOTONIC} in microseconds, as C{MONOTONIC_USEC=} must be."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class SystemdNotifier:
    """Sends sd_notify messages to the socket named in C{environ}, if any."""

    def __init__(self, environ: Mapping[str, str], clock: IReactorTime) -> None:
        self._address: str | None = None
        self._socket: socket.socket | None = None
        self._failures: set[str] = set()
        raw = environ.get("NOTIFY_SOCKET", "")
        if raw:
            self._address = _notify_address(raw)
            if self._address is None:
                # vsock: (systemd 254+) and anything else: not spoken here.
                log.warn(
                    "NOTIFY_SOCKET={value!r} is not a Unix socket path or @name; "
                    "systemd will not be told that the bridge is ready",
                    value=raw,
                )
        self.watchdog_interval = _watchdog_interval(environ) if self._address is not None else None
        self._watchdog = LoopingCall(self.send, WATCHDOG="1")
        self._watchdog.clock = clock

    @property
    def enabled(self) -> bool:
        """Whether systemd is listening (C{NOTIFY_SOCKET} was given)."""
        return self._address is not None

    def ready(self, status: str | None = None) -> None:
        """The bridge serves: its listeners answer and its children run."""
        self._with_status(status, READY="1")

    def reloading(self, status: str | None = None) -> None:
        """A reload has begun; C{ready} ends it.

        C{Type=notify-reload} requires C{MONOTONIC_USEC} with C{RELOADING=1},
        so that systemd can tell this reload from an earlier one.
        """
        if self.enabled:
            self._with_status(status, RELOADING="1", MONOTONIC_USEC=str(monotonic_usec()))

    def stopping(self, status: str | None = None) -> None:
        """The bridge is shutting down (children are being stopped)."""
        self._with_status(status, STOPPING="1")

    def status(self, text: str) -> None:
        """Free-form one-line status shown by C{systemctl status}."""
        self.send(STATUS=text)

    def start_watchdog(self) -> None:
        """Ping the watchdog now and every half C{WATCHDOG_USEC}, if systemd asks."""
        if self.watchdog_interval is not None and not self._watchdog.running:
            self._watchdog.start(self.watchdog_interval, now=True)

    def stop_watchdog(self) -> None:
        if self._watchdog.running:
            self._watchdog.stop()

    def _with_status(self, status: str | None, **fields: str) -> None:
        if status is not None:
            fields["STATUS"] = status
        self.send(**fields)

    def send(self, **fields: str) -> bool:
        """Send C{KEY=VALUE} lines in one datagram; values are made one line.

        @return: whether the datagram was sent.
        """
        if not self.enabled:
            return False
        lines = []
        for key, value in fields.items():
            if not _KEY.match(key):
                raise ValueError(f"{key!r} is not an sd_notify field name")
            lines.append(f"{key}={one_line(str(value))}")
        return self.send_raw("\n".join(lines) + "\n")

    def send_raw(self, message: str) -> bool:
        """Send C{message} as it is, in one datagram, without blocking.

        @return: whether it was sent; a failure is logged once per kind.
        """
        if self._address is None:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            self._socket.sendto(message.encode("utf-8"), self._address)
        except OSError as e:
            kind = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__
            if kind not in self._failures:
                self._failures.add(kind)
                log.warn(
                    "cannot notify systemd at {address} ({kind}: {error}); "
                    "later {kind} failures are not logged",
                    address=self._address.replace("\0", "@"),
                    kind=kind,
                    error=e.strerror or str(e),
                )
            return False
        return True

    def close(self) -> None:
        """Stop the watchdog and close the socket (sending again reopens it)."""
        self.stop_watchdog()
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def status_line(servers: Mapping[str, str], sessions: int) -> str:
    """A one-line summary for C{STATUS=}: servers by state, and the session count.

    C{servers} maps each server's name to its state. Servers that are not
    running are named, a few per state, so that C{systemctl status} shows
    which one to look at: C{"3 servers: 2 running, 1 failed (files); 12 sessions"}.
    """
    by_state: dict[str, list[str]] = {}
    for name, state in sorted(servers.items()):
        by_state.setdefault(one_line(state) or "unknown", []).append(one_line(name))
    order = [s for s in _STATE_ORDER if s in by_state]
    order += sorted(set(by_state) - set(_STATE_ORDER))
    parts = []
    for state in order:
        names = by_state[state]
        part = f"{len(names)} {state}"
        if state != "running":
            shown = ", ".join(names[:_NAMES_SHOWN])
            if len(names) > _NAMES_SHOWN:
                shown += f", +{len(names) - _NAMES_SHOWN} more"
            part += f" ({shown})"
        parts.append(part)
    summary = _plural(len(servers), "server")
    if parts:
        summary += ": " + ", ".join(parts)
    return f"{summary}; {_plural(sessions, 'session')}"
