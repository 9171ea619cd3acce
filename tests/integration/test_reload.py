"""SIGHUP reloads the configuration of a live bridge without disturbing what
did not change: clients mid-stream on unchanged servers never notice."""

from __future__ import annotations

import json
import re
import signal
import tempfile
import threading
import urllib.request
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from ..support.messages import INIT, JSON, bearer
from . import harness as h


def example(name: str, extra: str = "") -> str:
    return h.python_server_toml(name, ["-m", "mcptwist.example"], extra)


class Client:
    """One Streamable HTTP session, with its GET stream read in a thread."""

    def __init__(self, bridge: h.Bridge, server: str, auth: dict[str, str] | None = None) -> None:
        self.url = bridge.mcp_url(server)
        auth = auth or {}
        status, headers, _ = h.http("POST", self.url, INIT, {**JSON, **auth})
        assert status == 200, status
        self.session = headers["mcp-session-id"]
        self.headers = {**JSON, "Mcp-Session-Id": self.session, **auth}
        h.http(
            "POST",
            self.url,
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
            self.headers,
        )
        self.ids = iter(range(2, 10_000))
        self.stream_ended = threading.Event()
        self.stream_error: list[str] = []
        request = urllib.request.Request(
            self.url,
            headers={"Accept": "text/event-stream", "Mcp-Session-Id": self.session, **auth},
        )
        self.stream = urllib.request.urlopen(request, timeout=60)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while self.stream.readline():
                pass
        except Exception as e:  # the test closes it at the end
            self.stream_error.append(repr(e))
        self.stream_ended.set()

    def ping(self, auth: dict[str, str] | None = None) -> int:
        """The status of a ping on this session (with other credentials, if given)."""
        headers = {**self.headers, **(auth or {})}
        return h.http("POST", self.url, {"jsonrpc": "2.0", "id": 0, "method": "ping"}, headers)[0]

    def call(self) -> dict[str, Any]:
        body = {
            "jsonrpc": "2.0",
            "id": next(self.ids),
            "method": "tools/call",
            "params": {"name": "current_time", "arguments": {"timezone": "UTC"}},
        }
        status, headers, raw = h.http("POST", self.url, body, self.headers)
        assert status == 200, (status, raw)
        [answer] = h.jsonrpc_body(headers, raw)
        return answer

    def close(self) -> None:
        self.stream.close()


class ReloadTests(SynchronousTestCase):
    def write(self, text: str) -> None:
        self.config.write_text(text)

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mcptwist-reload-"))
        self.config = self.dir / "bridge.toml"
        base = "drain_timeout = 3\n" + example("a") + example("b") + example("c")
        self.write(base)
        self.bridge = h.Bridge(args=["--config", str(self.config)], directory=self.dir)
        self.addCleanup(self.bridge.stop)
        for name in "abc":
            self.bridge.wait_state(name, "running")

    def sighup(self, marker: str = "reload done") -> None:
        before = self.bridge.log.count(marker)
        self.bridge.proc.send_signal(signal.SIGHUP)
        h.wait_for(lambda: self.bridge.log.count(marker) > before, 15, f"'{marker}' in the log")

    def test_unchanged_servers_never_notice(self) -> None:
        a = Client(self.bridge, "a")
        b = Client(self.bridge, "b")
        c = Client(self.bridge, "c")
        a_pid = self.bridge.status("a")["pid"]
        b_pid = self.bridge.status("b")["pid"]
        h.tool_text(a.call())
        # b changes (its restart policy), c goes, d comes.
        self.write(
            "drain_timeout = 3\n"
            + example("a")
            + example("b", "[servers.b.restart]\ncrash_limit = 9\n")
            + example("d")
        )
        self.sighup()
        # a: the same child, the same session, its stream still open.
        self.assertEqual(self.bridge.status("a")["pid"], a_pid)
        h.tool_text(a.call())
        self.assertFalse(a.stream_ended.is_set())
        # b: a new child for new sessions; the old session works until the drain ends.
        new_b = self.bridge.wait_state("b", "running")
        self.assertNotEqual(new_b["pid"], b_pid)
        h.tool_text(b.call())
        h.tool_text(Client(self.bridge, "b").call())
        # c is gone for new sessions (its open one drains); d is there.
        self.assertEqual(h.http("POST", self.bridge.mcp_url("c"), INIT, JSON)[0], 404)
        h.tool_text(c.call())
        self.bridge.wait_state("d", "running")
        h.tool_text(Client(self.bridge, "d").call())
        # After drain_timeout the old b and c sessions are closed, a's is not.
        self.assertTrue(b.stream_ended.wait(10))
        self.assertTrue(c.stream_ended.wait(10))
        status, _, _ = h.http(
            "POST",
            b.url,
            {"jsonrpc": "2.0", "id": 99, "method": "ping"},
            b.headers,
        )
        self.assertEqual(status, 404)
        self.assertFalse(a.stream_ended.is_set())
        h.tool_text(a.call())
        self.assertEqual(self.bridge.status("a")["pid"], a_pid)
        # The old children of b and c are gone.
        h.wait_for(lambda: b_pid not in self.bridge.children(), 10, "the old child of b to exit")
        a.close()

    def test_a_bad_file_changes_nothing(self) -> None:
        a = Client(self.bridge, "a")
        pid = self.bridge.status("a")["pid"]
        self.write('[servers.a]\ncommand = "x"\nbogus = 1\n')
        self.sighup("reload refused")
        self.assertIn("servers.a.bogus", self.bridge.log)
        self.assertEqual(self.bridge.status("a")["pid"], pid)
        h.tool_text(a.call())
        self.assertEqual(self.bridge.status("c")["state"], "running")
        a.close()

    def test_an_unchanged_file_keeps_every_child(self) -> None:
        pids = {name: self.bridge.status(name)["pid"] for name in "abc"}
        self.sighup()
        self.assertEqual({name: self.bridge.status(name)["pid"] for name in "abc"}, pids)


