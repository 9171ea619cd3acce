"""Children that die, never start, talk garbage or will not stop.

The fixture C{stdio_fixture.py} (standard library only) provides a slow tool,
garbage on stdout, a grandchild, and a child that ignores SIGTERM and EOF.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from . import harness as h
from .fault_support import FAST_RESTART, PROMPT, FaultTestMixin, url_for

FIXTURE = str(h.FIXTURES / "stdio_fixture.py")
ACCEPT = {"Accept": "application/json, text/event-stream"}
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 7,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "1"},
    },
}


def fixture_toml(name: str, *options: str, extra: str = "") -> str:
    return h.python_server_toml(name, [FIXTURE, *options], extra) + FAST_RESTART.format(name=name)


class ChildKilledTests(FaultTestMixin, SynchronousTestCase):
    """SIGKILL the child in the middle of a call."""

    def setUp(self) -> None:
        self.bridge = h.start_bridge(
            self,
            fixture_toml("slow")
            + h.everything_server_toml("everything")
            + FAST_RESTART.format(name="everything"),
        )

    def kill_mid_call(self, name: str, transport: str, tool: str, args: Any) -> None:
        before = self.bridge.status(name)
        old_pid = before["pid"]
        proc = self.start_call(name, transport, tool, args)
        self.wait_in_flight(name, proc)
        killed_at = time.time()
        os.kill(old_pid, signal.SIGKILL)
        result = self.finish(proc)
        # The caller gets a JSON-RPC error, promptly, naming what happened.
        self.assertIn("call_error", result, f"expected an error, got {result}")
        error = result["call_error"]
        self.assertIsInstance(error["code"], int)
        self.assertIn("killed by SIGKILL", error["message"])
        self.assertIn(name, error["message"])
        self.assertLess(result["ended"] - killed_at, PROMPT, "the error came too late")
        # The child is restarted: a new pid, one more restart, running again.
        after = self.bridge.wait_state(name, "running")
        h.wait_for(lambda: self.bridge.status(name)["pid"] not in (None, old_pid), 10, "a new pid")
        after = self.bridge.status(name)
        self.assertEqual(after["restarts"], before["restarts"] + 1)
        self.assertEqual(after["last_exit"], "killed by SIGKILL")
        self.assertNotEqual(after["pid"], old_pid)
        # The dead child was reaped: gone, not a zombie.
        h.wait_for(lambda: h.process_state(old_pid) is None, 5, f"pid {old_pid} to be reaped")
        self.bridge.assert_no_zombies()
        # The next call works, on the new child.
        again = self.call(name, transport, "echo", {"message": "again"})
        self.assertEqual(again["call"]["texts"], ["Echo: again"])

    def test_fixture_streamable_http(self) -> None:
        self.kill_mid_call("slow", "http", "sleep", {"seconds": 30})
        self.assertEqual(self.bridge.status("slow")["restarts"], 1)

    def test_fixture_sse(self) -> None:
        self.kill_mid_call("slow", "sse", "sleep", {"seconds": 30})
        self.assertEqual(self.bridge.status("slow")["restarts"], 1)

    def test_everything_long_running_operation(self) -> None:
        args = {"duration": 30, "steps": 30}
        self.kill_mid_call("everything", "http", "trigger-long-running-operation", args)
        self.assertEqual(self.bridge.status("everything")["restarts"], 1)
        self.kill_mid_call("everything", "sse", "trigger-long-running-operation", args)
        self.assertEqual(self.bridge.status("everything")["restarts"], 2)


class GrandchildTests(FaultTestMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.bridge = h.start_bridge(self, fixture_toml("parent", "--grandchild"))

    def test_grandchild_dies_with_the_child(self) -> None:
        """The child's process group goes with it: no orphaned grandchild."""
        child, grandchild = map(
            int, self.call("parent", "http", "pid", {})["call"]["texts"][0].split()
        )
        self.assertEqual(child, self.bridge.status("parent")["pid"])
        self.assertEqual(h.process_state(grandchild) not in (None, "Z"), True)
        os.kill(child, signal.SIGKILL)
        h.wait_for(
            lambda: h.process_state(grandchild) in (None, "Z") and h.process_state(child) is None,
            8,
            f"grandchild {grandchild} to be killed with its parent {child}",
        )
        self.bridge.wait_state("parent", "running")
        new_child, new_grandchild = map(
            int, self.call("parent", "http", "pid", {})["call"]["texts"][0].split()
        )
        self.assertNotEqual(new_child, child)
        self.assertIn(new_grandchild, self.bridge.children())


