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

L{TasksConformanceTests} runs the tasks extension's scenarios (C{tasks-*},
which no requirement set scores) one by one at 2026-07-28 with C{--force}:
those in L{TASK_SCENARIOS} must pass every check.

L{EndpointConformanceTests} runs the same two revisions through an
aggregating endpoint of the fixture alone with its names unchanged
(C{[endpoints.solo]}, C{prefix = "none"}) at /endpoints/solo/mcp.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Final

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from . import harness as h

FIXTURE = h.FIXTURES / "conformance_server.py"
PASSING = ("SUCCESS", "INFO", "WARNING")

_TIMESTAMP = re.compile(r"-\d{4}-\d{2}-\d{2}T[\d-]+Z$")
REQUIREMENTS = h.REPO / "tests/node/node_modules/@modelcontextprotocol/conformance/requirements"


def required(revision: str) -> frozenset[str]:
    """The C{server:} list of the suite's requirements/REVISION.yaml, the
    scenarios a server must pass (frozen when the revision shipped)."""
    names: list[str] = []
    inside = False
    for line in (REQUIREMENTS / f"{revision}.yaml").read_text().splitlines():
        if line.strip() and not line.startswith((" ", "#")):
            inside = line.rstrip() == "server:"
        elif inside and line.strip().startswith("- "):
            names.append(line.strip()[2:].split("#", 1)[0].strip())
    # A list this short means the file changed shape, not that nothing is required.
    assert len(names) > 20 and "dns-rebinding-protection" in names, names
    return frozenset(names)


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
    # What the bridge serves (besides the fixture, as "conf"), and the path the suite tests.
    ENDPOINT = ""
    PATH = "/servers/conf/mcp"

    def run_suite(self, revision: str) -> tuple[h.Bridge, Path, subprocess.CompletedProcess[str]]:
        """Run C{conformance server --requirements REVISION} against the bridged fixture."""
        h.require_node_tools(h.CONFORMANCE_BIN, h.NODE22_BIN / "node")
        if not FIXTURE.exists():
            raise SkipTest(f"{FIXTURE} is not there yet")
        bridge = h.start_bridge(self, h.python_server_toml("conf", [str(FIXTURE)]) + self.ENDPOINT)
        out = Path(tempfile.mkdtemp(prefix=f"mcptwist-conformance-{revision}-"))
        result = h.run(
            [
                str(h.CONFORMANCE_BIN),
                "server",
                "--url",
                bridge.url(self.PATH),
                "--requirements",
                revision,
                "-o",
                str(out),
            ],
            timeout=180,
            env=h.node_env(tempfile.mkdtemp(prefix="mcptwist-conformance-home-")),
        )
        return bridge, out, result

    def check_requirements(self, revision: str, every_scenario: bool) -> None:
        """Every required scenario ran, and every scored one passed: the
        required ones, or with C{every_scenario} every one the suite ran."""
        bridge, out, result = self.run_suite(revision)
        needed = required(revision)
        scenarios = read_checks(out)
        missing = needed - set(scenarios)
        self.assertFalse(
            missing,
            f"{revision}: scenarios without results: {sorted(missing)}\n"
            f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}",
        )
        failures = [
            line
            for scenario, checks in sorted(scenarios.items())
            if every_scenario or scenario in needed
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
        self.check_requirements("2025-11-25", every_scenario=True)

    def test_requirements_2026_07_28(self) -> None:
        """The stateless revision, served in front of the session-era fixture."""
        self.check_requirements("2026-07-28", every_scenario=False)


# The tasks-* scenarios the bridge passes in front of the session-era fixture.
# Not listed: tasks-status-notifications, which the suite itself skips.
TASK_SCENARIOS: Final = (
    "tasks-lifecycle",
    "tasks-capability-negotiation",
    "tasks-wire-fields",
    "tasks-request-state-removal",
    "tasks-request-headers",
    "tasks-dispatch-and-envelope",
    "tasks-required-task-error",
    "tasks-mrtr-input",
    "tasks-mrtr-composition",
)


class TasksConformanceTests(SynchronousTestCase):
    """The tasks extension (SEP-2663), served by the bridge for a child that
    knows nothing of it."""

    def test_task_scenarios(self) -> None:
        h.require_node_tools(h.CONFORMANCE_BIN, h.NODE22_BIN / "node")
        bridge = h.start_bridge(
            self,
            h.python_server_toml(
                "conf", [str(FIXTURE)], 'task_after_input = ["test_tool_with_task"]'
            ),
        )
        out = Path(tempfile.mkdtemp(prefix="mcptwist-conformance-tasks-"))
        home = tempfile.mkdtemp(prefix="mcptwist-conformance-home-")
        failures: list[str] = []
        for scenario in TASK_SCENARIOS:
            result = h.run(
                [
                    str(h.CONFORMANCE_BIN),
                    "server",
                    "--url",
                    bridge.url("/servers/conf/mcp"),
                    "--scenario",
                    scenario,
                    "--spec-version",
                    "2026-07-28",
                    "--force",
                    "-o",
                    str(out),
                ],
                timeout=120,
                env=h.node_env(home),
            )
            checks = read_checks(out).get(scenario)
            if checks is None:
                failures.append(f"{scenario}: no results\n{result.stdout[-2000:]}")
                continue
            failures += failed_checks(scenario, checks)
        if failures:
            raise AssertionError(
                f"{len(failures)} tasks check(s) failed:\n  "
                + "\n  ".join(failures)
                + f"\n(results in {out})\nbridge log:\n{bridge.log[-3000:]}"
            )


class EndpointConformanceTests(ConformanceTests):
    """The same suite through an aggregating endpoint of the fixture alone,
    with its names unchanged (C{prefix = "none"})."""

    ENDPOINT = '[endpoints.solo]\nservers = ["conf"]\nprefix = "none"\n'
    PATH = "/endpoints/solo/mcp"
