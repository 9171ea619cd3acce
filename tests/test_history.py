"""The dashboard's call history: buckets, rates and latency estimates on a Clock."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.ops.history import LATENCY_BOUNDS, CallHistory, quantile
from mcptwist.ops.record import Recorders
from mcptwist.routing.record import RequestEnded, Status


def ended(server: str = "s", status: Status = "ok", latency_ms: float = 10.0) -> RequestEnded:
    return RequestEnded(
        session="sid",
        server=server,
        principal="token:ops",
        peer="127.0.0.1",
        method="tools/call",
        name="echo",
        arg_size=0,
        arg_sha256="",
        status=status,
        error_code=None if status == "ok" else -32603,
        latency_ms=latency_ms,
        child_pid=42,
    )


class CallHistoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.history = CallHistory(self.clock, bucket=5.0, window=60.0)

    def test_counts_calls_per_second_in_the_current_bucket(self) -> None:
        for _ in range(10):
            self.history.request_ended(ended())
        snapshot = self.history.snapshot()
        self.assertEqual(len(snapshot["t"]), 12)
        series = snapshot["servers"]["s"]
        self.assertEqual(series["calls"][-1], 2.0)
        self.assertEqual(series["calls"][:-1], [0.0] * 11)
        self.assertEqual((series["total"], series["failed"]), (10, 0))
        self.assertEqual(snapshot["t"][-1], 1_000_000.0)

    def test_errors_and_timeouts_fail_cancelled_calls_do_not(self) -> None:
        for status in ("ok", "error", "timeout", "cancelled"):
            self.history.request_ended(ended(status=status))  # type: ignore[arg-type]
        series = self.history.snapshot()["servers"]["s"]
        self.assertEqual(series["errors"][-1], 0.5)
        self.assertEqual(self.history.totals("s"), (4, 2))

    def test_a_new_interval_starts_a_new_bucket(self) -> None:
        self.history.request_ended(ended(latency_ms=4.0))
        self.clock.advance(5)
        self.history.request_ended(ended(latency_ms=20.0))
        self.history.request_ended(ended(latency_ms=40.0))
        series = self.history.snapshot()["servers"]["s"]
        self.assertEqual(series["calls"][-2:], [0.2, 0.4])
        self.assertEqual(series["mean"][-2:], [4.0, 30.0])
        self.assertEqual(series["max"][-2:], [4.0, 40.0])
        self.assertIsNone(series["p50"][-3])

    def test_percentiles_are_estimated_from_the_histogram(self) -> None:
        for latency in [5.0] * 90 + [900.0] * 10:
            self.history.request_ended(ended(latency_ms=latency))
        series = self.history.snapshot()["servers"]["s"]
        # The median lies in the (2.5, 5] bin; the 95th in (500, 1000], capped at the max.
        self.assertTrue(2.5 <= series["p50"][-1] <= 5.0, series["p50"][-1])
        self.assertTrue(500.0 <= series["p95"][-1] <= 900.0, series["p95"][-1])

    def test_a_quantile_never_exceeds_the_slowest_call(self) -> None:
        histogram = [0] * (len(LATENCY_BOUNDS) + 1)
        histogram[-1] = 3
        self.assertEqual(quantile(histogram, 3, 45_000.0, 0.95), 44_250.0)
        histogram[-1], histogram[0] = 0, 3
        self.assertEqual(quantile(histogram, 3, 0.4, 1.0), 0.4)

    def test_old_buckets_leave_the_window_and_idle_servers_are_forgotten(self) -> None:
        self.history.request_ended(ended(server="gone"))
        self.history.request_ended(ended(server="s"))
        self.clock.advance(30)
        self.history.request_ended(ended(server="s"))
        self.assertEqual(self.history.servers(), ["gone", "s"])
        self.clock.advance(35)
        self.assertEqual(self.history.servers(), ["s"])
        self.assertEqual(self.history.totals("s"), (1, 0))

    def test_a_server_without_calls_has_an_empty_series(self) -> None:
        series = self.history.snapshot(["quiet"])["servers"]["quiet"]
        self.assertEqual(series["calls"], [0.0] * 12)
        self.assertEqual(series["p95"], [None] * 12)
        self.assertEqual(series["total"], 0)

    def test_it_is_a_recorder(self) -> None:
        recorders = Recorders(self.history)
        self.assertTrue(recorders.recording)
        self.assertFalse(recorders.detailed)
        recorders.session_opened(
            session="x",
            server="s",
            principal=None,
            peer=None,
            transport=None,
            protocol_version=None,
        )
        recorders.child_spawned(server="s", pid=1, command="c")
        recorders.request_ended(ended())
        self.assertEqual(self.history.totals("s"), (1, 0))

    def test_a_bucket_wider_than_the_window_is_refused(self) -> None:
        self.assertRaises(ValueError, CallHistory, self.clock, bucket=10.0, window=5.0)

    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.floats(min_value=0, max_value=20, allow_nan=False),
                st.sampled_from(["a", "b", "c"]),
                st.sampled_from(["ok", "error", "timeout", "cancelled"]),
                st.floats(min_value=0, max_value=60_000, allow_nan=False),
            ),
            max_size=80,
        )
    )
    def test_totals_are_what_was_recorded_within_the_window(
        self, calls: list[tuple[float, str, str, float]]
    ) -> None:
        clock = Clock()
        history = CallHistory(clock, bucket=5.0, window=60.0)
        recorded: list[tuple[float, str, bool]] = []
        for wait, server, status, latency in calls:
            clock.advance(wait)
            history.request_ended(ended(server, status, latency))  # type: ignore[arg-type]
            recorded.append((clock.seconds(), server, status in ("error", "timeout")))
        now = clock.seconds()
        first = (now - now % 5.0) - 11 * 5.0
        snapshot = history.snapshot(["a", "b", "c"])
        for server in ("a", "b", "c"):
            inside = [f for t, s, f in recorded if s == server and t >= first]
            series = snapshot["servers"][server]
            self.assertEqual(series["total"], len(inside))
            self.assertEqual(series["failed"], sum(inside))
            self.assertAlmostEqual(sum(series["calls"]) * 5.0, len(inside), places=6)
            # Memory is bounded by the window, whatever the traffic.
            self.assertLessEqual(len(history._series.get(server, ())), history.buckets)