class MissingCommandTests(FaultTestMixin, SynchronousTestCase):
    """A command that does not exist: crash loop, then failed; the rest keeps working."""

    COMMAND = "/nonexistent/mcp-server-that-does-not-exist"

    def setUp(self) -> None:
        self.bridge = h.start_bridge(
            self,
            f'[servers.broken]\ncommand = {h.toml_str(self.COMMAND)}\nargs = ["--flag"]\n'
            + FAST_RESTART.format(name="broken")
            + h.python_server_toml("example", ["-m", "mcptwist.example"]),
        )

    def test_failed_server(self) -> None:
        status = self.bridge.wait_state("broken", "failed", timeout=20)
        self.assertIsNone(status["pid"])
        self.assertEqual(status["restarts"], 2)  # crash_limit 3: three attempts
        self.assertTrue(
            any("No such file or directory" in line for line in status["stderr"]), status
        )
        # /health is 503 and names the failed server (and only it).
        code, _, body = h.http("GET", self.bridge.url("/health"))
        health = json.loads(body)
        self.assertEqual(code, 503)
        self.assertEqual(health["status"], "unhealthy")
        self.assertEqual(list(health["servers"]), ["broken"])
        self.assertIn("failed", health["servers"]["broken"])
        # Clients get a JSON-RPC error that says what is wrong.
        for transport in ("http", "sse"):
            result = h.run_client(
                "sdk_client.py",
                "--url",
                url_for(self.bridge, "broken", transport),
                "--transport",
                transport,
                "--read-timeout",
                "10",
                "info",
            )
            self.assertFalse(result["ok"], result)
            error = result["error"]
            self.assertIsInstance(error["code"], int, f"not a JSON-RPC error: {error}")
            self.assertIn("broken", error["message"])
            self.assertIn("failed", error["message"])
            self.assertIn("No such file or directory", error["message"])
        # Raw: initialize gets a JSON-RPC error (not a hang, not a 5xx page).
        code, headers, body = h.http("POST", self.bridge.mcp_url("broken"), INITIALIZE, ACCEPT)
        [message] = h.jsonrpc_body(headers, body)
        self.assertEqual(message["id"], 7)
        self.assertIn(self.COMMAND, message["error"]["message"])
        # The bridge is still up and the other server works.
        self.assertIsNone(self.bridge.proc.poll())
        result = h.run_client(
            "sdk_client.py",
            "--url",
            self.bridge.mcp_url("example"),
            "--transport",
            "http",
            "call",
            "calculate",
            '{"expression": "6 * 7"}',
        )
        self.assertEqual(result["call"]["texts"], ["42"])
        self.assertEqual(self.bridge.status("example")["state"], "running")
        # No child of the broken server is left over.
        self.assertEqual(list(self.bridge.children()), [self.bridge.status("example")["pid"]])


class GarbageTests(FaultTestMixin, SynchronousTestCase):
    """A child that prints junk lines on stdout between valid messages."""

    def setUp(self) -> None:
        self.bridge = h.start_bridge(self, fixture_toml("noisy", "--garbage"))

    def test_garbage_is_skipped(self) -> None:
        pid = self.bridge.status("noisy")["pid"]
        for transport in ("http", "sse"):
            result = self.call("noisy", transport, "echo", {"message": "through the noise"})
            self.assertEqual(result["call"]["texts"], ["Echo: through the noise"])
        result = h.run_client(
            "concurrent_clients.py",
            "--base",
            self.bridge.base,
            "--server",
            "noisy",
            "--tool",
            "echo",
            "--transport",
            "mixed",
            "--clients",
            "10",
            "--calls",
            "5",
        )
        self.assertEqual(result["bad"], [])
        self.assertEqual(result["answers"], 50)
        status = self.bridge.status("noisy")
        self.assertEqual((status["state"], status["restarts"], status["pid"]), ("running", 0, pid))
        self.assertIn("skipped a stdout line that is not JSON-RPC", self.bridge.log)


