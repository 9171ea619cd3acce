"""A child that speaks 2026-07-28 (an mcp 2.x MCPServer), served with era = "modern" and "dual".

One bridge serves tests/fixtures/modern_server.py twice: as C{modern} (one
shared child, session-era clients translated) and as C{dual} (a child per
session, a second kind of child for stateless clients). The official SDK
client then greets through both in all its modes at once: "legacy" (the
session era: the child's questions arrive as elicitation and sampling
requests), "2026-07-28" and "auto" (stateless: input_required rounds).
"""

from __future__ import annotations

import json
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from . import harness as h

FIXTURE = h.FIXTURES / "modern_server.py"
MODERN = "2026-07-28"
LEGACY = "2025-11-25"
# The SDK modes, and the protocol version each settles on through the bridge.
MODES = {"legacy": LEGACY, MODERN: MODERN, "auto": MODERN}
SERVERS = {"modern": 'era = "modern"', "dual": 'era = "dual"\nsharing = "session"'}


class ModernChildTests(SynchronousTestCase):
    def test_greet_in_every_mode_through_both_eras(self) -> None:
        started = time.monotonic()
        config = "".join(
            h.python_server_toml(name, [str(FIXTURE)], extra=extra)
            for name, extra in SERVERS.items()
        )
        bridge = h.start_bridge(self, config)
        urls = [bridge.mcp_url(name) for name in SERVERS]
        argv = ["--timeout", "30"]
        for mode in MODES:
            argv += ["--mode", mode]
        try:
            result = h.run_client("era_client.py", *argv, *urls, timeout=40.0)
        except AssertionError as e:
            raise AssertionError(f"{e}\nbridge log:\n{bridge.log[-6000:]}") from None
        runs: dict[tuple[str, str], dict[str, Any]] = {
            (r["url"].rsplit("/", 2)[-2], r["mode"]): r for r in result["runs"]
        }
        self.assertEqual(set(runs), {(s, m) for s in SERVERS for m in MODES})
        failed = {f"{s}/{m}": r for (s, m), r in runs.items() if not r["ok"]}
        if failed:
            raise AssertionError(
                f"clients failed: {json.dumps(failed, indent=1)[:8000]}"
                f"\nbridge log:\n{bridge.log[-6000:]}"
            )
        for (server, mode), r in runs.items():
            where = f"{server} in mode {mode}"
            self.assertEqual(r["protocol_version"], MODES[mode], where)
            # serverInfo: from the child's own handshake, whichever era it was asked in
            # (a client of a fixed modern version makes no handshake: it has none).
            if mode != MODERN:
                self.assertEqual(r["server_name"], "mcptwist-modern-fixture", where)
            self.assertEqual(r["echo"], [f"echo: {mode}"], where)
            self.assertEqual(r["greet"], ["Hello, Ada! Motto: Onward"], where)
            self.assertFalse(r["greet_is_error"], where)
            asked = [(method, text) for method, text, _ in r["asked"]]
            self.assertEqual(
                asked,
                [
                    ("elicitation/create", "What is your name?"),
                    ("sampling/createMessage", "A motto?"),
                ],
                where,
            )
            ids = [request_id for _, _, request_id in r["asked"]]
            if mode == "legacy":
                # Server-to-client requests, with JSON-RPC ids: the bridge's translation of
                # input_required for era = "modern", the session-era child's own for "dual".
                self.assertTrue(all(isinstance(i, int) for i in ids), (where, ids))
                self.assertIs(r["ping"], True, where)
            else:
                # input_required rounds straight from the child: its own keys (the SDK
                # names them after the resolvers), not the bridge's "elicitation-N".
                self.assertEqual(
                    [str(i).rsplit(":", 1)[-1] for i in ids], ["ask_name", "ask_motto"], where
                )
            if (server, mode) == ("modern", "legacy"):
                # The bridge answers it: the level then travels with each request.
                self.assertIs(r["set_level"], True, where)
        # dual with sharing = "session": the legacy client's child, and the
        # stateless hub's child of the revision; both are gone with their sessions
        # or still running, but neither failed.
        status = bridge.status("dual")
        self.assertEqual(status["sharing"], "session")
        self.assertNotEqual(status["state"], "failed")
        self.assertEqual(bridge.status("modern")["state"], "running")
        self.assertNotIn("Traceback", bridge.log)
        self.assertLess(time.monotonic() - started, 40.0)
