"""A reload that takes a credential or a grant away ends what it allowed:
the sessions and streams of that principal, each closure audited."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import attrs
import jwt
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ResponseFailed

from mcptwist.config.model import (
    AuditConfig,
    AuthConfig,
    BridgeConfig,
    JWTConfig,
    ServerConfig,
    TokenConfig,
)
from mcptwist.mcp import jsonrpc
from mcptwist.security.auth import hash_token, revoked

from .support.bridge import Service
from .support.idp import AUD as AUDIENCE
from .support.idp import SECRET
from .support.idp import SECRET_ISSUER as ISSUER
from .support.messages import JSON, STREAM, bearer


def token(name: str, secret: str, *servers: str) -> TokenConfig:
    return TokenConfig(name, hash_token(secret), frozenset(servers or ("*",)))


def make_jwt(**claims: Any) -> str:
    now = int(time.time())
    base = {
        "sub": "carol",
        "aud": AUDIENCE,
        "iss": ISSUER,
        "exp": now + 3600,
        "scope": "mcp:server:*",
    }
    base.update(claims)
    return jwt.encode(base, SECRET, "HS256")


class Bridge:
    """A running service over fake children (servers s and t), driven in memory."""

    def __init__(self, test: SynchronousTestCase, auth: AuthConfig) -> None:
        self.test = test
        directory = test.mktemp()
        os.makedirs(directory)
        self.key_file = os.path.join(directory, "jwt.secret")
        with open(self.key_file, "wb") as f:
            f.write(SECRET)
        self.audit_path = os.path.join(directory, "audit.jsonl")
        servers = {n: ServerConfig(name=n, command="fake") for n in ("s", "t")}
        self.config = BridgeConfig(
            servers=servers,
            listeners=(),
            auth=self.with_key(auth),
            audit=AuditConfig(path=self.audit_path),
        )
        self.harness = Service(test, self.config)
        self.service = self.harness.service
        self.client = self.harness.client

    def with_key(self, auth: AuthConfig) -> AuthConfig:
        """C{auth} with the test's key file for its JWT settings."""
        if auth.jwt is None:
            return auth
        return attrs.evolve(auth, jwt=attrs.evolve(auth.jwt, key_file=self.key_file))

    def reload(self, auth: AuthConfig) -> dict[str, Any]:
        d = self.service.apply(attrs.evolve(self.config, auth=self.with_key(auth)))
        changes: dict[str, Any] = self.test.successResultOf(d)
        # The ended responses reach their readers.
        self.client.flush()
        return changes

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, Any]:
        return self.harness.exchange(method, path, body, headers)

    def session(self, server: str, credentials: dict[str, str]) -> str:
        """A Streamable HTTP session, initialized."""
        return self.harness.open_session(server, headers=credentials)

    def ping(self, server: str, session_id: str, credentials: dict[str, str]) -> int:
        status, _, _ = self.request(
            "POST",
            f"/servers/{server}/mcp",
            jsonrpc.request(7, "ping"),
            {**JSON, "mcp-session-id": session_id, **credentials},
        )
        return status

    def stream(self, path: str, headers: dict[str, str]) -> list[bool]:
        """Open an SSE stream; the list gets True when it ends."""
        status, _, response = self.request("GET", path, None, {**STREAM, **headers})
        self.test.assertEqual(status, 200)
        ended: list[bool] = []
        d = self.client.collect(response, lambda _: None)
        d.addErrback(lambda f: f.trap(ResponseFailed))
        d.addBoth(lambda _: ended.append(True))
        self.client.flush()
        self.test.assertEqual(ended, [], "the stream is open")
        return ended

    def closed(self) -> list[tuple[str, str, str]]:
        """(principal, server, reason) of every session_closed event."""
        with open(self.audit_path, "rb") as f:
            events = [json.loads(line) for line in f]
        return [
            (e["principal"], e["server"], e["reason"])
            for e in events
            if e["event"] == "session_closed"
        ]


