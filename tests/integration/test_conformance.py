"""The official MCP conformance suite (server side), one test per requirement set.

The bridge fronts the stdio fixture C{tests/fixtures/conformance_server.py};
C{conformance server --url .../servers/conf/mcp --requirements REVISION -o
DIR} writes one C{checks.json} per scenario. A check that is not
SUCCESS/INFO/WARNING fails the test, listed with its scenario, id and error.

For 2025-11-25 every scenario the suite runs counts, the ones it does not
score too. For 2026-07-28 only the required set counts: the suite also runs
scenarios it does not score for that revision (the tasks extension, and
json-schema-2020-12, http-header-validation and
http-custom-header-server-validation, pending), and those are reported by
the suite but never fail this test.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from . import harness as h

FIXTURE = h.REPO / "tests" / "fixtures" / "conformance_server.py"
PASSING = ("SUCCESS", "INFO", "WARNING")

# The `server:` lists of @modelcontextprotocol/conformance's
# requirements/REVISION.yaml (frozen when the revision shipped).
REQUIRED_2025_11_25 = frozenset(
    {
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
)
REQUIRED_2026_07_28 = frozenset(
    {
        "server-stateless",
        "completion-complete",
        "tools-list",
        "tools-call-simple-text",
        "tools-call-image",
        "tools-call-audio",
        "tools-call-embedded-resource",
        "tools-call-mixed-content",
        "tools-call-error",
        "tools-call-with-progress",
        "server-sse-multiple-streams",
        "resources-list",
        "resources-read-text",
        "resources-read-binary",
        "resources-templates-read",
        "sep-2164-resource-not-found",
        "prompts-list",
        "prompts-get-simple",
        "prompts-get-with-args",
        "prompts-get-embedded-resource",
        "prompts-get-with-image",
        "dns-rebinding-protection",
        "caching",
        "input-required-result-basic-elicitation",
        "input-required-result-basic-sampling",
        "input-required-result-basic-list-roots",
        "input-required-result-request-state",
        "input-required-result-multiple-input-requests",
        "input-required-result-multi-round",
        "input-required-result-missing-input-response",
        "input-required-result-non-tool-request",
        "input-required-result-result-type",
        "input-required-result-unsupported-methods",
        "input-required-result-tampered-state",
        "input-required-result-capability-check",
        "input-required-result-ignore-extra-params",
        "input-required-result-validate-input",
    }
)

_TIMESTAMP = re.compile(r"-\d{4}-\d{2}-\d{2}T[\d-]+Z$")


def read_checks(out: Path) -> dict[str, list[dict[str, Any]]]:
    """scenario name -> its checks, from DIR/server-<scenario>-<timestamp>/checks.json."""
    scenarios: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(out.glob("server-*/checks.json")):
        # The directory is server-<scenario>-2026-11-21T21-47-22-213Z.
        name = _TIMESTAMP.sub("", path.parent.name[len("server-") :])
        scenarios[name] = json.loads(path.read_text())
    return scenarios


def failed_checks(scenario: str, checks: list[dict[str, Any]]) -> list[str]:
    """One line per check of a scenario that did not pass (or one if it has none)."""
    if not checks:
        return [f"{scenario}: no checks"]
    return [
        f"{scenario}: {check.get('id')} {check.get('status')}: "
        f"{check.get('errorMessage')} details={json.dumps(check.get('details'))[:400]}"
        for check in checks
        if check.get("status") not in PASSING
    ]


class ConformanceTests(SynchronousTestCase):
    def run_suite(self, revision: str) -> tuple[h.Bridge, Path, subprocess.CompletedProcess[str]]:
        """Run C{conformance server --requirements REVISION} against the bridged fixture."""
        h.require_node_tools(h.CONFORMANCE_BIN, h.NODE22_BIN / "node")
        if not FIXTURE.exists():
            raise SkipTest(f"{FIXTURE} is not there yet")
        bridge = h.start_bridge(self, h.python_server_toml("conf", [str(FIXTURE)]))
        out = Path(tempfile.mkdtemp(prefix=f"mcptwist-conformance-{revision}-"))
        result = h.run(
            [
                str(h.CONFORMANCE_BIN),
                "server",
                "--url",
                bridge.mcp_url("conf"),
                "--requirements",
                revision,
                "-o",
                str(out),
            ],
            timeout=180,
            env=h.node_env(tempfile.mkdtemp(prefix="mcptwist-conformance-home-")),
        )
        return bridge, out, result

    def check_requirements(
        self, revision: str, required: frozenset[str], scored: frozenset[str] | None
    ) -> None:
        """Every required scenario ran, and every scored one passed.

        C{scored} is the set of scenarios whose checks count; None counts
        every scenario the suite ran.
        """
        bridge, out, result = self.run_suite(revision)
        scenarios = read_checks(out)
        missing = required - set(scenarios)
        self.assertFalse(
            missing,
            f"{revision}: scenarios without results: {sorted(missing)}\n"
            f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}",
        )
        failures = [
            line
            for scenario, checks in sorted(scenarios.items())
            if scored is None or scenario in scored
            for line in failed_checks(scenario, checks)
        ]
        if failures:
            raise AssertionError(
                f"{revision}: {len(failures)} conformance check(s) failed:\n  "
                + "\n  ".join(failures)
                + f"\n(results in {out})\nbridge log:\n{bridge.log[-3000:]}"
            )
        # Every scored check passed, so the suite itself must say so.
        self.assertEqual(
            result.returncode,
            0,
            f"{revision}: the suite exited {result.returncode}\n{result.stdout[-3000:]}",
        )

    def test_requirements_2025_11_25(self) -> None:
        self.check_requirements("2025-11-25", REQUIRED_2025_11_25, scored=None)

    def test_requirements_2026_07_28(self) -> None:
        """The stateless revision, served in front of the session-era fixture."""
        self.check_requirements("2026-07-28", REQUIRED_2026_07_28, scored=REQUIRED_2026_07_28)
