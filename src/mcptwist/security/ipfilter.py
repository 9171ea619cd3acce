# -*- test-case-name: tests.test_ipfilter -*-
"""Which peers may connect: allow/deny networks, PROXY protocol, X-Forwarded-For.

The connection-level filter (L{IPFilterFactory}) sits outermost, before TLS,
so that a refused peer is closed at accept and costs no handshake. The stack
a listener serves is built by L{listening_factory}::

    IPFilterFactory( [PROXY header] ( [TLS] ( site )))

Addresses are compared after L{normalise}: a dual-stack socket reports an
IPv4 client as C{::ffff:a.b.c.d}, and an IPv4 rule must still match it.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterable
from typing import Any, Final, Protocol

import attrs
from twisted.internet.interfaces import (
    IAddress,
    ILoggingContext,
    IOpenSSLServerConnectionCreator,
    IProtocol,
    IProtocolFactory,
)
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from zope.interface import implementer

from mcptwist.config.model import ListenerConfig, Network
from mcptwist.config.networks import IPAddress, _normalise_network, normalise, parse_ip

OnRefused = Callable[[IAddress], None]
UNIX_POLICIES: Final = ("allow", "deny")


@functools.lru_cache(maxsize=4096)
def rate_key(ip: str | None) -> str | None:
    """The client an address stands for, for rate limits and for coalescing
    refusals in the audit trail: None for a loopback or Unix peer (a local
    user or a proxy: limiting it would throttle everyone behind it), the /64
    for IPv6 (one host usually holds a whole /64), else the address."""
    if ip is None:
        return None
    try:
        address = parse_ip(ip)
    except ValueError:
        return ip
    if address.is_loopback:
        return None
    if address.version == 6:
        return str(ipaddress.ip_network((address, 64), strict=False))
    return str(address)


def _networks(values: Iterable[Network]) -> tuple[Network, ...]:
    return tuple(_normalise_network(n) for n in values)


def _in_any(ip: IPAddress, networks: tuple[Network, ...]) -> bool:
    # "in" is False, not an error, when the IP versions differ.
    return any(ip in network for network in networks)


class PeerPolicy(Protocol):
    """Anything that decides on a Twisted address."""

    def allows(self, address: object) -> bool: ...


@attrs.frozen
class AddressPolicy:
    """Allow and deny networks, and what to do with Unix-socket peers.

    Deny wins over allow; an empty allow list allows everything not denied.
    Unix-socket peers have no address: C{unix_peers} ("allow" or "deny")
    decides for them, and file permissions are the real gate there.
    """

    allow: tuple[Network, ...] = attrs.field(default=(), converter=_networks)
    deny: tuple[Network, ...] = attrs.field(default=(), converter=_networks)
    unix_peers: str = attrs.field(default="allow", validator=attrs.validators.in_(UNIX_POLICIES))

    @classmethod
    def from_listener(cls, cfg: ListenerConfig) -> AddressPolicy:
        """The client policy of a listener (its proxies are not part of it)."""
        return cls(allow=cfg.allow, deny=cfg.deny, unix_peers=cfg.unix_peers)

    def allows_ip(self, ip: IPAddress | str) -> bool:
        """Whether an IP may connect; a string that is no IP may not."""
        try:
            address = parse_ip(ip) if isinstance(ip, str) else normalise(ip)
        except ValueError:
            return False
        if _in_any(address, self.deny):
            return False
        return not self.allow or _in_any(address, self.allow)

    def allows(self, address: object) -> bool:
        """Whether a Twisted address (C{transport.getPeer()}) may connect."""
        host = getattr(address, "host", None)
        if not isinstance(host, str):
            return self.unix_peers == "allow"
        return self.allows_ip(host)


@attrs.frozen
class ProxyOrPolicy:
    """Admit trusted proxies, judge everyone else by C{policy}.

    For X-Forwarded-For listeners: the proxy's own connection must get in,
    and the client it forwards for is judged at the HTTP layer.
    """

    trusted: tuple[Network, ...]
    policy: AddressPolicy

    def allows(self, address: object) -> bool:
        host = getattr(address, "host", None)
        if isinstance(host, str):
            try:
                if _in_any(parse_ip(host), self.trusted):
                    return True
            except ValueError:
                return False
        return self.policy.allows(address)


@implementer(IProtocolFactory, ILoggingContext)
class IPFilterFactory:
    """Refuse peers at accept, before any protocol (or TLS) runs.

    Returning None from C{buildProtocol} makes Twisted close the new socket
    at once. Everything else is the wrapped factory's: this adds no
    per-connection layer.
    """

    def __init__(
        self,
        wrapped: IProtocolFactory,
        policy: PeerPolicy,
        on_refused: OnRefused | None = None,
    ) -> None:
        self.wrappedFactory = wrapped
        self.policy = policy
        self.on_refused = on_refused

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        if not self.policy.allows(addr):
            if self.on_refused is not None:
                self.on_refused(addr)
            return None
        return self.wrappedFactory.buildProtocol(addr)

    def doStart(self) -> None:
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()

    def startFactory(self) -> None:
        self.wrappedFactory.startFactory()  # type: ignore[attr-defined]

    def stopFactory(self) -> None:
        self.wrappedFactory.stopFactory()  # type: ignore[attr-defined]

    def logPrefix(self) -> str:
        wrapped = self.wrappedFactory
        if ILoggingContext.providedBy(wrapped):
            prefix: str = wrapped.logPrefix()
            return prefix
        return type(wrapped).__name__

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes this class lacks (noisy, numPorts, ...).
        if name == "wrappedFactory":
            raise AttributeError(name)
        return getattr(self.wrappedFactory, name)


class _Held(TwistedProtocol):
    """Collects bytes that arrive with the PROXY header until the client is judged."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)