class RevocationTests(SynchronousTestCase):
    def test_a_removed_token_loses_its_sessions_and_streams(self) -> None:
        a, b = bearer("mcpt_a"), bearer("mcpt_b")
        auth = AuthConfig(tokens=(token("a", "mcpt_a"), token("b", "mcpt_b")))
        bridge = Bridge(self, auth)
        a_session = bridge.session("s", a)
        a_stream = bridge.stream("/servers/s/mcp", {"mcp-session-id": a_session, **a})
        a_sse = bridge.stream("/servers/t/sse", a)
        b_session = bridge.session("s", b)
        b_stream = bridge.stream("/servers/s/mcp", {"mcp-session-id": b_session, **b})

        changes = bridge.reload(AuthConfig(tokens=(token("b", "mcpt_b"),)))

        self.assertEqual(changes["revoked"], ["token:a on s", "token:a on t"])
        self.assertEqual((a_stream, a_sse), ([True], [True]), "a's streams end")
        self.assertEqual(bridge.ping("s", a_session, a), 401)
        self.assertEqual(
            sorted(p for p, s, why in bridge.closed() if why == "revoked: token removed by reload"),
            ["token:a"],  # the SSE session never initialized: not announced, not audited
        )
        self.assertEqual(
            [s.principal for s in bridge.service.registry.sessions.values()], ["token:b"]
        )
        # b: its session and stream go on.
        self.assertEqual(b_stream, [])
        self.assertEqual(bridge.ping("s", b_session, b), 200)

    def test_a_replaced_token_loses_its_sessions(self) -> None:
        """The same name with a new secret: the old secret's sessions end,
        and the new one cannot take them over (404)."""
        bridge = Bridge(self, AuthConfig(tokens=(token("a", "mcpt_old"),)))
        session = bridge.session("s", bearer("mcpt_old"))
        stream = bridge.stream("/servers/s/mcp", {"mcp-session-id": session, **bearer("mcpt_old")})
        bridge.reload(AuthConfig(tokens=(token("a", "mcpt_new"),)))
        self.assertEqual(stream, [True])
        self.assertEqual(bridge.ping("s", session, bearer("mcpt_new")), 404)
        self.assertEqual(bridge.closed(), [("token:a", "s", "revoked: token replaced by reload")])

    def test_a_shrunk_grant_loses_the_server_only(self) -> None:
        a = bearer("mcpt_a")
        bridge = Bridge(self, AuthConfig(tokens=(token("a", "mcpt_a", "s", "t"),)))
        on_s, on_t = bridge.session("s", a), bridge.session("t", a)
        t_stream = bridge.stream("/servers/t/mcp", {"mcp-session-id": on_t, **a})
        changes = bridge.reload(AuthConfig(tokens=(token("a", "mcpt_a", "s"),)))
        self.assertEqual(changes["revoked"], ["token:a on t"])
        self.assertEqual(t_stream, [True])
        self.assertEqual(
            bridge.closed(), [("token:a", "t", "revoked: server no longer granted by reload")]
        )
        self.assertEqual(bridge.ping("s", on_s, a), 200)
        self.assertEqual(bridge.ping("t", on_t, a), 403)

    def test_stateless_hubs_and_their_streams(self) -> None:
        """A 2026-07-28 client's hub and its listen stream end too."""
        a = bearer("mcpt_a")
        bridge = Bridge(self, AuthConfig(tokens=(token("a", "mcpt_a"), token("b", "mcpt_b"))))
        listen = jsonrpc.request(
            1,
            "subscriptions/listen",
            {
                "_meta": {
                    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                    "io.modelcontextprotocol/clientInfo": {"name": "t", "version": "1"},
                    "io.modelcontextprotocol/clientCapabilities": {},
                },
                "notifications": {"toolsListChanged": True},
            },
        )
        headers = {
            **JSON,
            "accept": "application/json, text/event-stream",
            "mcp-protocol-version": "2026-07-28",
            "mcp-method": "subscriptions/listen",
            **a,
        }
        status, _, response = bridge.request("POST", "/servers/s/mcp", listen, headers)
        self.assertEqual(status, 200)
        ended: list[bool] = []
        d = bridge.client.collect(response, lambda _: None)
        d.addBoth(lambda _: ended.append(True))
        bridge.client.flush()
        self.assertEqual(ended, [])
        [hub] = bridge.service.registry.sessions.values()
        self.assertEqual(hub.transport, "stateless")
        bridge.reload(AuthConfig(tokens=(token("b", "mcpt_b"),)))
        self.assertEqual(ended, [True])
        self.assertEqual(bridge.service.registry.sessions, {})
        self.assertEqual(bridge.closed(), [("token:a", "s", "revoked: token removed by reload")])

    def test_jwt_sessions_end_when_the_jwt_settings_change(self) -> None:
        jwt_config = JWTConfig(algorithms=("HS256",), audience=(AUDIENCE,), issuer=ISSUER)
        auth = AuthConfig(
            tokens=(token("b", "mcpt_b"),),
            jwt=jwt_config,
            resource_url=AUDIENCE,
            authorization_servers=(ISSUER,),
        )
        bridge = Bridge(self, auth)
        carol = bearer(make_jwt())
        session = bridge.session("s", carol)
        kept = bridge.session("s", bearer("mcpt_b"))
        # Refreshing keys more often, or a new leeway, changes no trust.
        tuned = attrs.evolve(jwt_config, jwks_refresh=60.0, leeway=5.0)
        self.assertEqual(bridge.reload(attrs.evolve(auth, jwt=tuned))["revoked"], [])
        self.assertEqual(bridge.ping("s", session, carol), 200)
        stream = bridge.stream("/servers/s/mcp", {"mcp-session-id": session, **carol})
        # Another audience: a token cannot be checked again, so its session ends.
        other = attrs.evolve(tuned, audience=(AUDIENCE, "https://other.example.com"))
        self.assertEqual(
            bridge.reload(attrs.evolve(auth, jwt=other))["revoked"], ["jwt:carol on s"]
        )
        self.assertEqual(stream, [True])
        self.assertEqual(bridge.ping("s", session, carol), 404)
        self.assertEqual(
            bridge.closed(), [("jwt:carol", "s", "revoked: [auth.jwt] changed by reload")]
        )
        self.assertEqual(bridge.ping("s", kept, bearer("mcpt_b")), 200)

    def test_turning_authentication_on_ends_anonymous_sessions(self) -> None:
        bridge = Bridge(self, AuthConfig())
        session = bridge.session("s", {})
        stream = bridge.stream("/servers/s/mcp", {"mcp-session-id": session})
        bridge.reload(AuthConfig(tokens=(token("a", "mcpt_a"),)))
        self.assertEqual(stream, [True])
        self.assertEqual(bridge.ping("s", session, bearer("mcpt_a")), 404)
        self.assertEqual(
            bridge.closed(), [("anonymous", "s", "revoked: authentication turned on by reload")]
        )

    def test_an_unchanged_configuration_revokes_nothing(self) -> None:
        a = bearer("mcpt_a")
        auth = AuthConfig(tokens=(token("a", "mcpt_a", "s"),))
        bridge = Bridge(self, auth)
        session = bridge.session("s", a)
        self.assertEqual(bridge.reload(auth)["revoked"], [])
        self.assertEqual(bridge.ping("s", session, a), 200)
        self.assertEqual(bridge.closed(), [])


