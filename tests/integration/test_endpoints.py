"""Aggregating endpoints, driven by real clients: the official MCP Python SDK
(mcp 2.x) and the MCP Inspector CLI.

One endpoint serves the built-in example server, mcp-server-time and
@modelcontextprotocol/server-everything (its names prefixed C{ev}) at
/endpoints/team/. The SDK lists and calls tools over Streamable HTTP
(session era and 2026-07-28) and over HTTP+SSE, and each call must reach the
child whose tool it names; server-everything's questions to the client
(sampling, elicitation) and its progress reach the client that made the call,
and only it; the Inspector sees every member's tools; a member that dies
leaves the others serving, and its tools come back with it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from . import harness as h

MODERN = "2026-07-28"
# (transport, SDK mode): every way a client can speak to an endpoint.
MODES = (("http", "legacy"), ("http", MODERN), ("sse", "legacy"))
# The tool server-everything runs for a while, reporting progress.
LONG = "ev__trigger-long-running-operation"
# server-everything's simulated log lines, e.g. "Info-level message".
SIMULATED_LOG = re.compile(r"-level message|level-message")


class EndpointMixin:
    bridge: h.Bridge

    def sdk(
        self, transport: str, mode: str, *args: str, options: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """Run C{sdk_client.py} against /endpoints/team; what it printed, which must be ok."""
        path = "/endpoints/team/" + ("mcp" if transport == "http" else "sse")
        argv = ("--url", self.bridge.url(path), "--transport", transport, "--mode", mode)
        try:
            result = h.run_client("sdk_client.py", *argv, *options, *args)
        except AssertionError as e:
            raise AssertionError(f"{e}\nbridge log:\n{self.bridge.log[-4000:]}") from None
        if not result.get("ok"):
            raise AssertionError(
                f"{transport} ({mode}) failed: {json.dumps(result, indent=1)[:4000]}"
                f"\nbridge log:\n{self.bridge.log[-4000:]}"
            )
        return result


class AggregateTests(EndpointMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.bridge = h.start_bridge(self, h.team_toml('exclude = ["example__uuid"]\n'))

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
        self.check("http", MODERN)

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


class ServerQuestionsTests(EndpointMixin, SynchronousTestCase):
    """What server-everything sends the client while serving a call, through
    the endpoint, in each mode: its sampling and elicitation requests (as
    input_required rounds in 2026-07-28) and its progress."""

    def setUp(self) -> None:
        self.bridge = h.start_bridge(self, h.team_toml())

    def test_questions_and_progress(self) -> None:
        for transport, mode in MODES:
            self.check_questions(transport, mode)
            self.check_progress_isolation(transport, mode)

    def check_questions(self, transport: str, mode: str) -> None:
        # Logging (the everything scenario) is a session-era feature.
        scenario = "questions" if mode == MODERN else "everything"
        r = self.sdk(transport, mode, scenario, options=("--prefix", "ev__"))
        context = f"{transport} ({mode}): {json.dumps(r, indent=1)[:6000]}"
        self.assertIn("ev__trigger-sampling-request", r["tools"], context)
        self.assertIn("ev__trigger-elicitation-request", r["tools"], context)
        self.assertEqual(r["echo"]["texts"], ["Echo: hello bridge"], context)
        # Sampling: the member asked this client, which answered; the member got the answer.
        self.assertEqual(
            r["seen"]["sampling"],
            ["Resource trigger-sampling-request context: hello sampler"],
            context,
        )
        self.assertFalse(r["sampling"]["is_error"], context)
        self.assertIn('"text": "sampled-by-test"', r["sampling"]["texts"][0], context)
        # Elicitation, likewise.
        self.assertEqual(len(r["seen"]["elicitation"]), 1, context)
        self.assertFalse(r["elicitation"]["is_error"], context)
        joined = "\n".join(r["elicitation"]["texts"])
        self.assertIn("User provided the requested information", joined, context)
        self.assertIn("Name: Ada", joined, context)
        # Progress: four steps, in order, to this call's callback.
        self.assertEqual(
            r["long_running"]["texts"],
            ["Long running operation completed. Duration: 1 seconds, Steps: 4."],
            context,
        )
        self.assertEqual(r["progress"], [[float(i), 4.0, None] for i in range(1, 5)], context)
        self.assertEqual(r["seen"]["notifications"].count("notifications/progress"), 4, context)
        if scenario == "everything":
            # The client's log level reached server-everything, which logs to it.
            simulated = [d for _, d in r["seen"]["logs"] if SIMULATED_LOG.search(str(d))]
            self.assertTrue(simulated, context)
            self.assertIn("Started simulated", r["toggle_logging"]["texts"][0], context)
        # How the questions travelled. server-everything may also ask for the
        # client's roots once it starts, whenever its timer fires: not a
        # question of these calls, but its answer is a POSTed response too.
        roots = [key for method, key in r["seen"]["asked"] if method == "roots/list"]
        asked = [q for q in r["seen"]["asked"] if q[0] != "roots/list"]
        self.assertEqual(
            [method for method, _ in asked],
            ["sampling/createMessage", "elicitation/create"],
            context,
        )
        posts = r["seen"]["posts"]
        rounds = {
            tool: [
                (p["input_responses"], p["request_state"])
                for p in posts
                if p["method"] == "tools/call" and p["name"] == f"ev__{tool}"
            ]
            for tool in ("trigger-sampling-request", "trigger-elicitation-request")
        }
        if mode == MODERN:
            # Each question came as an input_required result, keyed by a string,
            # and its answer went back in a retry of the call with the requestState.
            self.assertTrue(all(isinstance(key, str) for _, key in asked), context)
            for (_, key), tries in zip(asked, rounds.values(), strict=True):
                self.assertEqual(tries, [(None, False), ([key], True)], context)
        else:
            # Server-to-client requests in the session, answered by POSTed responses.
            self.assertTrue(all(isinstance(key, int) for _, key in asked), context)
            self.assertEqual(list(rounds.values()), [[(None, False)]] * 2, context)
            answers = [p for p in posts if p["method"] is None]
            self.assertEqual(len(answers), 2 + len(roots), context)

    def check_progress_isolation(self, transport: str, mode: str) -> None:
        """Three clients call the long operation at once: two ask for progress
        (with the same progress token), one does not. Each gets its own
        progress and nothing of the others'."""
        barrier = tempfile.mkdtemp(prefix="mcptwist-barrier-")
        self.addCleanup(shutil.rmtree, barrier, True)
        together = ("--barrier", barrier, "--parties", "3")
        runs = {
            "five": ("progress", LONG, '{"duration": 2, "steps": 5}'),
            "two": ("progress", LONG, '{"duration": 2, "steps": 2}'),
            "none": ("call", LONG, '{"duration": 2, "steps": 3}'),
        }
        with ThreadPoolExecutor(len(runs)) as pool:
            futures = {
                name: pool.submit(self.sdk, transport, mode, *args, options=together)
                for name, args in runs.items()
            }
            results = {name: future.result() for name, future in futures.items()}
        context = f"{transport} ({mode}): {json.dumps(results, indent=1)[:8000]}"
        for name, steps in (("five", 5), ("two", 2), ("none", 3)):
            self.assertEqual(
                results[name]["call"]["texts"],
                [f"Long running operation completed. Duration: 2 seconds, Steps: {steps}."],
                context,
            )
        self.assertEqual(
            results["five"]["progress"], [[float(i), 5.0, None] for i in range(1, 6)], context
        )
        self.assertEqual(
            results["two"]["progress"], [[float(i), 2.0, None] for i in range(1, 3)], context
        )
        # Nothing else arrived as progress: no notification the callbacks did not take.
        for name, count in (("five", 5), ("two", 2), ("none", 0)):
            notifications = results[name]["seen"]["notifications"]
            self.assertEqual(notifications.count("notifications/progress"), count, context)
        # The two that asked for progress used the same token, and the calls overlapped.
        tokens = [
            [p["progress_token"] for p in results[name]["seen"]["posts"] if p["name"] == LONG]
            for name in ("five", "two", "none")
        ]
        self.assertEqual(tokens[0], tokens[1], context)
        self.assertIsNotNone(tokens[0][0], context)
        self.assertEqual(tokens[2], [None], context)
        self.assertLess(
            max(r["started"] for r in results.values()),
            min(r["ended"] for r in results.values()),
            f"the calls did not overlap: {context}",
        )


