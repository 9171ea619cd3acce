"""Loading and validating configuration files."""

from __future__ import annotations

import json
import os
import string
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.config.load import load_config, parse_config, quoted
from mcptwist.config.model import (
    DEFAULT_LISTEN,
    BridgeConfig,
    Bucket,
    ConfigError,
    MiB,
    TasksConfig,
    default_config,
)

from .support.certs import make_ca, make_server_cert


def endpoints(config: BridgeConfig) -> tuple[str, ...]:
    return tuple(listener.endpoint for listener in config.listeners)


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
        self.assertEqual(endpoints(config), ("tcp:9000:interface=127.0.0.1", "unix:/tmp/mcp.sock"))
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
        self.assertEqual(endpoints(config), ("tcp:8123:interface=127.0.0.1",))

    def test_defaults(self) -> None:
        config = load_config(self.write("c.toml", '[servers.a]\ncommand = "a"\n'), {})
        self.assertEqual(endpoints(config), (DEFAULT_LISTEN,))
        self.assertFalse(config.insecure)
        server = config.servers["a"]
        self.assertEqual(
            (server.sharing, server.max_message_size, server.request_timeout),
            ("shared", 32 * MiB, 300.0),
        )
        self.assertEqual((server.term_after, server.kill_after), (2.0, 2.0))
        # No web page may drive the bridge unless its origin is listed.
        self.assertEqual(config.allowed_origins, ())

    def test_stderr_in_errors_off_by_default_with_authentication(self) -> None:
        """A shared child's stderr may hold another client's data: once clients
        authenticate (strangers to each other), it is not sent to them unless
        the server says so; without authentication it helps the one local user."""
        from mcptwist.config.keys import digest_text
        from mcptwist.security.auth import hash_token

        token = f'[[auth.tokens]]\nname = "t"\nhash = "{digest_text(hash_token("mcpt_t"))}"\n'
        servers = (
            '[servers.a]\ncommand = "a"\n[servers.on]\ncommand = "a"\nstderr_in_errors = true\n'
        )
        servers += '[servers.off]\ncommand = "a"\nstderr_in_errors = false\n'
        for name, auth, expected in (
            ("open.toml", "", {"a": True, "on": True, "off": False}),
            ("auth.toml", token, {"a": False, "on": True, "off": False}),
        ):
            config = load_config(self.write(name, auth + servers), {})
            self.assertEqual(
                {n: s.stderr_in_errors for n, s in config.servers.items()}, expected, name
            )

    def test_allowed_hosts_are_never_widened_by_insecure(self) -> None:
        """insecure opens listeners to the network; it leaves DNS-rebinding
        protection on: the names the bridge answers to stay loopback's."""
        self.assertEqual(
            load_config(self.write("a.toml", '[servers.a]\ncommand = "a"\n'), {}).allowed_hosts,
            ("localhost", "127.0.0.1", "::1"),
        )
        insecure = load_config(
            self.write("b.toml", 'insecure = true\n[servers.a]\ncommand = "a"\n'), {}
        )
        self.assertTrue(insecure.insecure)
        self.assertEqual(insecure.allowed_hosts, ("localhost", "127.0.0.1", "::1"))
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
        self.assertEqual(endpoints(config), ("tcp:8080:interface=127.0.0.1",))

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

    def test_no_error_repeats_a_value_from_the_environment(self) -> None:
        """A value written as ${VAR} may be a secret: an error names the
        variable, never its value, wherever the value ends up."""
        secret = "s3cr3t-value-42"
        environ = {"SECRET": secret, "PORT": "8080"}
        cases = {
            '[servers.a]\ncommand = "a"\ncwd = "${SECRET}"\n': "servers.a.cwd",
            '[servers.a]\ncommand = "a"\ncwd = "/x/${SECRET}/y"\n': "servers.a.cwd",
            '[servers.a]\ncommand = "a"\nsharing = "${SECRET}"\n': "servers.a.sharing",
            '[servers.a]\ncommand = "a"\nera = "${SECRET}"\n': "servers.a.era",
            'listen = ["tcp:${SECRET}"]\n[servers.a]\ncommand = "a"\n': "listen[0]",
            'allowed_hosts = ["${SECRET}/"]\n[servers.a]\ncommand = "a"\n': "allowed_hosts[0]",
            '[audit]\npath = "/nonexistent/${SECRET}/audit.log"\n[servers.a]\ncommand = "a"\n': "audit.path",
            '[admin.commands.c]\ncommand = "c"\ncwd = "${SECRET}"\n[servers.a]\ncommand = "a"\n': "admin.commands.c.cwd",
        }
        for text, key in cases.items():
            error = self.load_error("c.toml", text, environ)
            self.assertEqual(error.key, key, text)
            self.assertNotIn(secret, str(error), text)
            self.assertIn("${SECRET}", str(error), text)
        # A parser's own message quotes a value cut up its own way (here the
        # endpoint parser splits at ":" and unescapes "\\"): not repeated at all.
        token = "ghp_AbCdEfGh1234\\:5678ijklMNOP"
        error = self.load_error(
            "c.toml", 'listen = ["tcp:${TOKEN}"]\n[servers.a]\ncommand = "a"\n', {"TOKEN": token}
        )
        self.assertEqual(error.key, "listen[0]")
        self.assertNotIn("AbCdEfGh1234", str(error))
        self.assertNotIn("ijklMNOP", str(error))

    def test_admin_table(self) -> None:
        """[admin]: on by default with no commands (adding servers is off);
        each command is what runs, checked as a server's would be."""
        plain = load_config(self.write("a.toml", '[servers.a]\ncommand = "a"\n'), {})
        self.assertEqual((plain.admin.enabled, dict(plain.admin.commands)), (True, {}))
        config = load_config(
            self.write(
                "b.toml",
                "[admin]\nenabled = false\n"
                '[admin.commands.time]\ncommand = "uvx"\nargs = ["mcp-server-time"]\n'
                'env = { TZ = "${ZONE}" }\n[servers.a]\ncommand = "a"\n',
            ),
            {"ZONE": "UTC"},
        )
        self.assertFalse(config.admin.enabled)
        time = config.admin.commands["time"]
        self.assertEqual(
            (time.command, time.args, dict(time.env)), ("uvx", ("mcp-server-time",), {"TZ": "UTC"})
        )
        for text, key in (
            ('[admin.commands.t]\nargs = ["x"]\n', "admin.commands.t.command"),
            (
                '[admin.commands.t]\ncommand = "x"\nsharing = "session"\n',
                "admin.commands.t.sharing",
            ),
            ('[admin.commands."a b"]\ncommand = "x"\n', "admin.commands.a b"),
            ("[admin]\nenable = true\n", "admin.enable"),
        ):
            self.assertEqual(
                self.load_error("c.toml", text + '[servers.a]\ncommand = "a"\n').key, key
            )

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


