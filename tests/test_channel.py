"""Receiving requests: judged from their head, deadlines, caps and protocol edges.

A real L{BridgeSite} and L{BridgeChannel} over a StringTransport, the gate
and fake children behind, on a Clock: what a client sees byte by byte.
"""

from __future__ import annotations

from typing import Any

import attrs
import jwt
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from mcptwist.config.model import (
    AuthConfig,
    JWTConfig,
    LimitsConfig,
    ListenerConfig,
    ServerConfig,
    TokenConfig,
)
from mcptwist.config.networks import parse_networks
from mcptwist.mcp import jsonrpc
from mcptwist.ops.metrics import Metrics
from mcptwist.security.auth import hash_token
from mcptwist.service.site import BridgeSite, MetricsOnly
from mcptwist.web.channel import LINGER, ConnectionCounter

from .support.bridge import Bridge
from .support.idp import AUD, ISS, JWKS_URL, FakeIdP, claims, jwk, rsa_key
from .support.messages import INIT

TOKEN = "mcpt_channel_test_token"
MiB = 1024 * 1024


def parse(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of the one response in C{data}."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def post_head(path: str, length: int, token: str | None = None, **extra: str) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: application/json",
        "Accept: application/json, text/event-stream",
        f"Content-Length: {length}",
    ]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{k}: {v}" for k, v in extra.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Wire(Bridge):
    """A site over fake children, and raw connections to it."""

    def __init__(
        self,
        test: SynchronousTestCase,
        auth: AuthConfig | None = None,
        fetch: Any = None,
        **limits: Any,
    ) -> None:
        servers = (
            ServerConfig(name="s", command="fake", max_message_size=2 * MiB),
            ServerConfig(name="t", command="fake", max_message_size=128 * 1024),
        )
        if auth is None:
            auth = AuthConfig(tokens=(TokenConfig("user", hash_token(TOKEN)),))
        super().__init__(
            test, *servers, fetch=fetch, auth=auth, insecure=True, limits=LimitsConfig(**limits)
        )
        self.metrics = Metrics()
        self.audit.metrics = self.metrics
        self.site = self.make_site(self.app.resource())

    def make_site(self, resource: Any) -> BridgeSite:
        site = BridgeSite(resource, reactor=self.reactor, parsePOSTFormSubmission=False)
        site.audit = self.audit
        site.connections = ConnectionCounter(self.config.limits.max_connections_per_ip)
        site.configure(self.config.limits)
        return site

    def connect(
        self, host: str = "192.0.2.1", site: BridgeSite | None = None
    ) -> tuple[Any, StringTransport]:
        site = site or self.site
        kind = IPv6Address if ":" in host else IPv4Address
        address = kind("TCP", host, 40000)
        channel = site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        channel.makeConnection(transport)
        return channel, transport

    def refused(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "mcptwist_http_refused_total", {"reason": reason}
        )
        return value or 0.0

    def auth_failures(self) -> float:
        value = self.metrics.registry.get_sample_value(
            "mcptwist_auth_failures_total", {"reason": "no credentials"}
        )
        return value or 0.0


def error_message(test: SynchronousTestCase, body: bytes) -> str:
    answer = jsonrpc.loads(body)
    test.assertIsNone(answer["id"])
    message: str = answer["error"]["message"]
    return message


