# -*- test-case-name: tests.test_principal -*-
"""sharing = "principal": a child of its own for each authenticated client,
shared by all of that client's sessions and stateless requests."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from mcptwist.config.load import parse_config
from mcptwist.config.model import BridgeConfig
from mcptwist.mcp import jsonrpc

from .support.bridge import Service
from .support.messages import JSON, bearer, headers, modern

TOKENS = {
    "alice": "alice-token-0123456789abcdef",
    "bob": "bob-token-0123456789abcdef",
    "ops": "ops-token-0123456789abcdef",
}


def config(**server: Any) -> BridgeConfig:
    from mcptwist.config.keys import digest_text
    from mcptwist.security.auth import hash_token

    tokens = [
        {
            "name": name,
            "hash": digest_text(hash_token(token)),
            "servers": ["*"],
            "admin": name == "ops",
        }
        for name, token in TOKENS.items()
    ]
    doc = {
        "servers": {"s": {"command": "fake", "sharing": "principal", **server}},
        "auth": {"tokens": tokens},
    }
    return parse_config(doc, "test.toml", {})


def init() -> jsonrpc.Message:
    return jsonrpc.request(
        1, "initialize", {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {}}
    )


class PrincipalSharingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.bridge = Service(self, config(max_children=2, child_idle_timeout=30))
        self.reactor = self.bridge.reactor

    def session(self, who: str) -> str:
        return self.bridge.open_session(init=init(), headers=bearer(TOKENS[who]))

    def call(self, who: str, session: str, i: int) -> Any:
        extra = {**JSON, **bearer(TOKENS[who]), "mcp-session-id": session}
        message = jsonrpc.request(i, "tools/call", {"name": "echo", "arguments": {"who": who}})
        return self.bridge.exchange("POST", "/servers/s/mcp", message, extra)[2]

    def children(self) -> list[Any]:
        return [c for c in self.reactor.children if not c.exited]

    def test_a_child_per_principal(self) -> None:
        """Two principals get two children; a principal's sessions and its
        2026-07-28 requests share one."""
        a1, a2, b = self.session("alice"), self.session("alice"), self.session("bob")
        self.assertEqual(len(self.children()), 2)
        for i, (who, session) in enumerate((("alice", a1), ("alice", a2), ("bob", b)), 2):
            self.assertEqual(
                self.call(who, session, i)["result"]["content"][0]["text"], repr({"who": who})
            )
        message = modern(9, "tools/call", {"name": "echo", "arguments": {"who": "alice"}})
        status, _, body = self.bridge.exchange(
            "POST", "/servers/s/mcp", message, {**headers(message), **bearer(TOKENS["alice"])}
        )
        self.assertEqual(status, 200, body)
        self.assertEqual(len(self.children()), 2)
        calls = {c.pid: len(c.requests("tools/call")) for c in self.children()}
        self.assertEqual(sorted(calls.values()), [1, 3])
        status = self.bridge.service.control.server("s")
        assert status is not None
        self.assertEqual(
            sorted(c["principal"] for c in status["children"]), ["token:alice", "token:bob"]
        )

    def test_pool_full(self) -> None:
        """Past max_children a new principal gets 503 with Retry-After."""
        bridge = Service(self, config(max_children=1))
        bridge.open_session(init=init(), headers=bearer(TOKENS["alice"]))
        response = bridge.request(
            "POST", "/servers/s/mcp", init(), {**JSON, **bearer(TOKENS["bob"])}
        )
        self.assertEqual(response.code, 503)
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["5"])
        self.assertIn("max_children", bridge.json(response)["error"]["message"])

    def test_idle_reaping(self) -> None:
        """A child whose principal has no session left stops after
        child_idle_timeout; a session before then finds it still running."""
        session = self.session("alice")
        [child] = self.children()
        self.bridge.exchange(
            "DELETE", "/servers/s/mcp", None, {**bearer(TOKENS["alice"]), "mcp-session-id": session}
        )
        self.reactor.advance(20)
        session = self.session("alice")
        self.assertEqual(self.children(), [child])
        self.bridge.exchange(
            "DELETE", "/servers/s/mcp", None, {**bearer(TOKENS["alice"]), "mcp-session-id": session}
        )
        self.reactor.advance(30)
        self.reactor.advance(10)  # the child's stop
        self.assertEqual(self.children(), [])
        self.assertTrue(child.stdin_is_closed)

    def test_operator_stops_one_child(self) -> None:
        """An operator stops one principal's child: its sessions end, the
        other principal's child and sessions go on, and its next session
        starts a new child."""
        alice, bob = self.session("alice"), self.session("bob")
        before = {c.pid for c in self.children()}
        path = "/admin/servers/s/children/token:alice/stop"
        status, _, _ = self.bridge.exchange("POST", path, None, {**JSON, **bearer(TOKENS["bob"])})
        self.assertEqual(status, 403, "an admin route needs the admin scope")
        status, _, body = self.bridge.exchange(
            "POST", path, None, {**JSON, **bearer(TOKENS["ops"])}
        )
        self.assertEqual(status, 200, body)
        self.assertEqual([c["principal"] for c in body["children"]], ["token:bob"])
        self.reactor.advance(10)
        self.assertEqual(len(self.children()), 1)
        self.assertIn("result", self.call("bob", bob, 2))
        gone = self.bridge.exchange(
            "POST",
            "/servers/s/mcp",
            jsonrpc.request(3, "ping"),
            {**JSON, **bearer(TOKENS["alice"]), "mcp-session-id": alice},
        )
        self.assertEqual(gone[0], 404)
        self.session("alice")
        self.assertEqual(len(self.children()), 2)
        self.assertEqual(len({c.pid for c in self.children()} - before), 1)
        status, _, _ = self.bridge.exchange(
            "POST",
            "/admin/servers/s/children/token:nobody/stop",
            None,
            {**JSON, **bearer(TOKENS["ops"])},
        )
        self.assertEqual(status, 404)
