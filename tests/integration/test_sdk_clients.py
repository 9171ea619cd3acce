"""The official MCP Python SDK (mcp 2.x) as a client of the bridge.

Each test starts a bridge, then runs C{clients/sdk_client.py} (asyncio, in
its own process) over Streamable HTTP and over HTTP+SSE, and checks the JSON
it prints.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from . import harness as h

# server-everything's simulated log lines, e.g. "Info-level message".
SIMULATED_LOG = re.compile(r"-level message|level-message")

TRANSPORTS = ("http", "sse")


def time_toml() -> str:
    if not (h.BIN / "mcp-server-time").exists():
        message = (
            f"mcp-server-time is not installed next to {h.PYTHON} (pip install mcp-server-time)"
        )
        if os.environ.get("CI"):
            raise AssertionError("CI is set but " + message)
        raise SkipTest(message)
    return (
        "[servers.time]\n"
        f"command = {h.toml_str(str(h.BIN / 'mcp-server-time'))}\n"
        'args = ["--local-timezone", "UTC"]\n'
    )


class SDKTestMixin:
    bridge: h.Bridge

    def sdk(
        self, name: str, transport: str, scenario: str, *args: str, mode: str = "legacy"
    ) -> dict[str, Any]:
        url = self.bridge.mcp_url(name) if transport == "http" else self.bridge.sse_url(name)
        result = h.run_client(
            "sdk_client.py", "--url", url, "--transport", transport, "--mode", mode, scenario, *args
        )
        if not result.get("ok"):
            raise AssertionError(
                f"{scenario} over {transport} ({mode}) failed: {json.dumps(result, indent=1)[:6000]}"
                f"\nbridge log:\n{self.bridge.log[-4000:]}"
            )
        return result


class ExampleServerTests(SDKTestMixin, SynchronousTestCase):
    """The built-in example server: no --config, only --listen."""

    def setUp(self) -> None:
        self.bridge = h.start_bridge(self, config=None)

    def check_example(self, r: dict[str, Any]) -> None:
        self.assertEqual(r["protocol_version"], "2025-11-25")
        self.assertEqual(r["server_name"], "mcptwist-example")
        self.assertEqual(
            r["tools"],
            ["calculate", "convert_time", "current_time", "decode", "encode", "hash_text", "uuid"],
        )
        self.assertEqual(r["calculate"], {"is_error": False, "texts": ["24.5"], "structured": None})
        self.assertTrue(r["calculate_bad"]["is_error"])
        self.assertIn("Cannot evaluate expression", r["calculate_bad"]["texts"][0])
        self.assertEqual(r["hash_text"]["texts"], [hashlib.sha256(b"abc").hexdigest()])
        uuids = r["uuid"]["texts"][0].split("\n")
        self.assertEqual(len(uuids), 3)
        for u in uuids:
            self.assertRegex(
                u, r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
            )
        self.assertEqual(r["encode"]["texts"], ["aMOpbGxv"])
        self.assertEqual(r["decode"]["texts"], ["héllo"])
        self.assertFalse(r["current_time"]["is_error"])
        self.assertEqual(r["current_time"]["structured"]["timezone"], "UTC")
        self.assertTrue(r["current_time"]["structured"]["datetime"].endswith("+00:00"))
        # An unknown tool is a JSON-RPC error from this server (the SDK raises).
        self.assertEqual(r["unknown_tool"]["code"], -32602)

    def test_streamable_http(self) -> None:
        self.check_example(self.sdk("example", "http", "example"))

    def test_sse(self) -> None:
        self.check_example(self.sdk("example", "sse", "example"))

    def test_auto_mode_falls_back_to_initialize(self) -> None:
        """mode="auto" probes server/discover first; the bridge's answer makes it initialize."""
        for transport in TRANSPORTS:
            r = self.sdk("example", transport, "example", mode="auto")
            self.check_example(r)
            self.assertTrue(r["initialize_result"], transport)
            self.assertFalse(r["discover_result"], transport)

    def test_status_after_clients(self) -> None:
        """GET /servers reports the example child; sessions are gone once clients close."""
        self.sdk("example", "http", "info")
        self.sdk("example", "sse", "info")
        status, body = self.bridge.get_json("/servers")
        self.assertEqual(status, 200)
        [server] = body["servers"]
        self.assertEqual(server["name"], "example")
        self.assertEqual(server["state"], "running")
        self.assertEqual(server["restarts"], 0)
        self.assertIsInstance(server["pid"], int)
        self.assertIn(server["pid"], self.bridge.children())
        h.wait_for(
            lambda: self.bridge.status("example")["sessions"] == 0, 10, "sessions to be closed"
        )
        status, health = self.bridge.get_json("/health")
        self.assertEqual((status, health["status"]), (200, "ok"))


