# -*- test-case-name: tests.test_principal -*-
"""sharing = "principal": a child of its own for each authenticated client,
shared by all of that client's sessions and stateless requests."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import jwt
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import eventAsJSON, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.config.load import parse_config
from mcptwist.config.model import BridgeConfig, ConfigError
from mcptwist.mcp import jsonrpc

from .support.bridge import Service
from .support.idp import SECRET
from .support.idp import SECRET_ISSUER as ISSUER
from .support.messages import JSON, bearer, headers, modern

AUD = "https://mcp.example.com"

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


class CredentialTests(SynchronousTestCase):
    """Each principal's child gets its own credentials: from its JWT's claims,
    its entry of the secrets file, or systemd; never the client's token."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.key = os.path.join(self.dir, "jwt.secret")
        Path(self.key).write_bytes(SECRET)
        self.secrets = os.path.join(self.dir, "secrets.toml")
        write_private(
            self.secrets,
            '["jwt:alice"]\nDB_PASSWORD = "alice-db-pw"\n["jwt:bob"]\nDB_PASSWORD = "bob-db-pw"\n',
        )
        credentials = os.path.join(self.dir, "credentials")
        os.makedirs(credentials)
        Path(credentials, "api_key").write_text("systemd-api-key\n")
        self.environ = {"CREDENTIALS_DIRECTORY": credentials}

    def bridge(self, endpoint: bool = False, on_spawn: Any = None, **server: Any) -> Service:
        doc = {
            "servers": {
                "s": {
                    "command": "fake",
                    "sharing": "principal",
                    "env": {
                        "GH_TOKEN": "${claim:gh_token}",
                        "DB_PASSWORD": "${secret:DB_PASSWORD}",
                        "API_KEY": "${credential:api_key}",
                    },
                    **server,
                }
            },
            "auth": {
                "jwt": {
                    "issuer": ISSUER,
                    "audience": [AUD],
                    "key_file": self.key,
                    "algorithms": ["HS256"],
                },
                "authorization_servers": [ISSUER],
                "resource_url": AUD,
            },
            "secrets": {"file": self.secrets},
        }
        if endpoint:
            doc["endpoints"] = {"one": {"servers": ["s"]}}
        config = parse_config(doc, "test.toml", self.environ)
        return Service(self, config, environ=self.environ, on_spawn=on_spawn)

    def token(self, sub: str, **claims: Any) -> dict[str, str]:
        now = int(time.time())
        payload = {"sub": sub, "aud": AUD, "iss": ISSUER, "iat": now, "exp": now + 300, **claims}
        return bearer(jwt.encode(payload, SECRET, "HS256"))

    def test_each_principal_its_own(self) -> None:
        bridge = self.bridge()
        alice = self.token("alice", gh_token="gh-alice", mcp_servers="*")
        bridge.open_session(init=init(), headers=alice)
        [child] = bridge.reactor.children
        self.assertEqual(child.env["GH_TOKEN"], "gh-alice")
        self.assertEqual(child.env["DB_PASSWORD"], "alice-db-pw")
        self.assertEqual(child.env["API_KEY"], "systemd-api-key")
        # The client's own token is nowhere in what the child gets.
        token = alice["authorization"].split()[1]
        self.assertFalse([v for v in child.env.values() if token in v])
        self.assertFalse([m for m in child.received if token in json.dumps(m)])
        # What the operator sees names the principal, never a credential.
        status = json.dumps(bridge.service.control.server("s"))
        self.assertIn("jwt:alice", status)
        for secret in ("gh-alice", "alice-db-pw", "systemd-api-key"):
            self.assertNotIn(secret, status)

    def test_two_principals(self) -> None:
        """Two principals, two children, each with its own values, through a
        server's URL and through an endpoint."""
        bridge = self.bridge(endpoint=True)
        alice = self.token("alice", gh_token="gh-alice", mcp_servers="*")
        bob = self.token("bob", gh_token="gh-bob", mcp_servers="*")
        bridge.open_session(init=init(), headers=alice)
        response = bridge.request("POST", "/endpoints/one/mcp", init(), {**JSON, **bob})
        self.assertEqual(response.code, 200)
        bridge.json(response)
        envs = {c.env["GH_TOKEN"]: (c.env["DB_PASSWORD"], c.pid) for c in bridge.reactor.children}
        self.assertEqual(sorted(envs), ["gh-alice", "gh-bob"])
        self.assertEqual(envs["gh-alice"][0], "alice-db-pw")
        self.assertEqual(envs["gh-bob"][0], "bob-db-pw")
        self.assertNotEqual(envs["gh-alice"][1], envs["gh-bob"][1])

    def test_missing(self) -> None:
        """A missing credential refuses the principal, naming the key, and starts nothing."""
        bridge = self.bridge()
        carol = self.token("carol", gh_token="gh-carol", mcp_servers="*")
        response = bridge.request("POST", "/servers/s/mcp", init(), {**JSON, **carol})
        self.assertEqual(response.code, 403)
        message = bridge.json(response)["error"]["message"]
        self.assertIn("'DB_PASSWORD'", message)
        self.assertIn("jwt:carol", message)
        self.assertEqual(bridge.reactor.children, [])

    def post(self, bridge: Service, message: Any, extra: dict[str, str]) -> Any:
        """POST to server s; the Deferred fires with the response, maybe later."""
        treq: Any = bridge.client
        d = treq.request(
            "POST",
            "http://127.0.0.1/servers/s/mcp",
            data=jsonrpc.dumps(message),
            headers={**JSON, **extra},
        )
        treq.flush()
        return d

    def answered(self, bridge: Service, d: Any) -> Any:
        bridge.client.flush()
        return bridge.json(self.successResultOf(d))

    def renewed(self, bridge: Service, d: Any, old: Any, token: str) -> None:
        """The request was answered, by a new child with the new token; the old one exited."""
        self.assertIn("result", self.answered(bridge, d))
        self.assertTrue(old.exited)
        [new] = [c for c in bridge.reactor.children if not c.exited]
        self.assertEqual(new.env["GH_TOKEN"], token)

    def test_changed_secret(self) -> None:
        """A changed secret restarts the principal's child on its next request:
        the call in flight on the old child is answered by it first, the new
        request waits for the new child, and the session goes on."""
        bridge = self.bridge()
        alice = self.token("alice", gh_token="gh-alice", mcp_servers="*")
        session = bridge.open_session(init=init(), headers=alice)
        extra = {**alice, "mcp-session-id": session}
        [old] = bridge.reactor.children
        old.hold = True
        slow = self.post(bridge, call(2, "slow"), extra)
        write_private(self.secrets, '["jwt:alice"]\nDB_PASSWORD = "rotated-pw"\n')
        os.utime(self.secrets, (time.time() + 5, time.time() + 5))
        fast = self.post(bridge, call(3, "fast"), extra)
        bridge.reactor.advance(0)
        self.assertNoResult(slow)
        self.assertNoResult(fast)
        self.assertEqual(len(bridge.reactor.children), 1)
        self.assertFalse(old.stdin_is_closed, "the old child finishes its call first")
        self.assertEqual([m["params"]["arguments"] for m in old.held], [{"step": "slow"}])
        old.hold = False
        old.answer(old.held.pop())
        bridge.reactor.advance(0)
        self.assertEqual(
            self.answered(bridge, slow)["result"]["content"][0]["text"], "{'step': 'slow'}"
        )
        bridge.reactor.advance(10)
        self.assertTrue(old.exited)
        [new] = [c for c in bridge.reactor.children if not c.exited]
        self.assertEqual(new.env["DB_PASSWORD"], "rotated-pw")
        self.assertEqual(
            self.answered(bridge, fast)["result"]["content"][0]["text"], "{'step': 'fast'}"
        )
        self.assertEqual(
            [m["params"]["arguments"] for m in new.requests("tools/call")], [{"step": "fast"}]
        )
        # The same session goes on, on the new child.
        after = self.answered(bridge, self.post(bridge, call(4, "after"), extra))
        self.assertIn("result", after)

    def test_changed_claim(self) -> None:
        """A new token whose claim changed restarts the child on the session's
        next request; a request with the same values changes nothing."""
        bridge = self.bridge()
        first = self.token("alice", gh_token="gh-alice", mcp_servers="*")
        session = bridge.open_session(init=init(), headers=first)
        [old] = bridge.reactor.children
        again = self.token("alice", gh_token="gh-alice", mcp_servers="*", iat=int(time.time()) - 1)
        self.answered(bridge, self.post(bridge, call(2, "a"), {**again, "mcp-session-id": session}))
        bridge.reactor.advance(10)
        self.assertEqual(bridge.reactor.children, [old])
        renewed = self.token("alice", gh_token="gh-alice-2", mcp_servers="*")
        d = self.post(bridge, call(3, "b"), {**renewed, "mcp-session-id": session})
        bridge.reactor.advance(10)
        self.renewed(bridge, d, old, "gh-alice-2")

    def test_changed_claim_stateless(self) -> None:
        """The same for 2026-07-28 requests: the principal's hub child restarts
        with the new value."""
        bridge = self.bridge()

        def ask(i: int, token: dict[str, str]) -> Any:
            message = modern(i, "tools/call", {"name": "echo", "arguments": {"i": i}})
            treq: Any = bridge.client
            d = treq.request(
                "POST",
                "http://127.0.0.1/servers/s/mcp",
                data=jsonrpc.dumps(message),
                headers={**headers(message), **token},
            )
            bridge.reactor.advance(10)
            return self.answered(bridge, d)

        self.assertIn("result", ask(1, self.token("alice", gh_token="one", mcp_servers="*")))
        [old] = bridge.reactor.children
        self.assertEqual(old.env["GH_TOKEN"], "one")
        self.assertIn("result", ask(2, self.token("alice", gh_token="two", mcp_servers="*")))
        self.assertTrue(old.exited)
        [new] = [c for c in bridge.reactor.children if not c.exited]
        self.assertEqual(new.env["GH_TOKEN"], "two")

    def test_missing_later(self) -> None:
        """A credential gone from the secrets file: the principal's next
        request is refused with 403 naming it, and audited; its child is
        left as it was."""
        bridge = self.bridge()
        alice = self.token("alice", gh_token="gh-alice", mcp_servers="*")
        session = bridge.open_session(init=init(), headers=alice)
        [child] = bridge.reactor.children
        write_private(self.secrets, '["jwt:bob"]\nDB_PASSWORD = "bob-db-pw"\n')
        os.utime(self.secrets, (time.time() + 5, time.time() + 5))
        response = self.successResultOf(
            self.post(bridge, call(2, "x"), {**alice, "mcp-session-id": session})
        )
        self.assertEqual(response.code, 403)
        body = bridge.json(response)
        self.assertEqual(body["id"], 2)
        self.assertIn("'DB_PASSWORD'", body["error"]["message"])
        self.assertFalse(child.exited)
        self.assertEqual(child.requests("tools/call"), [])

    def test_endpoint_member_renews(self) -> None:
        """Through an endpoint, the member's child restarts with the new claim too."""

        def tools(child: Any) -> None:
            child.lists["tools/list"] = [{"name": "echo", "inputSchema": {"type": "object"}}]

        bridge = self.bridge(endpoint=True, on_spawn=tools)
        first = self.token("alice", gh_token="one", mcp_servers="*")
        response = bridge.request("POST", "/endpoints/one/mcp", init(), {**JSON, **first})
        [session] = response.headers.getRawHeaders("mcp-session-id")
        bridge.json(response)
        [old] = bridge.reactor.children
        renewed = self.token("alice", gh_token="two", mcp_servers="*")
        message = jsonrpc.request(2, "tools/call", {"name": "s__echo", "arguments": {}})
        treq: Any = bridge.client
        d = treq.request(
            "POST",
            "http://127.0.0.1/endpoints/one/mcp",
            data=jsonrpc.dumps(message),
            headers={**JSON, **renewed, "mcp-session-id": session},
        )
        bridge.reactor.advance(10)
        self.renewed(bridge, d, old, "two")

    def test_config(self) -> None:
        """A per-client value needs a child per client, and a private secrets file."""
        shared = {
            "servers": {"s": {"command": "c", "env": {"T": "${claim:t}"}}},
        }
        error = self.assertRaises(ConfigError, parse_config, shared, "t.toml", {})
        self.assertEqual(error.key, "servers.s.env.T")
        self.assertIn('sharing = "principal"', error.fix)
        os.chmod(self.secrets, 0o644)
        doc = {"servers": {"s": {"command": "c"}}, "secrets": {"file": self.secrets}}
        error = self.assertRaises(ConfigError, parse_config, doc, "t.toml", {})
        self.assertEqual(error.key, "secrets.file")
        self.assertIn("chmod 600", error.fix)
        # A systemd credential is the same for everyone: any sharing mode takes it.
        fine = {"servers": {"s": {"command": "c", "env": {"K": "${credential:k}"}}}}
        self.assertEqual(parse_config(fine, "t", {}).servers["s"].env, {"K": "${credential:k}"})


