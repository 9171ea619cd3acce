"""The official MCP conformance suite (server side, requirement set 2025-11-25).

The bridge fronts the stdio fixture C{tests/fixtures/conformance_server.py};
C{conformance server --url .../servers/conf/mcp --requirements 2025-11-25 -o
DIR} writes one C{checks.json} per scenario. Every check that is not
SUCCESS/INFO/WARNING fails the test, listed with its scenario, id and error.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from . import harness as h

FIXTURE = h.REPO / "tests" / "fixtures" / "conformance_server.py"
REQUIRED_2025_11_25 = {
    "server-initialize",
    "logging-set-level",
    "ping",
    "completion-complete",
    "tools-list",
    "tools-call-simple-text",
    "tools-call-image",
    "tools-call-audio",
    "tools-call-embedded-resource",
    "tools-call-mixed-content",
    "tools-call-with-logging",
    "tools-call-error",
    "tools-call-with-progress",
    "tools-call-sampling",
    "tools-call-elicitation",
    "elicitation-sep1034-defaults",
    "elicitation-sep1330-enums",
    "server-sse-multiple-streams",
    "resources-list",
    "resources-read-text",
    "resources-read-binary",
    "resources-templates-read",
    "resources-subscribe",
    "resources-unsubscribe",
    "prompts-list",
    "prompts-get-simple",
    "prompts-get-with-args",
    "prompts-get-embedded-resource",
    "prompts-get-with-image",
    "dns-rebinding-protection",
}

_TIMESTAMP = re.compile(r"-\d{4}-\d{2}-\d{2}T[\d-]+Z$")


def read_checks(out: Path) -> dict[str, list[dict[str, Any]]]:
    """scenario name -> its checks, from DIR/server-<scenario>-<timestamp>/checks.json."""
    scenarios: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(out.glob("server-*/checks.json")):
        # The directory is server-<scenario>-2026-11-21T21-47-22-213Z.
        name = _TIMESTAMP.sub("", path.parent.name[len("server-") :])
        scenarios[name] = json.loads(path.read_text())
    return scenarios


class ConformanceTests(SynchronousTestCase):
    def test_requirements_2025_11_25(self) -> None:
        h.require_node_tools(h.CONFORMANCE_BIN, h.NODE22_BIN / "node")
        if not FIXTURE.exists():
            raise SkipTest(f"{FIXTURE} is not there yet")
        bridge = h.start_bridge(self, h.python_server_toml("conf", [str(FIXTURE)]))
        out = Path(tempfile.mkdtemp(prefix="mcptwist-conformance-"))
        result = h.run(
            [
                str(h.CONFORMANCE_BIN),
                "server",
                "--url",
                bridge.mcp_url("conf"),
                "--requirements",
                "2025-11-25",
                "-o",
                str(out),
            ],
            timeout=180,
            env=h.node_env(tempfile.mkdtemp(prefix="mcptwist-conformance-home-")),
        )
        scenarios = read_checks(out)
        missing = REQUIRED_2025_11_25 - set(scenarios)
        self.assertFalse(
            missing,
            f"scenarios without results: {sorted(missing)}\nstdout:\n{result.stdout[-4000:]}\n"
            f"stderr:\n{result.stderr[-4000:]}",
        )
        failures = []
        for scenario, checks in sorted(scenarios.items()):
            self.assertTrue(checks, f"{scenario}: no checks")
            for check in checks:
                if check.get("status") not in ("SUCCESS", "INFO", "WARNING"):
                    failures.append(
                        f"{scenario}: {check.get('id')} {check.get('status')}: "
                        f"{check.get('errorMessage')} details={json.dumps(check.get('details'))[:400]}"
                    )
        if failures:
            raise AssertionError(
                f"{len(failures)} conformance check(s) failed:\n  "
                + "\n  ".join(failures)
                + f"\n(results in {out})\nbridge log:\n{bridge.log[-3000:]}"
            )
        # Every scored check passed, so the suite itself must say so.
        self.assertEqual(result.returncode, 0, result.stdout[-3000:])