class HeadTests(SynchronousTestCase):
    """A request is judged once its head has arrived, before its body is read."""

    def test_unauthenticated_20mb_post_answered_401_at_the_head(self) -> None:
        wire = Wire(self)
        channel, transport = wire.connect()
        channel.dataReceived(post_head("/servers/s/mcp", 20_000_000))
        status, headers, body = parse(transport.value())
        self.assertEqual(status, 401)
        self.assertTrue(headers["www-authenticate"].startswith("Bearer"))
        self.assertEqual(headers["connection"], "close")
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(jsonrpc.loads(body)["error"]["code"], -32001)
        self.assertEqual(wire.auth_failures(), 1)
        # Nothing of the body is kept: what follows is dropped unread.
        self.assertEqual(channel.requests, [])
        answered = transport.value()
        for _ in range(20):
            channel.dataReceived(b"x" * 65536)
        self.assertEqual(transport.value(), answered)
        self.assertFalse(transport.disconnecting)
        # The rest is read and dropped for a moment, then the connection ends.
        wire.reactor.advance(LINGER)
        self.assertTrue(transport.disconnecting)

    def test_admin_api_not_served_here_is_refused_at_the_head(self) -> None:
        """Without authentication, on a listener open to the network, the
        admin API is refused (404, audited) before its body is read."""
        wire = Wire(self, auth=AuthConfig())
        served: list[bytes] = []

        class Admin(Resource):
            isLeaf = True

            def render(self, request: Any) -> bytes:
                served.append(request.content.read())
                return b"{}"

        wire.app.admin = Admin()
        wire.site.local = False
        channel, transport = wire.connect()
        channel.dataReceived(post_head("/admin/servers", 500_000))
        status, _, body = parse(transport.value())
        self.assertEqual(status, 404)
        self.assertIn(b"only on loopback", body)
        self.assertEqual(channel.requests, [])
        value = wire.metrics.registry.get_sample_value("mcptwist_access_refused_total")
        self.assertEqual(value, 1.0)
        # On a loopback listener it is served, body and all.
        wire.site.local = True
        channel, transport = wire.connect("127.0.0.1")
        channel.dataReceived(post_head("/admin/servers", 2) + b"{}")
        self.assertEqual(parse(transport.value())[0], 200)
        self.assertEqual(served, [b"{}"])

    def test_admin_api_not_served_to_a_client_a_proxy_forwards(self) -> None:
        """Without authentication, a loopback listener behind a reverse proxy
        serves the admin API to this host's clients only, not to the ones the
        proxy forwards from elsewhere."""
        wire = Wire(self, auth=AuthConfig())

        class Admin(Resource):
            isLeaf = True

            def render(self, request: Any) -> bytes:
                return b"{}"

        wire.app.admin = Admin()
        wire.site.local = True
        wire.site.listener = ListenerConfig(
            "tcp:8081:interface=127.0.0.1", trusted_proxies=parse_networks(["127.0.0.1"])
        )
        head = b"GET /admin/servers HTTP/1.1\r\nHost: localhost\r\n"
        for forwarded, status in ((b"X-Forwarded-For: 203.0.113.9\r\n", 404), (b"", 200)):
            channel, transport = wire.connect("127.0.0.1")
            channel.dataReceived(head + forwarded + b"\r\n")
            self.assertEqual(parse(transport.value())[0], status, forwarded)

    def test_a_reload_while_the_body_arrives_judges_it_again(self) -> None:
        """A request admitted from its head, whose token a reload then
        removes, is refused when its body has arrived (it does not run)."""
        wire = Wire(self)
        channel, transport = wire.connect()
        body = jsonrpc.dumps(INIT)
        channel.dataReceived(post_head("/servers/s/mcp", len(body), TOKEN))
        self.assertEqual(transport.value(), b"")
        other = AuthConfig(tokens=(TokenConfig("other", hash_token("mcpt_other_token")),))
        wire.access.reconfigure(attrs.evolve(wire.config, auth=other), wire.reactor)
        channel.dataReceived(body)
        self.assertEqual(parse(transport.value())[0], 401)
        self.assertEqual(wire.registry.sessions, {})

    def test_good_token_gets_the_servers_full_limit(self) -> None:
        wire = Wire(self)
        channel, transport = wire.connect()
        body = jsonrpc.dumps(INIT) + b" " * (MiB - len(jsonrpc.dumps(INIT)))
        channel.dataReceived(post_head("/servers/s/mcp", len(body), TOKEN))
        self.assertEqual(transport.value(), b"")
        [request] = channel.requests
        self.assertEqual(request.body_limit, 2 * MiB)
        for start in range(0, len(body), 65536):
            channel.dataReceived(body[start : start + 65536])
        status, _, answer = parse(transport.value())
        self.assertEqual(status, 200, answer)
        self.assertEqual(jsonrpc.loads(answer)["result"]["protocolVersion"], "2025-06-18")

    def test_the_limit_is_the_named_servers(self) -> None:
        """Server t takes 128 KiB: a 1 MiB POST to it is refused at the head,
        though server s would take it."""
        wire = Wire(self)
        channel, transport = wire.connect()
        channel.dataReceived(post_head("/servers/t/mcp", MiB, TOKEN))
        status, headers, body = parse(transport.value())
        self.assertEqual(status, 413)
        self.assertEqual(headers["connection"], "close")
        self.assertIn(f"the limit is {128 * 1024} bytes", error_message(self, body))
        self.assertEqual(wire.refused("body_too_large"), 1)

    def test_a_chunked_body_past_the_limit_is_answered_at_once(self) -> None:
        wire = Wire(self)
        channel, transport = wire.connect()
        head = post_head("/servers/t/mcp", 0, TOKEN).replace(
            b"Content-Length: 0", b"Transfer-Encoding: chunked"
        )
        channel.dataReceived(head)
        chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
        channel.dataReceived(chunk)
        self.assertEqual(transport.value(), b"")
        channel.dataReceived(chunk + chunk)
        status, _, _ = parse(transport.value())
        self.assertEqual(status, 413)
        self.assertEqual(channel.requests, [])

    def test_routes_without_a_body_get_the_small_limit(self) -> None:
        wire = Wire(self, preauth_body=4096)
        channel, transport = wire.connect()
        channel.dataReceived(post_head("/", 5000, TOKEN))
        self.assertEqual(parse(transport.value())[0], 413)

    def test_unknown_server_is_404_at_the_head(self) -> None:
        wire = Wire(self)
        channel, transport = wire.connect()
        channel.dataReceived(post_head("/servers/nope/mcp", 20_000_000, TOKEN))
        status, _, body = parse(transport.value())
        self.assertEqual(status, 404)
        self.assertIn("no MCP server is named 'nope'", error_message(self, body))

    def test_refused_host_is_421_at_the_head(self) -> None:
        wire = Wire(self)
        channel, transport = wire.connect()
        head = post_head("/servers/s/mcp", 20_000_000, TOKEN).replace(
            b"Host: 127.0.0.1", b"Host: evil.example"
        )
        channel.dataReceived(head)
        self.assertEqual(parse(transport.value())[0], 421)

    def test_the_gate_decides_once(self) -> None:
        """The rate limit is charged once for a request judged from its head."""
        wire = Wire(self, per_ip=None, per_principal=None)
        checks: list[Any] = []
        limiter = wire.access.limiter
        original = limiter.check

        def check(*args: Any, **kwargs: Any) -> Any:
            checks.append(args)
            return original(*args, **kwargs)

        limiter.check = check  # type: ignore[method-assign]
        channel, transport = wire.connect()
        body = jsonrpc.dumps(INIT)
        channel.dataReceived(post_head("/servers/s/mcp", len(body), TOKEN) + body)
        self.assertEqual(parse(transport.value())[0], 200)
        # One check of the address before credentials, one of the principal after.
        self.assertEqual(len(checks), 2)

    def jwt_wire(self, **changes: Any) -> tuple[Wire, FakeIdP, str]:
        """A site that checks JWTs with keys its identity provider has not
        given yet, and a token with these claims changed."""
        idp = FakeIdP(jwk(rsa_key(), "a", "RS256"))
        idp.hold = True
        auth = AuthConfig(
            jwt=JWTConfig(algorithms=("RS256",), audience=(AUD,), issuer=ISS, jwks_url=JWKS_URL),
        )
        wire = Wire(self, auth=auth, fetch=idp.fetch)
        token = jwt.encode(claims(**changes), rsa_key(), algorithm="RS256", headers={"kid": "a"})
        return wire, idp, token

    def test_reading_waits_for_a_jwt_whose_keys_are_fetched(self) -> None:
        wire, idp, token = self.jwt_wire(mcp_servers="*")
        channel, transport = wire.connect()
        body = jsonrpc.dumps(INIT) + b" " * 200_000
        channel.dataReceived(post_head("/servers/s/mcp", len(body), token))
        # Nothing more is read until the credentials are checked.
        self.assertEqual(transport.producerState, "paused")
        [request] = channel.requests
        self.assertEqual(request.body_limit, 64 * 1024)
        idp.release()
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(request.body_limit, 2 * MiB)
        for start in range(0, len(body), 65536):
            channel.dataReceived(body[start : start + 65536])
        self.assertEqual(parse(transport.value())[0], 200)

    def test_a_refused_jwt_is_answered_when_checked(self) -> None:
        wire, idp, token = self.jwt_wire(aud="someone-else")
        channel, transport = wire.connect()
        channel.dataReceived(post_head("/servers/s/mcp", 20_000_000, token))
        self.assertEqual(transport.value(), b"")
        idp.release()
        status, headers, _ = parse(transport.value())
        self.assertEqual(status, 401)
        self.assertIn('error="invalid_token"', headers["www-authenticate"])
        self.assertEqual(transport.producerState, "producing")


