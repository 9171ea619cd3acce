# -*- test-case-name: tests.test_web -*-
"""The bridge's HTTP surface: the gate, the status pages and health.

Every request meets the L{Gate} first. Once admitted, it goes to the
message endpoints' table (L{dispatch<mcptwist.web.dispatch>}), the admin API,
the metrics, or the pages served by Klein (C{/}, C{/servers},
C{/servers/NAME}, C{/health}).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request
from werkzeug.exceptions import BadHost, MethodNotAllowed, NotFound

from mcptwist import __version__
from mcptwist.cluster.keys import ClusterKeys, cluster_keys
from mcptwist.config.model import ENDPOINT_PREFIX, BridgeConfig, endpoint_key
from mcptwist.mcp import jsonrpc
from mcptwist.mcp.jsonrpc import RequestId
from mcptwist.routing.backends import Backend
from mcptwist.routing.members import AggregateBackend, AggregateUpstream
from mcptwist.routing.pins import PinBook
from mcptwist.routing.sessions import (
    ClientSession,
    PrincipalLimitError,
    SessionLimitError,
    SessionRegistry,
    Sink,
)
from mcptwist.routing.stateless import StateSigner
from mcptwist.routing.tasks import TaskStore
from mcptwist.routing.tools import ToolView
from mcptwist.routing.trace import Tracer
from mcptwist.routing.upstream import CapacityError, CredentialError, PrincipalCapacityError
from mcptwist.security.auth import ANONYMOUS, ANONYMOUS_REMOTE, AuthFailure, Principal
from mcptwist.security.origin import (
    HostPolicy,
    OriginPolicy,
    is_local_ip,
    own_origin,
    same_origin,
)

from .access import PRM_PATH, AccessControl, local_listener, route_of
from .admin import MAX_BODY as ADMIN_MAX_BODY
from .admission import Admission, admission_of, admit, peer_of, principal_id, principal_of
from .dashboard import BASIC_CHALLENGE, PAGE_PATH
from .dispatch import dispatch, endpoint_of, guarded, internal_error, takes_body
from .forward import Forwarder
from .http import (
    HTTPProblem,
    Undecided,
    finish_with,
    header,
    json_body,
    query_names,
    route_not_allowed,
    route_not_found,
)
from .sse import EventConnection, Heartbeat

log = Logger(namespace="mcptwist.web")
# Operators use the command line or Prometheus, never a web page.
_OPERATOR: Final = (b"admin", b"metrics")
# Seconds a principal at its share of a server's children is told to wait.
CHILD_SHARE_RETRY: Final = 60


class Gate(Resource):
    """In front of every route: the Host and Origin checks and common headers,
    then who the client is and what it may use; then the route.

    It runs before Klein binds its URL map to the request's Host (which fails
    on a name that cannot be encoded), so every request is judged here first.
    The message endpoints are dispatched from their own table, without Klein.
    """

    isLeaf = True

    def __init__(self, app: BridgeApp, routes: IResource) -> None:
        super().__init__()
        self.app = app
        self.routes = routes

    def render(self, request: Request) -> bytes | int:
        admission = admission_of(request)
        if admission is None or admission.generation != self.app.access.generation:
            # Not judged from its head, or a reload changed the rules while
            # its body arrived (judge it again).
            judged = self._judge(request)
            if not isinstance(judged, Admission):
                return judged
            admission = judged
        if admission.who is not None:
            return self._admitted(request, admission)
        # Authentication has to wait (a JWKS fetch): answer from there.
        admission.settled().addCallback(lambda _: self._answer_later(request, admission))
        return NOT_DONE_YET

    def head(self, request: Request) -> bytes | int | Deferred[None]:
        """Judge a request when its headers have arrived, before any of its
        body is read: the answer to send now (a refusal), the most body it may
        send, or, while its credentials are being checked, a Deferred that
        fires when they have been (ask again then).

        What is decided here is kept on the request (its L{Admission}):
        L{render} does not decide (nor charge a rate limit, nor audit) twice.
        A refusal is answered at once, and its connection closed.
        """
        admission = admission_of(request)
        if admission is None:
            judged = self._judge(request)
            if not isinstance(judged, Admission):
                return judged
            admission = judged
        if admission.who is None:
            return admission.settled()
        refusal = self._check(request, admission)
        if refusal is not None:
            return refusal
        parts = admission.parts
        server = admission.server
        if server is not None and takes_body(parts, request.method):
            try:
                backend = self.app.backend(server, draining=True)
            except HTTPProblem as problem:
                return problem.render(request)
            return backend.server.max_message_size
        if parts[1] == b"admin":
            return ADMIN_MAX_BODY
        # No other route reads a body.
        return self.app.config.limits.preauth_body

    def _judge(self, request: Request) -> Admission | bytes:
        """Everything decided before credentials: Host, Origin, CORS, path,
        client address, rate limit; then authentication is started."""
        access = self.app.access
        access.common_headers(request)
        origin = header(request, b"origin")
        path = request.path
        parts = _segments(path)
        operator = parts is not None and parts[1] in _OPERATOR
        admin = parts is not None and parts[1] == b"admin"
        refusal = self.app.screen(request, origin, operator, admin=admin)
        if refusal is not None:
            return refusal.render(request)
        preflight = access.cors(request, origin)
        if preflight is not None:
            return preflight
        if parts is None:
            # Klein routes on the percent-decoded segments; the gate decides on
            # the raw path. No bridge URL needs escapes or empty or dot
            # segments, so a path with them is refused before the two could differ.
            return HTTPProblem(404, jsonrpc.INVALID_REQUEST, "Not Found").render(request)
        try:
            ip = access.client_ip(request)
            if path == b"/health":
                admission = Admission(
                    ip, parts, operator, ANONYMOUS, checked=True, generation=access.generation
                )
                admit(request, admission)
                return admission
            if path.startswith(PRM_PATH):
                return self._metadata(request, path)
            if access.store is None:
                access.limit_address(ip)
        except HTTPProblem as problem:
            return problem.render(request)
        admission = Admission(ip, parts, operator, generation=access.generation)
        admit(request, admission)
        if not access.auth.enabled:
            # Without authentication only a client on this host is an operator.
            local = local_listener(request) and is_local_ip(ip)
            admission.who = ANONYMOUS if local else ANONYMOUS_REMOTE
            return admission
        if access.store is None:
            self._authenticate(None, request, admission)
        else:
            # The cluster's limit on the address is decided (in Redis) first.
            d = access.address_verdict(ip)
            d.addCallback(self._authenticate, request, admission)
            # An unexpected error is the admission's outcome (logged, answered 500).
            d.addErrback(admission.settle)
        return admission

    def _authenticate(
        self, refusal: HTTPProblem | None, request: Request, admission: Admission
    ) -> None:
        """Check the request's credentials, unless its address was refused."""
        if refusal is not None:
            admission.settle(Failure(refusal))
            return
        d = self.app.access.authenticator.authenticate(
            request.getHeader(b"authorization"),
            query_names(request.uri, b"access_token"),
            # A browser sends the dashboard's token as Basic credentials.
            basic=admission.parts[1] == b"admin",
        )
        d.addBoth(admission.settle)

    def _answer_later(self, request: Request, admission: Admission) -> None:
        if request.finished or request.channel is None:
            return
        try:
            body = self._admitted(request, admission)
        except Exception:
            log.failure("while answering {path}", path=request.path)
            body = internal_error(request)
        if body is not NOT_DONE_YET:
            assert isinstance(body, bytes)
            finish_with(request, body)

    def _check(self, request: Request, admission: Admission) -> bytes | Deferred[None] | None:
        """Authorise an authenticated request (once): None, its refusal, or,
        while a cluster's shared rate limit is decided, a Deferred that fires
        when it has been (ask again then)."""
        if admission.checked:
            return None
        access = self.app.access
        who = admission.who
        ip = admission.ip
        if isinstance(who, Failure):
            route = route_of(request)
            if isinstance(who.value, AuthFailure):
                body = access.failure_problem(request, who.value, ip, route).render(request)
                if route == PAGE_PATH and who.value.status == 401:
                    # So that a browser asks for the token (as a password).
                    request.responseHeaders.addRawHeader(b"www-authenticate", BASIC_CHALLENGE)
                return body
            if isinstance(who.value, HTTPProblem):
                # Its address was refused (and audited) before authentication.
                return who.value.render(request)
            log.failure("while authenticating {path}", who, path=route)
            return internal_error(request)
        assert who is not None
        parts = admission.parts
        count = len(parts)
        first = parts[1]
        server = None
        if count >= 3 and first in (b"servers", b"endpoints"):
            try:
                server = parts[2].decode("utf-8")
            except UnicodeDecodeError:
                # A name that is not UTF-8 names no server.
                return HTTPProblem(404, jsonrpc.INVALID_REQUEST, "Not Found").render(request)
            if first == b"endpoints":
                # An endpoint is served as a server of this name (no server's
                # name holds a slash).
                server = endpoint_key(server)
        if first == b"admin":
            unserved = self._admin_unserved(request, who, ip)
            if unserved is not None:
                return unserved.render(request)
        try:
            if admission.operator or (first == b"servers" and count <= 3):
                # Metrics count every server: they need a grant of them all.
                access.require_admin(request, who, ip, every_server=first == b"metrics")
            access.authorise(request, who, ip, server)
        except HTTPProblem as problem:
            return problem.render(request)
        except Undecided as undecided:
            ready: Deferred[None] = undecided.ready
            return ready
        admission.server = server
        admission.checked = True
        return None

    def _admin_unserved(
        self, request: Request, who: Principal, ip: str | None
    ) -> HTTPProblem | None:
        """The 404 of an admin API that is not served here: turned off, or,
        without authentication, to a client that is not on this host: on a
        listener open to the network, or forwarded by a proxy (where anyone
        who can connect would be an admin; that refusal is audited)."""
        if self.app.admin is None or not self.app.config.admin.enabled:
            return HTTPProblem(404, jsonrpc.INVALID_REQUEST, "Not Found")
        if self.app.access.auth.enabled or who.admin:
            return None
        self.app.access.audit.access_refused(
            principal=who.id, peer=ip, server=None, route=route_of(request)
        )
        return HTTPProblem(
            404,
            jsonrpc.INVALID_REQUEST,
            "Not Found: without authentication the admin API is served only "
            "on loopback and Unix-socket listeners, to clients on this host",
        )

    def _admitted(self, request: Request, admission: Admission) -> bytes | int:
        """Authorise an authenticated (or refused) request, then route it."""
        refusal = self._check(request, admission)
        if refusal is not None:
            if isinstance(refusal, Deferred):
                refusal.addCallback(lambda _: self._answer_later(request, admission))
                return NOT_DONE_YET
            return refusal
        parts = admission.parts
        count = len(parts)
        first = parts[1]
        server = admission.server
        if first == b"admin":
            # _check refused it unless the admin API is served here.
            assert self.app.admin is not None
            answer: bytes | int = self.app.admin.render(request)
            return answer
        elif first == b"metrics":
            if count == 2 and self.app.metrics is not None:
                metrics: bytes | int = self.app.metrics.render(request)
                return metrics
        elif server is not None:
            endpoint = endpoint_of(parts)
            if endpoint is not None:
                return dispatch(self.app, request, endpoint, server)
        return self._route(request)

    def _route(self, request: Request) -> bytes | int:
        try:
            page: bytes | int = self.routes.render(request)
            return page
        except BadHost:
            return HTTPProblem(
                400,
                jsonrpc.INVALID_REQUEST,
                f"Bad Request: invalid Host header {header(request, b'host')!r}",
            ).render(request)

    def _metadata(self, request: Request, path: bytes) -> bytes:
        """OAuth protected-resource metadata (RFC 9728), public by design."""
        if request.method not in (b"GET", b"HEAD"):
            return HTTPProblem(
                405, jsonrpc.INVALID_REQUEST, "Method Not Allowed", headers={b"allow": b"GET"}
            ).render(request)
        document = self.app.access.protected_resource(request, path)
        if document is None:
            return HTTPProblem(404, jsonrpc.INVALID_REQUEST, "Not Found").render(request)
        request.setHeader(b"cache-control", b"max-age=300")
        return json_body(request, document)


