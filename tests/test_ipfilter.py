"""Connection-level address filtering, PROXY protocol and X-Forwarded-For."""

from __future__ import annotations

import ipaddress
import socket
import ssl
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import endpoints, reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from mcptwist.config.model import ListenerConfig, Network
from mcptwist.config.networks import normalise, parse_ip, parse_networks
from mcptwist.security.ipfilter import (
    AddressPolicy,
    IPFilterFactory,
    ProxyOrPolicy,
    forwarded_client,
    listening_factory,
)
from mcptwist.security.tls import ReloadableTLS
from tests.support.tls import cert_dir, client_context, listen, make_site, run


def nets(*values: str) -> tuple[Network, ...]:
    return parse_networks(values)


def mapped(ip: ipaddress.IPv4Address) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(f"::ffff:{ip}")


ipv4_networks = st.builds(
    lambda ip, prefix: ipaddress.IPv4Network((ip, prefix), strict=False),
    st.ip_addresses(v=4),
    st.integers(0, 32),
)


class NormaliseTests(SynchronousTestCase):
    @given(st.ip_addresses(v=4))
    def test_mapped_becomes_ipv4(self, ip: ipaddress.IPv4Address) -> None:
        self.assertEqual(normalise(mapped(ip)), ip)
        self.assertEqual(normalise(ip), ip)

    @given(st.ip_addresses(v=6))
    def test_other_ipv6_unchanged(self, ip: ipaddress.IPv6Address) -> None:
        if ip.ipv4_mapped is None:
            self.assertEqual(normalise(ip), ip)

    def test_zone_ids(self) -> None:
        self.assertEqual(parse_ip("fe80::1%eth0"), ipaddress.IPv6Address("fe80::1"))
        self.assertEqual(str(normalise(ipaddress.IPv6Address("fe80::1%2"))), "fe80::1")
        self.assertEqual(parse_ip(" ::ffff:10.1.2.3 "), ipaddress.IPv4Address("10.1.2.3"))
        for garbage in ("", "unknown", "1.2.3", "::g", "10.0.0.0/8"):
            self.assertRaises(ValueError, parse_ip, garbage)


class ParseNetworksTests(SynchronousTestCase):
    def test_forms(self) -> None:
        self.assertEqual(
            parse_networks(["10.0.0.0/8", "::1", "192.168.1.7", " 2001:db8::/32 "]),
            (
                ipaddress.IPv4Network("10.0.0.0/8"),
                ipaddress.IPv6Network("::1/128"),
                ipaddress.IPv4Network("192.168.1.7/32"),
                ipaddress.IPv6Network("2001:db8::/32"),
            ),
        )

    def test_zone_ids_are_dropped(self) -> None:
        self.assertEqual(
            parse_networks(["fe80::1%eth0/64", "fe80::2%3"]),
            (ipaddress.IPv6Network("fe80::/64"), ipaddress.IPv6Network("fe80::2/128")),
        )
        self.assertEqual(str(parse_networks(["fe80::2%3"])[0]), "fe80::2/128")

    def test_host_bits_are_ignored(self) -> None:
        self.assertEqual(parse_networks(["10.1.2.3/8"]), (ipaddress.IPv4Network("10.0.0.0/8"),))

    def test_mapped_networks_become_ipv4(self) -> None:
        self.assertEqual(
            parse_networks(["::ffff:10.0.0.0/104", "::ffff:192.0.2.7"]),
            (ipaddress.IPv4Network("10.0.0.0/8"), ipaddress.IPv4Network("192.0.2.7/32")),
        )

    def test_errors_name_the_value(self) -> None:
        for bad in ("10.0.0.0/33", "example.com", "", "1.2.3.4/8/8", "10.0.0.0/8%x"):
            error = self.assertRaises(ValueError, parse_networks, ["10.0.0.0/8", bad])
            self.assertIn(repr(bad), str(error))

    @given(st.lists(ipv4_networks | st.ip_addresses(v=6).map(ipaddress.ip_network)))
    def test_round_trip(self, networks: list[Network]) -> None:
        expected = tuple(
            ipaddress.IPv4Network((n.network_address.ipv4_mapped, n.prefixlen - 96))
            if isinstance(n, ipaddress.IPv6Network) and n.network_address.ipv4_mapped
            else n
            for n in networks
        )
        self.assertEqual(parse_networks(str(n) for n in networks), expected)


