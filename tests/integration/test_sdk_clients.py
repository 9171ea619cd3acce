"""The official MCP Python SDK (mcp 2.x) as a client of the bridge.

Each test starts a bridge, then runs C{clients/sdk_client.py} (asyncio, in
its own process) over Streamable HTTP and over HTTP+SSE, and checks the JSON
it prints.

The SDK's C{Client} has three modes: "legacy" (the initialize handshake),
"auto" (server/discover first, initialize if the server is not modern) and a
modern version, "2026-07-28" (stateless, no handshake). On Streamable HTTP
the bridge serves 2026-07-28 in front of its session-era children, so "auto"
settles on it there; the HTTP+SSE transport is session-era only.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from . import harness as h

# server-everything's simulated log lines, e.g. "Info-level message".
SIMULATED_LOG = re.compile(r"-level message|level-message")

TRANSPORTS = ("http", "sse")
MODERN = "2026-07-28"
LEGACY = "2025-11-25"
# The SDK modes, and the protocol version each settles on through the bridge.
MODES = {"auto": MODERN, MODERN: MODERN, "legacy": LEGACY}

STDIO_FIXTURE = h.FIXTURES / "stdio_fixture.py"
CONFORMANCE_FIXTURE = h.FIXTURES / "conformance_server.py"


class SDKTestMixin:
    bridge: h.Bridge

    def sdk(
        self,
        name: str,
        transport: str,
        scenario: str,
        *args: str,
        mode: str = "legacy",
        options: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        url = self.bridge.mcp_url(name) if transport == "http" else self.bridge.sse_url(name)
        argv = ("--url", url, "--transport", transport, "--mode", mode, *options, scenario, *args)
        try:
            result = h.run_client("sdk_client.py", *argv)
        except AssertionError as e:
            raise AssertionError(f"{e}\nbridge log:\n{self.bridge.log[-4000:]}") from None
        if not result.get("ok"):
            raise AssertionError(
                f"{scenario} over {transport} ({mode}) failed: {json.dumps(result, indent=1)[:6000]}"
                f"\nbridge log:\n{self.bridge.log[-4000:]}"
            )
        return result

    def check_auto(self, r: dict[str, Any], transport: str) -> str:
        """mode="auto": 2026-07-28 through server/discover on Streamable HTTP;
        on HTTP+SSE the probe fails and the SDK falls back to initialize.
        Returns the version the client settled on."""
        modern = transport == "http"
        self.assertEqual(
            (r["protocol_version"], r["discover_result"], r["initialize_result"]),
            (MODERN, True, False) if modern else (LEGACY, False, True),
            f"auto mode over {transport}",
        )
        return MODERN if modern else LEGACY


class ExampleServerTests(SDKTestMixin, SynchronousTestCase):
    """The built-in example server: no --config, only --listen."""

    def setUp(self) -> None:
        self.bridge = h.start_bridge(self, config=None)

    def check_example(self, r: dict[str, Any], version: str = LEGACY) -> None:
        self.assertEqual(r["protocol_version"], version)
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

    def test_auto_mode(self) -> None:
        """mode="auto" probes server/discover: answered on Streamable HTTP, not on HTTP+SSE."""
        for transport in TRANSPORTS:
            r = self.sdk("example", transport, "example", mode="auto")
            self.check_example(r, self.check_auto(r, transport))

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
        self.bridge = h.start_bridge(self, h.time_toml())

    def check_time(self, r: dict[str, Any], version: str = LEGACY) -> None:
        self.assertEqual(r["protocol_version"], version)
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
        """The bridge keeps a session with the child and serves 2026-07-28 in front of it."""
        for transport in TRANSPORTS:
            r = self.sdk("time", transport, "time", mode="auto")
            self.check_time(r, self.check_auto(r, transport))


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
            self.check_auto(r, transport)
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


class MixedModesTests(SDKTestMixin, SynchronousTestCase):
    """Three SDK clients at once on one bridged server, one in each mode.

    The clients are started together and meet at a barrier once connected,
    so their requests are in flight at the same time; each echoes a message
    of its own, sleeps a second in the child and asks for the child's pid.
    """

    def start(self, sharing: str) -> None:
        self.bridge = h.start_bridge(
            self,
            h.python_server_toml(
                "fixture",
                [str(STDIO_FIXTURE)],
                f'sharing = "{sharing}"\nterm_after = 0.5\nkill_after = 1\n',
            ),
        )

    def run_modes_at_once(self) -> dict[str, dict[str, Any]]:
        """mode -> what its client printed; the three run concurrently."""
        barrier = tempfile.mkdtemp(prefix="mcptwist-barrier-")
        self.addCleanup(shutil.rmtree, barrier, True)

        def one(mode: str) -> dict[str, Any]:
            return self.sdk(
                "fixture",
                "http",
                "list_and_call",
                "echo",
                json.dumps({"message": f"from {mode}"}),
                "sleep",
                '{"seconds": 1}',
                "pid",
                "{}",
                mode=mode,
                options=("--barrier", barrier, "--parties", str(len(MODES))),
            )

        with ThreadPoolExecutor(len(MODES)) as pool:
            futures = {mode: pool.submit(one, mode) for mode in MODES}
            return {mode: future.result() for mode, future in futures.items()}

    def check_modes(self, results: dict[str, dict[str, Any]]) -> dict[str, int]:
        """What each client saw; returns mode -> the pid of the child that served it."""
        pids = {}
        for mode, r in results.items():
            context = f"client in mode {mode!r}: {json.dumps(r, indent=1)[:3000]}"
            self.assertEqual(r["protocol_version"], MODES[mode], context)
            if mode == "auto":
                self.assertEqual((r["discover_result"], r["initialize_result"]), (True, False))
            self.assertEqual(
                r["tools"],
                ["big", "echo", "fail", "getenv", "log", "meta", "pid", "sleep"],
                context,
            )
            calls = {call["tool"]: call for call in r["calls"]}
            self.assertEqual(calls["echo"]["texts"], [f"Echo: from {mode}"], context)
            self.assertEqual(calls["sleep"]["texts"], ["slept"], context)
            self.assertFalse(any(call.get("is_error") for call in r["calls"]), context)
            pids[mode] = int(calls["pid"]["texts"][0])
            # On the wire: stateless POSTs for the modern modes, one session for legacy.
            posts = r["seen"]["posts"]
            if MODES[mode] == MODERN:
                self.assertEqual({(p["version"], p["session"]) for p in posts}, {(MODERN, False)})
            else:
                self.assertEqual(posts[0]["method"], "initialize")
                self.assertEqual(
                    {(p["version"], p["session"]) for p in posts[1:]}, {(LEGACY, True)}
                )
        # The three sleeps overlapped: the bridge served the clients at the same time.
        sleeps = [next(c for c in r["calls"] if c["tool"] == "sleep") for r in results.values()]
        self.assertLess(
            max(c["started"] for c in sleeps),
            min(c["ended"] for c in sleeps),
            f"the clients' calls did not overlap: {sleeps}",
        )
        return pids

    def test_shared(self) -> None:
        """sharing = "shared": one child serves all three modes."""
        self.start("shared")
        pids = self.check_modes(self.run_modes_at_once())
        self.assertEqual(set(pids.values()), {self.bridge.status("fixture")["pid"]}, pids)
        self.assertEqual(self.bridge.status("fixture")["restarts"], 0)

    def test_session(self) -> None:
        """sharing = "session": the legacy session has a child of its own; the two
        stateless clients (the same principal) share the bridge's hub and its child."""
        self.start("session")
        pids = self.check_modes(self.run_modes_at_once())
        self.assertEqual(pids["auto"], pids[MODERN], pids)
        self.assertNotEqual(pids["legacy"], pids[MODERN], pids)
        # The legacy session's child goes when its session does.
        h.wait_for(
            lambda: pids["legacy"] not in self.bridge.children(),
            10,
            "the legacy session's child to be stopped",
        )
        self.bridge.assert_no_zombies()


