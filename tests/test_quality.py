"""Lint, format and type checks, so that CI enforces them with the tests."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
TEST_DIRS = ("tests", "tests/support", "tests/fixtures", "tests/integration")


def tool(name: str) -> str:
    path = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.exists(path):
        return path
    found = shutil.which(name)
    if found is None:
        if os.environ.get("CI"):
            raise AssertionError(f"{name} is not installed (pip install '.[test]')")
        raise SkipTest(f"{name} is not installed")
    return found


class QualityTests(SynchronousTestCase):
    def check(self, *argv: str, env: dict[str, str] | None = None) -> None:
        result = subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_ruff_lint(self) -> None:
        self.check(tool("ruff"), "check", "src", "tests", "twisted")

    def test_ruff_format(self) -> None:
        self.check(tool("ruff"), "format", "--check", "src", "tests", "twisted")

    def test_mypy(self) -> None:
        self.check(tool("mypy"))

    def test_import_layers(self) -> None:
        """The layer contract in setup.cfg: no room imports a room above it."""
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        self.check(tool("lint-imports"), "--no-cache", env=env)

    def test_no_import_cycles(self) -> None:
        """No module imports, even indirectly, a module that imports it: the
        layer contract orders the rooms; this orders the modules inside each."""
        script = (
            "import grimp\n"
            "g = grimp.build_graph('mcptwist', cache_dir=None)\n"
            "for a in sorted(g.modules):\n"
            "    for b in sorted(g.find_modules_directly_imported_by(a)):\n"
            "        if a in g.find_upstream_modules(b):\n"
            "            print(a, '->', b)\n"
        )
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        result = subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, env=env
        )
        self.assertEqual((result.returncode, result.stdout), (0, ""), result.stderr)


def imported_modules(path: Path) -> list[str]:
    """The dotted names of the modules a file imports, relative ones resolved."""
    package = path.parent.relative_to(ROOT).parts
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], node.module or ""])
            else:
                base = node.module or ""
            base = base.rstrip(".")
            found += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return found


class TestLayoutTests(SynchronousTestCase):
    def test_no_test_module_imports_another(self) -> None:
        """What tests share lives in support modules: a test module runs, moves
        and goes alone."""
        imports = []
        for directory in TEST_DIRS:
            for path in sorted((ROOT / directory).glob("*.py")):
                for name in imported_modules(path):
                    parts = name.split(".")
                    if parts[0] == "tests" and any(p.startswith("test_") for p in parts):
                        imports.append(f"{path.relative_to(ROOT)}: {name}")
        self.assertEqual(imports, [])

    def test_test_case_names_name_test_modules(self) -> None:
        """Each source file's test-case-name header names test modules that exist."""
        header = re.compile(r"^# -\*- test-case-name: (.+) -\*-$", re.MULTILINE)
        missing = []
        for path in sorted([*(ROOT / "src").rglob("*.py"), *(ROOT / "twisted").rglob("*.py")]):
            for found in header.findall(path.read_text()):
                for name in found.split(","):
                    module = ROOT / (name.strip().replace(".", "/") + ".py")
                    if not module.exists():
                        missing.append(f"{path.relative_to(ROOT)}: {name.strip()}")
        self.assertEqual(missing, [])
