"""Admission over the live HTTP surface, in memory: every route, both transports,
every kind of credential, with the audit trail read back."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import attrs
import jwt
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.python.components import Componentized
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from mcptwist.config.model import (
    AuditConfig,
    AuthConfig,
    Bucket,
    JWTConfig,
    LimitsConfig,
    ServerConfig,
    ServerLimits,
    TokenConfig,
)
from mcptwist.config.networks import parse_networks
from mcptwist.mcp import jsonrpc
from mcptwist.security.auth import hash_token
from mcptwist.security.ipfilter import rate_key
from mcptwist.web.app import BridgeApp

from .support import bridge as harness
from .support.idp import AUD as AUDIENCE
from .support.idp import SECRET, validate_iss_2_10_0
from .support.idp import SECRET_ISSUER as ISSUER
from .support.messages import INIT, JSON, bearer

TOKENS = {"alice": "mcpt_alice_token", "ops": "mcpt_ops_token", "bob": "mcpt_bob_token"}


class Bridge(harness.Bridge):
    """Two servers, s and t, behind the gate, with static tokens and JWT."""

    def __init__(self, test: SynchronousTestCase, hold: bool = False, **settings: Any) -> None:
        directory = test.mktemp()
        os.makedirs(directory)
        key_file = os.path.join(directory, "jwt.secret")
        with open(key_file, "wb") as f:
            f.write(SECRET)
        self.audit_path = os.path.join(directory, "audit.jsonl")
        servers = [
            ServerConfig(name=name, command="fake", **settings.pop(f"server_{name}", {}))
            for name in ("s", "t")
        ]
        auth = AuthConfig(
            tokens=(
                TokenConfig("alice", hash_token(TOKENS["alice"]), frozenset({"s"})),
                TokenConfig("ops", hash_token(TOKENS["ops"]), frozenset({"*"}), admin=True),
                TokenConfig("bob", hash_token(TOKENS["bob"]), frozenset({"t"})),
            ),
            jwt=JWTConfig(
                algorithms=("HS256",),
                audience=(AUDIENCE,),
                issuer=ISSUER,
                key_file=key_file,
            ),
            resource_url=AUDIENCE,
            authorization_servers=(ISSUER,),
        )
        audit = AuditConfig(path=self.audit_path)
        super().__init__(test, *servers, hold=hold, auth=auth, audit=audit, **settings)

    def request(  # type: ignore[override]
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, Any]:
        """(status, headers, JSON body) of one request (see L{exchange})."""
        return self.exchange(method, path, body, headers)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        self.audit.flush_refusals(everything=True)
        with open(self.audit_path, "rb") as f:
            lines = [json.loads(line) for line in f]
        return [e for e in lines if kind is None or e["event"] == kind]


class ComponentizedRequest(DummyRequest, Componentized):
    """A DummyRequest that holds components and names its site (none here),
    as twisted.web's requests do."""

    site = None

    def __init__(self, postpath: list[bytes]) -> None:
        DummyRequest.__init__(self, postpath)
        Componentized.__init__(self)


def make_jwt(**claims: Any) -> str:
    # PyJWT checks times against the real clock.
    now = int(time.time())
    base = {"sub": "carol", "aud": AUDIENCE, "iss": ISSUER, "exp": now + 3600, "iat": now}
    base.update(claims)
    return jwt.encode({k: v for k, v in base.items() if v is not None}, SECRET, "HS256")


# Every route, with the method that reaches it.
ROUTES = [
    ("POST", "/servers/s/mcp", INIT, JSON),
    ("GET", "/servers/s/mcp", None, {"accept": "text/event-stream", "mcp-session-id": "x"}),
    ("DELETE", "/servers/s/mcp", None, {"mcp-session-id": "x"}),
    ("GET", "/servers/s/sse", None, {"accept": "text/event-stream"}),
    ("POST", "/servers/s/messages?session_id=x", jsonrpc.notification("n"), JSON),
    ("GET", "/servers/s", None, {}),
    ("GET", "/servers", None, {}),
    ("GET", "/", None, {}),
    ("GET", "/servers/nonexistent/mcp", None, {"accept": "text/event-stream"}),
]


