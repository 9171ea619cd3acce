"""Prometheus metrics: counters, bounded labels, the live snapshot, the /metrics resource."""

from __future__ import annotations

import math
import os
from typing import Any

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Histogram,
    disable_created_metrics,
    enable_created_metrics,
)
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from mcptwist import __version__
from mcptwist.child.supervisor import ChildState
from mcptwist.ops.metrics import (
    AUTH_REASONS,
    CHILD_STATES,
    DURATION_BUCKETS,
    EXIT_REASONS,
    MAX_SERVERS,
    MCP_METHODS,
    OTHER,
    ClusterSnapshot,
    Metrics,
    ServerSnapshot,
    Snapshot,
    auth_reason,
    exit_reason,
)
from mcptwist.routing.record import ToolEvent

from .support.router import ended

Labels = tuple[tuple[str, str], ...]


def scrape(metrics: Metrics, accept: bytes | None = None) -> tuple[str, str]:
    """(content type, body) of a GET of the metrics resource."""
    request = DummyRequest([b""])
    request.method = b"GET"
    if accept is not None:
        request.requestHeaders.setRawHeaders(b"accept", [accept])
    body = metrics.resource().render(request)
    assert isinstance(body, bytes)
    [content_type] = request.responseHeaders.getRawHeaders(b"content-type")
    return content_type.decode(), body.decode()


def samples(metrics: Metrics, name: str) -> dict[Labels, float]:
    """The samples called C{name} in a scrape, by their sorted labels."""
    found: dict[Labels, float] = {}
    for family in text_string_to_metric_families(scrape(metrics)[1]):
        for s in family.samples:
            if s.name == name:
                found[tuple(sorted(s.labels.items()))] = s.value
    return found


def names(metrics: Metrics) -> set[str]:
    return {family.name for family in text_string_to_metric_families(scrape(metrics)[1])}


def server(name: str, state: str = "running", **changes: Any) -> ServerSnapshot:
    """A server snapshot: one running child unless told otherwise."""
    base = ServerSnapshot(
        name=name,
        sharing="shared",
        state=state,
        children=1,
        running_children=1 if state == "running" else 0,
        restarts=0,
        uptime=12.5 if state == "running" else None,
        in_flight=0,
        stdin_queue=0,
        sessions=0,
    )
    return attrs.evolve(base, **changes)


class HTTPTests(SynchronousTestCase):
    def test_requests_and_bytes(self) -> None:
        """Each answer is counted by server, route, method and code; bodies add bytes."""
        m = Metrics()
        m.http_request("time", "mcp", "POST", 200, 120, 340)
        m.http_request("time", "mcp", "POST", 200, 80, 60)
        m.http_request("time", "sse", "GET", 200, 0, 0)
        m.http_request(None, "health", "GET", 200, 0, 15)
        self.assertEqual(
            samples(m, "mcptwist_http_requests_total"),
            {
                (("code", "200"), ("method", "POST"), ("route", "mcp"), ("server", "time")): 2.0,
                (("code", "200"), ("method", "GET"), ("route", "sse"), ("server", "time")): 1.0,
                (("code", "200"), ("method", "GET"), ("route", "health"), ("server", "")): 1.0,
            },
        )
        self.assertEqual(
            samples(m, "mcptwist_received_bytes_total"),
            {(("server", "time"),): 200.0, (("server", ""),): 0.0},
        )
        self.assertEqual(
            samples(m, "mcptwist_sent_bytes_total"),
            {(("server", "time"),): 400.0, (("server", ""),): 15.0},
        )

    def test_unknown_values_are_other(self) -> None:
        """Unknown routes and methods, and codes that are not HTTP codes, become "other"."""
        m = Metrics()
        m.http_request("time", "/etc/passwd", "BREW", 99, 0, 0)
        m.http_request("time", "nowhere", "PROPFIND", 1000, 0, 0)
        self.assertEqual(
            samples(m, "mcptwist_http_requests_total"),
            {(("code", OTHER), ("method", OTHER), ("route", OTHER), ("server", "time")): 2.0},
        )

    @given(
        st.lists(
            st.tuples(st.text(max_size=20), st.text(max_size=10), st.integers(-1000, 100000)),
            max_size=30,
        )
    )
    @settings(max_examples=30)
    def test_http_labels_bounded(self, calls: list[tuple[str, str, int]]) -> None:
        """Whatever the route, method and code, labels stay within their sets."""
        m = Metrics()
        for route, method, code in calls:
            m.http_request("time", route, method, code, 1, 1)
        found = samples(m, "mcptwist_http_requests_total")
        self.assertEqual(sum(found.values()), len(calls))
        for labels in found:
            d = dict(labels)
            self.assertIn(
                d["route"],
                {"mcp", "sse", "messages", "status", "health", "metrics", "admin", "metadata"}
                | {OTHER},
            )
            self.assertIn(
                d["method"], {"GET", "HEAD", "POST", "DELETE", "OPTIONS", "PUT", "PATCH"} | {OTHER}
            )
            self.assertTrue(d["code"] == OTHER or 100 <= int(d["code"]) <= 599)


