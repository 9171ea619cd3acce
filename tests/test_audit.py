"""The audit trail: the schema of every event, rotation, disk errors, threads, and
how the requests of a session are recorded."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import stat
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mcptwist.config.model import AuditConfig, ServerConfig
from mcptwist.mcp import jsonrpc
from mcptwist.mcp.describe import argument_digest, request_name
from mcptwist.mcp.jsonrpc import Message, RequestId
from mcptwist.ops import audit, audit_file
from mcptwist.ops.audit import AuditError, AuditTrail
from mcptwist.routing.backends import make_backend
from mcptwist.routing.record import RequestEnded
from mcptwist.routing.sessions import ClientSession, SessionRegistry

from .support.children import FakeProcessReactor
from .support.modern import GREET_QUESTIONS, ModernReactor, greet, held, input_required

TS = 1795305599.123456
TS_TEXT = "2026-11-21T23:59:59.123456Z"
SECRET = "sk-live-0123456789abcdef"


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of C{path} as JSON; fails on a torn or unterminated line."""
    data = path.read_bytes()
    if not data:
        return []
    assert data.endswith(b"\n"), data[-80:]
    return [orjson.loads(line) for line in data.split(b"\n")[:-1]]


def trail_files(path: Path) -> list[Path]:
    """The current file and its rotated copies, oldest first."""
    numbered = sorted(
        (int(p.name.rsplit(".", 1)[1]), p)
        for p in path.parent.iterdir()
        if p.name.startswith(path.name + ".") and p.name.rsplit(".", 1)[1].isdigit()
    )
    return [p for _, p in reversed(numbered)] + ([path] if path.exists() else [])


def read_all(path: Path) -> list[dict[str, Any]]:
    return [record for p in trail_files(path) for record in read_lines(p)]


def emit_request(trail: AuditTrail, session: str | None, **extra: Any) -> None:
    fields: dict[str, Any] = {
        "session": session,
        "server": "files",
        "principal": "alice",
        "peer": "192.0.2.7",
        "method": "tools/call",
        "name": "read",
        "arg_size": 2,
        "arg_sha256": "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
        "status": "ok",
        "error_code": None,
        "latency_ms": 1.5,
        "child_pid": 4242,
    }
    fields.update(extra)
    trail.request_ended(RequestEnded(**fields))


def writer_events(events: Sequence[LogEvent], level: LogLevel | None = None) -> list[LogEvent]:
    return [
        e
        for e in events
        if e.get("log_namespace") == "mcptwist.audit.writer"
        and (level is None or e.get("log_level") == level)
    ]


class TrailMixin:
    mktemp: Callable[[], str]
    addCleanup: Callable[..., None]

    def make(self, **config: Any) -> tuple[AuditTrail, Path, Clock]:
        directory = Path(self.mktemp())
        directory.mkdir()
        path = directory / "audit.log"
        clock = Clock()
        clock.advance(TS)
        trail = AuditTrail(AuditConfig(path=str(path), **config), clock)
        trail.start()
        self.addCleanup(trail.stop)
        return trail, path, clock


class DisabledTests(SynchronousTestCase):
    def test_no_path_no_work(self) -> None:
        """Without a path every method returns at once, building no event."""
        trail = AuditTrail(AuditConfig(), Clock())
        self.assertFalse(trail.enabled)
        seen: list[LogEvent] = []
        trail.publisher.addObserver(cast(ILogObserver, seen.append))

        def boom(*args: object) -> None:
            raise AssertionError("an event was built")

        self.patch(trail, "_emit", boom)
        trail.start()
        emit_request(trail, "s")
        trail.session_opened(
            session="s", server="a", principal="p", peer="i", transport="t", protocol_version="v"
        )
        trail.session_closed(session="s", server="a", principal="p", reason="r", duration=1.0)
        trail.auth_failure(peer="i", reason="r", route="/")
        trail.access_refused(principal="p", peer="i", server="a", route="/")
        trail.rate_limited(principal="p", peer="i", server="a", scope="ip", retry_after=1.0)
        trail.ip_refused(peer="i", listener="l", scope="listener")
        trail.admin_action(principal="p", peer="i", action="a", target="t", outcome="ok")
        trail.child_spawned(server="a", pid=1, command="npx")
        trail.child_exited(server="a", pid=1, exit_code=0, signal=None, reason="r")
        trail.tls_reloaded(listener="l", outcome="ok", detail=None)
        trail.reopen()
        trail.stop()
        self.assertEqual(seen, [])
        self.assertEqual(trail.lost, 0)