class AuthenticationMatrixTests(SynchronousTestCase):
    """Missing or bad credentials: 401 with a challenge and a JSON-RPC body, on every route."""

    def setUp(self) -> None:
        self.bridge = Bridge(self)

    def check_401(self, headers: dict[str, str], reason: str | None) -> None:
        for method, path, body, extra in ROUTES:
            status, response_headers, answer = self.bridge.request(
                method, path, body, {**extra, **headers}
            )
            self.assertEqual(status, 401, (method, path, headers))
            self.assertEqual(answer["error"]["code"], -32001)
            self.assertEqual(answer["jsonrpc"], "2.0")
            [challenge] = response_headers.getRawHeaders("www-authenticate")
            self.assertTrue(challenge.startswith("Bearer "), challenge)
            self.assertIn('resource_metadata="https://mcp.example.com/.well-known/', challenge)
            if path.startswith("/servers/s/mcp"):
                self.assertIn("oauth-protected-resource/servers/s/mcp", challenge)
            if reason is not None:
                self.assertIn(reason, answer["error"]["message"])
            for token in TOKENS.values():
                self.assertNotIn(token, json.dumps(answer))
        # The first refusal is written, then one line counts the repeats.
        first, rest = self.bridge.events("auth_failure")
        self.assertEqual(first["route"], ROUTES[0][1])
        self.assertEqual(rest["route"], ROUTES[-1][1])
        self.assertEqual(rest["repeated"], len(ROUTES) - 1)
        self.assertEqual({first["peer"], rest["peer"]}, {"127.0.0.1"})
        text = Path(self.bridge.audit_path).read_text()
        for token in TOKENS.values():
            self.assertNotIn(token, text)

    def test_no_credentials(self) -> None:
        self.check_401({}, None)

    def test_malformed_header(self) -> None:
        self.check_401({"authorization": "Basic YWxpY2U6cHc="}, None)

    def test_wrong_token(self) -> None:
        self.check_401(bearer("mcpt_not_a_token"), None)

    def test_expired_jwt(self) -> None:
        self.check_401(bearer(make_jwt(exp=int(time.time()) - 3600)), "expired")

    def test_wrong_audience(self) -> None:
        self.check_401(bearer(make_jwt(aud="https://other.example.com")), "audience")

    def test_wrong_issuer(self) -> None:
        self.check_401(bearer(make_jwt(iss="https://evil.example.com")), "issuer")

    def test_part_of_the_issuer(self) -> None:
        """A part of the configured iss is refused, even by a PyJWT that
        matches parts (2.10.0, CVE-2024-53861)."""
        self.patch(jwt.api_jwt.PyJWT, "_validate_iss", validate_iss_2_10_0)
        self.check_401(bearer(make_jwt(iss=ISSUER[:-1])), "issuer")

    def test_issuer_within_another(self) -> None:
        self.patch(jwt.api_jwt.PyJWT, "_validate_iss", validate_iss_2_10_0)
        self.check_401(bearer(make_jwt(iss="auth.example.com")), "issuer")

    def test_issuer_inside_a_longer_one(self) -> None:
        self.patch(jwt.api_jwt.PyJWT, "_validate_iss", validate_iss_2_10_0)
        self.check_401(bearer(make_jwt(iss="_" + ISSUER + "_")), "issuer")

    def test_token_in_query_string_refused(self) -> None:
        status, _, answer = self.bridge.request(
            "POST", f"/servers/s/mcp?access_token={TOKENS['alice']}", INIT, JSON
        )
        self.assertEqual(status, 401)
        self.assertNotIn(TOKENS["alice"], json.dumps(answer))


class AuthorisationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.bridge = Bridge(self)

    def test_token_for_another_server_gets_403_whether_or_not_it_exists(self) -> None:
        answers = {}
        for path in ("/servers/t/mcp", "/servers/nonexistent/mcp", "/servers/t/sse"):
            status, headers, answer = self.bridge.request(
                "POST" if path.endswith("mcp") else "GET",
                path,
                INIT,
                {
                    **JSON,
                    "accept": "application/json, text/event-stream",
                    **bearer(TOKENS["alice"]),
                },
            )
            self.assertEqual(status, 403, path)
            self.assertEqual(
                answer,
                {
                    "jsonrpc": "2.0",
                    "id": None,
                    "error": {
                        "code": jsonrpc.SERVER_UNAVAILABLE,
                        "message": "Forbidden: 'alice' may not use this server",
                    },
                },
                path,
            )
            fields = sorted((k, v) for k, v in headers.getAllRawHeaders() if k.lower() != b"date")
            answers[path] = (status, fields, answer)
        # Nothing in the answer tells an existing server from a missing one.
        self.assertEqual(answers["/servers/t/mcp"], answers["/servers/nonexistent/mcp"])
        refused = self.bridge.events("access_refused")
        self.assertEqual([e["server"] for e in refused], ["t", "t"])
        self.assertEqual(refused[1]["repeated"], 2)
        self.assertEqual({e["principal"] for e in refused}, {"token:alice"})

    def test_allowed_server_works_on_both_transports(self) -> None:
        status, _, answer = self.bridge.request(
            "POST", "/servers/s/mcp", INIT, {**JSON, **bearer(TOKENS["alice"])}
        )
        self.assertEqual(status, 200)
        self.assertEqual(answer["result"]["protocolVersion"], "2025-06-18")
        status, _, _ = self.bridge.request(
            "GET",
            "/servers/s/sse",
            None,
            {"accept": "text/event-stream", **bearer(TOKENS["alice"])},
        )
        self.assertEqual(status, 200)
        [opened, *_] = self.bridge.events("session_opened")
        self.assertEqual((opened["principal"], opened["server"]), ("token:alice", "s"))

    def test_jwt_grants_by_scope(self) -> None:
        token = make_jwt(scope="mcp:server:t")
        status, _, _ = self.bridge.request(
            "POST", "/servers/t/mcp", INIT, {**JSON, **bearer(token)}
        )
        self.assertEqual(status, 200)
        status, _, _ = self.bridge.request(
            "POST", "/servers/s/mcp", INIT, {**JSON, **bearer(token)}
        )
        self.assertEqual(status, 403)

    def test_status_routes_need_admin(self) -> None:
        for path in ("/servers", "/servers/s"):
            status, _, _ = self.bridge.request("GET", path, None, bearer(TOKENS["alice"]))
            self.assertEqual(status, 403, path)
            status, _, _ = self.bridge.request("GET", path, None, bearer(TOKENS["ops"]))
            self.assertEqual(status, 200, path)
        status, _, _ = self.bridge.request(
            "GET", "/servers", None, bearer(make_jwt(scope="mcp:admin"))
        )
        self.assertEqual(status, 200)

    def test_a_scoped_admin_sees_only_its_servers(self) -> None:
        """An admin scope does not widen a principal's grants: status lists
        only its servers, and metrics (which count every server) are refused."""
        token = bearer(make_jwt(scope="mcp:admin mcp:server:s"))
        status, _, body = self.bridge.request("GET", "/servers", None, token)
        self.assertEqual((status, [s["name"] for s in body["servers"]]), (200, ["s"]))
        self.assertEqual(self.bridge.request("GET", "/servers/t", None, token)[0], 403)
        status, _, body = self.bridge.request("GET", "/metrics", None, token)
        self.assertEqual(status, 403)
        self.assertIn("a grant of every server", body["error"]["message"])
        self.assertNotEqual(
            self.bridge.request("GET", "/metrics", None, bearer(TOKENS["ops"]))[0], 403
        )

    def test_index_lists_only_usable_servers(self) -> None:
        _, _, index = self.bridge.request("GET", "/", None, bearer(TOKENS["alice"]))
        self.assertEqual(list(index["servers"]), ["s"])
        _, _, index = self.bridge.request("GET", "/", None, bearer(TOKENS["ops"]))
        self.assertEqual(sorted(index["servers"]), ["s", "t"])

    def test_health_is_public_and_names_nothing(self) -> None:
        status, _, body = self.bridge.request("GET", "/health", None, {})
        self.assertEqual(status, 200)
        self.assertEqual(body, {"status": "ok"})

    def test_session_bound_to_its_principal(self) -> None:
        status, headers, _ = self.bridge.request(
            "POST", "/servers/s/mcp", INIT, {**JSON, **bearer(TOKENS["alice"])}
        )
        [session] = headers.getRawHeaders("mcp-session-id")
        ping = jsonrpc.request(2, "ping")
        for token in (TOKENS["ops"], make_jwt(sub="alice", scope="mcp:server:*")):
            status, _, answer = self.bridge.request(
                "POST", "/servers/s/mcp", ping, {**JSON, "mcp-session-id": session, **bearer(token)}
            )
            self.assertEqual(status, 404)
            self.assertEqual(answer["error"]["code"], -32001)
        status, _, answer = self.bridge.request(
            "POST",
            "/servers/s/mcp",
            ping,
            {**JSON, "mcp-session-id": session, **bearer(TOKENS["alice"])},
        )
        self.assertEqual(status, 200)
        self.assertEqual(answer["id"], 2)

    def test_protected_resource_metadata(self) -> None:
        status, _, document = self.bridge.request(
            "GET", "/.well-known/oauth-protected-resource/servers/s/mcp", None, {}
        )
        self.assertEqual(status, 200)
        self.assertEqual(document["resource"], "https://mcp.example.com/servers/s/mcp")
        self.assertEqual(document["authorization_servers"], [ISSUER])
        self.assertEqual(document["bearer_methods_supported"], ["header"])
        self.assertEqual(document["scopes_supported"], ["mcp:server:*", "mcp:admin"])
        status, _, document = self.bridge.request(
            "GET", "/.well-known/oauth-protected-resource", None, {}
        )
        self.assertEqual((status, document["resource"]), (200, "https://mcp.example.com"))
        # An unknown server gets the same kind of answer: the document reveals nothing.
        status, _, document = self.bridge.request(
            "GET", "/.well-known/oauth-protected-resource/servers/zzz/mcp", None, {}
        )
        self.assertEqual(
            (status, document["resource"]), (200, "https://mcp.example.com/servers/zzz/mcp")
        )
        status, _, _ = self.bridge.request(
            "GET", "/.well-known/oauth-protected-resource/elsewhere", None, {}
        )
        self.assertEqual(status, 404)


class PathTests(SynchronousTestCase):
    def test_escaped_and_odd_paths_never_reach_a_route(self) -> None:
        """The gate authorises on the raw path and Klein routes on decoded
        segments: any path where the two could differ is refused."""
        bridge = Bridge(self)
        alice = {"accept": "text/event-stream", **bearer(TOKENS["alice"])}
        for path in (
            "//servers",
            "/%73ervers",
            "//servers/t",
            "/%73ervers/t",
            "//servers/t/sse",
            "/%2Fservers/t/sse",
            "/servers%2Ft%2Fsse",
            "/servers/%73/sse",
            "/servers/t/sse/",
            "/servers/",
            "/servers/s/../t/sse",
            "/servers/./t/sse",
        ):
            status, _, _ = bridge.request("GET", path, None, alice)
            self.assertEqual(status, 404, path)
        self.assertEqual(bridge.events("session_opened"), [])