def _cross_site(request: Request, origin: str | None, host: str | None) -> HTTPProblem | None:
    """The refusal of an admin request from a browser page other than the
    bridge's own: an Origin that is not exactly the scheme and C{Host} it
    was sent to (not even one of C{allowed_origins}), or a
    C{Sec-Fetch-Site} other than C{same-origin} (C{none}, a URL the user
    typed, is fine without an Origin). The name need not be listed in
    C{allowed_hosts}: a browser keeps Basic credentials per origin, so a
    page that rebinds its own name to the bridge has none to send."""
    site = header(request, b"sec-fetch-site")
    site = site.strip().lower() if site is not None else None
    if origin is None:
        foreign = site in ("cross-site", "same-site")
    else:
        foreign = (site is not None and site != "same-origin") or not own_origin(
            origin, host, request.isSecure()
        )
    if not foreign:
        return None
    return HTTPProblem(
        403,
        jsonrpc.FORBIDDEN,
        "Forbidden: the admin API answers only the bridge's own pages (same origin)",
    )


def _segments(path: bytes) -> list[bytes] | None:
    """The path split on C{/} (C{b""} first), or None unless it is canonical:
    no percent-escapes, empty segments (no trailing slash) or dot segments.
    Split once here, it serves every later decision about the request."""
    if path == b"/":
        return [b"", b""]
    if not path.startswith(b"/") or b"%" in path or b"\\" in path:
        return None
    parts = path.split(b"/")
    if not all(s and s not in (b".", b"..") for s in parts[1:]):
        return None
    return parts