class TimeoutTests(FaultTestMixin, SynchronousTestCase):
    """request_timeout on the bridge, and a client that gives up by itself."""

    def setUp(self) -> None:
        self.bridge = h.start_bridge(
            self,
            fixture_toml("slow", extra="request_timeout = 1\n") + fixture_toml("patient"),
        )

    def test_bridge_request_timeout(self) -> None:
        pid = self.bridge.status("slow")["pid"]
        for transport in ("http", "sse"):
            result = self.call("slow", transport, "sleep", {"seconds": 5})
            error = result.get("call_error")
            self.assertIsNotNone(error, result)
            self.assertIn("timed out", error["message"])
            self.assertLess(result["ended"] - result["started"], 3)
            again = self.call("slow", transport, "echo", {"message": "still here"})
            self.assertEqual(again["call"]["texts"], ["Echo: still here"])
        status = self.bridge.status("slow")
        self.assertEqual((status["pid"], status["restarts"]), (pid, 0))

    def test_client_gives_up(self) -> None:
        """The SDK's own timeout (it sends notifications/cancelled); the session goes on."""
        for transport in ("http", "sse"):
            result = h.run_client(
                "sdk_client.py",
                "--url",
                url_for(self.bridge, "patient", transport),
                "--transport",
                transport,
                "timeout_then_echo",
                "5",
                "1",
            )
            self.assertTrue(result["ok"], result)
            self.assertEqual(result["slow"]["raised"], True)
            self.assertLess(result["slow_seconds"], 3)
            self.assertEqual(result["echo"]["texts"], ["Echo: after the timeout"])
        h.wait_for(lambda: self.bridge.status("patient")["in_flight"] == 0, 10, "nothing in flight")


class ShutdownTests(FaultTestMixin, SynchronousTestCase):
    """SIGTERM to the bridge: it exits within 10 s and leaves no process behind."""

    def test_stubborn_child(self) -> None:
        """A child that ignores SIGTERM and EOF is SIGKILLed (term_after + kill_after)."""
        bridge = h.start_bridge(self, fixture_toml("stubborn", "--stubborn"))
        self.bridge = bridge
        pid = bridge.status("stubborn")["pid"]
        self.assertEqual(
            self.call("stubborn", "http", "echo", {"message": "x"})["call"]["texts"], ["Echo: x"]
        )
        bridge.stop()
        self.assertLess(bridge.stop_seconds, 10)
        self.assertIsNone(h.process_state(pid))

    def test_calls_and_streams_in_flight(self) -> None:
        """Calls in flight and open streams do not hold the bridge up; callers hear of it."""
        bridge = h.start_bridge(self, fixture_toml("slow"))
        self.bridge = bridge
        calls = [self.start_call("slow", t, "sleep", {"seconds": 60}) for t in ("http", "sse")]
        h.wait_for(lambda: bridge.status("slow")["in_flight"] == 2, 20, "two calls in flight")
        stopped_at = time.time()
        bridge.stop()
        self.assertLess(bridge.stop_seconds, 10)
        for proc in calls:
            result = self.finish(proc, timeout=20)
            # Either a JSON-RPC error for the call, or the connection failing: not a hang.
            self.assertTrue("call_error" in result or not result["ok"], result)
            if "ended" in result:
                self.assertLess(result["ended"] - stopped_at, 10)