class RequestTests(SynchronousTestCase):
    def test_requests_and_durations(self) -> None:
        """Requests are counted by method and status; durations fill the histogram."""
        m = Metrics()
        m.request_done("time", "tools/call", "ok", 0.003, "get_current_time")
        m.request_done("time", "tools/call", "ok", 0.7, "get_current_time")
        m.request_done("time", "tools/list", "ok", 0.02)
        m.request_done("time", "tools/call", "timeout", 300.5, "convert_time")
        self.assertEqual(
            samples(m, "mcptwist_requests_total"),
            {
                (("method", "tools/call"), ("server", "time"), ("status", "ok")): 2.0,
                (("method", "tools/list"), ("server", "time"), ("status", "ok")): 1.0,
                (("method", "tools/call"), ("server", "time"), ("status", "timeout")): 1.0,
            },
        )
        buckets = {
            dict(labels)["le"]: value
            for labels, value in samples(m, "mcptwist_request_duration_seconds_bucket").items()
            if dict(labels)["method"] == "tools/call"
        }
        self.assertEqual(buckets["0.005"], 1.0)
        self.assertEqual(buckets["0.5"], 1.0)
        self.assertEqual(buckets["1.0"], 2.0)
        self.assertEqual(buckets["300.0"], 2.0)
        self.assertEqual(buckets["+Inf"], 3.0)
        self.assertEqual(len(buckets), 16)
        count = samples(m, "mcptwist_request_duration_seconds_count")
        self.assertEqual(count[(("method", "tools/call"), ("server", "time"))], 3.0)
        total = samples(m, "mcptwist_request_duration_seconds_sum")
        self.assertAlmostEqual(total[(("method", "tools/call"), ("server", "time"))], 301.203)

    def test_tool_calls(self) -> None:
        """tools/call is counted per tool; only a tool that once succeeded gets its name."""
        m = Metrics()
        m.request_done("time", "tools/call", "error", 0.01, "made_up")
        m.request_done("time", "tools/call", "ok", 0.01, "convert_time")
        m.request_done("time", "tools/call", "error", 0.01, "convert_time")
        m.request_done("time", "tools/list", "ok", 0.01, "ignored")
        self.assertEqual(
            samples(m, "mcptwist_tool_calls_total"),
            {
                (("server", "time"), ("status", "error"), ("tool", OTHER)): 1.0,
                (("server", "time"), ("status", "ok"), ("tool", "convert_time")): 1.0,
                (("server", "time"), ("status", "error"), ("tool", "convert_time")): 1.0,
            },
        )

    def test_unknown_method_and_status(self) -> None:
        m = Metrics()
        m.request_done("time", "x/" * 1000, "weird", -1.0)
        self.assertEqual(
            samples(m, "mcptwist_requests_total"),
            {(("method", OTHER), ("server", "time"), ("status", OTHER)): 1.0},
        )
        # A clock that went backwards counts as no time at all.
        self.assertEqual(
            samples(m, "mcptwist_request_duration_seconds_sum"),
            {(("method", OTHER), ("server", "time")): 0.0},
        )

    def test_series_are_cached(self) -> None:
        """Repeated calls reuse the label children: the cache holds one entry per series."""
        m = Metrics()
        for _ in range(5):
            m.request_done("time", "ping", "ok", 0.001)
            m.request_done("time", "not-mcp", "ok", 0.001)
        self.assertEqual(len(m._request_series), 2)

    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["a", "b"]),
                st.one_of(st.sampled_from(sorted(MCP_METHODS)), st.text(max_size=12)),
                st.one_of(st.text(max_size=12), st.sampled_from([f"tool{i}" for i in range(12)])),
                st.sampled_from(["ok", "error", "cancelled", "timeout", "?"]),
            ),
            max_size=60,
        )
    )
    @settings(max_examples=40)
    def test_labels_bounded(self, calls: list[tuple[str, str, str, str]]) -> None:
        """Arbitrary methods and tools never make more series than the caps allow."""
        m = Metrics(max_tools=5)
        for name, method, tool, status in calls:
            m.request_done(name, method, status, 0.1, tool)
            m.request_done(name, "tools/call", status, 0.1, tool)
        methods = {dict(k)["method"] for k in samples(m, "mcptwist_requests_total")}
        self.assertLessEqual(methods, MCP_METHODS | {OTHER})
        tools: dict[str, set[str]] = {}
        for labels in samples(m, "mcptwist_tool_calls_total"):
            d = dict(labels)
            self.assertIn(d["status"], {"ok", "error", "cancelled", "timeout", OTHER})
            tools.setdefault(d["server"], set()).add(d["tool"])
        for seen in tools.values():
            self.assertLessEqual(len(seen - {OTHER}), 5)

    def test_server_cap(self) -> None:
        """Past MAX_SERVERS distinct names, servers are counted as "other"."""
        m = Metrics()
        for i in range(MAX_SERVERS + 10):
            m.request_done(f"s{i}", "ping", "ok", 0.001)
        m.request_done("x" * 65, "ping", "ok", 0.001)
        found = {dict(k)["server"] for k in samples(m, "mcptwist_requests_total")}
        self.assertEqual(len(found), MAX_SERVERS + 1)
        self.assertIn(OTHER, found)
        self.assertEqual(
            samples(m, "mcptwist_requests_total")[
                (("method", "ping"), ("server", OTHER), ("status", "ok"))
            ],
            11.0,
        )


