"""Loading and validating configuration files."""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.config import (
    DEFAULT_LISTEN,
    ConfigError,
    MiB,
    default_config,
    load_config,
    parse_config,
)


class ConfigFileTests(SynchronousTestCase):
    def write(self, name: str, text: str) -> str:
        path = Path(self.mktemp())
        path.mkdir()
        target = path / name
        target.write_text(text)
        return str(target)

    def load_error(
        self, name: str, text: str, environ: dict[str, str] | None = None
    ) -> ConfigError:
        path = self.write(name, text)
        error = self.assertRaises(ConfigError, load_config, path, environ or {})
        self.assertTrue(str(error).startswith(path + ": "), str(error))
        self.assertIn("Fix: ", str(error))
        return error

    def test_toml(self) -> None:
        path = self.write(
            "bridge.toml",
            """
listen = ["tcp:9000:interface=127.0.0.1", "unix:/tmp/mcp.sock"]
heartbeat_interval = 5
[servers.time]
command = "uvx"
args = ["mcp-server-time", "--local-timezone=${TZ:-UTC}"]
env = { API_KEY = "${KEY}" }
sharing = "session"
max_message_size = "1MiB"
request_timeout = 30
[servers.time.restart]
crash_limit = 3
""",
        )
        config = load_config(path, {"KEY": "s3cret"})
        self.assertEqual(config.listen, ("tcp:9000:interface=127.0.0.1", "unix:/tmp/mcp.sock"))
        self.assertEqual(config.heartbeat_interval, 5.0)
        server = config.servers["time"]
        self.assertEqual(server.command, "uvx")
        self.assertEqual(server.args, ("mcp-server-time", "--local-timezone=UTC"))
        self.assertEqual(dict(server.env), {"API_KEY": "s3cret"})
        self.assertEqual(server.sharing, "session")
        self.assertEqual(server.max_message_size, MiB)
        self.assertEqual(server.request_timeout, 30.0)
        self.assertEqual(server.restart.crash_limit, 3)
        self.assertEqual(config.source, path)

    def test_mcp_servers_json_as_pasted_from_a_client(self) -> None:
        doc = {
            "mcpServers": {
                "fs": {
                    "command": "npx",
                    "args": ["-y", "@modelcontextprotocol/server-filesystem", "/tmp"],
                    "env": {},
                },
                "off": {"command": "x", "disabled": True},
                "git": {
                    "type": "stdio",
                    "command": "uvx",
                    "args": ["mcp-server-git"],
                    "autoApprove": ["git_status"],
                },
            },
            "mcptwist": {"listen": ["tcp:8123:interface=127.0.0.1"]},
        }
        config = load_config(self.write("claude_desktop_config.json", json.dumps(doc)), {})
        self.assertEqual(sorted(config.servers), ["fs", "git"])
        self.assertEqual(config.servers["fs"].args[0], "-y")
        self.assertEqual(config.listen, ("tcp:8123:interface=127.0.0.1",))

    def test_defaults(self) -> None:
        config = load_config(self.write("c.toml", '[servers.a]\ncommand = "a"\n'), {})
        self.assertEqual(config.listen, (DEFAULT_LISTEN,))
        self.assertFalse(config.insecure)
        server = config.servers["a"]
        self.assertEqual(
            (server.sharing, server.max_message_size, server.request_timeout),
            ("shared", 32 * MiB, 300.0),
        )
        self.assertEqual((server.term_after, server.kill_after), (2.0, 2.0))

    def test_allowed_hosts_follow_insecure(self) -> None:
        self.assertEqual(
            load_config(self.write("a.toml", '[servers.a]\ncommand = "a"\n'), {}).allowed_hosts,
            ("localhost", "127.0.0.1", "::1"),
        )
        insecure = load_config(
            self.write("b.toml", 'insecure = true\n[servers.a]\ncommand = "a"\n'), {}
        )
        self.assertEqual(insecure.allowed_hosts, ("*",))
        named = load_config(
            self.write(
                "c.toml",
                'allowed_hosts = ["MCP.example.com", "[::1]"]\n[servers.a]\ncommand = "a"\n',
            ),
            {},
        )
        self.assertEqual(named.allowed_hosts, ("mcp.example.com", "::1"))
        self.assertEqual(
            self.load_error(
                "d.toml", 'allowed_hosts = ["http://x"]\n[servers.a]\ncommand = "a"\n'
            ).key,
            "allowed_hosts[0]",
        )

    def test_built_in_default(self) -> None:
        config = default_config()
        self.assertEqual(list(config.servers), ["example"])
        self.assertEqual(config.servers["example"].args, ("-m", "mcptwist.example"))
        self.assertEqual(config.listen, ("tcp:8080:interface=127.0.0.1",))

    def test_unknown_key_names_it_and_suggests(self) -> None:
        error = self.load_error("c.toml", '[servers.a]\ncommand = "a"\nargz = ["x"]\n')
        self.assertEqual(error.key, "servers.a.argz")
        self.assertIn("did you mean args?", error.fix)

    def test_unknown_top_level_key(self) -> None:
        self.assertEqual(
            self.load_error("c.toml", 'lisen = []\n[servers.a]\ncommand = "a"\n').key, "lisen"
        )

    def test_missing_command(self) -> None:
        error = self.load_error("c.toml", "[servers.a]\nargs = []\n")
        self.assertEqual((error.key, error.problem), ("servers.a.command", "missing"))

    def test_wrong_types(self) -> None:
        cases = {
            '[servers.a]\ncommand = "a"\nargs = "x"\n': "servers.a.args",
            '[servers.a]\ncommand = "a"\nrequest_timeout = -1\n': "servers.a.request_timeout",
            '[servers.a]\ncommand = "a"\nrequest_timeout = "5"\n': "servers.a.request_timeout",
            '[servers.a]\ncommand = "a"\nmax_message_size = "lots"\n': "servers.a.max_message_size",
            '[servers.a]\ncommand = "a"\nsharing = "pool"\n': "servers.a.sharing",
            '[servers.a]\ncommand = "a"\nenv = { X = 1 }\n': "servers.a.env.X",
            'insecure = "yes"\n[servers.a]\ncommand = "a"\n': "insecure",
            'allowed_origins = ["example.com"]\n[servers.a]\ncommand = "a"\n': "allowed_origins[0]",
            '[servers."a b"]\ncommand = "a"\n': "servers.a b",
            '[servers.a]\ncommand = "a"\n[servers.a.restart]\ncrash_limit = 0\n': "servers.a.restart.crash_limit",
        }
        for text, key in cases.items():
            self.assertEqual(self.load_error("c.toml", text).key, key, text)

    def test_undefined_variable(self) -> None:
        error = self.load_error(
            "c.toml", '[servers.a]\ncommand = "a"\nenv = { T = "${GITHUB_TOKEN}" }\n'
        )
        self.assertEqual(error.key, "servers.a.env.T")
        self.assertIn("GITHUB_TOKEN", error.problem)
        self.assertIn("export GITHUB_TOKEN", error.fix)

    def test_bad_endpoint(self) -> None:
        error = self.load_error("c.toml", 'listen = ["tcpp:80"]\n[servers.a]\ncommand = "a"\n')
        self.assertEqual(error.key, "listen[0]")

    def test_no_servers(self) -> None:
        self.assertEqual(self.load_error("c.toml", "listen = []\n").key, "listen")
        self.assertEqual(self.load_error("c.toml", "").key, "servers")
        self.assertEqual(self.load_error("c.json", '{"mcpServers": {}}').key, "servers")

    def test_remote_server_refused(self) -> None:
        error = self.load_error(
            "c.json", '{"mcpServers": {"r": {"type": "sse", "url": "http://x"}}}'
        )
        self.assertEqual(error.key, "servers.r.type")

    def test_syntax_errors(self) -> None:
        self.assertIn("TOML", self.load_error("c.toml", "[servers\n").problem)
        self.assertIn("JSON", self.load_error("c.json", "{,}").problem)
        self.assertEqual(self.load_error("c.json", '{"servers": {}}').key, "servers")

    def test_unreadable_file(self) -> None:
        error = self.assertRaises(ConfigError, load_config, "/nonexistent/bridge.toml", {})
        self.assertIn("cannot be read", str(error))