class RequestAuditTests(SynchronousTestCase):
    def test_a_tool_call_is_audited_without_its_arguments(self) -> None:
        bridge = Bridge(self)
        headers = {**JSON, **bearer(TOKENS["alice"])}
        _, response_headers, _ = bridge.request("POST", "/servers/s/mcp", INIT, headers)
        [session] = response_headers.getRawHeaders("mcp-session-id")
        headers["mcp-session-id"] = session
        bridge.request(
            "POST", "/servers/s/mcp", jsonrpc.notification("notifications/initialized"), headers
        )
        call = jsonrpc.request(
            7, "tools/call", {"name": "echo", "arguments": {"text": "top secret value"}}
        )
        status, _, answer = bridge.request("POST", "/servers/s/mcp", call, headers)
        self.assertEqual(status, 200, answer)
        [event] = [e for e in bridge.events("request") if e["method"] == "tools/call"]
        self.assertEqual(event["name"], "echo")
        self.assertEqual(event["principal"], "token:alice")
        self.assertEqual(event["peer"], "127.0.0.1")
        self.assertEqual(event["server"], "s")
        self.assertEqual(event["session"], session)
        self.assertEqual(event["status"], "ok")
        self.assertEqual(event["arg_size"], len(b'{"text":"top secret value"}'))
        self.assertEqual(len(event["arg_sha256"]), 64)
        self.assertIsInstance(event["child_pid"], int)
        self.assertNotIn("top secret value", Path(bridge.audit_path).read_text())

    def test_initialize_and_a_call_cut_by_the_session_end(self) -> None:
        bridge = Bridge(self, hold=True)
        headers = {**JSON, **bearer(TOKENS["alice"])}
        _, response_headers, _ = bridge.request("POST", "/servers/s/mcp", INIT, headers)
        session = response_headers.getRawHeaders("mcp-session-id")[0]
        headers["mcp-session-id"] = session
        [opened] = bridge.events("session_opened")
        self.assertEqual(opened["protocol_version"], "2025-06-18")
        [init] = bridge.events("request")
        self.assertEqual((init["method"], init["status"]), ("initialize", "ok"))
        call = jsonrpc.request(7, "tools/call", {"name": "slow", "arguments": {}})
        d = bridge.client.request(
            "POST", "http://127.0.0.1/servers/s/mcp", data=jsonrpc.dumps(call), headers=headers
        )
        bridge.client.flush()
        self.assertEqual(bridge.request("DELETE", "/servers/s/mcp", None, headers)[0], 200)
        bridge.client.flush()
        self.successResultOf(d)
        [_, cut] = bridge.events("request")
        self.assertEqual(
            (cut["method"], cut["name"], cut["status"]), ("tools/call", "slow", "cancelled")
        )
        [closed] = bridge.events("session_closed")
        self.assertEqual(closed["session"], session)
        # The cut request is written before the session's end.
        order = [e["event"] for e in bridge.events() if e["event"] in ("request", "session_closed")]
        self.assertEqual(order, ["request", "request", "session_closed"])

    def test_arguments_written_when_the_server_asks(self) -> None:
        bridge = Bridge(self, server_s={"audit_arguments": True})
        headers = {**JSON, **bearer(TOKENS["alice"])}
        _, response_headers, _ = bridge.request("POST", "/servers/s/mcp", INIT, headers)
        headers["mcp-session-id"] = response_headers.getRawHeaders("mcp-session-id")[0]
        call = jsonrpc.request(7, "tools/call", {"name": "echo", "arguments": {"text": "hi"}})
        bridge.request("POST", "/servers/s/mcp", call, headers)
        [event] = [e for e in bridge.events("request") if e["method"] == "tools/call"]
        self.assertEqual(event["arguments"], {"text": "hi"})


class RateLimitTests(SynchronousTestCase):
    def test_burst_then_429_with_retry_after_and_other_clients_unaffected(self) -> None:
        limits = LimitsConfig(per_principal=Bucket(1.0, 5), per_ip=None)
        bridge = Bridge(self, limits=limits)
        alice = bearer(TOKENS["alice"])
        answers = [bridge.request("GET", "/", None, alice) for _ in range(8)]
        self.assertEqual([a[0] for a in answers], [200] * 5 + [429] * 3)
        _, headers, body = answers[5]
        self.assertEqual(headers.getRawHeaders("retry-after"), ["1"])
        self.assertIn("rate limit", body["error"]["message"])
        self.assertEqual(bridge.request("GET", "/", None, bearer(TOKENS["ops"]))[0], 200)
        bridge.reactor.advance(1.0)
        self.assertEqual(bridge.request("GET", "/", None, alice)[0], 200)
        limited = bridge.events("rate_limited")
        self.assertEqual(sum(e.get("repeated", 1) for e in limited), 3)
        self.assertEqual({e["principal"] for e in limited}, {"token:alice"})

    def test_per_server_limit(self) -> None:
        bridge = Bridge(
            self,
            server_s={"limits": ServerLimits(per_principal=Bucket(1.0, 2))},
            limits=LimitsConfig(per_principal=None, per_ip=None),
        )
        ops = {**JSON, **bearer(TOKENS["ops"])}
        codes = [bridge.request("POST", "/servers/s/mcp", INIT, ops)[0] for _ in range(3)]
        self.assertEqual(codes, [200, 200, 429])
        self.assertEqual(bridge.request("POST", "/servers/t/mcp", INIT, ops)[0], 200)


class ServerAddressRuleTests(SynchronousTestCase):
    def test_server_allow_list(self) -> None:
        bridge = Bridge(self, server_s={"allow": parse_networks(["10.0.0.0/8"])})
        ops = {**JSON, **bearer(TOKENS["ops"])}
        self.assertEqual(bridge.request("POST", "/servers/s/mcp", INIT, ops)[0], 403)
        self.assertEqual(bridge.request("POST", "/servers/t/mcp", INIT, ops)[0], 200)
        [event] = bridge.events("ip_refused")
        self.assertEqual((event["peer"], event["scope"]), ("127.0.0.1", "server"))


