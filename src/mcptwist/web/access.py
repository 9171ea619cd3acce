# -*- test-case-name: tests.test_access -*-
"""Every request's admission: headers, CORS, client address, who, may they, how often.

The L{Gate} asks, in this order: is the Host and Origin acceptable (DNS
rebinding), is this a CORS preflight (answered here, before credentials,
as browsers send none), which client is this (the peer, or what a trusted
proxy says), is that client allowed on this listener and server, who is it
(bearer token or JWT, through twisted.cred), may it use this server, and is
it within its rate limits. Refusals are JSON-RPC error bodies with the
status a client can act on, and each is written to the audit trail.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, Any, Final

import attrs
from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest
from twisted.web.server import Request

from mcptwist.config.model import (
    AuditConfig,
    BridgeConfig,
    ListenerConfig,
    ServerConfig,
    endpoint_key,
)
from mcptwist.mcp import jsonrpc
from mcptwist.mcp.naming import NameFilter
from mcptwist.ops.audit import AuditTrail
from mcptwist.security.auth import Authenticator, AuthFailure, Principal
from mcptwist.security.ipfilter import AddressPolicy, forwarded_client, rate_key
from mcptwist.security.origin import is_local_address
from mcptwist.security.ratelimit import Caps, RateLimiter, Refusal, retry_after_header

from .admission import Verdict, admission_of, peer_of, principal_of
from .http import HTTPProblem, Undecided, header

if TYPE_CHECKING:
    from mcptwist.cluster.store import Store
    from mcptwist.mcp.jsonrpc import RequestId
    from mcptwist.routing.sessions import ClientSession

PRM_PATH: Final = b"/.well-known/oauth-protected-resource"
# Headers a browser client may send, and may read, across origins.
CORS_ALLOW_HEADERS: Final = (
    b"authorization, content-type, accept, last-event-id, mcp-session-id, "
    b"mcp-protocol-version, mcp-method, mcp-name"
)
CORS_EXPOSE_HEADERS: Final = b"mcp-session-id, mcp-protocol-version, www-authenticate, retry-after"
CORS_METHODS: Final = b"GET, POST, DELETE, OPTIONS"
CSP: Final = b"default-src 'none'; frame-ancestors 'none'; base-uri 'none'"
# Seconds a client with too many requests in flight is told to wait.
IN_FLIGHT_RETRY: Final = 1.0
_SERVER_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AccessControl:
    """The admission rules of one configuration, shared by every listener.

    With a cluster's L{Store} (C{[cluster] redis}), the bridge-wide rate
    limits are decided in Redis, which a request's admission waits for:
    L{authorise} and L{charge_messages} raise L{Undecided} until the
    verdict, kept on the request's admission, is known, and the gate or the
    handler asks again then; L{limit_address} is replaced by
    L{address_verdict}. Without one, nothing waits.
    """

    def __init__(
        self,
        config: BridgeConfig,
        authenticator: Authenticator,
        limiter: RateLimiter,
        caps: Caps,
        audit: AuditTrail,
        store: Store | None = None,
    ) -> None:
        self.config = config
        # The cluster's shared state (None: every limit is this node's own).
        self.store = store
        self.auth = config.auth
        self.authenticator = authenticator
        self.limiter = limiter
        self.caps = caps
        self.audit = audit
        self.server_policies: Mapping[str, AddressPolicy] = {
            name: AddressPolicy(allow=s.allow, deny=s.deny, unix_peers="allow")
            for name, s in config.servers.items()
            if s.allow or s.deny
        }
        self.endpoint_members = _endpoint_members(config)
        self._listener_policies: dict[int, AddressPolicy] = {}
        # Which configuration a request was admitted under (see reconfigure).
        self.generation = 0

    @classmethod
    def from_config(
        cls,
        config: BridgeConfig,
        clock: Any,
        audit: AuditTrail | None = None,
        fetch: Any = None,
        store: Store | None = None,
    ) -> AccessControl:
        limits = config.limits
        return cls(
            config,
            Authenticator(config.auth, clock, fetch),
            RateLimiter(
                limits, {n: s.limits for n, s in config.servers.items()}, clock, store=store
            ),
            Caps.from_limits(limits),
            audit if audit is not None else AuditTrail(AuditConfig(), clock),
            store,
        )

    def reconfigure(self, config: BridgeConfig, clock: Any, fetch: Any = None) -> None:
        """Take a reloaded configuration: tokens, JWT, limits and address rules
        change in place; counts of open streams and sessions carry over.

        What can fail is built first: if it raises, nothing has changed.
        Requests admitted from their head under the old configuration are
        judged again when they are handled.
        """
        old = self.config
        authenticator = self.authenticator
        if config.auth != old.auth:
            authenticator = Authenticator(config.auth, clock, fetch)
        server_limits = {n: s.limits for n, s in config.servers.items()}
        limiter = self.limiter
        if config.limits != old.limits or server_limits != {
            n: s.limits for n, s in old.servers.items()
        }:
            limiter = RateLimiter(config.limits, server_limits, clock, store=self.store)
        if authenticator is not self.authenticator:
            self.authenticator.stop()
            self.authenticator = authenticator
            authenticator.start()
        if limiter is not self.limiter:
            self.limiter.stop()
            self.limiter = limiter
            limiter.start()
        self.config = config
        self.auth = config.auth
        self.caps.set_limits(
            config.limits.max_streams_per_principal,
            config.limits.max_sessions_per_principal,
            config.limits.max_in_flight_per_principal,
        )
        self.server_policies = {
            name: AddressPolicy(allow=s.allow, deny=s.deny, unix_peers="allow")
            for name, s in config.servers.items()
            if s.allow or s.deny
        }
        self.endpoint_members = _endpoint_members(config)
        self._listener_policies.clear()
        self.generation += 1

    def server_added(self, server: ServerConfig) -> None:
        """A server added at run time (admin API) brings its address rules and limits."""
        policies = dict(self.server_policies)
        policies.pop(server.name, None)
        if server.allow or server.deny:
            policies[server.name] = AddressPolicy(
                allow=server.allow, deny=server.deny, unix_peers="allow"
            )
        self.server_policies = policies
        self.limiter.server_limits[server.name] = server.limits

    def start(self) -> None:
        self.authenticator.start()
        self.limiter.start()

    def stop(self) -> None:
        self.authenticator.stop()
        self.limiter.stop()

    # Headers every answer carries

    def common_headers(self, request: Request) -> None:
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-security-policy", CSP)
        request.setHeader(b"referrer-policy", b"no-referrer")
        listener = listener_of(request)
        if listener is not None and listener.tls is not None and listener.tls.hsts_max_age:
            request.setHeader(
                b"strict-transport-security",
                b"max-age=%d" % listener.tls.hsts_max_age,
            )

    # CORS

    def cors(self, request: IRequest, origin: str | None) -> bytes | None:
        """Add CORS headers for an allowed Origin; the answer to a preflight, if it is one."""
        if origin is None:
            return None
        request.setHeader(b"access-control-allow-origin", origin.encode("latin-1"))
        request.setHeader(b"vary", b"origin")
        if request.method == b"OPTIONS" and request.getHeader(b"access-control-request-method"):
            request.setResponseCode(204)
            request.setHeader(b"access-control-allow-methods", CORS_METHODS)
            request.setHeader(b"access-control-allow-headers", CORS_ALLOW_HEADERS)
            request.setHeader(b"access-control-max-age", b"600")
            return b""
        request.setHeader(b"access-control-expose-headers", CORS_EXPOSE_HEADERS)
        return None

    # The client's address

    def client_ip(self, request: Request) -> str | None:
        """The client's IP: the peer, or, from a trusted proxy, what it forwarded.

        None for a Unix-socket peer. Refuses (403) a forwarded client that the
        listener's allow/deny lists exclude.
        """
        peer = getattr(request.getClientAddress(), "host", None)
        listener = listener_of(request)
        if peer is None or listener is None or not listener.trusted_proxies:
            return peer
        forwarded = request.requestHeaders.getRawHeaders(b"x-forwarded-for")
        values = [v.decode("latin-1") for v in forwarded] if forwarded else []
        client = forwarded_client(peer, values, listener.trusted_proxies)
        if client is not None and client != peer:
            policy = self._listener_policy(listener)
            if not policy.allows_ip(client):
                self.audit.ip_refused(peer=client, listener=listener.endpoint, scope="listener")
                raise HTTPProblem(
                    403, jsonrpc.FORBIDDEN, "Forbidden: your address is not allowed here"
                )
        return client

    def _listener_policy(self, listener: ListenerConfig) -> AddressPolicy:
        policy = self._listener_policies.get(id(listener))
        if policy is None:
            policy = AddressPolicy.from_listener(listener)
            self._listener_policies[id(listener)] = policy
        return policy

    # Authentication

    def failure_problem(
        self, request: IRequest, failure: AuthFailure, ip: str | None, route: str
    ) -> HTTPProblem:
        """The 401 for missing or bad credentials (503 while keys cannot be had), audited."""
        self.audit.auth_failure(peer=ip, reason=failure.reason, route=route)
        if failure.status != 401:
            return HTTPProblem(
                failure.status,
                jsonrpc.AUTH_UNAVAILABLE,
                f"Service Unavailable: cannot check credentials now ({failure.reason})",
                headers={b"retry-after": b"30"},
            )
        challenge = self.authenticator.www_authenticate(self.metadata_url(request, route), failure)
        return HTTPProblem(
            401,
            jsonrpc.UNAUTHORIZED,
            f"Unauthorized: {failure.reason}",
            headers={b"www-authenticate": challenge},
        )

    def metadata_url(self, request: IRequest, route: str) -> str | None:
        """The RFC 9728 metadata URL for a route, when OAuth discovery is configured."""
        if not self.auth.authorization_servers:
            return None
        suffix = route if route.startswith("/servers/") else ""
        return self.base_url(request) + PRM_PATH.decode() + suffix

    def base_url(self, request: IRequest) -> str:
        if self.auth.resource_url:
            return self.auth.resource_url
        scheme = "https" if request.isSecure() else "http"
        host = header(request, b"host") or "localhost"
        return f"{scheme}://{host}"

    def protected_resource(self, request: IRequest, path: bytes) -> dict[str, Any] | None:
        """The RFC 9728 document for C{/.well-known/oauth-protected-resource[/PATH]}."""
        if not self.auth.authorization_servers:
            return None
        suffix = path[len(PRM_PATH) :].decode("utf-8", "replace")
        # Any well-formed endpoint gets an answer, so that this public document
        # does not tell which servers exist.
        if suffix and not _is_server_route(suffix):
            return None
        document: dict[str, Any] = {
            "resource": self.base_url(request) + suffix,
            "authorization_servers": list(self.auth.authorization_servers),
            "bearer_methods_supported": ["header"],
            "resource_name": "mcptwist",
        }
        jwt = self.auth.jwt
        if jwt is not None:
            document["scopes_supported"] = [jwt.server_scope_prefix + "*", jwt.admin_scope]
        return document

    # Authorisation and limits

    def authorise(
        self, request: IRequest, principal: Principal, ip: str | None, server: str | None
    ) -> None:
        """Raise the HTTPProblem that refuses this principal this route, if any.

        An endpoint (C{endpoints/NAME}) is open to a principal that may use
        any of its servers; what it sees there is the L{ClientGuard}'s business.
        """
        members = self.endpoint_members.get(server) if server is not None else None
        if members is not None:
            usable = any(principal.may_use(m) for m in members)
        else:
            usable = server is None or principal.may_use(server)
        if not usable:
            self.audit.access_refused(
                principal=principal.id, peer=ip, server=server, route=route_of(request)
            )
            # The same answer whether or not the server exists.
            raise HTTPProblem(
                403,
                jsonrpc.FORBIDDEN,
                f"Forbidden: {principal.name!r} may not use this server",
            )
        if server is not None and ip is not None:
            policy = self.server_policies.get(server)
            if policy is not None and not policy.allows_ip(ip):
                self.audit.ip_refused(peer=ip, listener=server, scope="server")
                raise HTTPProblem(
                    403,
                    jsonrpc.FORBIDDEN,
                    "Forbidden: your address may not use this server",
                )
        # Without authentication every client is "anonymous": only per-IP limits
        # can tell them apart.
        who = principal.id if principal.kind != "anonymous" else None
        if self.store is None:
            refusal = self.limiter.check(who, rate_key(ip), server, ip_charged=self.auth.enabled)
        else:
            refusal = self._verdict(
                request, "request", who, rate_key(ip), server, ip_charged=self.auth.enabled
            )
        if refusal is not None:
            raise self._limited(refusal, principal.id, ip, server)

    def _verdict(
        self,
        request: IRequest,
        what: str,
        who: str | None,
        key: str | None,
        server: str | None,
        ip_charged: bool = False,
        cost: int = 1,
        paid: int = 0,
    ) -> Refusal | None:
        """The shared rate limits' verdict on what this request is charged for
        (C{what}), asked once and kept on its admission; L{Undecided} while
        the store has not answered (a store that is down answers at once)."""
        admission = admission_of(request)  # type: ignore[arg-type]
        if admission is None:
            # No gate judged it, so there is nowhere to keep a verdict: this node decides.
            return self.limiter.check(who, key, server, ip_charged, cost, paid)
        verdicts = admission.verdicts
        if verdicts is None:
            verdicts = admission.verdicts = {}
        verdict = verdicts.get(what)
        if verdict is None:
            decision = self.limiter.decide(who, key, server, ip_charged, cost, paid)
            verdict = verdicts[what] = Verdict(decision)
        if not verdict.known:
            raise Undecided(verdict.ready())
        return verdict.refusal

    def guard(self, principal: Principal, ip: str | None) -> ClientGuard:
        """What this client may see and use of an endpoint's servers."""
        return ClientGuard(self, principal, ip)

    def limit_address(self, ip: str | None) -> None:
        """Before authentication, charge the client's address: floods of bad
        credentials are throttled (and cost one audit line) like anything else."""
        if not self.auth.enabled:
            return
        refusal = self.limiter.check(None, rate_key(ip), None)
        if refusal is not None:
            raise self._limited(refusal, None, ip, None)

    def address_verdict(self, ip: str | None) -> Deferred[HTTPProblem | None]:
        """L{limit_address} with the cluster's shared limits: the refusal, if any,
        once the store has answered."""
        d = self.limiter.decide(None, rate_key(ip), None)
        return d.addCallback(
            lambda refusal: None if refusal is None else self._limited(refusal, None, ip, None)
        )

    def charge_messages(self, request: Request, server: str, count: int) -> None:
        """A POST's body holds C{count} JSON-RPC messages: refuse a batch longer
        than C{limits.max_batch} or C{limits.max_in_flight_per_session} (413),
        and charge each message after the first (the request's admission paid
        for that one) to the same buckets, or refuse the whole batch (429)
        before any of it is delivered."""
        if count <= 1:
            return
        principal = principal_of(request)
        ip = peer_of(request)
        limits = self.config.limits
        # A batch's requests are in flight together: no more than a session may hold.
        largest, key = min(
            (limits.max_batch, "max_batch"),
            (limits.max_in_flight_per_session, "max_in_flight_per_session"),
        )
        if count > largest:
            raise self.refusal(
                principal.id,
                ip,
                server,
                "batch",
                413,
                f"Content Too Large: this batch holds {count} messages, more than "
                f"limits.{key} ({largest}); send smaller batches",
                None,
            )
        who = principal.id if principal.kind != "anonymous" else None
        if self.store is None:
            refusal = self.limiter.check(who, rate_key(ip), server, cost=count - 1, paid=1)
        else:
            refusal = self._verdict(
                request, "batch", who, rate_key(ip), server, cost=count - 1, paid=1
            )
        if refusal is None:
            return
        if refusal.burst is not None:
            raise self.refusal(
                principal.id,
                ip,
                server,
                refusal.scope,
                413,
                f"Content Too Large: a batch of {count} messages costs {count} requests of "
                f"the {refusal.scope} rate limit, whose burst is {refusal.burst}; "
                "send smaller batches",
                None,
            )
        raise self._limited(refusal, principal.id, ip, server)

    def charge_frame(
        self, request: Request, server: str, count: int
    ) -> HTTPProblem | Deferred[HTTPProblem | None] | None:
        """C{count} messages that arrived in one WebSocket frame, charged to the
        buckets a POSTed message is charged to (the upgrade request paid for
        itself only): their refusal (429, or 413 for a batch no bucket can
        ever hold), if any; with a cluster store, a Deferred of it."""
        principal = principal_of(request)
        ip = peer_of(request)
        who = principal.id if principal.kind != "anonymous" else None

        def answer(refusal: Refusal | None) -> HTTPProblem | None:
            if refusal is None:
                return None
            if refusal.burst is not None:
                return self.refusal(
                    principal.id,
                    ip,
                    server,
                    refusal.scope,
                    413,
                    f"Content Too Large: {count} messages cost more than the burst "
                    f"({refusal.burst}) of the {refusal.scope} rate limit; send fewer at once",
                    None,
                )
            return self._limited(refusal, principal.id, ip, server)

        if self.store is None:
            return answer(self.limiter.check(who, rate_key(ip), server, cost=count))
        return self.limiter.decide(who, rate_key(ip), server, cost=count).addCallback(answer)

    def admit_requests(
        self,
        request: Request,
        session: ClientSession,
        count: int,
        request_id: RequestId | None = None,
    ) -> None:
        """Refuse (429) C{count} more requests on a session, or on a principal's
        stateless hub, that would pass C{limits.max_in_flight_per_session} or
        the principal's C{limits.max_in_flight_per_principal}."""
        limits = self.config.limits
        held = session.in_flight
        if held + count > limits.max_in_flight_per_session:
            scope = "in-flight-session"
            text = (
                f"this session already has {held} requests in flight "
                f"(limits.max_in_flight_per_session is {limits.max_in_flight_per_session})"
            )
        elif session.caps is not None and (
            session.caps.requests(session.principal) + count > limits.max_in_flight_per_principal
        ):
            scope = "in-flight-principal"
            text = (
                f"this client already has {session.caps.requests(session.principal)} requests "
                f"in flight (limits.max_in_flight_per_principal is "
                f"{limits.max_in_flight_per_principal})"
            )
        else:
            return
        raise self.refusal(
            session.principal,
            peer_of(request),
            session.server,
            scope,
            429,
            f"Too Many Requests: {text}; wait for their answers",
            IN_FLIGHT_RETRY,
            request_id,
        )

    def _limited(
        self, refusal: Refusal, principal: str | None, ip: str | None, server: str | None
    ) -> HTTPProblem:
        return self.refusal(
            principal,
            ip,
            server,
            refusal.scope,
            429,
            f"Too Many Requests: the {refusal.scope} rate limit is reached; retry later",
            refusal.retry_after,
        )

    def refusal(
        self,
        principal: str | None,
        ip: str | None,
        server: str | None,
        scope: str,
        status: int,
        message: str,
        retry_after: float | None,
        request_id: RequestId | None = None,
    ) -> HTTPProblem:
        """The one answer to a request a rate limit or cap refuses (C{scope}
        says which), written to the audit trail as C{rate_limited}: 429 or 503
        with C{Retry-After}, or 413 (C{retry_after} None) for what no retry
        would change."""
        self.audit.rate_limited(
            principal=principal,
            peer=ip,
            server=server,
            scope=scope,
            retry_after=retry_after or 0.0,
        )
        if retry_after is None:
            return HTTPProblem(status, jsonrpc.INVALID_REQUEST, message, request_id)
        return HTTPProblem(
            status,
            jsonrpc.RATE_LIMITED,
            message,
            request_id,
            {b"retry-after": retry_after_header(retry_after)},
        )

    def require_admin(
        self, request: IRequest, principal: Principal, ip: str | None, every_server: bool = False
    ) -> None:
        """Refuse (403, audited) a principal without the admin scope, or, with
        C{every_server}, one whose grants do not name every server."""
        missing = None
        if not principal.admin:
            missing = "the admin scope"
        elif every_server and "*" not in principal.servers:
            missing = 'a grant of every server (servers = ["*"])'
        if missing is not None:
            self.audit.access_refused(
                principal=principal.id, peer=ip, server=None, route=route_of(request)
            )
            raise HTTPProblem(403, jsonrpc.FORBIDDEN, f"Forbidden: this needs {missing}")