class DeadlineTests(SynchronousTestCase):
    """A request must arrive in time, however slowly its bytes trickle."""

    def test_slow_head_is_cut_at_the_deadline(self) -> None:
        wire = Wire(self, header_timeout=20.0)
        channel, transport = wire.connect()
        channel.dataReceived(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        for _ in range(19):
            wire.reactor.advance(1)
            channel.dataReceived(b"X")
        self.assertEqual(transport.value(), b"")
        wire.reactor.advance(1)
        status, headers, body = parse(transport.value())
        self.assertEqual(status, 408)
        self.assertEqual(headers["connection"], "close")
        self.assertIn("limits.header_timeout", error_message(self, body))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(wire.refused("header_timeout"), 1)

    def test_the_first_head_is_due_from_the_connection(self) -> None:
        wire = Wire(self, header_timeout=20.0)
        _, transport = wire.connect()
        wire.reactor.advance(20)
        self.assertEqual(parse(transport.value())[0], 408)

    def test_slow_body_is_cut_at_the_deadline(self) -> None:
        wire = Wire(self, body_timeout=30.0)
        channel, transport = wire.connect()
        channel.dataReceived(post_head("/servers/s/mcp", 1000, TOKEN))
        for _ in range(29):
            wire.reactor.advance(1)
            channel.dataReceived(b" ")
        self.assertEqual(transport.value(), b"")
        wire.reactor.advance(1)
        status, _, body = parse(transport.value())
        self.assertEqual(status, 408)
        self.assertIn("limits.body_timeout", error_message(self, body))
        self.assertEqual(wire.refused("body_timeout"), 1)

    def test_a_kept_alive_connection_idles_then_gets_a_new_deadline(self) -> None:
        wire = Wire(self, header_timeout=5.0)
        channel, transport = wire.connect()
        channel.dataReceived(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.assertEqual(parse(transport.value())[0], 200)
        transport.clear()
        # Between requests the idle timeout (60 s) applies, not the head's.
        wire.reactor.advance(30)
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"GET /health HTTP/1.1\r\n")
        wire.reactor.advance(5)
        self.assertEqual(parse(transport.value())[0], 408)

    def test_the_listening_address_is_asked_once_a_connection(self) -> None:
        """Every request wants the listening address: the channel asks the
        transport once (a system call each time on a socket)."""
        wire = Wire(self)
        channel, transport = wire.connect()
        asked: list[object] = []
        own = transport.getHost

        def get_host() -> Any:
            asked.append(None)
            return own()

        transport.getHost = get_host  # type: ignore[method-assign]
        for _ in range(3):
            channel.dataReceived(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.assertEqual(transport.value().count(b"HTTP/1.1 200"), 3)
        self.assertEqual(len(asked), 1)

    def test_response_streams_are_not_cut(self) -> None:
        wire = Wire(self, header_timeout=5.0, body_timeout=5.0)
        channel, transport = wire.connect()
        channel.dataReceived(
            b"GET /servers/s/sse HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n"
        )
        status, headers, _ = parse(transport.value())
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], "text/event-stream")
        wire.reactor.advance(600)
        self.assertFalse(transport.disconnecting)