class OperatorRouteTests(SynchronousTestCase):
    def test_admin_and_metrics_refuse_browsers(self) -> None:
        """A web page that can reach the bridge must not drive the admin API,
        even when the bridge trusts its origin for MCP."""
        bridge = Bridge(self, allowed_origins=("http://localhost:*",))
        origin = {"origin": "http://localhost:3000"}
        for method, path in (
            ("POST", "/admin/reload"),
            ("OPTIONS", "/admin/servers"),
            ("GET", "/metrics"),
            # Every path the gate routes to the operators' resources.
            ("GET", "/admin"),
            ("OPTIONS", "/admin"),
            ("GET", "/metrics/x"),
        ):
            status, headers, answer = bridge.request(
                method,
                path,
                None,
                {**origin, "access-control-request-method": "POST", **bearer(TOKENS["ops"])},
            )
            self.assertEqual(status, 403, path)
            self.assertEqual(
                answer["error"]["message"],
                "Forbidden: the admin API answers only the bridge's own pages (same origin)"
                if path.startswith("/admin")
                else "Forbidden: the admin API and metrics are not for browsers",
                path,
            )
            self.assertIsNone(headers.getRawHeaders("access-control-allow-origin"))

    def test_server_name_not_utf8_is_404(self) -> None:
        """Such a path cannot come through twisted.web's HTTP/1.1 parser; should
        one reach the gate, it names no server, whoever asks."""
        bridge = Bridge(self)
        for token in (TOKENS["ops"], TOKENS["alice"]):
            for path in (b"/servers/\xff/mcp", b"/servers/\xff"):
                request = ComponentizedRequest([])
                request.method = b"POST"
                request.path = request.uri = path
                request.client = IPv4Address("TCP", "127.0.0.1", 1)
                request.requestHeaders.setRawHeaders(b"host", [b"127.0.0.1"])
                request.requestHeaders.setRawHeaders(
                    b"authorization", [b"Bearer " + token.encode()]
                )
                body = bridge.app.resource().render(request)
                self.assertEqual(request.responseCode, 404, path)
                self.assertEqual(
                    json.loads(body)["error"],
                    {"code": jsonrpc.INVALID_REQUEST, "message": "Not Found"},
                )
        self.assertEqual(bridge.events("access_refused"), [])

    def test_content_type_is_one_media_type(self) -> None:
        bridge = Bridge(self)
        headers = {**bearer(TOKENS["alice"]), "accept": "application/json"}
        for kind in ("text/plain;,application/json", "text/plain, application/json"):
            status, _, _ = bridge.request(
                "POST", "/servers/s/mcp", INIT, {**headers, "content-type": kind}
            )
            self.assertEqual(status, 415, kind)


class RateKeyTests(SynchronousTestCase):
    def test_keys(self) -> None:
        self.assertIsNone(rate_key(None))
        self.assertIsNone(rate_key("127.0.0.1"))
        self.assertIsNone(rate_key("::1"))
        self.assertIsNone(rate_key("::ffff:127.0.0.1"))
        self.assertEqual(rate_key("::ffff:192.0.2.1"), "192.0.2.1")
        self.assertEqual(rate_key("192.0.2.1"), "192.0.2.1")
        # One host usually holds a whole /64: rotating inside it changes nothing.
        self.assertEqual(rate_key("2001:db8:1:2::5"), "2001:db8:1:2::/64")
        self.assertEqual(rate_key("2001:db8:1:2:ffff::9"), "2001:db8:1:2::/64")


class CORSTests(SynchronousTestCase):
    def test_preflight_answered_without_credentials(self) -> None:
        bridge = Bridge(self, allowed_origins=("https://app.example.com",))
        status, headers, _ = bridge.request(
            "OPTIONS",
            "/servers/s/mcp",
            None,
            {
                "origin": "https://app.example.com",
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization, content-type, mcp-session-id",
            },
        )
        self.assertEqual(status, 204)
        self.assertEqual(
            headers.getRawHeaders("access-control-allow-origin"), ["https://app.example.com"]
        )
        allowed = headers.getRawHeaders("access-control-allow-headers")[0]
        for name in ("authorization", "content-type", "mcp-session-id", "mcp-protocol-version"):
            self.assertIn(name, allowed)
        self.assertIn("POST", headers.getRawHeaders("access-control-allow-methods")[0])

    def test_session_id_exposed_and_security_headers(self) -> None:
        bridge = Bridge(self, allowed_origins=("https://app.example.com",))
        status, headers, _ = bridge.request(
            "POST",
            "/servers/s/mcp",
            INIT,
            {**JSON, **bearer(TOKENS["alice"]), "origin": "https://app.example.com"},
        )
        self.assertEqual(status, 200)
        self.assertIn("mcp-session-id", headers.getRawHeaders("access-control-expose-headers")[0])
        self.assertEqual(headers.getRawHeaders("x-content-type-options"), ["nosniff"])
        self.assertEqual(headers.getRawHeaders("cache-control"), ["no-store"])
        self.assertIn("default-src 'none'", headers.getRawHeaders("content-security-policy")[0])
        # Plain HTTP: no HSTS.
        self.assertIsNone(headers.getRawHeaders("strict-transport-security"))

    def test_other_origin_refused(self) -> None:
        bridge = Bridge(self, allowed_origins=("https://app.example.com",))
        status, headers, _ = bridge.request(
            "OPTIONS",
            "/servers/s/mcp",
            None,
            {"origin": "https://evil.example.com", "access-control-request-method": "POST"},
        )
        self.assertEqual(status, 403)
        self.assertIsNone(headers.getRawHeaders("access-control-allow-origin"))


