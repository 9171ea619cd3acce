"""What the admin API lets a caller do on a real bridge: it never starts a
program a request names, it is not served on an open listener without
authentication, its errors repeat no value of the bridge's environment, and
an admin token limited to some servers acts on those alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from mcptwist.config.keys import digest_text
from mcptwist.security.auth import hash_token

from ..support.messages import JSON_BODY
from . import harness as h

ADMIN = "mcpt_scoped_admin_secret_for_tests"
SECRET = "s3cr3t-in-the-bridge-environment"


def servers_toml() -> str:
    return h.python_server_toml("example", ["-m", "mcptwist.example"]) + h.python_server_toml(
        "other", ["-m", "mcptwist.example"]
    )


def commands_toml() -> str:
    return (
        "[admin.commands.example]\n"
        f"command = {h.toml_str(h.PYTHON)}\n"
        'args = ["-m", "mcptwist.example"]\n'
        f'env = {{ PYTHONPATH = {h.toml_str(str(h.SRC))}, PYTHONUNBUFFERED = "1" }}\n'
    )


class AdminPowerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.marker = Path(self.mktemp())

    def call(
        self, bridge: h.Bridge, method: str, path: str, body: Any = None, **headers: str
    ) -> tuple[int, dict[str, Any]]:
        status, _, content = h.http(method, bridge.url(path), body, {**JSON_BODY, **headers})
        return status, json.loads(content)

    def add_shell(self, bridge: h.Bridge, **headers: str) -> tuple[int, dict[str, Any]]:
        """The attack: ask the bridge to run a shell command as a new server."""
        table = {"command": "/bin/sh", "args": ["-c", f"touch {self.marker}"]}
        return self.call(
            bridge, "POST", "/admin/servers", {"name": "pwn", "config": table}, **headers
        )

    def test_open_listener_without_authentication_serves_no_admin_api(self) -> None:
        """insecure = true on every interface: the MCP servers are served,
        the admin API is not (a peer on the network would be an admin)."""
        bridge = h.start_bridge(
            self, "insecure = true\n" + servers_toml(), listen="tcp:0:interface=0.0.0.0"
        )
        for method, path in (("GET", "/admin/servers"), ("GET", "/admin/sessions")):
            status, body = self.call(bridge, method, path)
            self.assertEqual(status, 404, path)
            self.assertIn("only on loopback", body["error"]["message"])
        status, _ = self.add_shell(bridge)
        self.assertEqual(status, 404)
        self.assertEqual(self.call(bridge, "POST", "/admin/servers/example/stop")[0], 404)
        # Nor its status (stderr, command lines) or metrics: those need an operator.
        for path in ("/servers", "/servers/example", "/metrics"):
            self.assertEqual(h.http("GET", bridge.url(path))[0], 403, path)
        h.wait_for(lambda: h.http("GET", bridge.url("/health"))[0] == 200, 20, "a healthy bridge")
        self.assertFalse(self.marker.exists())

    def test_loopback_admin_chooses_only_configured_commands(self) -> None:
        """Adding servers is off until the file names commands; then a request
        chooses one, and can set neither program, arguments nor directory."""
        bridge = h.start_bridge(self, servers_toml())
        status, body = self.add_shell(bridge)
        self.assertEqual(status, 403)
        self.assertIn("[admin.commands", body["error"]["message"])
        bridge.stop()

        bridge = h.start_bridge(self, commands_toml() + servers_toml(), env={"SECRET": SECRET})
        status, body = self.add_shell(bridge)
        self.assertEqual((status, body["error"]["data"]["key"]), (422, "servers.pwn.args"))
        for table, key in (
            ({"command": "/bin/sh"}, "servers.pwn.command"),
            ({"command": "example", "cwd": "${SECRET}"}, "servers.pwn.cwd"),
            ({"command": "example", "env": {"X": "${SECRET}"}}, "servers.pwn.env"),
            ({"command": "example", "sharing": "${SECRET}"}, "servers.pwn.sharing"),
        ):
            status, _, content = h.http(
                "POST", bridge.url("/admin/servers"), {"name": "pwn", "config": table}, JSON_BODY
            )
            self.assertEqual(status, 422, table)
            self.assertEqual(json.loads(content)["error"]["data"]["key"], key)
            self.assertNotIn(SECRET.encode(), content)
        self.assertFalse(self.marker.exists())
        status, body = self.call(
            bridge,
            "POST",
            "/admin/servers",
            {"name": "added", "config": {"command": "example", "sharing": "session"}},
        )
        self.assertEqual((status, body["config"]["args"]), (201, ["-m", "mcptwist.example"]))

    def test_reload_error_names_the_variable_not_its_value(self) -> None:
        bridge = h.start_bridge(self, servers_toml(), env={"SECRET": SECRET})
        config = bridge.dir / "mcpbridge.toml"
        config.write_text(config.read_text() + '[servers.leak]\ncommand = "x"\ncwd = "${SECRET}"\n')
        status, _, content = h.http("POST", bridge.url("/admin/reload"), None, JSON_BODY)
        self.assertEqual(status, 422)
        self.assertIn(b"servers.leak.cwd", content)
        self.assertIn(b"${SECRET}", content)
        self.assertNotIn(SECRET.encode(), content)

    def test_admin_token_acts_only_on_its_servers(self) -> None:
        config = (
            "[[auth.tokens]]\n"
            'name = "ops"\n'
            f'hash = "{digest_text(hash_token(ADMIN))}"\n'
            'servers = ["example"]\n'
            "admin = true\n" + servers_toml()
        )
        bridge = h.start_bridge(self, config)
        auth = {"Authorization": f"Bearer {ADMIN}"}
        status, body = self.call(bridge, "GET", "/admin/servers", **auth)
        self.assertEqual((status, [s["name"] for s in body["servers"]]), (200, ["example"]))
        status, body = self.call(bridge, "GET", "/servers", **auth)
        self.assertEqual((status, [s["name"] for s in body["servers"]]), (200, ["example"]))
        for method, path in (
            ("GET", "/admin/servers/other"),
            ("GET", "/admin/servers/other/stderr"),
            ("POST", "/admin/servers/other/stop"),
            ("POST", "/admin/servers/other/restart"),
            ("DELETE", "/admin/servers/other"),
            ("POST", "/admin/reload"),
        ):
            self.assertEqual(self.call(bridge, method, path, **auth)[0], 403, path)
        bridge.headers = auth
        bridge.wait_state("example", "running")
        self.assertEqual(
            self.call(bridge, "POST", "/admin/servers/example/restart", **auth)[0], 200
        )