class ReloadSecurityTests(SynchronousTestCase):
    """Tokens and address rules change in place: no listener is closed."""

    def test_tokens_and_rules_swapped(self) -> None:
        from mcptwist.config.keys import digest_text
        from mcptwist.security.auth import hash_token

        directory = Path(tempfile.mkdtemp(prefix="mcptwist-reload-"))
        path = directory / "bridge.toml"

        def write(token: str, allow: str) -> None:
            path.write_text(
                "[[listeners]]\n"
                'endpoint = "tcp:0:interface=127.0.0.1"\n'
                'trusted_proxies = ["127.0.0.1"]\n'
                f"allow = {h.toml_list([allow])}\n"
                "[[auth.tokens]]\n"
                'name = "t"\n'
                f'hash = "{digest_text(hash_token(token))}"\n'
                "admin = true\n" + example("a")
            )

        write("mcpt_first", "10.0.0.0/8")
        bridge = h.Bridge(args=["--config", str(path)], listen=None, directory=directory)
        self.addCleanup(bridge.stop)
        bridge.headers = {"Authorization": "Bearer mcpt_first"}

        def status(token: str, client: str) -> int:
            headers = {"Authorization": f"Bearer {token}", "X-Forwarded-For": client}
            return h.http("GET", bridge.url("/"), headers=headers)[0]

        self.assertEqual(status("mcpt_first", "10.1.1.1"), 200)
        self.assertEqual(status("mcpt_first", "192.0.2.1"), 403)
        write("mcpt_second", "192.0.2.0/24")
        before = bridge.log.count("reload done")
        bridge.proc.send_signal(signal.SIGHUP)
        h.wait_for(lambda: bridge.log.count("reload done") > before, 15, "the reload")
        bridge.headers = {"Authorization": "Bearer mcpt_second"}
        self.assertEqual(status("mcpt_first", "192.0.2.1"), 401)
        self.assertEqual(status("mcpt_second", "192.0.2.1"), 200)
        self.assertEqual(status("mcpt_second", "10.1.1.1"), 403)
        self.assertIn("'updated': ['tcp:0:interface=127.0.0.1']", bridge.log)

    def test_tls_turned_on_in_place_and_metrics_listener_kept(self) -> None:
        import ssl

        from ..support import certs

        directory = Path(tempfile.mkdtemp(prefix="mcptwist-reload-"))
        ca = certs.make_ca(str(directory))
        cert, key = certs.make_server_cert(str(directory), ca)
        path = directory / "bridge.toml"
        metrics = "tcp:0:interface=127.0.0.1:backlog=7"

        def write(tls: str) -> None:
            path.write_text(
                f"[metrics]\nlisten = {h.toml_list([metrics])}\n"
                "[[listeners]]\n"
                'endpoint = "tcp:0:interface=127.0.0.1"\n' + tls + example("a")
            )

        write("")
        bridge = h.Bridge(args=["--config", str(path)], listen=None, directory=directory)
        self.addCleanup(bridge.stop)
        found = re.search(rf"listening on 127\.0\.0\.1:(\d+) \({re.escape(metrics)}\)", bridge.log)
        assert found is not None, bridge.log
        metrics_url = f"http://127.0.0.1:{found.group(1)}/metrics"
        self.assertEqual(h.http("GET", metrics_url)[0], 200)
        # It asks for no credentials: a rebound name or a web page gets nothing.
        self.assertEqual(h.http("GET", metrics_url, headers={"Host": "evil.example.com"})[0], 421)
        self.assertEqual(h.http("GET", metrics_url, headers={"Origin": "http://localhost"})[0], 403)
        bridge.wait_state("a", "running")  # while the port still speaks plain HTTP
        write(f"tls = {{ certificate = {h.toml_str(cert)}, key = {h.toml_str(key)} }}\n")
        bridge.proc.send_signal(signal.SIGHUP)
        h.wait_for(lambda: "reload done" in bridge.log, 15, "the reload")
        # The same port now speaks TLS; the metrics listener is still there.
        context = ssl.create_default_context(cafile=ca.path)
        status, _, _ = h.http("GET", f"https://127.0.0.1:{bridge.port}/health", context=context)
        self.assertEqual(status, 200)
        self.assertEqual(h.http("GET", metrics_url)[0], 200)

    def test_dropping_authentication_with_a_network_listener_is_refused(self) -> None:
        from mcptwist.config.keys import digest_text
        from mcptwist.security.auth import hash_token

        directory = Path(tempfile.mkdtemp(prefix="mcptwist-reload-"))
        path = directory / "bridge.toml"
        listener = '[[listeners]]\nendpoint = "tcp:0:interface=0.0.0.0"\n'
        token = f'[[auth.tokens]]\nname = "t"\nhash = "{digest_text(hash_token("mcpt_x"))}"\nadmin = true\n'
        path.write_text(listener + token + example("a"))
        bridge = h.Bridge(args=["--config", str(path)], listen=None, directory=directory)
        self.addCleanup(bridge.stop)
        bridge.headers = {"Authorization": "Bearer mcpt_x"}
        path.write_text(listener + example("a"))
        bridge.proc.send_signal(signal.SIGHUP)
        h.wait_for(lambda: "reload refused" in bridge.log, 15, "the refusal")
        self.assertIn("no authentication", bridge.log)
        self.assertEqual(h.http("GET", bridge.url("/"))[0], 401)
        self.assertEqual(h.http("GET", bridge.url("/"), headers=bridge.headers)[0], 200)