class AnonymousTests(SynchronousTestCase):
    def test_without_auth_everything_is_open_on_loopback(self) -> None:
        bridge = Bridge(self)
        config = attrs.evolve(bridge.config, auth=AuthConfig())
        app = BridgeApp(config, bridge.backends, bridge.registry, bridge.reactor)
        client = StubTreq(app.resource())
        d = client.get("http://127.0.0.1/servers")
        client.flush()
        self.assertEqual(self.successResultOf(d).code, 200)


class StreamCapTests(SynchronousTestCase):
    def test_refused_stream_leaves_no_session_behind(self) -> None:
        limits = LimitsConfig(max_streams_per_principal=1)
        bridge = Bridge(self, limits=limits)
        alice = {"accept": "text/event-stream", **bearer(TOKENS["alice"])}
        self.assertEqual(bridge.request("GET", "/servers/s/sse", None, alice)[0], 200)
        status, headers, body = bridge.request("GET", "/servers/s/sse", None, alice)
        self.assertEqual(status, 429)
        self.assertIn("max_streams_per_principal", body["error"]["message"])
        self.assertEqual(len(bridge.registry.sessions), 1)
        # An SSE-only initialize refused for its stream leaves no session either.
        sse_only = {**alice, "content-type": "application/json"}
        status, headers, _ = bridge.request("POST", "/servers/s/mcp", INIT, sse_only)
        self.assertEqual(status, 429)
        self.assertIsNone(headers.getRawHeaders("mcp-session-id"))
        self.assertEqual(len(bridge.registry.sessions), 1)
        scopes = [(e["principal"], e.get("repeated")) for e in bridge.events("rate_limited")]
        self.assertEqual(scopes, [("token:alice", None), ("token:alice", 1)])
        self.assertEqual(
            {e["scope"] for e in bridge.events("rate_limited")}, {"streams-per-principal"}
        )

    def test_session_caps_are_audited(self) -> None:
        """Every cap that refuses a session is written, with its scope."""
        limits = LimitsConfig(max_sessions_per_principal=1)
        bridge = Bridge(self, limits=limits)
        alice = {**JSON, **bearer(TOKENS["alice"])}
        self.assertEqual(bridge.request("POST", "/servers/s/mcp", INIT, alice)[0], 200)
        status, headers, _ = bridge.request("POST", "/servers/s/mcp", INIT, alice)
        self.assertEqual((status, headers.getRawHeaders("retry-after")), (429, ["60"]))
        [refusal] = bridge.events("rate_limited")
        self.assertEqual(
            (refusal["principal"], refusal["server"], refusal["scope"]),
            ("token:alice", "s", "sessions-per-principal"),
        )


class ChildShareTests(SynchronousTestCase):
    def test_one_principal_cannot_take_every_child(self) -> None:
        """With a child per session, alice reaches her share of the children and
        is refused (429, audited) while ops still gets one; ending one of her
        sessions gives her room again. The default share is a quarter: 2 of 8."""
        per_session = {"sharing": "session", "max_children": 8}
        bridge = Bridge(self, server_s=per_session)
        alice = {**JSON, **bearer(TOKENS["alice"])}
        sessions = []
        for _ in range(2):
            status, headers, _ = bridge.request("POST", "/servers/s/mcp", INIT, alice)
            self.assertEqual(status, 200)
            sessions.append(headers.getRawHeaders("mcp-session-id")[0])
        status, headers, body = bridge.request("POST", "/servers/s/mcp", INIT, alice)
        self.assertEqual(status, 429)
        self.assertEqual(headers.getRawHeaders("retry-after"), ["60"])
        self.assertEqual((body["id"], body["error"]["code"]), (1, jsonrpc.SERVER_UNAVAILABLE))
        self.assertIn("max_children_per_principal", body["error"]["message"])
        self.assertIsNone(headers.getRawHeaders("mcp-session-id"))
        ops = {**JSON, **bearer(TOKENS["ops"])}
        self.assertEqual(bridge.request("POST", "/servers/s/mcp", INIT, ops)[0], 200)
        self.assertEqual(len(list(bridge.backends["s"])), 3)
        [refusal] = bridge.events("rate_limited")
        self.assertEqual(
            (refusal["principal"], refusal["server"], refusal["scope"]),
            ("token:alice", "s", "children-per-principal"),
        )
        ended = {**alice, "mcp-session-id": sessions[0], "mcp-protocol-version": "2025-06-18"}
        self.assertEqual(bridge.request("DELETE", "/servers/s/mcp", None, ended)[0], 200)
        self.assertEqual(bridge.request("POST", "/servers/s/mcp", INIT, alice)[0], 200)

    def test_the_default_share_is_a_quarter(self) -> None:
        server = ServerConfig(name="s", command="c", sharing="session", max_children=16)
        self.assertEqual(server.children_per_principal, 4)
        self.assertEqual(attrs.evolve(server, max_children=2).children_per_principal, 1)
        self.assertEqual(
            attrs.evolve(server, max_children_per_principal=16).children_per_principal, 16
        )


