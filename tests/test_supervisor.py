"""The child supervisor: spawn, backoff, crash-loop breaker, clean stop."""

from __future__ import annotations

import signal

from twisted.trial.unittest import SynchronousTestCase

from mcptwist.child.supervisor import ChildState
from mcptwist.config.model import RestartPolicy, ServerConfig
from mcptwist.routing.upstream import Upstream

from .support.children import FakeProcessReactor


def make(reactor: FakeProcessReactor, **kwargs: object) -> Upstream:
    server = ServerConfig(name="s", command="fake", **kwargs)  # type: ignore[arg-type]
    upstream = Upstream(server, reactor, {})
    upstream.startService()
    return upstream


class RestartTests(SynchronousTestCase):
    def test_backoff_doubles_up_to_the_maximum(self) -> None:
        reactor = FakeProcessReactor()
        policy = RestartPolicy(initial_delay=1, max_delay=4, crash_limit=100, crash_window=1000)
        upstream = make(reactor, restart=policy)
        delays = []
        for _ in range(5):
            reactor.child.exit(1)
            count = len(reactor.children)
            waited = 0.0
            while len(reactor.children) == count:
                reactor.advance(0.5)
                waited += 0.5
            delays.append(waited)
        self.assertEqual(delays, [1, 2, 4, 4, 4])
        self.assertEqual(upstream.status()["restarts"], 5)

    def test_crash_loop_breaker_marks_failed(self) -> None:
        reactor = FakeProcessReactor()
        policy = RestartPolicy(initial_delay=0.1, max_delay=1, crash_limit=3, crash_window=60)
        upstream = make(reactor, restart=policy)
        for _ in range(3):
            reactor.child.exit(2)
            reactor.advance(1)
        self.assertEqual(upstream.state, ChildState.FAILED)
        self.assertEqual(len(reactor.children), 3)
        reactor.advance(100)
        self.assertEqual(len(reactor.children), 3, "a failed server is not restarted")
        self.assertIn("exited with code 2", upstream.status()["last_exit"])

    def test_breaker_retries_after_the_cooldown(self) -> None:
        reactor = FakeProcessReactor()
        policy = RestartPolicy(
            initial_delay=0.1, max_delay=1, crash_limit=2, crash_window=60, cooldown=300
        )
        upstream = make(reactor, restart=policy)
        for _ in range(2):
            reactor.child.exit(1)
            reactor.advance(1)
        self.assertEqual(upstream.state, ChildState.FAILED)
        self.assertEqual(upstream.status()["next_attempt_in"], 299)
        reactor.advance(299)
        self.assertEqual(upstream.state, ChildState.RUNNING)
        self.assertEqual(len(reactor.children), 3)

    def test_endless_slow_crashes_never_overflow_the_backoff(self) -> None:
        """A child that crashes forever, too slowly to trip the breaker, keeps being restarted."""
        reactor = FakeProcessReactor()
        policy = RestartPolicy(initial_delay=1, max_delay=30, crash_limit=5, crash_window=10)
        upstream = make(reactor, restart=policy)
        for _ in range(1100):
            reactor.advance(5)
            reactor.child.exit(1)
            reactor.advance(30)
        self.assertEqual(upstream.state, ChildState.RUNNING)
        self.assertEqual(len(reactor.children), 1101)

    def test_crashes_far_apart_do_not_trip_the_breaker(self) -> None:
        reactor = FakeProcessReactor()
        policy = RestartPolicy(initial_delay=1, max_delay=1, crash_limit=2, crash_window=10)
        upstream = make(reactor, restart=policy)
        for _ in range(4):
            reactor.advance(30)
            reactor.child.exit(1)
            reactor.advance(1)
            self.assertEqual(upstream.state, ChildState.RUNNING)

    def test_spawn_failure_counts_as_a_crash(self) -> None:
        reactor = FakeProcessReactor()
        reactor.spawn_error = OSError(2, "No such file or directory")
        policy = RestartPolicy(initial_delay=0.1, max_delay=0.1, crash_limit=2, crash_window=60)
        upstream = make(reactor, restart=policy)
        reactor.advance(1)
        self.assertEqual(upstream.state, ChildState.FAILED)
        self.assertIn("could not be spawned", upstream.status()["last_exit"])

    def test_operator_restart_is_not_a_crash(self) -> None:
        reactor = FakeProcessReactor()
        upstream = make(reactor)
        upstream.supervisor.restart()
        self.assertEqual(len(reactor.children), 2)
        self.assertEqual(upstream.state, ChildState.RUNNING)
        self.assertEqual(upstream.status()["restarts"], 0)


class StopTests(SynchronousTestCase):
    def test_polite_child_stops_on_stdin_eof(self) -> None:
        reactor = FakeProcessReactor()
        upstream = make(reactor)
        child = reactor.child
        d = upstream.stopService()
        self.assertTrue(child.stdin_is_closed)
        self.successResultOf(d)
        # It left on EOF: no TERM or KILL is still armed for it.
        self.assertEqual(reactor.getDelayedCalls(), [])
        self.assertEqual(upstream.state, ChildState.STOPPED)

    def test_stubborn_child_gets_term_then_kill(self) -> None:
        reactor = FakeProcessReactor(exit_on_eof=False)
        reactor.killpg = lambda pid, sig: reactor.signals.append((pid, sig))  # type: ignore[method-assign]
        upstream = make(reactor, term_after=2.0, kill_after=2.0)
        child = reactor.child
        d = upstream.stopService()
        self.assertNoResult(d)
        reactor.advance(1.9)
        self.assertEqual(reactor.signals, [])
        reactor.advance(0.1)
        self.assertEqual(reactor.signals, [(child.pid, signal.SIGTERM)])
        reactor.advance(2)
        self.assertEqual(reactor.signals[-1], (child.pid, signal.SIGKILL))
        self.assertNoResult(d)
        child.exit(0, signal.SIGKILL)
        self.successResultOf(d)

    def test_no_restart_after_stop(self) -> None:
        reactor = FakeProcessReactor()
        upstream = make(reactor)
        upstream.stopService()
        reactor.advance(60)
        self.assertEqual(len(reactor.children), 1)

    def test_exited_child_group_is_cleaned(self) -> None:
        """Grandchildren left in the group of a crashed child are signalled."""
        reactor = FakeProcessReactor()
        make(reactor)
        child = reactor.child
        child.exit(1)
        self.assertIn((child.pid, signal.SIGTERM), reactor.signals)
        self.assertIn((child.pid, signal.SIGKILL), reactor.signals)
