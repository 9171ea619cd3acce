"""Bearer tokens and JWTs: who is calling, and what the refusals say."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import io
import json
import os
import subprocess
import sys
import time
import tomllib
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st
from jwt.utils import base64url_encode
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.__main__ import main
from mcptwist.config.keys import digest_text, parse_digest
from mcptwist.config.model import AuthConfig, JWTConfig, TokenConfig
from mcptwist.security import auth
from mcptwist.security.auth import (
    ANONYMOUS,
    Authenticator,
    AuthFailure,
    BearerToken,
    JSONWebToken,
    JWTChecker,
    KeysUnavailable,
    Principal,
    StaticTokenChecker,
    bearer_token,
    generate_token,
    hash_token,
)

from .support.idp import AUD, ISS, JWKS_URL, FakeIdP, claims, jwk, rsa_key, validate_iss_2_10_0

# Keys, made once per run


@functools.cache
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@functools.cache
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


HS_SECRET = b"k7Vq3PzR9xWm2LcT8sNf5HbJ4dYg6AeU1oQiZr0tKvXw"  # 44 bytes


def public_pem(private: Any) -> bytes:
    pem: bytes = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem


def segment(value: dict[str, Any]) -> str:
    return base64url_encode(json.dumps(value).encode()).decode()


def hs256_by_hand(secret: bytes, payload: dict[str, Any], **header: Any) -> str:
    """An HS256 JWT signed with any bytes at all, as an attacker would."""
    signing = f"{segment({'alg': 'HS256', 'typ': 'JWT', **header})}.{segment(payload)}"
    signature = hmac.new(secret, signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{base64url_encode(signature).decode()}"


def unsigned(payload: dict[str, Any]) -> str:
    return f"{segment({'alg': 'none', 'typ': 'JWT'})}.{segment(payload)}."


def assert_secret_kept(test: SynchronousTestCase, failure: Failure, token: str) -> None:
    """Neither the message nor the repr of a refusal contains the token."""
    test.assertNotIn(token, str(failure.value))
    test.assertNotIn(token, repr(failure.value))
    test.assertNotIn(token, failure.getErrorMessage())


class Helpers(SynchronousTestCase):
    def key_file(self, data: bytes) -> str:
        path: str = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        return path

    def jwt_config(self, algorithms: tuple[str, ...] = ("RS256",), **kw: Any) -> JWTConfig:
        kw.setdefault("issuer", ISS)
        return JWTConfig(algorithms=algorithms, audience=(AUD,), **kw)

    def checker_for(self, algorithm: str, key_data: bytes, **kw: Any) -> JWTChecker:
        config = self.jwt_config((algorithm,), key_file=self.key_file(key_data), **kw)
        return JWTChecker(config, Clock())

    def accepted(self, checker: JWTChecker, token: str) -> Principal:
        result: Principal = self.successResultOf(checker.requestAvatarId(JSONWebToken(token)))
        return result

    def refused(self, checker: Any, token: str, kind: type[Exception] = UnauthorizedLogin) -> str:
        """The reason a checker refuses a token, checked to keep the token out."""
        with capturedLogs() as events:
            d = checker.requestAvatarId(JSONWebToken(token))
            failure = self.failureResultOf(d, kind)
        assert_secret_kept(self, failure, token)
        for event in events:
            self.assertNotIn(token, formatEvent(event))
        return str(failure.value)


class PrincipalTests(SynchronousTestCase):
    def test_may_use(self) -> None:
        some = Principal("ci", "token", frozenset({"time", "fs"}), admin=False)
        self.assertTrue(some.may_use("time"))
        self.assertFalse(some.may_use("shell"))
        self.assertTrue(Principal("a", "jwt", frozenset({"*"}), False).may_use("anything"))
        self.assertFalse(Principal("a", "jwt", frozenset(), False).may_use("time"))

    def test_id(self) -> None:
        """The key for sessions and limits: a token and a JWT subject of the
        same name are different clients; it is derived, not given."""
        self.assertEqual(Principal("ci", "token", frozenset(), False).id, "token:ci")
        self.assertEqual(Principal("ci", "jwt", frozenset(), False).id, "jwt:ci")
        self.assertEqual(ANONYMOUS.id, "anonymous")
        self.assertRaises(TypeError, Principal, "ci", "token", frozenset(), False, "x")

    def test_anonymous_may_do_everything(self) -> None:
        self.assertEqual(ANONYMOUS.kind, "anonymous")
        self.assertTrue(ANONYMOUS.admin)
        self.assertTrue(ANONYMOUS.may_use("x"))

    def test_credentials_repr_leaves_the_token_out(self) -> None:
        self.assertNotIn("s3cret-value", repr(BearerToken("s3cret-value")))
        self.assertNotIn("s3cret-value", repr(JSONWebToken("s3cret-value")))


class DigestTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        token = generate_token()
        self.assertTrue(token.startswith("mcpt_"))
        self.assertEqual(len(token), len("mcpt_") + 43)
        self.assertNotEqual(token, generate_token())
        digest = hash_token(token)
        self.assertEqual(digest, hashlib.sha256(token.encode()).digest())
        text = digest_text(digest)
        self.assertEqual(text, "sha256:" + digest.hex())
        self.assertEqual(parse_digest(text), digest)
        self.assertEqual(parse_digest(text.upper().replace("SHA256", "sha256")), digest)

    def test_bad_digests_say_how_to_fix_without_echoing(self) -> None:
        token = generate_token()
        for text in (token, "sha256:abc", "md5:" + "0" * 64, "sha256:" + "g" * 64, ""):
            with self.assertRaises(ValueError) as caught:
                parse_digest(text)
            message = str(caught.exception)
            self.assertIn("python -m mcptwist token", message)
            if text:
                self.assertNotIn(text, message)


class StaticTokenTests(Helpers):
    def setUp(self) -> None:
        self.tokens = [generate_token() for _ in range(10)]
        self.configs = tuple(
            TokenConfig(
                name=f"user{i}",
                digest=hash_token(t),
                servers=frozenset({f"s{i}"}),
                admin=i == 0,
            )
            for i, t in enumerate(self.tokens)
        )
        self.checker = StaticTokenChecker(self.configs)

    def test_each_of_ten_tokens_is_its_own_principal(self) -> None:
        for i, token in enumerate(self.tokens):
            who = self.successResultOf(self.checker.requestAvatarId(BearerToken(token)))
            self.assertEqual(who, Principal(f"user{i}", "token", frozenset({f"s{i}"}), i == 0))
            self.assertEqual(who.id, f"token:user{i}")

    def test_wrong_off_by_one_and_empty_are_refused(self) -> None:
        last = self.tokens[3][-1]
        off_by_one = self.tokens[3][:-1] + ("b" if last == "a" else "a")
        for token in (generate_token(), off_by_one, "", self.tokens[3] + " "):
            with capturedLogs() as events:
                failure = self.failureResultOf(
                    self.checker.requestAvatarId(BearerToken(token)), UnauthorizedLogin
                )
            self.assertEqual(str(failure.value), "unknown token")
            if token:
                assert_secret_kept(self, failure, token)
            self.assertEqual(events, [])

    def test_every_digest_is_compared(self) -> None:
        compared: list[bytes] = []
        real = hmac.compare_digest

        def spy(a: Any, b: Any) -> bool:
            compared.append(b)
            return real(a, b)

        self.patch(hmac, "compare_digest", spy)
        self.successResultOf(self.checker.requestAvatarId(BearerToken(self.tokens[0])))
        self.assertEqual(compared, [c.digest for c in self.configs])
        compared.clear()
        self.failureResultOf(self.checker.requestAvatarId(BearerToken("nope")), UnauthorizedLogin)
        self.assertEqual(len(compared), 10)


class HeaderTests(Helpers):
    def setUp(self) -> None:
        self.token = generate_token()
        self.jwt_key = self.key_file(HS_SECRET)
        config = AuthConfig(
            tokens=(TokenConfig(name="ci", digest=hash_token(self.token)),),
            jwt=self.jwt_config(("HS256",), key_file=self.jwt_key),
        )
        self.auth = Authenticator(config, Clock())

    def failure(self, header: bytes | None, query: bool = False) -> AuthFailure:
        f = self.failureResultOf(self.auth.authenticate(header, query), AuthFailure)
        assert isinstance(f.value, AuthFailure)
        return f.value

    def test_bearer_scheme_is_case_insensitive(self) -> None:
        for scheme in (b"Bearer", b"bearer", b"BEARER"):
            who = self.successResultOf(
                self.auth.authenticate(scheme + b" " + self.token.encode(), False)
            )
            self.assertEqual(who.name, "ci")
        self.assertEqual(bearer_token(b"  Bearer   abc==  "), "abc==")

    def test_missing_credentials_have_no_error_code(self) -> None:
        for header in (None, b"", b"   "):
            failure = self.failure(header)
            self.assertEqual((failure.status, failure.error), (401, None))

    def test_malformed_headers(self) -> None:
        for header in (
            b"Bearer",
            b"Bearer ",
            b"Bearer a b",
            b"Basic dXNlcjpwYXNz",
            b"Bearer t\xc3\xa9st",
            b"Bearer a,b",
            b"Bearer\tabc",
            b"Bearer " + b"a" * 20000,
        ):
            failure = self.failure(header)
            self.assertEqual((failure.status, failure.error), (401, "invalid_request"), header[:20])

    def test_token_in_query_string_is_refused(self) -> None:
        failure = self.failure(b"Bearer " + self.token.encode(), query=True)
        self.assertEqual((failure.status, failure.error), (401, "invalid_request"))
        self.assertEqual(failure.reason, "token in query string")

    def test_bad_token(self) -> None:
        failure = self.failure(b"Bearer " + generate_token().encode())
        self.assertEqual(
            (failure.status, failure.reason, failure.error), (401, "unknown token", "invalid_token")
        )

    def test_disabled_auth_is_anonymous(self) -> None:
        open_bridge = Authenticator(AuthConfig(), Clock())
        self.assertIs(self.successResultOf(open_bridge.authenticate(None, False)), ANONYMOUS)
        self.assertIs(self.successResultOf(open_bridge.authenticate(b"junk", True)), ANONYMOUS)

    @given(st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(b"Bearer ".__add__)))
    def test_any_header_is_a_principal_or_an_auth_failure(self, header: bytes) -> None:
        outcome: list[Any] = []
        self.auth.authenticate(header, False).addBoth(outcome.append)
        [result] = outcome
        if isinstance(result, Failure):
            self.assertIsInstance(result.value, AuthFailure)
            self.assertEqual(getattr(result.value, "status", None), 401)
        else:
            self.assertIsInstance(result, Principal)

    @given(
        st.one_of(
            st.from_regex(r"\A[A-Za-z0-9\-._~+/]{1,200}=*\Z"),
            st.from_regex(r"\A[A-Za-z0-9_-]{1,60}\.[A-Za-z0-9_-]{1,60}\.[A-Za-z0-9_-]{0,60}\Z"),
        )
    )
    def test_a_refused_token_never_appears_in_the_refusal(self, token: str) -> None:
        d = self.auth.authenticate(b"Bearer " + token.encode(), False)
        failure = self.failureResultOf(d, AuthFailure)
        self.assertEqual(failure.value.error, "invalid_token")
        if len(token) > 3:
            assert_secret_kept(self, failure, token)


class RoutingTests(Helpers):
    def test_jwt_shaped_tokens_go_to_the_jwt_checker(self) -> None:
        static = generate_token()
        config = AuthConfig(
            tokens=(TokenConfig(name="ci", digest=hash_token(static)),),
            jwt=self.jwt_config(("HS256",), key_file=self.key_file(HS_SECRET)),
        )
        authenticator = Authenticator(config, Clock())
        token = jwt.encode(claims(sub="bob"), HS_SECRET, algorithm="HS256")
        who = self.successResultOf(authenticator.authenticate(b"Bearer " + token.encode(), False))
        self.assertEqual((who.name, who.kind), ("bob", "jwt"))
        who = self.successResultOf(authenticator.authenticate(b"Bearer " + static.encode(), False))
        self.assertEqual((who.name, who.kind), ("ci", "token"))
        failure = self.failureResultOf(
            authenticator.authenticate(b"Bearer " + unsigned(claims()).encode(), False), AuthFailure
        )
        self.assertEqual(failure.value.reason, "algorithm not allowed")

    def test_static_only_takes_jwt_shaped_tokens_too(self) -> None:
        config = AuthConfig(tokens=(TokenConfig(name="ci", digest=hash_token("a.b.c")),))
        who = self.successResultOf(
            Authenticator(config, Clock()).authenticate(b"Bearer a.b.c", False)
        )
        self.assertEqual(who.name, "ci")

    def test_jwt_only_refuses_other_tokens_as_malformed(self) -> None:
        config = AuthConfig(jwt=self.jwt_config(("HS256",), key_file=self.key_file(HS_SECRET)))
        d = Authenticator(config, Clock()).authenticate(b"Bearer mcpt_abc", False)
        self.assertEqual(self.failureResultOf(d, AuthFailure).value.reason, "malformed")


class JWTKeyFileTests(Helpers):
    def test_valid_tokens_of_each_algorithm(self) -> None:
        cases: list[tuple[str, bytes, Any]] = [
            ("HS256", HS_SECRET + b"\n", HS_SECRET),
            ("RS256", public_pem(rsa_key()), rsa_key()),
            ("ES256", public_pem(ec_key()), ec_key()),
            ("EdDSA", public_pem(ed_key()), ed_key()),
        ]
        for algorithm, key_data, signing_key in cases:
            checker = self.checker_for(algorithm, key_data)
            token = jwt.encode(claims(), signing_key, algorithm=algorithm)
            who = self.accepted(checker, token)
            self.assertEqual(who, Principal("alice", "jwt", frozenset(), admin=False), algorithm)

    def test_time_and_audience_and_issuer(self) -> None:
        checker = self.checker_for("RS256", public_pem(rsa_key()))
        now = int(time.time())
        cases = [
            (claims(exp=now - 120), "expired"),
            (claims(nbf=now + 600), "not yet valid"),
            (claims(iat=now + 600), "not yet valid"),
            (claims(aud="https://other.example.com"), "wrong audience"),
            (claims(aud=["https://a.example", "https://b.example"]), "wrong audience"),
            (claims(aud=None), "missing claim aud"),
            (claims(iss="https://evil.example.com"), "wrong issuer"),
            (claims(iss=None), "missing claim iss"),
            (claims(exp=None), "missing claim exp"),
            (claims(sub=None), "missing claim sub"),
            (claims(sub=""), "missing claim sub"),
            (claims(exp="soon"), "malformed"),
        ]
        for payload, reason in cases:
            token = jwt.encode(payload, rsa_key(), algorithm="RS256")
            self.assertEqual(self.refused(checker, token), reason, payload)
        # Within the leeway, and with one of several audiences.
        token = jwt.encode(claims(exp=now - 5, aud=["x", AUD]), rsa_key(), algorithm="RS256")
        self.assertEqual(self.accepted(checker, token).name, "alice")

    def test_issuer_matched_exactly(self) -> None:
        """Only the configured iss passes: not a part of it (PyJWT 2.10.0 took
        any substring, CVE-2024-53861), nor more, nor another case; also
        under a PyJWT that matches loosely."""
        checker = self.checker_for("RS256", public_pem(rsa_key()))
        near = [
            ISS[:-1],
            ISS[len("https://") :],
            "idp",
            "",
            ISS + "/",
            "_" + ISS + "_",
            ISS.upper(),
        ]
        for loose in (False, True):
            if loose:
                self.patch(jwt.api_jwt.PyJWT, "_validate_iss", validate_iss_2_10_0)
            for iss in near:
                token = jwt.encode(claims(iss=iss), rsa_key(), algorithm="RS256")
                self.assertEqual(self.refused(checker, token), "wrong issuer", (loose, iss))
            token = jwt.encode(claims(), rsa_key(), algorithm="RS256")
            self.assertEqual(self.accepted(checker, token).name, "alice")

    def test_signatures(self) -> None:
        checker = self.checker_for("RS256", public_pem(rsa_key()))
        forged = jwt.encode(claims(), other_rsa_key(), algorithm="RS256")
        self.assertEqual(self.refused(checker, forged), "bad signature")
        header, payload, signature = jwt.encode(claims(), rsa_key(), algorithm="RS256").split(".")
        altered = segment(claims(sub="mallory"))
        self.assertEqual(self.refused(checker, f"{header}.{altered}.{signature}"), "bad signature")
        self.assertEqual(self.refused(checker, f"{header}.{payload}."), "bad signature")
        self.assertEqual(self.refused(checker, "e30.e30."), "algorithm not allowed")  # no alg
        for junk in ("a.b.c", "x", f"{header}.{payload}", f"{header}.!.{signature}"):
            self.assertEqual(self.refused(checker, junk), "malformed", junk)

    def test_bad_header_of_a_signed_token_is_malformed(self) -> None:
        """The header is judged as strictly with a key file (no kid needed)."""
        checker = self.checker_for("HS256", HS_SECRET)
        for header in ({"kid": 5}, {"kid": ["a"]}, {"crit": "exp"}, {"crit": ["exp"]}):
            token = hs256_by_hand(HS_SECRET, claims(), **header)
            self.assertEqual(self.refused(checker, token), "malformed", header)
        self.assertEqual(self.accepted(checker, hs256_by_hand(HS_SECRET, claims())).name, "alice")

    def test_alg_none_is_refused(self) -> None:
        for algorithm, key_data in (("HS256", HS_SECRET), ("RS256", public_pem(rsa_key()))):
            checker = self.checker_for(algorithm, key_data)
            self.assertEqual(self.refused(checker, unsigned(claims())), "algorithm not allowed")

    def test_unconfigured_algorithm_is_refused(self) -> None:
        checker = self.checker_for("RS256", public_pem(rsa_key()))
        token = jwt.encode(claims(), rsa_key(), algorithm="RS512")
        self.assertEqual(self.refused(checker, token), "algorithm not allowed")
        token = jwt.encode(claims(), rsa_key(), algorithm="PS256")
        self.assertEqual(self.refused(checker, token), "algorithm not allowed")

    def test_hs256_signed_with_the_public_key_is_refused(self) -> None:
        # Algorithm confusion: the public key, which anyone has, as an HMAC secret.
        pem = public_pem(rsa_key())
        checker = self.checker_for("RS256", pem)
        for secret in (pem, pem.strip()):
            forged = hs256_by_hand(secret, claims(sub="mallory"))
            self.assertEqual(self.refused(checker, forged), "algorithm not allowed")

    def test_confusable_configurations_are_refused_at_start(self) -> None:
        pem = public_pem(rsa_key())
        for algorithms, data in (
            (("RS256", "HS256"), pem),
            (("HS256",), pem),
            (("HS256", "ES256"), HS_SECRET),
            (("ES256",), pem),
            (("RS256",), b"not a key at all"),
            (("none",), HS_SECRET),
            (("HS256",), b"x" * 31),
            (("HS512",), b"x" * 48),
            (
                ("RS256",),
                rsa_key().private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
            ),
        ):
            config = self.jwt_config(algorithms, key_file=self.key_file(data))
            self.assertRaises(ValueError, JWTChecker, config, Clock())

    def test_incomplete_configurations_are_refused(self) -> None:
        pem = self.key_file(public_pem(rsa_key()))
        for config in (
            JWTConfig(algorithms=("RS256",), audience=(), issuer=ISS, key_file=pem),
            JWTConfig(algorithms=("RS256",), audience=(AUD,), issuer="", key_file=pem),
            JWTConfig(algorithms=("RS256",), audience=(AUD,), issuer=ISS),
            JWTConfig(
                algorithms=("RS256",),
                audience=(AUD,),
                issuer=ISS,
                key_file=pem,
                jwks_url=JWKS_URL,
            ),
        ):
            self.assertRaises(ValueError, JWTChecker, config, Clock())

    def test_short_hs_secret(self) -> None:
        self.assertRaises(ValueError, self.checker_for, "HS256", b"  " + b"x" * 31 + b"\n")
        self.checker_for("HS256", b"x" * 32)


class ClaimsTests(Helpers):
    def checker(self, **kw: Any) -> JWTChecker:
        return self.checker_for("HS256", HS_SECRET, **kw)

    def test_servers_claim_scopes_and_defaults(self) -> None:
        checker = self.checker(default_servers=frozenset({"time"}))
        p = checker.principal
        self.assertEqual(p({"sub": "a"}).servers, {"time"})
        self.assertEqual(
            p({"sub": "a", "mcp_servers": ["fs", "git"]}).servers, {"time", "fs", "git"}
        )
        self.assertEqual(p({"sub": "a", "mcp_servers": "*"}).servers, {"time", "*"})
        self.assertEqual(
            p({"sub": "a", "scope": "openid mcp:server:fs mcp:server: other:server:x"}).servers,
            {"time", "fs"},
        )
        self.assertEqual(p({"sub": "a", "scope": ["mcp:server:*"]}).servers, {"time", "*"})
        self.assertTrue(p({"sub": "a", "scope": "mcp:admin"}).admin)
        self.assertFalse(p({"sub": "a", "scope": "mcp:administrator"}).admin)
        self.assertFalse(p({"sub": "a", "mcp_servers": ["mcp:admin"]}).admin)

    def test_custom_claim_names(self) -> None:
        checker = self.checker(
            name_claim="email",
            servers_claim="tools",
            scope_claim="scp",
            server_scope_prefix="srv/",
            admin_scope="root",
        )
        who = checker.principal({"email": "e@x", "tools": ["a"], "scp": ["srv/b", "root"]})
        self.assertEqual(who, Principal("e@x", "jwt", frozenset({"a", "b"}), admin=True))
        with self.assertRaises(UnauthorizedLogin) as caught:
            checker.principal({"sub": "a"})
        self.assertEqual(str(caught.exception), "missing claim email")

    def test_badly_typed_claims_are_refused(self) -> None:
        checker = self.checker()
        for payload, reason in (
            ({"sub": "a", "mcp_servers": "fs"}, "bad claim mcp_servers"),
            ({"sub": "a", "mcp_servers": [1]}, "bad claim mcp_servers"),
            ({"sub": "a", "mcp_servers": {"fs": True}}, "bad claim mcp_servers"),
            ({"sub": "a", "scope": 7}, "bad claim scope"),
            ({"sub": "a", "scope": ["x", None]}, "bad claim scope"),
        ):
            with self.assertRaises(UnauthorizedLogin) as caught:
                checker.principal(payload)
            self.assertEqual(str(caught.exception), reason)

    def test_end_to_end(self) -> None:
        checker = self.checker()
        token = jwt.encode(
            claims(mcp_servers=["fs"], scope="mcp:server:time mcp:admin"), HS_SECRET, "HS256"
        )
        self.assertEqual(
            self.accepted(checker, token),
            Principal("alice", "jwt", frozenset({"fs", "time"}), True),
        )
        token = jwt.encode(claims(sub=42), HS_SECRET, "HS256")
        self.assertEqual(self.refused(checker, token), "malformed")


class JWKSTests(Helpers):
    def setUp(self) -> None:
        self.clock = Clock()
        self.idp = FakeIdP(jwk(rsa_key(), "a", "RS256"), jwk(ec_key(), "e", "ES256"))
        config = self.jwt_config(("RS256", "ES256"), jwks_url=JWKS_URL, jwks_refresh=300.0)
        self.checker = JWTChecker(config, self.clock, self.idp.fetch)
        self.addCleanup(self.checker.stop)

    def token(
        self, key: Any = None, kid: str | None = "a", alg: str = "RS256", **changes: Any
    ) -> str:
        headers = {"kid": kid} if kid is not None else None
        return jwt.encode(claims(**changes), key or rsa_key(), algorithm=alg, headers=headers)

    def test_keys_by_kid(self) -> None:
        self.checker.start()
        self.assertEqual(self.idp.calls, [JWKS_URL])
        self.assertEqual(self.accepted(self.checker, self.token()).name, "alice")
        self.assertEqual(
            self.accepted(self.checker, self.token(ec_key(), "e", "ES256")).name, "alice"
        )
        self.assertEqual(
            self.refused(self.checker, self.token(other_rsa_key(), "a")), "bad signature"
        )
        # The kid names an RSA key: an ES256 token for it is refused.
        self.assertEqual(
            self.refused(self.checker, self.token(ec_key(), "a", "ES256")), "algorithm not allowed"
        )
        self.assertEqual(len(self.idp.calls), 1)

    def test_hs256_with_a_published_key_as_secret_is_refused(self) -> None:
        self.checker.start()
        pem = public_pem(rsa_key())
        forged = hs256_by_hand(pem, claims(sub="mallory"), kid="a")
        self.assertEqual(self.refused(self.checker, forged), "algorithm not allowed")

    def test_without_kid_only_an_unambiguous_key(self) -> None:
        self.checker.start()
        self.assertEqual(self.refused(self.checker, self.token(kid=None)), "unknown key")
        self.idp.keys = [jwk(rsa_key(), "a", "RS256")]
        self.clock.advance(300)
        self.assertEqual(self.accepted(self.checker, self.token(kid=None)).name, "alice")

    def test_checks_wait_for_the_first_fetch(self) -> None:
        self.idp.hold = True
        self.checker.start()
        first = self.checker.requestAvatarId(JSONWebToken(self.token()))
        second = self.checker.requestAvatarId(JSONWebToken(self.token(other_rsa_key())))
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.assertEqual(len(self.idp.calls), 1)
        self.idp.release()
        self.assertEqual(self.successResultOf(first).name, "alice")
        self.assertEqual(
            str(self.failureResultOf(second, UnauthorizedLogin).value), "bad signature"
        )

    def test_a_check_before_start_fetches(self) -> None:
        self.assertEqual(self.accepted(self.checker, self.token()).name, "alice")
        self.assertEqual(len(self.idp.calls), 1)

    def test_unknown_kid_refetches_at_most_every_30_seconds(self) -> None:
        self.checker.start()
        self.assertEqual(len(self.idp.calls), 1)
        # The IdP rotates in a new key: the first token using it refetches.
        new = other_rsa_key()
        self.idp.keys.append(jwk(new, "b", "RS256"))
        self.assertEqual(self.accepted(self.checker, self.token(new, "b")).name, "alice")
        self.assertEqual(len(self.idp.calls), 2)
        # A made-up kid soon after does not.
        self.clock.advance(29)
        for kid in ("bogus1", "bogus2", "bogus3"):
            self.assertEqual(self.refused(self.checker, self.token(kid=kid)), "unknown key")
        self.assertEqual(len(self.idp.calls), 2)
        self.clock.advance(1)
        self.assertEqual(self.refused(self.checker, self.token(kid="bogus4")), "unknown key")
        self.assertEqual(len(self.idp.calls), 3)
        self.assertEqual(self.refused(self.checker, self.token(kid="bogus5")), "unknown key")
        self.assertEqual(len(self.idp.calls), 3)

    def test_refresh_loop(self) -> None:
        self.checker.start()
        self.checker.start()
        self.assertEqual(len(self.idp.calls), 1)
        self.clock.advance(299)
        self.assertEqual(len(self.idp.calls), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.idp.calls), 2)
        self.clock.advance(300)
        self.assertEqual(len(self.idp.calls), 3)
        self.checker.stop()
        self.clock.advance(3000)
        self.assertEqual(len(self.idp.calls), 3)

    def test_refresh_drops_removed_keys(self) -> None:
        self.checker.start()
        self.idp.keys = [jwk(ec_key(), "e", "ES256")]
        self.clock.advance(300)
        self.assertEqual(self.refused(self.checker, self.token()), "unknown key")

    def test_failed_fetch_keeps_the_old_keys_and_logs(self) -> None:
        self.checker.start()
        for error in (ConnectionRefusedError("refused"), None):
            self.idp.error = error
            with capturedLogs() as events:
                self.clock.advance(300)
            warnings = [e for e in events if e["log_level"] == LogLevel.warn]
            self.assertEqual(len(warnings), 1)
            text = formatEvent(warnings[0])
            self.assertIn(JWKS_URL, text)
            self.assertIn("keeping the keys already known", text)
            self.assertEqual(self.accepted(self.checker, self.token()).name, "alice")
            self.idp.error = None
            self.idp.keys = [{"kty": "nonsense"}]
        # The loop went on after each failure.
        self.assertEqual(len(self.idp.calls), 3)

    def test_never_fetched_is_503(self) -> None:
        self.idp.error = ConnectionRefusedError()
        config = AuthConfig(jwt=self.checker.config)
        authenticator = Authenticator(config, self.clock, self.idp.fetch)
        with capturedLogs():
            authenticator.start()
        self.addCleanup(authenticator.stop)
        token = self.token()
        d = authenticator.authenticate(b"Bearer " + token.encode(), False)
        failure = self.failureResultOf(d, AuthFailure)
        self.assertEqual((failure.value.status, failure.value.reason), (503, "keys unavailable"))
        # A refetch, once the 30 seconds have passed, lets it in; before then
        # the keys are still missing, and nothing is fetched.
        self.idp.error = None
        fetched = len(self.idp.calls)
        d = authenticator.authenticate(b"Bearer " + token.encode(), False)
        failure = self.failureResultOf(d, AuthFailure)
        self.assertEqual((failure.value.status, failure.value.reason), (503, "keys unavailable"))
        self.assertEqual(len(self.idp.calls), fetched)
        self.clock.advance(30)
        who = self.successResultOf(authenticator.authenticate(b"Bearer " + token.encode(), False))
        self.assertEqual(who.kind, "jwt")

    def test_stop_abandons_a_fetch_quietly(self) -> None:
        self.idp.hold = True
        self.checker.start()
        d = self.checker.requestAvatarId(JSONWebToken(self.token()))
        [held] = self.idp.held
        with capturedLogs() as events:
            self.checker.stop()
        self.assertEqual(events, [])
        self.failureResultOf(d, KeysUnavailable)
        self.assertTrue(held.called)


class ChallengeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.auth = Authenticator(AuthConfig(), Clock())

    def test_challenges(self) -> None:
        url = "https://mcp.example.com/.well-known/oauth-protected-resource"
        self.assertEqual(
            self.auth.www_authenticate(url, None), b'Bearer resource_metadata="%s"' % url.encode()
        )
        self.assertEqual(
            self.auth.www_authenticate(
                url, AuthFailure(401, "no credentials", None), scope="mcp:server:time"
            ),
            b'Bearer resource_metadata="%s", scope="mcp:server:time"' % url.encode(),
        )
        self.assertEqual(
            self.auth.www_authenticate(url, AuthFailure(401, "expired", "invalid_token")),
            b'Bearer resource_metadata="%s", error="invalid_token", error_description="expired"'
            % url.encode(),
        )
        self.assertEqual(self.auth.www_authenticate(None, None), b"Bearer")

    def test_quoting(self) -> None:
        failure = AuthFailure(401, 'say "hi" \\ now\r\nSet-Cookie: x=1 \u00e9', "invalid_token")
        header = self.auth.www_authenticate('https://h/p"q\\r', failure)
        self.assertEqual(
            header,
            b'Bearer resource_metadata="https://h/p\\"q\\\\r", error="invalid_token", '
            b'error_description="say \\"hi\\" \\\\ now??Set-Cookie: x=1 ?"',
        )
        self.assertNotIn(b"\r", header)
        self.assertNotIn(b"\n", header)

    def test_failure_repr(self) -> None:
        failure = AuthFailure(401, "expired", "invalid_token")
        self.assertEqual(str(failure), "expired")
        self.assertEqual(repr(failure), "AuthFailure(401, 'expired', 'invalid_token')")


class TokenCommandTests(SynchronousTestCase):
    def run_main(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(list(argv))
        return status, out.getvalue(), err.getvalue()

    def printed(self, stdout: str) -> tuple[str, dict[str, Any]]:
        token, blank, *rest = stdout.splitlines()
        self.assertEqual(blank, "")
        return token, tomllib.loads("\n".join(rest))

    def test_token_defaults(self) -> None:
        status, stdout, stderr = self.run_main("token", "--name", "ci")
        self.assertEqual(status, 0)
        token, document = self.printed(stdout)
        [entry] = document["auth"]["tokens"]
        self.assertEqual(entry["name"], "ci")
        self.assertEqual(entry["servers"], ["*"])
        self.assertIs(entry["admin"], False)
        self.assertEqual(parse_digest(entry["hash"]), hash_token(token))
        self.assertEqual(stdout.count(token), 1)
        self.assertIn("only once", stderr)
        self.assertNotIn(token, stderr)

    def test_token_servers_admin_and_quoting(self) -> None:
        status, stdout, _ = self.run_main(
            "token", "--name", 'ops "night" \\ é', "--servers", "time, fs,,", "--admin"
        )
        self.assertEqual(status, 0)
        token, document = self.printed(stdout)
        [entry] = document["auth"]["tokens"]
        self.assertEqual(entry["name"], 'ops "night" \\ é')
        self.assertEqual(entry["servers"], ["fs", "time"])
        self.assertIs(entry["admin"], True)
        self.assertEqual(entry["hash"], digest_text(hash_token(token)))

    def test_usage_errors(self) -> None:
        self.assertEqual(self.run_main("token", "--name", " ")[0], 2)
        self.assertEqual(self.run_main("token", "--name", "x", "--servers", ",")[0], 2)
        status, _, stderr = self.run_main()
        self.assertEqual(status, 2)
        self.assertIn("token", stderr)
        with self.assertRaises(SystemExit) as caught:
            self.run_main("--help")
        self.assertEqual(caught.exception.code, 0)
        with self.assertRaises(SystemExit) as caught:
            self.run_main("token")
        self.assertEqual(caught.exception.code, 2)

    def test_cli_does_not_load_the_reactor(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        code = (
            "import sys, io\n"
            "from mcptwist.__main__ import main\n"
            "assert main(['token', '--name', 'x'], io.StringIO(), io.StringIO()) == 0\n"
            "assert 'twisted.internet.reactor' not in sys.modules\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, timeout=60, check=False
        )
        self.assertEqual(result.returncode, 0, result.stderr)


class DefaultFetchTests(SynchronousTestCase):
    """The treq GET used when no fetch is injected (treq itself stubbed)."""

    def setUp(self) -> None:
        import treq

        self.clock = Clock()
        self.pending: list[Deferred[Any]] = []
        self.urls: list[str] = []

        def get(url: str, **kw: Any) -> Deferred[Any]:
            self.urls.append(url)
            d: Deferred[Any] = Deferred()
            self.pending.append(d)
            return d

        self.patch(treq, "get", get)
        self.patch(treq, "content", lambda response: succeed(response.body))
        self.fetch = auth._treq_fetch(self.clock)

    def answer(self, code: int, body: bytes) -> None:
        self.pending.pop().callback(type("Response", (), {"code": code, "body": body})())

    def test_200_body(self) -> None:
        d = self.fetch(JWKS_URL)
        self.answer(200, b'{"keys": []}')
        self.assertEqual(self.successResultOf(d), b'{"keys": []}')
        self.assertEqual(self.urls, [JWKS_URL])

    def test_other_status_fails(self) -> None:
        d = self.fetch(JWKS_URL)
        self.answer(404, b"gone")
        self.assertEqual(str(self.failureResultOf(d, ValueError).value), "HTTP status 404")

    def test_ten_second_timeout(self) -> None:
        d = self.fetch(JWKS_URL)
        self.clock.advance(9.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        failure = self.failureResultOf(d, defer.TimeoutError)
        self.assertIn("10 seconds", str(failure.value))