class SecuritySettingsTests(SynchronousTestCase):
    """[[listeners]], [auth], [limits], [audit] and the per-server rules."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        ca = make_ca(self.dir)
        self.cert, self.key = make_server_cert(self.dir, ca)
        self.digest = "sha256:" + "ab" * 32

    def parse(self, text: str) -> BridgeConfig:
        path = Path(self.dir, "c.toml")
        path.write_text(text + '\n[servers.a]\ncommand = "a"\n')
        return load_config(path, {"D": self.dir})

    def error(self, text: str) -> ConfigError:
        return self.assertRaises(ConfigError, self.parse, text)

    def test_tasks(self) -> None:
        self.assertEqual(self.parse("").tasks, TasksConfig())
        tasks = self.parse(
            "[tasks]\nttl = 60\nmax_tasks = 5\nmax_tasks_per_principal = 2\n"
            'max_result_size = "1KiB"\npoll_interval = 0.5\n'
        ).tasks
        self.assertEqual(tasks, TasksConfig(True, 60.0, 5, 2, 1024, 0.5))
        for text, key in [
            ("[tasks]\nttl = 0", "tasks.ttl"),
            ("[tasks]\nttl = 1\npoll_interval = 2", "tasks.ttl"),
            (
                "[tasks]\nmax_tasks = 2\nmax_tasks_per_principal = 3",
                "tasks.max_tasks_per_principal",
            ),
            ("[tasks]\nlimit = 3", "tasks.limit"),
        ]:
            error = self.error(text)
            self.assertEqual(error.key, key, text)
            self.assertIn("c.toml", error.source)

    def test_everything_on(self) -> None:
        config = self.parse(
            f"""