class SchemaTests(TrailMixin, SynchronousTestCase):
    def test_every_event_type(self) -> None:
        """Each event writes exactly its own fields, after ts and event."""
        trail, path, clock = self.make()
        trail.session_opened(
            session="s1",
            server="files",
            principal="alice",
            peer="192.0.2.7",
            transport="streamable-http",
            protocol_version="2025-11-25",
        )
        emit_request(trail, "s1", error_code=-32001, status="timeout", latency_ms=1.23456789)
        trail.session_closed(
            session="s1", server="files", principal="alice", reason="deleted", duration=12.3456
        )
        trail.auth_failure(peer="192.0.2.8", reason="expired token", route="/servers/files/mcp")
        trail.access_refused(
            principal="bob", peer="192.0.2.9", server="files", route="/servers/files/mcp"
        )
        trail.rate_limited(
            principal="bob", peer="192.0.2.9", server="files", scope="server-ip", retry_after=0.25
        )
        trail.ip_refused(peer="198.51.100.1", listener="tcp:8080", scope="listener")
        trail.admin_action(
            principal="root", peer="::1", action="restart", target="files", outcome="ok"
        )
        trail.child_spawned(server="files", pid=4242, command="npx")
        trail.child_exited(server="files", pid=4242, exit_code=None, signal=15, reason="killed")
        clock.advance(1)
        trail.tls_reloaded(listener="ssl:8443", outcome="error", detail="key does not match")
        common = {"ts": TS_TEXT}
        self.assertEqual(
            read_lines(path),
            [
                {
                    **common,
                    "event": "session_opened",
                    "session": "s1",
                    "server": "files",
                    "principal": "alice",
                    "peer": "192.0.2.7",
                    "transport": "streamable-http",
                    "protocol_version": "2025-11-25",
                },
                {
                    **common,
                    "event": "request",
                    "session": "s1",
                    "server": "files",
                    "principal": "alice",
                    "peer": "192.0.2.7",
                    "method": "tools/call",
                    "name": "read",
                    "arg_size": 2,
                    "arg_sha256": (
                        "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
                    ),
                    "status": "timeout",
                    "error_code": -32001,
                    "latency_ms": 1.235,
                    "child_pid": 4242,
                },
                {
                    **common,
                    "event": "session_closed",
                    "session": "s1",
                    "server": "files",
                    "principal": "alice",
                    "reason": "deleted",
                    "duration": 12.346,
                },
                {
                    **common,
                    "event": "auth_failure",
                    "peer": "192.0.2.8",
                    "reason": "expired token",
                    "route": "/servers/files/mcp",
                },
                {
                    **common,
                    "event": "access_refused",
                    "principal": "bob",
                    "peer": "192.0.2.9",
                    "server": "files",
                    "route": "/servers/files/mcp",
                },
                {
                    **common,
                    "event": "rate_limited",
                    "principal": "bob",
                    "peer": "192.0.2.9",
                    "server": "files",
                    "scope": "server-ip",
                    "retry_after": 0.25,
                },
                {
                    **common,
                    "event": "ip_refused",
                    "peer": "198.51.100.1",
                    "listener": "tcp:8080",
                    "scope": "listener",
                },
                {
                    **common,
                    "event": "admin_action",
                    "principal": "root",
                    "peer": "::1",
                    "action": "restart",
                    "target": "files",
                    "outcome": "ok",
                },
                {
                    **common,
                    "event": "child_spawned",
                    "server": "files",
                    "pid": 4242,
                    "command": "npx",
                },
                {
                    **common,
                    "event": "child_exited",
                    "server": "files",
                    "pid": 4242,
                    "signal": 15,
                    "reason": "killed",
                },
                {
                    "ts": "2026-11-22T00:00:00.123456Z",
                    "event": "tls_reloaded",
                    "listener": "ssl:8443",
                    "outcome": "error",
                    "detail": "key does not match",
                },
            ],
        )
        # Key order is stable too: ts, event, then the fields as documented.
        first = path.read_bytes().split(b"\n")[0]
        self.assertTrue(first.startswith(b'{"ts":"2026-11-21T23:59:59.123456Z","event":"session'))

    def test_none_fields_are_left_out(self) -> None:
        """A None field is absent, never null."""
        trail, path, _ = self.make()
        emit_request(trail, None, principal=None, name=None, child_pid=None)
        (line,) = read_lines(path)
        for key in ("session", "principal", "name", "child_pid", "error_code", "arguments"):
            self.assertNotIn(key, line)
        self.assertNotIn(b"null", path.read_bytes())

    def test_arguments_only_when_passed(self) -> None:
        """Arguments reach the file only when the caller passes them."""
        trail, path, _ = self.make()
        params = {"name": "login", "arguments": {"password": SECRET}}
        size, digest = argument_digest(params)
        emit_request(trail, "hidden", arg_size=size, arg_sha256=digest)
        emit_request(trail, "shown", arguments=params["arguments"])
        hidden, shown = read_lines(path)
        self.assertNotIn("arguments", hidden)
        self.assertEqual(hidden["arg_sha256"], digest)
        self.assertEqual(shown["arguments"], {"password": SECRET})
        self.assertEqual(path.read_bytes().count(SECRET.encode()), 1)

    def test_awkward_arguments_still_make_a_line(self) -> None:
        """Values orjson refuses are written through the fallback, never raised."""
        trail, path, _ = self.make()
        emit_request(trail, "big", arguments={"n": 2**80})
        emit_request(trail, "surrogate", arguments={"s": "\ud800"})
        emit_request(trail, "nan", arguments={"x": float("nan"), 1: {1, 2}})
        big, surrogate, nan = read_lines(path)
        self.assertEqual(big["arguments"], {"n": 2**80})
        self.assertEqual(surrogate["arguments"], {"s": "\ufffd"})
        self.assertEqual(nan["session"], "nan")

    def test_own_publisher_and_namespace(self) -> None:
        """Audit events stay off the global publisher, in namespace mcptwist.audit."""
        trail, _, _ = self.make()
        seen: list[LogEvent] = []
        trail.publisher.addObserver(cast(ILogObserver, seen.append))
        with capturedLogs() as events:
            emit_request(trail, "s")
        self.assertEqual([e["log_namespace"] for e in seen], ["mcptwist.audit"])
        self.assertEqual([e["log_level"] for e in seen], [LogLevel.info])
        self.assertEqual([e["audit"]["session"] for e in seen], ["s"])
        self.assertEqual([e for e in events if "audit" in e], [])
        self.assertEqual([e for e in events if "audit" in str(e.get("log_namespace"))], [])


