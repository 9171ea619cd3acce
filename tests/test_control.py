"""The admin API's actions on a bridge over fake children."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from mcptwist import jsonrpc
from mcptwist.config import BridgeConfig, ConfigError, ServerConfig
from mcptwist.routing import CapacityError
from mcptwist.service import BridgeService

from .fakes import FakeProcessReactor


class ControlTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        servers = {
            "s": ServerConfig(name="s", command="fake"),
            "p": ServerConfig(name="p", command="fake", sharing="session"),
        }
        self.service = BridgeService(BridgeConfig(servers=servers), self.reactor, {})
        self.service.startService()
        self.addCleanup(self.stop)
        self.control = self.service.control

    def stop(self) -> None:
        if self.service.running:
            self.service.stopService()
            self.reactor.advance(10)

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
        self.result(
            self.control.add_server("e", {"command": "fake", "env": {"API_KEY": "secret-value"}})
        )
        status = self.control.server("e")
        self.assertEqual(status["config"]["env"], ["API_KEY"])  # type: ignore[index]
        self.assertNotIn("secret-value", jsonrpc.dumps(status).decode())

    def test_nothing_starts_while_stopping(self) -> None:
        self.service.stopService()
        self.assertRaises(RuntimeError, self.control.start, "s")
        self.assertRaises(RuntimeError, self.control.restart, "s")
        self.assertRaises(RuntimeError, self.control.add_server, "y", {"command": "fake"})


class AddedServerTests(SynchronousTestCase):
    def test_stderr_in_errors_follows_authentication(self) -> None:
        """A server added through the admin API of a bridge with authentication
        keeps its child's stderr from clients, unless its table says otherwise."""
        from mcptwist.auth import hash_token
        from mcptwist.config import AuthConfig, TokenConfig

        reactor = FakeProcessReactor()
        auth = AuthConfig(tokens=(TokenConfig("t", hash_token("mcpt_t")),))
        servers = {"s": ServerConfig(name="s", command="fake")}
        service = BridgeService(BridgeConfig(servers=servers, auth=auth), reactor, {})
        service.startService()
        self.addCleanup(lambda: (service.stopService(), reactor.advance(10)))
        service.control.add_server("x", {"command": "fake"})
        service.control.add_server("y", {"command": "fake", "stderr_in_errors": True})
        self.assertFalse(service.backends["x"].server.stderr_in_errors)
        self.assertTrue(service.backends["y"].server.stderr_in_errors)