class InspectorTests(SynchronousTestCase):
    """The MCP Inspector CLI (v2) against the endpoint, over Streamable HTTP and HTTP+SSE."""

    def setUp(self) -> None:
        h.require_node_tools(h.INSPECTOR_BIN, h.NODE22_BIN / "node")
        self.bridge = h.start_bridge(self, h.team_toml())
        self.home = tempfile.mkdtemp(prefix="mcptwist-inspector-home-")
        self.addCleanup(shutil.rmtree, self.home, True)

    def inspector(self, transport: str, *args: str) -> Any:
        """What the Inspector printed (C{{"result": ...}}); it must exit 0."""
        path = "/endpoints/team/" + ("mcp" if transport == "http" else "sse")
        result = h.run(
            [
                str(h.INSPECTOR_BIN),
                "--cli",
                self.bridge.url(path),
                "--transport",
                transport,
                *args,
                "--format",
                "json",
            ],
            timeout=60,
            env=h.node_env(self.home),
        )
        if result.returncode != 0:
            raise AssertionError(
                f"inspector {args} over {transport} exited {result.returncode}\n"
                f"stdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}\n"
                f"bridge log:\n{self.bridge.log[-3000:]}"
            )
        return json.loads(result.stdout.strip().splitlines()[-1])

    def test_list_and_call(self) -> None:
        for transport in ("http", "sse"):
            listed = self.inspector(transport, "--method", "tools/list")
            names = {t["name"] for t in listed["result"]["tools"]}
            for tool in (
                "example__calculate",
                "example__hash_text",
                "time__get_current_time",
                "time__convert_time",
                "ev__echo",
                "ev__get-sum",
            ):
                self.assertIn(tool, names, transport)
            self.assertEqual(
                {name.split("__", 1)[0] for name in names}, {"example", "time", "ev"}, transport
            )
            product = self.inspector(
                transport,
                "--method",
                "tools/call",
                "--tool-name",
                "example__calculate",
                "--tool-args-json",
                '{"expression": "6 * 7"}',
            )
            self.assertEqual(product["result"]["content"], [{"type": "text", "text": "42"}])
            total = self.inspector(
                transport,
                "--method",
                "tools/call",
                "--tool-name",
                "ev__get-sum",
                "--tool-args-json",
                '{"a": 19, "b": 23}',
            )
            self.assertEqual(
                total["result"]["content"],
                [{"type": "text", "text": "The sum of 19 and 23 is 42."}],
            )


