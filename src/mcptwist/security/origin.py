# -*- test-case-name: tests.test_security -*-
"""Who may talk to the bridge: Origin allow-list and the loopback rule."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

from mcptwist.config.model import LOOPBACK_HOSTS


class OriginPolicy:
    """An allow-list of origins; C{scheme://host:*} allows any port of a host."""

    def __init__(self, allowed: Iterable[str]) -> None:
        self._exact: set[str] = set()
        self._any_port: set[tuple[str, str]] = set()
        for origin in allowed:
            if origin.endswith(":*"):
                scheme, _, host = origin[:-2].partition("://")
                self._any_port.add((scheme.lower(), host.lower()))
            else:
                self._exact.add(_normalise(origin))

    def allows(self, origin: str | None) -> bool:
        """Whether a request with this Origin header may proceed (absent: yes)."""
        if origin is None:
            return True
        normal = _normalise(origin)
        if normal in self._exact:
            return True
        try:
            parts = urlsplit(normal)
            host = parts.hostname or ""
            if ":" in host:
                host = f"[{host}]"
            return (parts.scheme, host) in self._any_port
        except ValueError:
            return False


def same_origin(origin: str, host: str | None, secure: bool, hosts: HostPolicy) -> bool:
    """Whether C{origin} is the bridge's own: the scheme and C{Host} the
    request was sent to, where that host is a loopback name or one that
    C{hosts} lists by name. The bridge's only page is its own dashboard, so
    no other page of such an origin exists to misuse it (the MCP conformance
    suite requires these requests to be served; under C{/admin/} it is the
    only Origin served). A name matched only by C{"*"} does not count: a
    DNS-rebound page has its own name in both headers."""
    if host is None or not hosts.names(host):
        return False
    return own_origin(origin, host, secure)


def own_origin(origin: str, host: str | None, secure: bool) -> bool:
    """Whether C{origin} is exactly the scheme and C{Host} the request was
    sent to, whatever that name (for credentials a browser keeps per
    origin: a page that rebinds its own name to the bridge gets none)."""
    if host is None:
        return False
    return _normalise(origin) == _normalise(f"{'https' if secure else 'http'}://{host}")


class HostPolicy:
    """Host names the bridge answers to; C{*} allows any.

    A web page that rebinds its own name to 127.0.0.1 sends its own name in
    C{Host}, so checking it stops DNS rebinding even where a browser sends
    no C{Origin} (same-origin GETs).
    """

    def __init__(self, allowed: Iterable[str]) -> None:
        self._allowed = {h.lower() for h in allowed}
        self._any = "*" in self._allowed

    def allows(self, host: str | None) -> bool:
        if self._any or host is None:
            return True
        return host_name(host) in self._allowed

    def names(self, host: str) -> bool:
        """Whether C{host} is a loopback name or one listed (not by C{"*"})."""
        name = host_name(host)
        return name in LOOPBACK_HOSTS or name in self._allowed


def host_name(header: str) -> str:
    """The host of a C{Host} header, without port or IPv6 brackets."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    if header.count(":") == 1:
        return header.split(":", 1)[0]
    return header


def _normalise(origin: str) -> str:
    origin = origin.strip().lower().rstrip("/")
    for scheme, port in (("http://", ":80"), ("https://", ":443")):
        if origin.startswith(scheme) and origin.endswith(port):
            return origin[: -len(port)]
    return origin


@functools.lru_cache(maxsize=4096)
def is_local_ip(ip: str | None) -> bool:
    """True for a loopback IP, or None (a Unix-socket peer): a client on this host.

    Cached: it is asked for every request, and parsing an address costs more
    than the rest of the check."""
    if ip is None:
        return True
    try:
        parsed = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(parsed, "ipv4_mapped", None)
    return bool((mapped or parsed).is_loopback)


def is_local_address(address: object) -> bool:
    """True for a loopback IP or a Unix socket: reachable from this host only."""
    if isinstance(address, UNIXAddress):
        return True
    if isinstance(address, IPv4Address | IPv6Address):
        return is_local_ip(address.host)
    return False
