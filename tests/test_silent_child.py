"""A child that stops talking while it runs: closed pipes, unread stdin, silence.

Over fake children on a Clock: what a client sees (the JSON-RPC error, and
when), what the supervisor does (stop, backoff, breaker), what the status,
/health, the log and the audit trail say.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mcptwist.child.process import EOF_GRACE
from mcptwist.child.supervisor import ChildState, Supervisor
from mcptwist.config.load import parse_server
from mcptwist.config.model import BridgeConfig, ConfigError, RestartPolicy, ServerConfig
from mcptwist.mcp import jsonrpc
from mcptwist.ops.audit import AuditTrail
from mcptwist.routing.backends import SharedBackend
from mcptwist.routing.upstream import Upstream
from mcptwist.service.bridge import BridgeService

from .support.bridge import Bridge
from .support.children import FakeProcessReactor, Owner
from .support.router import FakeSession, call, initialize, send

TIMEOUT = 30.0
POLICY = RestartPolicy(initial_delay=1, max_delay=8, crash_limit=3, crash_window=60)


class AuditRecorder:
    """Stands in for the audit trail: what the supervisor tells it."""

    def __init__(self) -> None:
        self.exits: list[dict[str, Any]] = []

    def child_spawned(self, **fields: Any) -> None:
        pass

    def child_exited(self, **fields: Any) -> None:
        self.exits.append(fields)


def started(
    exit_on_eof: bool = True, audit: AuditRecorder | None = None, **kwargs: Any
) -> tuple[FakeProcessReactor, Upstream, FakeSession]:
    """An upstream over a fake child that holds its requests, and one client."""
    reactor = FakeProcessReactor(hold=True, exit_on_eof=exit_on_eof)
    if not exit_on_eof:
        # Signals are only recorded: the test ends the child itself.
        reactor.killpg = lambda pid, sig: reactor.signals.append((pid, sig))  # type: ignore[method-assign]
    kwargs.setdefault("restart", POLICY)
    server = ServerConfig(name="fake", command="fake-mcp", request_timeout=TIMEOUT, **kwargs)
    upstream = Upstream(server, reactor, {}, recorder=cast(AuditTrail, audit))
    upstream.startService()
    a = FakeSession("a")
    upstream.attach(a)
    initialize(upstream, a)
    return reactor, upstream, a


class ClosedPipeTests(SynchronousTestCase):
    def test_stdout_closed_fails_the_call_at_once_stops_and_restarts(self) -> None:
        """Its caller hears why within EOF_GRACE; the child gets stdin EOF, then
        SIGTERM; it is restarted after the backoff and serves again."""
        audit = AuditRecorder()
        reactor, upstream, a = started(exit_on_eof=False, audit=audit, term_after=2.0)
        child = reactor.child
        send(upstream, a, call(1, "x"))
        with capturedLogs() as events:
            child.close_pipe(1)
            self.assertEqual(a.responses().keys(), {0})
            reactor.advance(EOF_GRACE)
        error = a.responses()[1]["error"]
        self.assertEqual(error["code"], jsonrpc.SERVER_UNAVAILABLE)
        self.assertIn("MCP server 'fake' closed its stdout while still running", error["message"])
        self.assertLess(EOF_GRACE, TIMEOUT / 10)
        [warning] = [e for e in events if e["log_namespace"] == "mcptwist.supervisor"][:1]
        self.assertIn("closed its stdout", warning["why"])
        # The usual stop: stdin closed, SIGTERM to the group after term_after.
        self.assertTrue(child.stdin_is_closed)
        self.assertEqual(upstream.state, ChildState.RESTARTING)
        self.assertEqual(upstream.status()["last_exit"], "closed its stdout while still running")
        # Requests meanwhile wait for the next child.
        send(upstream, a, call(2, "meanwhile"))
        reactor.advance(2.0)
        self.assertEqual(reactor.signals, [(child.pid, signal.SIGTERM)])
        child.exit(0, signal.SIGTERM)
        self.assertEqual(len(reactor.children), 1)
        [record] = audit.exits
        self.assertEqual(record["pid"], child.pid)
        self.assertEqual(
            record["reason"],
            "closed its stdout while still running, so it was stopped (killed by SIGTERM)",
        )
        # Restarted like a crashed child: after initial_delay.
        reactor.advance(0.9)
        self.assertEqual(len(reactor.children), 1)
        reactor.advance(0.1)
        self.assertEqual(len(reactor.children), 2)
        self.assertEqual(upstream.state, ChildState.RUNNING)
        new = reactor.child
        [held] = new.held
        self.assertEqual(held["params"]["arguments"], {"text": "meanwhile"})
        new.answer(held)
        self.assertIn("result", a.responses()[2])
        status = upstream.status()
        self.assertEqual(status["restarts"], 1)
        self.assertIn("closed its stdout while still running", status["last_exit"])

    def test_stdin_closed_likewise(self) -> None:
        reactor, upstream, a = started()
        child = reactor.child
        send(upstream, a, call(1, "x"))
        child.close_pipe(0)
        # Written to a closed stdin, a request is lost: it fails with the others.
        send(upstream, a, call(2, "lost"))
        reactor.advance(EOF_GRACE)
        for request_id in (1, 2):
            error = a.responses()[request_id]["error"]
            self.assertIn("closed its stdin while still running", error["message"])
        self.assertTrue(child.exited)
        reactor.advance(POLICY.initial_delay)
        self.assertEqual(len(reactor.children), 2)
        self.assertEqual(upstream.state, ChildState.RUNNING)

    def test_an_exiting_child_is_reported_as_an_exit(self) -> None:
        """An exit closes the pipes first: within the grace, the exit is what counts."""
        reactor, upstream, a = started()
        send(upstream, a, call(1, "x"))
        reactor.child.close_pipe(1)
        reactor.child.close_pipe(0)
        reactor.advance(EOF_GRACE / 2)
        reactor.child.exit(3)
        reactor.advance(EOF_GRACE)
        self.assertEqual(
            a.responses()[1]["error"]["message"], "MCP server 'fake' exited with code 3"
        )
        self.assertEqual(upstream.status()["last_exit"], "exited with code 3")

    def test_stderr_closed_is_harmless(self) -> None:
        reactor, upstream, a = started()
        with capturedLogs() as events:
            reactor.child.close_pipe(2)
            reactor.advance(EOF_GRACE)
        self.assertIn("closed its stderr", " ".join(formatEvent(e) for e in events))
        reactor.advance(TIMEOUT / 2)
        send(upstream, a, call(1, "x"))
        reactor.child.answer(reactor.child.held[0])
        self.assertIn("result", a.responses()[1])
        self.assertEqual((upstream.state, len(reactor.children)), (ChildState.RUNNING, 1))

    def test_a_child_that_keeps_closing_its_stdout_trips_the_breaker(self) -> None:
        reactor, upstream, _ = started()
        for _ in range(POLICY.crash_limit):
            reactor.child.close_pipe(1)
            reactor.advance(EOF_GRACE)
            reactor.advance(POLICY.max_delay)
        self.assertEqual(upstream.state, ChildState.FAILED)
        self.assertEqual(len(reactor.children), POLICY.crash_limit)

    def test_stdout_closed_during_the_handshake(self) -> None:
        """No answer can come: the child is stopped (not killed) and retried with backoff."""
        reactor = FakeProcessReactor()
        reactor.on_message = lambda child, m: None  # type: ignore[method-assign]
        upstream = Upstream(
            ServerConfig(name="fake", command="fake-mcp", restart=POLICY), reactor, {}
        )
        upstream.startService()
        child = reactor.child
        child.close_pipe(1)
        reactor.advance(EOF_GRACE)
        self.assertTrue(child.stdin_is_closed)
        self.assertNotIn((child.pid, signal.SIGKILL), reactor.signals[:1])
        self.assertEqual(upstream.state, ChildState.RESTARTING)
        self.assertIn("closed its stdout", upstream.status()["last_exit"])
        reactor.advance(POLICY.initial_delay)
        self.assertEqual(len(reactor.children), 2)

    def test_operator_restart_while_a_broken_child_stops(self) -> None:
        """One new child, not two: the operator's restart supersedes the crash restart."""
        reactor, upstream, _ = started(exit_on_eof=False)
        old = reactor.child
        old.close_pipe(1)
        reactor.advance(EOF_GRACE)
        d = upstream.supervisor.restart()
        old.exit(0, signal.SIGTERM)
        self.successResultOf(d)
        reactor.advance(60)
        self.assertEqual(len(reactor.children), 2)
        self.assertEqual(upstream.state, ChildState.RUNNING)
        self.assertEqual(upstream.status()["restarts"], 0)


