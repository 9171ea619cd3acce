"""The twistd plugin: options, service construction, discovery after install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from twisted.application.service import IService
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from mcptwist.service.bridge import BridgeService
from mcptwist.tap import Options, makeService

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
ROOT = Path(__file__).resolve().parent.parent


class OptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        options = Options()
        options.parseOptions([])
        self.assertIsNone(options["config"])
        self.assertEqual(options["listen"], [])

    def test_listen_is_repeatable(self) -> None:
        options = Options()
        options.parseOptions(["--config", "x.toml", "--listen", "tcp:1", "-l", "unix:/tmp/s"])
        self.assertEqual(options["config"], "x.toml")
        self.assertEqual(options["listen"], ["tcp:1", "unix:/tmp/s"])


class MakeServiceTests(SynchronousTestCase):
    def options(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_built_in_default(self) -> None:
        service = makeService(self.options())
        self.assertIsInstance(service, BridgeService)
        assert isinstance(service, BridgeService)
        self.assertEqual(list(service.backends), ["example"])
        self.assertEqual(
            [listener.description for listener in service.listeners],
            ["tcp:8080:interface=127.0.0.1"],
        )

    def test_listen_overrides_config(self) -> None:
        path = Path(self.mktemp())
        path.write_text('listen = ["tcp:1234:interface=127.0.0.1"]\n[servers.a]\ncommand = "a"\n')
        service = makeService(self.options("--config", str(path), "--listen", "unix:/tmp/x.sock"))
        assert isinstance(service, BridgeService)
        self.assertEqual(
            [listener.description for listener in service.listeners], ["unix:/tmp/x.sock"]
        )
        self.assertTrue(IService.providedBy(service))

    def test_config_error_exits_with_the_message(self) -> None:
        path = Path(self.mktemp())
        path.write_text("[servers.a]\nargs = []\n")
        error = self.assertRaises(SystemExit, makeService, self.options("--config", str(path)))
        self.assertEqual(
            str(error), f'mcpbridge: {path}: servers.a.command: missing. Fix: add command = "..."'
        )

    def test_bad_listen_option(self) -> None:
        error = self.assertRaises(SystemExit, makeService, self.options("--listen", "tcpx:1"))
        self.assertIn("--listen[0]", str(error))


class InstalledPluginTests(SynchronousTestCase):
    """twistd finds the plugin from the installed package, not from this checkout."""

    def run_twistd(self, *argv: str) -> subprocess.CompletedProcess[str]:
        if not os.path.exists(TWISTD):
            raise SkipTest("twistd is not installed next to this Python")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        cwd = self.mktemp()
        os.mkdir(cwd)
        return subprocess.run(
            [TWISTD, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
        )

    def test_discoverable_as_a_subcommand(self) -> None:
        result = self.run_twistd("--help")
        self.assertIn("mcpbridge", result.stdout)
        result = self.run_twistd("mcpbridge", "--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("--listen", result.stdout)

    def test_plugin_file_is_installed_not_borrowed_from_the_checkout(self) -> None:
        import twisted.plugins

        own = (ROOT / "twisted" / "plugins" / "mcptwist_plugin.py").resolve()
        found = [Path(p) / "mcptwist_plugin.py" for p in twisted.plugins.__path__]
        installed = [p for p in found if p.exists() and p.resolve() != own]
        self.assertTrue(installed, f"no installed mcptwist_plugin.py in {twisted.plugins.__path__}")

    def test_bad_config_exits_non_zero(self) -> None:
        config = Path(self.mktemp()).absolute()
        config.write_text("[servers.x]\ncommand = 1\n")
        result = self.run_twistd("-n", "--pidfile=", "mcpbridge", "--config", str(config))
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(
            f"{config}: servers.x.command: must be a string", result.stderr + result.stdout
        )

    def test_refuses_non_loopback_without_insecure(self) -> None:
        result = self.run_twistd("-n", "--pidfile=", "mcpbridge", "--listen", "tcp:0")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("refusing to listen on 0.0.0.0", result.stderr + result.stdout)