def call(i: int, step: str) -> jsonrpc.Message:
    return jsonrpc.request(i, "tools/call", {"name": "echo", "arguments": {"step": step}})


def write_private(path: str, text: str) -> None:
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)


# Secret values: random enough that none turns up anywhere by chance (a short
# or plain one would: "credential_m" is in every refusal's event name), with
# characters that JSON, TOML and log formats escape.
SECRET_VALUES = st.tuples(st.uuids(), st.text(alphabet="-_.~+/=!@#$%^&*\"'\\", max_size=6)).map(
    lambda t: f"sk-{t[0].hex}{t[1]}"
)


class SecretsHiddenTests(SynchronousTestCase):
    """Whatever the values, no credential a child gets appears in what the
    bridge logs, audits, shows (status, admin API, metrics) or answers."""

    @settings(max_examples=20, deadline=None)
    @given(
        claims=st.tuples(SECRET_VALUES, SECRET_VALUES),
        secrets=st.tuples(SECRET_VALUES, SECRET_VALUES, SECRET_VALUES),
        credential=SECRET_VALUES,
    )
    def test_nowhere(
        self, claims: tuple[str, str], secrets: tuple[str, str, str], credential: str
    ) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        key = directory / "jwt.secret"
        key.write_bytes(SECRET)
        secrets_file = directory / "secrets.json"
        write_private(
            str(secrets_file),
            json.dumps({"jwt:alice": {"DB": secrets[0]}, "jwt:bob": {"DB": secrets[1]}}),
        )
        credentials = directory / "credentials"
        credentials.mkdir()
        (credentials / "api_key").write_text(credential)
        environ = {"CREDENTIALS_DIRECTORY": str(credentials)}
        audit = directory / "audit.jsonl"
        doc = {
            "servers": {
                "s": {
                    "command": "fake",
                    "sharing": "principal",
                    "env": {
                        "GH": "${claim:gh}",
                        "DB": "${secret:DB}",
                        "KEY": "${credential:api_key}",
                    },
                }
            },
            "auth": {
                "jwt": {
                    "issuer": ISSUER,
                    "audience": [AUD],
                    "key_file": str(key),
                    "algorithms": ["HS256"],
                },
                "authorization_servers": [ISSUER],
                "resource_url": AUD,
            },
            "secrets": {"file": str(secrets_file)},
            "audit": {"path": str(audit)},
        }
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        bridge = Service(self, parse_config(doc, "test.toml", environ), environ=environ)
        seen: list[bytes] = []

        def token(sub: str, **more: Any) -> dict[str, str]:
            now = int(time.time())
            payload = {"sub": sub, "aud": AUD, "iss": ISSUER, "iat": now, "exp": now + 300}
            payload.update(more, mcp_servers="*")
            return bearer(jwt.encode(payload, SECRET, "HS256"))

        def ask(method: str, path: str, body: Any, extra: dict[str, str]) -> Any:
            response = bridge.request(method, path, body, {**JSON, **extra})
            content = bridge.content(response)
            seen.append(content)
            return response, content

        alice = token("alice", gh=claims[0])
        bob = token("bob", gh=claims[1])
        ops = token("ops", scope="mcp:admin")
        response, _ = ask("POST", "/servers/s/mcp", init(), alice)
        [session] = response.headers.getRawHeaders("mcp-session-id")
        ask("POST", "/servers/s/mcp", call(2, "a"), {**alice, "mcp-session-id": session})
        stateless = modern(3, "tools/call", {"name": "echo", "arguments": {}})
        ask("POST", "/servers/s/mcp", stateless, {**headers(stateless), **bob})
        # Carol has no secret: refused, and the refusal is audited.
        carol = token("carol", gh="carol-claim")
        ask("POST", "/servers/s/mcp", init(), carol)
        # Alice's secret changes: her child restarts (logged, audited).
        write_private(
            str(secrets_file),
            json.dumps({"jwt:alice": {"DB": secrets[2]}, "jwt:bob": {"DB": secrets[1]}}),
        )
        os.utime(secrets_file, (time.time() + 5, time.time() + 5))
        ask("POST", "/servers/s/mcp", call(4, "b"), {**alice, "mcp-session-id": session})
        bridge.reactor.advance(10)
        for path in ("/servers", "/servers/s", "/health", "/metrics", "/admin/servers/s"):
            ask("GET", path, None, ops)
        ask("GET", "/admin/sessions", None, ops)
        ask("POST", "/admin/servers/s/children/jwt:bob/stop", None, ops)
        bridge.close()
        spawned = {c.env["DB"] for c in bridge.reactor.children}
        self.assertEqual(spawned, {secrets[0], secrets[1], secrets[2]}, "every value was used")
        shown = [
            *(formatEvent(e) or "" for e in events),
            *(eventAsJSON(e) for e in events),
            audit.read_text(),
            *(b.decode("utf-8", "replace") for b in seen),
        ]
        self.assertIn("jwt:carol", audit.read_text())
        for value in (*claims, *secrets, credential):
            # Its random part: found however an output escapes the rest.
            core = value[: len("sk-") + 32]
            leaks = [text for text in shown if core in text]
            self.assertEqual(leaks, [], f"{value!r} shown")