class UnreadStdinTests(SynchronousTestCase):
    def test_a_child_that_stops_reading_gets_a_bounded_backlog(self) -> None:
        """Past max_message_size unread, requests are refused at once, with why."""
        reactor, upstream, a = started(max_message_size=4096)
        child = reactor.child
        child.stop_reading()
        big = "x" * 1000
        with capturedLogs() as events:
            for request_id in range(1, 21):
                send(upstream, a, call(request_id, big))
        [warning] = [formatEvent(e) for e in events if e["log_namespace"] == "mcptwist.process"]
        self.assertIn("is not reading its stdin", warning)
        refused = {i: a.responses()[i]["error"] for i in range(1, 21) if i in a.responses()}
        self.assertTrue(refused, "nothing was refused")
        for error in refused.values():
            self.assertEqual(error["code"], jsonrpc.SERVER_UNAVAILABLE)
            self.assertIn("is not reading its stdin", error["message"])
            self.assertIn("4096 bytes", error["message"])
        waiting = sum(len(data) for data in child.unread)
        self.assertLess(waiting, 4096 + 2 * 1200)
        self.assertEqual(upstream.in_flight, 20 - len(refused))
        # Once it reads again, requests go through.
        with capturedLogs() as events:
            child.resume_reading()
        self.assertIn("reads its stdin again", formatEvent(events[0]))
        send(upstream, a, call(99, "after"))
        child.answer(child.held[-1])
        self.assertIn("result", a.responses()[99])
        self.assertEqual(upstream.state, ChildState.RUNNING)


