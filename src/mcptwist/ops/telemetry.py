# -*- test-case-name: tests.test_telemetry -*-
"""OpenTelemetry traces and metrics of MCP requests, sent over OTLP/HTTP.

The spans follow the OpenTelemetry semantic conventions for MCP
(C{docs/gen-ai/mcp.md} of C{open-telemetry/semantic-conventions-genai}):

  - a SERVER span for each request a client sends, named
    C{{mcp.method.name}} C{{target}}, whose parent is the request's
    C{params._meta.traceparent}, else the HTTP request's C{traceparent};
  - a CLIENT span for the hop to the child (C{network.transport=pipe}),
    whose context the child receives in its request's C{params._meta}, so
    that a child that traces continues the trace;
  - a CLIENT span for each request the child sends to the client (sampling,
    elicitation, roots), inside the span of the request it serves, however
    many HTTP requests (C{input_required} rounds) it takes to answer.

Context is passed explicitly, never left current across a Deferred: the
only context attached is the HTTP request's, for the synchronous call that
hands its messages to the router (L{Telemetry.incoming}).

This module is imported only when C{[telemetry]} is configured: without it
nothing of OpenTelemetry is loaded, and the router does one attribute test
per request.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Final

import orjson
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.metrics import Histogram, Meter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from mcptwist import __version__
from mcptwist.config.model import TelemetryConfig
from mcptwist.mcp.jsonrpc import Message
from mcptwist.routing.record import Status as Ending
from mcptwist.routing.stateless import ModernCall
from mcptwist.routing.trace import Client

log = Logger(namespace="mcptwist.telemetry")

# The W3C fields a carrier holds (what MCP puts, unprefixed, in params._meta).
FIELDS: Final = ("traceparent", "tracestate", "baggage")
# The buckets the MCP conventions give mcp.{server,client}.operation.duration (seconds).
DURATION_BUCKETS: Final = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
# At most this much of a tool's arguments or result is recorded (opt-in only).
MAX_RECORDED: Final = 8192
SCOPE: Final = "mcptwist"
# At most this much of an error's message is a span's status description.
MAX_STATUS: Final = 512


def carrier_of(meta: object) -> dict[str, str]:
    """The trace fields of a C{_meta} object (only strings: it comes from a client)."""
    if not isinstance(meta, dict):
        return {}
    return {k: v for k in FIELDS if isinstance(v := meta.get(k), str)}


def _recorded(value: Any) -> str:
    text = orjson.dumps(value, default=str).decode()
    return text if len(text) <= MAX_RECORDED else text[:MAX_RECORDED] + "…"


def _target(method: str, params: Any) -> tuple[str | None, dict[str, str]]:
    """What a request names (a tool, a prompt, a resource), and its attributes."""
    if not isinstance(params, dict):
        return None, {}
    if method == "tools/call":
        name = params.get("name")
        if isinstance(name, str):
            return name, {"gen_ai.tool.name": name, "gen_ai.operation.name": "execute_tool"}
    elif method == "prompts/get":
        name = params.get("name")
        if isinstance(name, str):
            return name, {"gen_ai.prompt.name": name}
    elif method in ("resources/read", "resources/subscribe", "resources/unsubscribe"):
        uri = params.get("uri")
        if isinstance(uri, str):
            return None, {"mcp.resource.uri": uri}
    return None, {}


def error_type(answer: Message | None, ending: Ending) -> str | None:
    """The span's C{error.type}: the JSON-RPC error code, C{tool_error} for a
    tool's own error, or how the bridge ended it; None when it succeeded."""
    if answer is not None:
        error = answer.get("error")
        if isinstance(error, dict):
            return str(error.get("code"))
        result = answer.get("result")
        if isinstance(result, dict) and result.get("isError") is True:
            return "tool_error"
    if ending in ("timeout", "cancelled"):
        return ending
    return None


def _fail(span: Span, kind: str, answer: Message | None) -> None:
    span.set_attribute("error.type", kind)
    error = answer.get("error") if answer is not None else None
    if isinstance(error, dict):
        span.set_attribute("rpc.response.status_code", kind)
        text = error.get("message")
        span.set_status(
            Status(StatusCode.ERROR, text[:MAX_STATUS] if isinstance(text, str) else None)
        )
    else:
        span.set_status(Status(StatusCode.ERROR))