class _CheckedProxyProtocol(HAProxyProtocolWrapper):
    """Reads the PROXY header, then admits or refuses the client it names."""

    _refused = False

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self._proxyInfo is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        # The parent passes bytes after the header straight on; hold them
        # until the client address it carries has been checked.
        inner, held = self.wrappedProtocol, _Held()
        self.wrappedProtocol = held
        try:
            super().dataReceived(data)
        finally:
            self.wrappedProtocol = inner
        if self._proxyInfo is None:
            return
        peer = self.getPeer()
        factory = self.factory
        assert isinstance(factory, ProxyProtocolFactory)
        if not factory.policy.allows(peer):
            self._refused = True
            if factory.on_refused is not None:
                factory.on_refused(peer)
            assert self.transport is not None
            self.transport.abortConnection()
            return
        for chunk in held.chunks:
            inner.dataReceived(chunk)


class ProxyProtocolFactory(HAProxyWrappingFactory):
    """PROXY protocol (v1 or v2): C{getPeer()} becomes the client's address.

    The client is checked against C{policy} once the header is read; the
    connection's own peer (the proxy) must be vetted outside, by an
    L{IPFilterFactory} that admits trusted proxies only. A header without a
    source (v1 C{UNKNOWN}, v2 C{LOCAL} health checks) leaves the proxy as
    the peer, and that is what C{policy} judges then. A missing or invalid
    header closes the connection.
    """

    # Twisted types this as its own wrapper class and needs the same ignore.
    protocol = _CheckedProxyProtocol  # type: ignore[assignment]

    def __init__(
        self,
        wrapped: IProtocolFactory,
        policy: PeerPolicy,
        on_refused: OnRefused | None = None,
    ) -> None:
        super().__init__(wrapped)
        self.policy = policy
        self.on_refused = on_refused


def listening_factory(
    cfg: ListenerConfig,
    site: IProtocolFactory,
    creator: IOpenSSLServerConnectionCreator | None,
    on_refused: OnRefused | None = None,
) -> IProtocolFactory:
    """The factory a listener listens with: filter, [PROXY], [TLS], site.

    Without C{proxy_protocol}, a peer in C{trusted_proxies} is admitted (its
    forwarded client is judged from X-Forwarded-For at the HTTP layer) and
    any other peer must pass allow/deny. With it, only trusted proxies may
    connect, and the client named in the PROXY header must pass allow/deny.

    @raise ValueError: for C{proxy_protocol} without C{trusted_proxies}.
    """
    if creator is None:
        inner = site
    else:
        from mcptwist.security.tls import tls_factory

        inner = tls_factory(creator, site)
    clients = AddressPolicy.from_listener(cfg)
    if cfg.proxy_protocol:
        if not cfg.trusted_proxies:
            raise ValueError("proxy_protocol needs trusted_proxies: anyone could claim any address")
        inner = ProxyProtocolFactory(inner, clients, on_refused)
        proxies = AddressPolicy(allow=cfg.trusted_proxies, unix_peers=cfg.unix_peers)
        return IPFilterFactory(inner, proxies, on_refused)
    policy: PeerPolicy = clients
    if cfg.trusted_proxies:
        policy = ProxyOrPolicy(_networks(cfg.trusted_proxies), clients)
    return IPFilterFactory(inner, policy, on_refused)


def _parse_hop(text: str) -> IPAddress | None:
    """One X-Forwarded-For entry: an IP, maybe with a port or in brackets."""
    text = text.strip()
    if text.startswith("["):
        inside, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not (rest[:1] == ":" and rest[1:].isdigit())):
            return None
        text = inside
    elif text.count(":") == 1:
        text, _, port = text.partition(":")
        if not port.isdigit():
            return None
    try:
        return parse_ip(text)
    except ValueError:
        return None


def forwarded_client(
    peer_ip: str | None, x_forwarded_for: list[str], trusted: tuple[Network, ...]
) -> str | None:
    """The client's IP, trusting X-Forwarded-For only as far as proxies are trusted.

    C{x_forwarded_for} holds every header value; each is a comma-separated
    list, oldest hop first. If the peer is a trusted proxy, the chain is
    walked from the right past trusted proxies and the first other address
    is the client; if all are trusted, the leftmost is. If the peer is not
    trusted, the header is ignored. An entry that is no IP (C{unknown},
    garbage) ends the walk: the hop that wrote it cannot be trusted to have
    checked what lies beyond, so the last good address to its right is the
    answer. Ports (C{1.2.3.4:80}, C{[::1]:80}) and zone ids are dropped and
    empty entries skipped. Never raises. None for no peer IP (Unix socket).
    C{trusted} is taken as L{parse_networks} gives it (as the configuration
    holds it): IPv4-mapped networks already made IPv4.
    """
    if peer_ip is None:
        return None
    try:
        peer = parse_ip(peer_ip)
    except ValueError:
        return peer_ip
    current = peer
    if _in_any(current, trusted):
        hops = [hop for value in x_forwarded_for for hop in value.split(",")]
        for hop in reversed(hops):
            if not hop.strip():
                continue
            address = _parse_hop(hop)
            if address is None:
                break
            current = address
            if not _in_any(current, trusted):
                break
    return str(current)
