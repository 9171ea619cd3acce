# -*- test-case-name: tests.test_service -*-
"""The service tree: listeners, the web app, sessions and every server's children.

Start order: bind the listeners (refusing a non-loopback one unless the
config says C{insecure = true}), then spawn the children. Stop order: stop
listening, end every session and stream (answering what is in flight), then
stop the children and wait for them to exit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Site

from .config import BridgeConfig
from .routing import Backend, make_backend
from .security import is_local_address
from .session import SessionRegistry
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
    """One endpoint string, listening with the bridge's site."""

    def __init__(self, description: str, factory: Site, reactor: Any, insecure: bool) -> None:
        self.description = description
        self.factory = factory
        self.reactor = reactor
        self.insecure = insecure
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        outcome: list[Any] = []
        serverFromString(self.reactor, self.description).listen(self.factory).addBoth(
            outcome.append
        )
        if not outcome:
            raise ListenerError(
                f"mcpbridge: {self.description}: this endpoint does not listen at once"
            )
        if isinstance(outcome[0], Failure):
            raise ListenerError(
                f"mcpbridge: cannot listen on {self.description}: {outcome[0].getErrorMessage()}"
            )
        self.port = outcome[0]
        address = self.port.getHost()
        if not self.insecure and not is_local_address(address):
            self.port.stopListening()
            raise ListenerError(
                f"mcpbridge: refusing to listen on {describe_address(address)} ({self.description}): "
                "without authentication the bridge only listens on loopback or a Unix socket. "
                "Fix: listen on 127.0.0.1 (tcp:8080:interface=127.0.0.1), or set insecure = true "
                "in the config if this network is trusted"
            )
        log.info(
            "listening on {address} ({description})",
            address=describe_address(address),
            description=self.description,
        )

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.port is None:
            return None
        port, self.port = self.port, None
        stopped: Deferred[None] | None = port.stopListening()
        return stopped


access_log = Logger(namespace="mcptwist.access")


class BridgeSite(Site):
    """A Site whose access log, when on, goes through twisted.logger."""

    access_log = False

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

    def __init__(self, config: BridgeConfig, reactor: Any, environ: Mapping[str, str]) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.backends: dict[str, Backend] = {
            name: make_backend(server, reactor, environ) for name, server in config.servers.items()
        }
        # Reap often enough that no session outlives its idle timeout by much.
        shortest = min(s.session_idle_timeout for s in config.servers.values())
        self.registry = SessionRegistry(
            reactor, config.max_sessions, max(1.0, min(30.0, shortest / 4))
        )
        self.web = BridgeApp(config, self.backends, self.registry, reactor)
        # The bridge takes JSON bodies only: Twisted's form parsing would read
        # them twice, and it raises on some malformed Content-Type values.
        self.site = BridgeSite(self.web.resource(), reactor=reactor, parsePOSTFormSubmission=False)
        self.site.requestFactory = bounded_request_factory(
            max(s.max_message_size for s in config.servers.values())
        )
        self.site.noisy = False
        self.site.access_log = config.access_log
        self.listeners = [Listener(d, self.site, reactor, config.insecure) for d in config.listen]

    def privilegedStartService(self) -> None:
        for listener in self.listeners:
            listener.privilegedStartService()
        super().privilegedStartService()

    def startService(self) -> None:
        Service.startService(self)
        for listener in self.listeners:
            listener.running = 1
        self.registry.startService()
        self.web.heartbeat.start()
        for backend in self.backends.values():
            backend.startService()
        for name in self.backends:
            for listener in self.listeners:
                if listener.port is not None:
                    address = listener.port.getHost()
                    if getattr(address, "host", None) is not None:
                        scheme = (
                            "https" if listener.description.startswith(("ssl:", "tls:")) else "http"
                        )
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
        await DeferredList(
            [d for d in (listener.stopService() for listener in self.listeners) if d is not None]
        )
        self.registry.stopService()
        self.web.heartbeat.close_all()
        self.web.heartbeat.stop()
        await DeferredList([b.stopService() for b in self.backends.values()])
        log.info("every child has stopped")