class FileTests(TrailMixin, SynchronousTestCase):
    def test_mode_0640(self) -> None:
        """A new file is created 0640 whatever the umask."""
        old = os.umask(0o077)
        try:
            _, path, _ = self.make()
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o640)

    def test_missing_directory_is_a_clear_error(self) -> None:
        """start() names the missing directory and what to do."""
        path = Path(self.mktemp()) / "nowhere" / "audit.log"
        trail = AuditTrail(AuditConfig(path=str(path)), Clock())
        e = self.assertRaises(AuditError, trail.start)
        self.assertIn(str(path.parent), str(e))
        self.assertIn("does not exist", str(e))

    def test_unopenable_path_is_a_clear_error(self) -> None:
        """A directory where the file should be is reported, not raised raw."""
        path = Path(self.mktemp())
        path.mkdir()
        e = self.assertRaises(AuditError, AuditTrail(AuditConfig(path=str(path)), Clock()).start)
        self.assertIn("cannot be opened", str(e))

    def test_appends_and_ends_a_torn_line(self) -> None:
        """An existing file is appended to; a torn last line is ended first."""
        directory = Path(self.mktemp())
        directory.mkdir()
        path = directory / "audit.log"
        path.write_bytes(b'{"event":"old"}\n{"event":"to')
        trail = AuditTrail(AuditConfig(path=str(path)), Clock())
        trail.start()
        emit_request(trail, "new")
        trail.stop()
        lines = path.read_bytes().split(b"\n")
        self.assertEqual(lines[:2], [b'{"event":"old"}', b'{"event":"to'])
        self.assertEqual(orjson.loads(lines[2])["session"], "new")
        self.assertEqual(lines[3], b"")

    def test_reopen_follows_logrotate(self) -> None:
        """After a rename, events go to the old file until reopen(), then to a new one."""
        trail, path, _ = self.make()
        emit_request(trail, "1")
        moved = path.with_name("audit.log-20261121")
        path.rename(moved)
        emit_request(trail, "2")
        trail.reopen()
        emit_request(trail, "3")
        self.assertEqual([r["session"] for r in read_lines(moved)], ["1", "2"])
        self.assertEqual([r["session"] for r in read_lines(path)], ["3"])

    def test_stop_closes_and_later_events_are_counted(self) -> None:
        """Events after stop() are dropped, counted, and warned about once."""
        trail, path, _ = self.make()
        emit_request(trail, "1")
        trail.stop()
        with capturedLogs() as events:
            emit_request(trail, "2")
            emit_request(trail, "3")
        self.assertEqual(trail.lost, 2)
        self.assertEqual(len(writer_events(events, LogLevel.warn)), 1)
        self.assertEqual([r["session"] for r in read_lines(path)], ["1"])
        if os.path.isdir("/proc/self/fd"):
            targets = []
            for fd in os.listdir("/proc/self/fd"):
                try:
                    targets.append(os.readlink(f"/proc/self/fd/{fd}"))
                except OSError:
                    pass
            self.assertNotIn(str(path), targets)


