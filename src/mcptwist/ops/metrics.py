# -*- test-case-name: tests.test_metrics -*-
"""Prometheus metrics: counters fed as things happen, live state read at scrape.

L{Metrics} owns a registry of its own (never the process-wide one, so that
tests and embedders never share series). Events are counted by explicit
calls (L{Metrics.http_request}, L{Metrics.request_done}, ...) that cost a
dictionary lookup and a few additions once a label set has been seen: the
counts are plain numbers, kept on the reactor thread without locks, that the
registry turns into the exposition prometheus_client's own counters and
histograms would give (L{_CounterFamily}, L{_HistogramFamily}). L{Metrics} is a
L{Recorder} too: the core reports its sessions, requests and children to it
beside the audit trail (L{mcptwist.ops.record.Recorders}). What the bridge
already knows at any moment (child states, queue depths, open sessions) is
not mirrored on the hot path: a L{Snapshot} callable given to
L{Metrics.set_source} is read when Prometheus scrapes.

Every label is bounded, whatever clients send: methods outside the MCP
vocabulary, unknown routes, reasons and scopes become C{"other"}, and each
server counts at most L{MAX_TOOLS} tool names, admitted only once a call to
them succeeded, so that calls to made-up tools cannot fill the table.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from typing import Final

import attrs
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import INF, floatToGoString
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from mcptwist import __version__
from mcptwist.routing.record import BaseRecorder, RequestEnded, ToolEvent

log = Logger(namespace="mcptwist.metrics")

OTHER: Final = "other"

# Where an HTTP request went: the bridge's endpoints, by what they are for.
ROUTES: Final = frozenset(
    {"mcp", "sse", "messages", "status", "health", "metrics", "admin", "metadata", OTHER}
)

HTTP_METHODS: Final = frozenset({"GET", "HEAD", "POST", "DELETE", "OPTIONS", "PUT", "PATCH"})

# JSON-RPC methods of the MCP specification (2024-11-05 to 2025-11-25), both directions.
MCP_METHODS: Final = frozenset(
    {
        "initialize",
        "ping",
        "tools/list",
        "tools/call",
        "resources/list",
        "resources/templates/list",
        "resources/read",
        "resources/subscribe",
        "resources/unsubscribe",
        "prompts/list",
        "prompts/get",
        "completion/complete",
        "logging/setLevel",
        "tasks/get",
        "tasks/result",
        "tasks/list",
        "tasks/cancel",
        "sampling/createMessage",
        "elicitation/create",
        "roots/list",
    }
)

# The phrases the authenticator gives for a refusal (see L{mcptwist.security.auth}).
AUTH_REASONS: Final = frozenset(
    {
        "no credentials",
        "malformed",
        "malformed Authorization header",
        "Authorization is not Bearer",
        "token too long",
        "token in query string",
        "unknown token",
        "invalid token",
        "expired",
        "not yet valid",
        "wrong audience",
        "wrong issuer",
        "bad signature",
        "algorithm not allowed",
        "unknown key",
        "unusable key",
        "keys unavailable",
        "missing claim",
        "missing claim exp",
        "missing claim iss",
        "missing claim aud",
        "bad claim",
    }
)

# Rate-limit scopes (L{mcptwist.security.ratelimit.Refusal}) and IP filter scopes.
RATE_LIMIT_SCOPES: Final = frozenset(
    {
        "principal",
        "ip",
        "server-principal",
        "server-ip",
        "server-total",
        "capacity",
        "children-per-principal",
        "sessions-per-principal",
        "streams-per-principal",
        "listens-per-principal",
        "sessions",
        "children",
        "batch",
        "in-flight-session",
        "in-flight-principal",
    }
)
IP_SCOPES: Final = frozenset({"listener", "server"})
# Why a connection or request was refused while it was being received.
HTTP_REFUSALS: Final = frozenset(
    {
        "too_many_connections",
        "header_timeout",
        "body_timeout",
        "headers_too_large",
        "body_too_large",
    }
)

TRANSPORTS: Final = frozenset({"streamable", "sse", "stateless", "websocket"})

EXIT_REASONS: Final = ("exit0", "exit_nonzero", "signal", "spawn_failed", "killed_by_bridge")

# The values of an MCP request's status, in the audit trail's request events
# and in these metrics' labels.
STATUSES: Final = frozenset({"ok", "error", "cancelled", "timeout"})
# The buckets the OpenTelemetry conventions for MCP give mcp.*.operation.duration.
OPERATION_BUCKETS: Final = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


def error_type(status: str, error_code: int | None, tool_error: bool) -> str:
    """The C{error_type} label of an operation, as the conventions' C{error.type}:
    a JSON-RPC code of the reserved range, C{tool_error}, how the bridge ended
    it, or empty for a success (a child's own codes are C{other})."""
    if error_code is not None:
        return str(error_code) if -32768 <= error_code <= -32000 else OTHER
    if tool_error:
        return "tool_error"
    if status in ("timeout", "cancelled"):
        return status
    return "" if status == "ok" else OTHER


# A copy of supervisor.ChildState's values (the tests keep them equal): this
# module imports of the bridge's only the record of a request, so that any
# module can import it without a cycle.
CHILD_STATES: Final = ("starting", "running", "restarting", "failed", "stopped")

# From a ping to a long tool call.
DURATION_BUCKETS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)