class ConnectionCapTests(SynchronousTestCase):
    def test_one_address_past_its_cap_is_refused(self) -> None:
        wire = Wire(self, max_connections_per_ip=2)
        first = [wire.connect("192.0.2.1") for _ in range(2)]
        for _, transport in first:
            self.assertFalse(transport.disconnecting)
        _, refused = wire.connect("192.0.2.1")
        status, headers, body = parse(refused.value())
        self.assertEqual(status, 429)
        self.assertEqual(headers["retry-after"], "5")
        self.assertIn("limits.max_connections_per_ip", error_message(self, body))
        self.assertTrue(refused.disconnecting)
        self.assertEqual(wire.refused("too_many_connections"), 1)
        # Another address is fine.
        _, other = wire.connect("192.0.2.2")
        self.assertFalse(other.disconnecting)
        # A closed connection frees its place.
        channel, _ = first[0]
        channel.connectionLost(None)
        _, again = wire.connect("192.0.2.1")
        self.assertFalse(again.disconnecting)

    def test_ipv6_counts_by_64_and_loopback_is_not_counted(self) -> None:
        wire = Wire(self, max_connections_per_ip=1)
        wire.connect("2001:db8::1")
        _, refused = wire.connect("2001:db8::2")
        self.assertEqual(parse(refused.value())[0], 429)
        for _ in range(3):
            _, local = wire.connect("127.0.0.1")
            self.assertFalse(local.disconnecting)