class RefusalTests(SynchronousTestCase):
    def test_refusals(self) -> None:
        m = Metrics()
        m.auth_failure("expired")
        m.auth_failure("expired")
        m.auth_failure("missing claim sub")
        m.auth_failure("something new")
        m.access_refused()
        m.rate_limited("server-ip")
        m.rate_limited("galaxy")
        m.ip_refused("listener")
        m.ip_refused("server")
        self.assertEqual(
            samples(m, "mcptwist_auth_failures_total"),
            {
                (("reason", "expired"),): 2.0,
                (("reason", "missing claim"),): 1.0,
                (("reason", OTHER),): 1.0,
            },
        )
        self.assertEqual(samples(m, "mcptwist_access_refused_total"), {(): 1.0})
        self.assertEqual(
            samples(m, "mcptwist_rate_limited_total"),
            {(("scope", "server-ip"),): 1.0, (("scope", OTHER),): 1.0},
        )
        self.assertEqual(
            samples(m, "mcptwist_ip_refused_total"),
            {(("scope", "listener"),): 1.0, (("scope", "server"),): 1.0},
        )

    def test_auth_reasons(self) -> None:
        """The authenticator's phrases are kept; claim names are dropped."""
        for reason in AUTH_REASONS:
            self.assertEqual(auth_reason(reason), reason)
        self.assertEqual(auth_reason("bad claim servers"), "bad claim")
        self.assertEqual(auth_reason("missing claim email"), "missing claim")
        self.assertEqual(auth_reason("missing claimant"), OTHER)

    @given(st.text())
    def test_auth_reason_bounded(self, reason: str) -> None:
        self.assertIn(auth_reason(reason), AUTH_REASONS | {OTHER})


class ChildTests(SynchronousTestCase):
    def test_exit_reason(self) -> None:
        self.assertEqual(exit_reason(0, None, False), "exit0")
        self.assertEqual(exit_reason(3, None, False), "exit_nonzero")
        self.assertEqual(exit_reason(None, 9, False), "signal")
        self.assertEqual(exit_reason(None, None, False), "spawn_failed")
        self.assertEqual(exit_reason(None, 15, True), "killed_by_bridge")
        self.assertEqual(exit_reason(0, None, True), "killed_by_bridge")

    @given(st.one_of(st.none(), st.integers()), st.one_of(st.none(), st.integers()), st.booleans())
    def test_exit_reason_total(self, code: int | None, signal: int | None, stopping: bool) -> None:
        self.assertIn(exit_reason(code, signal, stopping), EXIT_REASONS)

    def test_spawns_and_exits(self) -> None:
        """Children are counted under their server, per-session ones included."""
        m = Metrics()
        m.count_spawn("time")
        m.count_spawn("files[0123abcd]")
        m.count_spawn("files[4567ef01]")
        m.count_exit("time", "signal")
        m.count_exit("files[0123abcd]", "killed_by_bridge")
        m.count_exit("files[4567ef01]", "bored")
        self.assertEqual(
            samples(m, "mcptwist_child_spawns_total"),
            {(("server", "time"),): 1.0, (("server", "files"),): 2.0},
        )
        self.assertEqual(
            samples(m, "mcptwist_child_exits_total"),
            {
                (("reason", "signal"), ("server", "time")): 1.0,
                (("reason", "killed_by_bridge"), ("server", "files")): 1.0,
                (("reason", OTHER), ("server", "files")): 1.0,
            },
        )


class SessionTests(SynchronousTestCase):
    def test_sessions(self) -> None:
        m = Metrics()
        m.count_session_opened("time", "streamable")
        m.count_session_opened("time", "streamable")
        m.count_session_opened("time", "sse")
        m.count_session_opened("time", "carrier-pigeon")
        m.count_session_closed("time", "streamable")
        self.assertEqual(
            samples(m, "mcptwist_sessions_opened_total"),
            {
                (("server", "time"), ("transport", "streamable")): 2.0,
                (("server", "time"), ("transport", "sse")): 1.0,
                (("server", "time"), ("transport", OTHER)): 1.0,
            },
        )
        self.assertEqual(
            samples(m, "mcptwist_sessions_closed_total"),
            {(("server", "time"), ("transport", "streamable")): 1.0},
        )


