"""Twenty clients at once on one shared child, every one using the same request ids.

C{clients/concurrent_clients.py} runs the clients (raw HTTP, asyncio) and
checks that each gets exactly the answers to its own requests: none lost,
none duplicated, none of another client's.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from . import harness as h

CLIENTS = 20
CALLS = 10


class ConcurrencyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.bridge = h.start_bridge(
            self,
            h.python_server_toml("example", ["-m", "mcptwist.example"])
            + h.everything_server_toml(),
        )

    def concurrent(
        self, server: str, tool: str, transport: str, calls: int = CALLS
    ) -> dict[str, Any]:
        pid = self.bridge.status(server)["pid"]
        result = h.run_client(
            "concurrent_clients.py",
            "--base",
            self.bridge.base,
            "--server",
            server,
            "--tool",
            tool,
            "--transport",
            transport,
            "--clients",
            str(CLIENTS),
            "--calls",
            str(calls),
            "--timeout",
            "60",
            timeout=90,
        )
        self.assertNotIn("error", result)
        self.assertEqual(
            result["bad"],
            [],
            f"clients with wrong answers: {json.dumps(result['bad'], indent=1)[:6000]}",
        )
        self.assertEqual(result["answers"], CLIENTS * calls)
        # One child served them all, and it never restarted.
        status = self.bridge.status(server)
        self.assertEqual((status["pid"], status["restarts"], status["state"]), (pid, 0, "running"))
        h.wait_for(lambda: self.bridge.status(server)["in_flight"] == 0, 10, "no request in flight")
        return result

    def test_example_calculate_streamable_http(self) -> None:
        self.concurrent("example", "calculate", "http")

    def test_example_calculate_sse(self) -> None:
        self.concurrent("example", "calculate", "sse")

    def test_everything_echo_mixed_transports(self) -> None:
        """Half the clients on Streamable HTTP, half on HTTP+SSE, one child."""
        self.concurrent("everything", "echo", "mixed")

    def test_everything_progress_tokens(self) -> None:
        """Every client uses the same progress tokens too; each gets only its own progress."""
        self.concurrent("everything", "trigger-long-running-operation", "mixed", calls=3)


class SamplingConcurrencyTests(SynchronousTestCase):
    """Server-to-client requests (sampling) while several clients have calls in flight.

    With a shared child the bridge cannot tell whose call a sampling request
    belongs to when several are in flight; it must refuse rather than ask the
    wrong client. With sharing = "session" every client is asked for its own.
    """

    CLIENTS = 5

    def setUp(self) -> None:
        self.bridge = h.start_bridge(
            self,
            h.everything_server_toml("shared")
            + h.everything_server_toml("per", 'sharing = "session"\n'),
        )

    def sample_concurrently(self, name: str) -> list[dict[str, Any]]:
        procs = []
        for i in range(self.CLIENTS):
            transport = "http" if i % 2 else "sse"
            url = self.bridge.mcp_url(name) if transport == "http" else self.bridge.sse_url(name)
            args = json.dumps({"prompt": f"prompt-of-client-{i}", "maxTokens": 5})
            proc = subprocess.Popen(
                h.client_argv(
                    "sdk_client.py",
                    "--url",
                    url,
                    "--transport",
                    transport,
                    "call",
                    "trigger-sampling-request",
                    args,
                ),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=h.python_env({"SAMPLING_DELAY": "1.5"}),
            )
            self.addCleanup(lambda p=proc: p.poll() is None and p.kill())
            procs.append(proc)
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            results.append(
                h.parse_client_output(
                    subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
                )
            )
        return results

    def test_shared_child_never_asks_the_wrong_client(self) -> None:
        results = self.sample_concurrently("shared")
        for i, r in enumerate(results):
            self.assertTrue(r["ok"], r)
            own = f"Resource trigger-sampling-request context: prompt-of-client-{i}"
            self.assertIn(
                r["seen"]["sampling"], ([], [own]), f"client {i} was asked for another's sampling"
            )
            if r["seen"]["sampling"]:
                self.assertFalse(r["call"]["is_error"], r)
            else:
                # Refused (which client was asked first depends on timing).
                self.assertTrue(r["call"]["is_error"], r)
                self.assertIn("cannot tell which of", r["call"]["texts"][0])

    def test_child_per_session_asks_everyone(self) -> None:
        for i, r in enumerate(self.sample_concurrently("per")):
            self.assertTrue(r["ok"], r)
            self.assertEqual(
                r["seen"]["sampling"],
                [f"Resource trigger-sampling-request context: prompt-of-client-{i}"],
            )
            self.assertFalse(r["call"]["is_error"], r)
            self.assertIn("sampled-by-test", r["call"]["texts"][0])