INIT_BATCHING = jsonrpc.request(
    1,
    "initialize",
    {"protocolVersion": "2025-03-26", "capabilities": {}, "clientInfo": {"name": "t"}},
)


def tool_calls(first: int, count: int) -> list[jsonrpc.Message]:
    return [
        jsonrpc.request(i, "tools/call", {"name": "echo", "arguments": {"i": i}})
        for i in range(first, first + count)
    ]


def child_of(bridge: Bridge) -> Any:
    """The child of server s (the first spawned)."""
    return bridge.reactor.children[0]


def session_headers(bridge: Bridge, token: str, init: jsonrpc.Message = INIT) -> dict[str, str]:
    """The headers of a new initialized session of this token's principal on server s."""
    headers = {**JSON, **bearer(token)}
    status, response_headers, _ = bridge.request("POST", "/servers/s/mcp", init, headers)
    assert status == 200, status
    [session] = response_headers.getRawHeaders("mcp-session-id")
    headers["mcp-session-id"] = session
    bridge.request(
        "POST", "/servers/s/mcp", jsonrpc.notification("notifications/initialized"), headers
    )
    return headers


class BatchChargeTests(SynchronousTestCase):
    def test_a_batch_costs_a_token_per_message(self) -> None:
        """Each message of a batch is charged; a batch that cannot be paid is
        refused whole (429, Retry-After), and none of it reaches the child."""
        limits = LimitsConfig(per_principal=Bucket(1.0, 10), per_ip=None)
        bridge = Bridge(self, limits=limits)
        alice = session_headers(bridge, TOKENS["alice"], INIT_BATCHING)  # 2 tokens
        status, _, answers = bridge.request("POST", "/servers/s/mcp", tool_calls(2, 5), alice)
        self.assertEqual((status, len(answers)), (200, 5))  # 3 tokens left
        status, headers, body = bridge.request("POST", "/servers/s/mcp", tool_calls(7, 5), alice)
        self.assertEqual(status, 429)
        # The retry pays 5 again, and the bucket holds 2 (this request paid 1).
        self.assertEqual(headers.getRawHeaders("retry-after"), ["3"])
        self.assertEqual(body["error"]["code"], jsonrpc.SERVER_UNAVAILABLE)
        self.assertIn("principal rate limit", body["error"]["message"])
        self.assertEqual(len(child_of(bridge).requests("tools/call")), 5)
        [refusal] = bridge.events("rate_limited")
        self.assertEqual((refusal["principal"], refusal["scope"]), ("token:alice", "principal"))
        # Once the bucket holds enough, the same batch passes.
        bridge.reactor.advance(3.0)
        status, _, answers = bridge.request("POST", "/servers/s/mcp", tool_calls(7, 5), alice)
        self.assertEqual((status, len(answers)), (200, 5))

    def test_server_buckets_are_charged_too(self) -> None:
        bridge = Bridge(
            self,
            server_s={"limits": ServerLimits(total=Bucket(1.0, 8))},
            limits=LimitsConfig(per_principal=None, per_ip=None),
        )
        alice = session_headers(bridge, TOKENS["alice"], INIT_BATCHING)  # 2 tokens
        codes = [
            bridge.request("POST", "/servers/s/mcp", tool_calls(i, 4), alice)[0] for i in (2, 6)
        ]
        self.assertEqual(codes, [200, 429])

    def test_batch_length_is_capped(self) -> None:
        bridge = Bridge(self, limits=LimitsConfig(max_batch=3))
        alice = session_headers(bridge, TOKENS["alice"], INIT_BATCHING)
        status, _, body = bridge.request("POST", "/servers/s/mcp", tool_calls(2, 4), alice)
        self.assertEqual(status, 413)
        self.assertEqual(body["error"]["code"], jsonrpc.INVALID_REQUEST)
        self.assertIn("limits.max_batch (3)", body["error"]["message"])
        self.assertEqual(child_of(bridge).requests("tools/call"), [])
        [refusal] = bridge.events("rate_limited")
        self.assertEqual(refusal["scope"], "batch")
        status, _, answers = bridge.request("POST", "/servers/s/mcp", tool_calls(2, 3), alice)
        self.assertEqual((status, len(answers)), (200, 3))

    def test_a_batch_is_no_longer_than_a_session_may_have_in_flight(self) -> None:
        bridge = Bridge(self, limits=LimitsConfig(max_in_flight_per_session=2))
        alice = session_headers(bridge, TOKENS["alice"], INIT_BATCHING)
        status, _, body = bridge.request("POST", "/servers/s/mcp", tool_calls(2, 3), alice)
        self.assertEqual(status, 413)
        self.assertIn("limits.max_in_flight_per_session (2)", body["error"]["message"])

    def test_by_default_a_batch_holds_64(self) -> None:
        bridge = Bridge(self)
        alice = session_headers(bridge, TOKENS["alice"], INIT_BATCHING)
        status, _, answers = bridge.request("POST", "/servers/s/mcp", tool_calls(1, 64), alice)
        self.assertEqual((status, len(answers)), (200, 64))
        status, _, body = bridge.request("POST", "/servers/s/mcp", tool_calls(101, 65), alice)
        self.assertEqual(status, 413)
        self.assertIn("limits.max_batch (64)", body["error"]["message"])

    def test_a_batch_no_bucket_can_pay_is_too_large(self) -> None:
        """A batch of more messages than a bucket's burst could never pass: 413."""
        limits = LimitsConfig(per_principal=Bucket(1.0, 4), per_ip=None)
        bridge = Bridge(self, limits=limits)
        alice = session_headers(bridge, TOKENS["alice"], INIT_BATCHING)
        bridge.reactor.advance(10)
        status, _, body = bridge.request("POST", "/servers/s/mcp", tool_calls(2, 5), alice)
        self.assertEqual(status, 413)
        self.assertIn("burst is 4", body["error"]["message"])
        self.assertEqual(child_of(bridge).requests("tools/call"), [])


