"""Aggregating endpoints, driven by the official MCP Python SDK (mcp 2.x).

One endpoint serves the built-in example server, mcp-server-time and
@modelcontextprotocol/server-everything at /endpoints/team/. The SDK lists
and calls tools over Streamable HTTP (session era and 2026-07-28) and over
HTTP+SSE, and each call must reach the child whose tool it names.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from . import harness as h

ENDPOINT = """
[endpoints.team]
servers = ["example", "time", "everything"]
prefix.everything = "ev"
exclude = ["example__uuid"]
"""


class AggregateTests(SynchronousTestCase):
    def setUp(self) -> None:
        config = (
            h.python_server_toml("example", ["-m", "mcptwist.example"])
            + h.time_toml()
            + h.everything_server_toml()
            + ENDPOINT
        )
        self.bridge = h.start_bridge(self, config)

    def sdk(self, transport: str, mode: str, *args: str) -> dict[str, Any]:
        path = "/endpoints/team/" + ("mcp" if transport == "http" else "sse")
        argv = ("--url", self.bridge.url(path), "--transport", transport, "--mode", mode, *args)
        result = h.run_client("sdk_client.py", *argv)
        if not result.get("ok"):
            raise AssertionError(
                f"{transport} ({mode}) failed: {json.dumps(result, indent=1)[:4000]}"
                f"\nbridge log:\n{self.bridge.log[-4000:]}"
            )
        return result

    def check(self, transport: str, mode: str) -> None:
        r = self.sdk(
            transport,
            mode,
            "list_and_call",
            "example__calculate",
            '{"expression": "6 * 7"}',
            "time__get_current_time",
            '{"timezone": "UTC"}',
            "ev__echo",
            '{"message": "hello endpoint"}',
            "example__uuid",
            "{}",
        )
        tools = r["tools"]
        # Complete and namespaced: every member's tools, under its prefix.
        self.assertIn("example__calculate", tools)
        self.assertIn("time__get_current_time", tools)
        self.assertIn("time__convert_time", tools)
        self.assertIn("ev__echo", tools)
        self.assertIn("ev__get-sum", tools)
        self.assertTrue(all(t.split("__")[0] in ("example", "time", "ev") for t in tools), tools)
        # The endpoint's exclude hides one tool, from the list and from calls.
        self.assertNotIn("example__uuid", tools)
        calculate, now, echo, hidden = r["calls"]
        self.assertEqual(calculate["texts"], ["42"])
        self.assertEqual(json.loads(now["texts"][0])["timezone"], "UTC")
        self.assertEqual(echo["texts"], ["Echo: hello endpoint"])
        self.assertEqual(hidden["error"]["code"], -32602)
        self.assertIn("Unknown tool: example__uuid", hidden["error"]["message"])

    def test_streamable_http(self) -> None:
        self.check("http", "legacy")

    def test_streamable_http_2026(self) -> None:
        self.check("http", "2026-07-28")

    def test_sse(self) -> None:
        self.check("sse", "legacy")

    def test_status(self) -> None:
        """/servers and /health show the endpoint and its members."""
        status, _, body = h.http("GET", self.bridge.url("/servers"))
        self.assertEqual(status, 200)
        [endpoint] = json.loads(body)["endpoints"]
        self.assertEqual(endpoint["name"], "team")
        self.assertEqual(
            [s["name"] for s in endpoint["servers"]], ["example", "time", "everything"]
        )
        health = h.wait_for(
            lambda: (lambda r: r if r[0] == 200 else None)(
                h.http("GET", self.bridge.url("/health"))
            ),
            30,
            "every member to run",
        )
        members = json.loads(health[2])["endpoints"]["team"]
        self.assertEqual(
            members, {"example": "running", "time": "running", "everything": "running"}
        )