class _Question:
    """A request of the child to the client, as a span."""

    def __init__(self, span: Span) -> None:
        self.span = span

    def answered(self, answer: Message | None) -> None:
        kind = error_type(answer, "ok" if answer is not None else "cancelled")
        if kind is not None:
            _fail(self.span, kind, answer)
        self.span.end()


class _Call:
    """One client request's spans (a L{mcptwist.routing.trace.CallTrace})."""

    def __init__(
        self,
        telemetry: Telemetry,
        server: str,
        session: Client,
        message: Message,
        arguments: bool,
    ) -> None:
        self.telemetry = telemetry
        if isinstance(session, ModernCall):
            # What the router got is the call in its child's terms (its own
            # id; initialize for server/discover): the span tells of the client's.
            message = session.request.message
        method = self.method = message["method"]
        params = message.get("params")
        meta = params.get("_meta") if isinstance(params, dict) else None
        parent = propagate.extract(carrier_of(meta), context=otel_context.get_current())
        target, named = _target(method, params)
        self.named = named
        self.name = f"{method} {target}" if target else method
        self.server = server
        self.arguments = arguments and method == "tools/call"
        attributes: dict[str, Any] = {
            "mcp.method.name": method,
            "mcptwist.server": server,
            "network.transport": "tcp",
            "network.protocol.name": "http",
            **named,
        }
        request_id = message.get("id")
        if request_id is not None:
            attributes["jsonrpc.request.id"] = str(request_id)
        if not session.stateless:
            attributes["mcp.session.id"] = session.id
        if session.protocol_version is not None:
            attributes["mcp.protocol.version"] = session.protocol_version
        if self.arguments and isinstance(params, dict) and "arguments" in params:
            attributes["gen_ai.tool.call.arguments"] = _recorded(params["arguments"])
        self.started = time.perf_counter()
        self.span = telemetry.tracer.start_span(
            self.name, context=parent, kind=SpanKind.SERVER, attributes=attributes
        )
        self.context: Context = trace.set_span_in_context(self.span, parent)
        self.hop: Span | None = None
        self.hop_started = 0.0

    def sent(self, message: Message) -> None:
        if self.hop is not None:
            # Sent again (a child's input_required round): a new hop.
            self._end_hop(None)
        attributes: dict[str, Any] = {
            "mcp.method.name": self.method,
            "mcptwist.server": self.server,
            "network.transport": "pipe",
            "jsonrpc.request.id": str(message.get("id")),
        }
        attributes.update(self.named)
        self.hop_started = time.perf_counter()
        self.hop = self.telemetry.tracer.start_span(
            self.name, context=self.context, kind=SpanKind.CLIENT, attributes=attributes
        )
        params = message.get("params")
        if not isinstance(params, dict):
            params = message["params"] = {}
        meta = params.get("_meta")
        if not isinstance(meta, dict):
            meta = params["_meta"] = {}
        for key in FIELDS:
            meta.pop(key, None)
        propagate.inject(meta, context=trace.set_span_in_context(self.hop, self.context))

    def question(self, message: Message) -> _Question:
        attributes: dict[str, Any] = {
            "mcp.method.name": message["method"],
            "mcptwist.server": self.server,
        }
        return _Question(
            self.telemetry.tracer.start_span(
                message["method"], context=self.context, kind=SpanKind.CLIENT, attributes=attributes
            )
        )

    def ended(self, answer: Message | None, status: Ending) -> None:
        kind = error_type(answer, status)
        if self.arguments and answer is not None and "result" in answer:
            self.span.set_attribute("gen_ai.tool.call.result", _recorded(answer["result"]))
        if self.hop is not None:
            self._end_hop(kind, answer)
        if kind is not None:
            _fail(self.span, kind, answer)
        self.span.end()
        self.telemetry.measured(
            self.telemetry.server_duration,
            time.perf_counter() - self.started,
            self.method,
            self.server,
            kind,
        )

    def _end_hop(self, kind: str | None, answer: Message | None = None) -> None:
        hop, self.hop = self.hop, None
        assert hop is not None
        if kind is not None:
            _fail(hop, kind, answer)
        hop.end()
        self.telemetry.measured(
            self.telemetry.client_duration,
            time.perf_counter() - self.hop_started,
            self.method,
            self.server,
            kind,
        )


