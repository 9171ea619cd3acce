"""Traces and metrics from a real bridge to a real OTLP/HTTP receiver.

The receiver is a small HTTP server in a thread that decodes the protobuf
payloads with C{opentelemetry-proto}, as a collector does. The child is the
stdio fixture, whose C{meta} tool answers with the C{_meta} it received.
"""

from __future__ import annotations

import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from twisted.trial.unittest import TestCase

from . import harness as h

FIXTURE = str(h.FIXTURES / "stdio_fixture.py")
API_KEY = "otlp-key-7f3a9c"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
ACCEPT = {"Accept": "application/json, text/event-stream"}


class Receiver:
    """An OTLP/HTTP receiver: what it was sent, decoded, and the headers it came with."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.metrics: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                with receiver.lock:
                    receiver.headers.append({k.lower(): v for k, v in self.headers.items()})
                    if self.path == "/v1/traces":
                        answer = receiver.traces(body)
                    elif self.path == "/v1/metrics":
                        answer = receiver.measures(body)
                    else:
                        self.send_error(404)
                        return
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def traces(self, body: bytes) -> bytes:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for rs in request.resource_spans:
            resource = {a.key: MessageToDict(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(
                        {
                            "name": s.name,
                            "kind": s.kind,
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent": s.parent_span_id.hex(),
                            "attributes": {
                                a.key: next(iter(MessageToDict(a.value).values()))
                                for a in s.attributes
                            },
                            "status": s.status.code,
                            "resource": resource,
                        }
                    )
        return ExportTraceServiceResponse().SerializeToString()

    def measures(self, body: bytes) -> bytes:
        request = ExportMetricsServiceRequest()
        request.ParseFromString(body)
        for rm in request.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    self.metrics.append(MessageToDict(metric))
        return ExportMetricsServiceResponse().SerializeToString()

    def span(self, name: str, kind: int) -> dict[str, Any] | None:
        with self.lock:
            return next((s for s in self.spans if s["name"] == name and s["kind"] == kind), None)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


SERVER_KIND = 2  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_SERVER
CLIENT_KIND = 3


class OTLPTests(TestCase):
    """A real bridge exports its spans and metrics over OTLP/HTTP."""

    def setUp(self) -> None:
        self.receiver = Receiver()
        self.addCleanup(self.receiver.stop)
        config = (
            h.python_server_toml("s", [FIXTURE])
            + "[telemetry]\n"
            + f"endpoint = {h.toml_str(self.receiver.url)}\n"
            + 'headers = { "x-api-key" = "${OTLP_KEY}" }\n'
            + 'service_name = "mcptwist-it"\n'
            + 'resource = { "deployment.environment" = "test" }\n'
            + "timeout = 2\n"
            + "metrics_interval = 0.5\n"
        )
        # Spans are batched: sent every 100 ms rather than the SDK's 5 s.
        env = {"OTLP_KEY": API_KEY, "OTEL_BSP_SCHEDULE_DELAY": "100"}
        self.bridge = h.start_bridge(self, config, env=env)
        self.bridge.wait_state("s", "running")
        self.session = self.initialize()

    def post(self, message: dict[str, Any], **extra: str) -> tuple[int, dict[str, str], bytes]:
        headers = {**ACCEPT, **extra}
        if self.session:
            headers["Mcp-Session-Id"] = self.session
        return h.http("POST", self.bridge.mcp_url("s"), message, headers)

    def initialize(self) -> str:
        self.session = ""
        code, headers, body = self.post(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "clientInfo": {"name": "it"},
                },
            }
        )
        self.assertEqual(code, 200, body)
        session = headers["mcp-session-id"]
        self.session = session
        code, _, _ = self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        self.assertEqual(code, 202)
        return session

    def call(self, id: int, tool: str, **extra: str) -> dict[str, Any]:
        message = {
            "jsonrpc": "2.0",
            "id": id,
            "method": "tools/call",
            "params": {"name": tool, "arguments": {}},
        }
        code, headers, body = self.post(message, **extra)
        self.assertEqual(code, 200, body)
        [answer] = h.jsonrpc_body(headers, body)
        return answer  # type: ignore[no-any-return]

    def test_spans_reach_the_collector(self) -> None:
        """A call with a traceparent header: the SERVER span continues the
        client's trace, the CLIENT span is its child, the child received the
        CLIENT span's context, and the export carried the configured header."""
        answer = self.call(7, "meta", traceparent=f"00-{TRACE}-{PARENT}-01")
        meta = json.loads(h.tool_text(answer))
        _, trace_id, child_parent, _ = meta["traceparent"].split("-")
        self.assertEqual(trace_id, TRACE)
        server = h.wait_for(
            lambda: self.receiver.span("tools/call meta", SERVER_KIND), 10, "the SERVER span"
        )
        client = h.wait_for(
            lambda: self.receiver.span("tools/call meta", CLIENT_KIND), 10, "the CLIENT span"
        )
        self.assertEqual((server["trace_id"], server["parent"]), (TRACE, PARENT))
        self.assertEqual(client["parent"], server["span_id"])
        self.assertEqual(client["span_id"], child_parent, "the child got the hop's context")
        self.assertEqual(client["attributes"]["network.transport"], "pipe")
        attributes = server["attributes"]
        self.assertEqual(attributes["mcp.method.name"], "tools/call")
        self.assertEqual(attributes["gen_ai.tool.name"], "meta")
        self.assertEqual(attributes["mcp.session.id"], self.session)
        self.assertEqual(attributes["jsonrpc.request.id"], "7")
        self.assertEqual(attributes["mcptwist.server"], "s")
        self.assertEqual(server["resource"]["service.name"], {"stringValue": "mcptwist-it"})
        self.assertEqual(server["resource"]["deployment.environment"], {"stringValue": "test"})
        with self.receiver.lock:
            sent = list(self.receiver.headers)
        self.assertTrue(all(s.get("x-api-key") == API_KEY for s in sent))
        self.assertTrue(all(s["content-type"] == "application/x-protobuf" for s in sent))
        self.assertNotIn(API_KEY, self.bridge.log)

    def test_tool_error(self) -> None:
        """A result with isError: error.type tool_error, status ERROR, at the collector."""
        self.call(8, "fail")
        server = h.wait_for(
            lambda: self.receiver.span("tools/call fail", SERVER_KIND), 10, "the SERVER span"
        )
        self.assertEqual(server["attributes"]["error.type"], "tool_error")
        self.assertEqual(server["status"], 2)  # STATUS_CODE_ERROR

    def test_metrics_reach_the_collector(self) -> None:
        """mcp.server.operation.duration and mcp.client.operation.duration are
        exported, as histograms in seconds."""
        self.call(9, "echo")

        def exported() -> set[str] | None:
            with self.receiver.lock:
                names = {m["name"] for m in self.receiver.metrics}
            wanted = {"mcp.server.operation.duration", "mcp.client.operation.duration"}
            return names if wanted <= names else None

        h.wait_for(exported, 10, "the duration histograms")
        with self.receiver.lock:
            metric = next(
                m for m in self.receiver.metrics if m["name"] == "mcp.server.operation.duration"
            )
        self.assertEqual(metric["unit"], "s")
        self.assertIn("histogram", metric)
