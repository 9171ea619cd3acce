"""The admin API's actions on a bridge over fake children."""

from __future__ import annotations

import os
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from mcptwist.config.load import parse_config
from mcptwist.config.model import (
    AdminConfig,
    BridgeConfig,
    CommandConfig,
    ConfigError,
    ServerConfig,
)
from mcptwist.mcp import jsonrpc
from mcptwist.routing.upstream import CapacityError
from mcptwist.service.bridge import BridgeService

from .support.bridge import Service


class ControlTests(SynchronousTestCase):
    def setUp(self) -> None:
        servers = {
            "s": ServerConfig(name="s", command="fake"),
            "p": ServerConfig(name="p", command="fake", sharing="session"),
        }
        fake = CommandConfig(
            name="fake", command="fake", args=("--serve",), env={"API_KEY": "secret-value"}
        )
        config = BridgeConfig(servers=servers, admin=AdminConfig(commands={"fake": fake}))
        bridge = Service(self, config, {"SECRET": "from-the-environment"})
        self.reactor, self.service = bridge.reactor, bridge.service
        self.control = self.service.control

    def result(self, d: Any) -> Any:
        self.reactor.advance(0)
        return self.successResultOf(d)

    def test_stop_holds_until_started(self) -> None:
        pid = self.control.server("s")["pid"]  # type: ignore[index]
        status = self.result(self.control.stop("s"))
        self.assertEqual((status["state"], status["stopped_by_operator"]), ("stopped", True))
        self.assertEqual(self.service.backends["s"].state, "stopped")
        # A per-session server without sessions has no children, and is running.
        self.assertEqual(self.service.backends["p"].state, "running")
        self.assertEqual(self.control.server("p")["state"], "running")  # type: ignore[index]
        self.reactor.advance(60)  # no restart on its own
        self.assertEqual(self.control.server("s")["state"], "stopped")  # type: ignore[index]
        status = self.result(self.control.start("s"))
        self.reactor.advance(1)
        status = self.control.server("s")
        assert status is not None
        self.assertEqual(status["state"], "running")
        self.assertNotEqual(status["pid"], pid)
        self.assertFalse(status["stopped_by_operator"])

    def test_stopped_per_session_server_refuses_sessions(self) -> None:
        self.result(self.control.stop("p"))
        with self.assertRaises(CapacityError):
            self.service.registry.create(self.service.backends["p"], "sse", lambda _: None)  # type: ignore[arg-type, return-value]

    def test_add_and_remove(self) -> None:
        with self.assertRaises(ValueError):
            self.control.add_server("s", {"command": "fake"})
        error = self.assertRaises(
            ConfigError, self.control.add_server, "x", {"command": "fake", "bogus": 1}
        )
        self.assertEqual(error.key, "servers.x.bogus")
        # The only check of the name: the admin API leaves it to parse_server.
        error = self.assertRaises(
            ConfigError, self.control.add_server, "bad name", {"command": "fake"}
        )
        self.assertEqual(error.key, "servers.bad name")
        self.assertIn("letters, digits", error.fix)
        status = self.result(self.control.add_server("x", {"command": "fake"}))
        self.assertTrue(status["added_at_runtime"])
        self.assertIn("x", self.service.backends)
        self.result(self.control.remove_server("x"))
        self.assertNotIn("x", self.service.backends)
        self.assertRaises(KeyError, self.control.remove_server, "x")

    def test_status_hides_environment_values(self) -> None:
        self.result(self.control.add_server("e", {"command": "fake"}))
        status = self.control.server("e")
        self.assertEqual(status["config"]["env"], ["API_KEY"])  # type: ignore[index]
        self.assertNotIn("secret-value", jsonrpc.dumps(status).decode())

    def test_a_request_runs_only_what_the_configuration_names(self) -> None:
        """The request chooses one of [admin.commands]; the child runs that
        entry's program, arguments and environment, and the request's other
        settings (here: sharing) apply."""
        before = len(self.reactor.children)
        status = self.result(self.control.add_server("x", {"command": "fake", "sharing": "shared"}))
        self.assertEqual(status["config"]["command"], "fake")
        self.assertEqual(status["config"]["args"], ["--serve"])
        [child] = self.reactor.children[before:]
        self.assertEqual(child.args[-2:], ["fake", "--serve"])
        self.assertEqual(child.env["API_KEY"], "secret-value")

    def test_a_request_cannot_name_a_program(self) -> None:
        """No executable, argument, environment or directory comes from HTTP."""
        for table, key in (
            ({"command": "/bin/sh"}, "servers.x.command"),
            ({"command": "sh", "args": ["-c", "id"]}, "servers.x.args"),
            ({"args": ["x"]}, "servers.x.args"),
            ({"command": "fake", "args": ["-c", "id"]}, "servers.x.args"),
            ({"command": "fake", "env": {"LD_PRELOAD": "/tmp/x.so"}}, "servers.x.env"),
            ({"command": "fake", "env_passthrough": ["HOME"]}, "servers.x.env_passthrough"),
            ({"command": "fake", "cwd": "/"}, "servers.x.cwd"),
            ({}, "servers.x.command"),
        ):
            error = self.assertRaises(ConfigError, self.control.add_server, "x", table)
            self.assertEqual(error.key, key, table)
            self.assertNotIn("/bin/sh", str(error))
        self.assertNotIn("x", self.service.backends)

    def test_nothing_from_a_request_is_expanded(self) -> None:
        """${VAR} over HTTP stays as it is: no value of the bridge's
        environment can come back in an error."""
        error = self.assertRaises(
            ConfigError, self.control.add_server, "x", {"command": "fake", "sharing": "${SECRET}"}
        )
        self.assertEqual(error.key, "servers.x.sharing")
        self.assertIn("${SECRET}", str(error))
        self.assertNotIn("from-the-environment", str(error))

    def test_adding_is_off_without_commands(self) -> None:
        service = BridgeService(
            BridgeConfig(servers={"s": ServerConfig(name="s", command="fake")}), self.reactor, {}
        )
        service.startService()
        self.addCleanup(service.stopService)
        error = self.assertRaises(
            PermissionError, service.control.add_server, "x", {"command": "fake"}
        )
        self.assertIn("[admin.commands", str(error))
        self.assertNotIn("x", service.backends)

    def test_status_shows_what_runs_as_written(self) -> None:
        """A program, argument or directory written with ${VAR} is shown so:
        the value the bridge's environment gave it may be a secret. The child
        runs with the value."""
        directory = self.mktemp()
        os.makedirs(directory)
        doc = {
            "servers": {"k": {"command": "${BIN}", "args": ["--key=${KEY}"], "cwd": "${DIR}"}},
            "admin": {"commands": {"gh": {"command": "gh", "args": ["--token", "${KEY}"]}}},
        }
        environ = {"BIN": "fake", "KEY": "s3cr3t-key-value", "DIR": directory}
        config = parse_config(doc, "bridge.toml", environ)
        service = BridgeService(config, self.reactor, environ)
        service.startService()
        self.addCleanup(service.stopService)
        status = service.control.server("k")
        assert status is not None
        self.assertEqual(
            (status["config"]["command"], status["config"]["args"], status["config"]["cwd"]),
            ("${BIN}", ["--key=${KEY}"], "${DIR}"),
        )
        added = self.result(service.control.add_server("n", {"command": "gh"}))
        self.assertEqual(added["config"]["args"], ["--token", "${KEY}"])
        shown = jsonrpc.dumps([service.control.servers(), added]).decode()
        self.assertNotIn("s3cr3t-key-value", shown)
        self.assertIn("--key=s3cr3t-key-value", self.reactor.children[-2].args)

    def test_nothing_starts_while_stopping(self) -> None:
        self.service.stopService()
        self.assertRaises(RuntimeError, self.control.start, "s")
        self.assertRaises(RuntimeError, self.control.restart, "s")
        self.assertRaises(RuntimeError, self.control.add_server, "y", {"command": "fake"})