class RotationTests(TrailMixin, SynchronousTestCase):
    def test_size_and_keep(self) -> None:
        """No file exceeds max_size; the newest keep+1 files survive, in order."""
        trail, path, _ = self.make(max_size=2048, keep=3)
        for i in range(200):
            emit_request(trail, str(i))
        files = trail_files(path)
        self.assertEqual(
            [p.name for p in files], [f"audit.log.{n}" for n in (3, 2, 1)] + [path.name]
        )
        self.assertFalse(path.with_name("audit.log.4").exists())
        for p in files:
            self.assertLessEqual(p.stat().st_size, 2048)
        sessions = [int(r["session"]) for r in read_all(path)]
        self.assertEqual(sessions, list(range(sessions[0], 200)))
        self.assertGreater(sessions[0], 0)

    def test_line_longer_than_max_size_gets_its_own_file(self) -> None:
        """A line bigger than max_size is written whole, alone in its file."""
        trail, path, _ = self.make(max_size=1024, keep=5)
        emit_request(trail, "small")
        emit_request(trail, "huge", arguments="x" * 3000)
        emit_request(trail, "after")
        self.assertEqual(
            [[r["session"] for r in read_lines(p)] for p in trail_files(path)],
            [["small"], ["huge"], ["after"]],
        )

    def test_keep_zero_keeps_only_the_current_file(self) -> None:
        trail, path, _ = self.make(max_size=1024, keep=0)
        for i in range(20):
            emit_request(trail, str(i))
        self.assertEqual(trail_files(path), [path])
        self.assertEqual(read_lines(path)[-1]["session"], "19")

    def test_other_files_are_left_alone(self) -> None:
        """Compressed or foreign files next to the trail are not touched."""
        trail, path, _ = self.make(max_size=1024, keep=1)
        for name in ("audit.log.2.gz", "audit.log.old", "audit.log.07", "other.log.1"):
            (path.parent / name).write_bytes(b"x")
        for i in range(30):
            emit_request(trail, str(i))
        self.assertEqual(
            sorted(p.name for p in path.parent.iterdir()),
            [
                "audit.log",
                "audit.log.07",
                "audit.log.1",
                "audit.log.2.gz",
                "audit.log.old",
                "other.log.1",
            ],
        )

    @settings(max_examples=40)
    @given(
        max_size=st.integers(min_value=300, max_value=3000),
        plan=st.lists(
            st.tuples(st.integers(0, 7), st.integers(0, 400), st.booleans()),
            min_size=1,
            max_size=250,
        ),
        seed=st.integers(0, 2**32 - 1),
    )
    def test_interleaved_deferreds_never_lose_or_split(
        self, max_size: int, plan: list[tuple[int, int, bool]], seed: int
    ) -> None:
        """Events from Deferred callbacks fired in any order, rotating often:
        every line parses, none is lost, none is split, order is kept."""
        trail, path, _ = self.make(max_size=max_size, keep=100_000)
        deferreds = [Deferred[None]() for _ in range(8)]
        emitted: list[str] = []

        def fire(_: object, inner: Deferred[None]) -> None:
            inner.callback(None)

        def emit(_: object, seq: str, padding: int) -> None:
            emitted.append(seq)
            emit_request(trail, seq, arguments="p" * padding)

        for i, (which, padding, nested) in enumerate(plan):
            if nested:
                # A callback that emits from a Deferred of its own, fired later.
                inner = Deferred[None]()
                inner.addCallback(emit, f"{i}", padding)
                deferreds[(which + 1) % 8].addCallback(fire, inner)
            else:
                deferreds[which].addCallback(emit, f"{i}", padding)
        order = list(range(8))
        random.Random(seed).shuffle(order)
        for n in order:
            deferreds[n].callback(None)
        trail.stop()
        self.assertEqual(sorted(emitted, key=int), [str(i) for i in range(len(plan))])
        records: list[str] = []
        for p in trail_files(path):
            lines = read_lines(p)
            if len(lines) > 1:
                self.assertLessEqual(p.stat().st_size, max_size)
            records += [r["session"] for r in lines]
        self.assertEqual(records, emitted)