class StartupTimeoutTests(FaultTestMixin, SynchronousTestCase):
    """A child that never answers initialize is killed after startup_timeout."""

    def setUp(self) -> None:
        self.bridge = h.start_bridge(
            self,
            h.python_server_toml("mute", [FIXTURE, "--mute"], "startup_timeout = 1\n")
            + "[servers.mute.restart]\ninitial_delay = 0.1\ncrash_limit = 2\n",
        )

    def test_waiting_client_gets_an_error(self) -> None:
        started = time.monotonic()
        code, headers, body = h.http(
            "POST", self.bridge.mcp_url("mute"), INITIALIZE, ACCEPT, timeout=30
        )
        self.assertEqual(code, 200)
        [message] = h.jsonrpc_body(headers, body)
        self.assertLess(time.monotonic() - started, 10)
        self.assertEqual(message["id"], INITIALIZE["id"])
        self.assertIn("did not answer initialize within 1s", message["error"]["message"])
        status = self.bridge.wait_state("mute", "failed")
        self.assertEqual(status["restarts"], 1)
        self.assertEqual(h.http("GET", self.bridge.url("/health"))[0], 503)
        self.assertEqual(self.bridge.children(), {})


class HTTPEdgeTests(SynchronousTestCase):
    """Origin checks, unknown servers, sessions that never came to be."""

    def setUp(self) -> None:
        self.bridge = h.start_bridge(
            self,
            h.python_server_toml("fx", [FIXTURE])
            + f"[servers.broken]\ncommand = {h.toml_str(MissingCommandTests.COMMAND)}\n"
            + FAST_RESTART.format(name="broken"),
        )

    def test_foreign_origin_is_forbidden(self) -> None:
        evil = {**ACCEPT, "Origin": "http://evil.example.com"}
        for method, path, body in (
            ("POST", "/servers/fx/mcp", INITIALIZE),
            ("GET", "/servers/fx/sse", None),
            ("GET", "/servers", None),
            ("GET", "/health", None),
        ):
            code, headers, raw = h.http(method, self.bridge.url(path), body, evil)
            self.assertEqual(code, 403, (method, path, raw))
            self.assertNotIn("mcp-session-id", headers)
        # A local page too, unless allowed_origins lists it.
        local = {**ACCEPT, "Origin": f"http://localhost:{self.bridge.port}"}
        code, headers, _ = h.http("POST", self.bridge.mcp_url("fx"), INITIALIZE, local)
        self.assertEqual(code, 403)
        self.assertNotIn("mcp-session-id", headers)
        code, headers, _ = h.http("POST", self.bridge.mcp_url("fx"), INITIALIZE, ACCEPT)
        self.assertEqual(code, 200)
        self.assertIn("mcp-session-id", headers)

    def test_foreign_host_refused_even_without_origin(self) -> None:
        """DNS rebinding: a page on evil.example.com resolved to 127.0.0.1 gets nothing."""
        for method, path, body in (
            ("GET", "/servers", None),
            ("POST", "/servers/fx/mcp", INITIALIZE),
        ):
            code, headers, raw = h.http(
                method, self.bridge.url(path), body, {**ACCEPT, "Host": "evil.example.com"}
            )
            self.assertEqual(code, 421, (method, path, raw))
            self.assertNotIn("mcp-session-id", headers)

    def test_unknown_server(self) -> None:
        code, _, body = h.http("POST", self.bridge.mcp_url("nope"), INITIALIZE, ACCEPT)
        self.assertEqual(code, 404)
        self.assertIn("no MCP server is named 'nope'", json.loads(body)["error"]["message"])
        self.assertEqual(h.http("GET", self.bridge.url("/servers/nope"))[0], 404)

    def test_failed_initialize_has_no_session_id(self) -> None:
        self.bridge.wait_state("broken", "failed")
        _, headers, body = h.http("POST", self.bridge.mcp_url("broken"), INITIALIZE, ACCEPT)
        [message] = h.jsonrpc_body(headers, body)
        self.assertIn("error", message)
        # The session was closed at once ("failed to initialize"), yet its id was sent:
        # a client (the Python SDK does) then DELETEs it and gets a 404.
        self.assertNotIn("mcp-session-id", headers)