names = st.sampled_from(["a", "b", "c"])
secrets = st.sampled_from(["mcpt_1", "mcpt_2"])
grants = st.frozensets(st.sampled_from(["*", "s", "t"]))


@st.composite
def auths(draw: st.DrawFn) -> AuthConfig:
    chosen = draw(st.lists(names, unique=True))
    tokens = tuple(TokenConfig(n, hash_token(draw(secrets)), draw(grants)) for n in chosen)
    jwt_config = draw(
        st.none()
        | st.builds(
            JWTConfig,
            algorithms=st.just(("HS256",)),
            audience=st.sampled_from([(AUDIENCE,), ("x",)]),
            issuer=st.just(ISSUER),
            leeway=st.sampled_from([0.0, 30.0]),
        )
    )
    return AuthConfig(tokens=tokens, jwt=jwt_config)


principals = st.sampled_from(["anonymous", "token:a", "token:b", "token:c", "jwt:a"])


class RevokedRuleTests(SynchronousTestCase):
    @given(auths(), principals, st.sampled_from(["s", "t"]))
    def test_the_same_rules_take_nothing(self, auth: AuthConfig, who: str, server: str) -> None:
        """A session that the rules let open is never revoked by the same rules."""
        if self._allowed(auth, who, server):
            self.assertIsNone(revoked(auth, auth, who, server))

    @staticmethod
    def _allowed(auth: AuthConfig, who: str, server: str) -> bool:
        kind, _, name = who.partition(":")
        if kind == "anonymous":
            return not auth.enabled
        if kind == "jwt":
            return auth.jwt is not None
        found = [t for t in auth.tokens if t.name == name]
        return bool(found) and ("*" in found[0].servers or server in found[0].servers)

    @given(auths(), auths(), principals, st.sampled_from(["s", "t"]))
    def test_what_survives_is_still_allowed(
        self, old: AuthConfig, new: AuthConfig, who: str, server: str
    ) -> None:
        """Whatever a reload leaves open, the new rules allow, with the same secret."""
        if not self._allowed(old, who, server):
            return
        if revoked(old, new, who, server) is not None:
            return
        self.assertTrue(self._allowed(new, who, server))
        kind, _, name = who.partition(":")
        if kind == "token":
            [before] = [t for t in old.tokens if t.name == name]
            [after] = [t for t in new.tokens if t.name == name]
            self.assertEqual(before.digest, after.digest)
        if kind == "jwt":
            assert old.jwt is not None and new.jwt is not None
            self.assertEqual(old.jwt.audience, new.jwt.audience)
