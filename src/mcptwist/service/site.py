# -*- test-case-name: tests.test_channel,tests.test_service -*-
"""A listener's site: its channels' limits, its metrics and access log, and
the root of a metrics listener."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from mcptwist.config.model import LimitsConfig, ListenerConfig
from mcptwist.ops.audit import AuditTrail
from mcptwist.ops.metrics import Metrics
from mcptwist.web.app import BridgeApp
from mcptwist.web.channel import BridgeChannel, ConnectionCounter
from mcptwist.web.http import BoundedRequest, header

access_log = Logger(namespace="mcptwist.access")
_LIMITS = LimitsConfig()


class BridgeSite(Site):
    """A listener's Site (its L{ListenerConfig} tells the gate about TLS and
    proxies); it counts every request for the metrics, and its access log,
    when on, goes through twisted.logger.

    Its channels (L{BridgeChannel}) ask it, when a request's head has
    arrived, how much body to read (L{request_head}), and tell it what they
    refused (L{refused}); it holds their limits, which a reload changes.
    """

    protocol = BridgeChannel  # type: ignore[assignment]
    requestFactory = BoundedRequest
    access_log = False
    listener: ListenerConfig | None = None
    # Whether it listens on loopback or a Unix socket (known once it listens).
    local: bool | None = None
    metrics: Metrics | None = None
    audit: AuditTrail | None = None
    connections: ConnectionCounter | None = None
    header_timeout = _LIMITS.header_timeout
    body_timeout = _LIMITS.body_timeout
    preauth_body = _LIMITS.preauth_body
    # Which names are servers (metrics label only those: a URL names anything).
    is_server: Callable[[str], bool] = staticmethod(lambda name: False)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.channels: set[BridgeChannel] = set()

    def finish_up(self) -> None:
        """It stops listening: its connections close, each once no request
        of it is under way."""
        for channel in list(self.channels):
            channel.finish_up()

    def acceptableProtocols(self) -> list[bytes]:
        """ALPN: its channels speak HTTP/1.1 only (whatever Twisted could add)."""
        return [b"http/1.1"]

    def request_head(self, request: Request) -> bytes | int | Deferred[None]:
        """Judge a request from its head (the gate's rules): an answer to
        send now, the most body to read, or a Deferred to wait for."""
        head = getattr(self.resource, "head", None)
        if head is None:
            # A metrics listener: no route takes a body.
            return self.preauth_body
        decision: bytes | int | Deferred[None] = head(request)
        return decision

    def refused(self, peer: str | None, reason: str) -> None:
        """A connection or request refused while it was received: audited."""
        if self.audit is not None:
            listener = self.listener.endpoint if self.listener is not None else None
            self.audit.http_refused(peer=peer, listener=listener, reason=reason)

    def configure(self, limits: LimitsConfig) -> None:
        """Take the limits on receiving requests."""
        self.header_timeout = limits.header_timeout
        self.body_timeout = limits.body_timeout
        self.preauth_body = limits.preauth_body

    def log(self, request: http.Request) -> None:
        if self.metrics is not None:
            path = request.path
            server, route = _known_route(path) if len(path) <= _KNOWN_PATH else _route_of(path)
            if server is not None and not self.is_server(server):
                server = None
            self.metrics.http_request(
                server,
                route,
                request.method.decode("latin-1"),
                request.code,
                getattr(request, "body_size", 0),
                request.sentLength,
            )
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


# The longest path whose route is remembered: the endpoints' own are short.
# At most 512 are (the latest used), so made-up paths cost memory only that.
_KNOWN_PATH = 128


def _route_of(path: bytes) -> tuple[str | None, str]:
    """(server, route) of a request path, for the metrics' bounded labels."""
    parts = path.split(b"/")
    first = parts[1] if len(parts) > 1 else b""
    if first == b"servers":
        if len(parts) == 2:
            return None, "status"
        server = parts[2].decode("utf-8", "replace")
        if len(parts) == 3:
            return server, "status"
        kind = parts[3].decode("utf-8", "replace")
        return server, kind if kind in ("mcp", "sse", "messages") else "other"
    if first == b".well-known":
        return None, "metadata"
    name = first.decode("utf-8", "replace")
    return None, name if name in ("health", "metrics", "admin") else "other"


_known_route = functools.lru_cache(maxsize=512)(_route_of)


class MetricsOnly(Resource):
    """The root of a metrics listener: /metrics and nothing else, behind the
    same Host and Origin checks as every other listener (it asks for no
    credentials, so DNS rebinding would otherwise reach it)."""

    isLeaf = True

    def __init__(self, metrics: IResource, app: BridgeApp) -> None:
        super().__init__()
        self.metrics = metrics
        self.app = app

    def render(self, request: Request) -> bytes | int:
        refusal = self.app.screen(
            request, header(request, b"origin"), operator=True, hosts=self.app.metrics_hosts
        )
        if refusal is not None:
            return refusal.render(request)
        if request.path == b"/metrics":
            answer: bytes | int = self.metrics.render(request)
            return answer
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"Not Found: this listener serves /metrics only\n"