class FailingWrites:
    """An os.write that fails while C{failing}, first writing C{partial} bytes."""

    def __init__(self, partial: int = 0) -> None:
        self.failing = True
        self.partial = partial

    def __call__(self, fd: int, data: memoryview) -> int:
        if not self.failing:
            return os.write(fd, data)
        if self.partial:
            # A short write, then the error on the next attempt.
            written = os.write(fd, data[: self.partial])
            self.partial = 0
            return written
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class DiskErrorTests(TrailMixin, SynchronousTestCase):
    def test_full_disk_is_logged_once_and_recovered(self) -> None:
        """Writes to a full disk log one error, keep the events, and catch up."""
        if not os.path.exists("/dev/full"):
            raise self.skipTest("needs /dev/full")
        directory = Path(self.mktemp())
        directory.mkdir()
        path = directory / "audit.log"
        path.symlink_to("/dev/full")
        trail = AuditTrail(AuditConfig(path=str(path)), Clock())
        trail.start()
        self.addCleanup(trail.stop)
        with capturedLogs() as events:
            for i in range(5):
                emit_request(trail, str(i))
            errors = writer_events(events, LogLevel.error)
            self.assertEqual(len(errors), 1)
            self.assertIn("No space left", errors[0]["error"])
            path.unlink()  # the disk is "fixed": the next event opens a new file
            emit_request(trail, "5")
        self.assertEqual([r["session"] for r in read_lines(path)], [str(i) for i in range(6)])
        self.assertEqual(len(writer_events(events, LogLevel.info)), 1)
        self.assertEqual(trail.lost, 0)

    def test_directory_removed(self) -> None:
        """A vanished directory fails reopen() quietly; events wait until it is back."""
        trail, path, _ = self.make()
        emit_request(trail, "1")
        shutil.rmtree(path.parent)
        with capturedLogs() as events:
            trail.reopen()
            emit_request(trail, "2")
            emit_request(trail, "3")
        self.assertEqual(len(writer_events(events, LogLevel.error)), 1)
        path.parent.mkdir()
        trail.reopen()  # catches up at once, without waiting for an event
        self.assertEqual([r["session"] for r in read_lines(path)], ["2", "3"])
        emit_request(trail, "4")
        self.assertEqual([r["session"] for r in read_lines(path)], ["2", "3", "4"])
        self.assertEqual(trail.lost, 0)

    def test_short_write_is_taken_back(self) -> None:
        """A write that fails half-way leaves no torn line; the event is retried."""
        trail, path, _ = self.make()
        emit_request(trail, "1")
        writer = trail._writer
        assert writer is not None
        failing = FailingWrites(partial=10)
        writer._file.os_write = failing
        with capturedLogs():
            emit_request(trail, "2")
        self.assertEqual([r["session"] for r in read_lines(path)], ["1"])
        failing.failing = False
        emit_request(trail, "3")
        self.assertEqual([r["session"] for r in read_lines(path)], ["1", "2", "3"])

    def test_backlog_is_bounded(self) -> None:
        """While the disk fails, memory is bounded and the oldest events are dropped."""
        self.patch(audit_file, "BACKLOG_BYTES", 2000)
        trail, path, _ = self.make()
        writer = trail._writer
        assert writer is not None
        failing = FailingWrites()
        writer._file.os_write = failing
        with capturedLogs():
            for i in range(50):
                emit_request(trail, str(i))
        self.assertLessEqual(writer._backlog_bytes, 2000)
        self.assertGreater(trail.lost, 0)
        failing.failing = False
        emit_request(trail, "50")
        sessions = [int(r["session"]) for r in read_lines(path)]
        self.assertEqual(sessions, list(range(51 - len(sessions), 51)))
        self.assertEqual(len(sessions) + trail.lost, 51)

    def test_failed_rotation_keeps_writing(self) -> None:
        """If rotation fails, the line is still written (past max_size) and logged once."""
        trail, path, _ = self.make(max_size=1024, keep=2)
        writer = trail._writer
        assert writer is not None

        def refuse() -> None:
            raise OSError(errno.EACCES, "Permission denied")

        writer._file.rotate = refuse  # type: ignore[method-assign]
        with capturedLogs() as events:
            for i in range(20):
                emit_request(trail, str(i))
        self.assertEqual(len(writer_events(events, LogLevel.warn)), 1)
        self.assertEqual(len(read_lines(path)), 20)