class TimeServerTests(SDKTestMixin, SynchronousTestCase):
    """mcp-server-time (a Python SDK server that is also 2026-capable)."""

    def setUp(self) -> None:
        self.bridge = h.start_bridge(self, time_toml())

    def check_time(self, r: dict[str, Any]) -> None:
        self.assertEqual(r["protocol_version"], "2025-11-25")
        self.assertEqual(r["server_name"], "mcp-time")
        self.assertEqual(r["tools"], ["convert_time", "get_current_time"])
        now = r["get_current_time"]
        self.assertFalse(now["is_error"])
        self.assertEqual(now["structured"]["timezone"], "UTC")
        self.assertEqual(json.loads(now["texts"][0])["timezone"], "UTC")
        converted = r["convert_time"]["structured"]
        self.assertEqual(converted["time_difference"], "+9.0h")
        self.assertRegex(converted["target"]["datetime"], r"T21:00:00\+09:00$")
        self.assertTrue(r["bad_timezone"]["is_error"])
        self.assertIn("Invalid timezone", r["bad_timezone"]["texts"][0])

    def test_streamable_http(self) -> None:
        self.check_time(self.sdk("time", "http", "time"))

    def test_sse(self) -> None:
        self.check_time(self.sdk("time", "sse", "time"))

    def test_auto_mode(self) -> None:
        """The child itself speaks 2026-07-28, but the bridge serves the handshake era."""
        for transport in TRANSPORTS:
            r = self.sdk("time", transport, "time", mode="auto")
            self.check_time(r)
            self.assertTrue(r["initialize_result"], transport)
            self.assertFalse(r["discover_result"], transport)