class AddressPolicyTests(SynchronousTestCase):
    def test_deny_wins_and_empty_allow_allows(self) -> None:
        policy = AddressPolicy(allow=nets("10.0.0.0/8"), deny=nets("10.6.0.0/16"))
        self.assertTrue(policy.allows_ip("10.1.2.3"))
        self.assertFalse(policy.allows_ip("10.6.0.1"))
        self.assertFalse(policy.allows_ip("192.0.2.1"))
        everyone_but = AddressPolicy(deny=nets("192.0.2.0/24"))
        self.assertTrue(everyone_but.allows_ip("198.51.100.1"))
        self.assertTrue(everyone_but.allows_ip("::1"))
        self.assertFalse(everyone_but.allows_ip("192.0.2.9"))
        self.assertTrue(AddressPolicy().allows_ip("2001:db8::1"))

    def test_garbage_is_refused(self) -> None:
        self.assertFalse(AddressPolicy().allows_ip("not an ip"))
        self.assertFalse(AddressPolicy().allows(IPv4Address("TCP", "bogus", 1)))

    def test_twisted_addresses(self) -> None:
        policy = AddressPolicy(allow=nets("127.0.0.0/8", "::1"))
        self.assertTrue(policy.allows(IPv4Address("TCP", "127.0.0.1", 1234)))
        self.assertTrue(policy.allows(IPv6Address("TCP", "::1", 1234)))
        self.assertTrue(policy.allows(IPv6Address("TCP", "::ffff:127.0.0.2", 1234)))
        self.assertTrue(policy.allows(IPv6Address("TCP", "::1", 1234, scopeID=0)))
        self.assertFalse(policy.allows(IPv6Address("TCP", "::2", 1234)))
        self.assertFalse(policy.allows(IPv4Address("TCP", "10.0.0.1", 1234)))

    def test_unix_peers(self) -> None:
        for address in (UNIXAddress(b"/run/x.sock"), UNIXAddress(None), object()):
            self.assertTrue(AddressPolicy(allow=nets("10.0.0.0/8")).allows(address))
            self.assertFalse(AddressPolicy(unix_peers="deny").allows(address))
        self.assertRaises(ValueError, AddressPolicy, unix_peers="maybe")

    def test_from_listener(self) -> None:
        cfg = ListenerConfig(
            "tcp:0",
            allow=nets("10.0.0.0/8"),
            deny=nets("10.1.0.0/16"),
            trusted_proxies=nets("192.0.2.1"),
            unix_peers="deny",
        )
        self.assertEqual(
            AddressPolicy.from_listener(cfg),
            AddressPolicy(allow=nets("10.0.0.0/8"), deny=nets("10.1.0.0/16"), unix_peers="deny"),
        )

    def test_mapped_rules_are_normalised(self) -> None:
        """A rule written in mapped form matches plain IPv4 peers too."""
        policy = AddressPolicy(allow=(ipaddress.IPv6Network("::ffff:10.0.0.0/104"),))
        self.assertTrue(policy.allows_ip("10.9.9.9"))
        self.assertTrue(policy.allows_ip(mapped(ipaddress.IPv4Address("10.9.9.9"))))

    @given(st.ip_addresses(v=4), ipv4_networks)
    def test_ipv4_rules_match_mapped_peers(
        self, ip: ipaddress.IPv4Address, network: ipaddress.IPv4Network
    ) -> None:
        inside = ip in network
        allow = AddressPolicy(allow=(network,))
        deny = AddressPolicy(deny=(network,))
        for form in (ip, mapped(ip), str(ip), str(mapped(ip))):
            self.assertEqual(allow.allows_ip(form), inside)
            self.assertEqual(deny.allows_ip(form), not inside)
        peer = IPv6Address("TCP", str(mapped(ip)), 1)
        self.assertEqual(allow.allows(peer), inside)

    @given(st.ip_addresses(), st.lists(ipv4_networks), st.lists(ipv4_networks))
    def test_deny_always_wins(self, ip: Any, allow: list[Network], deny: list[Network]) -> None:
        policy = AddressPolicy(allow=tuple(allow), deny=tuple(deny))
        ip = normalise(ip)
        expected = not any(ip in n for n in deny) and (not allow or any(ip in n for n in allow))
        self.assertEqual(policy.allows_ip(ip), expected)

    def test_trusted_proxies_bypass(self) -> None:
        policy = ProxyOrPolicy(nets("192.0.2.1"), AddressPolicy(allow=nets("10.0.0.0/8")))
        self.assertTrue(policy.allows(IPv4Address("TCP", "192.0.2.1", 1)))
        self.assertTrue(policy.allows(IPv6Address("TCP", "::ffff:192.0.2.1", 1)))
        self.assertTrue(policy.allows(IPv4Address("TCP", "10.0.0.1", 1)))
        self.assertFalse(policy.allows(IPv4Address("TCP", "192.0.2.2", 1)))
        self.assertTrue(policy.allows(UNIXAddress(None)))


