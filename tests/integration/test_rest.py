"""The REST face against a real bridge and a real child
(C{tests/fixtures/rest_fixture.py}): the document validates as OpenAPI 3.1,
a client driven by it calls the tools, schema errors give 422, auth and
grants apply, and a tool the child adds at run time appears."""

from __future__ import annotations

import json
from typing import Any

from openapi_spec_validator import validate
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.config.keys import digest_text
from mcptwist.security.auth import hash_token

from . import harness as h

FIXTURE = h.FIXTURES / "rest_fixture.py"
ALL = "rest-token-all-0123456789"
ADDER = "rest-token-adder-0123456789"
OTHER = "rest-token-other-0123456789"


def config() -> str:
    tokens = "".join(
        f'[[auth.tokens]]\nname = "{name}"\nhash = "{digest_text(hash_token(token))}"\n'
        f"servers = {json.dumps(servers)}\n"
        for name, token, servers in [
            ("all", ALL, ["tools", "time"]),
            ("adder", ADDER, ["tools/add"]),
            ("other", OTHER, ["time"]),
        ]
    )
    return (
        h.python_server_toml("tools", [str(FIXTURE)])
        + h.python_server_toml("time", [str(FIXTURE)])
        + tokens
    )


class OpenAPIClient:
    """What an OpenAPI tool server's client (Open WebUI's) does: fetch the
    document, find an operation by its operationId, and POST the arguments
    as JSON to the server URL plus the operation's path."""

    def __init__(self, bridge: h.Bridge, base: str, token: str) -> None:
        self.bridge = bridge
        self.base = base
        self.auth = {"Authorization": f"Bearer {token}"}
        self.document = self.fetch()

    def fetch(self) -> dict[str, Any]:
        status, _, body = h.http(
            "GET", self.bridge.url(self.base + "/openapi.json"), headers=self.auth
        )
        assert status == 200, (status, body)
        document: dict[str, Any] = json.loads(body)
        return document

    def operations(self) -> dict[str, str]:
        return {
            op["operationId"]: path
            for path, methods in self.document["paths"].items()
            for op in methods.values()
        }

    def call(self, operation_id: str, **arguments: Any) -> tuple[int, Any]:
        server = self.document["servers"][0]["url"]
        path = self.operations()[operation_id]
        status, _, body = h.http(
            "POST", self.bridge.url(server + path), arguments, headers=self.auth, timeout=30
        )
        return status, json.loads(body)


class RestTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.bridge = h.start_bridge(self, config())

    def test_document_and_calls(self) -> None:
        """The document validates, names each tool, and drives the calls."""
        client = OpenAPIClient(self.bridge, "/servers/tools", ALL)
        validate(client.document)
        self.assertEqual(sorted(client.operations()), ["add", "ask", "fail", "greet", "grow"])
        self.assertEqual(client.document["security"], [{"bearer": []}])
        self.assertEqual(client.call("add", a=2, b=3), (200, {"sum": 5}))
        self.assertEqual(client.call("greet", name="Ada"), (200, "Hello, Ada!"))
        status, body = client.call("fail")
        self.assertEqual((status, body["error"]["message"]), (500, "this tool always fails"))
        status, body = client.call("ask")
        self.assertEqual(status, 501)
        self.assertIn("elicitation/create", body["error"]["message"])

    def test_invalid(self) -> None:
        """Arguments against the schema: 422, each error named."""
        client = OpenAPIClient(self.bridge, "/servers/tools", ALL)
        status, body = client.call("add", a="two")
        self.assertEqual(status, 422)
        self.assertEqual(
            body["error"]["data"]["errors"],
            [
                {"path": "/", "message": "'b' is a required property"},
                {"path": "/a", "message": "'two' is not of type 'integer'"},
            ],
        )

    def test_auth(self) -> None:
        """No token: 401; a server not granted: 403; a tool not granted is
        neither listed nor callable (404)."""
        url = self.bridge.url("/servers/tools/tools/add")
        self.assertEqual(h.http("POST", url, {"a": 1, "b": 2})[0], 401)
        other = {"Authorization": f"Bearer {OTHER}"}
        self.assertEqual(h.http("POST", url, {"a": 1, "b": 2}, headers=other)[0], 403)
        self.assertEqual(
            h.http("GET", self.bridge.url("/servers/tools/openapi.json"), headers=other)[0], 403
        )
        adder = OpenAPIClient(self.bridge, "/servers/tools", ADDER)
        self.assertEqual(sorted(adder.operations()), ["add"])
        self.assertEqual(adder.call("add", a=1, b=1), (200, {"sum": 2}))
        status, _, _ = h.http(
            "POST",
            self.bridge.url("/servers/tools/tools/greet"),
            {},
            headers={"Authorization": f"Bearer {ADDER}"},
        )
        self.assertEqual(status, 404)

    def test_added_at_run_time(self) -> None:
        """A tool the child adds (and announces) appears in the document."""
        client = OpenAPIClient(self.bridge, "/servers/tools", ALL)
        self.assertNotIn("grown", client.operations())
        self.assertEqual(client.call("grow"), (200, "grew"))

        def grown() -> bool:
            client.document = client.fetch()
            return "grown" in client.operations()

        h.wait_for(grown, 10, "the added tool in the document")
        validate(client.document)
        self.assertEqual(client.call("grown"), (200, "grown here"))
