# -*- test-case-name: tests.test_aggregate -*-
"""Aggregating endpoints over fake children: merged lists, routing by name,
what members send back, partial failure; and each child's catalog."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.child.supervisor import ChildState
from mcptwist.config.model import BridgeConfig, Bucket, EndpointConfig, ServerConfig, ServerLimits
from mcptwist.mcp import jsonrpc
from mcptwist.mcp.jsonrpc import Message
from mcptwist.mcp.naming import encode_cursor
from mcptwist.routing.aggregate import EVERYONE, Aggregate, Refused
from mcptwist.routing.catalog import Catalog, Unavailable
from mcptwist.routing.record import ToolEvent

from .support.bridge import Service
from .support.children import FakeChild
from .support.messages import INIT, JSON, decode, headers, modern

TOOLS = {
    "a": [{"name": "echo", "inputSchema": {"type": "object"}}, {"name": "drop"}],
    "b": [{"name": "echo", "inputSchema": {"type": "object"}}, {"name": "sum"}],
}
RESOURCES = {"a": [{"uri": "file:///a.txt", "name": "a"}], "b": [{"uri": "mem://b", "name": "b"}]}


def endpoint(**settings: Any) -> EndpointConfig:
    return EndpointConfig(
        name="team", servers=("a", "b"), prefixes={"a": "a", "b": "bee"}, **settings
    )


def servers(**settings: Any) -> dict[str, ServerConfig]:
    return {n: ServerConfig(name=n, command="fake", args=(n,), **settings) for n in ("a", "b")}


class Guard:
    """A client granted some servers, and of one some tools."""

    def __init__(self, servers: set[str], tools: dict[str, set[str]] | None = None) -> None:
        self.servers = servers
        self.tools = tools or {}
        self.charged: list[str] = []

    def sees(self, server: str) -> bool:
        return server in self.servers

    def tool(self, server: str, name: str) -> bool:
        return server not in self.tools or name in self.tools[server]

    def admit(self, server: str) -> str | None:
        self.charged.append(server)
        return None


class AggregateTests(SynchronousTestCase):
    """Naming, merging and routing, without children."""

    def setUp(self) -> None:
        configs = servers()
        self.aggregate = Aggregate(endpoint(exclude=("bee__sum",)), configs.get)

    def test_merge(self) -> None:
        """Lists are merged in the endpoint's order, renamed, and filtered."""
        merged = self.aggregate.merge(
            "tools/list", [("a", TOOLS["a"]), ("b", TOOLS["b"])], EVERYONE
        )
        self.assertEqual(
            [(s, [t["name"] for t in m]) for s, m in merged],
            [("a", ["a__echo", "a__drop"]), ("b", ["bee__echo"])],
        )
        # The members' own items are left as they were.
        self.assertEqual(TOOLS["a"][0]["name"], "echo")
        resources = self.aggregate.merge(
            "resources/list", [("a", RESOURCES["a"]), ("b", RESOURCES["b"])], EVERYONE
        )
        self.assertEqual(
            [r["uri"] for _, m in resources for r in m],
            ["mcptwist:a/file:///a.txt", "mcptwist:bee/mem://b"],
        )

    def test_clash(self) -> None:
        """A clash only the lists reveal: the second tool is left out, and recorded."""
        events: list[ToolEvent] = []
        recorder = SimpleNamespace(tool_event=events.append)
        aggregate = Aggregate(
            EndpointConfig(
                name="one",
                servers=("a",),
                prefixes={"a": ""},
                rename={("a", "echo"): "drop"},
            ),
            servers().get,
            recorder=recorder,  # type: ignore[arg-type]
        )
        [(_, shown)] = aggregate.merge("tools/list", [("a", TOOLS["a"])], EVERYONE)
        self.assertEqual([t["name"] for t in shown], ["drop"])
        self.assertEqual(shown[0]["inputSchema"], {"type": "object"})
        [event] = events
        self.assertEqual((event.kind, event.server, event.tool), ("name_clash", "a", "drop"))
        # Whatever the order, the name is the rename's: the list shows what a call reaches.
        events.clear()
        [(_, shown)] = aggregate.merge("tools/list", [("a", TOOLS["a"][::-1])], EVERYONE)
        self.assertEqual([t["name"] for t in shown], ["drop"])
        self.assertEqual(shown[0]["inputSchema"], {"type": "object"})
        self.assertEqual(len(events), 1)

    def test_grants(self) -> None:
        """A client sees the tools its grants allow, and may call only those."""
        guard = Guard({"a", "b"}, {"a": {"drop"}})
        merged = self.aggregate.merge("tools/list", [("a", TOOLS["a"]), ("b", TOOLS["b"])], guard)
        self.assertEqual([t["name"] for _, m in merged for t in m], ["a__drop", "bee__echo"])
        call = jsonrpc.request(1, "tools/call", {"name": "a__echo", "arguments": {}})
        hidden = self.assertRaises(Refused, self.aggregate.route, call, guard)
        unknown = self.assertRaises(
            Refused,
            self.aggregate.route,
            jsonrpc.request(1, "tools/call", {"name": "a__nothing"}),
            Guard({"b"}),
        )
        # A hidden tool is refused as a tool that does not exist is.
        self.assertEqual(hidden.code, unknown.code)
        self.assertEqual(hidden.text, "Unknown tool: a__echo")

    def test_route(self) -> None:
        guard = Guard({"a", "b"})
        route = self.aggregate.route(
            jsonrpc.request(7, "tools/call", {"name": "bee__echo", "arguments": {"x": 1}}), guard
        )
        self.assertEqual((route.server, route.message["params"]["name"]), ("b", "echo"))
        self.assertEqual(route.message["params"]["arguments"], {"x": 1})
        self.assertEqual(guard.charged, ["b"])
        read = self.aggregate.route(
            jsonrpc.request(8, "resources/read", {"uri": "mcptwist:a/file:///a.txt"}), guard
        )
        self.assertEqual((read.server, read.message["params"]["uri"]), ("a", "file:///a.txt"))
        complete = self.aggregate.route(
            jsonrpc.request(
                9, "completion/complete", {"ref": {"type": "ref/prompt", "name": "bee__greet"}}
            ),
            guard,
        )
        self.assertEqual(complete.message["params"]["ref"], {"type": "ref/prompt", "name": "greet"})
        other = self.assertRaises(
            Refused, self.aggregate.route, jsonrpc.request(9, "custom/thing"), guard
        )
        self.assertEqual(other.code, jsonrpc.METHOD_NOT_FOUND)

    def test_pages(self) -> None:
        """The cursor says where each member stands; a foreign one is refused."""
        aggregate = Aggregate(endpoint(page_size=1), servers().get)
        merged = aggregate.merge("tools/list", [("a", TOOLS["a"]), ("b", TOOLS["b"])], EVERYONE)
        names: list[str] = []
        cursor = None
        while True:
            result = aggregate.page("tools/list", merged, cursor)
            names += [t["name"] for t in result["tools"]]
            cursor = result.get("nextCursor")
            if cursor is None:
                break
        self.assertEqual(names, ["a__echo", "a__drop", "bee__echo", "bee__sum"])
        # A client that sees only the second member pages through it alone.
        alone = aggregate.merge("tools/list", [("b", TOOLS["b"])], EVERYONE)
        first = aggregate.page("tools/list", alone, None)
        second = aggregate.page("tools/list", alone, first["nextCursor"])
        self.assertEqual(
            [t["name"] for t in first["tools"] + second["tools"]], ["bee__echo", "bee__sum"]
        )
        self.assertNotIn("nextCursor", second)
        for bad in ("nonsense", encode_cursor("zz", 0)):
            refused = self.assertRaises(Refused, aggregate.page, "tools/list", merged, bad)
            self.assertEqual(refused.code, jsonrpc.INVALID_PARAMS)