MAX_TOOLS: Final = 100
MAX_TOOL_NAME: Final = 128
MAX_SERVERS: Final = 256
MAX_SERVER_NAME: Final = 64


def exit_reason(exit_code: int | None, signal: int | None, stopping: bool) -> str:
    """How a child ended, as one of L{EXIT_REASONS}.

    C{stopping} is whether the bridge itself ended it (shutdown, restart,
    a failed handshake): then the signal it sent says nothing about the
    server. Neither a code nor a signal means the process never started.
    """
    if stopping:
        return "killed_by_bridge"
    if signal is not None:
        return "signal"
    if exit_code is None:
        return "spawn_failed"
    return "exit0" if exit_code == 0 else "exit_nonzero"


def auth_reason(reason: str) -> str:
    """An authentication failure's reason as a label: one of L{AUTH_REASONS} or C{"other"}."""
    if reason in AUTH_REASONS:
        return reason
    for prefix in ("missing claim", "bad claim"):
        if reason.startswith(prefix + " "):
            return prefix
    return OTHER


@attrs.frozen
class ServerSnapshot:
    """One configured server at scrape time; a per-session server sums its children."""

    name: str
    sharing: str
    state: str
    children: int
    running_children: int
    restarts: int
    uptime: float | None
    in_flight: int
    stdin_queue: int
    sessions: int


@attrs.frozen
class ClusterSnapshot:
    """A cluster node's Redis at scrape time: whether it answers, and how many
    rate-limit decisions fell back to this node's own buckets, by why
    (C{down}, C{timeout}, C{error})."""

    redis_up: bool
    fallbacks: Mapping[str, int]


@attrs.frozen
class Snapshot:
    """The bridge at scrape time: its servers, open SSE streams and registered
    sessions, and its cluster's Redis (None without one)."""

    servers: tuple[ServerSnapshot, ...]
    streams: int
    sessions_total: int
    cluster: ClusterSnapshot | None = None


class _Bounded:
    """Admits at most C{cap} distinct label values; later newcomers are C{"other"}."""

    def __init__(self, cap: int, max_length: int) -> None:
        self.cap = cap
        self.max_length = max_length
        self.seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if len(self.seen) >= self.cap or len(value) > self.max_length:
            return OTHER
        self.seen.add(value)
        return value