class InFlightTests(SynchronousTestCase):
    def start(self, bridge: Bridge, path: str, body: Any, headers: dict[str, str]) -> Any:
        """Send a request the child will hold; its Deferred fires once answered."""
        d = bridge.client.request(
            "POST", "http://127.0.0.1" + path, data=jsonrpc.dumps(body), headers=headers
        )
        bridge.client.flush()
        self.assertNoResult(d)
        return d

    def test_requests_in_flight_per_session_and_per_principal(self) -> None:
        limits = LimitsConfig(max_in_flight_per_session=2, max_in_flight_per_principal=3)
        bridge = Bridge(self, hold=True, limits=limits)
        one = session_headers(bridge, TOKENS["alice"])
        two = session_headers(bridge, TOKENS["alice"])
        [call] = tool_calls(1, 1)
        waiting = [self.start(bridge, "/servers/s/mcp", m, one) for m in tool_calls(2, 2)]
        status, headers, body = bridge.request("POST", "/servers/s/mcp", tool_calls(4, 1)[0], one)
        self.assertEqual(status, 429)
        self.assertEqual(headers.getRawHeaders("retry-after"), ["1"])
        self.assertEqual(body["id"], 4)
        self.assertIn("limits.max_in_flight_per_session is 2", body["error"]["message"])
        # The principal's third request, on another session, is its last.
        self.start(bridge, "/servers/s/mcp", call, two)
        status, _, body = bridge.request("POST", "/servers/s/mcp", tool_calls(2, 1)[0], two)
        self.assertEqual(status, 429)
        self.assertIn("limits.max_in_flight_per_principal is 3", body["error"]["message"])
        # Nothing refused reached the child; others are not affected.
        self.assertEqual(len(child_of(bridge).requests("tools/call")), 3)
        ops = session_headers(bridge, TOKENS["ops"])
        self.start(bridge, "/servers/s/mcp", call, ops)
        scopes = [e["scope"] for e in bridge.events("rate_limited")]
        self.assertEqual(scopes, ["in-flight-session", "in-flight-principal"])
        # An answer makes room again.
        child = child_of(bridge)
        child.answer(child.held.pop(0))
        bridge.client.flush()
        self.assertEqual(self.successResultOf(waiting[0]).code, 200)
        self.start(bridge, "/servers/s/mcp", tool_calls(5, 1)[0], one)

    def test_by_default_a_session_holds_64(self) -> None:
        bridge = Bridge(self, hold=True)
        alice = session_headers(bridge, TOKENS["alice"])
        for message in tool_calls(1, 64):
            self.start(bridge, "/servers/s/mcp", message, alice)
        status, _, body = bridge.request("POST", "/servers/s/mcp", tool_calls(65, 1)[0], alice)
        self.assertEqual((status, body["id"]), (429, 65))
        self.assertEqual(len(child_of(bridge).requests("tools/call")), 64)

    def test_legacy_sse_posts_are_counted_too(self) -> None:
        limits = LimitsConfig(max_in_flight_per_session=1)
        bridge = Bridge(self, hold=True, limits=limits)
        alice = bearer(TOKENS["alice"])
        d = bridge.client.get(
            "http://127.0.0.1/servers/s/sse", headers={"accept": "text/event-stream", **alice}
        )
        bridge.client.flush()
        self.successResultOf(d)
        [session] = bridge.registry.sessions
        path = f"/servers/s/messages?session_id={session}"
        headers = {"content-type": "application/json", **alice}

        def post(message: jsonrpc.Message) -> tuple[int, bytes]:
            d = bridge.client.post(
                "http://127.0.0.1" + path, jsonrpc.dumps(message), headers=headers
            )
            bridge.client.flush()
            response = self.successResultOf(d)
            content = bridge.client.content(response)
            bridge.client.flush()
            return response.code, self.successResultOf(content)

        self.assertEqual(post(INIT)[0], 202)
        post(jsonrpc.notification("notifications/initialized"))
        [first, second] = tool_calls(2, 2)
        self.assertEqual(post(first)[0], 202)
        status, body = post(second)
        self.assertEqual(status, 429)
        self.assertIn(b"max_in_flight_per_session", body)
        # A reused id is refused without ending the count of the request in flight.
        self.assertEqual(post(first)[0], 429)
        self.assertEqual(len(child_of(bridge).requests("tools/call")), 1)