def _endpoint_members(config: BridgeConfig) -> dict[str, tuple[str, ...]]:
    return {endpoint_key(name): e.servers for name, e in config.endpoints.items()}


@attrs.frozen
class ClientGuard:
    """One client on an endpoint: the servers its grants and address allow,
    the tools its grants name, and each server's own rate limits."""

    access: AccessControl
    principal: Principal
    ip: str | None

    @property
    def key(self) -> Hashable:
        """Clients with the same grants (and address, where a server's rules
        depend on it) see the same."""
        return (self.principal.servers, self.ip if self.access.server_policies else None)

    def sees(self, server: str) -> bool:
        if not self.principal.may_use(server):
            return False
        policy = self.access.server_policies.get(server)
        return policy is None or self.ip is None or policy.allows_ip(self.ip)

    def tool(self, server: str, name: str) -> bool:
        patterns = self.principal.tools(server)
        return patterns is None or NameFilter(include=patterns).allows(name)

    def admit(self, server: str) -> str | None:
        principal = self.principal
        who = principal.id if principal.kind != "anonymous" else None
        refusal = self.access.limiter.check(who, rate_key(self.ip), server, server_only=True)
        if refusal is None:
            return None
        self.access.audit.rate_limited(
            principal=principal.id,
            peer=self.ip,
            server=server,
            scope=refusal.scope,
            retry_after=refusal.retry_after,
        )
        return (
            f"Too Many Requests: the {refusal.scope} rate limit of MCP server '{server}' is "
            f"reached; retry in {max(1, round(refusal.retry_after))}s"
        )