class _LiveState:
    """A collector that turns the source's L{Snapshot} into gauges at each scrape."""

    def __init__(self) -> None:
        self.source: Callable[[], Snapshot] | None = None

    def describe(self) -> list[Metric]:
        # The names, so that the registry refuses any clash when registering.
        return self._families(Snapshot((), 0, 0, ClusterSnapshot(False, {})))

    def collect(self) -> Iterator[Metric]:
        source = self.source
        if source is None:
            return
        try:
            families = self._families(source())
        except Exception:
            log.failure("Cannot read the bridge's state for metrics; this scrape lacks it")
            return
        yield from families

    def _families(self, snapshot: Snapshot) -> list[Metric]:
        def gauge(name: str, documentation: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, documentation, labels=["server"])

        info = GaugeMetricFamily(
            "mcptwist_server_info",
            "A configured MCP server and how its children are shared (always 1).",
            labels=["server", "sharing"],
        )
        state = GaugeMetricFamily(
            "mcptwist_child_state",
            "1 for the server's current child state, 0 for the others.",
            labels=["server", "state"],
        )
        restarts = CounterMetricFamily(
            "mcptwist_child_restarts",
            "Restarts of the server's children after a crash.",
            labels=["server"],
        )
        uptime = gauge(
            "mcptwist_child_uptime_seconds", "Seconds since the running child was spawned."
        )
        children = gauge("mcptwist_children", "Children of the server.")
        running = gauge("mcptwist_running_children", "Children of the server that are running.")
        in_flight = gauge(
            "mcptwist_in_flight_requests", "Client requests the server's children are answering."
        )
        queue = gauge(
            "mcptwist_stdin_queue_depth", "Messages waiting to be written to a child's stdin."
        )
        sessions = gauge("mcptwist_sessions", "Client sessions attached to the server.")
        for s in snapshot.servers:
            labels = [s.name]
            info.add_metric([s.name, s.sharing], 1.0)
            for value in CHILD_STATES:
                state.add_metric([s.name, value], 1.0 if value == s.state else 0.0)
            restarts.add_metric(labels, float(s.restarts))
            if s.uptime is not None:
                uptime.add_metric(labels, float(s.uptime))
            children.add_metric(labels, float(s.children))
            running.add_metric(labels, float(s.running_children))
            in_flight.add_metric(labels, float(s.in_flight))
            queue.add_metric(labels, float(s.stdin_queue))
            sessions.add_metric(labels, float(s.sessions))
        streams = GaugeMetricFamily(
            "mcptwist_sse_streams",
            "Open server-sent event streams, both transports.",
            value=float(snapshot.streams),
        )
        registered = GaugeMetricFamily(
            "mcptwist_open_sessions",
            "Sessions in the session registry, all servers (what max_sessions limits).",
            value=float(snapshot.sessions_total),
        )
        families: list[Metric] = [
            info,
            state,
            restarts,
            uptime,
            children,
            running,
            in_flight,
            queue,
            sessions,
            streams,
            registered,
        ]
        cluster = snapshot.cluster
        if cluster is not None:
            families.append(
                GaugeMetricFamily(
                    "mcptwist_cluster_redis_up",
                    "1 while the cluster's Redis answers, 0 while this node goes on without it.",
                    value=1.0 if cluster.redis_up else 0.0,
                )
            )
            fallbacks = CounterMetricFamily(
                "mcptwist_cluster_limit_fallbacks",
                "Rate-limit decisions made with this node's own buckets because the "
                "cluster's Redis was unavailable, by why: down (known down, not asked), "
                "timeout (no answer within redis_timeout), error (the command failed).",
                labels=["reason"],
            )
            for reason, count in sorted(cluster.fallbacks.items()):
                fallbacks.add_metric([reason], float(count))
            families.append(fallbacks)
        return families


def _created_series() -> bool:
    """Whether counters and histograms expose C{_created}, as prometheus_client
    decides for its own (C{PROMETHEUS_DISABLE_CREATED_SERIES},
    C{disable_created_metrics})."""
    return bool(getattr(prometheus_metrics, "_use_created", True))


class _Count:
    """One series of a counter: its value, and when it was first counted."""

    __slots__ = ("created", "value")

    def __init__(self, created: float) -> None:
        self.created = created
        self.value: float = 0


