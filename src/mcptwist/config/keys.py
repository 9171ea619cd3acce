# -*- test-case-name: tests.test_auth -*-
"""What the configuration's secrets look like: token digests and JWT key files.

Read when the configuration is loaded, so that a wrong key fails at start or
reload with the file's name, and again by the JWT checker that uses the key.
cryptography is imported by the first key file read, not by token digests.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
    from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

    PublicKey = RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey | Ed448PublicKey

DIGEST_PREFIX: Final = "sha256:"


_DIGEST_RE: Final = re.compile(r"\Asha256:([0-9A-Fa-f]{64})\Z")


_HMAC_MINIMUM: Final = {"HS256": 32, "HS384": 48, "HS512": 64}


def _asymmetric() -> tuple[tuple[Any, tuple[str, ...]], ...]:
    """Each public key type, and the algorithms it verifies."""
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
    from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

    return (
        (RSAPublicKey, ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")),
        (EllipticCurvePublicKey, ("ES256", "ES384", "ES512")),
        (Ed25519PublicKey, ("EdDSA",)),
        (Ed448PublicKey, ("EdDSA",)),
    )


def digest_text(digest: bytes) -> str:
    """A digest as written in the configuration: C{sha256:<hex>}."""
    return DIGEST_PREFIX + digest.hex()


def parse_digest(text: str) -> bytes:
    """Read a C{sha256:<64 hex>} digest from the configuration.

    The text is left out of the error: it might be a token pasted by mistake.
    """
    match = _DIGEST_RE.match(text.strip())
    if match is None:
        raise ValueError(
            'is not a token hash ("sha256:" and 64 hex digits); '
            "generate one with python -m mcptwist token"
        )
    return bytes.fromhex(match.group(1))


def _pem_public_key(data: bytes) -> Any | None:
    """The public key of a PEM public key, else of a PEM certificate; None for neither."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_public_key(data)
    except ValueError:
        pass
    try:
        return x509.load_pem_x509_certificate(data).public_key()
    except ValueError:
        return None


def load_key_file(path: str, algorithms: tuple[str, ...]) -> bytes | PublicKey:
    """The verification key in C{path}: an HS* secret, or a PEM public key.

    Refuses a configuration that mixes HS* with asymmetric algorithms: with
    one key for both, a public key could be used as an HMAC secret by anyone
    (algorithm confusion).
    """
    with open(path, "rb") as f:
        data = f.read()
    hmac_algorithms = [a for a in algorithms if a in _HMAC_MINIMUM]
    if hmac_algorithms and len(hmac_algorithms) != len(algorithms):
        raise ValueError(
            f"{path}: HS* algorithms cannot share a key with RS*, PS*, ES* or EdDSA "
            "(a public key would become an HMAC secret); configure one kind only"
        )
    if hmac_algorithms:
        secret = data.strip()
        if b"-----BEGIN" in secret:
            raise ValueError(
                f"{path}: is a PEM file, but HS* algorithms need a shared secret; "
                "use RS256, ES256 or EdDSA with a public key, or a random secret file"
            )
        minimum = max(_HMAC_MINIMUM[a] for a in hmac_algorithms)
        if len(secret) < minimum:
            raise ValueError(
                f"{path}: the HS* secret is {len(secret)} bytes; use at least {minimum} "
                f"(e.g. openssl rand -base64 {minimum} > {path})"
            )
        return secret
    if b"PRIVATE KEY" in data:
        raise ValueError(f"{path}: is a private key; give the bridge the public key only")
    key = _pem_public_key(data)
    if key is None:
        raise ValueError(f"{path}: is neither a PEM public key nor a PEM certificate")
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

    for kind, usable in _asymmetric():
        if isinstance(key, kind):
            wrong = [a for a in algorithms if a not in usable]
            if wrong:
                raise ValueError(
                    f"{path}: a {kind.__name__} cannot verify {', '.join(wrong)}; "
                    f"configure {' or '.join(usable)}"
                )
            if isinstance(key, RSAPublicKey) and key.key_size < 2048:
                raise ValueError(f"{path}: RSA keys shorter than 2048 bits are refused")
            verified: PublicKey = key
            return verified
    raise ValueError(f"{path}: unsupported key type {type(key).__name__}")


def check_key_file(path: str, algorithms: tuple[str, ...]) -> None:
    """Raise ValueError (naming the problem and its fix) if the key file cannot
    verify these algorithms: called while the configuration is read."""
    load_key_file(path, algorithms)


def key_file_algorithms(path: str) -> tuple[str, ...]:
    """The algorithm a key file's key type signs with, when none are configured."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return ("RS256",)
    if b"-----BEGIN" not in data:
        return ("HS256",)
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
    from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key = _pem_public_key(data)
    if isinstance(key, EllipticCurvePublicKey):
        return ({"secp384r1": "ES384", "secp521r1": "ES512"}.get(key.curve.name, "ES256"),)
    if isinstance(key, Ed25519PublicKey | Ed448PublicKey):
        return ("EdDSA",)
    return ("RS256",)
