"""The 2026-07-28 revision over HTTP, in memory: StubTreq in front, fake children behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ResponseNeverReceived

from mcptwist.config.model import AuditConfig, ServerConfig
from mcptwist.mcp import era, jsonrpc
from mcptwist.mcp.era import MODERN, agreed_filter
from mcptwist.mcp.jsonrpc import Message, RequestId
from mcptwist.ops.audit import AuditTrail
from mcptwist.web.modern import MAX_LISTEN_URIS, MAX_LISTENS

from .support.bridge import Bridge, Client, send
from .support.children import FakeChild
from .support.messages import JSON, call, events, headers, modern

SERVER_INFO = {"name": "fake", "version": "1.0"}


def session_bridge(test: SynchronousTestCase, capabilities: dict[str, Any]) -> Bridge:
    """A bridge whose children (one per principal) declare these capabilities."""
    bridge = Bridge(test, ServerConfig(name="s", command="fake", sharing="session"), hold=True)
    bridge.reactor.on_spawn = lambda child: child.init_result.update(capabilities=capabilities)
    return bridge


class ModernPostTests(SynchronousTestCase):
    def test_tools_call_gets_a_complete_json_result(self) -> None:
        client = Client(Bridge(self))
        status, body = client.post(call(1, arguments={"text": "hi"}), accept="application/json")
        self.assertEqual(status, 200)
        self.assertEqual(body["id"], 1)
        result = body["result"]
        self.assertEqual(result["resultType"], "complete")
        self.assertEqual(result["_meta"], {era.META_SERVER: SERVER_INFO})
        self.assertEqual(result["content"], [{"type": "text", "text": "{'text': 'hi'}"}])
        self.assertNotIn("ttlMs", result)
        [sent] = client.child.requests("tools/call")
        self.assertNotIn("_meta", sent["params"], "the client's _meta is not the child's")
        self.assertEqual(len(client.child.requests("initialize")), 1, "only the bridge's own")

    def test_list_results_carry_caching_hints(self) -> None:
        client = Client(Bridge(self))
        status, body = client.post(modern("a", "tools/list"), accept="application/json")
        self.assertEqual((status, body["id"]), (200, "a"))
        self.assertEqual((body["result"]["ttlMs"], body["result"]["cacheScope"]), (0, "private"))

    def test_server_discover_from_the_childs_initialize(self) -> None:
        caps = {"tools": {"listChanged": True}, "tasks": {"list": {}}, "logging": {}}
        client = Client(session_bridge(self, caps))
        status, body = client.post(modern(2, "server/discover"))
        self.assertEqual(status, 200)
        result = body["result"]
        self.assertEqual(
            result["capabilities"],
            {
                "tools": {"listChanged": True},
                "logging": {},
                # Served by the bridge itself, whatever the child speaks.
                "extensions": {era.TASKS_EXTENSION: {}},
            },
        )
        self.assertEqual(result["supportedVersions"], list(era.SUPPORTED_VERSIONS))
        self.assertEqual(result["instructions"], "a fake server")
        self.assertEqual(result["_meta"][era.META_SERVER], SERVER_INFO)
        self.assertEqual(result["resultType"], "complete")
        self.assertEqual(len(client.child.requests("initialize")), 1, "the child is not asked")

    def test_get_and_delete_are_not_allowed(self) -> None:
        bridge = Bridge(self)
        for method in ("GET", "DELETE"):
            response = bridge.request(
                method,
                "/servers/s/mcp",
                headers={"accept": "text/event-stream", "mcp-protocol-version": MODERN},
            )
            self.assertEqual(response.code, 405, method)
            self.assertEqual(response.headers.getRawHeaders("allow"), ["POST"])
            self.assertEqual(bridge.json(response)["error"]["code"], jsonrpc.INVALID_REQUEST)

    def test_batch_response_and_notification(self) -> None:
        bridge = Bridge(self)
        h = headers(modern(1, "tools/list"))
        batch = bridge.request(
            "POST", "/servers/s/mcp", raw=jsonrpc.dumps([modern(1, "tools/list")]), headers=h
        )
        self.assertEqual(batch.code, 400)
        self.assertEqual(bridge.json(batch)["error"]["code"], jsonrpc.INVALID_REQUEST)
        answer = bridge.request("POST", "/servers/s/mcp", jsonrpc.result(4, {}), h)
        self.assertEqual(answer.code, 400)
        self.assertEqual(bridge.json(answer)["id"], 4)
        self.assertEqual(bridge.json(answer)["error"]["code"], jsonrpc.INVALID_REQUEST)
        note = bridge.request(
            "POST", "/servers/s/mcp", jsonrpc.notification("notifications/cancelled"), h
        )
        self.assertEqual((note.code, bridge.content(note)), (202, b""))
        self.assertEqual(bridge.reactor.child.notifications("notifications/cancelled"), [])

    def test_refusals_of_the_revision(self) -> None:
        client = Client(Bridge(self))
        status, body = client.post(call(5), **{"mcp-name": "other"})
        self.assertEqual((status, body["id"], body["error"]["code"]), (400, 5, -32020))
        status, body = client.post(modern(6, "initialize"))
        self.assertEqual((status, body["id"], body["error"]["code"]), (404, 6, -32601))
        future = jsonrpc.request(
            7, "tools/list", {"_meta": {era.META_VERSION: "2099-01-01", era.META_CAPABILITIES: {}}}
        )
        status, body = client.post(future, **{"mcp-protocol-version": "2099-01-01"})
        self.assertEqual((status, body["id"], body["error"]["code"]), (400, 7, -32022))
        self.assertEqual(body["error"]["data"]["requested"], "2099-01-01")
        self.assertEqual(client.child.requests("tools/call"), [])

    def test_malformed_log_level_is_invalid_params(self) -> None:
        client = Client(Bridge(self))
        message = modern(8, "tools/list")
        message["params"]["_meta"][era.META_LOG_LEVEL] = ["debug"]
        status, body = client.post(message)
        self.assertEqual((status, body["id"], body["error"]["code"]), (400, 8, -32602))

    def test_progress_makes_the_answer_a_stream(self) -> None:
        client = Client(Bridge(self, hold=True))
        d = client.start(call(1, _meta={"progressToken": "tok"}))
        held = client.held("tools/call")
        self.assertEqual(held["params"]["_meta"], {"progressToken": held["id"]})
        progress = {"progressToken": held["id"], "progress": 1, "total": 2}
        client.child.send(jsonrpc.notification("notifications/progress", progress))
        client.bridge.client.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/event-stream"])
        chunks = client.bridge.stream(response)
        client.child.answer(held)
        client.bridge.client.flush()
        first, last = events(chunks)
        self.assertEqual(first["method"], "notifications/progress")
        self.assertEqual(first["params"]["progressToken"], "tok")
        self.assertEqual((last["id"], last["result"]["resultType"]), (1, "complete"))

    def test_json_only_client_gets_json_despite_progress(self) -> None:
        client = Client(Bridge(self, hold=True))
        d = client.start(call(1, _meta={"progressToken": 9}), accept="application/json")
        held = client.held("tools/call")
        client.child.send(
            jsonrpc.notification("notifications/progress", {"progressToken": held["id"]})
        )
        self.assertNoResult(d)
        client.child.answer(held)
        status, body = client.finish(d)
        self.assertEqual((status, body["id"], body["result"]["resultType"]), (200, 1, "complete"))

    def test_legacy_session_and_modern_client_together(self) -> None:
        bridge = Bridge(self, hold=True)
        client = Client(bridge)
        sid = bridge.open_session()
        legacy = send(
            bridge,
            jsonrpc.request(1, "tools/call", {"name": "old"}),
            {**JSON, "mcp-session-id": sid},
        )
        fresh = client.start(call(1, name="new"), accept="application/json")
        old_held, new_held = client.child.requests("tools/call")
        self.assertNotEqual(old_held["id"], new_held["id"])
        client.child.answer(new_held)
        client.child.answer(old_held)
        status, body = client.finish(fresh)
        self.assertEqual((status, body["id"], body["result"]["resultType"]), (200, 1, "complete"))
        old = bridge.json(self.successResultOf(legacy))
        self.assertEqual(old["id"], 1)
        self.assertNotIn("resultType", old["result"])
        self.assertEqual(len(bridge.reactor.children), 1)

    def test_closing_the_response_cancels_on_the_child(self) -> None:
        client = Client(Bridge(self, hold=True))
        d = client.start(call(3), accept="application/json")
        held = client.held("tools/call")
        client.hang_up()
        self.failureResultOf(d, ResponseNeverReceived)
        [cancel] = client.child.notifications("notifications/cancelled")
        self.assertEqual(cancel["params"]["requestId"], held["id"])
        self.assertEqual(client.calls(), [])

    def test_unknown_method_is_404(self) -> None:
        client = Client(Bridge(self, hold=True))
        d = client.start(modern(4, "vendor/thing"), accept="application/json")
        held = client.held("vendor/thing")
        client.child.send(jsonrpc.error(held["id"], jsonrpc.METHOD_NOT_FOUND, "no such method"))
        status, body = client.finish(d)
        self.assertEqual((status, body["id"], body["error"]["code"]), (404, 4, -32601))

    def test_missing_resource_is_invalid_params_with_uri(self) -> None:
        client = Client(Bridge(self, hold=True))
        message = modern(5, "resources/read", {"uri": "file:///nope"})
        d = client.start(message, accept="application/json")
        held = client.held("resources/read")
        client.child.send(jsonrpc.error(held["id"], -32002, "Resource not found", {"x": 1}))
        _, body = client.finish(d)
        self.assertEqual(body["id"], 5)
        self.assertEqual(body["error"]["code"], jsonrpc.INVALID_PARAMS)
        self.assertEqual(body["error"]["data"], {"x": 1, "uri": "file:///nope"})

    def test_log_lines_follow_the_calls_log_level(self) -> None:
        client = Client(Bridge(self, hold=True))
        quiet = client.start(call(1, name="quiet"))
        loud = client.start(modern(2, "tools/call", {"name": "loud"}, level="warning"))
        [set_level] = [m for m in client.child.held if m["method"] == "logging/setLevel"]
        self.assertEqual(set_level["params"], {"level": "warning"})
        for level in ("info", "error"):
            line = {"level": level, "data": level}
            client.child.send(jsonrpc.notification("notifications/message", line))
        client.bridge.client.flush()
        loud_stream = client.bridge.stream(self.successResultOf(loud))
        for held in client.child.requests("tools/call"):
            client.child.answer(held)
        client.bridge.client.flush()
        logs = [m for m in events(loud_stream) if m.get("method")]
        self.assertEqual([m["params"]["level"] for m in logs], ["error"])
        # No log level, no log lines: the other call is answered as plain JSON.
        response = self.successResultOf(quiet)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])


class ListenTests(SynchronousTestCase):
    CAPS = {"tools": {"listChanged": True}, "resources": {"subscribe": True}}

    def listen(self, client: Client, id: RequestId, **wanted: Any) -> list[bytes]:
        d = client.start(modern(id, "subscriptions/listen", {"notifications": wanted}))
        response = self.successResultOf(d)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/event-stream"])
        return client.bridge.stream(response)

    def close_listens(self, client: Client) -> None:
        """The client closes one of its listen streams."""
        streams = [c for c in client.bridge.app.heartbeat.connections if c.label == "s listen"]
        self.assertTrue(streams, "a listen stream is open")
        streams[0].request.channel.transport.loseConnection()
        client.bridge.client.flush()

    def test_acknowledged_with_the_agreed_filter(self) -> None:
        client = Client(session_bridge(self, self.CAPS))
        chunks = self.listen(
            client,
            "L1",
            toolsListChanged=True,
            promptsListChanged=True,
            resourcesListChanged=True,
            resourceSubscriptions=["file:///a", 3],
        )
        [ack] = events(chunks)
        self.assertEqual(ack["method"], "notifications/subscriptions/acknowledged")
        self.assertNotIn("id", ack)
        self.assertEqual(ack["params"]["_meta"], {era.META_SUBSCRIPTION: "L1"})
        self.assertEqual(
            ack["params"]["notifications"],
            {"toolsListChanged": True, "resourceSubscriptions": ["file:///a"]},
        )

    def test_only_what_was_asked_arrives_tagged(self) -> None:
        caps = {**self.CAPS, "prompts": {"listChanged": True}}
        client = Client(session_bridge(self, caps))
        chunks = self.listen(client, 8, toolsListChanged=True, resourceSubscriptions=["file:///a"])
        child = client.child
        child.answer(client.held("resources/subscribe"))
        for method, params in [
            ("notifications/prompts/list_changed", None),
            ("notifications/tools/list_changed", None),
            ("notifications/resources/updated", {"uri": "file:///b"}),
            ("notifications/resources/updated", {"uri": "file:///a"}),
        ]:
            child.send(jsonrpc.notification(method, params))
        client.bridge.client.flush()
        _, tools, updated = events(chunks)
        self.assertEqual(tools["method"], "notifications/tools/list_changed")
        self.assertEqual(tools["params"], {"_meta": {era.META_SUBSCRIPTION: 8}})
        self.assertEqual(updated["method"], "notifications/resources/updated")
        self.assertEqual(
            updated["params"], {"uri": "file:///a", "_meta": {era.META_SUBSCRIPTION: 8}}
        )

    def test_resource_subscription_shared_and_released(self) -> None:
        client = Client(session_bridge(self, self.CAPS))
        self.listen(client, 1, resourceSubscriptions=["file:///a"])
        self.listen(client, 2, resourceSubscriptions=["file:///a"])
        child = client.child
        [subscribe] = child.requests("resources/subscribe")
        self.assertEqual(subscribe["params"], {"uri": "file:///a"})
        child.answer(subscribe)
        self.close_listens(client)
        self.assertEqual(child.requests("resources/unsubscribe"), [])
        self.close_listens(client)
        [unsubscribe] = child.requests("resources/unsubscribe")
        self.assertEqual(unsubscribe["params"], {"uri": "file:///a"})
        self.assertEqual(len(child.requests("resources/subscribe")), 1)

    def test_json_only_client_gets_406(self) -> None:
        client = Client(Bridge(self))
        message = modern(3, "subscriptions/listen", {"notifications": {}})
        status, body = client.post(message, accept="application/json")
        self.assertEqual((status, body["id"]), (406, 3))
        self.assertEqual(body["error"]["code"], jsonrpc.INVALID_REQUEST)

    def test_agreed_filter_follows_the_childs_capabilities(self) -> None:
        everything = {
            "toolsListChanged": True,
            "promptsListChanged": True,
            "resourcesListChanged": True,
            "resourceSubscriptions": ["a"],
        }
        self.assertEqual(agreed_filter(everything, None), {})
        self.assertEqual(agreed_filter(everything, {"tools": {}, "resources": {}}), {})
        caps = {"prompts": {"listChanged": True}, "resources": {"listChanged": True}}
        self.assertEqual(
            agreed_filter(everything, caps),
            {"promptsListChanged": True, "resourcesListChanged": True},
        )
        self.assertEqual(
            agreed_filter({"toolsListChanged": 1}, {"tools": {"listChanged": True}}), {}
        )


class AuditTests(SynchronousTestCase):
    def test_hub_and_each_request_audited(self) -> None:
        """A principal's first request opens its hub (session_opened, transport
        stateless); each request is one event, an input_required round too."""
        directory = Path(self.mktemp())
        directory.mkdir()
        path = directory / "audit.log"
        bridge = Bridge(self)
        trail = AuditTrail(AuditConfig(path=str(path)), bridge.reactor)
        trail.start()
        self.addCleanup(trail.stop)
        bridge.registry.recorder = trail
        client = Client(bridge)
        status, _ = client.post(call(1, arguments={"text": "hi"}), accept="application/json")
        self.assertEqual(status, 200)
        status, _ = client.post(modern(2, "tools/list"), accept="application/json")
        self.assertEqual(status, 200)
        trail.stop()
        lines = [orjson.loads(line) for line in path.read_bytes().splitlines()]
        [opened] = [e for e in lines if e["event"] == "session_opened"]
        self.assertEqual((opened["transport"], opened["protocol_version"]), ("stateless", MODERN))
        requests = [e for e in lines if e["event"] == "request"]
        self.assertEqual(
            [(e["method"], e["status"]) for e in requests],
            [
                ("tools/call", "ok"),
                ("tools/list", "ok"),
            ],
        )
        self.assertEqual({e["session"] for e in requests}, {opened["session"]})
        self.assertEqual(requests[0]["name"], "echo")
        self.assertEqual(requests[0]["principal"], "anonymous")


class ListenBoundsTests(SynchronousTestCase):
    def test_listen_before_the_child_is_ready_waits_for_its_capabilities(self) -> None:
        bridge = Bridge(self, ServerConfig(name="s", command="fake", sharing="session"), hold=True)
        caps = {"tools": {"listChanged": True}}
        slow: list[tuple[FakeChild, Message]] = []
        forward = bridge.reactor.on_message

        def on_message(child: FakeChild, message: Message) -> None:
            if message.get("method") == "initialize":
                child.init_result.update(capabilities=caps)
                slow.append((child, message))
                return
            forward(child, message)

        bridge.reactor.on_message = on_message
        client = Client(bridge)
        listen = modern("L", "subscriptions/listen", {"notifications": {"toolsListChanged": True}})
        d = client.start(listen)
        self.assertNoResult(d)
        child, init = slow[0]
        child.answer(init)
        bridge.client.flush()
        chunks = bridge.stream(self.successResultOf(d))
        child.send(jsonrpc.notification("notifications/tools/list_changed"))
        bridge.client.flush()
        ack, changed = events(chunks)
        self.assertEqual(ack["params"]["notifications"], {"toolsListChanged": True})
        self.assertEqual(changed["method"], "notifications/tools/list_changed")

    def test_listen_streams_per_server_are_bounded_and_audited(self) -> None:
        """A client's listen streams on one server are bounded: past them, 429
        with Retry-After, written to the audit trail like every other cap."""
        bridge = Bridge(self)
        audit = bridge.app.access.audit
        seen: list[dict[str, Any]] = []
        audit.rate_limited = lambda **fields: seen.append(fields)  # type: ignore[method-assign]
        client = Client(bridge)
        for i in range(MAX_LISTENS):
            response = self.successResultOf(client.start(modern(i, "subscriptions/listen", {})))
            self.assertEqual(response.code, 200, i)
        status, body = client.post(modern("L", "subscriptions/listen", {}))
        self.assertEqual((status, body["id"]), (429, "L"))
        self.assertIn(f"{MAX_LISTENS} listen streams", body["error"]["message"])
        self.assertEqual(
            [(f["server"], f["scope"]) for f in seen], [("s", "listens-per-principal")]
        )

    def test_resource_subscriptions_per_stream_are_bounded(self) -> None:
        bridge = Bridge(self, hold=True)
        client = Client(bridge)
        uris = [f"file:///x{i}" for i in range(MAX_LISTEN_URIS + 1)]
        params = {"notifications": {"resourceSubscriptions": uris}}
        status, body = client.post(modern("L", "subscriptions/listen", params))
        self.assertEqual((status, body["id"]), (400, "L"))
        self.assertEqual(body["error"]["code"], jsonrpc.INVALID_PARAMS)
        self.assertEqual(bridge.reactor.child.requests("resources/subscribe"), [])
