"""An identity provider for JWT tests: its issuer, audience and RSA key, the
claims it signs, and its JWKS served to a checker's fetch."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from twisted.internet.defer import Deferred, fail, succeed

AUD = "https://mcp.example.com"
ISS = "https://idp.example.com"
JWKS_URL = "https://idp.example.com/jwks.json"
# An issuer that signs with a secret it shares with the bridge (HS256).
SECRET = b"a shared secret of at least thirty-two bytes"
SECRET_ISSUER = "https://auth.example.com"


@functools.cache
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def claims(**changes: Any) -> dict[str, Any]:
    """Valid claims for AUD from ISS, with some changed (None: left out)."""
    now = int(time.time())
    base: dict[str, Any] = {"sub": "alice", "aud": AUD, "iss": ISS, "iat": now, "exp": now + 300}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def validate_iss_2_10_0(self: Any, payload: dict[str, Any], issuer: Any) -> None:
    """PyJWT 2.10.0's issuer check (CVE-2024-53861): a str issuer is a
    Sequence, so C{in} took any part of it."""
    if issuer is None:
        return
    if "iss" not in payload:
        raise jwt.MissingRequiredClaimError("iss")
    if isinstance(issuer, Sequence):
        if payload["iss"] not in issuer:
            raise jwt.InvalidIssuerError("Invalid issuer")
    elif payload["iss"] != issuer:
        raise jwt.InvalidIssuerError("Invalid issuer")


def jwk(private: Any, kid: str, alg: str) -> dict[str, Any]:
    public = private.public_key()
    kinds: dict[str, Any] = {"RS256": RSAAlgorithm, "ES256": ECAlgorithm, "EdDSA": OKPAlgorithm}
    kind = kinds[alg]
    data: dict[str, Any] = kind.to_jwk(public, as_dict=True)
    return {**data, "kid": kid, "alg": alg, "use": "sig"}


class FakeIdP:
    """Serves a JWKS to the checker's fetch; counts, holds or fails fetches."""

    def __init__(self, *keys: dict[str, Any]) -> None:
        self.keys = list(keys)
        self.calls: list[str] = []
        self.error: Exception | None = None
        self.hold = False
        self.held: list[Deferred[bytes]] = []

    def fetch(self, url: str) -> Deferred[bytes]:
        self.calls.append(url)
        if self.hold:
            d: Deferred[bytes] = Deferred()
            self.held.append(d)
            return d
        if self.error is not None:
            return fail(self.error)
        return succeed(json.dumps({"keys": self.keys}).encode())

    def release(self) -> None:
        held, self.held = self.held, []
        for d in held:
            d.callback(json.dumps({"keys": self.keys}).encode())