class RawSession:
    """A Streamable HTTP session driven with urllib (one request at a time)."""

    def __init__(self, bridge: h.Bridge, name: str) -> None:
        self.url = bridge.mcp_url(name)
        code, headers, body = h.http("POST", self.url, INITIALIZE, ACCEPT)
        assert code == 200, (code, body)
        self.headers = {**ACCEPT, "Mcp-Session-Id": headers["mcp-session-id"]}
        h.http(
            "POST",
            self.url,
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
            self.headers,
        )

    def request(self, message: dict[str, Any], timeout: float = 30) -> list[dict[str, Any]]:
        code, headers, body = h.http("POST", self.url, message, self.headers, timeout=timeout)
        assert code == 200, (code, body)
        return h.jsonrpc_body(headers, body)

    def call(
        self, request_id: Any, tool: str, args: Any, progress_token: Any = None
    ) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"name": tool, "arguments": args}
        if progress_token is not None:
            params["_meta"] = {"progressToken": progress_token}
        return self.request(
            {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}
        )


class RestartQueueTests(SynchronousTestCase):
    """Requests that arrive while the child restarts wait for the new child."""

    def setUp(self) -> None:
        self.bridge = h.start_bridge(
            self, h.python_server_toml("fx", [FIXTURE], "[servers.fx.restart]\ninitial_delay = 1\n")
        )

    def test_request_during_restart(self) -> None:
        session = RawSession(self.bridge, "fx")
        old = self.bridge.status("fx")["pid"]
        os.kill(old, signal.SIGKILL)
        self.bridge.wait_state("fx", "restarting", timeout=5)
        [answer] = session.call(1, "echo", {"message": "queued"})
        self.assertEqual(answer["result"]["content"][0]["text"], "Echo: queued")
        status = self.bridge.status("fx")
        self.assertEqual((status["state"], status["restarts"]), ("running", 1))
        self.assertNotEqual(status["pid"], old)
        # A new session during a restart waits for the child too.
        os.kill(status["pid"], signal.SIGKILL)
        self.bridge.wait_state("fx", "restarting", timeout=5)
        [answer] = RawSession(self.bridge, "fx").call("x", "echo", {"message": "new"})
        self.assertEqual(answer["result"]["content"][0]["text"], "Echo: new")
        self.bridge.assert_no_zombies()


class ProgressDeadlineTests(SynchronousTestCase):
    """Progress pushes a request's deadline out, up to max_request_timeout."""

    def setUp(self) -> None:
        self.bridge = h.start_bridge(
            self, h.everything_server_toml("e", "request_timeout = 1\nmax_request_timeout = 2.5\n")
        )

    def test_progress_extends_the_deadline(self) -> None:
        session = RawSession(self.bridge, "e")
        # 2 s with progress every 0.25 s: longer than request_timeout, still answered.
        messages = session.call(
            1, "trigger-long-running-operation", {"duration": 2, "steps": 8}, "tok"
        )
        progress = [m for m in messages if m.get("method") == "notifications/progress"]
        self.assertEqual([p["params"]["progressToken"] for p in progress], ["tok"] * 8)
        self.assertEqual(messages[-1]["id"], 1)
        self.assertIn(
            "Long running operation completed", messages[-1]["result"]["content"][0]["text"]
        )
        # Without a progress token there is no progress: timed out after 1 s.
        started = time.monotonic()
        [answer] = session.call(2, "trigger-long-running-operation", {"duration": 2, "steps": 8})
        self.assertLess(time.monotonic() - started, 1.8)
        self.assertEqual(answer["error"]["code"], -32001)
        # Progress or not, max_request_timeout (2.5 s) ends it.
        started = time.monotonic()
        messages = session.call(
            3, "trigger-long-running-operation", {"duration": 4, "steps": 16}, "tok"
        )
        self.assertLess(time.monotonic() - started, 3.5)
        self.assertEqual(messages[-1]["error"]["code"], -32001)
        self.assertIn("did not answer tools/call within 2.5", messages[-1]["error"]["message"])
