# -*- test-case-name: tests.test_security -*-
"""Who may talk to the bridge: Origin allow-list and the loopback rule."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress


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


def _normalise(origin: str) -> str:
    origin = origin.strip().lower().rstrip("/")
    for scheme, port in (("http://", ":80"), ("https://", ":443")):
        if origin.startswith(scheme) and origin.endswith(port):
            return origin[: -len(port)]
    return origin


def is_local_address(address: object) -> bool:
    """True for a loopback IP or a Unix socket: reachable from this host only."""
    if isinstance(address, UNIXAddress):
        return True
    if isinstance(address, IPv4Address | IPv6Address):
        host = address.host.split("%", 1)[0]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        mapped = getattr(ip, "ipv4_mapped", None)
        return bool((mapped or ip).is_loopback)
    return False