class Telemetry(Service):
    """The bridge's tracer (a L{mcptwist.routing.trace.Tracer}), and the
    providers behind it: flushed when the service stops."""

    def __init__(
        self,
        tracer_provider: TracerProvider,
        meter_provider: MeterProvider | None = None,
        exports: bool = True,
    ) -> None:
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        # Whether shutting down sends over the network (then it runs in a thread).
        self.exports = exports
        self.tracer = tracer_provider.get_tracer(SCOPE, __version__)
        self.server_duration: Histogram | None = None
        self.client_duration: Histogram | None = None
        if meter_provider is not None:
            meter: Meter = meter_provider.get_meter(SCOPE, __version__)
            self.server_duration = meter.create_histogram(
                "mcp.server.operation.duration",
                unit="s",
                description="How long the bridge took to answer an MCP request",
                explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
            )
            self.client_duration = meter.create_histogram(
                "mcp.client.operation.duration",
                unit="s",
                description="How long an MCP server (a child) took to answer the bridge",
                explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
            )

    def request(
        self, server: str, session: Client, message: Message, arguments: bool = False
    ) -> _Call:
        return _Call(self, server, session, message, arguments)

    @contextmanager
    def incoming(self, headers: Mapping[str, str]) -> Iterator[None]:
        """Make the trace context of an HTTP request's headers current while
        its messages are handed to the router."""
        token = otel_context.attach(propagate.extract(headers))
        try:
            yield
        finally:
            otel_context.detach(token)

    @staticmethod
    def measured(
        histogram: Histogram | None, seconds: float, method: str, server: str, kind: str | None
    ) -> None:
        if histogram is None:
            return
        attributes = {"mcp.method.name": method, "mcptwist.server": server}
        if kind is not None:
            attributes["error.type"] = kind
        histogram.record(seconds, attributes)

    def stopService(self) -> Deferred[None]:
        """Send what is left, in a thread: an export waits on the network
        (at most the exporter's timeout)."""
        super().stopService()
        if self.exports:
            return deferToThread(self._shutdown)
        self._shutdown()
        return succeed(None)

    def _shutdown(self) -> None:
        self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()


def resource_of(config: TelemetryConfig, environ: Mapping[str, str]) -> Resource:
    """The resource the bridge's spans and metrics describe: the configured
    attributes over C{OTEL_RESOURCE_ATTRIBUTES}, the service's name and version."""
    name = config.service_name or environ.get("OTEL_SERVICE_NAME") or "mcptwist"
    return Resource.create(
        {"service.version": __version__, **config.resource, "service.name": name}
    )


def build(
    config: TelemetryConfig,
    environ: Mapping[str, str],
    processor: SpanProcessor | None = None,
    reader: MetricReader | None = None,
) -> Telemetry:
    """The bridge's telemetry: spans batched to the OTLP/HTTP exporter (or
    to C{processor}), metrics read periodically (or by C{reader})."""
    exports = processor is None or reader is None
    resource = resource_of(config, environ)
    sampler = (
        ParentBased(TraceIdRatioBased(config.sampling)) if config.sampling is not None else None
    )
    tracer_provider = TracerProvider(resource=resource, sampler=sampler)
    if processor is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        processor = BatchSpanProcessor(
            OTLPSpanExporter(
                endpoint=f"{config.endpoint}/v1/traces" if config.endpoint else None,
                headers=dict(config.headers) or None,
                timeout=config.timeout,
            )
        )
    tracer_provider.add_span_processor(processor)
    if reader is None:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        reader = PeriodicExportingMetricReader(
            OTLPMetricExporter(
                endpoint=f"{config.endpoint}/v1/metrics" if config.endpoint else None,
                headers=dict(config.headers) or None,
                timeout=config.timeout,
            ),
            export_interval_millis=config.metrics_interval * 1000,
            export_timeout_millis=config.timeout * 1000,
        )
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    log.info(
        "tracing to {endpoint} (sampling {sampling})",
        endpoint=config.endpoint
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318"),
        sampling="parent, else all" if config.sampling is None else config.sampling,
    )
    return Telemetry(tracer_provider, meter_provider, exports)
