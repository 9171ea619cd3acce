"""The MCP Inspector CLI (v2) against the bridge, over Streamable HTTP and HTTP+SSE.

Exit codes of the Inspector CLI: 0 ok, 1 other errors, 3 auth, 4 unreachable,
5 tool isError or unknown tool. With C{--format json} it prints one line,
C{{"result": ...}}, on stdout; errors go to stderr as one JSON line.
"""

from __future__ import annotations

import json
import tempfile
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from . import harness as h


class InspectorTests(SynchronousTestCase):
    def setUp(self) -> None:
        h.require_node_tools(h.INSPECTOR_BIN, h.NODE22_BIN / "node")
        self.bridge = h.start_bridge(
            self,
            h.everything_server_toml()
            + h.python_server_toml("example", ["-m", "mcptwist.example"]),
        )
        self.home = tempfile.mkdtemp(prefix="mcptwist-inspector-home-")

    def inspector(self, url: str, transport: str, *args: str, expect_exit: int = 0) -> Any:
        result = h.run(
            [
                str(h.INSPECTOR_BIN),
                "--cli",
                url,
                "--transport",
                transport,
                *args,
                "--format",
                "json",
            ],
            timeout=60,
            env=h.node_env(self.home),
        )
        if result.returncode != expect_exit:
            raise AssertionError(
                f"inspector {args} over {transport} exited {result.returncode} (wanted {expect_exit})\n"
                f"stdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}\n"
                f"bridge log:\n{self.bridge.log[-3000:]}"
            )
        if expect_exit != 0:
            return json.loads(result.stderr.strip().splitlines()[-1]), result.stdout
        return json.loads(result.stdout.strip().splitlines()[-1])

    def url(self, name: str, transport: str) -> str:
        return self.bridge.mcp_url(name) if transport == "http" else self.bridge.sse_url(name)

    def check_server(self, transport: str) -> None:
        url = self.url("everything", transport)
        listed = self.inspector(url, transport, "--method", "tools/list")
        names = {t["name"] for t in listed["result"]["tools"]}
        self.assertTrue({"echo", "get-sum", "trigger-long-running-operation"} <= names, names)
        echo = self.inspector(
            url,
            transport,
            "--method",
            "tools/call",
            "--tool-name",
            "echo",
            "--tool-arg",
            f"message=hi over {transport}",
        )
        self.assertEqual(
            echo["result"]["content"], [{"type": "text", "text": f"Echo: hi over {transport}"}]
        )
        total = self.inspector(
            url,
            transport,
            "--method",
            "tools/call",
            "--tool-name",
            "get-sum",
            "--tool-args-json",
            '{"a": 19, "b": 23}',
        )
        self.assertEqual(total["result"]["content"][0]["text"], "The sum of 19 and 23 is 42.")

        url = self.url("example", transport)
        listed = self.inspector(url, transport, "--method", "tools/list")
        self.assertIn("calculate", {t["name"] for t in listed["result"]["tools"]})
        product = self.inspector(
            url,
            transport,
            "--method",
            "tools/call",
            "--tool-name",
            "calculate",
            "--tool-args-json",
            '{"expression": "6 * 7"}',
        )
        self.assertEqual(product["result"]["content"], [{"type": "text", "text": "42"}])
        # A tool error is exit 5, with the result still printed.
        error, stdout = self.inspector(
            url,
            transport,
            "--method",
            "tools/call",
            "--tool-name",
            "calculate",
            "--tool-args-json",
            '{"expression": "1 +"}',
            expect_exit=5,
        )
        self.assertEqual(error["error"]["code"], "tool_is_error")
        self.assertIn("Cannot evaluate expression", stdout)

    def test_streamable_http(self) -> None:
        self.check_server("http")

    def test_sse(self) -> None:
        self.check_server("sse")