class FakeSource:
    """An upstream, as a catalog sees it: each request is answered by the test."""

    label = "fake"

    def __init__(self) -> None:
        self.state = ChildState.RUNNING
        self.init_result: dict[str, Any] | None = {"capabilities": {"tools": {}}}
        self.asked: list[tuple[str, dict[str, Any], Any]] = []
        self.used = 0
        self.ready: Deferred[None] = Deferred()

    def when_ready(self) -> Deferred[None]:
        return self.ready

    def ask(self, method: str, params: dict[str, Any], answered: Any) -> None:
        self.asked.append((method, params, answered))

    def catalog_used(self) -> None:
        self.used += 1

    def unavailable_text(self) -> str:
        return "MCP server 'fake' is failed"


class CatalogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.source = FakeSource()
        self.catalog = Catalog(self.source)
        self.changes: list[str] = []
        self.catalog.watchers.append(self.changes.append)

    def answer(self, result: dict[str, Any]) -> None:
        _, _, answered = self.source.asked.pop(0)
        answered(jsonrpc.result(1, result))

    def test_fetched_once(self) -> None:
        """Every page is fetched once; later askers get the list kept."""
        first = self.catalog.get("tools/list")
        second = self.catalog.get("tools/list")
        self.assertEqual(self.source.used, 1)
        self.answer({"tools": [{"name": "x"}], "nextCursor": "2"})
        self.assertEqual(self.source.asked[0][1], {"cursor": "2"})
        self.answer({"tools": [{"name": "y"}]})
        self.assertEqual(self.successResultOf(first), [{"name": "x"}, {"name": "y"}])
        self.assertEqual(self.successResultOf(second), [{"name": "x"}, {"name": "y"}])
        self.successResultOf(self.catalog.get("tools/list"))
        self.assertEqual(self.source.asked, [])

    def test_changed(self) -> None:
        """list_changed makes the list stale: fetched again when next asked,
        and an answer from before the change is not kept."""
        self.catalog.get("tools/list")
        self.catalog.changed("notifications/tools/list_changed")
        self.answer({"tools": [{"name": "old"}]})
        d = self.catalog.get("tools/list")
        self.answer({"tools": [{"name": "new"}]})
        self.assertEqual(self.successResultOf(d), [{"name": "new"}])
        self.assertEqual(self.changes, ["tools/list"])

    def test_other_list_unharmed(self) -> None:
        """A list being fetched when another list changes is still kept."""
        self.source.init_result = {"capabilities": {"tools": {}, "prompts": {}}}
        prompts = self.catalog.get("prompts/list")
        self.catalog.changed("notifications/tools/list_changed")
        self.answer({"prompts": [{"name": "p"}]})
        self.assertEqual(self.successResultOf(prompts), [{"name": "p"}])
        self.assertEqual(self.catalog.cached("prompts/list"), [{"name": "p"}])

    def test_one_fetch_at_a_time(self) -> None:
        """A child that becomes ready is asked for a list once, however many wait."""
        self.source.state = ChildState.STARTING
        self.catalog.get("tools/list")
        self.catalog.get("tools/list")
        self.source.state = ChildState.RUNNING
        self.catalog.reset()
        self.source.ready.callback(None)
        self.assertEqual([m for m, _, _ in self.source.asked], ["tools/list"])

    def test_not_offered(self) -> None:
        """A list the child did not declare is empty, without asking."""
        self.assertEqual(self.successResultOf(self.catalog.get("prompts/list")), [])
        self.assertEqual(self.source.asked, [])

    def test_unavailable(self) -> None:
        self.source.state = ChildState.FAILED
        self.failureResultOf(self.catalog.get("tools/list"), Unavailable)

    def test_refused(self) -> None:
        d = self.catalog.get("tools/list")
        _, _, answered = self.source.asked.pop(0)
        answered(jsonrpc.error(1, -32603, "boom"))
        self.assertIn("boom", str(self.failureResultOf(d, Unavailable).value))

    def test_waits_for_the_child(self) -> None:
        self.source.state = ChildState.STARTING
        d = self.catalog.get("tools/list")
        self.assertEqual(self.source.asked, [])
        self.source.state = ChildState.RUNNING
        self.source.ready.callback(None)
        self.answer({"tools": []})
        self.assertEqual(self.successResultOf(d), [])