class RecorderTests(SynchronousTestCase):
    """The metrics count what the core reports, by the labels they always had."""

    def test_requests(self) -> None:
        m = Metrics()
        m.request_ended(ended())
        m.request_ended(ended(method="tools/list", name=None, status="error"))
        self.assertEqual(
            samples(m, "mcptwist_requests_total"),
            {
                (("method", "tools/call"), ("server", "files"), ("status", "ok")): 1.0,
                (("method", "tools/list"), ("server", "files"), ("status", "error")): 1.0,
            },
        )
        self.assertEqual(
            samples(m, "mcptwist_tool_calls_total"),
            {(("server", "files"), ("status", "ok"), ("tool", "read")): 1.0},
        )
        total = samples(m, "mcptwist_request_duration_seconds_sum")
        self.assertEqual(total[(("method", "tools/call"), ("server", "files"))], 1.5)

    def test_operation_durations(self) -> None:
        """mcp_server/client_operation_duration_seconds, with the MCP conventions'
        buckets and error types; the old histogram is unchanged beside them."""
        m = Metrics()
        m.request_ended(ended(child_ms=1200.0))
        m.request_ended(ended(child_ms=100.0, tool_error=True))
        m.request_ended(ended(status="error", error_code=-32602, child_ms=5.0))
        m.request_ended(ended(status="error", error_code=7, child_ms=5.0))
        m.request_ended(ended(status="cancelled", method="made/up"))
        server = samples(m, "mcp_server_operation_duration_seconds_count")
        self.assertEqual(
            server,
            {
                (("error_type", ""), ("mcp_method_name", "tools/call"), ("server", "files")): 1.0,
                (
                    ("error_type", "tool_error"),
                    ("mcp_method_name", "tools/call"),
                    ("server", "files"),
                ): 1.0,
                (
                    ("error_type", "-32602"),
                    ("mcp_method_name", "tools/call"),
                    ("server", "files"),
                ): 1.0,
                (
                    ("error_type", OTHER),
                    ("mcp_method_name", "tools/call"),
                    ("server", "files"),
                ): 1.0,
                (("error_type", "cancelled"), ("mcp_method_name", OTHER), ("server", "files")): 1.0,
            },
        )
        client = samples(m, "mcp_client_operation_duration_seconds_sum")
        key = (("error_type", ""), ("mcp_method_name", "tools/call"), ("server", "files"))
        self.assertAlmostEqual(client[key], 1.2)
        # A request that never reached a child has no client duration.
        counts = samples(m, "mcp_client_operation_duration_seconds_count")
        never = (("error_type", "cancelled"), ("mcp_method_name", OTHER), ("server", "files"))
        self.assertEqual(counts[never], 0.0)
        buckets = {
            dict(k)["le"] for k in samples(m, "mcp_server_operation_duration_seconds_bucket")
        }
        self.assertEqual(
            buckets,
            {
                "0.01",
                "0.02",
                "0.05",
                "0.1",
                "0.2",
                "0.5",
                "1.0",
                "2.0",
                "5.0",
                "10.0",
                "30.0",
                "60.0",
                "120.0",
                "300.0",
                "+Inf",
            },
        )
        self.assertIn("mcptwist_request_duration_seconds", names(m))

    def test_sessions(self) -> None:
        """A session without a transport is counted under "other"."""
        m = Metrics()
        for transport in ("sse", None):
            m.session_opened(
                session="abc",
                server="files",
                principal=None,
                peer=None,
                transport=transport,
                protocol_version=None,
            )
        m.session_closed(
            session="abc", server="files", principal=None, reason="closed", duration=1.0
        )
        self.assertEqual(
            samples(m, "mcptwist_sessions_opened_total"),
            {
                (("server", "files"), ("transport", "sse")): 1.0,
                (("server", "files"), ("transport", OTHER)): 1.0,
            },
        )
        self.assertEqual(
            samples(m, "mcptwist_sessions_closed_total"),
            {(("server", "files"), ("transport", OTHER)): 1.0},
        )

    def test_children(self) -> None:
        """A child is counted under its server; its end by how it ended."""
        m = Metrics()
        m.child_spawned(server="files[0123abcd]", pid=7, command="npx")
        m.child_exited(server="files[0123abcd]", pid=7, exit_code=None, signal=9, reason="killed")
        m.child_exited(
            server="files", pid=8, exit_code=None, signal=15, reason="stopped", stopping=True
        )
        self.assertEqual(samples(m, "mcptwist_child_spawns_total"), {(("server", "files"),): 1.0})
        self.assertEqual(
            samples(m, "mcptwist_child_exits_total"),
            {
                (("reason", "signal"), ("server", "files")): 1.0,
                (("reason", "killed_by_bridge"), ("server", "files")): 1.0,
            },
        )

    def test_counting_needs_no_digest(self) -> None:
        m = Metrics()
        self.assertTrue(m.recording)
        self.assertFalse(m.detailed)


