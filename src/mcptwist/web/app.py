# -*- test-case-name: tests.test_web -*-
"""The bridge's HTTP surface: routes, the Origin check, status and health."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from werkzeug.exceptions import BadHost, MethodNotAllowed, NotFound

from .. import __version__, jsonrpc
from ..config import BridgeConfig
from ..routing import Backend
from ..security import HostPolicy, OriginPolicy
from ..session import SessionRegistry
from . import legacy_sse, streamable
from .http import HTTPProblem, header, json_body
from .sse import EventConnection, Heartbeat

log = Logger(namespace="mcptwist.web")

Handler = Callable[..., Any]


def guarded(handler: Handler) -> Handler:
    """Turn an L{HTTPProblem}, or any unexpected error, into a JSON-RPC answer."""

    @functools.wraps(handler)
    async def wrapper(self: BridgeApp, request: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            result = handler(self, request, *args, **kwargs)
            if isinstance(result, Awaitable):
                result = await result
            return result
        except HTTPProblem as problem:
            if request.startedWriting:
                return None
            return problem.render(request)
        except CancelledError:
            raise
        except Exception:
            log.failure("while handling {method} {path}", method=request.method, path=request.path)
            if request.startedWriting:
                request.transport.abortConnection()
                return None
            internal = HTTPProblem(
                500, jsonrpc.INTERNAL_ERROR, "Internal error in the bridge (logged)"
            )
            return internal.render(request)

    return wrapper


class Gate(Resource):
    """In front of every route: the Host and Origin checks and common headers.

    It runs before Klein binds its URL map to the request's Host (which fails
    on a name that cannot be encoded), so every request is judged here first.
    """

    isLeaf = True

    def __init__(self, app: BridgeApp, routes: IResource) -> None:
        super().__init__()
        self.app = app
        self.routes = routes

    def render(self, request: Any) -> Any:
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"cache-control", b"no-store")
        host = header(request, b"host")
        origin = header(request, b"origin")
        if not self.app.hosts.allows(host):
            problem = HTTPProblem(
                421,
                jsonrpc.SERVER_UNAVAILABLE,
                f"Misdirected Request: host {host!r} is not served here (allowed_hosts)",
            )
        elif not self.app.origins.allows(origin):
            problem = HTTPProblem(
                403, jsonrpc.SERVER_UNAVAILABLE, f"Forbidden: origin {origin!r} is not allowed"
            )
        else:
            try:
                return self.routes.render(request)
            except BadHost:
                problem = HTTPProblem(
                    400, jsonrpc.INVALID_REQUEST, f"Bad Request: invalid Host header {host!r}"
                )
        return problem.render(request)


class BridgeApp:
    """Serves every configured server under C{/servers/NAME/}."""

    app = Klein()

    def __init__(
        self,
        config: BridgeConfig,
        backends: Mapping[str, Backend],
        registry: SessionRegistry,
        clock: IReactorTime,
    ) -> None:
        self.config = config
        self.backends = backends
        self.registry = registry
        self.clock = clock
        self.origins = OriginPolicy(config.allowed_origins)
        self.hosts = HostPolicy(config.allowed_hosts)
        self.heartbeat = Heartbeat(clock, config.heartbeat_interval)

    def resource(self) -> IResource:
        return Gate(self, self.app.resource())

    def backend(self, name: str) -> Backend:
        backend = self.backends.get(name)
        if backend is None:
            raise HTTPProblem(
                404,
                jsonrpc.INVALID_REQUEST,
                f"Not Found: no MCP server is named {name!r}",
            )
        return backend

    def stream(self, request: Any, label: str) -> EventConnection:
        """Start an SSE response on this request, kept alive by the heartbeat."""
        connection = EventConnection(request, self.clock, self.config.stream_buffer, label)
        self.heartbeat.add(connection)
        return connection

    # Streamable HTTP

    @app.route("/servers/<name>/mcp", methods=["POST"])
    @guarded
    async def mcp_post(self, request: Any, name: str) -> Any:
        return await streamable.post(self, request, name)

    @app.route("/servers/<name>/mcp", methods=["GET"])
    @guarded
    async def mcp_get(self, request: Any, name: str) -> Any:
        return await streamable.get(self, request, name)

    @app.route("/servers/<name>/mcp", methods=["DELETE"])
    @guarded
    def mcp_delete(self, request: Any, name: str) -> Any:
        return streamable.delete(self, request, name)

    # HTTP+SSE

    @app.route("/servers/<name>/sse", methods=["GET"])
    @guarded
    async def sse_get(self, request: Any, name: str) -> Any:
        return await legacy_sse.stream(self, request, name)

    @app.route("/servers/<name>/messages", methods=["POST"])
    @guarded
    def sse_post(self, request: Any, name: str) -> Any:
        return legacy_sse.post(self, request, name)

    # Status

    @app.route("/", methods=["GET"])
    @guarded
    def index(self, request: Any) -> Any:
        return json_body(
            request,
            {
                "name": "mcptwist",
                "version": __version__,
                "servers": {
                    name: {
                        "streamable_http": f"/servers/{name}/mcp",
                        "sse": f"/servers/{name}/sse",
                    }
                    for name in self.backends
                },
            },
        )

    @app.route("/servers", methods=["GET"])
    @guarded
    def servers(self, request: Any) -> Any:
        return json_body(request, {"servers": [self._status(b) for b in self.backends.values()]})

    @app.route("/servers/<name>", methods=["GET"])
    @guarded
    def server(self, request: Any, name: str) -> Any:
        return json_body(request, self._status(self.backend(name)))

    @app.route("/health", methods=["GET"])
    @guarded
    def health(self, request: Any) -> Any:
        problems = {}
        for name, backend in self.backends.items():
            status = backend.status()
            if status["state"] != "running":
                problems[name] = status["state"] + (
                    f": {status['last_exit']}" if status.get("last_exit") else ""
                )
        if problems:
            request.setResponseCode(503)
            return json_body(request, {"status": "unhealthy", "servers": problems})
        return json_body(
            request,
            {"status": "ok", "servers": {name: "running" for name in self.backends}},
        )

    def _status(self, backend: Backend) -> dict[str, Any]:
        status = backend.status()
        status["sessions"] = self.registry.count(backend.server.name)
        return status

    # Errors for what no route matched

    @app.handle_errors(NotFound)
    def not_found(self, request: Any, failure: Failure) -> bytes:
        return HTTPProblem(404, jsonrpc.INVALID_REQUEST, "Not Found").render(request)

    @app.handle_errors(MethodNotAllowed)
    def not_allowed(self, request: Any, failure: Failure) -> bytes:
        allowed = getattr(failure.value, "valid_methods", None) or []
        headers = {b"allow": ", ".join(allowed).encode()} if allowed else {}
        return HTTPProblem(
            405, jsonrpc.INVALID_REQUEST, "Method Not Allowed", headers=headers
        ).render(request)