def listener_of(request: Request) -> ListenerConfig | None:
    """The listener a request came in on (each listener has its own Site)."""
    listener: ListenerConfig | None = getattr(request.site, "listener", None)
    return listener


def local_listener(request: Request) -> bool:
    """Whether the request came in on a listener reachable from this host
    only (bound to loopback, or a Unix socket): the site says so once it
    listens; a site that does not know judges by the connection's own address."""
    local: bool | None = getattr(request.site, "local", None)
    if local is None:
        return is_local_address(request.getHost())
    return local


def route_of(request: IRequest) -> str:
    """The request's path as text, for the audit trail and challenges."""
    path: bytes = request.path
    return path.decode("utf-8", "replace")


def identity(principal: Principal) -> str:
    """A principal's key for sessions and limits: a token and a JWT subject of
    the same name are different clients (L{Principal.id})."""
    return principal.id


def _is_server_route(path: str) -> bool:
    parts = path.split("/")
    return (
        len(parts) == 4
        and parts[1] == "servers"
        and _SERVER_NAME.match(parts[2]) is not None
        and parts[3] in ("mcp", "sse", "messages")
    )


__all__ = [
    "AccessControl",
    "AuthFailure",
    "identity",
    "listener_of",
    "local_listener",
    "route_of",
]
