# -*- test-case-name: tests.test_ipfilter -*-
"""IP addresses and networks as the configuration writes them, normalised the
way every rule compares them."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Final

from .model import Network

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


_MAPPED: Final = ipaddress.IPv6Network("::ffff:0:0/96")


_ZONE: Final = re.compile(r"%[^/]*")


def normalise(ip: IPAddress) -> IPAddress:
    """C{ip} as compared with rules: IPv4-mapped IPv6 becomes IPv4, zone ids go."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.scope_id is not None:
            return ipaddress.IPv6Address(int(ip))
    return ip


def parse_ip(text: str) -> IPAddress:
    """Parse an address, dropping an IPv6 zone id (C{fe80::1%eth0}), normalised.

    @raise ValueError: if C{text} is not an IP address.
    """
    return normalise(ipaddress.ip_address(text.strip().split("%", 1)[0]))


def _normalise_network(network: Network) -> Network:
    """An IPv4-mapped IPv6 network (C{::ffff:10.0.0.0/104}) as the IPv4 one."""
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """Parse addresses and networks: C{10.0.0.0/8}, C{::1}, C{192.168.1.7}.

    A bare address is a one-address network (/32 or /128). Host bits after
    the prefix are ignored (C{10.1.2.3/8} is C{10.0.0.0/8}), as people write
    an address of the network they mean. IPv4-mapped IPv6 networks become
    IPv4 ones; IPv6 zone ids are dropped.

    @raise ValueError: naming the first value that is neither.
    """
    networks = []
    for value in values:
        # A zone id (fe80::%eth0/64) means nothing to a filter: drop it.
        text = value.strip()
        if ":" in text:
            text = _ZONE.sub("", text, count=1)
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(
                f"{value!r} is not an IP address or network "
                '(write "10.0.0.0/8", "2001:db8::/32" or "192.0.2.7")'
            ) from None
        networks.append(_normalise_network(network))
    return tuple(networks)
