"""Children that stop talking while they run (C{mute_fixture.py}).

A child that closes its stdout or its stdin and sleeps on: its caller hears
why at once, /health says so, the child is stopped and restarted, and the
next call works. One that closes only its stderr goes on serving. One that
lets requests time out in a row is reported unresponsive until it speaks.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from . import harness as h
from .fault_support import FAST_RESTART, PROMPT, FaultTestMixin

FIXTURE = str(h.FIXTURES / "mute_fixture.py")


def mute_toml(name: str, extra: str = "") -> str:
    return h.python_server_toml(name, [FIXTURE], extra) + FAST_RESTART.format(name=name)


class SilentChildTests(FaultTestMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mcptwist-silent-"))
        self.audit = self.dir / "audit.jsonl"
        config = (
            f"[audit]\npath = {h.toml_str(str(self.audit))}\n"
            # A long term_after: /health is seen while the broken child is stopped.
            + mute_toml("mute", "term_after = 3\n")
            + mute_toml("quiet", "request_timeout = 1\nunresponsive_after = 2\n")
        )
        self.bridge = h.start_bridge(self, config, directory=self.dir)
        self.bridge.wait_state("mute", "running")
        self.bridge.wait_state("quiet", "running")

    def audited(self, event: str) -> list[dict[str, Any]]:
        records = map(json.loads, self.audit.read_text().splitlines())
        return [r for r in records if r["event"] == event]

    def closes(self, pipe: str, transport: str) -> None:
        old_pid = self.bridge.status("mute")["pid"]
        started = time.time()
        result = self.call("mute", transport, f"close_{pipe}", {}, timeout=30)
        # The caller gets a JSON-RPC error naming the cause, promptly.
        self.assertIn("call_error", result, f"expected an error, got {result}")
        error = result["call_error"]
        self.assertIsInstance(error["code"], int)
        self.assertIn(f"MCP server 'mute' closed its {pipe} while still running", error["message"])
        self.assertLess(result["ended"] - started, PROMPT, "the error came too late")
        # /health says why while the child is being stopped.
        code, _, body = h.http("GET", self.bridge.url("/health"))
        self.assertEqual(code, 503, body)
        reason = json.loads(body)["servers"]["mute"]
        self.assertEqual(reason, f"restarting: closed its {pipe} while still running")
        # It is stopped (it ignores stdin EOF: SIGTERM after term_after) and restarted.
        h.wait_for(
            lambda: self.bridge.status("mute")["pid"] not in (None, old_pid), 15, "a new pid"
        )
        status = self.bridge.wait_state("mute", "running")
        self.assertEqual(status["restarts"], 1)
        self.assertEqual(
            status["last_exit"],
            f"closed its {pipe} while still running, so it was stopped (killed by SIGTERM)",
        )
        h.wait_for(lambda: h.process_state(old_pid) is None, 5, f"pid {old_pid} to be reaped")
        self.bridge.assert_no_zombies()
        self.assertEqual(h.http("GET", self.bridge.url("/health"))[0], 200)
        # The next call works, on the new child.
        again = self.call("mute", transport, "echo", {"message": "again"})
        self.assertEqual(again["call"]["texts"], ["Echo: again"])
        # The log and the audit trail name the cause.
        self.assertIn(f"closed its {pipe} while still running; stopping it", self.bridge.log)
        [record] = [r for r in self.audited("child_exited") if r["pid"] == old_pid]
        self.assertIn(f"closed its {pipe} while still running", record["reason"])
        self.assertEqual(record["signal"], 15)

    def test_stdout_closed(self) -> None:
        self.closes("stdout", "http")

    def test_stdin_closed(self) -> None:
        self.closes("stdin", "sse")

    def test_stderr_closed_is_harmless(self) -> None:
        pid = self.bridge.status("mute")["pid"]
        result = self.call("mute", "http", "close_stderr", {})
        self.assertEqual(result["call"]["texts"], ["closed stderr"])
        h.wait_for(
            lambda: "closed its stderr; it goes on serving" in self.bridge.log, 5, "the log line"
        )
        again = self.call("mute", "http", "echo", {"message": "still here"})
        self.assertEqual(again["call"]["texts"], ["Echo: still here"])
        status = self.bridge.status("mute")
        self.assertEqual((status["state"], status["pid"], status["restarts"]), ("running", pid, 0))

    def test_timeouts_in_a_row_show_as_unresponsive(self) -> None:
        for _ in range(2):
            result = self.call("quiet", "http", "hang", {})
            self.assertIn("timed out", result["call_error"]["message"])
        status = self.bridge.status("quiet")
        self.assertEqual(
            (status["state"], status["unresponsive"], status["consecutive_timeouts"]),
            ("running", True, 2),
        )
        code, _, body = h.http("GET", self.bridge.url("/health"))
        self.assertEqual(code, 503, body)
        self.assertIn("unresponsive", json.loads(body)["servers"]["quiet"])
        self.assertIn("answered none of 2 requests in a row", self.bridge.log)
        # It answers again: it is no longer reported.
        again = self.call("quiet", "http", "echo", {"message": "awake"})
        self.assertEqual(again["call"]["texts"], ["Echo: awake"])
        self.assertFalse(self.bridge.status("quiet")["unresponsive"])
        self.assertEqual(h.http("GET", self.bridge.url("/health"))[0], 200)
