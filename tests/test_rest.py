"""The REST face of a server's tools: POST /servers/NAME/tools/TOOL and its
OpenAPI document, over fake children."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.config.model import AuthConfig, ServerConfig, TokenConfig
from mcptwist.mcp import jsonrpc
from mcptwist.security.auth import hash_token
from mcptwist.web import openapi
from tests.support.bridge import Bridge
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