class ReloadRevocationTests(SynchronousTestCase):
    """A reload that takes a token or a grant away ends the sessions and
    streams it allowed, and says so in the audit trail; others go on."""

    def test_tokens_replaced_removed_and_narrowed(self) -> None:
        from mcptwist.config.keys import digest_text
        from mcptwist.security.auth import hash_token

        directory = Path(tempfile.mkdtemp(prefix="mcptwist-reload-"))
        path = directory / "bridge.toml"
        audit = directory / "audit.jsonl"

        def write(tokens: list[tuple[str, str, list[str]]]) -> None:
            text = f"[audit]\npath = {h.toml_str(str(audit))}\n"
            for name, secret, servers in [("ops", "mcpt_ops", ["*"]), *tokens]:
                text += (
                    f'[[auth.tokens]]\nname = "{name}"\n'
                    f'hash = "{digest_text(hash_token(secret))}"\n'
                    f"servers = {h.toml_list(servers)}\nadmin = {str(name == 'ops').lower()}\n"
                )
            path.write_text(text + example("a") + example("b"))

        write(
            [
                ("alice", "mcpt_alice", ["a"]),
                ("bob", "mcpt_bob", ["a", "b"]),
                ("carol", "mcpt_carol", ["a"]),
            ]
        )
        bridge = h.Bridge(args=["--config", str(path)], directory=directory)
        self.addCleanup(bridge.stop)
        bridge.headers = {"Authorization": "Bearer mcpt_ops"}
        bridge.wait_state("a", "running")
        bridge.wait_state("b", "running")

        alice = Client(bridge, "a", bearer("mcpt_alice"))
        carol = Client(bridge, "a", bearer("mcpt_carol"))
        bob_a = Client(bridge, "a", bearer("mcpt_bob"))
        bob_b = Client(bridge, "b", bearer("mcpt_bob"))
        # alice gets a new secret, carol's token goes, bob keeps a only.
        write([("alice", "mcpt_alice_2", ["a"]), ("bob", "mcpt_bob", ["a"])])
        before = bridge.log.count("reload done")
        bridge.proc.send_signal(signal.SIGHUP)
        h.wait_for(lambda: bridge.log.count("reload done") > before, 15, "the reload")

        for ended in (alice, carol, bob_b):
            self.assertTrue(ended.stream_ended.wait(10), ended.url)
        self.assertEqual(alice.ping(), 401)
        self.assertEqual(alice.ping(bearer("mcpt_alice_2")), 404, "the new secret gets none of it")
        self.assertEqual(carol.ping(), 401)
        self.assertEqual(bob_b.ping(), 403)
        # bob's session on a is untouched: its stream is open, it still works.
        self.assertFalse(bob_a.stream_ended.is_set())
        h.tool_text(bob_a.call())
        closed = {
            (e["principal"], e["server"]): e["reason"]
            for e in h.wait_for(
                lambda: (
                    [
                        json.loads(line)
                        for line in audit.read_text().splitlines()
                        if '"session_closed"' in line
                    ]
                    or None
                ),
                10,
                "session_closed events",
            )
        }
        self.assertEqual(
            closed,
            {
                ("token:alice", "a"): "revoked: token replaced by reload",
                ("token:carol", "a"): "revoked: token removed by reload",
                ("token:bob", "b"): "revoked: server no longer granted by reload",
            },
        )
        self.assertIn(
            "'revoked': ['token:alice on a', 'token:bob on b', 'token:carol on a']", bridge.log
        )
        bob_a.close()