names = st.text(alphabet=string.ascii_uppercase + "_", min_size=1, max_size=8)
values = st.text(
    alphabet=st.characters(blacklist_characters="$", blacklist_categories=["Cs"]), max_size=20
)


def server_doc(**server: Any) -> dict[str, Any]:
    return {"servers": {"s": {"command": "c", **server}}}


class PropertyTests(SynchronousTestCase):
    @given(st.dictionaries(names, values, max_size=5), values)
    def test_expansion(self, environ: dict[str, str], literal: str) -> None:
        """Every ${VAR} is replaced by its value; text around it is kept; $$ is a dollar."""
        args = [f"{literal}${{{name}}}{literal}$$" for name in environ]
        config = parse_config(server_doc(args=args), "t", environ)
        self.assertEqual(
            list(config.servers["s"].args),
            [f"{literal}{value}{literal}$" for value in environ.values()],
        )

    @given(
        st.integers(min_value=1, max_value=4096),
        st.sampled_from([("KiB", 1024), ("MiB", MiB), ("", 1), ("B", 1)]),
    )
    def test_sizes(self, number: int, unit: tuple[str, int]) -> None:
        text = f"{number}{unit[0]}"
        expected = number * unit[1]
        if expected < 1024:
            self.assertRaises(ConfigError, parse_config, server_doc(max_message_size=text), "t", {})
        else:
            config = parse_config(server_doc(max_message_size=text), "t", {})
            self.assertEqual(config.servers["s"].max_message_size, expected)

    @given(st.dictionaries(st.text(max_size=10), st.integers(), min_size=1, max_size=3))
    def test_unknown_server_keys_always_refused(self, extra: dict[str, int]) -> None:
        known = {
            "command",
            "args",
            "env",
            "cwd",
            "env_passthrough",
            "sharing",
            "max_message_size",
            "request_timeout",
            "max_request_timeout",
            "term_after",
            "kill_after",
            "stderr_lines",
            "stderr_in_errors",
            "max_children",
            "session_idle_timeout",
            "startup_timeout",
            "json_response",
            "restart",
            "disabled",
            "type",
            "url",
            "autoApprove",
            "alwaysAllow",
            "description",
            "disabledTools",
            "timeout",
        }
        extra = {k: v for k, v in extra.items() if k not in known}
        if not extra:
            return
        error = self.assertRaises(ConfigError, parse_config, server_doc(**extra), "t", {})
        self.assertTrue(error.key.startswith("servers.s."))


class ShippedExamplesTests(SynchronousTestCase):
    def test_examples_in_etc_load(self) -> None:
        """The example configurations shipped in etc/ stay valid."""
        etc = Path(__file__).resolve().parent.parent / "etc"
        examples = sorted([*etc.glob("*.toml"), *etc.glob("*.json")])
        self.assertTrue(examples)
        for path in examples:
            config = load_config(path, {})
            self.assertTrue(config.servers, path)
