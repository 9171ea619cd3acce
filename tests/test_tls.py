"""TLS listeners: versions, ciphers, ALPN, certificate reload, ssl: strings.

Servers are real listeners on 127.0.0.1 serving a tiny Site through the
same factory stack as the bridge; clients are Python's C{ssl} module (a
different OpenSSL build from the server's pyOpenSSL) in threads.
"""

from __future__ import annotations

import datetime
import http.client
import os
import shutil
import socket
import ssl
from typing import Any

import attrs
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import endpoints, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mcptwist.config.endpoints import (
    join_description,
    parse_ssl_endpoint,
    quote_argument,
    split_description,
)
from mcptwist.config.model import ListenerConfig, TLSConfig
from mcptwist.security.ipfilter import listening_factory
from mcptwist.security.tls import ReloadableTLS, TLSLoadError
from tests.support.certs import make_server_cert
from tests.support.tls import cert_dir, client_context, listen, make_site, run

# Alerts a client sees when the server, not the client, refused the handshake.
REFUSED = {"TLSV1_ALERT_PROTOCOL_VERSION", "SSLV3_ALERT_HANDSHAKE_FAILURE", "reset"}


# Clients (blocking; run in a thread)


@attrs.frozen
class Handshake:
    """What one TLS handshake gave: the negotiated parameters, or the error."""

    version: str | None = None
    cipher: str | None = None
    alpn: str | None = None
    common_name: str | None = None
    error: str | None = None


def common_name(cert: Any) -> str | None:
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def handshake(port: int, ctx: ssl.SSLContext) -> Handshake:
    """Connect, handshake, close; never raises for a refused handshake."""
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            cipher = tls.cipher()
            return Handshake(
                version=tls.version(),
                cipher=cipher[0] if cipher else None,
                alpn=tls.selected_alpn_protocol(),
                common_name=common_name(tls.getpeercert()),
            )
    except ssl.SSLError as e:
        return Handshake(error=str(e.reason))
    except (ConnectionResetError, BrokenPipeError):
        return Handshake(error="reset")


def offers_tls_1_1() -> bool:
    """Whether this Python's OpenSSL can offer TLS 1.1 at all (some builds cannot)."""
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError):
        return False
    return ssl.HAS_TLSv1_1


class KeepAlive:
    """One HTTPS connection reused for several requests."""

    def __init__(self, port: int, ctx: ssl.SSLContext) -> None:
        self.conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
        self.socket: socket.socket | None = None

    def get(self) -> tuple[int, bytes, str | None]:
        """GET /; the status, body and the served certificate's common name.

        @raise AssertionError: if the request did not reuse the socket.
        """
        self.conn.request("GET", "/", headers={"Host": "localhost"})
        response = self.conn.getresponse()
        body = response.read()
        sock = self.conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        if self.socket is None:
            self.socket = sock
        assert sock is self.socket, "reconnected instead of reusing the connection"
        return response.status, body, common_name(sock.getpeercert())

    def close(self) -> None:
        self.conn.close()


# Fixtures


async def serve_tls(case: TestCase, creator: ReloadableTLS) -> int:
    """A listener with the bridge's stack (filter outside TLS); its port."""
    factory = listening_factory(ListenerConfig("tcp:0"), make_site(), creator)
    return await listen(case, factory)


# Tests


class VersionAndCipherTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.certs = cert_dir(self)

    async def test_tls_1_2_and_1_3(self) -> None:
        port = await serve_tls(self, ReloadableTLS(self.certs.config()))
        ca = self.certs.ca
        for version, name in (
            (ssl.TLSVersion.TLSv1_2, "TLSv1.2"),
            (ssl.TLSVersion.TLSv1_3, "TLSv1.3"),
        ):
            result = await run(handshake, port, client_context(ca, version, version))
            self.assertEqual((result.error, result.version), (None, name))
            self.assertEqual(result.common_name, "one")
        default = await run(handshake, port, client_context(ca))
        self.assertEqual(default.version, "TLSv1.3")

    async def test_tls_1_1_and_older_refused(self) -> None:
        if not offers_tls_1_1():
            self.skipTest("this Python's OpenSSL cannot offer TLS 1.1")
        port = await serve_tls(self, ReloadableTLS(self.certs.config()))
        for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
            ctx = client_context(self.certs.ca, ssl.TLSVersion.TLSv1, version)
            result = await run(handshake, port, ctx)
            self.assertEqual(result.error, "TLSV1_ALERT_PROTOCOL_VERSION", version)

    async def test_min_version_1_3_refuses_1_2(self) -> None:
        port = await serve_tls(self, ReloadableTLS(self.certs.config(min_version="1.3")))
        v12 = ssl.TLSVersion.TLSv1_2
        result = await run(handshake, port, client_context(self.certs.ca, v12, v12))
        self.assertEqual(result.error, "TLSV1_ALERT_PROTOCOL_VERSION")
        result = await run(handshake, port, client_context(self.certs.ca))
        self.assertEqual(result.version, "TLSv1.3")

    async def test_tls_1_2_needs_forward_secrecy_and_aead(self) -> None:
        """RSA key exchange, CBC and SHA-1 suites are refused; ECDHE+AEAD works."""
        port = await serve_tls(self, ReloadableTLS(self.certs.config()))
        v12 = ssl.TLSVersion.TLSv1_2
        for cipher in (
            "AES128-SHA",
            "AES256-GCM-SHA384",
            "AES128-GCM-SHA256",
            "ECDHE-RSA-AES128-SHA",
            "ECDHE-RSA-AES256-SHA",
            "ECDHE-RSA-AES128-SHA256",
            "ECDHE-RSA-AES256-SHA384",
            "DHE-RSA-AES128-GCM-SHA256",
        ):
            result = await run(handshake, port, client_context(self.certs.ca, v12, v12, cipher))
            self.assertIn(result.error, REFUSED, cipher)
        for cipher in ("ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-CHACHA20-POLY1305"):
            result = await run(handshake, port, client_context(self.certs.ca, v12, v12, cipher))
            self.assertEqual((result.error, result.cipher), (None, cipher))

    async def test_alpn_http_1_1(self) -> None:
        port = await serve_tls(self, ReloadableTLS(self.certs.config()))
        for offered in (["http/1.1"], ["h2", "http/1.1"]):
            ctx = client_context(self.certs.ca, alpn=offered)
            result = await run(handshake, port, ctx)
            self.assertEqual(result.alpn, "http/1.1", offered)
        result = await run(handshake, port, client_context(self.certs.ca))
        self.assertEqual((result.error, result.alpn), (None, None))

    async def test_wrapped_endpoint(self) -> None:
        """A ReloadableTLS serves through Twisted's own endpoint wrapper too."""
        raw = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        port = await listen(
            self, make_site(), endpoints.wrapServerTLS(ReloadableTLS(self.certs.config()), raw)
        )
        client = KeepAlive(port, client_context(self.certs.ca))
        self.addCleanup(client.close)
        status, body, _ = await run(client.get)
        self.assertEqual((status, body), (200, b"127.0.0.1 https"))


class ReloadTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.certs = cert_dir(self)

    async def test_new_connections_get_the_new_certificate(self) -> None:
        """After reload, new handshakes see "two"; an open connection keeps working."""
        creator = ReloadableTLS(self.certs.config())
        port = await serve_tls(self, creator)
        ctx = client_context(self.certs.ca)
        old = KeepAlive(port, ctx)
        self.addCleanup(old.close)
        self.assertEqual(await run(old.get), (200, b"127.0.0.1 https", "one"))

        self.certs.install(self.certs.two)
        creator.reload()
        self.assertEqual(creator.subject, "CN=two")

        new = KeepAlive(port, ctx)
        self.addCleanup(new.close)
        self.assertEqual(await run(new.get), (200, b"127.0.0.1 https", "two"))
        self.assertEqual(await run(old.get), (200, b"127.0.0.1 https", "one"))

    async def test_failed_reload_keeps_serving_the_old_certificate(self) -> None:
        creator = ReloadableTLS(self.certs.config())
        port = await serve_tls(self, creator)
        self.certs.write(self.certs.cert, b"not a certificate\n")
        self.assertRaises(TLSLoadError, creator.reload)
        result = await run(handshake, port, client_context(self.certs.ca))
        self.assertEqual((result.error, result.common_name), (None, "one"))


class LoadErrorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.certs = cert_dir(self)
        self.creator = ReloadableTLS(self.certs.config())

    def assertReloadFails(self, *words: str, config: TLSConfig | None = None) -> TLSLoadError:
        context = self.creator._context
        error: TLSLoadError = self.assertRaises(TLSLoadError, self.creator.reload, config)
        for word in words:
            self.assertIn(word, str(error))
        self.assertIs(self.creator._context, context)
        self.assertEqual(self.creator.subject, "CN=one")
        return error

    def test_key_of_another_certificate(self) -> None:
        shutil.copyfile(self.certs.two[0], self.certs.cert)
        self.assertReloadFails(self.certs.key, "key does not match certificate", self.certs.cert)

    def test_garbage_certificate(self) -> None:
        self.certs.write(self.certs.cert, b"garbage")
        self.assertReloadFails(self.certs.cert, "not a PEM certificate")

    def test_garbage_key(self) -> None:
        self.certs.write(
            self.certs.key, b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
        )
        self.assertReloadFails(self.certs.key, "not a usable PEM private key")

    def test_missing_file(self) -> None:
        os.remove(self.certs.key)
        self.assertReloadFails(self.certs.key, "cannot be read (No such file")

    def test_expired(self) -> None:
        self.certs.install(make_server_cert(self.certs.dir, self.certs.ca, "old", expired=True))
        self.assertReloadFails(self.certs.cert, "certificate expired on")

    def test_expired_by_the_clock(self) -> None:
        later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=31)
        error = self.assertRaises(
            TLSLoadError, ReloadableTLS, self.certs.config(), now=lambda: later
        )
        self.assertIn("certificate expired on", str(error))

    def test_not_yet_valid(self) -> None:
        earlier = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
        error = self.assertRaises(
            TLSLoadError, ReloadableTLS, self.certs.config(), now=lambda: earlier
        )
        self.assertIn("not valid before", str(error))

    def test_encrypted_key(self) -> None:
        with open(self.certs.one[1], "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
        encrypted = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
        self.certs.write(self.certs.key, encrypted)
        self.assertReloadFails(self.certs.key, "encrypted")

    def test_bad_chain(self) -> None:
        chain = os.path.join(self.certs.dir, "chain.pem")
        self.certs.write(chain, b"")
        self.assertReloadFails(
            chain, "not a PEM certificate", config=self.certs.config(chain=chain)
        )

    def test_unsupported_min_version(self) -> None:
        self.assertReloadFails("min_version", "'1.1'", config=self.certs.config(min_version="1.1"))

    def test_failed_reload_keeps_the_old_config(self) -> None:
        missing = TLSConfig(certificate="/nonexistent/x.crt", key="/nonexistent/x.key")
        self.assertReloadFails("/nonexistent/x.crt", config=missing)
        self.assertEqual(self.creator.config, self.certs.config())


class LoadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.certs = cert_dir(self)

    def test_chain_and_combined_files(self) -> None:
        """A chain file is accepted; so is one file holding key and certificate."""
        ReloadableTLS(self.certs.config(chain=self.certs.ca.path))
        combined = os.path.join(self.certs.dir, "server.pem")
        with open(combined, "wb") as out:
            for path in (self.certs.one[1], self.certs.one[0], self.certs.ca.path):
                with open(path, "rb") as f:
                    out.write(f.read())
        creator = ReloadableTLS(TLSConfig(certificate=combined, key=combined))
        self.assertEqual(creator.subject, "CN=one")

    def test_reload_with_another_config(self) -> None:
        creator = ReloadableTLS(self.certs.config())
        two = TLSConfig(certificate=self.certs.two[0], key=self.certs.two[1])
        creator.reload(two)
        self.assertEqual((creator.subject, creator.config), ("CN=two", two))

    def test_expiry(self) -> None:
        creator = ReloadableTLS(self.certs.config())
        now = datetime.datetime.now(datetime.UTC)
        self.assertEqual(round((creator.expires_at - now).total_seconds() / 86400), 30)
        self.assertIsNone(creator.expiry_warning())
        self.certs.install(
            make_server_cert(self.certs.dir, self.certs.ca, "soon", not_after_days=5)
        )
        creator.reload()
        warning = creator.expiry_warning()
        assert warning is not None
        self.assertIn(f"{self.certs.cert}: certificate CN=soon expires", warning)
        self.assertIn("in 4 days", warning)


class SSLEndpointTests(SynchronousTestCase):
    def test_not_ssl(self) -> None:
        for description in (
            "tcp:8080",
            "unix:/run/x.sock",
            "tls:/etc/certs",
            "sslx:1",
            "SSL:443",
            "",
        ):
            self.assertIsNone(parse_ssl_endpoint(description), description)

    def test_twisted_defaults(self) -> None:
        self.assertEqual(
            parse_ssl_endpoint("ssl:8443"),
            ("tcp:8443", TLSConfig(certificate="server.pem", key="server.pem")),
        )
        self.assertEqual(
            parse_ssl_endpoint("ssl:8443:privateKey=k.pem"),
            ("tcp:8443", TLSConfig(certificate="k.pem", key="k.pem")),
        )

    def test_all_parameters(self) -> None:
        description = (
            "ssl:443:interface=\\:\\:1:backlog=7:privateKey=/etc/k.pem"
            ":certKey=C\\:/cert.pem:extraCertChain=chain.pem"
        )
        self.assertEqual(
            parse_ssl_endpoint(description),
            (
                "tcp:443:interface=\\:\\:1:backlog=7",
                TLSConfig(certificate="C:/cert.pem", key="/etc/k.pem", chain="chain.pem"),
            ),
        )

    def test_positional(self) -> None:
        self.assertEqual(
            parse_ssl_endpoint("ssl:443:k.pem:c.pem"),
            ("tcp:443", TLSConfig(certificate="c.pem", key="k.pem")),
        )
        self.assertEqual(
            parse_ssl_endpoint("port=443:ssl"),
            ("tcp:443", TLSConfig(certificate="server.pem", key="server.pem")),
        )

    def test_result_is_a_tcp_endpoint(self) -> None:
        result = parse_ssl_endpoint("ssl:0:interface=127.0.0.1:backlog=5:privateKey=k")
        assert result is not None
        endpoint = endpoints.serverFromString(reactor, result[0])
        self.assertIsInstance(endpoint, endpoints.TCP4ServerEndpoint)

    def test_rejected(self) -> None:
        for description, words in (
            ("ssl:443:dhParameters=dh.pem", "ECDHE"),
            ("ssl:443:sslmethod=TLSv1_2_METHOD", "min_version"),
            ("ssl:443:k:c:TLSv1_2_METHOD", "min_version"),
            ("ssl:443:cipher=x", "no parameter 'cipher'"),
            ("ssl:443:k.pem:privateKey=k.pem", "twice"),
            ("ssl", "needs a port"),
            ("ssl:https", "port 'https' is not a number"),
            ("ssl:443:backlog=many", "backlog 'many' is not a number"),
            ("ssl:443:privateKey=k\\", "lone backslash"),
            ("ssl:1:2:3:4:5:6:7:8:9", "at most 8"),
        ):
            error = self.assertRaises(ValueError, parse_ssl_endpoint, description)
            self.assertIn(words, str(error), description)

    @given(
        port=st.integers(0, 65535),
        interface=st.none() | st.text(),
        backlog=st.none() | st.integers(1, 1000),
        key=st.none() | st.text(),
        cert=st.none() | st.text(),
        chain=st.none() | st.text(),
        data=st.data(),
    )
    def test_round_trip(
        self,
        port: int,
        interface: str | None,
        backlog: int | None,
        key: str | None,
        cert: str | None,
        chain: str | None,
        data: st.DataObject,
    ) -> None:
        """Any values, quoted into an ssl: string in any order, come back intact."""
        fields = {
            "interface": interface,
            "backlog": None if backlog is None else str(backlog),
            "privateKey": key,
            "certKey": cert,
            "extraCertChain": chain,
        }
        given_fields = [(k, v) for k, v in fields.items() if v is not None]
        order = data.draw(st.permutations(given_fields))
        description = join_description(["ssl", str(port)], order)
        result = parse_ssl_endpoint(description)
        assert result is not None
        tcp, config = result
        expected_key = "server.pem" if key is None else key
        self.assertEqual(
            config,
            TLSConfig(
                certificate=expected_key if cert is None else cert, key=expected_key, chain=chain
            ),
        )
        tcp_kw = {
            k: v for k, v in fields.items() if k in ("interface", "backlog") and v is not None
        }
        self.assertEqual(split_description(tcp), (["tcp", str(port)], tcp_kw))
        self.assertEqual(endpoints._parse(tcp), (["tcp", str(port)], tcp_kw))


class DescriptionSyntaxTests(SynchronousTestCase):
    @given(st.lists(st.text(), min_size=1))
    def test_quoted_fields_round_trip(self, args: list[str]) -> None:
        self.assertEqual(split_description(":".join(map(quote_argument, args))), (args, {}))

    @given(st.text(alphabet=st.sampled_from("ab:=\\é ")) | st.text())
    def test_same_as_twisted(self, description: str) -> None:
        """Twisted's own parser is the reference, including for odd strings."""
        try:
            expected = endpoints._parse(description)
        except (RuntimeError, ValueError):
            # RuntimeError: Twisted's answer to a trailing lone backslash;
            # UnicodeEncodeError (a ValueError): to a non-ASCII parameter name.
            self.assertRaises(ValueError, split_description, description)
            return
        self.assertEqual(split_description(description), expected)

    def test_examples(self) -> None:
        self.assertEqual(
            split_description("a:b=c=d:e\\:f:=g"), (["a", "e:f"], {"b": "c=d", "": "g"})
        )
        self.assertEqual(split_description("k\\=v"), (["k=v"], {}))
        self.assertEqual(split_description("a::"), (["a", "", ""], {}))
        self.assertRaises(ValueError, split_description, "é=1")