class UnresponsiveTests(SynchronousTestCase):
    def time_out(
        self, reactor: FakeProcessReactor, upstream: Upstream, a: FakeSession, n: int
    ) -> None:
        for _ in range(n):
            request_id = len(a.got) + 100
            send(upstream, a, call(request_id, "x"))
            reactor.advance(TIMEOUT)
            self.assertEqual(a.responses()[request_id]["error"]["code"], jsonrpc.REQUEST_TIMEOUT)

    def test_timeouts_in_a_row_make_it_unresponsive_until_it_speaks(self) -> None:
        reactor, upstream, a = started()
        self.time_out(reactor, upstream, a, 2)
        status = upstream.status()
        self.assertEqual((status["consecutive_timeouts"], status["unresponsive"]), (2, False))
        with capturedLogs() as events:
            self.time_out(reactor, upstream, a, 1)
        status = upstream.status()
        self.assertEqual((status["consecutive_timeouts"], status["unresponsive"]), (3, True))
        [warning] = [e for e in events if e["log_namespace"] == "mcptwist.routing"]
        self.assertIn("answered none of 3 requests in a row", warning["why"])
        # Reported, not restarted (restart_unresponsive is off by default).
        self.assertEqual((upstream.state, len(reactor.children)), (ChildState.RUNNING, 1))
        # Any message from the child clears it.
        reactor.child.send(jsonrpc.notification("notifications/tools/list_changed"))
        status = upstream.status()
        self.assertEqual((status["consecutive_timeouts"], status["unresponsive"]), (0, False))

    def test_an_answer_between_timeouts_resets_the_count(self) -> None:
        reactor, upstream, a = started()
        self.time_out(reactor, upstream, a, 2)
        send(upstream, a, call(1, "x"))
        reactor.child.answer(reactor.child.held[-1])
        self.time_out(reactor, upstream, a, 2)
        self.assertEqual(upstream.status()["consecutive_timeouts"], 2)
        self.assertFalse(upstream.status()["unresponsive"])

    def test_a_burst_of_timeouts_is_one_round(self) -> None:
        """Slow calls that time out together are no proof of a wedged child: requests
        count only when sent after the previous timeout."""
        reactor, upstream, a = started()
        for request_id in range(1, 11):
            send(upstream, a, call(request_id, "slow"))
        reactor.advance(TIMEOUT)
        self.assertEqual(upstream.status()["consecutive_timeouts"], 10)
        self.assertFalse(upstream.status()["unresponsive"])
        # Two more rounds, each request sent after the last timed out.
        self.time_out(reactor, upstream, a, 1)
        self.assertFalse(upstream.status()["unresponsive"])
        self.time_out(reactor, upstream, a, 1)
        status = upstream.status()
        self.assertEqual((status["consecutive_timeouts"], status["unresponsive"]), (12, True))

    def test_restart_unresponsive(self) -> None:
        reactor, upstream, a = started(unresponsive_after=2, restart_unresponsive=True)
        self.time_out(reactor, upstream, a, 1)
        send(upstream, a, call(1, "times out"))
        reactor.advance(TIMEOUT / 2)
        send(upstream, a, call(2, "in flight"))
        reactor.advance(TIMEOUT / 2)
        self.assertEqual(a.responses()[1]["error"]["code"], jsonrpc.REQUEST_TIMEOUT)
        # A request in flight when the child is given up on fails at once, with why.
        error = a.responses()[2]["error"]
        self.assertEqual(error["code"], jsonrpc.SERVER_UNAVAILABLE)
        self.assertIn("answered none of 2 requests in a row", error["message"])
        self.assertEqual(upstream.state, ChildState.RESTARTING)
        reactor.advance(POLICY.initial_delay)
        self.assertEqual(len(reactor.children), 2)
        status = upstream.status()
        self.assertEqual((status["unresponsive"], status["consecutive_timeouts"]), (False, 0))

    def test_unresponsive_after_zero_never_flags(self) -> None:
        reactor, upstream, a = started(unresponsive_after=0)
        self.time_out(reactor, upstream, a, 5)
        self.assertFalse(upstream.status()["unresponsive"])

    def test_health_and_servers_report_it(self) -> None:
        server = ServerConfig(name="s", command="fake", request_timeout=TIMEOUT)
        bridge = Bridge(self, server, hold=True)
        upstream = cast(SharedBackend, bridge.backends["s"]).upstream
        a = FakeSession("a")
        upstream.attach(a)
        initialize(upstream, a)
        self.time_out(bridge.reactor, upstream, a, 3)
        health = bridge.request("GET", "/health")
        self.assertEqual(health.code, 503)
        body = bridge.json(health)
        self.assertEqual(body["status"], "unhealthy")
        self.assertIn("unresponsive", body["servers"]["s"])
        self.assertIn("3 requests timed out since its child last said", body["servers"]["s"])
        status = bridge.json(bridge.request("GET", "/servers/s"))
        self.assertEqual(
            (status["state"], status["unresponsive"], status["consecutive_timeouts"]),
            ("running", True, 3),
        )
        bridge.reactor.child.send(jsonrpc.notification("notifications/message", {"level": "info"}))
        self.assertEqual(bridge.request("GET", "/health").code, 200)

    def test_per_session_children_fail_health_only_all_together(self) -> None:
        server = ServerConfig(name="p", command="fake", request_timeout=TIMEOUT, sharing="session")
        bridge = Bridge(self, server, hold=True)
        backend = bridge.backends["p"]
        sessions = [FakeSession(f"session{i}") for i in range(2)]
        upstreams = [backend.open(s) for s in sessions]
        for upstream, session in zip(upstreams, sessions, strict=True):
            initialize(upstream, session)
        self.time_out(bridge.reactor, upstreams[0], sessions[0], 3)
        status = bridge.json(bridge.request("GET", "/servers/p"))
        self.assertEqual((status["unresponsive_children"], status["unresponsive"]), (1, False))
        self.assertEqual(bridge.request("GET", "/health").code, 200)
        self.time_out(bridge.reactor, upstreams[1], sessions[1], 3)
        health = bridge.request("GET", "/health")
        self.assertEqual(health.code, 503)
        self.assertIn("none of its 2 children", bridge.json(health)["servers"]["p"])

    def test_admin_status_reports_it(self) -> None:
        reactor = FakeProcessReactor(hold=True)
        server = ServerConfig(name="s", command="fake", request_timeout=TIMEOUT)
        service = BridgeService(BridgeConfig(servers={"s": server}), reactor, {})
        service.startService()
        self.addCleanup(service.stopService)
        upstream = cast(SharedBackend, service.backends["s"]).upstream
        a = FakeSession("a")
        upstream.attach(a)
        initialize(upstream, a)
        self.time_out(reactor, upstream, a, 3)
        status = service.control.server("s")
        assert status is not None
        self.assertEqual((status["unresponsive"], status["consecutive_timeouts"]), (True, 3))