class EverythingServerTests(SDKTestMixin, SynchronousTestCase):
    """@modelcontextprotocol/server-everything over stdio."""

    def setUp(self) -> None:
        self.bridge = h.start_bridge(self, h.everything_server_toml())

    def check_everything(self, r: dict[str, Any]) -> None:
        self.assertEqual(r["protocol_version"], "2025-11-25")
        self.assertEqual(r["server_name"], "mcp-servers/everything")
        for tool in (
            "echo",
            "get-sum",
            "trigger-long-running-operation",
            "toggle-simulated-logging",
            # Registered only because the bridge declares these client capabilities.
            "trigger-sampling-request",
            "trigger-elicitation-request",
        ):
            self.assertIn(tool, r["tools"])
        self.assertEqual(r["echo"]["texts"], ["Echo: hello bridge"])
        self.assertEqual(r["get_sum"]["texts"], ["The sum of 2 and 40 is 42."])
        # Sampling: the server asked this client, through the bridge.
        self.assertEqual(
            r["seen"]["sampling"], ["Resource trigger-sampling-request context: hello sampler"]
        )
        self.assertFalse(r["sampling"]["is_error"])
        self.assertIn('"text": "sampled-by-test"', r["sampling"]["texts"][0])
        self.assertIn('"model": "test-model"', r["sampling"]["texts"][0])
        # Elicitation.
        self.assertEqual(len(r["seen"]["elicitation"]), 1)
        self.assertFalse(r["elicitation"]["is_error"])
        joined = "\n".join(r["elicitation"]["texts"])
        self.assertIn("User provided the requested information", joined)
        self.assertIn("Name: Ada", joined)
        self.assertIn("Email: ada@example.com", joined)
        # Progress: four steps, in order, with this client's token restored.
        self.assertEqual(
            r["long_running"]["texts"],
            ["Long running operation completed. Duration: 1 seconds, Steps: 4."],
        )
        self.assertEqual(
            r["progress"], [[1.0, 4.0, None], [2.0, 4.0, None], [3.0, 4.0, None], [4.0, 4.0, None]]
        )
        self.assertEqual(r["seen"]["notifications"].count("notifications/progress"), 4)
        # Logging: the first simulated message arrives at once.
        simulated = [(lv, d) for lv, d in r["seen"]["logs"] if SIMULATED_LOG.search(str(d))]
        self.assertTrue(simulated, f"no simulated log message among {r['seen']['logs']}")
        level, _ = simulated[0]
        self.assertIn(
            level, ["debug", "info", "notice", "warning", "error", "critical", "alert", "emergency"]
        )
        self.assertIn("notifications/message", r["seen"]["notifications"])
        self.assertIn("Started simulated", r["toggle_logging"]["texts"][0])
        self.assertIn("Stopped simulated", r["toggle_logging_off"]["texts"][0])
        # A JSON-RPC error from the child reaches the client as one.
        self.assertEqual(r["bad_resource"]["code"], -32602)
        self.assertIn("not found", r["bad_resource"]["message"])

    def test_streamable_http(self) -> None:
        self.check_everything(self.sdk("everything", "http", "everything"))

    def test_sse(self) -> None:
        self.check_everything(self.sdk("everything", "sse", "everything"))

    def test_auto_mode(self) -> None:
        for transport in TRANSPORTS:
            r = self.sdk(
                "everything", transport, "call", "echo", '{"message": "auto"}', mode="auto"
            )
            self.assertEqual(r["protocol_version"], "2025-11-25")
            self.assertTrue(r["initialize_result"])
            self.assertFalse(r["discover_result"])
            self.assertEqual(r["call"]["texts"], ["Echo: auto"])


class SessionSharingTests(SDKTestMixin, SynchronousTestCase):
    """sharing = "session": a child per session, stopped when the session ends."""

    def setUp(self) -> None:
        self.bridge = h.start_bridge(
            self,
            h.everything_server_toml(
                "everything", 'sharing = "session"\nterm_after = 0.5\nkill_after = 1\n'
            ),
        )

    def test_child_per_session(self) -> None:
        for transport in TRANSPORTS:
            self.check_session_child(transport)

    def check_session_child(self, transport: str) -> None:
        r = self.sdk("everything", transport, "everything")
        self.assertEqual(r["echo"]["texts"], ["Echo: hello bridge"])
        self.assertEqual(len(r["seen"]["sampling"]), 1)
        self.assertEqual(len(r["seen"]["elicitation"]), 1)
        self.assertEqual(len(r["progress"]), 4)
        # Once the client has gone, its child is stopped and reaped.
        h.wait_for(
            lambda: self.bridge.status("everything")["children"] == [],
            10,
            "the session's child to be stopped",
        )
        h.wait_for(lambda: not self.bridge.children(), 10, "no child process left")
        self.bridge.assert_no_zombies()

    def test_roots(self) -> None:
        """The child asks for roots during a call; the bridge asks this client."""
        for transport in TRANSPORTS:
            r = self.sdk("everything", transport, "roots")
            self.assertFalse(r["roots"]["is_error"], r)
            self.assertIn("file:///tmp/mcptwist-root", r["roots"]["texts"][0])
            self.assertIn("roots/list", r["seen"].get("roots", []))
