"""The admin API (through its command-line client) and /metrics on a real bridge."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.__main__ import main
from mcptwist.config.keys import digest_text
from mcptwist.security.auth import hash_token

from ..support.messages import INIT, JSON
from . import harness as h

ADMIN = "mcpt_operations_admin_token"
USER = "mcpt_operations_user_token"
CALL = {
    "jsonrpc": "2.0",
    "id": 2,
    "method": "tools/call",
    "params": {"name": "current_time", "arguments": {"timezone": "UTC"}},
}
# The example server, after seven lines on stderr.
NOISY = (
    "import runpy, sys\n"
    "for i in range(7): print(f'noisy line {i}', file=sys.stderr, flush=True)\n"
    "runpy.run_module('mcptwist.example', run_name='__main__')"
)


def config(audit: Path) -> str:
    return (
        f'[audit]\npath = "{audit}"\n'
        "[[auth.tokens]]\n"
        'name = "ops"\n'
        f'hash = "{digest_text(hash_token(ADMIN))}"\n'
        "admin = true\n"
        "[[auth.tokens]]\n"
        'name = "user"\n'
        f'hash = "{digest_text(hash_token(USER))}"\n'
        "[admin.commands.example]\n"
        f"command = {h.toml_str(h.PYTHON)}\n"
        'args = ["-m", "mcptwist.example"]\n'
        f'env = {{ PYTHONPATH = {h.toml_str(str(h.SRC))}, PYTHONUNBUFFERED = "1" }}\n'
        + h.python_server_toml("example", ["-m", "mcptwist.example"])
        + h.python_server_toml("perclient", ["-m", "mcptwist.example"], 'sharing = "session"\n')
        + h.python_server_toml("noisy", ["-c", NOISY])
    )


class OperationsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mcptwist-ops-"))
        self.audit = self.dir / "audit.jsonl"
        self.token_file = self.dir / "token"
        self.token_file.write_text(ADMIN + "\n")
        self.bridge = h.start_bridge(self, config(self.audit), directory=self.dir)
        self.bridge.headers = {"Authorization": f"Bearer {ADMIN}"}
        self.bridge.wait_state("example", "running")

    def admin(self, *args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = main(
            ["admin", "--url", self.bridge.base, "--token-file", str(self.token_file), *args],
            out,
            err,
        )
        return code, out.getvalue(), err.getvalue()

    def admin_json(self, *args: str) -> Any:
        code, out, err = self.admin("--json", *args)
        self.assertEqual(code, 0, err)
        return json.loads(out)

    def session(self, server: str = "example") -> dict[str, str]:
        headers = {**JSON, "Authorization": f"Bearer {USER}"}
        status, answer_headers, _ = h.http("POST", self.bridge.mcp_url(server), INIT, headers)
        self.assertEqual(status, 200)
        return {**headers, "Mcp-Session-Id": answer_headers["mcp-session-id"]}

    def call(self, headers: dict[str, str], server: str = "example") -> dict[str, Any]:
        _, answer_headers, raw = h.http("POST", self.bridge.mcp_url(server), CALL, headers)
        [answer] = h.jsonrpc_body(answer_headers, raw)
        return answer

    def test_stop_start_restart(self) -> None:
        pid = self.bridge.status("example")["pid"]
        code, out, _ = self.admin("servers")
        self.assertEqual(code, 0)
        self.assertIn("example", out)
        self.assertIn("running", out)
        user = self.session()
        stopped = self.admin_json("stop", "example")
        self.assertEqual(stopped["state"], "stopped")
        answer = self.call(user)
        self.assertEqual(answer["error"]["code"], -32000, answer)
        self.assertIn("is stopped", answer["error"]["message"])
        # A server stopped on purpose does not make the bridge unhealthy.
        self.assertEqual(h.http("GET", self.bridge.url("/health"))[0], 200)
        h.wait_for(lambda: pid not in self.bridge.children(), 10, "the stopped child to exit")
        self.admin_json("start", "example")
        running = self.bridge.wait_state("example", "running")
        self.assertNotEqual(running["pid"], pid)
        h.tool_text(self.call(self.session()))
        before = running["pid"]
        self.admin_json("restart", "example")
        after = self.bridge.wait_state("example", "running")
        self.assertNotEqual(after["pid"], before)
        actions = [
            (e["action"], e["target"], e["outcome"])
            for e in map(json.loads, self.audit.read_text().splitlines())
            if e["event"] == "admin_action"
        ]
        self.assertEqual(
            [a[:2] for a in actions],
            [("stop", "example"), ("start", "example"), ("restart", "example")],
        )
        self.assertEqual({a[2] for a in actions}, {"ok"})

    def test_sessions_listed_and_closed(self) -> None:
        user = self.session()
        [listed] = self.admin_json("sessions", "--server", "example")["sessions"]
        self.assertEqual(listed["id"], user["Mcp-Session-Id"])
        self.assertEqual(listed["principal"], "token:user")
        self.admin_json("close", listed["id"])
        status, _, _ = h.http("POST", self.bridge.mcp_url("example"), CALL, user)
        self.assertEqual(status, 404)

    def test_add_and_remove_a_server(self) -> None:
        table = self.dir / "extra.toml"
        table.write_text('[servers.extra]\ncommand = "example"\n')
        added = self.admin_json("add", "extra", "--config", str(table))
        self.assertEqual(added["name"], "extra")
        self.bridge.wait_state("extra", "running")
        h.tool_text(self.call(self.session("extra"), "extra"))
        self.admin_json("remove", "extra")
        status, _, _ = h.http(
            "POST", self.bridge.mcp_url("extra"), INIT, {**JSON, "Authorization": f"Bearer {ADMIN}"}
        )
        self.assertEqual(status, 404)
        code, _, err = self.admin("add", "example", "--config", str(table))
        self.assertEqual(code, 1)
        self.assertIn("exists", err)
        # A server added at run time brings its own address rules.
        table.write_text('allow = ["10.0.0.0/8"]\n')
        self.admin_json("add", "fenced", "--command", "example", "--config", str(table))
        status, _, _ = h.http(
            "POST", self.bridge.mcp_url("fenced"), INIT, {**JSON, "Authorization": f"Bearer {USER}"}
        )
        self.assertEqual(status, 403)

    def test_stderr_and_reload(self) -> None:
        self.bridge.wait_state("noisy", "running")
        lines = self.admin_json("stderr", "noisy", "-n", "5")
        self.assertEqual(lines["lines"], [f"noisy line {i}" for i in range(2, 7)])
        code, out, _ = self.admin("stderr", "noisy", "-n", "2")
        self.assertEqual((code, out.split()), (0, ["noisy", "line", "5", "noisy", "line", "6"]))
        result = self.admin_json("reload")
        self.assertTrue(result["ok"], result)
        self.assertIn("example", result["changes"]["servers"]["unchanged"])

    def test_sighup_reload_is_audited(self) -> None:
        import signal

        self.bridge.proc.send_signal(signal.SIGHUP)
        h.wait_for(lambda: "reload done" in self.bridge.log, 15, "the reload")

        def audited() -> list[dict[str, Any]]:
            events = map(json.loads, self.audit.read_text().splitlines())
            return [e for e in events if e["event"] == "admin_action"]

        [event] = h.wait_for(audited, 10, "the audit line")
        self.assertEqual(
            (event["principal"], event["action"], event["outcome"]), ("signal", "reload", "ok")
        )

    def test_not_for_a_user_token(self) -> None:
        self.token_file.write_text(USER)
        code, _, err = self.admin("servers")
        self.assertEqual(code, 1)
        self.assertIn("admin", err)

    def test_metrics(self) -> None:
        user = self.session()
        h.tool_text(self.call(user))
        h.http("GET", self.bridge.url("/"), headers={"Authorization": "Bearer wrong"})
        status, _, _ = h.http(
            "GET", self.bridge.url("/metrics"), headers={"Authorization": f"Bearer {USER}"}
        )
        self.assertEqual(status, 403)
        status, headers, body = h.http(
            "GET", self.bridge.url("/metrics"), headers=self.bridge.headers
        )
        self.assertEqual(status, 200)
        self.assertTrue(headers["content-type"].startswith("text/plain"))
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
        }

        def value(name: str, **labels: str) -> float:
            return samples.get((name, tuple(sorted(labels.items()))), 0.0)

        self.assertEqual(
            value("mcptwist_tool_calls_total", server="example", tool="current_time", status="ok"),
            1,
        )
        self.assertEqual(
            value("mcptwist_requests_total", server="example", method="tools/call", status="ok"), 1
        )
        self.assertEqual(value("mcptwist_child_state", server="example", state="running"), 1)
        self.assertEqual(value("mcptwist_sessions", server="example"), 1)
        self.assertEqual(value("mcptwist_auth_failures_total", reason="unknown token"), 1)
        self.assertGreaterEqual(value("mcptwist_child_spawns_total", server="example"), 1)
        self.assertGreaterEqual(
            value(
                "mcptwist_http_requests_total",
                server="example",
                route="mcp",
                method="POST",
                code="200",
            ),
            2,
        )