class EndpointTests(SynchronousTestCase):
    """An endpoint of two fake servers, through the whole service in memory."""

    def setUp(self) -> None:
        config = BridgeConfig(servers=servers(), endpoints={"team": endpoint(page_size=100)})
        self.bridge = Service(self, config, on_spawn=self.dress)
        self.reactor = self.bridge.reactor

    @staticmethod
    def dress(child: FakeChild) -> None:
        name = child.args[-1]
        child.init_result = {
            **child.init_result,
            "capabilities": {"tools": {"listChanged": True}, "resources": {"subscribe": True}},
        }
        child.lists = {"tools/list": list(TOOLS[name]), "resources/list": list(RESOURCES[name])}

    def child(self, name: str) -> FakeChild:
        return [c for c in self.reactor.children if c.args[-1] == name and not c.exited][-1]

    def open(self) -> str:
        init = jsonrpc.request(
            1,
            "initialize",
            {"protocolVersion": "2025-11-25", "capabilities": {"roots": {}}, "clientInfo": {}},
        )
        response = self.bridge.request("POST", "/endpoints/team/mcp", init, JSON)
        self.assertEqual(response.code, 200)
        [session] = response.headers.getRawHeaders("mcp-session-id")
        result = self.bridge.json(response)["result"]
        self.assertEqual(result["serverInfo"]["name"], "mcptwist/endpoints/team")
        self.assertTrue(result["capabilities"]["tools"]["listChanged"])
        return str(session)

    def post(self, session: str, message: Message) -> Any:
        status, _, body = self.bridge.exchange(
            "POST", "/endpoints/team/mcp", message, {**JSON, "mcp-session-id": session}
        )
        self.assertEqual(status, 200, body)
        return body

    def test_list_and_call(self) -> None:
        session = self.open()
        body = self.post(session, jsonrpc.request(2, "tools/list"))
        self.assertEqual(
            [t["name"] for t in body["result"]["tools"]],
            ["a__echo", "a__drop", "bee__echo", "bee__sum"],
        )
        body = self.post(
            session, jsonrpc.request(3, "tools/call", {"name": "bee__sum", "arguments": {"n": 2}})
        )
        self.assertEqual(body["id"], 3)
        self.assertEqual(body["result"]["content"][0]["text"], "{'n': 2}")
        [call] = self.child("b").requests("tools/call")
        self.assertEqual(call["params"]["name"], "sum")
        self.assertEqual(self.child("a").requests("tools/call"), [])

    def test_lists_are_cached(self) -> None:
        """A member's list is fetched once, and again only after it changes."""
        session = self.open()
        for i in range(3):
            self.post(session, jsonrpc.request(10 + i, "tools/list"))
        self.assertEqual(len(self.child("a").requests("tools/list")), 1)
        self.child("a").lists["tools/list"].append({"name": "fresh"})
        self.child("a").send(jsonrpc.notification("notifications/tools/list_changed"))
        body = self.post(session, jsonrpc.request(20, "tools/list"))
        self.assertIn("a__fresh", [t["name"] for t in body["result"]["tools"]])
        self.assertEqual(len(self.child("a").requests("tools/list")), 2)
        self.assertEqual(len(self.child("b").requests("tools/list")), 1)

    def test_unknown_tool(self) -> None:
        """A name no member lists is refused by the endpoint, as the client wrote it."""
        session = self.open()
        self.post(session, jsonrpc.request(3, "tools/list"))
        body = self.post(session, jsonrpc.request(4, "tools/call", {"name": "a__nope"}))
        self.assertEqual(body["error"]["code"], jsonrpc.INVALID_PARAMS)
        body = self.post(session, jsonrpc.request(5, "tools/call", {"name": "zz__echo"}))
        self.assertEqual(body["error"]["message"], "Unknown tool: zz__echo")

    def test_read_resource(self) -> None:
        session = self.open()
        body = self.post(session, jsonrpc.request(2, "resources/list"))
        uris = [r["uri"] for r in body["result"]["resources"]]
        self.assertEqual(uris, ["mcptwist:a/file:///a.txt", "mcptwist:bee/mem://b"])
        self.reactor.hold = True
        for child in self.reactor.children:
            child.hold = True
        d = self.bridge.client.request(
            "POST",
            "http://127.0.0.1/endpoints/team/mcp",
            data=jsonrpc.dumps(jsonrpc.request(3, "resources/read", {"uri": uris[1]})),
            headers={**JSON, "mcp-session-id": session},
        )
        self.bridge.client.flush()
        [read] = self.child("b").held
        self.assertEqual(read["params"]["uri"], "mem://b")
        self.child("b").send(
            jsonrpc.result(read["id"], {"contents": [{"uri": "mem://b", "text": "hi"}]})
        )
        self.bridge.client.flush()
        body = self.bridge.json(self.successResultOf(d))
        self.assertEqual(body["result"]["contents"][0]["uri"], "mcptwist:bee/mem://b")

    def test_server_asks_the_client(self) -> None:
        """A member's request to the client gets the endpoint's id; the answer
        goes back to that member with the member's own id."""
        session = self.open()
        stream = self.bridge.request(
            "GET",
            "/endpoints/team/mcp",
            headers={"accept": "text/event-stream", "mcp-session-id": session},
        )
        self.child("b").send(jsonrpc.request(77, "roots/list"))
        chunks = self.bridge.stream(stream)
        [question] = [m for m in _events(chunks) if m.get("method") == "roots/list"]
        self.assertNotEqual(question["id"], 77)
        status, _, _ = self.bridge.exchange(
            "POST",
            "/endpoints/team/mcp",
            jsonrpc.result(question["id"], {"roots": []}),
            {**JSON, "mcp-session-id": session},
        )
        self.assertEqual(status, 202)
        answers = [m for m in self.child("b").received if m.get("id") == 77 and "result" in m]
        self.assertEqual(answers, [jsonrpc.result(77, {"roots": []})])
        self.assertFalse(
            [m for m in self.child("a").received if "result" in m and "method" not in m]
        )

    def test_set_level(self) -> None:
        """An endpoint offers logging whatever its members do: a client's level
        goes to each member whose child logs, and one that does not is not
        asked (or its refusal is not the client's concern)."""
        logs = {"a": True, "b": True}

        def spawned(child: FakeChild) -> None:
            self.dress(child)
            if logs[child.args[-1]]:
                child.init_result["capabilities"]["logging"] = {}
            else:
                child.answer = lambda message: _refuse_levels(child, message)  # type: ignore[method-assign]

        self.reactor.on_spawn = spawned
        for name in logs:
            self.child(name).exit(1)
        self.reactor.advance(5)
        session = self.open()
        # a's child ends; until its next one has said what it offers, a is
        # asked as the last one was (it logged)...
        logs["a"] = False
        self.child("a").exit(1)
        d = self.bridge.client.request(
            "POST",
            "http://127.0.0.1/endpoints/team/mcp",
            data=jsonrpc.dumps(jsonrpc.request(2, "logging/setLevel", {"level": "debug"})),
            headers={**JSON, "mcp-session-id": session},
        )
        self.bridge.client.flush()
        self.assertNoResult(d)
        self.reactor.advance(5)
        self.bridge.client.flush()
        # ...and the next one refuses: not a failure of the client's request.
        self.assertEqual(len(self.child("a").requests("logging/setLevel")), 1)
        self.assertEqual(self.bridge.json(self.successResultOf(d)), jsonrpc.result(2, {}))
        # Now a is known not to log: only b is asked.
        body = self.post(session, jsonrpc.request(3, "logging/setLevel", {"level": "info"}))
        self.assertEqual(body, jsonrpc.result(3, {}))
        self.assertEqual(len(self.child("a").requests("logging/setLevel")), 1)
        levels = [m["params"]["level"] for m in self.child("b").requests("logging/setLevel")]
        self.assertEqual(levels, ["debug", "info"])

    def test_member_down(self) -> None:
        """A failed member's tools leave the list, and a call to one names its state;
        the other member goes on."""
        session = self.open()
        self.post(session, jsonrpc.request(2, "tools/list"))
        backend = self.bridge.service.fleet.backends["b"]
        for upstream in backend.upstreams():
            upstream.supervisor.state = ChildState.FAILED
            upstream.catalog.reset(gone=True)
        body = self.post(session, jsonrpc.request(3, "tools/list"))
        self.assertEqual([t["name"] for t in body["result"]["tools"]], ["a__echo", "a__drop"])
        body = self.post(session, jsonrpc.request(4, "tools/call", {"name": "bee__sum"}))
        self.assertEqual(body["error"]["code"], jsonrpc.SERVER_UNAVAILABLE)
        self.assertEqual(body["error"]["data"]["state"], "failed")
        body = self.post(session, jsonrpc.request(5, "tools/call", {"name": "a__echo"}))
        self.assertIn("result", body)

    def test_member_leaves_and_returns(self) -> None:
        """A member whose child dies, and then comes back, changes the endpoint's
        list: its clients are told each time, and its tools come back."""
        session = self.open()
        self.post(session, jsonrpc.request(2, "tools/list"))
        stream = self.bridge.request(
            "GET",
            "/endpoints/team/mcp",
            headers={"accept": "text/event-stream", "mcp-session-id": session},
        )
        chunks = self.bridge.stream(stream)
        self.child("b").exit(1)
        self.reactor.advance(0)
        self.bridge.client.flush()
        # Only the lists it had fetched (its tools) are gone.
        self.assertEqual(
            [m["method"] for m in _events(chunks)], ["notifications/tools/list_changed"]
        )
        body = self.post(session, jsonrpc.request(3, "tools/list"))
        self.assertEqual([t["name"] for t in body["result"]["tools"]], ["a__echo", "a__drop"])
        self.reactor.advance(1)  # the restart's first backoff
        self.reactor.advance(0)
        self.bridge.client.flush()
        # Back: what it offers may have changed.
        self.assertEqual(
            [m["method"] for m in _events(chunks)[1:]],
            ["notifications/resources/list_changed", "notifications/tools/list_changed"],
        )
        body = self.post(session, jsonrpc.request(4, "tools/list"))
        self.assertEqual(len(body["result"]["tools"]), 4)

    def test_closed_while_listing(self) -> None:
        """A session that ends while the endpoint waits for a member's list
        leaves no request counted in flight, and records it as cancelled."""
        session = self.open()
        registry = self.bridge.service.registry
        [open_] = [s for s in registry.sessions.values() if s.id == session]
        for child in self.reactor.children:
            child.hold = True
        for upstream in self.bridge.service.fleet.backends["b"].upstreams():
            upstream.catalog.changed("notifications/tools/list_changed")
        d = self.bridge.client.request(
            "POST",
            "http://127.0.0.1/endpoints/team/mcp",
            data=jsonrpc.dumps(jsonrpc.request(2, "tools/list")),
            headers={**JSON, "mcp-session-id": session},
        )
        self.bridge.client.flush()
        self.assertEqual(open_.in_flight, 1)
        registry.close(open_)
        self.assertEqual(open_.in_flight, 0)
        self.bridge.client.flush()
        del d

    def test_modern(self) -> None:
        """A 2026-07-28 client: lists from the catalogs, calls routed by name."""
        message = modern(1, "tools/list")
        status, _, body = self.bridge.exchange(
            "POST", "/endpoints/team/mcp", message, headers(message, "application/json")
        )
        self.assertEqual(status, 200)
        self.assertEqual(body["result"]["resultType"], "complete")
        self.assertEqual(len(body["result"]["tools"]), 4)
        message = modern(2, "tools/call", {"name": "a__drop", "arguments": {"k": 1}})
        status, _, body = self.bridge.exchange(
            "POST", "/endpoints/team/mcp", message, headers(message, "application/json")
        )
        self.assertEqual(status, 200)
        self.assertEqual(body["result"]["content"][0]["text"], "{'k': 1}")
        [call] = self.child("a").requests("tools/call")
        self.assertEqual(call["params"]["name"], "drop")
        message = modern(3, "tools/call", {"name": "a__none", "arguments": {}})
        status, _, body = self.bridge.exchange(
            "POST", "/endpoints/team/mcp", message, headers(message, "application/json")
        )
        self.assertEqual(body["error"]["message"], "Unknown tool: a__none")

    def test_modern_listen(self) -> None:
        """A 2026-07-28 listen stream on an endpoint: every member's list changes,
        and updates of a resource, followed on its own server under its own URI."""
        message = modern(
            9,
            "subscriptions/listen",
            {
                "notifications": {
                    "toolsListChanged": True,
                    "resourceSubscriptions": ["mcptwist:bee/mem://b", "mcptwist:zz/x"],
                }
            },
        )
        response = self.bridge.request(
            "POST", "/endpoints/team/mcp", message, headers(message, "text/event-stream")
        )
        self.assertEqual(response.code, 200)
        [subscribe] = self.child("b").requests("resources/subscribe")
        self.assertEqual(subscribe["params"], {"uri": "mem://b"})
        self.child("a").send(jsonrpc.notification("notifications/tools/list_changed"))
        self.child("b").send(
            jsonrpc.notification("notifications/resources/updated", {"uri": "mem://b"})
        )
        self.reactor.advance(0)
        events = _events(self.bridge.stream(response))
        acknowledged, changed, updated = events
        self.assertEqual(
            acknowledged["params"]["notifications"],
            {"toolsListChanged": True, "resourceSubscriptions": ["mcptwist:bee/mem://b"]},
        )
        self.assertEqual(changed["method"], "notifications/tools/list_changed")
        self.assertEqual(updated["params"]["uri"], "mcptwist:bee/mem://b")
        for event in (changed, updated):
            self.assertEqual(event["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"], 9)

    def test_status(self) -> None:
        status, _, body = self.bridge.exchange("GET", "/servers")
        self.assertEqual(status, 200)
        [team] = body["endpoints"]
        self.assertEqual([s["name"] for s in team["servers"]], ["a", "b"])
        status, _, body = self.bridge.exchange("GET", "/endpoints/none/mcp")
        self.assertEqual(status, 404)