class ForwardedClientTests(SynchronousTestCase):
    trusted = nets("10.0.0.0/8", "2001:db8::/32")

    def client(self, peer: str | None, *values: str) -> str | None:
        return forwarded_client(peer, list(values), self.trusted)

    def test_untrusted_peer_ignores_the_header(self) -> None:
        self.assertEqual(self.client("192.0.2.1", "198.51.100.7"), "192.0.2.1")
        self.assertEqual(self.client("::ffff:192.0.2.1", "198.51.100.7"), "192.0.2.1")

    def test_walks_from_the_right_past_trusted_proxies(self) -> None:
        self.assertEqual(self.client("10.0.0.1", "198.51.100.7"), "198.51.100.7")
        self.assertEqual(
            self.client("10.0.0.1", "203.0.113.9, 198.51.100.7, 10.0.0.2"), "198.51.100.7"
        )
        self.assertEqual(
            self.client("10.0.0.1", "203.0.113.9", "198.51.100.7,10.0.0.3", "10.0.0.2"),
            "198.51.100.7",
        )
        self.assertEqual(self.client("2001:db8::1", "2001:db8::2, ::ffff:192.0.2.5"), "192.0.2.5")

    def test_all_trusted_gives_the_leftmost(self) -> None:
        self.assertEqual(self.client("10.0.0.1", "10.0.0.3, 10.0.0.2"), "10.0.0.3")

    def test_no_header_gives_the_peer(self) -> None:
        self.assertEqual(self.client("10.0.0.1"), "10.0.0.1")
        self.assertEqual(self.client("10.0.0.1", "", " , "), "10.0.0.1")

    def test_ports_brackets_and_zones(self) -> None:
        for hop, expected in (
            ("198.51.100.7:5678", "198.51.100.7"),
            ("[2001:db9::1]:80", "2001:db9::1"),
            ("[2001:db9::1]", "2001:db9::1"),
            ("fe80::1%eth0", "fe80::1"),
            (" 198.51.100.7 ", "198.51.100.7"),
        ):
            self.assertEqual(self.client("10.0.0.1", hop), expected, hop)

    def test_garbage_stops_the_walk(self) -> None:
        """The last good address right of the garbage is the answer."""
        for chain, expected in (
            ("unknown", "10.0.0.1"),
            ("198.51.100.7, unknown", "10.0.0.1"),
            ("198.51.100.7, unknown, 10.0.0.2", "10.0.0.2"),
            ("198.51.100.7, 1.2.3.4:http, 10.0.0.2", "10.0.0.2"),
            ("[::1]x, 10.0.0.2", "10.0.0.2"),
            ("[::1, 10.0.0.2", "10.0.0.2"),
            ("203.0.113.1, garbage, 198.51.100.7", "198.51.100.7"),
        ):
            self.assertEqual(self.client("10.0.0.1", chain), expected, chain)

    def test_no_peer(self) -> None:
        self.assertIsNone(self.client(None, "198.51.100.7"))
        self.assertEqual(self.client("bogus", "198.51.100.7"), "bogus")

    @given(st.sampled_from(["10.0.0.1", "192.0.2.1", "::1", "2001:db8::5"]), st.lists(st.text()))
    def test_never_raises(self, peer: str, values: list[str]) -> None:
        """Any header content gives the peer or an address from the header."""
        result = self.client(peer, *values)
        assert result is not None
        ipaddress.ip_address(result)
        if not AddressPolicy(allow=self.trusted).allows_ip(peer):
            self.assertEqual(result, peer)

    @given(st.lists(st.ip_addresses(), min_size=1), st.ip_addresses())
    def test_first_untrusted_from_the_right(self, hops: list[Any], peer: Any) -> None:
        trusted = self.trusted
        chain = ", ".join(f"[{h}]:1" if h.version == 6 else str(h) for h in hops)
        result = forwarded_client(str(peer), [chain], trusted)

        def is_trusted(ip: Any) -> bool:
            return any(normalise(ip) in n for n in trusted)

        if not is_trusted(peer):
            expected = normalise(peer)
        else:
            untrusted = [h for h in hops if not is_trusted(h)]
            expected = normalise(untrusted[-1] if untrusted else hops[0])
        self.assertEqual(result, str(expected))


