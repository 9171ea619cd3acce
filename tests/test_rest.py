"""The REST face of a server's tools (POST /servers/NAME/tools/TOOL and its
OpenAPI document) and of an endpoint's, over fake children."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.config.model import (
    AuthConfig,
    BridgeConfig,
    Bucket,
    EndpointConfig,
    LimitsConfig,
    ServerConfig,
    ServerLimits,
    TokenConfig,
)
from mcptwist.mcp import jsonrpc
from mcptwist.security.auth import hash_token
from mcptwist.web import openapi
from tests.support.bridge import Bridge, Service
from tests.support.children import FakeChild
from tests.support.messages import bearer

POST_JSON = {"content-type": "application/json"}
ADD = {
    "name": "add",
    "description": "Add two numbers",
    "inputSchema": {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    },
    "outputSchema": {
        "type": "object",
        "properties": {"sum": {"type": "integer"}},
        "required": ["sum"],
    },
}
ECHO = {
    "name": "echo",
    "inputSchema": {
        "type": "object",
        "properties": {"text": {"type": "string"}, "item": {"$ref": "#/$defs/Item"}},
        "$defs": {"Item": {"type": "object", "properties": {"n": {"type": "integer"}}}},
    },
}
ASK = {"name": "ask", "inputSchema": {"type": "object"}}


def serve(child: FakeChild, answers: dict[str, Any]) -> None:
    """Have the child answer each tool's call with the result given for it."""
    plain = child.answer

    def answer(message: jsonrpc.Message) -> None:
        if message.get("method") == "tools/call":
            name = message["params"]["name"]
            found = answers.get(name)
            if callable(found):
                found(message)
                return
            if found is not None:
                child.send(jsonrpc.result(message["id"], found))
                return
        plain(message)

    child.answer = answer  # type: ignore[method-assign]


class RestTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.bridge = Bridge(self)
        self.child = self.bridge.reactor.child
        self.child.lists["tools/list"] = [ADD, ECHO, ASK]

    def post(self, tool: str, body: Any, headers: dict[str, str] | None = None) -> Any:
        status, _, answer = self.bridge.exchange(
            "POST", f"/servers/s/tools/{tool}", body, headers or POST_JSON
        )
        return status, answer

    def test_document(self) -> None:
        """The document lists every tool as an operation named for it, with
        its schemas, and validates as OpenAPI 3.1."""
        status, _, doc = self.bridge.exchange("GET", "/servers/s/openapi.json")
        self.assertEqual(status, 200)
        validate(doc)
        self.assertEqual(doc["servers"], [{"url": "/servers/s"}])
        add = doc["paths"]["/tools/add"]["post"]
        self.assertEqual(add["operationId"], "add")
        self.assertEqual(add["description"], "Add two numbers")
        self.assertEqual(
            add["requestBody"]["content"]["application/json"]["schema"], ADD["inputSchema"]
        )
        self.assertEqual(
            add["responses"]["200"]["content"]["application/json"]["schema"], ADD["outputSchema"]
        )
        self.assertIn("422", add["responses"])
        self.assertNotIn("401", add["responses"])
        self.assertNotIn("security", doc)
        echo = doc["paths"]["/tools/echo"]["post"]["requestBody"]["content"]["application/json"]
        # The local reference points at the same place, from the document's root.
        self.assertEqual(
            echo["schema"]["properties"]["item"]["$ref"],
            "#/paths/~1tools~1echo/post/requestBody/content/application~1json/schema/$defs/Item",
        )

    def test_structured(self) -> None:
        """A tool with an output schema answers its structured content."""
        serve(
            self.child,
            {
                "add": {
                    "content": [{"type": "text", "text": "3"}],
                    "structuredContent": {"sum": 3},
                }
            },
        )
        self.assertEqual(self.post("add", {"a": 1, "b": 2}), (200, {"sum": 3}))
        [sent] = self.child.requests("tools/call")
        self.assertEqual(sent["params"]["arguments"], {"a": 1, "b": 2})

    def test_text(self) -> None:
        """Without an output schema: the JSON one text item holds, else the
        text as a JSON string, else the content list."""
        results = [
            ({"content": [{"type": "text", "text": '{"x": [1, 2]}'}]}, {"x": [1, 2]}),
            ({"content": [{"type": "text", "text": "hello"}]}, "hello"),
            (
                {"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            ),
        ]
        for result, expected in results:
            serve(self.child, {"echo": result})
            self.assertEqual(self.post("echo", {"text": "hi"}), (200, expected))

    def test_is_error(self) -> None:
        """A tool's error result is a 500 with its text."""
        serve(
            self.child,
            {"echo": {"isError": True, "content": [{"type": "text", "text": "it broke"}]}},
        )
        status, body = self.post("echo", {})
        self.assertEqual(status, 500)
        self.assertEqual(body["error"]["message"], "it broke")
        self.assertEqual(body["error"]["data"]["content"], [{"type": "text", "text": "it broke"}])

    def test_json_rpc_errors(self) -> None:
        """A child's JSON-RPC error becomes the status that fits it."""
        for code, expected in [
            (jsonrpc.INVALID_PARAMS, 422),
            (jsonrpc.METHOD_NOT_FOUND, 404),
            (jsonrpc.INTERNAL_ERROR, 502),
            (jsonrpc.SERVER_UNAVAILABLE, 503),
        ]:
            serve(
                self.child,
                {
                    "echo": lambda m, code=code: self.child.send(
                        jsonrpc.error(m["id"], code, "no good")
                    )
                },
            )
            status, body = self.post("echo", {})
            self.assertEqual((status, body["error"]["code"]), (expected, code))

    def test_timeout(self) -> None:
        """A child that does not answer in time: 504."""
        serve(self.child, {"echo": lambda m: None})
        d = self.bridge.client.request(
            "POST", "http://127.0.0.1/servers/s/tools/echo", data=b"{}", headers=POST_JSON
        )
        self.bridge.client.flush()
        self.assertNoResult(d)
        self.bridge.reactor.advance(self.bridge.config.servers["s"].request_timeout + 1)
        self.bridge.client.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 504)

    def test_question(self) -> None:
        """A tool whose child asks its client a question: 501, and the child
        hears that the client cannot answer."""

        def ask(message: jsonrpc.Message) -> None:
            self.child.send(jsonrpc.request(77, "elicitation/create", {"message": "sure?"}))

        serve(self.child, {"ask": ask})
        status, body = self.post("ask", {})
        self.assertEqual(status, 501)
        self.assertIn("cannot answer", body["error"]["message"])
        [reply] = [m for m in self.child.received if m.get("id") == 77 and "error" in m]
        self.assertEqual(reply["error"]["code"], jsonrpc.METHOD_NOT_FOUND)

    def test_invalid(self) -> None:
        """Arguments that do not match the input schema: 422 with each error,
        and the child never sees the call."""
        status, body = self.post("add", {"a": "one"})
        self.assertEqual(status, 422)
        errors = body["error"]["data"]["errors"]
        self.assertIn({"path": "/a", "message": "'one' is not of type 'integer'"}, errors)
        self.assertIn({"path": "/", "message": "'b' is a required property"}, errors)
        self.assertEqual(self.child.requests("tools/call"), [])

    def test_body(self) -> None:
        """The body must be a JSON object, sent as application/json."""
        self.assertEqual(self.post("echo", [1])[0], 400)
        self.assertEqual(self.post("echo", {}, {"content-type": "text/plain"})[0], 415)
        status, _, _ = self.bridge.exchange("GET", "/servers/s/tools/echo")
        self.assertEqual(status, 405)

    def test_unknown(self) -> None:
        """A tool the child does not list: 404."""
        status, body = self.post("nope", {})
        self.assertEqual(body["error"]["message"], "Not Found: unknown tool 'nope'")
        self.assertEqual(status, 404)
        self.assertEqual(self.child.requests("tools/call"), [])

    def test_list_changed(self) -> None:
        """A tool the child adds at run time appears in the next document."""
        _, _, doc = self.bridge.exchange("GET", "/servers/s/openapi.json")
        self.assertNotIn("/tools/late", doc["paths"])
        self.child.lists["tools/list"] = [ADD, {"name": "late", "inputSchema": {"type": "object"}}]
        self.child.send(jsonrpc.notification("notifications/tools/list_changed"))
        _, _, doc = self.bridge.exchange("GET", "/servers/s/openapi.json")
        self.assertEqual(sorted(doc["paths"]), ["/tools/add", "/tools/late"])
        serve(self.child, {"late": {"content": [{"type": "text", "text": "late"}]}})
        self.assertEqual(self.post("late", {}), (200, "late"))


TOKENS = (
    TokenConfig("all", hash_token("t-all")),
    TokenConfig("adder", hash_token("t-adder"), frozenset({"s/add"})),
    TokenConfig("other", hash_token("t-other"), frozenset({"x"})),
)


class AuthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.bridge = Bridge(
            self,
            ServerConfig(name="s", command="fake"),
            ServerConfig(name="x", command="fake"),
            auth=AuthConfig(tokens=TOKENS),
        )
        for child in self.bridge.reactor.children:
            child.lists["tools/list"] = [ADD, ECHO]

    def exchange(self, method: str, path: str, token: str | None, body: Any = None) -> Any:
        headers = dict(POST_JSON)
        if token is not None:
            headers.update(bearer(token))
        return self.bridge.exchange(method, path, body, headers)

    def test_document(self) -> None:
        """With auth, the document names the bearer scheme and the 401; a
        client sees only the tools it may call."""
        status, _, doc = self.exchange("GET", "/servers/s/openapi.json", "t-all")
        self.assertEqual(status, 200)
        validate(doc)
        self.assertEqual(doc["security"], [{"bearer": []}])
        self.assertEqual(
            doc["components"]["securitySchemes"]["bearer"], {"type": "http", "scheme": "bearer"}
        )
        self.assertEqual(sorted(doc["paths"]), ["/tools/add", "/tools/echo"])
        self.assertIn("401", doc["paths"]["/tools/add"]["post"]["responses"])
        _, _, doc = self.exchange("GET", "/servers/s/openapi.json", "t-adder")
        self.assertEqual(sorted(doc["paths"]), ["/tools/add"])

    def test_refusals(self) -> None:
        """No token: 401; a server not granted: 403; a tool not granted: 404."""
        self.assertEqual(self.exchange("GET", "/servers/s/openapi.json", None)[0], 401)
        self.assertEqual(self.exchange("POST", "/servers/s/tools/add", None, {})[0], 401)
        self.assertEqual(self.exchange("GET", "/servers/s/openapi.json", "t-other")[0], 403)
        self.assertEqual(self.exchange("POST", "/servers/s/tools/add", "t-other", {})[0], 403)
        self.assertEqual(self.exchange("POST", "/servers/s/tools/echo", "t-adder", {})[0], 404)
        status, _, _ = self.exchange("POST", "/servers/s/tools/add", "t-adder", {"a": 1, "b": 2})
        self.assertEqual(status, 200)


class RateLimitTests(SynchronousTestCase):
    def test_burst(self) -> None:
        """A burst of REST calls past a [limits] bucket: 429 with Retry-After
        and a JSON error body; the bucket refills with time."""
        bridge = Bridge(
            self,
            auth=AuthConfig(tokens=TOKENS),
            limits=LimitsConfig(per_principal=Bucket(1.0, 3), per_ip=None),
        )
        bridge.reactor.child.lists["tools/list"] = [ECHO]
        answers = [
            bridge.exchange(
                "POST", "/servers/s/tools/echo", {"text": "hi"}, {**POST_JSON, **bearer("t-all")}
            )
            for _ in range(5)
        ]
        self.assertEqual([a[0] for a in answers], [200, 200, 200, 429, 429])
        _, headers, body = answers[3]
        self.assertEqual(headers.getRawHeaders("retry-after"), ["1"])
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(body["error"]["code"], jsonrpc.RATE_LIMITED)
        self.assertIn("rate limit", body["error"]["message"])
        self.assertEqual(len(bridge.reactor.child.requests("tools/call")), 3)
        bridge.reactor.advance(1.0)
        status, _, body = bridge.exchange(
            "POST", "/servers/s/tools/echo", {}, {**POST_JSON, **bearer("t-all")}
        )
        self.assertEqual(status, 200, body)


# The tools of an endpoint's two members.
MEMBER_TOOLS = {
    "a": [ECHO, {"name": "drop", "inputSchema": {"type": "object"}}],
    "b": [ADD, {"name": "sum", "inputSchema": {"type": "object"}}],
}
TEAM_TOKENS = (
    TokenConfig("all", hash_token("t-all")),
    TokenConfig("adder", hash_token("t-adder"), frozenset({"a/echo", "b/add"})),
    TokenConfig("only-a", hash_token("t-only-a"), frozenset({"a"})),
)


class EndpointTests(SynchronousTestCase):
    """An endpoint of two fake servers: its tools under the names its
    tools/list shows, each call routed to its member."""

    def setUp(self) -> None:
        self.bridge = self.service()

    def service(self, **settings: Any) -> Service:
        member_settings = settings.pop("members", {})
        servers = {
            n: ServerConfig(name=n, command="fake", args=(n,), **member_settings.get(n, {}))
            for n in ("a", "b")
        }
        team = EndpointConfig(
            name="team",
            servers=("a", "b"),
            prefixes={"a": "a", "b": "bee"},
            rename={("b", "sum"): "total"},
            exclude=("a__drop",),
        )
        config = BridgeConfig(servers=servers, endpoints={"team": team}, **settings)
        return Service(self, config, on_spawn=self.dress)

    @staticmethod
    def dress(child: FakeChild) -> None:
        child.init_result = {**child.init_result, "capabilities": {"tools": {"listChanged": True}}}
        child.lists = {"tools/list": list(MEMBER_TOOLS[child.args[-1]])}

    def child(self, name: str) -> FakeChild:
        return [c for c in self.bridge.reactor.children if c.args[-1] == name and not c.exited][-1]

    def exchange(
        self, method: str, path: str, body: Any = None, token: str | None = None
    ) -> tuple[int, Any, Any]:
        headers = dict(POST_JSON)
        if token is not None:
            headers.update(bearer(token))
        return self.bridge.exchange(method, "/endpoints/team" + path, body, headers)

    def paths(self, token: str | None = None) -> list[str]:
        status, _, doc = self.exchange("GET", "/openapi.json", token=token)
        self.assertEqual(status, 200)
        validate(doc)
        return sorted(doc["paths"])

    def test_document(self) -> None:
        """The document names the tools as the endpoint shows them: prefixed,
        renamed, filtered; with each member's schemas."""
        status, _, doc = self.exchange("GET", "/openapi.json")
        self.assertEqual(status, 200)
        validate(doc)
        self.assertEqual(doc["servers"], [{"url": "/endpoints/team"}])
        self.assertEqual(doc["info"]["title"], "team: MCP tools")
        self.assertEqual(
            sorted(doc["paths"]), ["/tools/a__echo", "/tools/bee__add", "/tools/total"]
        )
        add = doc["paths"]["/tools/bee__add"]["post"]
        self.assertEqual(add["operationId"], "bee__add")
        self.assertEqual(
            add["requestBody"]["content"]["application/json"]["schema"], ADD["inputSchema"]
        )
        echo = doc["paths"]["/tools/a__echo"]["post"]["requestBody"]["content"]
        self.assertEqual(
            echo["application/json"]["schema"]["properties"]["item"]["$ref"],
            "#/paths/~1tools~1a__echo/post/requestBody/content/application~1json/schema/$defs/Item",
        )

    def test_calls(self) -> None:
        """Each call reaches its member under the member's own tool name."""
        serve(self.child("b"), {"add": {"content": [], "structuredContent": {"sum": 5}}})
        self.assertEqual(
            self.exchange("POST", "/tools/bee__add", {"a": 2, "b": 3})[::2], (200, {"sum": 5})
        )
        status, _, body = self.exchange("POST", "/tools/total", {"k": 1})
        self.assertEqual((status, body), (200, "{'k': 1}"))
        status, _, body = self.exchange("POST", "/tools/a__echo", {"text": "hi"})
        self.assertEqual((status, body), (200, "{'text': 'hi'}"))
        self.assertEqual(
            [m["params"]["name"] for m in self.child("b").requests("tools/call")], ["add", "sum"]
        )
        self.assertEqual(
            [m["params"]["arguments"] for m in self.child("a").requests("tools/call")],
            [{"text": "hi"}],
        )

    def test_refused(self) -> None:
        """A name the endpoint does not show (filtered, a member's own name,
        unknown) is 404, and arguments against the member's schema 422: no
        member sees those calls."""
        for shown in ("a__drop", "bee__sum", "sum", "a__nope", "zz__echo"):
            status, _, body = self.exchange("POST", f"/tools/{shown}", {})
            self.assertEqual(
                (status, body["error"]["message"]), (404, f"Not Found: unknown tool {shown!r}")
            )
        status, _, body = self.exchange("POST", "/tools/bee__add", {"a": "x", "b": 1})
        self.assertEqual(status, 422)
        self.assertIn("'bee__add'", body["error"]["message"])
        self.assertEqual(
            body["error"]["data"]["errors"],
            [{"path": "/a", "message": "'x' is not of type 'integer'"}],
        )
        self.assertEqual(self.child("a").requests("tools/call"), [])
        self.assertEqual(self.child("b").requests("tools/call"), [])

    def test_list_changed(self) -> None:
        """A member's list_changed: the next document shows its new tool, and
        it can be called."""
        self.assertNotIn("/tools/bee__late", self.paths())
        late = {"name": "late", "inputSchema": {"type": "object"}}
        child = self.child("b")
        child.lists["tools/list"] = [*MEMBER_TOOLS["b"], late]
        child.send(jsonrpc.notification("notifications/tools/list_changed"))
        self.assertIn("/tools/bee__late", self.paths())
        serve(child, {"late": {"content": [{"type": "text", "text": "late"}]}})
        status, _, body = self.exchange("POST", "/tools/bee__late", {})
        self.assertEqual((status, body), (200, "late"))

    def test_grants(self) -> None:
        """With auth, a client sees and calls only what its grants name, on
        each member."""
        self.bridge = self.service(auth=AuthConfig(tokens=TEAM_TOKENS))
        self.assertEqual(self.exchange("GET", "/openapi.json")[0], 401)
        self.assertEqual(self.paths("t-all"), ["/tools/a__echo", "/tools/bee__add", "/tools/total"])
        self.assertEqual(self.paths("t-adder"), ["/tools/a__echo", "/tools/bee__add"])
        self.assertEqual(self.paths("t-only-a"), ["/tools/a__echo"])
        self.assertEqual(self.exchange("POST", "/tools/total", {}, "t-adder")[0], 404)
        self.assertEqual(
            self.exchange("POST", "/tools/bee__add", {"a": 1, "b": 1}, "t-only-a")[0], 404
        )
        self.assertEqual(self.exchange("POST", "/tools/a__echo", {}, "t-only-a")[0], 200)
        self.assertEqual(self.child("b").requests("tools/call"), [])

    def test_member_limit(self) -> None:
        """A member's own rate limit refuses the calls routed to it (429),
        not those to the other member."""
        self.bridge = self.service(
            members={"b": {"limits": ServerLimits(per_principal=Bucket(1.0, 1))}},
            limits=LimitsConfig(per_principal=None, per_ip=None),
            auth=AuthConfig(tokens=TEAM_TOKENS),
        )
        self.assertEqual(self.exchange("POST", "/tools/total", {}, "t-all")[0], 200)
        status, _, body = self.exchange("POST", "/tools/total", {}, "t-all")
        self.assertEqual((status, body["error"]["code"]), (429, jsonrpc.RATE_LIMITED))
        self.assertIn("MCP server 'b'", body["error"]["message"])
        self.assertEqual(self.exchange("POST", "/tools/a__echo", {}, "t-all")[0], 200)
        self.assertEqual(len(self.child("b").requests("tools/call")), 1)


_names = st.one_of(
    st.from_regex(r"[A-Za-z0-9_.~-]{1,20}", fullmatch=True), st.text(min_size=0, max_size=8)
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
_schemas = st.recursive(
    st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(["object", "string", "integer", "array", "null", 7]),
            "description": st.text(max_size=10),
            "examples": st.lists(_json, max_size=2),
            "$ref": st.sampled_from(["#", "#/$defs/a", "#/properties/x", "other.json#/a"]),
        },
    ),
    lambda inner: st.fixed_dictionaries(
        {},
        optional={
            "properties": st.dictionaries(st.text(max_size=5), inner, max_size=3),
            "$defs": st.dictionaries(st.text(max_size=3), inner, max_size=2),
            "items": inner,
            "anyOf": st.lists(inner, min_size=1, max_size=2),
            "required": st.lists(st.text(max_size=3), max_size=2, unique=True),
        },
    ),
    max_leaves=6,
)
_tools = st.lists(
    st.fixed_dictionaries(
        {"name": _names},
        optional={
            "description": st.text(max_size=20),
            "title": st.text(max_size=10),
            "inputSchema": _schemas | _json,
            "outputSchema": _schemas | _json,
        },
    ),
    max_size=5,
)