class ProtocolEdgeTests(SynchronousTestCase):
    def test_header_line_over_16k_gets_431(self) -> None:
        wire = Wire(self)
        channel, transport = wire.connect()
        channel.dataReceived(b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n")
        status, headers, body = parse(transport.value())
        self.assertEqual(status, 431)
        self.assertEqual(headers["connection"], "close")
        self.assertEqual(headers["server"], "mcptwist")
        self.assertIn("Request Header Fields Too Large", error_message(self, body))
        self.assertEqual(wire.refused("headers_too_large"), 1)

    def test_headers_over_16k_in_all_get_431(self) -> None:
        wire = Wire(self)
        channel, transport = wire.connect()
        lines = b"".join(b"X-H%d: %s\r\n" % (i, b"a" * 1000) for i in range(20))
        channel.dataReceived(b"GET /health HTTP/1.1\r\n" + lines + b"\r\n")
        self.assertEqual(parse(transport.value())[0], 431)

    def test_request_line_over_16k_gets_414(self) -> None:
        wire = Wire(self)
        channel, transport = wire.connect()
        channel.dataReceived(b"GET /" + b"a" * 17000 + b" HTTP/1.1\r\n\r\n")
        self.assertEqual(parse(transport.value())[0], 414)

    def test_malformed_request_gets_400_with_a_body(self) -> None:
        wire = Wire(self)
        channel, transport = wire.connect()
        channel.dataReceived(b"GET /health HTTP/1.1\r\nno colon here\r\n\r\n")
        status, headers, body = parse(transport.value())
        self.assertEqual(status, 400)
        self.assertEqual(headers["server"], "mcptwist")
        self.assertEqual(jsonrpc.loads(body)["error"]["code"], jsonrpc.INVALID_REQUEST)

    def test_no_version_in_the_server_header(self) -> None:
        wire = Wire(self)
        answers = []
        for request in (
            b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            b"GET /nothing HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            b"GET /servers HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        ):
            channel, transport = wire.connect()
            channel.dataReceived(request)
            answers.append(parse(transport.value()))
        wire.app.metrics = Metrics().resource()
        metrics_site = wire.make_site(MetricsOnly(wire.app.metrics, wire.app))
        for path in (b"/metrics", b"/other"):
            channel, transport = wire.connect(site=metrics_site)
            channel.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answers.append(parse(transport.value()))
        self.assertEqual([a[0] for a in answers], [200, 401, 401, 200, 404])
        for _, headers, _ in answers:
            self.assertEqual(headers["server"], "mcptwist")


class Echo(Resource):
    """/slow waits to be answered; /echo answers with its body; others, their path."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Any] = []

    def render(self, request: Any) -> bytes | int:
        if request.path == b"/slow":
            self.waiting.append(request)
            return NOT_DONE_YET
        if request.path == b"/echo":
            return b"echo:" + request.content.read()
        return b"path:" + request.path


def answer(request: Any, body: bytes) -> None:
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()


def responses(data: bytes) -> list[tuple[int, bytes]]:
    """The (status, body) of each whole response in C{data}, in order."""
    found = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        status, headers, _ = parse(head + b"\r\n\r\n")
        length = int(headers.get("content-length", "0"))
        found.append((status, rest[:length]))
        data = rest[length:]
    return found


# Three requests as a client may pipeline them: a body by length, a chunked
# one, and one without a body.
PIPELINED = [
    b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n",
    b"GET /other?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
]
PIPELINED_ANSWERS = [(200, b"echo:hello"), (200, b"echo:abcdefg"), (200, b"path:/other")]


class ParserTests(SynchronousTestCase):
    """The C parser (llhttp) under the channel: what a client sends is read
    the same however it is split, pipelined requests wait their turn, and
    what llhttp refuses gets a JSON-RPC 400."""

    def wire(self) -> tuple[Echo, Any, StringTransport]:
        wire = Wire(self)
        resource = Echo()
        channel, transport = wire.connect(site=wire.make_site(resource))
        return resource, channel, transport

    @settings(max_examples=200, deadline=None)
    @given(cuts=st.lists(st.integers(0, sum(map(len, PIPELINED))), max_size=12))
    def test_requests_split_anywhere_are_read_the_same(self, cuts: list[int]) -> None:
        _, channel, transport = self.wire()
        data = b"".join(PIPELINED)
        start = 0
        for cut in sorted(set(cuts)):
            channel.dataReceived(data[start:cut])
            start = cut
        channel.dataReceived(data[start:])
        self.assertEqual(responses(transport.value()), PIPELINED_ANSWERS)
        self.assertFalse(transport.disconnecting)

    def test_pipelined_requests_wait_for_the_one_being_answered(self) -> None:
        resource, channel, transport = self.wire()
        slow = b"GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        channel.dataReceived(slow + b"".join(PIPELINED) + slow + PIPELINED[0][:30])
        self.assertEqual(transport.value(), b"")
        [first] = resource.waiting
        answer(first, b"slow done")
        answers = responses(transport.value())
        self.assertEqual(answers, [(200, b"slow done"), *PIPELINED_ANSWERS])
        # The second slow request waits in turn; the partial one after it too.
        second = resource.waiting[1]
        transport.clear()
        channel.dataReceived(PIPELINED[0][30:])
        self.assertEqual(transport.value(), b"")
        answer(second, b"again")
        self.assertEqual(responses(transport.value()), [(200, b"again"), (200, b"echo:hello")])

    def test_requests_sent_while_one_is_answered_wait_for_it(self) -> None:
        """A long answer (a stream) holds no parser; what the client sends
        meanwhile is read, and answered after it."""
        resource, channel, transport = self.wire()
        channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.assertIsNone(channel._parser)
        for piece in PIPELINED:
            channel.dataReceived(piece)
        self.assertEqual(transport.value(), b"")
        answer(resource.waiting[0], b"streamed")
        self.assertEqual(responses(transport.value()), [(200, b"streamed"), *PIPELINED_ANSWERS])

    def test_nothing_is_read_after_a_request_that_closes(self) -> None:
        _, channel, transport = self.wire()
        closing = b"GET /a HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        channel.dataReceived(closing + PIPELINED[2])
        self.assertEqual(responses(transport.value()), [(200, b"path:/a")])
        self.assertTrue(transport.disconnecting)

    def test_an_upgrade_not_taken_is_an_ordinary_request(self) -> None:
        """llhttp would take a body after an Upgrade header for the new
        protocol's; twisted.web's parser reads the request instead, and the
        connection goes on with it."""
        _, channel, transport = self.wire()
        upgrade = (
            b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nContent-Length: 4\r\n\r\nbody"
        )
        channel.dataReceived(upgrade + b"".join(PIPELINED))
        self.assertEqual(responses(transport.value()), [(200, b"echo:body"), *PIPELINED_ANSWERS])

    def test_what_llhttp_refuses_gets_a_json_rpc_400(self) -> None:
        for request in (
            b"GET /health\r\n\r\n",  # HTTP/0.9
            b"GET /health HTTP/1.1\nHost: 127.0.0.1\n\n",  # bare LF
            b"GET /health HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n",  # obsolete line folding
            b"GET /health HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"POST /health HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /health HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"BREW /health HTTP/1.1\r\n\r\n",
            b"GET /health HTTP/1.1\r\nX-A: a\x00b\r\n\r\n",
            b"GET /health HTTP/1.1\r\nX-A: a\x01b\r\n\r\n",
        ):
            wire = Wire(self)
            channel, transport = wire.connect()
            channel.dataReceived(request)
            status, headers, body = parse(transport.value())
            self.assertEqual((status, headers["connection"]), (400, "close"), request)
            self.assertEqual(jsonrpc.loads(body)["error"]["code"], jsonrpc.INVALID_REQUEST)

    def test_a_malformed_request_behind_a_slow_one_is_answered_after_it(self) -> None:
        resource, channel, transport = self.wire()
        channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /x\r\nX\r\n\r\n")
        self.assertEqual(transport.value(), b"")
        [slow] = resource.waiting
        answer(slow, b"first")
        answers = responses(transport.value())
        self.assertEqual([status for status, _ in answers], [200, 400])
        self.assertEqual(answers[0][1], b"first")


class UnreadTransport(StringTransport):
    """A connection whose client reads nothing: past C{size} unsent bytes it
    tells its producer to pause, as a real transport's full send buffer does."""

    size = 64 * 1024
    told = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if len(self.value()) > self.size and self.producer is not None and not self.told:
            self.told = True
            self.producer.pauseProducing()


class PipeliningTests(SynchronousTestCase):
    def test_a_client_that_reads_no_answers_is_read_no_more(self) -> None:
        """A client pipelining cheap requests without reading the answers is
        no longer read once the bridge cannot send: memory holds a bounded
        number of answers, not one per request it sends."""
        wire = Wire(self)
        address = IPv4Address("TCP", "192.0.2.1", 40000)
        channel = wire.site.buildProtocol(address)
        transport = UnreadTransport(peerAddress=address)
        channel.makeConnection(transport)
        health = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        refused = b"GET /servers/s/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        sent = 0
        # What a real transport does: it reads only while it is not paused.
        while transport.producerState != "paused" and sent < 20_000:
            channel.dataReceived((health + refused) * 50)
            sent += 100
        self.assertEqual(transport.producerState, "paused")
        self.assertLess(len(transport.value()), 1024 * 1024)
        self.assertLess(sent, 2_000)


class FinishUpTests(SynchronousTestCase):
    """A listener that stops closes its connections between requests, so
    that a proxy in front sends the next request on a new connection."""

    def test_idle_closed_busy_after_its_answer(self) -> None:
        wire = Wire(self)
        idle, idle_transport = wire.connect()
        busy, busy_transport = wire.connect("192.0.2.2")
        self.assertEqual(wire.site.channels, {idle, busy})
        # A request under way: its head arrived, its body has not.
        busy.dataReceived(post_head("/health", 10).replace(b"POST", b"GET", 1))
        self.assertEqual(len(busy.requests), 1)
        wire.site.finish_up()
        self.assertTrue(idle_transport.disconnecting, "idle: closed at once")
        self.assertFalse(busy_transport.disconnecting, "busy: its request goes on")
        busy.dataReceived(b"x" * 10)
        self.assertEqual(parse(busy_transport.value())[0], 200)
        self.assertTrue(busy_transport.disconnecting, "closed once answered")
        idle.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(wire.site.channels, {busy})


class OneWriteTests(SynchronousTestCase):
    def test_a_head_goes_out_with_its_body(self) -> None:
        """One write for a response: its head is held for the body's first bytes."""
        wire = Wire(self)
        channel, transport = wire.connect()
        writes: list[bytes] = []
        own = transport.write

        def write(data: bytes) -> None:
            writes.append(data)
            own(data)

        transport.write = write  # type: ignore[method-assign]
        body = jsonrpc.dumps(INIT)
        channel.dataReceived(post_head("/servers/s/mcp", len(body), TOKEN) + body)
        self.assertEqual(len(writes), 1)
        status, headers, answer = parse(writes[0])
        self.assertEqual((status, int(headers["content-length"])), (200, len(answer)))
        self.assertEqual(headers["server"], "mcptwist")
        self.assertRegex(headers["date"], r"^\w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} GMT$")
        self.assertEqual(jsonrpc.loads(answer)["id"], INIT["id"])
        # A response without a body: its head goes out when it is done.
        writes.clear()
        head = b"HEAD /servers/s/nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        channel.dataReceived(head + f"Authorization: Bearer {TOKEN}\r\n\r\n".encode())
        self.assertEqual(len(writes), 1)
        self.assertEqual(parse(writes[0])[0], 404)