class ThreadTests(TestCase):
    def test_ten_thousand_events_from_threads_and_deferreds(self) -> Deferred[None]:
        """10 000 events from Deferred callbacks, from threads via callFromThread,
        and from threads calling directly, while rotating: all there, all whole."""
        directory = Path(self.mktemp())
        directory.mkdir()
        path = directory / "audit.log"
        max_size = 16_384
        trail = AuditTrail(
            AuditConfig(path=str(path), max_size=max_size, keep=100_000),
            reactor,
        )
        trail.start()
        self.addCleanup(trail.stop)
        done: list[Deferred[None]] = []

        def via_reactor(prefix: str, count: int, finished: Deferred[None]) -> None:
            for i in range(count):
                reactor.callFromThread(emit_request, trail, f"{prefix}{i}")  # type: ignore[attr-defined]
            reactor.callFromThread(finished.callback, None)  # type: ignore[attr-defined]

        def direct(prefix: str, count: int, finished: Deferred[None]) -> None:
            for i in range(count):
                emit_request(trail, f"{prefix}{i}")
            reactor.callFromThread(finished.callback, None)  # type: ignore[attr-defined]

        expected: set[str] = set()
        threads = []
        for t, (target, count) in enumerate([(via_reactor, 1500)] * 4 + [(direct, 1000)] * 2):
            finished = Deferred[None]()
            done.append(finished)
            prefix = f"t{t}-"
            expected.update(f"{prefix}{i}" for i in range(count))
            threads.append(threading.Thread(target=target, args=(prefix, count, finished)))

        # 2000 more from chains of Deferred callbacks on the reactor thread.
        def emit_from_callback(_: object, session: str) -> None:
            emit_request(trail, session)

        def chain(n: int) -> Deferred[None]:
            d = Deferred[None]()
            for i in range(100):
                d.addCallback(emit_from_callback, f"d{n}-{i}")
            reactor.callLater(0, d.callback, None)
            return d

        for n in range(20):
            expected.update(f"d{n}-{i}" for i in range(100))
        for thread in threads:
            thread.start()
        done += [chain(n) for n in range(20)]
        self.assertEqual(len(expected), 10_000)

        def check(_: object) -> None:
            for thread in threads:
                thread.join()
            trail.stop()
            files = trail_files(path)
            self.assertGreater(len(files), 50)
            seen: list[str] = []
            for p in files:
                self.assertLessEqual(p.stat().st_size, max_size)
                seen += [r["session"] for r in read_lines(p)]
            self.assertEqual(len(seen), 10_000)
            self.assertEqual(set(seen), expected)
            self.assertEqual(trail.lost, 0)

        return gatherResults(done).addCallback(check)


class DigestTests(SynchronousTestCase):
    def test_tools_call_digests_its_arguments(self) -> None:
        params = {"name": "add", "arguments": {"b": 2, "a": 1}}
        canonical = b'{"a":1,"b":2}'
        self.assertEqual(
            argument_digest(params), (len(canonical), hashlib.sha256(canonical).hexdigest())
        )

    def test_other_params_whole_and_absent_params_empty(self) -> None:
        canonical = b'{"uri":"file:///x"}'
        self.assertEqual(
            argument_digest({"uri": "file:///x"}),
            (len(canonical), hashlib.sha256(canonical).hexdigest()),
        )
        self.assertEqual(argument_digest(None), (0, hashlib.sha256(b"").hexdigest()))

    def test_odd_params_never_raise(self) -> None:
        for params in (
            [1, 2],
            "text",
            {"arguments": 2**100},
            {"arguments": {1: "a", "b": 2}},
            {"arguments": {"s": "\ud800"}},
            {"arguments": object()},
            {1, 2},
            {"arguments": float("inf")},
        ):
            size, digest = argument_digest(params)
            self.assertGreater(size, 0)
            self.assertEqual(len(digest), 64)

    @given(
        st.dictionaries(
            st.text(max_size=8),
            st.recursive(
                st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
                lambda inner: (
                    st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3)
                ),
                max_leaves=10,
            ),
            max_size=6,
        )
    )
    def test_key_order_does_not_matter(self, arguments: dict[str, Any]) -> None:
        reordered = dict(reversed(list(arguments.items())))
        size, digest = argument_digest({"name": "t", "arguments": arguments})
        self.assertEqual(argument_digest({"arguments": reordered, "name": "other"}), (size, digest))
        data = orjson.dumps(arguments, option=orjson.OPT_SORT_KEYS)
        self.assertEqual((size, digest), (len(data), hashlib.sha256(data).hexdigest()))

    def test_request_name(self) -> None:
        self.assertEqual(request_name("tools/call", {"name": "add"}), "add")
        self.assertEqual(request_name("prompts/get", {"name": "greet"}), "greet")
        for method in ("resources/read", "resources/subscribe", "resources/unsubscribe"):
            self.assertEqual(request_name(method, {"uri": "file:///a"}), "file:///a")
        self.assertIsNone(request_name("tools/list", {"name": "x"}))
        self.assertIsNone(request_name("tools/call", None))
        self.assertIsNone(request_name("tools/call", ["add"]))
        self.assertIsNone(request_name("tools/call", {"name": 7}))
        self.assertIsNone(request_name("resources/read", {"name": "x"}))
        self.assertIsNone(request_name(None, {"name": "x"}))


