"""TLS test support: a tiny site on real listeners that wait for their
connections to close, certificates a listener serves, and clients."""

from __future__ import annotations

import os
import shutil
import ssl
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, endpoints, reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IProtocol, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from mcptwist.config.model import TLSConfig

from .certs import CA, make_ca, make_server_cert


class WhoAmI(Resource):
    """Answers with the client address the site sees, and whether TLS was on."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        peer = request.getClientAddress()
        host = getattr(peer, "host", "unix")
        return f"{host} {'https' if request.isSecure() else 'http'}".encode()


def make_site() -> Site:
    return Site(WhoAmI())


class Tracker:
    """Counts open connections, so a test can end only once all are closed."""

    def __init__(self) -> None:
        self.open = 0
        self._idle: list[defer.Deferred[None]] = []

    def opened(self) -> None:
        self.open += 1

    def closed(self) -> None:
        self.open -= 1
        if self.open == 0:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    def idle(self) -> defer.Deferred[None]:
        if self.open == 0:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle.append(d)
        return d


@implementer(IProtocolFactory)
class TrackingFactory:
    """Hands out the wrapped factory's protocols, counting them with a L{Tracker}."""

    def __init__(self, wrapped: IProtocolFactory, tracker: Tracker) -> None:
        self.wrapped = wrapped
        self.tracker = tracker

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        protocol = self.wrapped.buildProtocol(addr)
        if protocol is None:
            return None
        self.tracker.opened()
        lost = protocol.connectionLost

        def connectionLost(reason: Failure) -> None:
            try:
                lost(reason)
            finally:
                self.tracker.closed()

        protocol.connectionLost = connectionLost  # type: ignore[method-assign]
        return protocol

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()


async def listen(
    case: TestCase, factory: IProtocolFactory, endpoint: IStreamServerEndpoint | None = None
) -> int:
    """Listen (on 127.0.0.1 by default) until the test ends; the port number.

    At the end the test first waits for every server connection to close,
    then stops listening, so the reactor is left clean.
    """
    if endpoint is None:
        endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    tracker = Tracker()
    port = await endpoint.listen(TrackingFactory(factory, tracker))
    case.addCleanup(port.stopListening)
    case.addCleanup(tracker.idle)
    address = port.getHost()
    assert isinstance(address, IPv4Address | IPv6Address)
    return address.port


# Clients (blocking; run in a thread)


def client_context(
    ca: CA,
    minimum: ssl.TLSVersion | None = None,
    maximum: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
    alpn: list[str] | None = None,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca.path)
    # Security level 0 lets this client offer what the server must refuse.
    ctx.set_ciphers(f"{ciphers or 'DEFAULT'}:@SECLEVEL=0")
    if minimum is not None:
        ctx.minimum_version = minimum
    if maximum is not None:
        ctx.maximum_version = maximum
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    return ctx


def run(f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    return deferToThread(f, *args)


# Certificates


class CertDir:
    """A CA, certificates "one" and "two", and the live paths a listener uses."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.ca = make_ca(directory)
        self.one = make_server_cert(directory, self.ca, "one")
        self.two = make_server_cert(directory, self.ca, "two")
        self.cert = os.path.join(directory, "live.crt")
        self.key = os.path.join(directory, "live.key")
        self.install(self.one)

    def install(self, pair: tuple[str, str]) -> None:
        shutil.copyfile(pair[0], self.cert)
        shutil.copyfile(pair[1], self.key)

    def write(self, path: str, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data)

    def config(self, **kw: Any) -> TLSConfig:
        return TLSConfig(certificate=self.cert, key=self.key, **kw)


def cert_dir(case: SynchronousTestCase) -> CertDir:
    directory = case.mktemp()
    os.makedirs(directory)
    return CertDir(directory)
