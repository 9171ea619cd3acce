# -*- test-case-name: tests.test_service -*-
"""Listeners: the endpoints the bridge listens on, each with its IP filter,
TLS and site, and the groups that a reload changes by endpoint."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Site

from mcptwist.config.model import ListenerConfig
from mcptwist.ops.audit import AuditTrail
from mcptwist.security.ipfilter import listening_factory
from mcptwist.security.origin import is_local_address
from mcptwist.security.tlserror import TLSLoadError

if TYPE_CHECKING:
    from mcptwist.security.tls import ReloadableTLS

log = Logger(namespace="mcptwist.service")


class ListenerError(SystemExit):
    """A listener could not (or must not) be opened; twistd exits with it."""


def describe_address(address: Any) -> str:
    host = getattr(address, "host", None)
    if host is None:
        return str(getattr(address, "name", address))
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{address.port}"


class Listener(Service):
    """One listening endpoint: its IP filter, TLS (re-read on reload) and site."""

    def __init__(
        self,
        config: ListenerConfig,
        site: Site,
        reactor: Any,
        open_to_network: bool,
        audit: AuditTrail,
    ) -> None:
        self.config = config
        self.description = config.endpoint + (" (TLS)" if config.tls is not None else "")
        self.site = site
        self.reactor = reactor
        self.open_to_network = open_to_network
        self.audit = audit
        self.creator: ReloadableTLS | None = None
        self.factory: SwappableFactory | None = None
        self.port: IListeningPort | None = None
        # A certificate that nobody renews should be noticed before it ends.
        self._expiry_check = LoopingCall(self._warn_expiry)
        self._expiry_check.clock = reactor

    def _refused(self, address: Any) -> None:
        self.audit.ip_refused(
            peer=getattr(address, "host", None) or "unix",
            listener=self.config.endpoint,
            scope="listener",
        )

    def privilegedStartService(self) -> None:
        """Listen (before privileges are dropped), unless L{listen} already did."""
        super().privilegedStartService()
        if self.port is None:
            self.listen()

    def listen(self) -> None:
        """Open the port, refusing one beyond loopback unless C{open_to_network}.

        @raise ListenerError: when it cannot, or must not, listen.
        """
        if self.config.tls is not None:
            # pyOpenSSL and cryptography are imported by the first TLS listener.
            from mcptwist.security.tls import ReloadableTLS

            try:
                self.creator = ReloadableTLS(self.config.tls)
            except TLSLoadError as e:
                raise ListenerError(f"mcpbridge: {self.config.endpoint}: {e}") from None
            self._warn_expiry()
        self.factory = SwappableFactory(
            self.site, listening_factory(self.config, self.site, self.creator, self._refused)
        )
        outcome: list[Any] = []
        try:
            listening = serverFromString(self.reactor, self.config.endpoint).listen(self.factory)
        except Exception as e:
            # A systemd: endpoint naming a socket systemd did not pass raises here.
            raise ListenerError(
                f"mcpbridge: cannot listen on {self.config.endpoint}: {e!r}"
                + _inherited_hint(self.config.endpoint)
            ) from None
        listening.addBoth(outcome.append)
        if not outcome:
            raise ListenerError(
                f"mcpbridge: {self.config.endpoint}: this endpoint does not listen at once"
            )
        if isinstance(outcome[0], Failure):
            raise ListenerError(
                f"mcpbridge: cannot listen on {self.config.endpoint}: {outcome[0].getErrorMessage()}"
            )
        self.port = outcome[0]
        address = self.port.getHost()
        self.site.local = is_local_address(address)  # type: ignore[attr-defined]
        if not self.open_to_network and not is_local_address(address):
            self.port.stopListening()
            raise ListenerError(
                f"mcpbridge: refusing to listen on {describe_address(address)} ({self.config.endpoint}): "
                "without authentication the bridge only listens on loopback or a Unix socket. "
                "Fix: configure [auth] tokens or JWT, listen on 127.0.0.1 "
                "(tcp:8080:interface=127.0.0.1), or set insecure = true if this network is trusted"
            )
        log.info(
            "listening on {address} ({description})",
            address=describe_address(address),
            description=self.description,
        )
        plaintext = self.config.tls is None and not self.config.trusted_proxies
        if plaintext and not is_local_address(address):
            log.warn(
                "{address}: bearer tokens would cross the network in clear text on this "
                "listener; give it tls = {{...}}, or put a TLS proxy in front (trusted_proxies)",
                address=describe_address(address),
            )

    def update(self, config: ListenerConfig) -> None:
        """Take new rules (addresses, proxies, TLS on or off or other files)
        without closing the port or any connection: the next connections are
        built with the new stack. A certificate that does not load is refused
        and the old TLS setup stays.

        @raise TLSLoadError: when TLS is turned on with files that do not load.
        """
        assert self.factory is not None and config.endpoint == self.config.endpoint
        creator = self.creator
        if config.tls is None:
            creator = None
        elif creator is None:
            from mcptwist.security.tls import ReloadableTLS

            creator = ReloadableTLS(config.tls)
        elif config.tls != self.config.tls:
            try:
                creator.reload(config.tls)
            except TLSLoadError as e:
                self._tls_refused(e)
                # Keep describing what is served, so that the next reload tries again.
                config = attrs.evolve(config, tls=self.config.tls)
        self.creator = creator
        self.config = config
        self.description = config.endpoint + (" (TLS)" if config.tls is not None else "")
        self.site.listener = config  # type: ignore[attr-defined]
        self.factory.current = listening_factory(config, self.site, creator, self._refused)
        if creator is not None and not self._expiry_check.running and self.running:
            self._expiry_check.start(86400, now=False)

    def reload_tls(self) -> None:
        """Re-read the certificate and key; on any problem keep serving the old ones."""
        if self.creator is None:
            return
        try:
            self.creator.reload()
        except TLSLoadError as e:
            self._tls_refused(e)
            return
        log.info("{listener}: TLS certificate re-read", listener=self.config.endpoint)
        self.audit.tls_reloaded(listener=self.config.endpoint, outcome="ok", detail=None)
        self._warn_expiry()

    def _tls_refused(self, error: TLSLoadError) -> None:
        """A certificate that did not load: the old one is kept; log and audit it."""
        log.error(
            "{listener}: kept the old TLS certificate: {error}",
            listener=self.config.endpoint,
            error=str(error),
        )
        self.audit.tls_reloaded(listener=self.config.endpoint, outcome="refused", detail=str(error))

    def _warn_expiry(self) -> None:
        warning = self.creator.expiry_warning() if self.creator is not None else None
        if warning is not None:
            log.warn("{listener}: {warning}", listener=self.config.endpoint, warning=warning)

    def startService(self) -> None:
        super().startService()
        if self.creator is not None:
            self._expiry_check.start(86400, now=False)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._expiry_check.running:
            self._expiry_check.stop()
        if self.port is None:
            return None
        port, self.port = self.port, None
        stopped: Deferred[None] | None = port.stopListening()
        finish_up = getattr(self.site, "finish_up", None)
        if finish_up is not None:
            finish_up()
        return stopped


class SwappableFactory(Factory):
    """Builds each connection's protocol with the current filter and TLS stack,
    which a reload may replace; connections already open keep theirs."""

    def __init__(self, site: Site, current: IProtocolFactory) -> None:
        self.site = site
        self.current = current

    def buildProtocol(self, addr: Any) -> Any:
        return self.current.buildProtocol(addr)

    def doStart(self) -> None:
        self.site.doStart()

    def doStop(self) -> None:
        self.site.doStop()


class ListenerGroup(MultiService):
    """The listeners of one kind (the bridge's, or the metrics'), each a child
    service; a reload changes them by endpoint (L{apply})."""

    def __init__(self, make: Callable[[ListenerConfig], Listener], adopted: set[str]) -> None:
        super().__init__()
        # Builds a listener of this kind, with the configuration in force.
        self.make = make
        # systemd: endpoints adopted so far, by every group (each inherited
        # socket can be adopted once).
        self.adopted = adopted

    def __iter__(self) -> Iterator[Listener]:
        return iter(self.services)

    async def apply(self, wanted: tuple[ListenerConfig, ...]) -> dict[str, list[str]]:
        """Diff listeners by endpoint: keep and update in place, close the
        removed ones (and wait for their ports), then open the new ones."""
        result: dict[str, list[str]] = {
            "added": [],
            "removed": [],
            "updated": [],
            "unchanged": [],
            "failed": [],
        }
        by_endpoint = {listener.config.endpoint: listener for listener in self}
        configs = {config.endpoint: config for config in wanted}
        stopping: list[Deferred[None]] = []
        for endpoint, listener in by_endpoint.items():
            config = configs.get(endpoint)
            if config is None:
                d = listener.disownServiceParent()
                if d is not None:
                    stopping.append(d)
                result["removed"].append(endpoint)
                continue
            if config == listener.config:
                listener.reload_tls()
                result["unchanged"].append(endpoint)
                continue
            try:
                listener.update(config)
            except TLSLoadError as e:
                log.error("reload: {listener}: {error}", listener=endpoint, error=str(e))
                result["failed"].append(f"{endpoint}: {e}")
            else:
                result["updated"].append(endpoint)
        await DeferredList(stopping)
        for endpoint, config in configs.items():
            if endpoint in by_endpoint:
                continue
            if endpoint.startswith("systemd:") and endpoint in self.adopted:
                # Twisted closes an inherited socket's descriptor once adopted.
                message = (
                    "an inherited socket is adopted once: restart the service to adopt it again"
                )
                log.error("reload: {listener}: {error}", listener=endpoint, error=message)
                result["failed"].append(f"{endpoint}: {message}")
                continue
            listener = self.make(config)
            try:
                listener.listen()
            except ListenerError as e:
                log.error("reload: {error}", error=str(e))
                result["failed"].append(f"{endpoint}: {e}")
                continue
            # Listening already: joining the group starts it.
            listener.setServiceParent(self)
            result["added"].append(endpoint)
            if endpoint.startswith("systemd:"):
                self.adopted.add(endpoint)
        return result


def _inherited_hint(endpoint: str) -> str:
    if not endpoint.startswith("systemd:"):
        return ""
    names = os.environ.get("LISTEN_FDNAMES")
    return (
        f"; systemd passed the sockets named {names!r} (FileDescriptorName= in the .socket units)"
        if names
        else "; systemd passed no sockets: start the bridge through its .socket units"
    )