class HiddenThroughEndpointTests(SynchronousTestCase):
    """A tool its server's pins hide is refused through an endpoint too, even
    while the server's new list is being fetched."""

    def test_hide(self) -> None:
        config = BridgeConfig(
            servers=servers(on_tool_change="hide"), endpoints={"team": endpoint()}
        )
        bridge = Service(self, config, on_spawn=EndpointTests.dress)
        response = bridge.request("POST", "/endpoints/team/mcp", INIT, JSON)
        [session] = response.headers.getRawHeaders("mcp-session-id")
        bridge.json(response)
        extra = {**JSON, "mcp-session-id": session}
        [child] = [c for c in bridge.reactor.children if c.args[-1] == "a"]
        changed = {**TOOLS["a"][1], "description": "Now also deletes your files."}
        child.lists["tools/list"] = [TOOLS["a"][0], changed]
        child.send(jsonrpc.notification("notifications/tools/list_changed"))
        # The new list is reviewed (the change hides drop_table); the next one is held.
        child.hold = True
        child.send(jsonrpc.notification("notifications/tools/list_changed"))
        _, _, body = bridge.exchange(
            "POST",
            "/endpoints/team/mcp",
            jsonrpc.request(2, "tools/call", {"name": "a__drop"}),
            extra,
        )
        self.assertEqual(body["error"]["message"], "Unknown tool: a__drop")
        self.assertEqual(child.requests("tools/call"), [])


