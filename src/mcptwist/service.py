# -*- test-case-name: tests.test_service -*-
"""The service tree: listeners, the web app, sessions and every server's children.

Start order: bind the listeners (refusing a non-loopback one unless the
config says C{insecure = true}), then spawn the children. Stop order: stop
listening, end every session and stream (answering what is in flight), then
stop the children and wait for them to exit.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Site

from .audit import AuditError, AuditTrail
from .config import BridgeConfig, ListenerConfig
from .ipfilter import listening_factory
from .routing import Backend, make_backend
from .security import is_local_address
from .session import SessionRegistry
from .tls import ReloadableTLS, TLSLoadError
from .web.access import AccessControl
from .web.app import BridgeApp
from .web.http import bounded_request_factory

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
        super().privilegedStartService()
        if self.config.tls is not None:
            try:
                self.creator = ReloadableTLS(self.config.tls)
            except TLSLoadError as e:
                raise ListenerError(f"mcpbridge: {self.config.endpoint}: {e}") from None
            self._warn_expiry()
        factory = listening_factory(self.config, self.site, self.creator, self._refused)
        outcome: list[Any] = []
        serverFromString(self.reactor, self.config.endpoint).listen(factory).addBoth(outcome.append)
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

    def reload_tls(self) -> None:
        """Re-read the certificate and key; on any problem keep serving the old ones."""
        if self.creator is None:
            return
        try:
            self.creator.reload()
        except TLSLoadError as e:
            log.error(
                "{listener}: kept the old TLS certificate: {error}",
                listener=self.config.endpoint,
                error=str(e),
            )
            self.audit.tls_reloaded(listener=self.config.endpoint, outcome="refused", detail=str(e))
            return
        log.info("{listener}: TLS certificate re-read", listener=self.config.endpoint)
        self.audit.tls_reloaded(listener=self.config.endpoint, outcome="ok", detail=None)
        self._warn_expiry()

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
        return stopped


access_log = Logger(namespace="mcptwist.access")


class BridgeSite(Site):
    """A listener's Site (its L{ListenerConfig} tells the gate about TLS and
    proxies); its access log, when on, goes through twisted.logger."""

    access_log = False
    listener: ListenerConfig | None = None

    def log(self, request: Any) -> None:
        if not self.access_log:
            return
        access_log.info(
            "{client} {method} {path} {status} {size}",
            client=getattr(request.getClientAddress(), "host", "-"),
            method=request.method.decode("latin-1"),
            path=request.uri.decode("latin-1").split("?", 1)[0],
            status=request.code,
            size=request.sentLength,
        )


class BridgeService(MultiService):
    """The root of the bridge's service tree."""

    def __init__(
        self,
        config: BridgeConfig,
        reactor: Any,
        environ: Mapping[str, str],
        handle_sighup: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.handle_sighup = handle_sighup
        self._previous_sighup: Any = None
        self.audit = AuditTrail(config.audit, reactor)
        self.backends: dict[str, Backend] = {
            name: make_backend(server, reactor, environ, self.audit)
            for name, server in config.servers.items()
        }
        self.access = AccessControl.from_config(config, reactor, self.audit)
        # Reap often enough that no session outlives its idle timeout by much.
        shortest = min(s.session_idle_timeout for s in config.servers.values())
        self.registry = SessionRegistry(
            reactor,
            config.max_sessions,
            max(1.0, min(30.0, shortest / 4)),
            caps=self.access.caps,
            audit=self.audit,
        )
        self.web = BridgeApp(config, self.backends, self.registry, reactor, self.access)
        resource = self.web.resource()
        request_factory = bounded_request_factory(
            max(s.max_message_size for s in config.servers.values())
        )
        open_to_network = config.insecure or config.auth.enabled
        self.listeners = []
        for listener in config.listeners:
            # The bridge takes JSON bodies only: Twisted's form parsing would read
            # them twice, and it raises on some malformed Content-Type values.
            site = BridgeSite(resource, reactor=reactor, parsePOSTFormSubmission=False)
            site.requestFactory = request_factory
            site.noisy = False
            site.access_log = config.access_log
            site.listener = listener
            self.listeners.append(Listener(listener, site, reactor, open_to_network, self.audit))

    @property
    def site(self) -> BridgeSite:
        """The first listener's site (what tests drive directly)."""
        site = self.listeners[0].site
        assert isinstance(site, BridgeSite)
        return site

    def reload(self) -> None:
        """SIGHUP: re-read TLS certificates and reopen the audit file."""
        log.info("SIGHUP: reloading TLS certificates and reopening the audit trail")
        for listener in self.listeners:
            listener.reload_tls()
        self.audit.reopen()

    def privilegedStartService(self) -> None:
        # Opened before privileges are dropped, as log files are.
        try:
            self.audit.start()
        except AuditError as e:
            raise ListenerError(f"mcpbridge: {e}") from None
        for listener in self.listeners:
            listener.privilegedStartService()
        super().privilegedStartService()

    def startService(self) -> None:
        Service.startService(self)
        self.access.start()
        if self.handle_sighup:
            self._previous_sighup = signal.signal(
                signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload)
            )
        for listener in self.listeners:
            listener.startService()
        self.registry.startService()
        self.web.heartbeat.start()
        for backend in self.backends.values():
            backend.startService()
        for name in self.backends:
            for listener in self.listeners:
                if listener.port is not None:
                    address = listener.port.getHost()
                    if getattr(address, "host", None) is not None:
                        scheme = "https" if listener.config.tls is not None else "http"
                        log.info(
                            "serving {server}: {scheme}://{address}/servers/{server}/mcp (Streamable HTTP), "
                            "/servers/{server}/sse (HTTP+SSE)",
                            server=name,
                            scheme=scheme,
                            address=describe_address(address),
                        )

    def stopService(self) -> Deferred[Any]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self.handle_sighup and self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        await DeferredList(
            [d for d in (listener.stopService() for listener in self.listeners) if d is not None]
        )
        self.registry.stopService()
        self.web.heartbeat.close_all()
        self.web.heartbeat.stop()
        await DeferredList([b.stopService() for b in self.backends.values()])
        log.info("every child has stopped")
        self.access.stop()
        self.audit.stop()