class AdminSwitchTests(SynchronousTestCase):
    """[admin] enabled = false: nothing under /admin is served, to anyone."""

    def status(self, enabled: bool) -> int:
        config = BridgeConfig(
            servers={"s": ServerConfig(name="s", command="fake")},
            admin=AdminConfig(enabled=enabled),
        )
        code: int = Service(self, config).request("GET", "/admin/servers").code
        return code

    def test_off(self) -> None:
        self.assertEqual(self.status(True), 200)
        self.assertEqual(self.status(False), 404)


class AddedServerTests(SynchronousTestCase):
    def test_stderr_in_errors_follows_authentication(self) -> None:
        """A server added through the admin API of a bridge with authentication
        keeps its child's stderr from clients, unless its table says otherwise."""
        from mcptwist.config.model import AuthConfig, TokenConfig
        from mcptwist.security.auth import hash_token

        auth = AuthConfig(tokens=(TokenConfig("t", hash_token("mcpt_t")),))
        servers = {"s": ServerConfig(name="s", command="fake")}
        admin = AdminConfig(commands={"fake": CommandConfig("fake", "fake")})
        service = Service(self, BridgeConfig(servers=servers, auth=auth, admin=admin)).service
        service.control.add_server("x", {"command": "fake"})
        service.control.add_server("y", {"command": "fake", "stderr_in_errors": True})
        self.assertFalse(service.backends["x"].server.stderr_in_errors)
        self.assertTrue(service.backends["y"].server.stderr_in_errors)
