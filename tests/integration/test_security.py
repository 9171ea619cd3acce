"""Security features of a real bridge, with real clients: TLS (and its reload on
SIGHUP), tokens, the official SDK client over HTTPS, X-Forwarded-For from
trusted and untrusted proxies, a rate-limit burst, and the audit trail."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from mcptwist.config.keys import digest_text
from mcptwist.security.auth import hash_token

from ..support import certs
from ..support.messages import INIT, JSON, bearer, modern
from ..support.messages import headers as modern_headers
from . import harness as h

ADMIN = "mcpt_admin_secret_for_tests"
USER = "mcpt_user_secret_for_tests"


def auth_toml(extra: str = "") -> str:
    return (
        f"{extra}\n"
        "[[auth.tokens]]\n"
        'name = "admin"\n'
        f'hash = "{digest_text(hash_token(ADMIN))}"\n'
        "admin = true\n"
        "[[auth.tokens]]\n"
        'name = "user"\n'
        f'hash = "{digest_text(hash_token(USER))}"\n'
        'servers = ["example"]\n'
    )


def example_toml() -> str:
    return h.python_server_toml("example", ["-m", "mcptwist.example"]) + h.python_server_toml(
        "other", ["-m", "mcptwist.example"]
    )


def audit_events(path: Path, kind: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [e for e in lines if e["event"] == kind]


class TLSTests(SynchronousTestCase):
    """An ssl: listener, the SDK client over HTTPS, and a certificate reload."""

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mcptwist-tls-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.ca = certs.make_ca(str(self.dir))
        cert, key = certs.make_server_cert(str(self.dir), self.ca, "one")
        self.cert, self.key = self.dir / "server.crt", self.dir / "server.key"
        os.rename(cert, self.cert)
        os.rename(key, self.key)
        self.audit = self.dir / "audit.jsonl"
        config = auth_toml(f'[audit]\npath = "{self.audit}"\n') + example_toml()
        self.bridge = h.start_bridge(
            self,
            config,
            listen=f"ssl:0:privateKey={self.key}:certKey={self.cert}:interface=127.0.0.1",
            cafile=self.ca.path,
        )
        self.bridge.headers = bearer(ADMIN)

    def served_name(self, connection: http.client.HTTPSConnection) -> str:
        peer = connection.sock.getpeercert()  # type: ignore[union-attr]
        return dict(x[0] for x in peer["subject"])["commonName"]  # type: ignore[index]

    def connect(self) -> http.client.HTTPSConnection:
        context = ssl.create_default_context(cafile=self.ca.path)
        connection = http.client.HTTPSConnection("127.0.0.1", self.bridge.port, context=context)
        connection.connect()
        return connection

    def get(self, connection: http.client.HTTPSConnection, path: str) -> int:
        connection.request("GET", path, headers=bearer(ADMIN))
        response = connection.getresponse()
        response.read()
        return response.status

    def test_sdk_client_over_https_with_a_token(self) -> None:
        for transport, url in (
            ("http", self.bridge.mcp_url("example")),
            ("sse", self.bridge.sse_url("example")),
        ):
            result = h.run_client(
                "sdk_client.py",
                "--url",
                url,
                "--transport",
                transport,
                "--bearer",
                USER,
                "--cafile",
                self.ca.path,
                "call",
                "current_time",
                '{"timezone": "UTC"}',
            )
            self.assertTrue(result.get("ok"), json.dumps(result)[:3000])
            self.assertFalse(result["call"]["is_error"], result["call"])
        # The same client without a token is turned away.
        result = h.run_client(
            "sdk_client.py",
            "--url",
            self.bridge.mcp_url("example"),
            "--transport",
            "http",
            "--cafile",
            self.ca.path,
            "info",
        )
        self.assertFalse(result.get("ok"))
        self.assertEqual(result["error"]["code"], -32001)
        self.assertIn("Unauthorized", result["error"]["message"])
        calls = [e for e in audit_events(self.audit, "request") if e["method"] == "tools/call"]
        self.assertEqual(len(calls), 2)
        self.assertEqual({c["principal"] for c in calls}, {"token:user"})
        self.assertEqual({c["name"] for c in calls}, {"current_time"})
        [failure] = audit_events(self.audit, "auth_failure")
        self.assertEqual(
            (failure["route"], failure["peer"], failure["reason"]),
            ("/servers/example/mcp", "127.0.0.1", "no credentials"),
        )
        self.assertNotIn(USER, self.audit.read_text())
        self.assertNotIn(USER, self.bridge.log)

    def test_hsts_and_plain_http_refused(self) -> None:
        status, headers, _ = h.http(
            "GET", self.bridge.url("/"), headers=bearer(ADMIN), context=self.bridge.context
        )
        self.assertEqual(status, 200)
        self.assertIn("max-age=", headers["strict-transport-security"])
        with socket.create_connection(("127.0.0.1", self.bridge.port), timeout=5) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            self.assertNotIn(b"HTTP/1.1 200", s.recv(4096))

    def test_tls_versions(self) -> None:
        for version, name in (
            (ssl.TLSVersion.TLSv1_2, "TLSv1.2"),
            (ssl.TLSVersion.TLSv1_3, "TLSv1.3"),
        ):
            context = ssl.create_default_context(cafile=self.ca.path)
            context.minimum_version = context.maximum_version = version
            with (
                socket.create_connection(("127.0.0.1", self.bridge.port), timeout=5) as raw,
                context.wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                self.assertEqual(tls.version(), name)
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname = False
        old.verify_mode = ssl.CERT_NONE
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
        with (
            socket.create_connection(("127.0.0.1", self.bridge.port), timeout=5) as raw,
            self.assertRaises(ssl.SSLError),
        ):
            old.wrap_socket(raw).close()

    def test_sighup_serves_the_new_certificate_and_keeps_old_connections(self) -> None:
        old = self.connect()
        self.assertEqual(self.served_name(old), "one")
        self.assertEqual(self.get(old, "/"), 200)
        cert, key = certs.make_server_cert(str(self.dir), self.ca, "two")
        os.replace(cert, self.cert)
        os.replace(key, self.key)
        os.kill(self.bridge.pid, signal.SIGHUP)
        h.wait_for(lambda: "TLS certificate re-read" in self.bridge.log, 10, "the reload")
        new = self.connect()
        self.assertEqual(self.served_name(new), "two")
        self.assertEqual(self.get(new, "/"), 200)
        self.assertEqual(self.get(old, "/"), 200)  # the old connection still works
        # A broken certificate is refused and the current one stays.
        self.cert.write_text("not a certificate")
        os.kill(self.bridge.pid, signal.SIGHUP)
        h.wait_for(lambda: "kept the old TLS certificate" in self.bridge.log, 10, "the refusal")
        third = self.connect()
        self.assertEqual(self.served_name(third), "two")
        self.assertEqual(self.get(third, "/"), 200)
        outcomes = [e["outcome"] for e in audit_events(self.audit, "tls_reloaded")]
        self.assertEqual(outcomes, ["ok", "refused"])
        for c in (old, new, third):
            c.close()


class ForwardedForTests(SynchronousTestCase):
    """X-Forwarded-For counts only from a trusted proxy."""

    def start(self, trusted: str, allow: str) -> tuple[h.Bridge, Path]:
        directory = Path(tempfile.mkdtemp(prefix="mcptwist-xff-"))
        audit = directory / "audit.jsonl"
        config = (
            auth_toml(
                f'[audit]\npath = "{audit}"\n'
                "[[listeners]]\n"
                'endpoint = "tcp:0:interface=127.0.0.1"\n'
                f"trusted_proxies = {h.toml_list([trusted])}\n"
                f"allow = {h.toml_list([allow])}\n"
            )
            + example_toml()
        )
        bridge = h.start_bridge(self, config, listen=None, directory=directory)
        bridge.headers = bearer(ADMIN)
        return bridge, audit

    def test_trusted_proxy(self) -> None:
        bridge, audit = self.start("127.0.0.1", "10.0.0.0/8")
        allowed = h.http(
            "GET", bridge.url("/"), headers={**bearer(USER), "X-Forwarded-For": "10.1.2.3"}
        )
        self.assertEqual(allowed[0], 200)
        refused = h.http(
            "GET", bridge.url("/"), headers={**bearer(USER), "X-Forwarded-For": "192.0.2.9"}
        )
        self.assertEqual(refused[0], 403)
        self.assertEqual(json.loads(refused[2])["jsonrpc"], "2.0")
        status, _, _ = h.http(
            "POST",
            bridge.mcp_url("example"),
            INIT,
            {**JSON, **bearer(USER), "X-Forwarded-For": "192.0.2.9, 10.9.8.7"},
        )
        self.assertEqual(status, 200)
        [opened] = audit_events(audit, "session_opened")
        self.assertEqual(opened["peer"], "10.9.8.7")
        [refusal] = audit_events(audit, "ip_refused")
        self.assertEqual(refusal["peer"], "192.0.2.9")

    def test_untrusted_proxy_header_ignored(self) -> None:
        bridge, audit = self.start("10.255.255.1", "127.0.0.1")
        status, _, _ = h.http(
            "POST",
            bridge.mcp_url("example"),
            INIT,
            {**JSON, **bearer(USER), "X-Forwarded-For": "10.1.2.3"},
        )
        self.assertEqual(status, 200)
        [opened] = audit_events(audit, "session_opened")
        self.assertEqual(opened["peer"], "127.0.0.1")


class BurstTests(SynchronousTestCase):
    def test_burst_gets_429_and_others_pass(self) -> None:
        config = auth_toml("[limits]\nper_principal = { rate = 0.5, burst = 10 }\nper_ip = false\n")
        bridge = h.start_bridge(self, config + example_toml())
        bridge.headers = bearer(ADMIN)
        codes = []
        retry = set()
        for _ in range(15):
            status, headers, _ = h.http("GET", bridge.url("/"), headers=bearer(USER))
            codes.append(status)
            if status == 429:
                retry.add(headers.get("retry-after"))
        self.assertEqual(codes, [200] * 10 + [429] * 5)
        self.assertEqual(retry, {"2"})
        self.assertEqual(h.http("GET", bridge.url("/"), headers=bearer(ADMIN))[0], 200)
        bridge.wait_state("example", "running")

    def test_per_ip_limit_counts_each_forwarded_client(self) -> None:
        config = auth_toml(
            "[limits]\nper_principal = false\nper_ip = { rate = 0.5, burst = 3 }\n"
            "[[listeners]]\n"
            'endpoint = "tcp:0:interface=127.0.0.1"\n'
            'trusted_proxies = ["127.0.0.1"]\n'
        )
        bridge = h.start_bridge(self, config + example_toml(), listen=None)
        bridge.headers = bearer(ADMIN)

        def codes(client: str) -> list[int]:
            headers = {**bearer(USER), "X-Forwarded-For": client}
            return [h.http("GET", bridge.url("/"), headers=headers)[0] for _ in range(4)]

        self.assertEqual(codes("10.0.0.1"), [200, 200, 200, 429])
        self.assertEqual(codes("10.0.0.2"), [200, 200, 200, 429])

    def test_bad_credentials_are_limited_by_address_too(self) -> None:
        """Before authentication the client's address is charged: a flood of bad
        tokens ends in 429 like anything else."""
        config = auth_toml(
            "[limits]\nper_ip = { rate = 0.5, burst = 3 }\n"
            "[[listeners]]\n"
            'endpoint = "tcp:0:interface=127.0.0.1"\n'
            'trusted_proxies = ["127.0.0.1"]\n'
        )
        bridge = h.start_bridge(self, config + example_toml(), listen=None)
        bridge.headers = bearer(ADMIN)
        headers = {**bearer("mcpt_wrong"), "X-Forwarded-For": "10.0.0.3"}
        codes = [h.http("GET", bridge.url("/"), headers=headers)[0] for _ in range(4)]
        self.assertEqual(codes, [401, 401, 401, 429])


class ChildShareTests(SynchronousTestCase):
    def test_one_principal_cannot_take_every_child(self) -> None:
        """With a child per session, a principal at max_children_per_principal
        gets 429 (audited) while another still gets a child of its own."""
        directory = Path(tempfile.mkdtemp(prefix="mcptwist-share-"))
        audit = directory / "audit.jsonl"
        # The default share: a quarter of max_children.
        per_session = 'sharing = "session"\nmax_children = 8\n'
        config = auth_toml(f'[audit]\npath = "{audit}"\n') + h.python_server_toml(
            "example", ["-m", "mcptwist.example"], per_session
        )
        bridge = h.start_bridge(self, config, directory=directory)
        bridge.headers = bearer(ADMIN)
        user = {**JSON, **bearer(USER)}
        for _ in range(2):
            status, headers, body = h.http("POST", bridge.mcp_url("example"), INIT, user)
            self.assertEqual(status, 200, body)
            self.assertIn("mcp-session-id", headers)
        status, headers, body = h.http("POST", bridge.mcp_url("example"), INIT, user)
        self.assertEqual((status, headers.get("retry-after")), (429, "60"), body)
        error = json.loads(body)["error"]
        self.assertIn("max_children_per_principal", error["message"])
        admin = {**JSON, **bearer(ADMIN)}
        status, _, body = h.http("POST", bridge.mcp_url("example"), INIT, admin)
        self.assertEqual(status, 200, body)
        self.assertEqual(len(bridge.status("example")["children"]), 3)
        [refusal] = audit_events(audit, "rate_limited")
        self.assertEqual(
            (refusal["principal"], refusal["scope"]), ("token:user", "children-per-principal")
        )


def fixture_toml() -> str:
    """Server "example" run by the stdio fixture (its sleep tool keeps calls in flight)."""
    return h.python_server_toml("example", [str(h.FIXTURES / "stdio_fixture.py")])


def session(bridge: h.Bridge, token: str, version: str = "2025-06-18") -> dict[str, str]:
    """The headers of a new initialized session of this token's principal."""
    init = {**INIT, "params": {**INIT["params"], "protocolVersion": version}}
    headers = {**JSON, **bearer(token)}
    status, answer_headers, body = h.http("POST", bridge.mcp_url("example"), init, headers)
    assert status == 200, (status, body)
    headers["Mcp-Session-Id"] = answer_headers["mcp-session-id"]
    headers["MCP-Protocol-Version"] = version
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    h.http("POST", bridge.mcp_url("example"), initialized, headers)
    return headers


