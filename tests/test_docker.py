"""The Dockerfile, read without Docker: who runs, under what, with which config.

Each check is one a container relies on: a non-root user, an init as PID 1
(twistd's children must be reaped and signalled), twistd in the foreground
without a pid file, a plugin cache written while the image is still root's,
a health check on C{/health}, and a configuration the bridge accepts.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from mcptwist.config.keys import digest_text
from mcptwist.config.load import load_config
from mcptwist.config.model import ConfigError
from mcptwist.mcp import jsonrpc
from mcptwist.security.auth import hash_token

from .support.bridge import Service
from .support.messages import BOTH, INIT, bearer

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
TOKEN = "mcpt_docker_token_for_tests"
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def instructions(text: str) -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuations joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = pending + stripped
        pending = ""
        keyword, _, arguments = whole.partition(" ")
        result.append((keyword.upper(), arguments.strip()))
    return result


class DockerfileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.steps = instructions(DOCKERFILE.read_text())

    def all(self, keyword: str) -> list[str]:
        return [arguments for k, arguments in self.steps if k == keyword]

    def index(self, keyword: str, contains: str = "") -> int:
        for i, (k, arguments) in enumerate(self.steps):
            if k == keyword and contains in arguments:
                return i
        raise AssertionError(f"no {keyword} instruction with {contains!r} in the Dockerfile")

    def exec_form(self, keyword: str) -> list[str]:
        found = self.all(keyword)
        self.assertTrue(found, f"no {keyword} in the Dockerfile")
        # As Docker does, the last one counts.
        parsed: Any = json.loads(found[-1])
        self.assertIsInstance(parsed, list, f"{keyword} should be in exec form (a JSON list)")
        return [str(a) for a in parsed]

    def command_line(self) -> list[str]:
        return self.exec_form("ENTRYPOINT") + self.exec_form("CMD")

    def installed_config(self) -> tuple[str, Path]:
        """(path in the image, file in this checkout) of the configuration a
        RUN step installs from the copied source tree."""
        [source] = [a for k, a in self.steps if k == "COPY" and a.split()[-1] == "/src"]
        self.assertEqual(source.split()[0], ".")
        for arguments in self.all("RUN"):
            words = shlex.split(arguments)
            for i, word in enumerate(words[:-2]):
                if word == "install" and words[i + 1 : i + 2] == ["-D"]:
                    rest = words[i + 1 :]
                    origin, target = rest[: rest.index("&&") if "&&" in rest else None][-2:]
                    self.assertTrue(origin.startswith("/src/"), origin)
                    return target, ROOT / origin.removeprefix("/src/")
        raise AssertionError("no RUN step installs the configuration")

    def test_base_image(self) -> None:
        self.assertEqual(self.all("FROM")[0].split()[0], "python:3.11-slim")

    def test_runs_as_a_user_of_its_own(self) -> None:
        users = self.all("USER")
        self.assertTrue(users, "no USER: the bridge would run as root")
        user = users[-1].split(":")[0]
        self.assertNotIn(user, ("root", "0"))
        self.assertLess(self.index("USER"), self.index("ENTRYPOINT"))
        # The user is created (as a system user) before it is used.
        created = self.index("RUN", "useradd")
        self.assertLess(created, self.index("USER"))
        words = shlex.split(self.steps[created][1])
        useradd = words[words.index("useradd") :]
        self.assertIn("--system", useradd)
        self.assertIn(user, useradd)

    def test_init_is_pid_1(self) -> None:
        """tini runs first: it reaps orphans and passes SIGTERM on to twistd."""
        entrypoint = self.exec_form("ENTRYPOINT")
        self.assertEqual(os.path.basename(entrypoint[0]), "tini")
        self.assertEqual(entrypoint[1], "--")
        installed = self.steps[self.index("RUN", "tini")][1]
        self.assertRegex(installed, r"apt-get install .*\btini\b")
        self.assertLess(self.index("RUN", "tini"), self.index("USER"))

    def test_twistd_in_the_foreground_without_a_pid_file(self) -> None:
        argv = self.command_line()
        twistd = argv.index("twistd")
        self.assertEqual(argv[twistd + 1 : twistd + 4], ["-n", "--pidfile=", "mcpbridge"])
        path, _ = self.installed_config()
        self.assertEqual(argv[argv.index("--config") + 1], path)

    def test_plugin_cache_written_at_build_time(self) -> None:
        """twistd finds plugins through dropin.cache, which the image's user cannot write."""
        install = self.index("RUN", "pip install")
        cache = self.index("RUN", "getPlugins")
        self.assertLessEqual(install, cache)
        self.assertLess(cache, self.index("USER"))
        self.assertIn("twisted.plugin", self.steps[cache][1])

    def test_health_check(self) -> None:
        [check] = self.all("HEALTHCHECK")
        self.assertIn("/health", check)
        self.assertIn(" CMD ", f" {check} ")
        port = re.search(r"127\.0\.0\.1:(\d+)/health", check)
        assert port is not None
        self.assertIn(port.group(1), self.all("EXPOSE")[0].split())
        # The configured listener is on that port.
        _, config = self.installed_config()
        listen = tomllib.loads(config.read_text())["listen"]
        self.assertTrue(any(e.startswith(f"tcp:{port.group(1)}:") for e in listen), listen)

    def test_image_config_asks_for_a_token_and_has_no_admin_api(self) -> None:
        """Read through the real loader: inside a container the bridge listens
        beyond loopback, so it asks every client for a token (whose hash the
        operator must give), keeps DNS-rebinding protection, and serves no admin API."""
        path, file = self.installed_config()
        self.assertEqual(path, "/etc/mcptwist/bridge.toml")
        error = self.assertRaises(ConfigError, load_config, file, {})
        self.assertEqual(error.key, "auth.tokens[0].hash")
        self.assertIn("MCPTWIST_TOKEN_HASH", error.problem)
        config = load_config(file, {"MCPTWIST_TOKEN_HASH": digest_text(hash_token(TOKEN))})
        self.assertEqual(list(config.servers), ["example"])
        self.assertEqual(config.servers["example"].args, ("-m", "mcptwist.example"))
        self.assertEqual(
            [listener.endpoint for listener in config.listeners], ["tcp:8080:interface=0.0.0.0"]
        )
        self.assertFalse(config.insecure)
        self.assertTrue(config.auth.enabled)
        self.assertFalse(any(token.admin for token in config.auth.tokens))
        self.assertFalse(config.admin.enabled)
        self.assertEqual(config.admin.commands, {})

    def test_image_policy_as_a_client_sees_it(self) -> None:
        """The image's configuration, served: a peer without the token gets
        nothing but /health, and the token opens the servers, not the admin API."""
        _, file = self.installed_config()
        config = load_config(file, {"MCPTWIST_TOKEN_HASH": digest_text(hash_token(TOKEN))})
        client = Service(self, config).client
        token = bearer(TOKEN)
        initialize = jsonrpc.dumps(INIT)
        mcp = BOTH

        def status(
            method: str, path: str, headers: dict[str, str], data: bytes | None = None
        ) -> int:
            d = client.request(method, "http://mcptwist:8080" + path, headers=headers, data=data)
            client.flush()
            code: int = self.successResultOf(d).code
            return code

        self.assertEqual(status("GET", "/health", {}), 200)
        for method, path in (("GET", "/admin/servers"), ("GET", "/servers"), ("GET", "/metrics")):
            self.assertEqual(status(method, path, {}), 401, path)
        # The token is no admin, and the image serves no admin API at all.
        self.assertEqual(status("GET", "/servers", token), 403)
        self.assertEqual(status("GET", "/metrics", token), 403)
        self.assertEqual(status("GET", "/admin/servers", token), 404)
        self.assertEqual(status("POST", "/servers/example/mcp", mcp, initialize), 401)
        self.assertEqual(status("POST", "/servers/example/mcp", {**mcp, **token}, initialize), 200)

    def test_entrypoint_program_and_subcommand_are_installed(self) -> None:
        """The installed package provides twistd and its mcpbridge subcommand."""
        from importlib.metadata import entry_points

        scripts = {e.name for e in entry_points(group="console_scripts")}
        self.assertIn("twistd", scripts)
        self.assertIn("twistd", self.command_line())
        if not os.path.exists(TWISTD):
            raise SkipTest("twistd is not installed next to this Python")
        # Without this checkout on the path, as in the image.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        cwd = self.mktemp()
        os.mkdir(cwd)
        result = subprocess.run(
            [TWISTD, "--help"], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
        )
        self.assertIn("mcpbridge", result.stdout, result.stderr)
