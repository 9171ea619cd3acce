"""Origin and Host policies, and which addresses count as local."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.config.model import DEFAULT_ORIGINS, LOOPBACK_HOSTS
from mcptwist.security.origin import (
    HostPolicy,
    OriginPolicy,
    host_name,
    is_local_address,
    same_origin,
)


class OriginTests(SynchronousTestCase):
    def test_default_allows_no_origin(self) -> None:
        """Only clients that send no Origin (not browsers): any local page
        could otherwise drive an unauthenticated loopback bridge."""
        policy = OriginPolicy(DEFAULT_ORIGINS)
        self.assertTrue(policy.allows(None))
        for origin in (
            "http://localhost:6274",
            "http://127.0.0.1",
            "https://[::1]:8443",
            "HTTP://LOCALHOST:3000",
            "http://evil.example.com",
            "null",
            "file://",
        ):
            self.assertFalse(policy.allows(origin), origin)

    def test_same_origin(self) -> None:
        """The bridge's own origin: the scheme and Host the request was sent
        to, for a loopback name or one listed by name, never one matched by "*"."""
        hosts = HostPolicy(["*"])
        self.assertTrue(same_origin("http://localhost:8080", "localhost:8080", False, hosts))
        self.assertTrue(same_origin("HTTP://LocalHost:8080/", "localhost:8080", False, hosts))
        self.assertTrue(same_origin("https://[::1]", "[::1]:443", True, hosts))
        self.assertTrue(same_origin("http://127.0.0.1", "127.0.0.1:80", False, hosts))
        self.assertFalse(same_origin("http://localhost:3000", "localhost:8080", False, hosts))
        self.assertFalse(same_origin("https://localhost:8080", "localhost:8080", False, hosts))
        self.assertFalse(same_origin("http://evil.example:8080", "localhost:8080", False, hosts))
        self.assertFalse(same_origin("http://localhost:8080", None, False, hosts))
        # A DNS-rebound page has its own name in both headers: "*" is not a name.
        rebound = ("http://evil.example:8080", "evil.example:8080", False)
        self.assertFalse(same_origin(*rebound, hosts))
        self.assertTrue(same_origin(*rebound, HostPolicy(["evil.example"])))

    def test_loopback_any_port(self) -> None:
        policy = OriginPolicy(["http://localhost:*", "https://[::1]:*"])
        for origin in ("http://localhost:6274", "HTTP://LOCALHOST:3000", "https://[::1]:8443"):
            self.assertTrue(policy.allows(origin), origin)
        for origin in (
            "http://evil.example.com",
            "http://localhost.evil.com",
            "https://localhost:1",
            "http://127.0.0.1:80",
        ):
            self.assertFalse(policy.allows(origin), origin)

    def test_exact_origins_and_default_ports(self) -> None:
        policy = OriginPolicy(["https://app.example.com", "http://dev.local:8080"])
        self.assertTrue(policy.allows("https://app.example.com"))
        self.assertTrue(policy.allows("https://app.example.com:443"))
        self.assertTrue(policy.allows("https://app.example.com/"))
        self.assertFalse(policy.allows("http://app.example.com"))
        self.assertTrue(policy.allows("http://dev.local:8080"))
        self.assertFalse(policy.allows("http://dev.local:8081"))


class HostTests(SynchronousTestCase):
    def test_loopback_names_with_any_port(self) -> None:
        policy = HostPolicy(LOOPBACK_HOSTS)
        for host in (None, "localhost", "localhost:8080", "127.0.0.1:1", "[::1]:8080", "LOCALHOST"):
            self.assertTrue(policy.allows(host), host)
        for host in ("evil.example.com", "evil.example.com:8080", "127.0.0.1.nip.io", "[::2]"):
            self.assertFalse(policy.allows(host), host)

    def test_star_allows_any(self) -> None:
        self.assertTrue(HostPolicy(["*"]).allows("anything.example:1"))

    @given(
        st.from_regex(r"\A[a-z0-9-]{1,20}(\.[a-z0-9-]{1,10}){0,3}\Z"),
        st.integers(min_value=1, max_value=65535),
    )
    def test_port_never_changes_the_name(self, name: str, port: int) -> None:
        self.assertEqual(host_name(f"{name}:{port}"), name)
        self.assertEqual(host_name(name), name)


class LocalAddressTests(SynchronousTestCase):
    @given(st.ip_addresses(v=4))
    def test_ipv4_and_mapped(self, ip: ipaddress.IPv4Address) -> None:
        expected = ip.is_loopback
        self.assertEqual(is_local_address(IPv4Address("TCP", str(ip), 1)), expected)
        self.assertEqual(is_local_address(IPv6Address("TCP", f"::ffff:{ip}", 1)), expected)

    def test_others(self) -> None:
        self.assertTrue(is_local_address(UNIXAddress("/tmp/s")))
        self.assertTrue(is_local_address(IPv6Address("TCP", "::1", 1)))
        self.assertFalse(is_local_address(IPv6Address("TCP", "::", 1)))
        self.assertFalse(is_local_address(IPv4Address("TCP", "0.0.0.0", 1)))
        self.assertFalse(is_local_address(object()))