class BlockedThroughEndpointTests(SynchronousTestCase):
    """A member its pins block leaves the endpoint's lists, in both eras."""

    def test_block(self) -> None:
        config = BridgeConfig(
            servers=servers(on_tool_change="block"), endpoints={"team": endpoint()}
        )
        bridge = Service(self, config, on_spawn=EndpointTests.dress)
        [child] = [c for c in bridge.reactor.children if c.args[-1] == "a"]
        child.lists["tools/list"] = [{**TOOLS["a"][0], "description": "changed"}, TOOLS["a"][1]]
        child.send(jsonrpc.notification("notifications/tools/list_changed"))
        message = modern(1, "tools/list")
        _, _, body = bridge.exchange(
            "POST", "/endpoints/team/mcp", message, headers(message, "application/json")
        )
        self.assertEqual([t["name"] for t in body["result"]["tools"]], ["bee__echo", "bee__sum"])
        # A call for it is refused as the member's state: 503, not a rate limit's 429.
        message = modern(3, "tools/call", {"name": "a__echo", "arguments": {}})
        status, _, body = bridge.exchange(
            "POST", "/endpoints/team/mcp", message, headers(message, "application/json")
        )
        self.assertEqual(status, 503, body)
        self.assertEqual(body["error"]["data"], {"server": "a", "state": "blocked"})
        response = bridge.request("POST", "/endpoints/team/mcp", INIT, JSON)
        [session] = response.headers.getRawHeaders("mcp-session-id")
        bridge.json(response)
        _, _, body = bridge.exchange(
            "POST",
            "/endpoints/team/mcp",
            jsonrpc.request(2, "tools/list"),
            {**JSON, "mcp-session-id": session},
        )
        self.assertEqual([t["name"] for t in body["result"]["tools"]], ["bee__echo", "bee__sum"])