class FilterFactoryTests(SynchronousTestCase):
    def test_refused_peer_gets_no_protocol(self) -> None:
        refused: list[IAddress] = []
        factory = IPFilterFactory(
            Factory.forProtocol(Protocol), AddressPolicy(deny=nets("10.0.0.0/8")), refused.append
        )
        denied = IPv4Address("TCP", "10.0.0.1", 1)
        self.assertIsNone(factory.buildProtocol(denied))
        self.assertEqual(refused, [denied])
        self.assertIsInstance(factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1)), Protocol)
        self.assertEqual(refused, [denied])

    def test_delegates_to_the_wrapped_factory(self) -> None:
        site = make_site()
        factory = IPFilterFactory(site, AddressPolicy())
        self.assertEqual(factory.logPrefix(), "Site")
        self.assertIs(factory.noisy, site.noisy)
        factory.doStart()
        self.assertEqual(site.numPorts, 1)
        factory.doStop()
        self.assertEqual(site.numPorts, 0)
        plain = IPFilterFactory(Factory.forProtocol(Protocol), AddressPolicy())
        self.assertEqual(plain.logPrefix(), "Factory")

    def test_proxy_protocol_needs_trusted_proxies(self) -> None:
        cfg = ListenerConfig("tcp:0", proxy_protocol=True)
        error = self.assertRaises(ValueError, listening_factory, cfg, make_site(), None)
        self.assertIn("trusted_proxies", str(error))


def exchange(family: int, host: str, port: int, payload: bytes) -> bytes:
    """Send C{payload}, read until the server closes; b"" if it reset."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect((host, port))
        received = b""
        try:
            s.sendall(payload)
            while chunk := s.recv(65536):
                received += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
        return received


def http_get(family: int, host: str, port: int, prefix: bytes = b"") -> bytes:
    """The body of C{GET /} (HTTP/1.0, so the server closes), or b"" if refused."""
    answer = exchange(family, host, port, prefix + b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    return body if head.startswith((b"HTTP/1.0 200 ", b"HTTP/1.1 200 ")) else answer


def proxied_https_get(port: int, header: bytes, ctx: ssl.SSLContext) -> bytes:
    """Send a PROXY header, then GET / over TLS; the body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(header)
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
    return answer.partition(b"\r\n\r\n")[2]


V4 = socket.AF_INET
PROXY_V1 = b"PROXY TCP4 203.0.113.7 127.0.0.1 56324 443\r\n"


