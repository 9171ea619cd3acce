"""Throw-away certificates for TLS tests: a CA and server certificates it signs.

Server keys are RSA, so that a test can offer RSA key exchange (which needs
an RSA certificate) and see the server refuse it for its cipher policy
rather than for the key type. Every server certificate names C{localhost},
C{127.0.0.1} and C{::1}; its common name is the C{name} given, so a client
can tell which certificate it was served.
"""

from __future__ import annotations

import datetime
import ipaddress
import os

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@attrs.frozen
class CA:
    """A certificate authority: its key, its certificate and where the PEM is."""

    key: rsa.RSAPrivateKey
    certificate: x509.Certificate
    path: str


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def key_pem(key: rsa.RSAPrivateKey) -> bytes:
    """An unencrypted PKCS#8 PEM of C{key}."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(directory: str, name: str = "mcptwist test CA") -> CA:
    """Create a CA valid from yesterday for a year; its PEM is C{ca.crt}."""
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = _write(os.path.join(directory, "ca.crt"), _pem(certificate))
    return CA(key=key, certificate=certificate, path=path)


def make_server_cert(
    directory: str,
    ca: CA,
    name: str = "one",
    not_after_days: int = 30,
    expired: bool = False,
) -> tuple[str, str]:
    """Create C{NAME.crt} and C{NAME.key} in C{directory}, signed by C{ca}.

    The certificate is valid from yesterday for C{not_after_days} days, or,
    with C{expired}, it ended yesterday. Returns C{(cert_path, key_path)}.
    """
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    if expired:
        not_before = now - datetime.timedelta(days=30)
        not_after = now - datetime.timedelta(days=1)
    else:
        not_before = now - datetime.timedelta(days=1)
        not_after = now + datetime.timedelta(days=not_after_days)
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    cert_path = _write(os.path.join(directory, f"{name}.crt"), _pem(certificate))
    key_path = _write(os.path.join(directory, f"{name}.key"), key_pem(key))
    return cert_path, key_path