class _Observed:
    """One series of a histogram: how many observations fell in each bucket
    (not cumulated), their sum, and when it was first observed."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...], created: float) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = created

    def observe(self, amount: float) -> None:
        """Count C{amount} (never NaN) in the first bucket whose bound it does
        not exceed, as prometheus_client does."""
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


class _CounterFamily:
    """A counter kept in plain numbers on the reactor thread, read at scrape.

    prometheus_client's own counters take a lock at every increment; the
    bridge counts on one thread and so needs none. The exposition is the
    one prometheus_client gives for a C{Counter} of the same name, help and
    labels: a series per label set, in the order they were first counted.
    """

    def __init__(
        self, name: str, documentation: str, labels: tuple[str, ...], wall: Callable[[], float]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labels
        self.series: dict[tuple[str, ...], _Count] = {}
        self._wall = wall
        if not labels:
            # A counter without labels has its one series from the start.
            self.labels()

    def labels(self, *values: str) -> _Count:
        """The series of these label values (made on first use)."""
        series = self.series.get(values)
        if series is None:
            series = self.series[values] = _Count(self._wall())
        return series

    def inc(self, *values: str) -> None:
        """Add one to the series of these label values."""
        self.labels(*values).value += 1

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        created = _created_series()
        for values, series in self.series.items():
            family.add_metric(
                values, float(series.value), created=series.created if created else None
            )
        yield family


class _HistogramFamily:
    """A histogram kept in plain numbers on the reactor thread, read at scrape:
    the exposition prometheus_client gives for a C{Histogram} of the same
    name, help, labels and buckets."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: tuple[str, ...],
        buckets: tuple[float, ...],
        wall: Callable[[], float],
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labels
        self.bounds = (*map(float, buckets), INF)
        self._les = tuple(floatToGoString(bound) for bound in self.bounds)
        self.series: dict[tuple[str, ...], _Observed] = {}
        self._wall = wall

    def labels(self, *values: str) -> _Observed:
        """The series of these label values (made on first use)."""
        series = self.series.get(values)
        if series is None:
            series = self.series[values] = _Observed(self.bounds, self._wall())
        return series

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        created = _created_series()
        for values, series in self.series.items():
            cumulated = 0.0
            buckets: list[tuple[str, float]] = []
            for le, count in zip(self._les, series.counts, strict=True):
                cumulated += count
                buckets.append((le, cumulated))
            family.add_metric(values, buckets, series.sum)
            if created:
                family.add_sample(
                    self.name + "_created",
                    dict(zip(self.labelnames, values, strict=True)),
                    series.created,
                )
        yield family


