"""sd_notify against a real Unix datagram socket: messages, watchdog, failures."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.ops.notify import SystemdNotifier, monotonic_usec, one_line, status_line


class Receiver:
    """What systemd would be: a datagram socket that collects what it is sent."""

    def __init__(self, test: SynchronousTestCase, abstract: bool = False) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        test.addCleanup(self.socket.close)
        if abstract:
            name = f"mcptwist-test-{uuid.uuid4().hex}"
            self.socket.bind("\0" + name)
            self.address = "@" + name
        else:
            # A short directory of its own: socket paths are limited to 107 bytes.
            directory = tempfile.mkdtemp(prefix="sdn-")
            test.addCleanup(shutil.rmtree, directory, True)
            self.address = os.path.join(directory, "notify")
            self.socket.bind(self.address)
        self.socket.setblocking(False)

    def messages(self) -> list[str]:
        """Every datagram received so far (and not yet returned), decoded."""
        received = []
        while True:
            try:
                received.append(self.socket.recv(65536).decode("utf-8"))
            except BlockingIOError:
                return received


class NotifierTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.receiver = Receiver(self)
        self.clock = Clock()

    def notifier(self, **environ: str) -> SystemdNotifier:
        environ.setdefault("NOTIFY_SOCKET", self.receiver.address)
        notifier = SystemdNotifier(environ, self.clock)
        self.addCleanup(notifier.close)
        return notifier

    def test_ready_stopping_status(self) -> None:
        """Each call is one datagram of C{KEY=VALUE} lines, each ending in a newline."""
        notifier = self.notifier()
        self.assertTrue(notifier.enabled)
        notifier.ready("serving 1 server")
        notifier.status("busy")
        notifier.stopping("stopping children")
        notifier.ready()
        self.assertEqual(
            self.receiver.messages(),
            [
                "READY=1\nSTATUS=serving 1 server\n",
                "STATUS=busy\n",
                "STOPPING=1\nSTATUS=stopping children\n",
                "READY=1\n",
            ],
        )

    def test_reloading_carries_the_monotonic_time(self) -> None:
        """C{RELOADING=1} comes with C{MONOTONIC_USEC}, as notify-reload requires."""
        notifier = self.notifier()
        before = monotonic_usec()
        notifier.reloading("re-reading certificates")
        after = monotonic_usec()
        [message] = self.receiver.messages()
        lines = message.split("\n")
        self.assertEqual(lines[0], "RELOADING=1")
        key, _, value = lines[1].partition("=")
        self.assertEqual(key, "MONOTONIC_USEC")
        self.assertTrue(before <= int(value) <= after, (before, value, after))
        self.assertEqual(lines[2:], ["STATUS=re-reading certificates", ""])

    def test_status_is_one_line(self) -> None:
        """Line breaks in a status (or any value) cannot start another field."""
        notifier = self.notifier()
        notifier.status("first\nREADY=1\r\nthird\u2028fourth")
        notifier.send(STATUS="a\nb", ERRNO="5")
        self.assertEqual(
            self.receiver.messages(),
            ["STATUS=first READY=1  third fourth\n", "STATUS=a b\nERRNO=5\n"],
        )

    def test_send_raw_and_bad_field_names(self) -> None:
        notifier = self.notifier()
        self.assertTrue(notifier.send_raw("FDSTORE=0\n"))
        self.assertRaises(ValueError, notifier.send, status="lower case")
        self.assertRaises(ValueError, notifier.send, **{"A=B": "1"})
        self.assertEqual(self.receiver.messages(), ["FDSTORE=0\n"])

    def test_abstract_socket(self) -> None:
        """C{NOTIFY_SOCKET=@name} is a socket in the abstract namespace."""
        receiver = Receiver(self, abstract=True)
        notifier = self.notifier(NOTIFY_SOCKET=receiver.address)
        notifier.ready("up")
        self.assertEqual(receiver.messages(), ["READY=1\nSTATUS=up\n"])
        self.assertEqual(self.receiver.messages(), [])

    def test_unset_socket_sends_nothing(self) -> None:
        """Without C{NOTIFY_SOCKET}, every method is a no-op (no socket, no timer)."""
        notifier = SystemdNotifier({"WATCHDOG_USEC": "1000000"}, self.clock)
        self.assertFalse(notifier.enabled)
        self.assertIsNone(notifier.watchdog_interval)
        notifier.ready("x")
        notifier.reloading("x")
        notifier.stopping("x")
        notifier.status("x")
        self.assertFalse(notifier.send(READY="1"))
        self.assertFalse(notifier.send_raw("READY=1\n"))
        notifier.start_watchdog()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        notifier.stop_watchdog()
        notifier.close()
        self.assertIsNone(notifier._socket)
        self.assertEqual(self.receiver.messages(), [])

    def test_unsupported_address_is_disabled(self) -> None:
        with capturedLogs() as events:
            notifier = SystemdNotifier({"NOTIFY_SOCKET": "vsock:2:1234"}, self.clock)
        self.assertFalse(notifier.enabled)
        self.assertEqual([e["value"] for e in events], ["vsock:2:1234"])

    def test_watchdog_every_half_watchdog_usec(self) -> None:
        """C{WATCHDOG=1} at once, then every C{WATCHDOG_USEC}/2 on the given clock."""
        notifier = self.notifier(WATCHDOG_USEC="10000000", WATCHDOG_PID=str(os.getpid()))
        self.assertEqual(notifier.watchdog_interval, 5.0)
        notifier.start_watchdog()
        notifier.start_watchdog()  # a second start changes nothing
        self.assertEqual(self.receiver.messages(), ["WATCHDOG=1\n"])
        self.clock.advance(4.9)
        self.assertEqual(self.receiver.messages(), [])
        self.clock.advance(0.1)
        self.assertEqual(self.receiver.messages(), ["WATCHDOG=1\n"])
        self.clock.pump([5.0] * 3)
        self.assertEqual(self.receiver.messages(), ["WATCHDOG=1\n"] * 3)
        notifier.stop_watchdog()
        self.clock.advance(60)
        self.assertEqual(self.receiver.messages(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_watchdog_without_pid_is_ours(self) -> None:
        notifier = self.notifier(WATCHDOG_USEC="3000000")
        self.assertEqual(notifier.watchdog_interval, 1.5)

    def test_watchdog_for_another_pid_is_off(self) -> None:
        """C{WATCHDOG_PID} names the watched process; if it is not us, we do not ping."""
        for environ in (
            {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)},
            {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "not a pid"},
            {"WATCHDOG_USEC": "0"},
            {"WATCHDOG_USEC": "soon"},
            {},
        ):
            notifier = self.notifier(**environ)
            self.assertIsNone(notifier.watchdog_interval, environ)
            notifier.start_watchdog()
            self.assertEqual(self.clock.getDelayedCalls(), [], environ)
        self.assertEqual(self.receiver.messages(), [])

    def test_socket_gone_is_logged_once_per_kind(self) -> None:
        """A vanished socket costs one warning per kind of failure and never raises."""
        notifier = self.notifier(WATCHDOG_USEC="2000000")
        notifier.ready("up")
        self.assertEqual(len(self.receiver.messages()), 1)
        # Nobody receives any more, but the file is still there.
        self.receiver.socket.close()
        with capturedLogs() as events:
            self.assertFalse(notifier.send(STATUS="one"))
            notifier.start_watchdog()
            self.clock.pump([1.0] * 4)
            # Now the file is gone too.
            os.unlink(self.receiver.address)
            notifier.stopping("two")
            notifier.status("three")
            self.clock.pump([1.0] * 4)
        warnings = [e for e in events if e["log_namespace"] == "mcptwist.notify"]
        self.assertEqual([e["kind"] for e in warnings], ["ECONNREFUSED", "ENOENT"])
        self.assertEqual(warnings[0]["address"], self.receiver.address)

    def test_sending_never_blocks(self) -> None:
        """A receiver that does not read fills up; sends then fail (logged once)."""
        notifier = self.notifier()
        with capturedLogs() as events:
            results = [notifier.send(STATUS=f"message {i}") for i in range(20000)]
        self.assertTrue(results[0])
        self.assertFalse(results[-1])
        kinds = [e["kind"] for e in events if e["log_namespace"] == "mcptwist.notify"]
        self.assertIn(kinds, (["EAGAIN"], ["EWOULDBLOCK"]))
        self.assertEqual(self.receiver.messages()[0], "STATUS=message 0\n")

    @given(st.text())
    def test_any_status_is_one_field(self, text: str) -> None:
        notifier = self.notifier()
        notifier.status(text)
        [message] = self.receiver.messages()
        self.assertEqual(message, f"STATUS={one_line(text)}\n")
        self.assertEqual(len(message.splitlines()), 1)


class StatusLineTests(SynchronousTestCase):
    def test_examples(self) -> None:
        for servers, sessions, expected in (
            ({}, 0, "0 servers; 0 sessions"),
            ({"a": "running"}, 1, "1 server: 1 running; 1 session"),
            (
                {"files": "failed", "time": "running", "git": "running"},
                12,
                "3 servers: 2 running, 1 failed (files); 12 sessions",
            ),
            (
                {"z": "weird", "y": "restarting", "x": "starting", "w": "stopped"},
                0,
                "4 servers: 1 starting (x), 1 restarting (y), 1 stopped (w), 1 weird (z); 0 sessions",
            ),
            (
                {f"s{i}": "failed" for i in range(5)},
                2,
                "5 servers: 5 failed (s0, s1, s2, +2 more); 2 sessions",
            ),
            ({"a\nb": "fai\nled"}, 0, "1 server: 1 fai led (a b); 0 sessions"),
            ({"a": ""}, 0, "1 server: 1 unknown (a); 0 sessions"),
        ):
            self.assertEqual(status_line(servers, sessions), expected)

    @given(st.dictionaries(st.text(), st.text()), st.integers(min_value=0))
    def test_always_one_line(self, servers: dict[str, str], sessions: int) -> None:
        line = status_line(servers, sessions)
        self.assertEqual(len(line.splitlines()), 1, line)
        self.assertTrue(line.isprintable(), line)
        self.assertTrue(line.endswith(f"; {sessions} session" + ("" if sessions == 1 else "s")))