# The example server gives up at its first crash and tries again after a cool-down:
# down for a known while, then back on its own.
COOLDOWN = 6
FAIL_ONCE = f"[servers.example.restart]\ncrash_limit = 1\ncooldown = {COOLDOWN}\n"
# The example server's tools.
EXAMPLE_TOOLS = (
    "calculate",
    "convert_time",
    "current_time",
    "decode",
    "encode",
    "hash_text",
    "uuid",
)
# One call to each member, as list_and_call's arguments.
ONE_CALL_EACH = (
    "example__calculate",
    '{"expression": "6 * 7"}',
    "time__get_current_time",
    '{"timezone": "UTC"}',
    "ev__echo",
    '{"message": "still here"}',
)


class MemberFailureTests(EndpointMixin, SynchronousTestCase):
    """One member's child is killed: the endpoint goes on serving the others;
    the member's tools leave the list and a call to one names its state; when
    the member is back, so are its tools."""

    def setUp(self) -> None:
        self.bridge = h.start_bridge(self, h.team_toml(example=FAIL_ONCE))
        for member in ("example", "time", "everything"):
            self.bridge.wait_state(member, "running", timeout=30)

    def every_mode(self) -> dict[tuple[str, str], dict[str, Any]]:
        """list_and_call (one call to each member) in every mode, at once."""
        with ThreadPoolExecutor(len(MODES)) as pool:
            futures = {
                (transport, mode): pool.submit(
                    self.sdk, transport, mode, "list_and_call", *ONE_CALL_EACH
                )
                for transport, mode in MODES
            }
            return {key: future.result() for key, future in futures.items()}

    def check_others(self, r: dict[str, Any], context: str) -> None:
        """time and server-everything answered, and are listed."""
        _, now, echo = r["calls"]
        self.assertEqual(json.loads(now["texts"][0])["timezone"], "UTC", context)
        self.assertEqual(echo["texts"], ["Echo: still here"], context)
        self.assertIn("time__get_current_time", r["tools"], context)
        self.assertIn("ev__echo", r["tools"], context)

    def test_member_killed(self) -> None:
        before = self.sdk("http", "legacy", "list_and_call", *ONE_CALL_EACH)
        self.assertIn("example__calculate", before["tools"])
        self.assertEqual(before["calls"][0]["texts"], ["42"])

        pid = self.bridge.status("example")["pid"]
        os.kill(pid, signal.SIGKILL)
        down = self.bridge.wait_state("example", "failed", timeout=5)
        self.assertEqual(down["last_exit"], "killed by SIGKILL")
        for (transport, mode), r in self.every_mode().items():
            context = (
                f"{transport} ({mode}) while example is down: {json.dumps(r, indent=1)[:4000]}"
            )
            self.check_others(r, context)
            # Its tools are not listed, and a call to one is an error naming its state.
            self.assertEqual([t for t in r["tools"] if t.startswith("example__")], [], context)
            error = r["calls"][0].get("error")
            self.assertIsNotNone(error, context)
            self.assertEqual(error["code"], -32000, context)  # the bridge's "server unavailable"
            self.assertEqual(
                error["message"],
                "MCP server 'example' is failed (its child killed by SIGKILL)",
                context,
            )
            self.assertEqual(
                (error["data"]["server"], error["data"]["state"]), ("example", "failed"), context
            )
        self.assertEqual(
            self.bridge.status("example")["state"],
            "failed",
            f"example came back before the clients were done: {COOLDOWN}s is too short here",
        )
        h.wait_for(lambda: h.process_state(pid) is None, 5, f"pid {pid} to be reaped")

        # The cool-down over, the bridge starts it again: its tools are back.
        self.bridge.wait_state("example", "running", timeout=COOLDOWN + 15)
        self.assertNotEqual(self.bridge.status("example")["pid"], pid)
        for (transport, mode), r in self.every_mode().items():
            context = f"{transport} ({mode}) once example is back: {json.dumps(r, indent=1)[:4000]}"
            self.check_others(r, context)
            self.assertEqual(
                sorted(t for t in r["tools"] if t.startswith("example__")),
                sorted(f"example__{t}" for t in EXAMPLE_TOOLS),
                context,
            )
            self.assertEqual(r["calls"][0]["texts"], ["42"], context)