class MetricsResource(Resource):
    """The registry in the exposition format the scraper asks for.

    Rendered synchronously on the reactor thread, where the counters are
    updated: no locking against a thread pool, and a scrape costs a few
    milliseconds (about 3 ms for 3 servers answering 6 methods each, 14 ms
    for 20 servers with 4), once per scrape interval.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render(self, request: IRequest) -> bytes:
        # HEAD is rendered as GET: twisted.web sends the headers and drops the body.
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"Method Not Allowed\n"
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        body = encoder(self.registry)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"vary", b"Accept")
        return body


class Metrics(BaseRecorder):
    """The bridge's Prometheus metrics, in a registry of their own.

    Counted on the reactor thread only, in plain numbers that the registry
    reads when it is scraped (see L{_CounterFamily}).
    """

    def __init__(
        self,
        *,
        start_time: float | None = None,
        max_tools: int = MAX_TOOLS,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """C{wall} tells the time (Unix seconds) a series is first counted at: its C{_created}."""
        self.registry = CollectorRegistry()
        r = self.registry

        def counter(name: str, documentation: str, *labels: str) -> _CounterFamily:
            family = _CounterFamily(name, documentation, labels, wall)
            r.register(family)
            return family

        def histogram(
            name: str, documentation: str, labels: tuple[str, ...], buckets: tuple[float, ...]
        ) -> _HistogramFamily:
            family = _HistogramFamily(name, documentation, labels, buckets, wall)
            r.register(family)
            return family

        self._http = counter(
            "mcptwist_http_requests",
            "HTTP requests answered, by server, route, method and status code.",
            "server",
            "route",
            "method",
            "code",
        )
        self._received = counter(
            "mcptwist_received_bytes", "HTTP request body bytes received, by server.", "server"
        )
        self._sent = counter(
            "mcptwist_sent_bytes", "HTTP response body bytes sent, by server.", "server"
        )
        self._requests = counter(
            "mcptwist_requests",
            "MCP requests answered, by server, method and status.",
            "server",
            "method",
            "status",
        )
        self._duration = histogram(
            "mcptwist_request_duration_seconds",
            "Time from an MCP request to its answer, by server and method.",
            ("server", "method"),
            DURATION_BUCKETS,
        )
        # The OpenTelemetry conventions' operation durations, as Prometheus names them.
        self._server_operation = histogram(
            "mcp_server_operation_duration_seconds",
            "mcp.server.operation.duration: time from an MCP request a client sent "
            "to its answer, by server, MCP method and error type.",
            ("server", "mcp_method_name", "error_type"),
            OPERATION_BUCKETS,
        )
        self._client_operation = histogram(
            "mcp_client_operation_duration_seconds",
            "mcp.client.operation.duration: time from a request written to a child "
            "to its answer, by server, MCP method and error type.",
            ("server", "mcp_method_name", "error_type"),
            OPERATION_BUCKETS,
        )
        self._tool_events = counter(
            "mcptwist_tool_events",
            "What the bridge did about tools, by server and event: tool_pinned, "
            "tool_changed (a definition differs from its pin), tool_accepted, "
            "tool_refused (a hidden or denied tool was called), name_clash.",
            "server",
            "event",
        )
        self._tool_calls = counter(
            "mcptwist_tool_calls",
            "tools/call requests answered, by server, tool and status.",
            "server",
            "tool",
            "status",
        )
        self._auth_failures = counter(
            "mcptwist_auth_failures", "Requests refused by authentication, by reason.", "reason"
        )
        self._access_refused = counter(
            "mcptwist_access_refused",
            "Authenticated requests refused for want of access to the server or admin scope.",
        )
        self._rate_limited = counter(
            "mcptwist_rate_limited",
            "Requests refused by a rate limit, by the limit that refused.",
            "scope",
        )
        self._ip_refused = counter(
            "mcptwist_ip_refused",
            "Connections or requests refused by an IP filter, by where it applies.",
            "scope",
        )
        self._http_refused = counter(
            "mcptwist_http_refused",
            "Connections or requests refused while they were received, by reason.",
            "reason",
        )
        self._spawns = counter("mcptwist_child_spawns", "Children spawned, by server.", "server")
        self._exits = counter(
            "mcptwist_child_exits", "Children ended, by server and how.", "server", "reason"
        )
        self._opened = counter(
            "mcptwist_sessions_opened",
            "Client sessions opened, by server and transport.",
            "server",
            "transport",
        )
        self._closed = counter(
            "mcptwist_sessions_closed",
            "Client sessions closed, by server and transport.",
            "server",
            "transport",
        )
        Gauge(
            "mcptwist_build_info",
            "The running bridge's version (always 1).",
            ["version"],
            registry=r,
        ).labels(__version__).set(1)
        Gauge(
            "mcptwist_start_time_seconds",
            "When the bridge started, in seconds since the Unix epoch.",
            registry=r,
        ).set(time.time() if start_time is None else start_time)
        self._live = _LiveState()
        r.register(self._live)

        self._server = _Bounded(MAX_SERVERS, MAX_SERVER_NAME)
        self._max_tools = max_tools
        self._tools_seen: dict[str, set[str]] = {}
        # Series by their label values: a call whose values are all valid
        # labels finds its series in one lookup. Kept by label only, so that
        # made-up methods or servers add nothing here.
        self._http_series: dict[tuple[str, str, str, int], tuple[_Count, _Count, _Count]] = {}
        self._request_series: dict[tuple[str, str, str], tuple[_Count, _Observed]] = {}
        self._tool_series: dict[tuple[str, str, str], _Count] = {}
        # What a request's end counts, by server, method, status and error type.
        self._ended_series: dict[
            tuple[str, str, str, str], tuple[_Count, _Observed, _Observed, _Observed]
        ] = {}

    def set_source(self, source: Callable[[], Snapshot] | None) -> None:
        """Read the live state from C{source} at each scrape (C{None}: leave it out)."""
        self._live.source = source

    def resource(self) -> IResource:
        """A twisted.web resource serving these metrics (GET and HEAD)."""
        return MetricsResource(self.registry)

    # HTTP

    def http_request(
        self, server: str | None, route: str, method: str, code: int, received: int, sent: int
    ) -> None:
        """One HTTP request answered: C{route} one of L{ROUTES}, byte counts of the bodies."""
        if server is None:
            server = ""
        series = self._http_series.get((server, route, method, code))
        if series is None:
            series = self._new_http_series(server, route, method, code)
        requests, received_bytes, sent_bytes = series
        requests.value += 1
        if received > 0:
            received_bytes.value += received
        if sent > 0:
            sent_bytes.value += sent

    def _new_http_series(
        self, server: str, route: str, method: str, code: int
    ) -> tuple[_Count, _Count, _Count]:
        key = (
            self._server(server),
            route if route in ROUTES else OTHER,
            method if method in HTTP_METHODS else OTHER,
            code if 100 <= code <= 599 else 0,
        )
        series = self._http_series.get(key)
        if series is None:
            label = key[0]
            series = (
                self._http.labels(label, key[1], key[2], str(key[3]) if key[3] else OTHER),
                self._received.labels(label),
                self._sent.labels(label),
            )
            self._http_series[key] = series
        return series

    # MCP requests

    def request_done(
        self, server: str, method: str, status: str, seconds: float, tool: str | None = None
    ) -> None:
        """An MCP request answered (C{status} one of L{STATUSES}) after C{seconds}.

        C{tool} is the name a C{tools/call} asked for: counted per tool.
        """
        series = self._request_series.get((server, method, status))
        if series is None:
            series = self._new_request_series(server, method, status)
        requests, duration = series
        requests.value += 1
        duration.observe(seconds if seconds > 0.0 else 0.0)
        if tool is not None and method == "tools/call":
            self._count_tool(server, tool, status)

    def _new_request_series(
        self, server: str, method: str, status: str
    ) -> tuple[_Count, _Observed]:
        key = (
            self._server(server),
            method if method in MCP_METHODS else OTHER,
            status if status in STATUSES else OTHER,
        )
        series = self._request_series.get(key)
        if series is None:
            series = (self._requests.labels(*key), self._duration.labels(key[0], key[1]))
            self._request_series[key] = series
        return series

    def _count_tool(self, server: str, tool: str, status: str) -> None:
        calls = self._tool_series.get((server, tool, status))
        if calls is None:
            calls = self._new_tool_series(server, tool, status)
        calls.value += 1

    def _new_tool_series(self, server: str, tool: str, status: str) -> _Count:
        server = self._server(server)
        seen = self._tools_seen.setdefault(server, set())
        if tool not in seen:
            # Only a call that succeeded shows the tool exists: made-up names stay "other".
            if status == "ok" and len(seen) < self._max_tools and 0 < len(tool) <= MAX_TOOL_NAME:
                seen.add(tool)
            else:
                tool = OTHER
        key = (server, tool, status if status in STATUSES else OTHER)
        calls = self._tool_series.get(key)
        if calls is None:
            calls = self._tool_calls.labels(*key)
            self._tool_series[key] = calls
        return calls

    # Refusals

    def auth_failure(self, reason: str) -> None:
        """A request refused by authentication, for this reason (see L{auth_reason})."""
        self._auth_failures.inc(auth_reason(reason))

    def access_refused(self) -> None:
        """An authenticated principal asked for a server or admin call it may not use."""
        self._access_refused.inc()

    def rate_limited(self, scope: str) -> None:
        """A request refused by the rate limit of this scope (L{RATE_LIMIT_SCOPES})."""
        self._rate_limited.inc(scope if scope in RATE_LIMIT_SCOPES else OTHER)

    def ip_refused(self, scope: str) -> None:
        """A peer refused by the IP filter of a listener or a server (L{IP_SCOPES})."""
        self._ip_refused.inc(scope if scope in IP_SCOPES else OTHER)

    def http_refused(self, reason: str) -> None:
        """A connection or request refused while received (L{HTTP_REFUSALS})."""
        self._http_refused.inc(reason if reason in HTTP_REFUSALS else OTHER)

    # Children

    def count_spawn(self, server: str) -> None:
        """A child of this server was spawned."""
        self._spawns.inc(self._child_server(server))

    def count_exit(self, server: str, reason: str) -> None:
        """A child of this server ended; C{reason} from L{exit_reason}."""
        self._exits.inc(self._child_server(server), reason if reason in EXIT_REASONS else OTHER)

    def _child_server(self, server: str) -> str:
        # A per-session child's label is "name[session]": count it under its server.
        return self._server(server.partition("[")[0])

    # Sessions

    def count_session_opened(self, server: str, transport: str) -> None:
        """A client session opened on this server, through C{"streamable"} or C{"sse"}
        (or a principal's C{"stateless"} hub)."""
        self._opened.inc(self._server(server), transport if transport in TRANSPORTS else OTHER)

    def count_session_closed(self, server: str, transport: str) -> None:
        """A client session closed.

        Why is free text (the session registry's) and so is not a label: the
        audit trail and the log keep it.
        """
        self._closed.inc(self._server(server), transport if transport in TRANSPORTS else OTHER)

    # What the core reports (a Recorder): counted with the calls above. Every
    # session and request is counted, by its name (not detailed).

    def request_ended(self, ended: RequestEnded) -> None:
        """A request ended: counted by method and status, its latency observed
        (by method, and by error type as the OpenTelemetry conventions say)."""
        server, method, status = ended.server, ended.method, ended.status
        if ended.error_code is None and not ended.tool_error and status == "ok":
            kind = ""
        else:
            kind = error_type(status, ended.error_code, ended.tool_error)
        series = self._ended_series.get((server, method, status, kind))
        if series is None:
            series = self._new_ended_series(server, method, status, kind)
        requests, duration, server_operation, client_operation = series
        seconds = ended.latency_ms / 1000.0
        if not seconds > 0.0:
            seconds = 0.0
        requests.value += 1
        duration.observe(seconds)
        server_operation.observe(seconds)
        if ended.child_ms is not None:
            child = ended.child_ms / 1000.0
            client_operation.observe(child if child > 0.0 else 0.0)
        if ended.name is not None and method == "tools/call":
            self._count_tool(server, ended.name, status)

    def _new_ended_series(
        self, server: str, method: str, status: str, kind: str
    ) -> tuple[_Count, _Observed, _Observed, _Observed]:
        requests, duration = self._new_request_series(server, method, status)
        key = (
            self._server(server),
            method if method in MCP_METHODS else OTHER,
            status if status in STATUSES else OTHER,
            kind,
        )
        series = self._ended_series.get(key)
        if series is None:
            label = (key[0], key[1], kind)
            series = (
                requests,
                duration,
                self._server_operation.labels(*label),
                self._client_operation.labels(*label),
            )
            self._ended_series[key] = series
        return series

    def session_opened(
        self,
        *,
        session: str,
        server: str,
        principal: str | None,
        peer: str | None,
        transport: str | None,
        protocol_version: str | None,
    ) -> None:
        self.count_session_opened(server, transport or "")

    def session_closed(
        self,
        *,
        session: str,
        server: str,
        principal: str | None,
        reason: str,
        duration: float,
        transport: str | None = None,
    ) -> None:
        self.count_session_closed(server, transport or "")

    def tool_event(self, event: ToolEvent) -> None:
        self._tool_events.inc(event.server, event.kind)

    def child_spawned(self, *, server: str, pid: int | None, command: str) -> None:
        self.count_spawn(server)

    def child_exited(
        self,
        *,
        server: str,
        pid: int | None,
        exit_code: int | None,
        signal: int | None,
        reason: str,
        stopping: bool = False,
    ) -> None:
        self.count_exit(server, exit_reason(exit_code, signal, stopping))