class ConfigTests(SynchronousTestCase):
    def test_keys_and_defaults(self) -> None:
        server = parse_server("t.toml", "s", {"command": "x"}, {})
        assert server is not None
        self.assertEqual((server.unresponsive_after, server.restart_unresponsive), (3, False))
        server = parse_server(
            "t.toml",
            "s",
            {"command": "x", "unresponsive_after": 5, "restart_unresponsive": True},
            {},
        )
        assert server is not None
        self.assertEqual((server.unresponsive_after, server.restart_unresponsive), (5, True))

    def test_errors_name_the_key_and_the_fix(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse_server("t.toml", "s", {"command": "x", "unresponsive_after": -1}, {})
        self.assertEqual(caught.exception.key, "servers.s.unresponsive_after")
        with self.assertRaises(ConfigError) as caught:
            parse_server(
                "t.toml",
                "s",
                {"command": "x", "unresponsive_after": 0, "restart_unresponsive": True},
                {},
            )
        self.assertEqual(caught.exception.key, "servers.s.restart_unresponsive")
        self.assertIn("unresponsive_after", caught.exception.fix)


class RealChildTests(TestCase):
    """What the kernel does when a real child closes a pipe or stops reading."""

    timeout = 20

    def supervise(self, script: str, **kwargs: Any) -> tuple[Supervisor, Owner]:
        server = ServerConfig(
            name="real",
            command=sys.executable,
            args=("-c", script),
            restart=RestartPolicy(initial_delay=30, crash_limit=10),
            **kwargs,
        )
        owner = Owner()
        supervisor = Supervisor(server, owner, reactor, dict(os.environ))
        supervisor.startService()
        self.addCleanup(supervisor.stopService)
        return supervisor, owner

    async def closes(self, fd: int, name: str) -> None:
        script = f"import os, time\nos.close({fd})\ntime.sleep(60)\n"
        started = reactor.seconds()
        supervisor, owner = self.supervise(script, term_after=0.2, kill_after=0.5)
        await owner.lost_once
        when, why = owner.lost_at[0], owner.lost[0]
        self.assertEqual(why, f"closed its {name} while still running")
        self.assertLess(when - started, 3)
        child = supervisor.child
        assert child is not None
        await child.ended
        # Stopped with the usual sequence (it ignores stdin EOF, so SIGTERM), then
        # left for a restart after the backoff.
        self.assertEqual(supervisor.state, ChildState.RESTARTING)
        self.assertEqual(
            supervisor.last_exit,
            f"closed its {name} while still running, so it was stopped (killed by SIGTERM)",
        )
        self.assertFalse(os.path.exists(f"/proc/{child.pid}"), "no zombie is left")

    async def test_stdout_closed(self) -> None:
        await self.closes(1, "stdout")

    async def test_stdin_closed(self) -> None:
        await self.closes(0, "stdin")

    async def test_stderr_closed_and_a_plain_exit(self) -> None:
        """Closing stderr changes nothing; an exit is reported as the exit it is."""
        script = "import os, time\nos.close(2)\ntime.sleep(1)\nos._exit(4)\n"
        _, owner = self.supervise(script)
        await owner.lost_once
        self.assertEqual(owner.lost, ["exited with code 4"])

    async def test_unread_stdin_is_bounded(self) -> None:
        """A child that never reads: writes are refused past max_message_size."""
        supervisor, _ = self.supervise("import time\ntime.sleep(60)\n", max_message_size=1 << 20)
        await deferLater(reactor, 0.3, lambda: None)
        child = supervisor.child
        assert child is not None
        message = jsonrpc.notification("notifications/x", {"pad": "p" * 100_000})
        sent = 0
        while child.send(message):
            sent += 1
            self.assertLess(sent, 100, "never refused")
        # The pipe (64 KiB), Twisted's buffer (64 KiB), then at most 1 MiB more.
        self.assertLess(sent * 100_000, (1 << 20) + 3 * 100_000 + 2 * 65536 + 100_000)
        self.assertGreaterEqual(child.unread, 1 << 20)


class LastLineTests(SynchronousTestCase):
    def test_an_answer_without_newline_before_stdout_closes_is_delivered(self) -> None:
        reactor, upstream, a = started()
        send(upstream, a, call(1, "x"))
        child = reactor.child
        child_id = child.held[0]["id"]
        child.send_raw(jsonrpc.dumps(jsonrpc.result(child_id, {"content": []})))
        child.close_pipe(1)
        self.assertEqual(a.responses()[1]["result"], {"content": []})