def tool_call(request_id: int, name: str, **arguments: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments},
    }


class MessageLimitTests(SynchronousTestCase):
    """Rate limits count JSON-RPC messages; requests in flight are capped."""

    def start(self, limits: str) -> tuple[h.Bridge, Path]:
        directory = Path(tempfile.mkdtemp(prefix="mcptwist-limits-"))
        audit = directory / "audit.jsonl"
        config = auth_toml(f'[audit]\npath = "{audit}"\n[limits]\n{limits}') + fixture_toml()
        bridge = h.start_bridge(self, config, directory=directory)
        bridge.headers = bearer(ADMIN)
        return bridge, audit

    def test_a_batch_costs_a_token_per_message(self) -> None:
        bridge, audit = self.start("per_principal = { rate = 0.2, burst = 12 }\nper_ip = false\n")
        user = session(bridge, USER, "2025-03-26")  # 2 tokens of 12
        batch = [tool_call(i, "echo", message=str(i)) for i in range(1, 7)]
        status, _, body = h.http("POST", bridge.mcp_url("example"), batch, user)
        self.assertEqual(status, 200, body)
        self.assertEqual(sorted(m["id"] for m in json.loads(body)), list(range(1, 7)))
        # 4 tokens left: the same batch again is refused whole.
        batch = [tool_call(i, "echo", message=str(i)) for i in range(7, 13)]
        status, headers, body = h.http("POST", bridge.mcp_url("example"), batch, user)
        self.assertEqual((status, headers.get("retry-after")), (429, "15"), body)
        error = json.loads(body)["error"]
        self.assertIn("principal rate limit", error["message"])
        # Longer than limits.max_batch: 413.
        batch = [tool_call(i, "echo", message="x") for i in range(100, 165)]
        status, _, body = h.http("POST", bridge.mcp_url("example"), batch, user)
        self.assertEqual(status, 413, body)
        self.assertIn("limits.max_batch (64)", json.loads(body)["error"]["message"])
        # The first refusal is written; the next (the 413) is counted in the burst
        # record written when the window ends.
        [refusal] = audit_events(audit, "rate_limited")
        self.assertEqual((refusal["principal"], refusal["scope"]), ("token:user", "principal"))

    def test_requests_in_flight_are_capped(self) -> None:
        bridge, audit = self.start(
            "max_in_flight_per_session = 2\nmax_in_flight_per_principal = 3\n"
        )
        one, two, admin = session(bridge, USER), session(bridge, USER), session(bridge, ADMIN)
        url = bridge.mcp_url("example")
        with ThreadPoolExecutor(4) as pool:
            sleeping = [
                pool.submit(h.http, "POST", url, tool_call(i, "sleep", seconds=3), headers)
                for i, headers in ((1, one), (2, one), (3, two))
            ]
            h.wait_for(lambda: bridge.status("example")["in_flight"] == 3, 10, "3 in flight")
            status, headers, body = h.http("POST", url, tool_call(4, "echo", message="x"), one)
            self.assertEqual((status, headers.get("retry-after")), (429, "1"), body)
            answer = json.loads(body)
            self.assertEqual(answer["id"], 4)
            self.assertIn("max_in_flight_per_session", answer["error"]["message"])
            status, _, body = h.http("POST", url, tool_call(5, "echo", message="x"), two)
            self.assertEqual(status, 429, body)
            self.assertIn("max_in_flight_per_principal", json.loads(body)["error"]["message"])
            # A 2026-07-28 request of the same principal too.
            message = modern(8, "tools/call", {"name": "echo", "arguments": {"message": "x"}})
            stateless = {**modern_headers(message, "application/json"), **bearer(USER)}
            status, _, body = h.http("POST", url, message, stateless)
            self.assertEqual(status, 429, body)
            self.assertIn("max_in_flight_per_principal", json.loads(body)["error"]["message"])
            # Another principal is not held back.
            status, _, body = h.http("POST", url, tool_call(6, "echo", message="x"), admin)
            self.assertEqual(status, 200, body)
            self.assertEqual([f.result()[0] for f in sleeping], [200, 200, 200])
        status, _, body = h.http("POST", url, tool_call(7, "echo", message="x"), one)
        self.assertEqual(status, 200, body)
        # The first refusal is written (the second is counted in a burst record).
        [refusal] = audit_events(audit, "rate_limited")
        self.assertEqual(
            (refusal["principal"], refusal["scope"]), ("token:user", "in-flight-session")
        )