class StaticTests(SynchronousTestCase):
    def test_vocabularies(self) -> None:
        """The copied vocabulary matches the module it comes from."""
        self.assertEqual(CHILD_STATES, tuple(state.value for state in ChildState))

    def test_build_and_start(self) -> None:
        m = Metrics(start_time=1700000000.5)
        self.assertEqual(samples(m, "mcptwist_build_info"), {(("version", __version__),): 1.0})
        self.assertEqual(samples(m, "mcptwist_start_time_seconds"), {(): 1700000000.5})

    def test_own_registry(self) -> None:
        """Two instances never share series, and the process-wide registry stays clean."""
        a, b = Metrics(), Metrics()
        a.access_refused()
        self.assertEqual(samples(a, "mcptwist_access_refused_total"), {(): 1.0})
        self.assertEqual(samples(b, "mcptwist_access_refused_total"), {(): 0.0})
        self.assertFalse([f.name for f in REGISTRY.collect() if f.name.startswith("mcptwist_")])


class SnapshotTests(SynchronousTestCase):
    def snapshot(self) -> Snapshot:
        return Snapshot(
            servers=(
                server("time", restarts=2, in_flight=3, stdin_queue=1, sessions=4),
                server(
                    "files",
                    state="failed",
                    sharing="session",
                    children=2,
                    restarts=7,
                    sessions=2,
                ),
            ),
            streams=5,
            sessions_total=6,
        )

    def test_live_state(self) -> None:
        """The source is read at scrape time; states are one-hot."""
        m = Metrics()
        m.set_source(self.snapshot)
        state = samples(m, "mcptwist_child_state")
        self.assertEqual(len(state), 2 * len(CHILD_STATES))
        for name, current in (("time", "running"), ("files", "failed")):
            for value in CHILD_STATES:
                self.assertEqual(
                    state[(("server", name), ("state", value))],
                    1.0 if value == current else 0.0,
                )
        self.assertEqual(
            samples(m, "mcptwist_server_info"),
            {
                (("server", "time"), ("sharing", "shared")): 1.0,
                (("server", "files"), ("sharing", "session")): 1.0,
            },
        )
        self.assertEqual(
            samples(m, "mcptwist_child_restarts_total"),
            {(("server", "time"),): 2.0, (("server", "files"),): 7.0},
        )
        # A server with no running child has no uptime.
        self.assertEqual(samples(m, "mcptwist_child_uptime_seconds"), {(("server", "time"),): 12.5})
        self.assertEqual(
            samples(m, "mcptwist_children"),
            {(("server", "time"),): 1.0, (("server", "files"),): 2.0},
        )
        self.assertEqual(
            samples(m, "mcptwist_running_children"),
            {(("server", "time"),): 1.0, (("server", "files"),): 0.0},
        )
        self.assertEqual(
            samples(m, "mcptwist_in_flight_requests"),
            {(("server", "time"),): 3.0, (("server", "files"),): 0.0},
        )
        self.assertEqual(
            samples(m, "mcptwist_stdin_queue_depth"),
            {(("server", "time"),): 1.0, (("server", "files"),): 0.0},
        )
        self.assertEqual(
            samples(m, "mcptwist_sessions"),
            {(("server", "time"),): 4.0, (("server", "files"),): 2.0},
        )
        self.assertEqual(samples(m, "mcptwist_sse_streams"), {(): 5.0})
        self.assertEqual(samples(m, "mcptwist_open_sessions"), {(): 6.0})
        # The type tells Prometheus that a drop in restarts is a reset.
        types = {f.name: f.type for f in text_string_to_metric_families(scrape(m)[1])}
        self.assertEqual(types["mcptwist_child_restarts"], "counter")
        self.assertEqual(types["mcptwist_child_state"], "gauge")

    def test_read_at_each_scrape(self) -> None:
        m = Metrics()
        streams = [1]
        m.set_source(lambda: Snapshot((), streams[0], 0))
        self.assertEqual(samples(m, "mcptwist_sse_streams"), {(): 1.0})
        streams[0] = 9
        self.assertEqual(samples(m, "mcptwist_sse_streams"), {(): 9.0})

    def test_no_source(self) -> None:
        """Without a source (or once it is removed) the live families are left out."""
        m = Metrics()
        self.assertNotIn("mcptwist_sse_streams", names(m))
        m.set_source(self.snapshot)
        self.assertIn("mcptwist_sse_streams", names(m))
        m.set_source(None)
        self.assertNotIn("mcptwist_sse_streams", names(m))

    def test_failing_source(self) -> None:
        """A source that raises is logged; the scrape still has every counter."""
        m = Metrics()
        m.access_refused()

        def broken() -> Snapshot:
            raise ZeroDivisionError("oops")

        m.set_source(broken)
        found = names(m)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertIn("mcptwist_access_refused", found)
        self.assertNotIn("mcptwist_child_state", found)
        self.assertNotIn("mcptwist_sse_streams", found)

    def test_malformed_snapshot(self) -> None:
        """A snapshot that cannot be rendered is left out whole, not half-written."""
        m = Metrics()
        m.set_source(lambda: Snapshot((server("time", in_flight=None),), 1, 1))
        found = names(m)
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)
        self.assertNotIn("mcptwist_child_state", found)
        self.assertIn("mcptwist_build_info", found)


class ResourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.metrics = Metrics()
        self.metrics.access_refused()
        self.client = StubTreq(self.metrics.resource())

    def request(self, method: str, headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
        d = self.client.request(method, "http://127.0.0.1/metrics", headers=headers or {})
        self.client.flush()
        response = self.successResultOf(d)
        d = self.client.content(response)
        self.client.flush()
        return response.code, response.headers, self.successResultOf(d)

    def test_text_format(self) -> None:
        """Without an OpenMetrics Accept, the Prometheus text format."""
        content_type, body = scrape(self.metrics)
        self.assertTrue(content_type.startswith("text/plain; version="), content_type)
        self.assertIn("mcptwist_access_refused_total 1.0\n", body)
        self.assertNotIn("# EOF", body)

    def test_openmetrics(self) -> None:
        """A scraper that asks for OpenMetrics gets it."""
        content_type, body = scrape(
            self.metrics,
            b"application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3",
        )
        self.assertTrue(content_type.startswith("application/openmetrics-text"), content_type)
        self.assertTrue(body.endswith("# EOF\n"))
        values = {
            s.name: s.value
            for family in openmetrics_families(body)
            for s in family.samples
            if not s.labels
        }
        self.assertEqual(values["mcptwist_access_refused_total"], 1.0)

    def test_get_over_http(self) -> None:
        code, headers, body = self.request("GET")
        self.assertEqual(code, 200)
        self.assertIn(b"mcptwist_access_refused_total 1.0\n", body)
        self.assertEqual(headers.getRawHeaders("cache-control"), ["no-store"])

    def test_head(self) -> None:
        code, headers, body = self.request("HEAD")
        self.assertEqual(code, 200)
        self.assertEqual(body, b"")
        [content_type] = headers.getRawHeaders("content-type")
        self.assertTrue(content_type.startswith("text/plain"))

    def test_other_methods(self) -> None:
        """Anything but GET and HEAD: 405, naming the methods allowed."""
        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            code, headers, _ = self.request(method)
            self.assertEqual(code, 405)
            [allow] = headers.getRawHeaders("allow")
            self.assertEqual(allow, "GET, HEAD")


class MetricsListenerTests(SynchronousTestCase):
    """A listener that serves only /metrics asks for no credentials: it checks
    Host and Origin like every other listener (DNS rebinding, web pages)."""

    def request(
        self, host: str, origins: tuple[str, ...] = (), config: Any = None, **headers: str
    ) -> tuple[int, bytes]:
        from mcptwist.config.model import BridgeConfig, ListenerConfig, MetricsConfig, ServerConfig
        from mcptwist.service.bridge import BridgeService

        from .support.children import FakeProcessReactor

        if config is None:
            config = BridgeConfig(
                servers={"s": ServerConfig(name="s", command="fake")},
                listeners=(),
                allowed_origins=origins,
                metrics=MetricsConfig(listeners=(ListenerConfig("tcp:0:interface=127.0.0.1"),)),
            )
        service = BridgeService(config, FakeProcessReactor(), {})
        [listener] = service.metrics_listeners
        client = StubTreq(listener.site.resource)
        d = client.get(f"http://{host}/metrics", headers={"host": host, **headers})
        client.flush()
        response = self.successResultOf(d)
        d = client.content(response)
        client.flush()
        return response.code, self.successResultOf(d)

    def test_a_foreign_host_gets_421(self) -> None:
        status, body = self.request("evil.example.com")
        self.assertEqual(status, 421)
        self.assertIn(b"allowed_hosts", body)
        self.assertNotIn(b"mcptwist_", body)

    def test_authentication_does_not_open_it_to_any_host(self) -> None:
        """With authentication the bridge answers any Host (a rebound page
        has no token), but a metrics listener asks for none: it keeps to
        loopback's names unless allowed_hosts names others."""
        from mcptwist.config.load import parse_config

        doc = {
            "metrics": {"listen": ["tcp:0:interface=127.0.0.1"]},
            "auth": {"tokens": [{"name": "t", "hash": "sha256:" + "0" * 64}]},
            "servers": {"s": {"command": "fake"}},
        }
        config = parse_config(doc, "t.toml", {})
        self.assertEqual(config.allowed_hosts, ("*",))
        self.assertEqual(config.metrics.allowed_hosts, ("localhost", "127.0.0.1", "::1"))
        status, _ = self.request("rebound.example.com", config=config)
        self.assertEqual(status, 421)
        self.assertEqual(self.request("localhost:9100", config=config)[0], 200)
        named = parse_config({**doc, "allowed_hosts": ["metrics.internal"]}, "t.toml", {})
        self.assertEqual(named.metrics.allowed_hosts, ("metrics.internal",))

    def test_a_web_page_gets_403(self) -> None:
        page = "http://127.0.0.1:9100"
        status, body = self.request("127.0.0.1:9100", origin="http://127.0.0.1:3000")
        self.assertEqual(status, 403)
        self.assertIn(b"is not allowed", body)
        # Its own origin too: no page may read it.
        status, body = self.request("127.0.0.1:9100", origin=page)
        self.assertEqual(status, 403)
        self.assertIn(b"not for browsers", body)
        # Even from an origin allowed to use MCP.
        status, body = self.request("127.0.0.1:9100", (page,), origin=page)
        self.assertEqual(status, 403)
        self.assertIn(b"not for browsers", body)

    def test_a_scraper_gets_the_metrics(self) -> None:
        status, body = self.request("localhost:9100")
        self.assertEqual(status, 200)
        self.assertIn(b"mcptwist_", body)


GOLDEN = os.path.join(os.path.dirname(__file__), "support", "golden")


class Ticking:
    """Metrics whose wall clock moves on a quarter second at each call to them."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0
        self.metrics = Metrics(start_time=1_700_000_000.5, max_tools=2, wall=self.wall)

    def wall(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.metrics, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.now += 0.25
            return method(*args, **kwargs)

        return call


def feed(m: Any) -> None:
    """One of every event the metrics count, with values at and beyond every limit."""
    for name, route, method, code, received, sent in [
        ("files", "mcp", "POST", 200, 120, 340),
        ("files", "mcp", "POST", 200, 80, 0),
        ("files", "sse", "GET", 200, 0, 0),
        ("files", "mcp", "DELETE", 404, 0, 12),
        (None, "health", "GET", 200, 0, 15),
        (None, "metrics", "HEAD", 405, 0, 0),
        ("time", "/etc/passwd", "BREW", 99, 3, 0),
        ("time", "messages", "POST", 1000, 7, 9),
        ("x" * 65, "mcp", "POST", 200, 1, 1),
    ]:
        m.http_request(name, route, method, code, received, sent)
    for latency, child in [
        (0.0, None),
        (5.0, 4.0),
        (10.0, 9.5),
        (0.0001, 0.00005),
        (-3.0, -1.0),
        (25.0, 20.0),
        (1000.0, 999.0),
        (20_000.0, None),
        (300_000.0, 299_999.0),
        (1e9, 1e9),
        (7.5, 7.5),
        (2.5, 2.5),
    ]:
        m.request_ended(ended(latency_ms=latency, child_ms=child))
    changes: list[dict[str, Any]] = [
        {"status": "error", "error_code": -32602},
        {"status": "error", "error_code": -32001, "name": "write"},
        {"status": "error", "error_code": 42, "name": "made-up"},
        {"status": "ok", "tool_error": True, "name": "write"},
        {"status": "timeout", "latency_ms": 30_000.0},
        {"status": "cancelled", "latency_ms": 12.0, "child_ms": 11.0},
        {"status": "weird", "latency_ms": 1.0},
        {"method": "tools/list", "name": None, "latency_ms": 0.4},
        {"method": "initialize", "name": None, "latency_ms": 50.0, "child_ms": 48.0},
        {"method": "made/up", "name": None, "latency_ms": 3.0},
        {"method": "ping", "name": None, "server": "time", "latency_ms": 0.1},
        {"name": "third", "status": "ok"},
        {"name": "fourth", "status": "ok"},
        {"name": "x" * 129, "status": "ok"},
        {"server": "y" * 70, "latency_ms": 2.0},
    ]
    for change in changes:
        m.request_ended(ended(**change))
    m.request_done("time", "tools/call", "ok", 0.2, "now")
    m.request_done("time", "tools/call", "ok", 0.3, None)
    m.request_done("time", "prompts/get", "error", 0.05, "now")
    for reason in ["unknown token", "missing claim sub", "bad claim exp", "a secret reason"]:
        m.auth_failure(reason)
    m.access_refused()
    m.access_refused()
    for scope in ["principal", "server-total", "nonsense"]:
        m.rate_limited(scope)
    for scope in ["listener", "server", "elsewhere"]:
        m.ip_refused(scope)
    for reason in ["header_timeout", "body_too_large", "sideways"]:
        m.http_refused(reason)
    m.child_spawned(server="files", pid=10, command="npx")
    m.child_spawned(server="files[abc]", pid=11, command="npx")
    m.child_exited(server="files", pid=10, exit_code=0, signal=None, reason="r")
    m.child_exited(server="files[abc]", pid=11, exit_code=1, signal=None, reason="r")
    m.child_exited(server="files", pid=12, exit_code=None, signal=9, reason="r")
    m.child_exited(server="files", pid=13, exit_code=None, signal=None, reason="r")
    m.child_exited(server="files", pid=14, exit_code=None, signal=15, reason="r", stopping=True)
    m.count_exit("files", "meltdown")
    for transport in ["streamable", "sse", "stateless", "websocket", None, "pigeon"]:
        m.session_opened(
            session="s",
            server="files",
            principal=None,
            peer=None,
            transport=transport,
            protocol_version=None,
        )
        m.session_closed(
            session="s",
            server="files",
            principal=None,
            reason="gone",
            duration=1.0,
            transport=transport,
        )
    m.session_closed(session="s", server="time", principal=None, reason="idle", duration=2.0)
    for kind in ["tool_pinned", "tool_changed", "tool_accepted", "tool_refused", "name_clash"]:
        m.tool_event(ToolEvent(kind, "files", "read"))
    m.tool_event(ToolEvent("tool_refused", "files", "write"))
    m.set_source(
        lambda: Snapshot(
            (
                ServerSnapshot("files", "shared", "running", 1, 1, 2, 12.5, 3, 1, 4),
                ServerSnapshot("time", "session", "restarting", 2, 1, 0, None, 0, 0, 2),
            ),
            streams=3,
            sessions_total=6,
            cluster=ClusterSnapshot(True, {"timeout": 2, "down": 1}),
        )
    )


class ExpositionTests(SynchronousTestCase):
    """What a scraper reads is what prometheus_client's own counters and
    histograms gave for the same events."""

    def fed(self) -> Metrics:
        ticking = Ticking()
        feed(ticking)
        return ticking.metrics

    def golden(self, name: str) -> str:
        with open(os.path.join(GOLDEN, name), encoding="utf-8") as f:
            return f.read().replace('version="VERSION"', f'version="{__version__}"')

    def test_text_format(self) -> None:
        """The text format, byte for byte, _created (when each series was
        first counted) included."""
        _, body = scrape(self.fed())
        self.assertEqual(body, self.golden("metrics.prom"))

    def test_openmetrics(self) -> None:
        _, body = scrape(self.fed(), b"application/openmetrics-text; version=1.0.0")
        self.assertEqual(body, self.golden("metrics.om"))

    def test_created_series_can_be_disabled(self) -> None:
        """prometheus_client's switch for _created turns off ours too."""
        disable_created_metrics()
        self.addCleanup(enable_created_metrics)
        _, body = scrape(self.fed())
        expected = "".join(
            line
            for line in self.golden("metrics.prom").splitlines(keepends=True)
            if "_created" not in line
        )
        self.assertEqual(body, expected)

    @given(
        st.lists(
            st.one_of(
                st.floats(min_value=0.0, allow_nan=False),
                st.sampled_from(DURATION_BUCKETS).flatmap(
                    lambda bound: st.sampled_from(
                        [math.nextafter(bound, 0.0), bound, math.nextafter(bound, math.inf)]
                    )
                ),
            ),
            max_size=40,
        )
    )
    def test_histogram_buckets(self, durations: list[float]) -> None:
        """Every duration, on a bound, beside one or beyond them all, falls in
        the bucket prometheus_client's Histogram puts it in, and sums alike."""
        m = Metrics()
        registry = CollectorRegistry()
        reference = Histogram(
            "mcptwist_request_duration_seconds",
            "",
            ["server", "method"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        ).labels("time", "ping")
        for seconds in durations:
            m.request_done("time", "ping", "ok", seconds)
            reference.observe(seconds)

        def observed(samples: list[Sample]) -> list[tuple[str, dict[str, str], float]]:
            return [
                (s.name, s.labels, s.value)
                for s in samples
                if s.name.startswith("mcptwist_request_duration_seconds")
                and not s.name.endswith("_created")
            ]

        ours = [family.samples for family in m.registry.collect()]
        [theirs] = [family.samples for family in registry.collect()]
        if not durations:
            # A series is made by its first observation.
            self.assertEqual(observed([s for samples in ours for s in samples]), [])
            return
        self.assertEqual(observed([s for samples in ours for s in samples]), observed(theirs))