class RefusalBurstTests(TrailMixin, SynchronousTestCase):
    def test_repeated_refusals_are_counted_not_written(self) -> None:
        """A client retrying a bad token cannot flood (and rotate away) the trail."""
        trail, path, clock = self.make()
        for i in range(1000):
            trail.auth_failure(peer="192.0.2.1", reason="unknown token", route=f"/r{i}")
        trail.auth_failure(peer="192.0.2.2", reason="expired", route="/x")
        lines = read_lines(path)
        self.assertEqual(
            [(e["peer"], e["route"]) for e in lines], [("192.0.2.1", "/r0"), ("192.0.2.2", "/x")]
        )
        # When the window ends, one line says how many more there were.
        clock.advance(audit.REFUSAL_WINDOW)
        summary = read_lines(path)[2:]
        self.assertEqual(len(summary), 1)
        self.assertEqual((summary[0]["route"], summary[0]["repeated"]), ("/r999", 999))
        # A new window writes the next refusal again.
        trail.auth_failure(peer="192.0.2.1", reason="unknown token", route="/again")
        self.assertEqual(read_lines(path)[-1]["route"], "/again")
        self.assertNotIn("repeated", read_lines(path)[-1])

    def test_one_ipv6_64_is_one_client(self) -> None:
        """300 addresses of one /64 (one host) write at most a couple of lines,
        which name some of the addresses and count all of them."""
        trail, path, clock = self.make()
        for i in range(300):
            trail.rate_limited(
                principal=None,
                peer=f"2001:db8:1:2::{i + 1:x}",
                server="files",
                scope="ip",
                retry_after=1.0,
            )
        clock.advance(audit.REFUSAL_WINDOW)
        lines = read_lines(path)
        self.assertEqual(len(lines), 2)
        first, burst = lines
        self.assertEqual(first["peer"], "2001:db8:1:2::1")
        self.assertEqual(burst["repeated"], 299)
        self.assertEqual(len(burst["peers"]), audit.BURST_PEERS)
        self.assertEqual(burst["peers"][0], "2001:db8:1:2::2")
        self.assertIs(burst["peers_more"], True)
        self.assertEqual(burst["since"], first["ts"])

    def test_other_64s_and_kinds_are_other_clients(self) -> None:
        trail, path, clock = self.make()
        for peer in ("2001:db8:1:2::1", "2001:db8:1:3::1", "2001:db8:1:2::7", "192.0.2.1"):
            trail.auth_failure(peer=peer, reason="unknown token", route="/")
            trail.access_refused(principal="token:a", peer=peer, server="s", route="/")
            trail.ip_refused(peer=peer, listener="tcp:8080", scope="listener")
        written = [(e["event"], e["peer"]) for e in read_lines(path)]
        self.assertEqual(len(written), 9)
        self.assertNotIn("2001:db8:1:2::7", {peer for _, peer in written})
        clock.advance(audit.REFUSAL_WINDOW)
        bursts = read_lines(path)[9:]
        self.assertEqual(
            sorted((e["event"], e["peers"], e["repeated"]) for e in bursts),
            [
                ("access_refused", ["2001:db8:1:2::7"], 1),
                ("auth_failure", ["2001:db8:1:2::7"], 1),
                ("ip_refused", ["2001:db8:1:2::7"], 1),
            ],
        )

    def test_a_flood_of_429s_is_counted(self) -> None:
        """2,000 refusals a second for a minute from one host, each from another
        address of its /64: a few lines, whose counts add up."""
        trail, path, clock = self.make()
        for second in range(60):
            for i in range(2000):
                trail.rate_limited(
                    principal="token:a",
                    peer=f"2001:db8::{second:x}:{i:x}",
                    server="files",
                    scope="principal",
                    retry_after=0.5,
                )
                clock.advance(1 / 2000)
        clock.advance(audit.REFUSAL_WINDOW)
        lines = read_lines(path)
        self.assertLessEqual(len(lines), 2 * (60 // audit.REFUSAL_WINDOW + 2))
        self.assertEqual(sum(e.get("repeated", 1) for e in lines), 120_000)

    def test_the_table_of_clients_is_bounded(self) -> None:
        """Refusals from more clients than the table holds share one burst."""
        self.patch(audit, "REFUSAL_KEYS", 10)
        trail, path, clock = self.make()
        for i in range(1000):
            trail.auth_failure(peer=f"198.51.{i // 256}.{i % 256}", reason="bad", route="/")
        self.assertLessEqual(len(trail._refusals), 11)
        self.assertEqual(len(read_lines(path)), 11)
        clock.advance(audit.REFUSAL_WINDOW)
        lines = read_lines(path)
        overflow = lines[-1]
        self.assertIs(overflow["overflow"], True)
        self.assertEqual(overflow["repeated"], 989)
        self.assertEqual(sum(e.get("repeated", 1) for e in lines), 1000)
        # Once the windows have ended, new clients are tracked again.
        trail.auth_failure(peer="203.0.113.1", reason="bad", route="/")
        self.assertEqual(read_lines(path)[-1]["peer"], "203.0.113.1")


class ListSink:
    """A session's sink that keeps what it is given."""

    connected = False

    def __init__(self) -> None:
        self.got: list[Message] = []
        self.cancelled_ids: list[RequestId] = []

    def deliver(self, message: Message, related: RequestId | None, encoded: Any = None) -> None:
        self.got.append(message)

    def cancelled(self, request_id: RequestId) -> None:
        self.cancelled_ids.append(request_id)

    def close(self) -> None:
        pass


class OutcomeTests(TrailMixin, SynchronousTestCase):
    """A request's record says how it ended, whatever the number of its error."""

    def open(
        self, reactor: FakeProcessReactor | None = None, **server: Any
    ) -> tuple[FakeProcessReactor, ClientSession, Path]:
        """A session on a server whose child holds its requests, recorded in a trail."""
        trail, path, _ = self.make()
        reactor = reactor or FakeProcessReactor(hold=True)
        server.setdefault("request_timeout", 10.0)
        backend = make_backend(ServerConfig(name="s", command="fake", **server), reactor, {}, trail)
        backend.startService()
        self.addCleanup(backend.stopService)
        registry = SessionRegistry(reactor, 10, recorder=trail)
        session = registry.create(backend, "streamable", lambda _: ListSink(), peer="192.0.2.7")
        self.addCleanup(registry.close, session)
        return reactor, session, path

    def requests(self, path: Path) -> list[tuple[str, str, int | None]]:
        return [
            (e["method"], e["status"], e.get("error_code"))
            for e in read_lines(path)
            if e["event"] == "request"
        ]

    def receive(self, session: ClientSession, message: Message) -> None:
        session.receive(message, jsonrpc.classify(message), 0.0)

    def test_a_childs_error_numbered_like_a_timeout_is_an_error(self) -> None:
        """The child's own -32001 is its error, not the bridge's timeout."""
        reactor, session, path = self.open()
        self.receive(session, jsonrpc.request(1, "tools/call", {"name": "slow"}))
        [call] = reactor.child.held
        reactor.child.send(jsonrpc.error(call["id"], -32001, "the tool gave up"))
        self.assertEqual(self.requests(path), [("tools/call", "error", -32001)])

    def test_a_request_that_timed_out(self) -> None:
        reactor, session, path = self.open()
        self.receive(session, jsonrpc.request(1, "tools/call", {"name": "slow"}))
        reactor.advance(10)
        self.assertEqual(self.requests(path), [("tools/call", "timeout", -32001)])

    def test_an_initialize_that_waited_for_the_child_in_vain(self) -> None:
        reactor = FakeProcessReactor(hold=True)
        reactor.on_message = lambda child, message: None  # type: ignore[method-assign]
        _, session, path = self.open(reactor)
        self.receive(session, jsonrpc.request(0, "initialize", {"protocolVersion": "2025-11-25"}))
        reactor.advance(10)
        self.assertEqual(self.requests(path), [("initialize", "timeout", -32001)])
        self.assertNotIn("session_opened", [e["event"] for e in read_lines(path)])

    def test_cancelled_by_the_client_or_cut_by_the_session_end(self) -> None:
        _, session, path = self.open()
        self.receive(session, jsonrpc.request(1, "tools/call", {"name": "a"}))
        self.receive(session, jsonrpc.request(2, "tools/call", {"name": "b"}))
        self.receive(session, jsonrpc.notification("notifications/cancelled", {"requestId": 1}))
        session.close()
        self.assertEqual(
            self.requests(path),
            [("tools/call", "cancelled", None), ("tools/call", "cancelled", None)],
        )

    def test_a_request_answered_twice_is_recorded_once(self) -> None:
        """A request queued while the child starts is failed once by the router,
        though the client may hear of it twice."""
        reactor = FakeProcessReactor(hold=True)
        reactor.on_message = lambda child, message: None  # type: ignore[method-assign]
        _, session, path = self.open(reactor)
        self.receive(session, jsonrpc.request(1, "tools/call", {"name": "a"}))
        assert session.upstream is not None
        session.upstream.stopService()
        self.assertEqual(self.requests(path), [("tools/call", "error", -32000)])

    def test_a_clients_error_numbered_like_a_timeout_is_an_error(self) -> None:
        """A 2026-07-28 child's question that the client answers with its own
        -32001 fails the request as an error."""
        reactor, session, path = self.open(ModernReactor(), era="modern")
        self.receive(
            session,
            jsonrpc.request(
                0,
                "initialize",
                {"protocolVersion": "2025-11-25", "capabilities": {"elicitation": {}}},
            ),
        )
        self.receive(session, greet(5))
        [first] = held(reactor.child, "tools/call")
        questions = {"name": GREET_QUESTIONS["name"]}
        reactor.child.send(jsonrpc.result(first["id"], input_required(questions)))
        sink = session.sink
        assert isinstance(sink, ListSink)
        [question] = [m for m in sink.got if "method" in m]
        self.receive(session, jsonrpc.error(question["id"], -32001, "the user walked away"))
        self.assertEqual(
            self.requests(path), [("initialize", "ok", None), ("tools/call", "error", -32001)]
        )