class BridgeApp:
    """Serves every configured server under C{/servers/NAME/}."""

    app = Klein()

    def __init__(
        self,
        config: BridgeConfig,
        backends: Mapping[str, Backend],
        registry: SessionRegistry,
        clock: IReactorTime,
        access: AccessControl | None = None,
    ) -> None:
        self.config = config
        self.backends = backends
        self.registry = registry
        self.clock = clock
        self.access = access if access is not None else AccessControl.from_config(config, clock)
        # Backends of removed or changed servers whose sessions are draining.
        self.draining: Mapping[Backend, object] = {}
        # The aggregating endpoints, by "endpoints/NAME".
        self.endpoints: Mapping[str, AggregateBackend] = {}
        # The pins of every server's tools (the service sets them).
        self.pins: PinBook | None = None
        # Mounted by the service: the admin API at /admin/, metrics at /metrics.
        self.admin: IResource | None = None
        self.metrics: IResource | None = None
        self.origins = OriginPolicy(config.allowed_origins)
        self.hosts = HostPolicy(config.allowed_hosts)
        self.metrics_hosts = HostPolicy(config.metrics.allowed_hosts)
        self.heartbeat = Heartbeat(clock, config.heartbeat_interval)
        # "ok", or "draining": the balancer must send new sessions elsewhere.
        self.node_state = "ok"
        # Signs the requestState of stateless calls waiting for their client's input.
        cluster = config.cluster
        self.signer = StateSigner()
        # In a cluster: sends a retry to the node holding its call (the
        # service plugs in the registry of nodes).
        self.forwarder: Forwarder | None = None
        # Follows each request in spans (the service plugs it in with [telemetry]).
        self.tracer: Tracer | None = None
        # The tasks of 2026-07-28 clients (the tasks extension).
        self.tasks = TaskStore(
            clock, config.tasks, cluster.node_id if cluster is not None else None
        )
        if cluster is not None:
            keys = ClusterKeys(cluster.keys)
            self.signer = StateSigner(node=cluster.node_id, keys=keys)
            self.forwarder = Forwarder(cluster.node_id, keys, clock)

    def reconfigure(self, config: BridgeConfig) -> None:
        """A reload's bridge-wide settings (the backends dict is updated in place)."""
        self.config = config
        self.origins = OriginPolicy(config.allowed_origins)
        self.hosts = HostPolicy(config.allowed_hosts)
        self.metrics_hosts = HostPolicy(config.metrics.allowed_hosts)
        self.tasks.configure(config.tasks)
        keys = cluster_keys(config.cluster.keys if config.cluster is not None else None)
        if keys is not None:
            self.signer.rekey(keys)
            if self.forwarder is not None:
                self.forwarder.rekey(keys)
        if config.heartbeat_interval != self.heartbeat.interval:
            self.heartbeat.interval = config.heartbeat_interval
            if self.heartbeat.running:
                self.heartbeat.stop()
                self.heartbeat.start()

    def resource(self) -> IResource:
        return Gate(self, self.app.resource())

    def screen(
        self,
        request: Request,
        origin: str | None,
        operator: bool,
        hosts: HostPolicy | None = None,
        admin: bool = False,
    ) -> HTTPProblem | None:
        """The refusal of a request by its Host and Origin, on any listener: a
        Host not in C{allowed_hosts} (or C{hosts}: DNS rebinding: 421), an
        Origin not in C{allowed_origins} (other than the bridge's own), or
        on an operator route (the admin API, metrics) any Origin but, under
        C{/admin/} (C{admin}), the bridge's own (the dashboard), since a page
        that can reach loopback must not drive them (403). Under C{/admin/},
        a request a browser says comes from another site (C{Sec-Fetch-Site})
        is refused too: the dashboard's Basic credentials are sent by the
        browser whatever page asks."""
        host = header(request, b"host")
        if not (hosts if hosts is not None else self.hosts).allows(host):
            return HTTPProblem(
                421,
                jsonrpc.MISDIRECTED,
                f"Misdirected Request: host {host!r} is not served here (allowed_hosts)",
            )
        if admin:
            # Stricter than allowed_origins: the bridge's own origin only.
            return _cross_site(request, origin, host)
        if (
            origin is not None
            and not self.origins.allows(origin)
            and not same_origin(origin, host, request.isSecure(), self.hosts)
        ):
            return HTTPProblem(
                403, jsonrpc.FORBIDDEN, f"Forbidden: origin {origin!r} is not allowed"
            )
        if origin is not None and operator:
            return HTTPProblem(
                403,
                jsonrpc.FORBIDDEN,
                "Forbidden: the admin API and metrics are not for browsers",
            )
        return None

    def backend(self, name: str, draining: bool = False) -> Backend:
        """The server's backend; with C{draining}, also one a reload retired
        (its existing sessions go on until they end or are closed)."""
        backend = self.backends.get(name)
        if backend is None and name.startswith(ENDPOINT_PREFIX):
            backend = self.endpoints.get(name)
            if backend is None:
                raise HTTPProblem(
                    404,
                    jsonrpc.INVALID_REQUEST,
                    f"Not Found: no endpoint is named {name[len(ENDPOINT_PREFIX) :]!r}",
                )
        if backend is None and draining:
            backend = next((b for b in self.draining if b.server.name == name), None)
        if backend is None:
            raise HTTPProblem(
                404,
                jsonrpc.INVALID_REQUEST,
                f"Not Found: no MCP server is named {name!r}",
            )
        return backend

    def open_session(
        self,
        request: Request,
        backend: Backend,
        transport: str,
        sink_factory: Callable[[str], Sink],
        request_id: RequestId | None = None,
    ) -> ClientSession:
        """A new session for this request's principal, or the HTTP refusal
        (429 past the principal's share, 503 when the bridge or server is full,
        or this node drains: the balancer tries another node)."""
        if self.node_state == "draining":
            raise HTTPProblem(
                503,
                jsonrpc.SERVER_UNAVAILABLE,
                "Service Unavailable: this node is draining; open the session again "
                "(another node of the cluster takes it)",
                request_id,
                headers={b"retry-after": b"1"},
            )
        with self.refusing_sessions(request, backend.server.name, request_id):
            session = self.registry.create(
                backend,
                transport,
                sink_factory,
                principal_id(request),
                peer_of(request),
                principal_of(request).claims,
            )
        self._admit(request, session)
        return session

    def find_session(
        self, request: Request, session_id: str | None, name: str
    ) -> ClientSession | None:
        """The open session with this id on this server, if this request's
        principal opened it; what it may see follows the principal's grants
        as this request presents them."""
        session = self.registry.get(session_id, name, principal_id(request))
        if session is not None:
            # What it may see follows the credentials, and the address, of each request.
            admitted = (principal_of(request), peer_of(request))
            if session.admitted_as != admitted:
                self._admit(request, session)
        return session

    def _admit(self, request: Request, session: ClientSession) -> None:
        """Give a session what its principal may see: an endpoint's guard, or
        a server's tool view."""
        principal = principal_of(request)
        session.admitted_as = (principal, peer_of(request))
        if isinstance(session.upstream, AggregateUpstream):
            session.upstream.guard = self.access.guard(principal, peer_of(request))
        else:
            session.view = self.tool_view(request, session.backend)

    def refresh(
        self, request: Request, session: ClientSession, request_id: RequestId | None
    ) -> None:
        """Before a session's requests: a child per principal gets its
        credentials as this request presents them (a changed JWT claim or
        secret restarts it), or the 403 that names the one missing."""
        upstream = session.upstream
        if upstream is None or not session.backend.per_principal:
            return
        session.claims = principal_of(request).claims
        with self.refusing_sessions(request, session.server, request_id):
            session.backend.refresh(session, upstream)

    def tool_view(self, request: Request, backend: Backend) -> ToolView | None:
        """What of a server's tools this request's principal may see and call."""
        server = backend.server
        return ToolView.of(server, principal_of(request).tools(server.name), self.pins)

    @contextlib.contextmanager
    def refusing_sessions(
        self, request: Request, server: str, request_id: RequestId | None
    ) -> Iterator[None]:
        """Turn a session that cannot be opened into its HTTP refusal, audited."""
        try:
            yield
        except CredentialError as e:
            self.access.audit.credential_missing(
                principal=principal_id(request), peer=peer_of(request), server=server, reason=str(e)
            )
            raise HTTPProblem(403, jsonrpc.FORBIDDEN, f"Forbidden: {e}", request_id) from None
        except PrincipalCapacityError as e:
            raise self.refused(
                request,
                server,
                "children-per-principal",
                429,
                f"Too Many Requests: {e}; end one of its sessions first",
                CHILD_SHARE_RETRY,
                request_id,
            ) from None
        except PrincipalLimitError as e:
            raise self.refused(
                request,
                server,
                "sessions-per-principal",
                429,
                f"Too Many Requests: {e}",
                60,
                request_id,
            ) from None
        except SessionLimitError as e:
            raise self.refused(
                request, server, "sessions", 503, f"Service Unavailable: {e}", 5, request_id
            ) from None
        except CapacityError as e:
            raise self.refused(
                request, server, "children", 503, f"Service Unavailable: {e}", 5, request_id
            ) from None

    def refused(
        self,
        request: Request,
        server: str | None,
        scope: str,
        status: int,
        message: str,
        retry_after: int,
        request_id: RequestId | None = None,
    ) -> HTTPProblem:
        """The refusal of this request by a cap (C{scope} says which), audited."""
        return self.access.refusal(
            principal_id(request),
            peer_of(request),
            server,
            scope,
            status,
            message,
            retry_after,
            request_id,
        )

    def stream(self, request: Request, label: str) -> EventConnection:
        """Start an SSE response on this request, kept alive by the heartbeat."""
        release = self.count_stream(request)
        connection = EventConnection(request, self.clock, self.config.stream_buffer, label)
        self.heartbeat.add(connection)
        connection.done.addBoth(lambda _: release())
        return connection

    def count_stream(self, request: Request) -> Callable[[], None]:
        """Count a stream of this request's principal (or refuse: too many);
        what gives it back when the stream ends."""
        principal = principal_id(request)
        caps = self.access.caps
        # Without authentication, max_sessions and the heartbeat bound streams.
        if principal == "anonymous":
            return lambda: None
        if not caps.open_stream(principal):
            raise self.refused(
                request,
                None,
                "streams-per-principal",
                429,
                "Too Many Requests: this client already holds "
                f"{self.config.limits.max_streams_per_principal} streams "
                "(limits.max_streams_per_principal)",
                5,
            )
        return lambda: caps.close_stream(principal)

    # Status (the message endpoints are dispatched by the Gate)

    @app.route("/", methods=["GET"])
    @guarded
    def index(self, request: Request) -> bytes:
        return json_body(
            request,
            {
                "name": "mcptwist",
                "version": __version__,
                "servers": {
                    name: {
                        "streamable_http": f"/servers/{name}/mcp",
                        "sse": f"/servers/{name}/sse",
                        "websocket": f"/servers/{name}/ws",
                    }
                    for name in self.backends
                    if principal_of(request).may_use(name)
                },
                "endpoints": {
                    e.aggregate.name: {
                        "streamable_http": f"/{key}/mcp",
                        "sse": f"/{key}/sse",
                        "websocket": f"/{key}/ws",
                    }
                    for key, e in self.endpoints.items()
                    if self._may_see(principal_of(request), e)
                },
            },
        )

    @staticmethod
    def _may_see(principal: Principal, endpoint: AggregateBackend) -> bool:
        return any(principal.may_use(m) for m in endpoint.aggregate.members)

    @app.route("/servers", methods=["GET"])
    @guarded
    def servers(self, request: Request) -> bytes:
        principal = principal_of(request)
        return json_body(
            request,
            {
                "servers": [
                    self._status(b) for name, b in self.backends.items() if principal.may_use(name)
                ],
                "endpoints": [
                    self._endpoint_status(e, principal)
                    for e in self.endpoints.values()
                    if self._may_see(principal, e)
                ],
            },
        )

    def _endpoint_status(self, endpoint: AggregateBackend, principal: Principal) -> dict[str, Any]:
        status = endpoint.status()
        status["servers"] = [s for s in status["servers"] if principal.may_use(s["name"])]
        status["sessions"] = self.registry.count(endpoint.server.name)
        return status

    @app.route("/servers/<name>", methods=["GET"])
    @guarded
    def server(self, request: Request, name: str) -> bytes:
        return json_body(request, self._status(self.backend(name)))

    @app.route("/health", methods=["GET"])
    @guarded
    def health(self, request: Request) -> bytes:
        problems, held = self._problems()
        status = self._health_word(problems)
        if status in ("unhealthy", "draining"):
            request.setResponseCode(503)
        body: dict[str, Any] = {"status": status}
        cluster = self._cluster_view()
        # Anyone may ask (load balancers have no token); with authentication on,
        # the answer names no server.
        if not self.config.auth.enabled:
            states = {
                name: problems.get(name) or held.get(name, "running") for name in self.backends
            }
            body["servers"] = problems if problems else states
            body["endpoints"] = {
                e.aggregate.name: {name: states.get(name, "absent") for name in e.aggregate.members}
                for e in self.endpoints.values()
            }
        if cluster is not None:
            body["cluster"] = cluster
        return json_body(request, body)

    def health_status(self) -> str:
        """What C{/health} says of this node: C{ok}; C{degraded} (it serves,
        but its cluster's Redis is unavailable: its limits are its own);
        C{unhealthy} (a server is down: 503); C{draining} (it stops: 503, so
        that the balancer sends new sessions elsewhere)."""
        return self._health_word(self._problems()[0])

    def _health_word(self, problems: Mapping[str, str]) -> str:
        if self.node_state == "draining":
            return "draining"
        if problems:
            return "unhealthy"
        store = self.access.store
        if store is not None and not store.up:
            return "degraded"
        return "ok"

    def _cluster_view(self) -> dict[str, Any] | None:
        """This node as its cluster sees it: its id, and whether Redis is up."""
        cluster = self.config.cluster
        if cluster is None:
            return None
        store = self.access.store
        redis = None if store is None else ("up" if store.up else "down")
        return {"node_id": cluster.node_id, "redis": redis}

    def _problems(self) -> tuple[dict[str, str], dict[str, str]]:
        """The servers that are not serving (by name, why), and those an
        operator stopped on purpose."""
        problems = {}
        held = {}
        for name, backend in self.backends.items():
            status = backend.status()
            if backend.held:
                # Stopped on purpose by an operator: not a fault of the bridge.
                held[name] = "stopped by an operator"
            else:
                # A dual-era server's second child counts as much as its first.
                for child in (status, status.get("modern_child") or {"state": "running"}):
                    if child["state"] != "running":
                        problems[name] = child["state"] + (
                            f": {child['last_exit']}" if child.get("last_exit") else ""
                        )
                    elif child.get("unresponsive"):
                        problems[name] = _unresponsive(child)
                blocked = self.pins.blocked(backend.server) if self.pins is not None else None
                if blocked is not None:
                    problems[name] = blocked
        return problems, held

    def _status(self, backend: Backend) -> dict[str, Any]:
        status = backend.status()
        status["sessions"] = self.registry.count(backend.server.name)
        return status

    # Errors for what no route matched

    not_found = app.handle_errors(NotFound)(route_not_found)
    not_allowed = app.handle_errors(MethodNotAllowed)(route_not_allowed)


def _unresponsive(status: dict[str, Any]) -> str:
    """Why /health finds a running server unresponsive."""
    if "children" in status:
        return (
            f"unresponsive: none of its {len(status['children'])} children has answered "
            "its last requests (each timed out)"
        )
    return (
        f"unresponsive: {status['consecutive_timeouts']} requests timed out since its child "
        "last said anything"
    )