# The conformance fixture's tools that ask the client (elicitation, sampling,
# roots) while serving a call, and what they answer with this client's answers
# (sdk_client.py: elicitation fills name=Ada, color=teal; sampling answers
# "sampled-by-test"; one root).
ASKING_CALLS = {
    "test_input_required_result_multiple_inputs": "Name: Ada; Greeting: sampled-by-test; Roots: 1",
    "test_input_required_result_multi_round": "Multi-round complete for Ada who likes teal",
    "test_input_required_result_elicitation": "Hello, Ada!",
}
ELICITATIONS = [
    "What is your name?",
    "Step 1: What is your name?",
    "Step 2: What is your favorite color?",
    "What is your name?",
]


class ServerQuestionsTests(SDKTestMixin, SynchronousTestCase):
    """A session-era child asks the client questions while serving a call.

    A 2026-07-28 client gets them as input_required results, answers through
    its callbacks and retries with inputResponses and the requestState; a
    legacy client gets them as server-to-client requests in its session.
    Either way the child gets the answers and its result says so.
    """

    def setUp(self) -> None:
        self.bridge = h.start_bridge(self, h.python_server_toml("conf", [str(CONFORMANCE_FIXTURE)]))

    def ask(self, mode: str) -> dict[str, Any]:
        args = [a for tool in ASKING_CALLS for a in (tool, "{}")]
        r = self.sdk("conf", "http", "list_and_call", *args, mode=mode)
        context = f"client in mode {mode!r}: {json.dumps(r, indent=1)[:6000]}"
        self.assertEqual(r["protocol_version"], MODES[mode], context)
        self.assertEqual(
            {call["tool"]: (call.get("is_error"), call.get("texts")) for call in r["calls"]},
            {tool: (False, [text]) for tool, text in ASKING_CALLS.items()},
            context,
        )
        seen = r["seen"]
        self.assertEqual(seen["elicitation"], ELICITATIONS, context)
        self.assertEqual(seen["sampling"], ["Generate a greeting"], context)
        self.assertEqual(seen.get("roots"), ["roots/list"], context)
        return r

    def rounds(self, r: dict[str, Any], tool: str) -> list[tuple[list[str] | None, bool]]:
        """The tools/call POSTs for a tool: (inputResponses keys, requestState sent)."""
        return [
            (p["input_responses"], p["request_state"])
            for p in r["seen"]["posts"]
            if p["method"] == "tools/call" and p["name"] == tool
        ]

    def test_modern_client_answers_input_required(self) -> None:
        r = self.ask(MODERN)
        # Every question reached the client as an input request, keyed by its key...
        keys = [key for _, key in r["seen"]["asked"]]
        self.assertTrue(all(isinstance(k, str) for k in keys), r["seen"]["asked"])
        # ...and went back in a retry of the same call, with the requestState.
        answered = [
            key
            for tool in ASKING_CALLS
            for responses, _ in self.rounds(r, tool)
            for key in responses or ()
        ]
        self.assertEqual(sorted(answered), sorted(keys))
        for tool in ASKING_CALLS:
            rounds = self.rounds(r, tool)
            self.assertEqual(rounds[0], (None, False), f"{tool}: {rounds}")
            self.assertTrue(all(state for _, state in rounds[1:]), f"{tool}: {rounds}")
        # Two questions in turn: two retries, one answer each.
        self.assertEqual(
            [
                len(responses or ())
                for responses, _ in self.rounds(r, "test_input_required_result_multi_round")
            ],
            [0, 1, 1],
        )
        # The child named its question: the input request's key is that name.
        self.assertEqual(
            self.rounds(r, "test_input_required_result_elicitation"),
            [(None, False), (["user_name"], True)],
        )

    def test_legacy_client_answers_server_requests(self) -> None:
        r = self.ask("legacy")
        # Server-to-client requests in the session: JSON-RPC ids, answered by
        # POSTing responses; no tools/call is ever sent twice.
        self.assertEqual(len(r["seen"]["asked"]), 6, r["seen"]["asked"])
        self.assertTrue(all(isinstance(k, int) for _, k in r["seen"]["asked"]), r["seen"]["asked"])
        for tool in ASKING_CALLS:
            self.assertEqual(self.rounds(r, tool), [(None, False)], tool)
        answers = [p for p in r["seen"]["posts"] if p["method"] is None]
        self.assertEqual(len(answers), 6, r["seen"]["posts"])
