"""OpenTelemetry: the spans of MCP requests through the bridge, their context
in and out, their metrics, and what is never recorded."""

from __future__ import annotations

from typing import Any

import attrs
import orjson
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.config.load import load_config
from mcptwist.config.model import BridgeConfig, ConfigError, ServerConfig, TelemetryConfig
from mcptwist.mcp import jsonrpc
from mcptwist.mcp.jsonrpc import Message
from mcptwist.ops.telemetry import DURATION_BUCKETS, Telemetry, build, carrier_of, error_type

from .support.bridge import Service
from .support.children import FakeChild, FakeProcessReactor
from .support.messages import BOTH, JSON, call, events, headers, modern

PARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"
ELICIT_INIT = jsonrpc.request(
    1,
    "initialize",
    {
        "protocolVersion": "2025-06-18",
        "capabilities": {"elicitation": {}},
        "clientInfo": {"name": "t"},
    },
)


def telemetry(**settings: Any) -> tuple[Telemetry, InMemorySpanExporter, InMemoryMetricReader]:
    exporter = InMemorySpanExporter()
    reader = InMemoryMetricReader()
    found = build(TelemetryConfig(**settings), {}, SimpleSpanProcessor(exporter), reader)
    return found, exporter, reader


def tool_call(id: int, name: str = "echo", **params: Any) -> Message:
    return jsonrpc.request(id, "tools/call", {"name": name, "arguments": {"x": 1}, **params})


class Traced(SynchronousTestCase):
    """A bridge with a tracer, over children that hold their requests."""

    server = ServerConfig(name="s", command="fake")

    def setUp(self) -> None:
        self.telemetry, self.exporter, self.reader = telemetry()
        self.bridge = Service(
            self,
            BridgeConfig(servers={"s": self.server}),
            reactor=FakeProcessReactor(hold=True),
            telemetry=self.telemetry,
        )
        self.session = self.bridge.open_session(init=ELICIT_INIT)
        self.exporter.clear()

    @property
    def child(self) -> FakeChild:
        return self.bridge.reactor.child

    def post(self, message: Message, **extra: str) -> Deferred[Any]:
        treq: Any = self.bridge.client
        d: Deferred[Any] = treq.request(
            "POST",
            "http://127.0.0.1/servers/s/mcp",
            data=jsonrpc.dumps(message),
            headers={**JSON, "mcp-session-id": self.session, **extra},
        )
        treq.flush()
        return d

    def answered(self, d: Deferred[Any]) -> Message:
        self.bridge.client.flush()
        response = self.successResultOf(d)
        return jsonrpc.loads(self.bridge.content(response))  # type: ignore[no-any-return]

    def held(self, method: str = "tools/call") -> Message:
        # The last: the bridge's own requests (its list of tools) come first.
        found = [m for m in self.child.held if m["method"] == method][-1]
        self.child.held.remove(found)
        return found

    def spans(self) -> dict[tuple[str, SpanKind], ReadableSpan]:
        return {(s.name, s.kind): s for s in self.exporter.get_finished_spans()}

    def call(self, message: Message, answer: Message | None = None, **extra: str) -> Message:
        """Send a request, have the child answer it (as it is, or C{answer}'s body)."""
        d = self.post(message, **extra)
        held = self.held(message["method"])
        if answer is None:
            self.child.answer(held)
        else:
            self.child.send({**answer, "id": held["id"]})
        return self.answered(d)


