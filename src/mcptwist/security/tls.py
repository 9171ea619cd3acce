# -*- test-case-name: tests.test_tls -*-
"""TLS for listeners: a modern-only policy and certificates re-read on SIGHUP.

L{ReloadableTLS} is the connection creator of a TLS listener. It checks the
certificate, key and chain before using them (they must parse, match and be
in their validity period), so that a bad file fails loudly at start or
reload instead of at the first handshake. A failed reload keeps the old
certificate in service.

The IP filter must see a connection before TLS does, so that a refused peer
costs no handshake: build the stack with L{tls_factory} inside
L{mcptwist.security.ipfilter.IPFilterFactory} rather than wrapping the endpoint with
Twisted's C{wrapServerTLS}, which suits listeners without a filter.

L{parse_ssl_endpoint} turns a Twisted C{ssl:} endpoint string into a plain
C{tcp:} one plus a L{TLSConfig}, so that C{ssl:} listeners get the same
policy and reload as configured ones.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IProtocolFactory
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from mcptwist.config.model import TLSConfig

from .tlserror import TLSLoadError

# TLS 1.2 suites with forward secrecy and an AEAD cipher only. Twisted's
# default list also accepts RSA key exchange (AES128-SHA, AES256-GCM-SHA384:
# no forward secrecy) and CBC suites with SHA-1 MACs, so it is replaced.
# TLS 1.3 suites are configured separately by OpenSSL and are all modern.
# DHE is left out on purpose: it would need DH parameters, and every
# current TLS 1.2 client offers ECDHE.
MODERN_CIPHERS: Final = "ECDHE+AESGCM:ECDHE+CHACHA20"
# A certificate closer to its end than this is served, with a warning.
EXPIRY_WARNING: Final = datetime.timedelta(days=14)
ALPN_PROTOCOLS: Final = (b"http/1.1",)
MIN_VERSIONS: Final = {"1.2": TLSVersion.TLSv1_2, "1.3": TLSVersion.TLSv1_3}


_ciphers = AcceptableCiphers.fromOpenSSLCipherString(MODERN_CIPHERS)


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSLoadError(path, f"cannot be read ({e.strerror or e})") from None


def _certificates(path: str, data: bytes) -> list[x509.Certificate]:
    try:
        found = x509.load_pem_x509_certificates(data)
    except ValueError:
        found = []
    if not found:
        raise TLSLoadError(path, "not a PEM certificate (no parsable CERTIFICATE block)")
    return found


def _private_key(path: str, data: bytes) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSLoadError(
            path, "the private key is encrypted; give an unencrypted key file"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise TLSLoadError(path, f"not a usable PEM private key ({e})") from None


def _spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableTLS:
    """A server connection creator whose certificate can be replaced live.

    Every handshake uses the context current when it starts; connections
    already up keep theirs, so a reload never interrupts a client. The
    policy: TLS 1.2 or 1.3 and up (C{min_version}), ALPN C{http/1.1}, no
    compression or renegotiation, and L{MODERN_CIPHERS} instead of
    Twisted's default list, which accepts RSA key exchange and CBC-SHA1.
    """

    def __init__(self, config: TLSConfig, now: Callable[[], datetime.datetime] = _utcnow) -> None:
        """Load C{config}'s files.

        @raise TLSLoadError: if they cannot be served.
        """
        self._now = now
        self._config = config
        self._context, self._leaf = self._load(config)

    @property
    def config(self) -> TLSConfig:
        """The configuration last loaded successfully."""
        return self._config

    @property
    def expires_at(self) -> datetime.datetime:
        """When the served certificate ends (UTC)."""
        return self._leaf.not_valid_after_utc

    @property
    def subject(self) -> str:
        """The served certificate's subject, in RFC 4514 form."""
        return self._leaf.subject.rfc4514_string()

    def expiry_warning(self) -> str | None:
        """A sentence to log if the certificate ends within 14 days, else None."""
        left = self.expires_at - self._now()
        if left >= EXPIRY_WARNING:
            return None
        return (
            f"{self._config.certificate}: certificate {self.subject} expires "
            f"{self.expires_at:%Y-%m-%d %H:%M} UTC, in {left.days} days; renew it"
        )

    def reload(self, config: TLSConfig | None = None) -> None:
        """Re-read the files (of C{config} if given) for new handshakes.

        @raise TLSLoadError: if they cannot be served; the old certificate
            then stays in service.
        """
        config = self._config if config is None else config
        self._context, self._leaf = self._load(config)
        self._config = config

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """A connection on the current context (ALPN is set up in the context)."""
        return SSL.Connection(self._context, None)

    def _load(self, config: TLSConfig) -> tuple[SSL.Context, x509.Certificate]:
        minimum = MIN_VERSIONS.get(config.min_version)
        if minimum is None:
            raise TLSLoadError(
                "min_version",
                f"{config.min_version!r} is not supported; use {' or '.join(map(repr, MIN_VERSIONS))}",
            )
        leaf, *chain = _certificates(config.certificate, _read(config.certificate))
        key = _private_key(config.key, _read(config.key))
        if config.chain is not None:
            chain += _certificates(config.chain, _read(config.chain))
        if _spki(key.public_key()) != _spki(leaf.public_key()):
            raise TLSLoadError(config.key, f"key does not match certificate {config.certificate}")
        now = self._now()
        if leaf.not_valid_after_utc <= now:
            raise TLSLoadError(
                config.certificate,
                f"certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
            )
        if leaf.not_valid_before_utc > now:
            raise TLSLoadError(
                config.certificate,
                f"certificate is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
            )
        try:
            # pyOpenSSL takes cryptography objects directly (its own X509 and
            # PKey are deprecated there); Twisted's annotations predate that.
            options = CertificateOptions(
                privateKey=key,  # type: ignore[arg-type]
                certificate=leaf,  # type: ignore[arg-type]
                extraCertChain=chain,  # type: ignore[arg-type]
                raiseMinimumTo=minimum,
                acceptableCiphers=_ciphers,
                acceptableProtocols=list(ALPN_PROTOCOLS),
            )
            context = options.getContext()
            # No renegotiation at all: TLS 1.2 client-initiated renegotiation
            # is a cheap way to make the server do handshakes.
            context.set_options(SSL.OP_NO_RENEGOTIATION)
        except (SSL.Error, ValueError, TypeError) as e:
            raise TLSLoadError(config.certificate, f"OpenSSL refused it ({e})") from None
        return context, leaf


def tls_factory(
    creator: IOpenSSLServerConnectionCreator, wrapped: IProtocolFactory
) -> IProtocolFactory:
    """Wrap C{wrapped} (usually a Site) in server-side TLS.

    ALPN offers what C{wrapped} names through C{IProtocolNegotiationFactory}
    plus C{http/1.1}, so C{wrapped} must be the factory directly inside.
    """
    return TLSMemoryBIOFactory(creator, False, wrapped)
