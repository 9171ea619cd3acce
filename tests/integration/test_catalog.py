"""Every server of the catalog, installed from its registry, starts through
the bridge and answers tools/list.

The configuration is written by C{python -m mcptwist catalog add}, entry by
entry, as an operator would; the bridge then runs each server with the
command the catalog gives (C{uvx} for PyPI packages, C{npx} for npm ones),
which fetch the pinned package from the registry on first use.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from mcptwist.config import catalog

from . import harness as h

CATALOG = h.REPO / "etc" / "catalog"
# What a first start may take: the package is fetched and installed then.
FIRST_START = 240.0
ACCEPT = {"Accept": "application/json, text/event-stream"}


def initialize(url: str, timeout: float) -> tuple[int, dict[str, str], bytes]:
    message = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "catalog-test", "version": "1"},
        },
    }
    return h.http("POST", url, message, ACCEPT, timeout=timeout)


class CatalogTests(TestCase):
    def setUp(self) -> None:
        bin_dir = Path(sys.executable).parent
        if shutil.which("uvx", path=str(bin_dir)) is None or shutil.which("npx") is None:
            raise self.skipTest("uvx (the uv package) and npx are needed")
        self.work = Path(self.mktemp()).resolve()
        self.work.mkdir()
        repo = self.work / "repo"
        subprocess.run(["git", "init", "-q", str(repo)], check=True)
        (self.work / "files").mkdir()
        (self.work / "files" / "hello.txt").write_text("hello\n")
        self.values: dict[str, dict[str, str]] = {
            "git": {"REPOSITORY": str(repo)},
            "sqlite": {"DB_PATH": str(self.work / "data.db")},
            "filesystem": {"ROOT": str(self.work / "files")},
        }
        self.entries = catalog.entries(CATALOG)
        config = self.work / "mcpbridge.toml"
        config.write_text("")
        for entry in self.entries.values():
            argv = [sys.executable, "-m", "mcptwist", "catalog", "--catalog", str(CATALOG)]
            argv += ["add", entry.name, "--config", str(config)]
            for name, value in self.values.get(entry.name, {}).items():
                argv += ["--set", f"{name}={value}"]
            done = subprocess.run(argv, capture_output=True, text=True, env=h.python_env())
            self.assertEqual(done.returncode, 0, done.stderr)
        # Secrets the servers start without (they are used only when a tool is called).
        env: dict[str, Any] = {
            "GITHUB_PERSONAL_ACCESS_TOKEN": "ghp_not_a_real_token",
            "POSTGRES_URL": "postgresql://reader:pw@127.0.0.1:9/none",
            "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", os.defpath)]),
        }
        self.bridge = h.start_bridge(self, config.read_text(), env=env)

    def test_every_entry_answers_tools_list(self) -> None:
        for name in self.entries:
            url = self.bridge.mcp_url(name)
            code, headers, body = initialize(url, FIRST_START)
            self.assertEqual(code, 200, (name, body[:500], self.bridge.log[-3000:]))
            self.assertIn("mcp-session-id", headers, (name, headers, body[:800]))
            session = headers["mcp-session-id"]
            session_headers = {**ACCEPT, "Mcp-Session-Id": session}
            h.http(
                "POST",
                url,
                {"jsonrpc": "2.0", "method": "notifications/initialized"},
                session_headers,
            )
            code, headers, body = h.http(
                "POST",
                url,
                {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
                session_headers,
                timeout=60,
            )
            self.assertEqual(code, 200, (name, body[:500]))
            [answer] = h.jsonrpc_body(headers, body)
            tools = answer["result"]["tools"]
            self.assertTrue(tools, name)
            self.assertTrue(all(isinstance(t.get("name"), str) for t in tools), name)