class SpanTests(Traced):
    def test_server_and_client_spans(self) -> None:
        """One tools/call: a SERVER span with the MCP attributes, and the hop
        to the child as its CLIENT child span, over a pipe."""
        self.call(tool_call(7))
        spans = self.spans()
        server = spans[("tools/call echo", SpanKind.SERVER)]
        client = spans[("tools/call echo", SpanKind.CLIENT)]
        self.assertEqual(
            {k: server.attributes[k] for k in server.attributes},  # type: ignore[union-attr]
            {
                "mcp.method.name": "tools/call",
                "mcp.session.id": self.session,
                "mcp.protocol.version": "2025-06-18",
                "jsonrpc.request.id": "7",
                "gen_ai.tool.name": "echo",
                "gen_ai.operation.name": "execute_tool",
                "mcptwist.server": "s",
                "network.transport": "tcp",
                "network.protocol.name": "http",
            },
        )
        assert client.attributes is not None and client.parent is not None
        self.assertEqual(client.attributes["network.transport"], "pipe")
        self.assertEqual(client.attributes["gen_ai.tool.name"], "echo")
        self.assertEqual(client.parent.span_id, server.context.span_id)
        self.assertEqual(client.context.trace_id, server.context.trace_id)
        self.assertEqual(server.status.status_code, StatusCode.UNSET)
        self.assertNotIn("error.type", server.attributes)  # type: ignore[operator]

    def test_context_reaches_the_child(self) -> None:
        """The child's request names the CLIENT span in its _meta (W3C traceparent)."""
        d = self.post(tool_call(7))
        held = self.held()
        traceparent = held["params"]["_meta"]["traceparent"]
        self.child.answer(held)
        self.answered(d)
        client = self.spans()[("tools/call echo", SpanKind.CLIENT)]
        version, trace_id, span_id, flags = traceparent.split("-")
        sampled = f"{int(flags, 16) & 1:02x}"
        self.assertEqual(
            (version, int(trace_id, 16), int(span_id, 16), sampled),
            ("00", client.context.trace_id, client.context.span_id, "01"),
        )

    def test_meta_parent(self) -> None:
        """A traceparent in the request's _meta becomes the SERVER span's parent;
        the child gets the bridge's own span, not the client's."""
        message = tool_call(7, _meta={"traceparent": TRACEPARENT, "progressToken": "p"})
        d = self.post(message)
        held = self.held()
        self.assertNotIn(PARENT_SPAN, held["params"]["_meta"]["traceparent"])
        self.assertIn(PARENT_TRACE, held["params"]["_meta"]["traceparent"])
        self.child.answer(held)
        self.answered(d)
        server = self.spans()[("tools/call echo", SpanKind.SERVER)]
        assert server.parent is not None
        self.assertEqual(server.context.trace_id, int(PARENT_TRACE, 16))
        self.assertEqual(server.parent.span_id, int(PARENT_SPAN, 16))
        self.assertTrue(server.parent.is_remote)

    def test_baggage_passed_on(self) -> None:
        """The client's baggage reaches the child with the bridge's own span."""
        message = tool_call(7, _meta={"traceparent": TRACEPARENT, "baggage": "tenant=acme"})
        d = self.post(message)
        held = self.held()
        self.assertEqual(held["params"]["_meta"]["baggage"], "tenant=acme")
        self.child.answer(held)
        self.answered(d)

    def test_header_parent(self) -> None:
        """Without one in _meta, the HTTP request's traceparent header is the parent."""
        self.call(tool_call(7), traceparent=TRACEPARENT)
        server = self.spans()[("tools/call echo", SpanKind.SERVER)]
        assert server.parent is not None
        self.assertEqual(server.parent.span_id, int(PARENT_SPAN, 16))

    def test_meta_before_header(self) -> None:
        """_meta's context wins over the HTTP header's (the MCP conventions)."""
        other = f"00-{'1' * 32}-{'2' * 16}-01"
        self.call(tool_call(7, _meta={"traceparent": TRACEPARENT}), traceparent=other)
        server = self.spans()[("tools/call echo", SpanKind.SERVER)]
        self.assertEqual(server.context.trace_id, int(PARENT_TRACE, 16))

    def test_no_parent(self) -> None:
        """A request with no context starts a trace of its own; so does the next."""
        self.call(tool_call(7))
        self.call(tool_call(8))
        servers = [s for s in self.exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
        self.assertEqual(len({s.context.trace_id for s in servers}), 2)
        self.assertTrue(all(s.parent is None for s in servers))

    def test_json_rpc_error(self) -> None:
        """The child's JSON-RPC error: error.type is its code, the status ERROR."""
        self.call(tool_call(7), jsonrpc.error(0, jsonrpc.INVALID_PARAMS, "no such tool"))
        spans = self.spans()
        for kind in (SpanKind.SERVER, SpanKind.CLIENT):
            span = spans[("tools/call echo", kind)]
            assert span.attributes is not None
            self.assertEqual(span.attributes["error.type"], "-32602")
            self.assertEqual(span.status.status_code, StatusCode.ERROR)
            self.assertEqual(span.status.description, "no such tool")

    def test_tool_error(self) -> None:
        """A result with isError: error.type is tool_error."""
        result = {"content": [{"type": "text", "text": "it broke"}], "isError": True}
        self.call(tool_call(7), jsonrpc.result(0, result))
        server = self.spans()[("tools/call echo", SpanKind.SERVER)]
        assert server.attributes is not None
        self.assertEqual(server.attributes["error.type"], "tool_error")
        self.assertEqual(server.status.status_code, StatusCode.ERROR)

    def test_timeout(self) -> None:
        """A request the bridge gave up on: the code it answered with."""
        d = self.post(tool_call(7))
        self.bridge.reactor.advance(self.server.request_timeout + 1)
        self.assertIn("error", self.answered(d))
        server = self.spans()[("tools/call echo", SpanKind.SERVER)]
        assert server.attributes is not None
        self.assertEqual(server.attributes["error.type"], str(jsonrpc.REQUEST_TIMEOUT))

    def test_cancelled(self) -> None:
        """A request its client cancelled ends its spans as cancelled."""
        d = self.post(tool_call(7))
        self.post(jsonrpc.notification("notifications/cancelled", {"requestId": 7}))
        self.bridge.client.flush()
        self.successResultOf(d)
        for kind in (SpanKind.SERVER, SpanKind.CLIENT):
            span = self.spans()[("tools/call echo", kind)]
            assert span.attributes is not None
            self.assertEqual(span.attributes["error.type"], "cancelled")

    def test_other_methods(self) -> None:
        """Span names carry the prompt's name; a resource's URI is an attribute."""
        self.call(jsonrpc.request(3, "prompts/get", {"name": "greet"}))
        self.call(jsonrpc.request(4, "resources/read", {"uri": "file:///a"}))
        self.call(jsonrpc.request(5, "tools/list"))
        spans = self.spans()
        prompt = spans[("prompts/get greet", SpanKind.SERVER)]
        resource = spans[("resources/read", SpanKind.SERVER)]
        assert prompt.attributes is not None and resource.attributes is not None
        self.assertEqual(prompt.attributes["gen_ai.prompt.name"], "greet")
        self.assertEqual(resource.attributes["mcp.resource.uri"], "file:///a")
        self.assertIn(("tools/list", SpanKind.CLIENT), spans)

    def test_elicitation_in_the_trace(self) -> None:
        """The child's elicitation while it serves a call: a CLIENT span of the
        call's trace, ended when the client answers."""
        treq: Any = self.bridge.client
        d = treq.request(
            "POST",
            "http://127.0.0.1/servers/s/mcp",
            data=jsonrpc.dumps(tool_call(7, _meta={"traceparent": TRACEPARENT})),
            headers={**BOTH, "mcp-session-id": self.session},
        )
        treq.flush()
        held = self.held()
        self.child.send(jsonrpc.request("q1", "elicitation/create", {"message": "Name?"}))
        treq.flush()
        response = self.successResultOf(d)
        chunks: list[bytes] = []
        treq.collect(response, chunks.append)
        treq.flush()
        [question] = events(chunks)
        self.assertEqual(question["method"], "elicitation/create")
        answer = jsonrpc.result(question["id"], {"action": "accept", "content": {"n": "Ada"}})
        self.assertEqual(self.successResultOf(self.post(answer)).code, 202)
        self.child.answer(held)
        treq.flush()
        spans = self.spans()
        server = spans[("tools/call echo", SpanKind.SERVER)]
        asked = spans[("elicitation/create", SpanKind.CLIENT)]
        assert asked.parent is not None
        self.assertEqual(asked.context.trace_id, int(PARENT_TRACE, 16))
        self.assertEqual(asked.parent.span_id, server.context.span_id)
        self.assertEqual(asked.status.status_code, StatusCode.UNSET)

    def test_arguments_never_recorded(self) -> None:
        """Without trace_arguments, no span holds a tool's arguments or result."""
        self.call(tool_call(7, arguments={"password": "hunter2"}))
        for span in self.exporter.get_finished_spans():
            self.assertNotIn("hunter2", orjson.dumps(dict(span.attributes or {})).decode())
            self.assertNotIn("gen_ai.tool.call.arguments", span.attributes or {})

    def test_metrics(self) -> None:
        """mcp.server.operation.duration and mcp.client.operation.duration, in
        seconds, with the buckets of the MCP conventions."""
        self.call(tool_call(7))
        self.call(tool_call(8), jsonrpc.error(0, jsonrpc.INVALID_PARAMS, "no"))
        data = self.reader.get_metrics_data()
        assert data is not None
        found: dict[str, Any] = {}
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    found[metric.name] = metric
        for name in ("mcp.server.operation.duration", "mcp.client.operation.duration"):
            metric = found[name]
            self.assertEqual(metric.unit, "s")
            points = {
                p.attributes.get("error.type"): p
                for p in metric.data.data_points
                if p.attributes.get("mcp.method.name") == "tools/call"
            }
            self.assertEqual(set(points), {None, "-32602"})
            self.assertEqual(tuple(points[None].explicit_bounds), DURATION_BUCKETS)
            self.assertEqual(points[None].count, 1)


class ArgumentsTests(Traced):
    server = ServerConfig(name="s", command="fake", trace_arguments=True)

    def test_opt_in(self) -> None:
        """With trace_arguments, the SERVER span holds the arguments and the result."""
        self.call(tool_call(7))
        server = self.spans()[("tools/call echo", SpanKind.SERVER)]
        assert server.attributes is not None
        self.assertEqual(orjson.loads(server.attributes["gen_ai.tool.call.arguments"]), {"x": 1})
        result = orjson.loads(server.attributes["gen_ai.tool.call.result"])
        self.assertEqual(result["content"][0]["type"], "text")


class SamplingTests(SynchronousTestCase):
    def test_not_sampled(self) -> None:
        """At sampling 0 nothing is recorded, but the child still gets the
        context (flags 00), so the trace's decision travels with it."""
        found, exporter, _ = telemetry(sampling=0.0)
        bridge = Service(
            self,
            BridgeConfig(servers={"s": ServerConfig(name="s", command="fake")}),
            telemetry=found,
        )
        session = bridge.open_session()
        code, _, body = bridge.exchange(
            "POST", "/servers/s/mcp", tool_call(7), {**JSON, "mcp-session-id": session}
        )
        self.assertEqual(code, 200, body)
        self.assertEqual(exporter.get_finished_spans(), ())
        [sent] = bridge.reactor.child.requests("tools/call")
        flags = sent["params"]["_meta"]["traceparent"].rsplit("-", 1)[1]
        self.assertEqual(int(flags, 16) & 1, 0, "not sampled")

    def test_client_decides(self) -> None:
        """A client's sampled trace is recorded whatever the ratio (parent-based)."""
        found, exporter, _ = telemetry(sampling=0.0)
        bridge = Service(
            self,
            BridgeConfig(servers={"s": ServerConfig(name="s", command="fake")}),
            telemetry=found,
        )
        session = bridge.open_session()
        bridge.exchange(
            "POST",
            "/servers/s/mcp",
            tool_call(7),
            {**JSON, "mcp-session-id": session, "traceparent": TRACEPARENT},
        )
        self.assertIn("tools/call echo", {s.name for s in exporter.get_finished_spans()})


class StatelessTests(SynchronousTestCase):
    """2026-07-28: a call with an input_required round is one trace."""

    def test_round_in_the_trace(self) -> None:
        found, exporter, _ = telemetry()
        bridge = Service(
            self,
            BridgeConfig(servers={"s": ServerConfig(name="s", command="fake")}),
            reactor=FakeProcessReactor(hold=True),
            telemetry=found,
        )
        treq: Any = bridge.client

        def post(message: Message) -> Deferred[Any]:
            d: Deferred[Any] = treq.request(
                "POST",
                "http://127.0.0.1/servers/s/mcp",
                data=jsonrpc.dumps(message),
                headers=headers(message, "application/json", traceparent=TRACEPARENT),
            )
            treq.flush()
            return d

        def body(d: Deferred[Any]) -> Message:
            treq.flush()
            return jsonrpc.loads(bridge.content(self.successResultOf(d)))  # type: ignore[no-any-return]

        d = post(call(5))
        child = bridge.reactor.child
        [held] = [m for m in child.held if m["method"] == "tools/call"]
        child.send(jsonrpc.request("q", "elicitation/create", {"message": "Name?"}))
        bridge.reactor.advance(0.1)
        state = body(d)["result"]["requestState"]
        answers = {"q": {"action": "accept", "content": {"name": "Ada"}}}
        d = post(call(2, requestState=state, inputResponses=answers))
        child.answer(held)
        self.assertEqual(body(d)["result"]["resultType"], "complete")
        spans = exporter.get_finished_spans()
        self.assertEqual({s.context.trace_id for s in spans}, {int(PARENT_TRACE, 16)})
        names = {(s.name, s.kind) for s in spans}
        self.assertLessEqual(
            {
                ("tools/call echo", SpanKind.SERVER),
                ("tools/call echo", SpanKind.CLIENT),
                ("elicitation/create", SpanKind.CLIENT),
            },
            names,
        )
        server = next(s for s in spans if s.kind is SpanKind.SERVER)
        assert server.attributes is not None
        self.assertEqual(server.attributes["jsonrpc.request.id"], "5", "the client's id")
        self.assertNotIn("mcp.session.id", server.attributes)
        self.assertEqual(server.attributes["mcp.protocol.version"], "2026-07-28")


class DiscoverTests(SynchronousTestCase):
    def test_named_as_the_client_sent_it(self) -> None:
        """A 2026-07-28 server/discover on a session-era child (which the bridge
        asks initialize) is traced as server/discover."""
        found, exporter, _ = telemetry()
        bridge = Service(
            self,
            BridgeConfig(servers={"s": ServerConfig(name="s", command="fake")}),
            telemetry=found,
        )
        message = modern(9, "server/discover")
        code, _, body = bridge.exchange(
            "POST", "/servers/s/mcp", message, headers(message, "application/json")
        )
        self.assertEqual(code, 200, body)
        names = {(s.name, s.kind) for s in exporter.get_finished_spans()}
        self.assertIn(("server/discover", SpanKind.SERVER), names)
        self.assertNotIn(("initialize", SpanKind.SERVER), names)


class PropertyTests(SynchronousTestCase):
    @given(
        st.dictionaries(
            st.sampled_from(["traceparent", "tracestate", "baggage", "x"]),
            st.from_type(object).filter(lambda v: not isinstance(v, float)) | st.text(),
        )
    )
    def test_carrier_takes_strings_only(self, meta: dict[str, Any]) -> None:
        """Whatever a client puts in _meta, the carrier holds only the W3C
        fields that are strings (extracting from it never raises)."""
        carrier = carrier_of(meta)
        self.assertLessEqual(set(carrier), {"traceparent", "tracestate", "baggage"})
        self.assertTrue(all(isinstance(v, str) for v in carrier.values()))

    @given(
        st.one_of(
            st.none(),
            st.builds(lambda c: jsonrpc.error(1, c, "x"), st.integers(-40000, 40000)),
            st.builds(
                lambda e: jsonrpc.result(1, {"isError": e}), st.sampled_from([True, False, 1, None])
            ),
        ),
        st.sampled_from(["ok", "error", "timeout", "cancelled"]),
    )
    def test_error_type(self, answer: Message | None, ending: Any) -> None:
        """error.type: the error's code, tool_error for isError true only, or
        how the bridge ended it; nothing for a plain success."""
        kind = error_type(answer, ending)
        if answer is not None and "error" in answer:
            self.assertEqual(kind, str(answer["error"]["code"]))
        elif answer is not None and answer["result"]["isError"] is True:
            self.assertEqual(kind, "tool_error")
        elif ending in ("timeout", "cancelled"):
            self.assertEqual(kind, ending)
        else:
            self.assertIsNone(kind)


class ConfigTests(SynchronousTestCase):
    def load(self, text: str, environ: dict[str, str] | None = None) -> BridgeConfig:
        path = self.mktemp() + ".toml"
        with open(path, "w") as f:
            f.write('[servers.s]\ncommand = "x"\n' + text)
        return load_config(path, environ or {})

    def test_absent(self) -> None:
        self.assertIsNone(self.load("").telemetry)

    def test_table(self) -> None:
        config = self.load(
            "[telemetry]\n"
            'endpoint = "http://collector:4318/"\n'
            "sampling = 0.25\n"
            'service_name = "edge"\n'
            'headers = { "x-honeycomb-team" = "${KEY}" }\n'
            'resource = { "deployment.environment" = "prod" }\n',
            {"KEY": "s3cret"},
        )
        telemetry = config.telemetry
        assert telemetry is not None
        self.assertEqual(telemetry.endpoint, "http://collector:4318")
        self.assertEqual(telemetry.sampling, 0.25)
        self.assertEqual(telemetry.headers, {"x-honeycomb-team": "s3cret"})
        self.assertEqual(telemetry.resource, {"deployment.environment": "prod"})
        self.assertNotIn("s3cret", repr(config))

    def test_disabled(self) -> None:
        self.assertIsNone(self.load('[telemetry]\nenabled = false\nendpoint = "x"\n').telemetry)

    def test_errors(self) -> None:
        """Each mistake names the file, the key and the fix."""
        for text, key in [
            ('endpoint = "collector:4318"', "telemetry.endpoint"),
            ("sampling = 2", "telemetry.sampling"),
            ('sampling = "all"', "telemetry.sampling"),
            ("headers = { a = 1 }", "telemetry.headers.a"),
            ('servce_name = "x"', "telemetry.servce_name"),
        ]:
            with self.assertRaises(ConfigError) as caught:
                self.load("[telemetry]\n" + text + "\n")
            self.assertEqual(caught.exception.key, key)
            self.assertIn(".toml", str(caught.exception))

    def test_trace_arguments(self) -> None:
        config = self.load("trace_arguments = true\n")
        self.assertTrue(config.servers["s"].trace_arguments)

    def test_resource(self) -> None:
        """The service's name: the table's, else OTEL_SERVICE_NAME, else mcptwist."""
        from mcptwist.ops.telemetry import resource_of

        config = TelemetryConfig(resource={"deployment.environment": "prod"})
        self.assertEqual(resource_of(config, {}).attributes["service.name"], "mcptwist")
        self.assertEqual(
            resource_of(config, {"OTEL_SERVICE_NAME": "env"}).attributes["service.name"], "env"
        )
        named = attrs.evolve(config, service_name="edge")
        resource = resource_of(named, {"OTEL_SERVICE_NAME": "env"}).attributes
        self.assertEqual(resource["service.name"], "edge")
        self.assertEqual(resource["deployment.environment"], "prod")
