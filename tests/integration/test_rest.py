"""The REST face against a real bridge and real children
(C{tests/fixtures/rest_fixture.py}): the document validates as OpenAPI 3.1,
a client driven by it calls the tools, schema errors give 422, auth and
grants apply, and a tool the child adds at run time appears; on an endpoint
of two servers too, called through a client that C{openapi-python-client}
generates from the bridge's live document."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
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
        + '[endpoints.team]\nservers = ["tools", "time"]\nexclude = ["time__ask"]\n'
        + 'rename."time/add" = "plus"\n'
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


class EndpointTests(SynchronousTestCase):
    """An endpoint of two servers: one document of both servers' tools under
    the endpoint's names, each call served by its server."""

    def setUp(self) -> None:
        self.bridge = h.start_bridge(self, config())

    def test_document_and_calls(self) -> None:
        """The document names both servers' tools as the endpoint shows them;
        each call reaches its server under the server's own name."""
        client = OpenAPIClient(self.bridge, "/endpoints/team", ALL)
        validate(client.document)
        self.assertEqual(client.document["servers"], [{"url": "/endpoints/team"}])
        self.assertEqual(
            sorted(client.operations()),
            [
                "plus",
                "time__fail",
                "time__greet",
                "time__grow",
                "tools__add",
                "tools__ask",
                "tools__fail",
                "tools__greet",
                "tools__grow",
            ],
        )
        self.assertEqual(client.call("tools__add", a=2, b=3), (200, {"sum": 5}))
        self.assertEqual(client.call("plus", a=4, b=5), (200, {"sum": 9}))
        self.assertEqual(client.call("time__greet", name="Ada"), (200, "Hello, Ada!"))
        status, body = client.call("plus", a="four")
        self.assertEqual(status, 422)
        self.assertEqual(len(body["error"]["data"]["errors"]), 2)
        adder = OpenAPIClient(self.bridge, "/endpoints/team", ADDER)
        self.assertEqual(sorted(adder.operations()), ["tools__add"])
        self.assertEqual(adder.call("tools__add", a=1, b=1), (200, {"sum": 2}))
        status, _, _ = h.http(
            "POST",
            self.bridge.url("/endpoints/team/tools/plus"),
            {"a": 1, "b": 1},
            headers={"Authorization": f"Bearer {ADDER}"},
        )
        self.assertEqual(status, 404)

    def test_list_changed(self) -> None:
        """A tool one server adds appears in the endpoint's document."""
        client = OpenAPIClient(self.bridge, "/endpoints/team", ALL)
        self.assertNotIn("time__grown", client.operations())
        self.assertEqual(client.call("time__grow"), (200, "grew"))

        def grown() -> bool:
            client.document = client.fetch()
            return "time__grown" in client.operations()

        h.wait_for(grown, 10, "the added tool in the endpoint's document")
        self.assertNotIn("tools__grown", client.operations())
        self.assertEqual(client.call("time__grown"), (200, "grown here"))

    def test_generated_client(self) -> None:
        """openapi-python-client generates a client package from the live
        document; its function for an operation calls the tool with the
        bearer token, and answers the tool's structured result, or the
        error model for a refusal."""
        status, _, body = h.http(
            "GET",
            self.bridge.url("/endpoints/team/openapi.json"),
            headers={"Authorization": f"Bearer {ALL}"},
        )
        self.assertEqual(status, 200)
        folder = Path(self.mktemp())
        folder.mkdir(parents=True)
        (folder / "openapi.json").write_bytes(body)
        package = folder / "team_client"
        bin_dir = Path(sys.executable).parent
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        generated = subprocess.run(
            [
                str(bin_dir / "openapi-python-client"),
                "generate",
                "--path",
                str(folder / "openapi.json"),
                "--output-path",
                str(package),
                "--meta",
                "none",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        self.assertEqual(generated.returncode, 0, generated.stdout + generated.stderr)
        sys.path.insert(0, str(folder))
        self.addCleanup(sys.path.remove, str(folder))
        self.addCleanup(_forget, "team_client")
        client_module = importlib.import_module("team_client.client")
        plus = importlib.import_module("team_client.api.default.plus")
        bodies = importlib.import_module("team_client.models")
        client = client_module.AuthenticatedClient(
            base_url=self.bridge.url("/endpoints/team"), token=ALL, timeout=30.0
        )
        with client:
            answer = plus.sync(client=client, body=bodies.PlusBody(a=20, b=22))
            self.assertEqual(answer.to_dict(), {"sum": 42})
            self.assertEqual(answer.sum_, 42)
            refused = plus.sync_detailed(client=client, body=bodies.PlusBody(a=1, b="two"))
            self.assertEqual(refused.status_code, 422)
            self.assertEqual(
                refused.parsed.error.message,
                "Unprocessable Content: the arguments do not match 'plus''s input schema",
            )
        anonymous = client_module.Client(base_url=self.bridge.url("/endpoints/team"))
        with anonymous:
            self.assertEqual(
                plus.sync_detailed(client=anonymous, body=bodies.PlusBody(a=1, b=1)).status_code,
                401,
            )


def _forget(package: str) -> None:
    """Unload a generated package (each test generates its own)."""
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[name]