class MemberLimitTests(SynchronousTestCase):
    """A member's own rate limits hold for what an endpoint hands it."""

    def test_total(self) -> None:
        limited = ServerConfig(
            name="b",
            command="fake",
            args=("b",),
            limits=ServerLimits(total=Bucket(rate=0.001, burst=1)),
        )
        config = BridgeConfig(servers={**servers(), "b": limited}, endpoints={"team": endpoint()})
        bridge = Service(self, config, on_spawn=EndpointTests.dress)
        response = bridge.request("POST", "/endpoints/team/mcp", INIT, JSON)
        [session] = response.headers.getRawHeaders("mcp-session-id")
        bridge.json(response)
        extra = {**JSON, "mcp-session-id": session}
        answers = [
            bridge.exchange(
                "POST",
                "/endpoints/team/mcp",
                jsonrpc.request(i, "tools/call", {"name": name}),
                extra,
            )[2]
            for i, name in ((2, "bee__sum"), (3, "bee__sum"), (4, "a__echo"))
        ]
        self.assertIn("result", answers[0])
        self.assertEqual(answers[1]["error"]["code"], jsonrpc.RATE_LIMITED)
        self.assertIn("rate limit of MCP server 'b'", answers[1]["error"]["message"])
        self.assertIn("result", answers[2])


def _refuse_levels(child: FakeChild, message: Message) -> None:
    """A child without logging: it refuses logging/setLevel, as mcp-server-time does."""
    if message.get("method") == "logging/setLevel":
        child.send(jsonrpc.error(message["id"], jsonrpc.METHOD_NOT_FOUND, "Method not found"))
    else:
        FakeChild.answer(child, message)


def _events(chunks: list[bytes]) -> list[Message]:
    return [jsonrpc.loads(e["data"]) for e in decode(b"".join(chunks)) if e.get("data")]