class DocumentProperties(SynchronousTestCase):
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_tools, st.booleans())
    def test_valid(self, tools: list[dict[str, Any]], secured: bool) -> None:
        """Any tools, with any names and schemas, make a valid document: each
        tool whose name fits a path is one operation, named for it."""
        doc = openapi.document("s", "/servers/s", tools, secured)
        validate(doc)
        names = {t["name"] for t in tools if openapi.served(t["name"])}
        self.assertEqual(
            {op["post"]["operationId"] for op in doc["paths"].values()},
            names,
        )


class ArgumentCheckTests(SynchronousTestCase):
    def test_each_schema_by_its_own_rules(self) -> None:
        """Validators are kept per schema object: a new list's schema of the
        same tool (the same name, other rules) is not judged by the old one."""
        old = {"name": "t", "inputSchema": {"type": "object", "required": ["a"]}}
        new = {"name": "t", "inputSchema": {"type": "object", "required": ["b"]}}
        for _ in range(2):
            self.assertEqual(openapi.argument_errors(old, {"a": 1}), [])
            self.assertEqual(len(openapi.argument_errors(new, {"a": 1})), 1)
            self.assertEqual(openapi.argument_errors(new, {"b": 1}), [])
        new["inputSchema"] = {"type": "object"}  # a schema replaced in place
        self.assertEqual(openapi.argument_errors(new, {"a": 1}), [])