class SocketTests(TestCase):
    timeout = 30

    async def serve(self, cfg: ListenerConfig, endpoint: Any = None, creator: Any = None) -> int:
        self.refused: list[IAddress] = []
        factory = listening_factory(cfg, make_site(), creator, self.refused.append)
        return await listen(self, factory, endpoint)

    async def test_allowed_client_gets_an_answer(self) -> None:
        port = await self.serve(ListenerConfig("tcp:0", allow=nets("127.0.0.1")))
        self.assertEqual(await run(http_get, V4, "127.0.0.1", port), b"127.0.0.1 http")
        self.assertEqual(self.refused, [])

    async def test_refused_client_sees_the_connection_closed(self) -> None:
        port = await self.serve(ListenerConfig("tcp:0", deny=nets("127.0.0.0/8")))
        self.assertEqual(await run(http_get, V4, "127.0.0.1", port), b"")
        [address] = self.refused
        self.assertIsInstance(address, IPv4Address)
        self.assertEqual(address.host, "127.0.0.1")  # type: ignore[attr-defined]

    async def test_ipv6_loopback(self) -> None:
        if not socket.has_ipv6:
            raise SkipTest("no IPv6 in this Python")

        async def listen6(cfg: ListenerConfig) -> int:
            endpoint = endpoints.TCP6ServerEndpoint(reactor, 0, interface="::1")
            try:
                return await self.serve(cfg, endpoint)
            except CannotListenError as e:
                raise SkipTest(f"cannot listen on ::1 ({e})") from None

        port = await listen6(ListenerConfig("tcp6:0", allow=nets("::1")))
        self.assertEqual(await run(http_get, socket.AF_INET6, "::1", port), b"::1 http")
        port = await listen6(ListenerConfig("tcp6:0", allow=nets("127.0.0.1"), deny=nets("::1")))
        self.assertEqual(await run(http_get, socket.AF_INET6, "::1", port), b"")
        self.assertEqual([a.host for a in self.refused], ["::1"])  # type: ignore[attr-defined]

    async def test_dual_stack_peer_matches_ipv4_rules(self) -> None:
        """On a [::] socket an IPv4 client is ::ffff:127.0.0.1, and IPv4 rules apply."""
        if not socket.has_ipv6:
            raise SkipTest("no IPv6 in this Python")

        async def listen_any(cfg: ListenerConfig) -> int:
            endpoint = endpoints.TCP6ServerEndpoint(reactor, 0, interface="::")
            try:
                return await self.serve(cfg, endpoint)
            except CannotListenError as e:
                raise SkipTest(f"cannot listen on [::] ({e})") from None

        port = await listen_any(ListenerConfig("tcp6:0", allow=nets("127.0.0.1")))
        body = await run(http_get, V4, "127.0.0.1", port)
        self.assertEqual(body, b"::ffff:127.0.0.1 http")
        port = await listen_any(ListenerConfig("tcp6:0", deny=nets("127.0.0.0/8")))
        self.assertEqual(await run(http_get, V4, "127.0.0.1", port), b"")
        self.assertEqual(
            [a.host for a in self.refused],  # type: ignore[attr-defined]
            ["::ffff:127.0.0.1"],
        )

    async def test_proxy_protocol_from_a_trusted_proxy(self) -> None:
        cfg = ListenerConfig(
            "tcp:0", trusted_proxies=nets("127.0.0.1"), proxy_protocol=True, deny=nets("127.0.0.1")
        )
        port = await self.serve(cfg)
        self.assertEqual(await run(http_get, V4, "127.0.0.1", port, PROXY_V1), b"203.0.113.7 http")
        self.assertEqual(self.refused, [])

    async def test_proxy_protocol_client_is_filtered(self) -> None:
        cfg = ListenerConfig(
            "tcp:0",
            trusted_proxies=nets("127.0.0.1"),
            proxy_protocol=True,
            deny=nets("203.0.113.0/24"),
        )
        port = await self.serve(cfg)
        self.assertEqual(await run(http_get, V4, "127.0.0.1", port, PROXY_V1), b"")
        self.assertEqual([a.host for a in self.refused], ["203.0.113.7"])  # type: ignore[attr-defined]

    async def test_proxy_protocol_from_an_untrusted_peer(self) -> None:
        cfg = ListenerConfig("tcp:0", trusted_proxies=nets("10.0.0.0/8"), proxy_protocol=True)
        port = await self.serve(cfg)
        self.assertEqual(await run(http_get, V4, "127.0.0.1", port, PROXY_V1), b"")
        self.assertEqual([a.host for a in self.refused], ["127.0.0.1"])  # type: ignore[attr-defined]

    async def test_proxy_protocol_without_a_header(self) -> None:
        cfg = ListenerConfig("tcp:0", trusted_proxies=nets("127.0.0.1"), proxy_protocol=True)
        port = await self.serve(cfg)
        self.assertEqual(await run(http_get, V4, "127.0.0.1", port), b"")

    async def test_proxy_protocol_with_tls(self) -> None:
        certs = cert_dir(self)
        creator = ReloadableTLS(certs.config())
        cfg = ListenerConfig(
            "tcp:0", tls=certs.config(), trusted_proxies=nets("127.0.0.1"), proxy_protocol=True
        )
        port = await self.serve(cfg, creator=creator)
        body = await run(proxied_https_get, port, PROXY_V1, client_context(certs.ca))
        self.assertEqual(body, b"203.0.113.7 https")

    async def test_trusted_proxy_passes_a_client_filter(self) -> None:
        """Without PROXY protocol a trusted proxy connects despite allow/deny."""
        cfg = ListenerConfig("tcp:0", deny=nets("127.0.0.0/8"), trusted_proxies=nets("127.0.0.1"))
        port = await self.serve(cfg)
        self.assertEqual(await run(http_get, V4, "127.0.0.1", port), b"127.0.0.1 http")
