"""Receiving requests on a live bridge, through raw sockets: bodies refused
before they are read, slow clients cut at the deadline, connections capped
per address, oversize heads answered, and no version in the Server header."""

from __future__ import annotations

import json
import re
import select
import socket
import time

from twisted.trial.unittest import SynchronousTestCase

from mcptwist.config.keys import digest_text
from mcptwist.security.auth import hash_token

from . import fault_support as fs
from . import harness as h

TOKEN = "mcpt_receiving_secret_for_tests"
BIG = 20_000_000


def config(limits: str = "", listeners: str = "") -> str:
    return (
        '[audit]\npath = "audit.jsonl"\n'
        f"[limits]\n{limits}\n"
        f"{listeners}\n"
        "[[auth.tokens]]\n"
        'name = "user"\n'
        f'hash = "{digest_text(hash_token(TOKEN))}"\n'
        + h.python_server_toml("example", ["-m", "mcptwist.example"])
    )


def post_head(length: int) -> bytes:
    return fs.http_request(
        "POST",
        "/servers/example/mcp",
        {
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
            "Content-Length": str(length),
        },
    )


class RefusedBeforeTheBodyTests(SynchronousTestCase):
    def test_unauthenticated_20mb_posts_are_refused_at_once(self) -> None:
        """Three unauthenticated 20 MB POSTs: each is answered 401 as soon as
        its head has arrived, and the bridge holds none of their bodies."""
        bridge = h.start_bridge(self, config())
        fs.health(bridge)
        before = fs.rss_kib(bridge.pid)
        clients = [fs.connect(bridge.port, timeout=10) for _ in range(3)]
        for client in clients:
            self.addCleanup(client.close)
            client.sendall(post_head(BIG))
        for client in clients:
            head = fs.read_until(client, b"\r\n\r\n", 5)
            status, headers, _ = fs.parse_response(head)
            self.assertEqual(status, 401)
            self.assertEqual(headers["connection"], "close")
            self.assertIn("www-authenticate", headers)
        # Whatever the clients send now is read and dropped, then they are cut off.
        chunk = b"x" * (1 << 20)
        for client in clients:
            try:
                for _ in range(BIG // len(chunk)):
                    client.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                pass
        for client in clients:
            _, how = fs.read_to_end(client, 10)
            self.assertIn(how, ("eof", "reset"))
        grown = (fs.rss_kib(bridge.pid) - before) / 1024
        self.assertLess(grown, 10, f"the bridge's RSS grew by {grown:.1f} MiB")


class SlowClientTests(SynchronousTestCase):
    def test_slowloris_is_cut_at_the_header_deadline(self) -> None:
        bridge = h.start_bridge(self, config("header_timeout = 2"))
        client = fs.connect(bridge.port, timeout=10)
        self.addCleanup(client.close)
        started = time.monotonic()
        client.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        answer = b""
        how = "timeout"
        while time.monotonic() - started < 10:
            # A header byte every 0.2 s: Twisted's idle timeout would never fire.
            try:
                client.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                how = "reset"
                break
            readable, _, _ = select.select([client], [], [], 0.2)
            if readable:
                try:
                    data = client.recv(65536)
                except ConnectionResetError:
                    how = "reset"
                    break
                if not data:
                    how = "eof"
                    break
                answer += data
        elapsed = time.monotonic() - started
        self.assertNotEqual(how, "timeout", "the slow client was never cut off")
        self.assertLess(elapsed, 5)
        status, headers, body = fs.parse_response(answer)
        self.assertEqual(status, 408)
        self.assertEqual(headers["server"], "mcptwist")
        self.assertIn(b"limits.header_timeout", body)


class ConnectionCapTests(SynchronousTestCase):
    def test_one_address_past_its_cap_is_refused_another_is_not(self) -> None:
        """Behind a PROXY-protocol listener, connections count against the
        client address the proxy names."""
        listeners = (
            "[[listeners]]\n"
            'endpoint = "tcp:0:interface=127.0.0.1"\n'
            "[[listeners]]\n"
            'endpoint = "tcp:0:interface=127.0.0.1"\n'
            "proxy_protocol = true\n"
            'trusted_proxies = ["127.0.0.1"]\n'
        )
        bridge = h.start_bridge(self, config("max_connections_per_ip = 2", listeners), listen=None)
        h.wait_for(lambda: fs.health(bridge)[0] == 200, 20, "the server to run")
        ports = [int(p) for p in re.findall(r"listening on 127\.0\.0\.1:(\d+) ", bridge.log)]
        proxied = ports[1]

        def connect(client: str) -> socket.socket:
            sock = fs.connect(proxied, timeout=10)
            self.addCleanup(sock.close)
            sock.sendall(f"PROXY TCP4 {client} 127.0.0.1 40000 80\r\n".encode())
            return sock

        held = [connect("203.0.113.7") for _ in range(2)]
        for sock in held:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            status, _, _ = fs.parse_response(fs.read_until(sock, b"\r\n\r\n", 5))
            self.assertEqual(status, 200)
        third = connect("203.0.113.7")
        third.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer, _ = fs.read_to_end(third, 5)
        status, headers, body = fs.parse_response(answer)
        self.assertEqual(status, 429)
        self.assertEqual(headers["retry-after"], "5")
        self.assertIn(b"limits.max_connections_per_ip", body)
        audit = bridge.dir / "audit.jsonl"
        events = h.wait_for(
            lambda: [
                e
                for e in map(json.loads, audit.read_text().splitlines())
                if e["event"] == "http_refused"
            ],
            5,
            "the refusal in the audit trail",
        )
        self.assertEqual(events[0]["peer"], "203.0.113.7")
        self.assertEqual(events[0]["reason"], "too_many_connections")
        other = connect("203.0.113.8")
        other.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        status, _, _ = fs.parse_response(fs.read_to_end(other, 5)[0])
        self.assertEqual(status, 200)


class ProtocolEdgeTests(SynchronousTestCase):
    def test_oversize_header_gets_431_and_no_version_is_advertised(self) -> None:
        bridge = h.start_bridge(self, config())
        client = fs.connect(bridge.port, timeout=10)
        self.addCleanup(client.close)
        client.sendall(
            fs.http_request("GET", "/health", {"X-Big": "a" * 17000, "Connection": "close"})
        )
        answer, how = fs.read_to_end(client, 10)
        self.assertEqual(how, "eof")
        status, headers, body = fs.parse_response(answer)
        self.assertEqual(status, 431)
        self.assertEqual(headers["server"], "mcptwist")
        self.assertIn(b"Request Header Fields Too Large", body)
        for path in ("/health", "/servers", "/nothing"):
            _, response_headers, _ = h.http("GET", bridge.url(path))
            self.assertEqual(response_headers.get("server"), "mcptwist", path)
