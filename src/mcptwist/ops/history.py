# -*- test-case-name: tests.test_history -*-
"""The last minutes of each server's calls, for the dashboard's charts.

L{CallHistory} is a L{Recorder}: the core tells it how each request ended,
and it adds the request to its server's current bucket (by default five
seconds wide, over the last ten minutes): how many calls, how many failed,
the sum and maximum of their latencies, and a small fixed histogram of them
from which the median and 95th percentile are estimated. A request costs a
dictionary lookup and a few additions; a bucket is made once per server and
interval, and the oldest falls out of a bounded deque, so memory is bounded
by the number of servers whatever the traffic.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import deque
from typing import Any, Final

from twisted.internet.interfaces import IReactorTime

from mcptwist.routing.record import BaseRecorder, RequestEnded

BUCKET_SECONDS: Final = 5.0
WINDOW_SECONDS: Final = 600.0
# Upper bounds (milliseconds) of the latency histogram's bins; the last bin
# holds everything slower.
LATENCY_BOUNDS: Final = (
    1.0,
    2.5,
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    500.0,
    1000.0,
    2500.0,
    5000.0,
    10000.0,
    30000.0,
)
# How a request ended that counts as a failure.
_FAILED: Final = frozenset({"error", "timeout"})


class _Bucket:
    """The calls of one server within one interval."""

    __slots__ = ("count", "errors", "histogram", "latency_max", "latency_sum", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.count = 0
        self.errors = 0
        self.latency_sum = 0.0
        self.latency_max = 0.0
        self.histogram = [0] * (len(LATENCY_BOUNDS) + 1)


class CallHistory(BaseRecorder):
    """Calls per server in fixed intervals over a sliding window, on an injected clock."""

    def __init__(
        self,
        clock: IReactorTime,
        bucket: float = BUCKET_SECONDS,
        window: float = WINDOW_SECONDS,
    ) -> None:
        if bucket <= 0 or window < bucket:
            raise ValueError("the bucket must be positive and no wider than the window")
        self._clock = clock
        self.bucket = bucket
        self.buckets = max(1, math.ceil(window / bucket))
        self.window = self.buckets * bucket
        self._series: dict[str, deque[_Bucket]] = {}

    # A Recorder of the end of each request, and of nothing else.

    def request_ended(self, ended: RequestEnded) -> None:
        """Count a request in its server's current bucket."""
        now = self._clock.seconds()
        series = self._series.get(ended.server)
        if series is None:
            series = self._series[ended.server] = deque(maxlen=self.buckets)
        if series and series[-1].start <= now < series[-1].start + self.bucket:
            current = series[-1]
        else:
            current = _Bucket(now - now % self.bucket)
            series.append(current)
        latency = ended.latency_ms
        current.count += 1
        if ended.status in _FAILED:
            current.errors += 1
        current.latency_sum += latency
        if latency > current.latency_max:
            current.latency_max = latency
        current.histogram[bisect_left(LATENCY_BOUNDS, latency)] += 1

    # Reading

    def servers(self) -> list[str]:
        """The servers with calls within the window (others are forgotten)."""
        self._forget()
        return sorted(self._series)

    def totals(self, server: str) -> tuple[int, int]:
        """The calls, and failed calls, of a server within the window."""
        start = self._first_start()
        series = self._series.get(server, ())
        return (
            sum(b.count for b in series if b.start >= start),
            sum(b.errors for b in series if b.start >= start),
        )

    def snapshot(self, servers: list[str] | None = None) -> dict[str, Any]:
        """Each server's series over the window, one point per bucket, oldest
        first, with the buckets without calls filled in: C{t} (each bucket's
        start, Unix seconds), C{calls} (per second), C{errors} (the share of
        calls that failed), C{p50}, C{p95}, C{mean} and C{max} (latency, ms;
        None without calls)."""
        self._forget()
        first = self._first_start()
        times = [first + i * self.bucket for i in range(self.buckets)]
        names = sorted(self._series) if servers is None else servers
        return {
            "bucket": self.bucket,
            "window": self.window,
            "now": self._clock.seconds(),
            "t": times,
            "servers": {name: self._points(name, first) for name in names},
        }

    def _points(self, name: str, first: float) -> dict[str, Any]:
        by_slot: dict[int, _Bucket] = {}
        for kept in self._series.get(name, ()):
            slot = round((kept.start - first) / self.bucket)
            if 0 <= slot < self.buckets:
                by_slot[slot] = kept
        calls: list[float] = []
        errors: list[float | None] = []
        p50: list[float | None] = []
        p95: list[float | None] = []
        mean: list[float | None] = []
        high: list[float | None] = []
        total = failed = 0
        for slot in range(self.buckets):
            b = by_slot.get(slot)
            if b is None or not b.count:
                calls.append(0.0)
                errors.append(None)
                for points in (p50, p95, mean, high):
                    points.append(None)
                continue
            total += b.count
            failed += b.errors
            calls.append(round(b.count / self.bucket, 3))
            errors.append(round(b.errors / b.count, 4))
            p50.append(_round(quantile(b.histogram, b.count, b.latency_max, 0.5)))
            p95.append(_round(quantile(b.histogram, b.count, b.latency_max, 0.95)))
            mean.append(_round(b.latency_sum / b.count))
            high.append(_round(b.latency_max))
        return {
            "calls": calls,
            "errors": errors,
            "p50": p50,
            "p95": p95,
            "mean": mean,
            "max": high,
            "total": total,
            "failed": failed,
        }

    def _first_start(self) -> float:
        """The start of the oldest bucket the window holds now."""
        now = self._clock.seconds()
        return (now - now % self.bucket) - (self.buckets - 1) * self.bucket

    def _forget(self) -> None:
        """Drop the servers whose last call has left the window (a server
        removed by a reload, or idle)."""
        first = self._first_start()
        for name in [n for n, s in self._series.items() if not s or s[-1].start < first]:
            del self._series[name]


def quantile(histogram: list[int], count: int, highest: float, q: float) -> float:
    """The C{q} quantile of C{count} latencies binned in C{histogram} (over
    L{LATENCY_BOUNDS}), interpolated within its bin, and never above the
    highest latency seen."""
    target = q * count
    seen = 0
    lower = 0.0
    for index, in_bin in enumerate(histogram):
        upper = LATENCY_BOUNDS[index] if index < len(LATENCY_BOUNDS) else highest
        if in_bin and seen + in_bin >= target:
            fraction = (target - seen) / in_bin
            return min(highest, lower + (upper - lower) * fraction)
        seen += in_bin
        lower = upper
    return highest


def _round(value: float) -> float:
    return round(value, 3)