listen = ["ssl:8443:privateKey={self.key}:certKey={self.cert}:interface=127.0.0.1"]
[[listeners]]
endpoint = "tcp:8444:interface=127.0.0.1"
tls = {{ certificate = "{self.cert}", key = "{self.key}", min_version = "1.3" }}
allow = ["10.0.0.0/8", "::1"]
deny = ["10.1.0.0/16"]
trusted_proxies = ["127.0.0.1"]
[auth]
authorization_servers = ["https://auth.example.com"]
resource_url = "https://mcp.example.com/"
[[auth.tokens]]
name = "ci"
hash = "{self.digest}"
servers = ["a"]
[auth.jwt]
audience = ["https://mcp.example.com"]
issuer = "https://auth.example.com"
key_file = "{self.cert}"
[limits]
per_ip = false
per_principal = {{ rate = 5, burst = 10 }}
[audit]
path = "${{D}}/audit.jsonl"
"""
        )
        ssl, table = config.listeners
        self.assertEqual(ssl.endpoint, "tcp:8443:interface=127.0.0.1")
        assert ssl.tls is not None and table.tls is not None
        self.assertEqual((ssl.tls.certificate, ssl.tls.key), (self.cert, self.key))
        self.assertEqual(table.tls.min_version, "1.3")
        self.assertEqual([str(n) for n in table.allow], ["10.0.0.0/8", "::1/128"])
        self.assertEqual(config.auth.resource_url, "https://mcp.example.com")
        self.assertEqual(config.auth.tokens[0].servers, frozenset({"a"}))
        self.assertEqual(config.limits.per_ip, None)
        self.assertEqual(config.limits.per_principal, Bucket(5.0, 10))
        self.assertEqual(config.audit.path, f"{self.dir}/audit.jsonl")
        # With authentication, any Host may be used (tokens defeat DNS rebinding).
        self.assertEqual(config.allowed_hosts, ("*",))

    def test_errors_name_the_key(self) -> None:
        cases = {
            'listen = ["ssl:8443:privateKey=/nonexistent.pem"]': "listen[0]",
            'listen = ["ssl:8443:privateKey=k.pem:dhParameters=dh.pem"]': "listen[0]",
            '[[listeners]]\nendpoint = "tcp:1"\nallow = ["10.0.0.0/33"]': "listeners[0].allow",
            '[[listeners]]\nendpoint = "tcp:1"\ntls = { key = "k" }': "listeners[0].tls.certificate",
            '[[listeners]]\nendpoint = "tcp:1"\nproxy_protocol = true': "listeners[0].proxy_protocol",
            '[[listeners]]\nendpoint = "tcp:1"\nunix_peers = "maybe"': "listeners[0].unix_peers",
            '[[listeners]]\nendpoint = "tcp:1"\nport = 1': "listeners[0].port",
            '[[auth.tokens]]\nname = "x"\nhash = "md5:abc"': "auth.tokens[0].hash",
            f'[[auth.tokens]]\nname = "x"\nhash = "{self.digest}"\nservers = ["zz"]': "auth.tokens[x].servers",
            '[auth.jwt]\naudience = ["x"]\nissuer = "https://i"': "auth.jwt.key_file",
            f'[auth.jwt]\nkey_file = "{self.cert}"': "auth.jwt.audience",
            f'[auth.jwt]\naudience = ["x"]\nissuer = "https://i"\nkey_file = "{self.cert}"\nalgorithms = ["none"]': "auth.jwt.algorithms[0]",
            "[limits]\nper_ip = { rate = 0 }": "limits.per_ip.rate",
            '[audit]\npath = "/nonexistent/dir/audit.jsonl"': "audit.path",
            f'[auth.jwt]\naudience = ["x"]\nissuer = "https://i"\nkey_file = "{self.cert}"\nalgorithms = ["ES256"]': "auth.jwt.key_file",
            '[auth.jwt]\naudience = ["x"]\nissuer = "https://i"\njwks_url = "http://localhost@evil.example/j"': "auth.jwt.jwks_url",
            '[[listeners]]\nendpoint = "tcp:1"\ntls = {}': "listeners[0].tls.certificate",
            'listen = ["haproxy:tcp:1"]': "listen[0]",
            '[auth]\nauthorization_servers = ["http://idp"]\nresource_url = "https://m"': "auth.authorization_servers[0]",
            f'[auth.jwt]\naudience = ["x"]\nissuer = "https://i"\nkey_file = "{self.cert}"\njwks_refresh = 1': "auth.jwt.jwks_refresh",
            f'[auth]\nauthorization_servers = ["https://a"]\nresource_url = "https://m"\n[auth.jwt]\naudience = ["x"]\nissuer = "https://i"\nkey_file = "{self.cert}"\ndefault_servers = ["zz"]': "auth.jwt.default_servers",
            '[auth]\nauthorization_servers = ["https://a"]': "auth.resource_url",
        }
        for text, key in cases.items():
            error = self.error(text)
            self.assertEqual(error.key, key, text)
            self.assertTrue(error.fix, text)
            self.assertIn("c.toml", str(error), text)

    def test_jwt_needs_an_issuer(self) -> None:
        """Without issuer any iss the keys sign for would pass (a shared JWKS
        serves other tenants too): refused, naming the file, the key and the fix."""
        for issuer in ("", 'issuer = ""\n'):
            error = self.error(
                '[auth]\nauthorization_servers = ["https://a"]\nresource_url = "https://m"\n'
                f'[auth.jwt]\naudience = ["x"]\n{issuer}key_file = "{self.cert}"'
            )
            self.assertEqual(error.key, "auth.jwt.issuer")
            self.assertIn("any issuer", error.problem)
            self.assertIn('issuer = "https://', error.fix)
            self.assertTrue(str(error).startswith(os.path.join(self.dir, "c.toml")), str(error))

    def test_limits_on_receiving_requests(self) -> None:
        defaults = self.parse("").limits
        self.assertEqual(
            (
                defaults.preauth_body,
                defaults.max_connections_per_ip,
                defaults.header_timeout,
                defaults.body_timeout,
            ),
            (64 * 1024, 64, 20.0, 60.0),
        )
        limits = self.parse(
            '[limits]\npreauth_body = "16KiB"\nmax_connections_per_ip = 8\n'
            "header_timeout = 5\nbody_timeout = 12.5\n"
        ).limits
        self.assertEqual(
            (
                limits.preauth_body,
                limits.max_connections_per_ip,
                limits.header_timeout,
                limits.body_timeout,
            ),
            (16 * 1024, 8, 5.0, 12.5),
        )
        for text, key, fix in (
            ("preauth_body = 10", "limits.preauth_body", '"64KiB"'),
            ("max_connections_per_ip = 0", "limits.max_connections_per_ip", "64"),
            ("header_timeout = 0", "limits.header_timeout", "20"),
            ('body_timeout = "1m"', "limits.body_timeout", "60"),
        ):
            error = self.error("[limits]\n" + text)
            self.assertEqual(error.key, key, text)
            self.assertIn(fix, error.fix, text)
            self.assertIn("c.toml", str(error), text)

    def test_jwt_needs_authorization_servers(self) -> None:
        error = self.error(
            f'[auth.jwt]\naudience = ["x"]\nissuer = "https://i"\nkey_file = "{self.cert}"'
        )
        self.assertEqual(error.key, "auth.authorization_servers")

    def test_per_server_rules(self) -> None:
        path = Path(self.dir, "c.toml")
        path.write_text(
            '[servers.a]\ncommand = "a"\nallow = ["192.0.2.0/24"]\naudit_arguments = true\n'
            "limits = { total = { rate = 1, burst = 2 } }\n"
        )
        server = load_config(path, {}).servers["a"]
        self.assertEqual([str(n) for n in server.allow], ["192.0.2.0/24"])
        self.assertTrue(server.audit_arguments)
        self.assertEqual(server.limits.total, Bucket(1.0, 2))
        self.assertIsNone(server.limits.per_ip)


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
        st.one_of(
            st.text(
                alphabet=string.ascii_letters + string.digits + "-_/:.", min_size=6, max_size=30
            ),
            st.text(alphabet=st.characters(blacklist_categories=["Cs"]), min_size=6, max_size=30),
        ),
        st.sampled_from(["sharing", "era", "cwd", "type"]),
        values,
    )
    def test_errors_never_hold_an_expanded_value(self, secret: str, key: str, around: str) -> None:
        """Whatever the value (quotes, backslashes, control or non-ASCII
        characters included) and wherever it lands in a refused setting, the
        error shows ${VAR} in its place, neither the value nor its escaped form."""
        # The leading "~" makes every one of them invalid, whatever the rest.
        doc = server_doc(**{key: f"~{around}${{SECRET}}{around}"})
        try:
            parse_config(doc, "t", {"SECRET": secret})
        except ConfigError as error:
            text = error.key + error.problem + error.fix
            for form in (secret, quoted(secret, "'"), quoted(secret, '"')):
                self.assertNotIn(form, text)
        else:
            self.fail(f"{key} = {secret!r} was accepted")

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
        # The secure example refers to files an operator provides.
        files = self.mktemp()
        os.makedirs(os.path.join(files, "tls"))
        ca = make_ca(files)
        cert, key = make_server_cert(files, ca)
        os.rename(cert, os.path.join(files, "tls", "cert.pem"))
        os.rename(key, os.path.join(files, "tls", "key.pem"))
        public = ca.key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        Path(files, "jwt-public.pem").write_bytes(public)
        environ = {"MCPTWIST_ETC": files, "MCPTWIST_LOG": files}
        from twisted.internet.testing import MemoryReactorClock

        from mcptwist.service.bridge import BridgeService

        for path in examples:
            config = load_config(path, environ)
            self.assertTrue(config.servers, path)
            # What twistd builds from it, short of listening.
            BridgeService(config, MemoryReactorClock(), {})


class ShareKeyTests(SynchronousTestCase):
    """Keys that keep one principal from taking everything."""

    def load(self, text: str) -> BridgeConfig:
        path = Path(self.mktemp())
        path.write_text(text)
        return load_config(str(path), {})

    def test_children_per_principal(self) -> None:
        text = '[servers.a]\ncommand = "a"\nsharing = "session"\nmax_children = 10\n'
        self.assertEqual(self.load(text).servers["a"].children_per_principal, 2)
        server = self.load(text + "max_children_per_principal = 3\n").servers["a"]
        self.assertEqual(server.children_per_principal, 3)
        for value, problem in (("11", "more than max_children (10)"), ("0", "at least 1")):
            error = self.assertRaises(
                ConfigError, self.load, text + f"max_children_per_principal = {value}\n"
            )
            self.assertEqual(error.key, "servers.a.max_children_per_principal")
            self.assertIn(problem, str(error))
            self.assertTrue(error.fix)

    def test_request_limits(self) -> None:
        limits = self.load('[servers.a]\ncommand = "a"\n').limits
        self.assertEqual(
            (
                limits.max_batch,
                limits.max_in_flight_per_session,
                limits.max_in_flight_per_principal,
            ),
            (64, 64, 256),
        )
        text = (
            "[limits]\nmax_batch = 4\nmax_in_flight_per_session = 8\n"
            'max_in_flight_per_principal = 16\n[servers.a]\ncommand = "a"\n'
        )
        limits = self.load(text).limits
        self.assertEqual(
            (
                limits.max_batch,
                limits.max_in_flight_per_session,
                limits.max_in_flight_per_principal,
            ),
            (4, 8, 16),
        )
        for key in ("max_batch", "max_in_flight_per_session", "max_in_flight_per_principal"):
            error = self.assertRaises(
                ConfigError, self.load, f'[limits]\n{key} = 0\n[servers.a]\ncommand = "a"\n'
            )
            self.assertEqual(error.key, f"limits.{key}")
            self.assertTrue(error.fix)


def endpoint_doc(**endpoint: Any) -> dict[str, Any]:
    return {
        "servers": {n: {"command": "c"} for n in ("github", "time", "off")}
        | {"off": {"command": "c", "disabled": True}},
        "endpoints": {"team": {"servers": ["github", "time"], **endpoint}},
    }


class EndpointConfigTests(SynchronousTestCase):
    """[endpoints.NAME]: what loads, and what is refused (naming file, key and fix)."""

    def test_defaults(self) -> None:
        config = parse_config(endpoint_doc(), "t.toml", {})
        team = config.endpoints["team"]
        self.assertEqual(team.servers, ("github", "time"))
        self.assertEqual(team.prefixes, {"github": "github", "time": "time"})
        self.assertEqual((team.separator, team.page_size), ("__", 1000))

    def test_keys(self) -> None:
        config = parse_config(
            endpoint_doc(
                prefix={"github": "gh"},
                separator=".",
                include=["gh.get_*"],
                exclude=["time.*"],
                rename={"time/get_current_time": "now"},
                page_size=50,
            ),
            "t.toml",
            {},
        )
        team = config.endpoints["team"]
        self.assertEqual(team.prefixes, {"github": "gh", "time": "time"})
        self.assertEqual(team.rename, {("time", "get_current_time"): "now"})
        self.assertEqual(
            (team.include, team.exclude, team.page_size), (("gh.get_*",), ("time.*",), 50)
        )

    def test_disabled_member_left_out(self) -> None:
        doc = endpoint_doc()
        doc["endpoints"]["team"]["servers"] = ["off", "time"]
        self.assertEqual(parse_config(doc, "t", {}).endpoints["team"].servers, ("time",))

    def test_server_filters(self) -> None:
        config = parse_config(
            server_doc(include=["get_*"], exclude=["get_secret"], on_tool_change="hide"), "t", {}
        )
        server = config.servers["s"]
        self.assertEqual((server.include, server.exclude), (("get_*",), ("get_secret",)))
        self.assertEqual(server.on_tool_change, "hide")

    def test_refused(self) -> None:
        cases: list[tuple[dict[str, Any], str, str]] = [
            ({"servers": ["github", "nope"]}, "endpoints.team.servers[1]", "not a server"),
            ({"servers": []}, "endpoints.team.servers", "names no server"),
            ({"servers": ["time", "time"]}, "endpoints.team.servers[1]", "twice"),
            ({"prefix": "none"}, "endpoints.team.prefix", "could clash"),
            ({"prefix": {"github": "x", "time": "x__y"}}, "endpoints.team.prefix", "confused"),
            ({"prefix": {"github": "same", "time": "same"}}, "endpoints.team.prefix", "confused"),
            ({"prefix": {"other": "x"}}, "endpoints.team.prefix.other", "not one of"),
            ({"prefix": 3}, "endpoints.team.prefix", "must be"),
            ({"separator": "/"}, "endpoints.team.separator", "cannot join"),
            ({"rename": {"time": "x"}}, "endpoints.team.rename.time", "does not name"),
            (
                {"rename": {"time/a": "same", "time/b": "same"}},
                "endpoints.team.rename.time/b",
                "gives 'same'",
            ),
            ({"rename": {"time/a": "github__x"}}, "endpoints.team.rename.time/a", "prefix"),
            ({"page_size": 0}, "endpoints.team.page_size", "at least 1"),
            ({"color": "blue"}, "endpoints.team.color", "unknown key"),
        ]
        for extra, key, problem in cases:
            doc = endpoint_doc(**{k: v for k, v in extra.items() if k != "servers"})
            if "servers" in extra:
                doc["endpoints"]["team"]["servers"] = extra["servers"]
            error = self.assertRaises(ConfigError, parse_config, doc, "t.toml", {})
            self.assertEqual(error.key, key, extra)
            self.assertIn(problem, error.problem, extra)
            self.assertTrue(error.fix)

    def test_prefix_none_alone(self) -> None:
        doc = endpoint_doc(prefix="none")
        doc["endpoints"]["team"]["servers"] = ["time"]
        self.assertEqual(parse_config(doc, "t", {}).endpoints["team"].prefixes, {"time": ""})

    def test_tool_grants(self) -> None:
        """A token may name some tools of a server; the server must exist."""
        token = {"name": "t", "hash": "sha256:" + "0" * 64, "servers": ["time/get_*"]}
        doc = endpoint_doc() | {"auth": {"tokens": [token]}}
        self.assertEqual(parse_config(doc, "t", {}).auth.tokens[0].servers, {"time/get_*"})
        doc["auth"]["tokens"][0]["servers"] = ["nope/x"]
        error = self.assertRaises(ConfigError, parse_config, doc, "t", {})
        self.assertIn("'nope'", error.problem)
