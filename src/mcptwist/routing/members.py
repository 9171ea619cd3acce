# -*- test-case-name: tests.test_aggregate -*-
"""An endpoint's sessions, and how each reaches the endpoint's members.

To the transports an endpoint is a server like any other (named
C{endpoints/NAME}): an L{AggregateBackend} opens each session an
L{AggregateUpstream}, which answers C{initialize}, C{ping} and the lists
itself (from its members' catalogs) and hands everything else to the right
member through a L{MemberLink}: a downstream of that member's upstream, as a
client session of its own would be. So ids, progress, cancellation,
timeouts and the server-to-client requests of each member are handled by
the member's own router, and the endpoint only renames on the way in and
out (the L{Aggregate}'s rules), and numbers its members' questions itself.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mcptwist.child.supervisor import ChildState
from mcptwist.config.model import ServerConfig, endpoint_key
from mcptwist.mcp import jsonrpc
from mcptwist.mcp.jsonrpc import Kind, Message, RequestId
from mcptwist.routing.aggregate import (
    CHANGED,
    EVERYONE,
    Aggregate,
    Guard,
    Refused,
)
from mcptwist.routing.backends import Backend
from mcptwist.routing.catalog import LISTS, Catalog
from mcptwist.routing.record import Recorder, Status
from mcptwist.routing.trace import Tracer
from mcptwist.routing.upstream import (
    CapacityError,
    CredentialError,
    Downstream,
    Pending,
    Upstream,
)

log = Logger(namespace="mcptwist.aggregate")


@attrs.define(eq=False)
class MemberLink:
    """A session of an endpoint, as one member's upstream sees it: a client
    session of its own, whose messages the endpoint renames."""

    owner: AggregateUpstream
    server: str
    backend: Backend
    # The session's id (one member link per session and member).
    id: str
    upstream: Upstream | None = None
    # Why this member cannot serve the session (None: it can).
    unavailable: str | None = None
    stateless = False

    @property
    def principal(self) -> str:
        return self.owner.session.principal

    @property
    def claims(self) -> Mapping[str, str]:
        """Its principal's claims (a member that runs a child per principal reads them)."""
        return self.owner.session.claims

    @property
    def protocol_version(self) -> str | None:
        return self.owner.session.protocol_version

    @protocol_version.setter
    def protocol_version(self, value: str | None) -> None:
        self.owner.session.protocol_version = value

    @property
    def capabilities(self) -> dict[str, Any]:
        return self.owner.session.capabilities

    @capabilities.setter
    def capabilities(self, value: dict[str, Any]) -> None:
        self.owner.session.capabilities = value

    @property
    def client_info(self) -> dict[str, Any]:
        return self.owner.session.client_info

    @client_info.setter
    def client_info(self, value: dict[str, Any]) -> None:
        self.owner.session.client_info = value

    @property
    def log_level(self) -> str | None:
        return self.owner.session.log_level

    @log_level.setter
    def log_level(self, level: str | None) -> None:
        self.owner.session.log_level = level

    def deliver(
        self, message: Message, related: RequestId | None, encoded: bytes | None = None
    ) -> None:
        self.owner.from_member(self, message, related)

    def cancelled(self, request_id: RequestId) -> None:
        self.owner.routes.pop(request_id, None)
        self.owner.session.cancelled(request_id)

    def request_started(self, request: Pending, message: Message) -> None:
        if not self._fanned(request):
            self.owner.session.request_started(
                request, message, self.backend.server.audit_arguments
            )

    def request_ended(self, request: Pending, status: Status, error_code: int | None) -> None:
        if self._fanned(request):
            return
        pid = self.upstream.supervisor.pid if self.upstream is not None else None
        self.owner.session.request_ended(request, status, error_code, self.server, pid)

    def _fanned(self, request: Pending) -> bool:
        """A member's share of one request the endpoint sent to every member
        (counted and recorded once, as the endpoint's)."""
        return request.client_id in self.owner.fanouts

    def changed(self, method: str) -> None:
        """The member's catalog changed a list."""
        self.owner.list_changed(method)


class AggregateSession(Downstream, Protocol):
    """The client session an aggregate upstream serves (a ClientSession)."""

    principal: str
    claims: Mapping[str, str]

    @property
    def closed(self) -> bool: ...

    def request_started(
        self, request: Pending, message: Message, audit_arguments: bool | None = None
    ) -> None: ...

    def request_ended(
        self,
        request: Pending,
        status: Status,
        error_code: int | None,
        server: str | None = None,
        child_pid: int | None = None,
    ) -> None: ...


class AggregateUpstream:
    """One client session of an endpoint, and its links to the members."""

    modern = False
    # Follows the requests the endpoint answers itself (None: not traced).
    tracer: Tracer | None = None

    def __init__(
        self,
        aggregate: Aggregate,
        backends: Callable[[str], Backend | None],
        session: AggregateSession,
        clock: IReactorTime,
    ) -> None:
        self.aggregate = aggregate
        self.session = session
        self.clock = clock
        self.guard: Guard = EVERYONE
        self._backends = backends
        self.links: dict[str, MemberLink] = {}
        # Requests of the client a member is working on, by the client's id.
        self.routes: dict[RequestId, tuple[MemberLink, str]] = {}
        # Requests of the members to the client, by the endpoint's id.
        self._outbound: dict[int, tuple[MemberLink, RequestId]] = {}
        self._ids = itertools.count(1)
        # Fan-outs of one client request to every member (log levels).
        self.fanouts: dict[RequestId, _FanOut] = {}
        # The requests the endpoint answers itself that have not ended yet.
        self._own_requests: set[Pending] = set()
        # List-changed notifications to send once the current turn ends.
        self._changed: set[str] = set()
        self._init_result: dict[str, Any] | None = None

    # What a session asks of its upstream

    @property
    def init_result(self) -> dict[str, Any] | None:
        return self._init_result

    def handle(self, session: Downstream, message: Message, kind: Kind) -> None:
        if kind is Kind.REQUEST:
            self._request(message)
        elif kind is Kind.NOTIFICATION:
            self._notification(message)
        else:
            self._response(message)

    def close(self) -> None:
        """The session ended: each member forgets it (its requests end)."""
        for link in self.links.values():
            self._unlink(link)
        self._outbound.clear()
        # What the endpoint was answering itself ends with the session.
        ending, self._own_requests = self._own_requests, set()
        for p in ending:
            self.session.request_ended(p, "cancelled", None)

    def _unlink(self, link: MemberLink) -> None:
        upstream, link.upstream = link.upstream, None
        if upstream is not None:
            upstream.catalog.watchers.remove(link.changed)
            link.backend.close(link, upstream)

    # Members

    def open_links(self) -> None:
        """Link each member this client may use now (once each; a member its
        grants come to allow later is linked then)."""
        for server in self.aggregate.members:
            if not self.guard.sees(server):
                continue
            backend = self._backends(server)
            if backend is None:
                continue
            link = self.links.get(server)
            if link is not None:
                if link.backend is backend and link.unavailable is None:
                    continue
                # The server was replaced (a reload), or had no room: try again.
                self._unlink(link)
            link = self.links[server] = MemberLink(self, server, backend, self.session.id)
            try:
                upstream = backend.open(link)
            except CapacityError as e:
                link.unavailable = str(e)
                continue
            link.upstream = upstream
            upstream.catalog.watchers.append(link.changed)

    def catalogs(self) -> list[tuple[str, Catalog | None]]:
        """Each visible member's catalog, None for one that cannot serve."""
        self.open_links()
        return self.aggregate.catalogs(self.guard, self._serving_catalog)

    def _serving_catalog(self, server: str) -> Catalog | None:
        link = self.links.get(server)
        if link is None or link.upstream is None or not _serving(link):
            return None
        return link.upstream.catalog

    def _catalog(self, server: str) -> Catalog | None:
        link = self.links.get(server)
        return link.upstream.catalog if link is not None and link.upstream is not None else None

    # The client's requests

    def _request(self, message: Message) -> None:
        method = message["method"]
        request_id = message["id"]
        if request_id in self.routes or request_id in self.fanouts:
            self.session.deliver(
                jsonrpc.error(
                    request_id,
                    jsonrpc.INVALID_REQUEST,
                    f"Invalid Request: id {request_id!r} is already in use by a request in progress",
                ),
                request_id,
            )
            return
        if method == "initialize":
            self._initialize(message)
        elif method == "ping":
            self._own(message, jsonrpc.result(request_id, {}))
        elif method in LISTS:
            self._list(message)
        elif method == "logging/setLevel":
            self._set_level(message)
        else:
            self._route(message)

    def _start(self, message: Message) -> Pending:
        p = Pending(
            method=message["method"],
            started=self.clock.seconds(),
            session=self.session,
            client_id=message["id"],
        )
        if self.tracer is not None:
            p.trace = self.tracer.request(endpoint_key(self.aggregate.name), self.session, message)
        self.session.request_started(p, message)
        self._own_requests.add(p)
        return p

    def _own(
        self,
        message: Message,
        answer: Message,
        p: Pending | None = None,
        server: str | None = None,
    ) -> None:
        """Answer a request the endpoint serves itself (recorded like any other)."""
        if p is None:
            p = self._start(message)
        self._own_requests.discard(p)
        error = answer.get("error")
        status: Status = "error" if error is not None else "ok"
        if p.trace is not None:
            p.trace.ended(answer, status)
        self.session.request_ended(
            p, status, error.get("code") if isinstance(error, dict) else None, server
        )
        if not self.session.closed:
            self.session.deliver(answer, message["id"])

    def _initialize(self, message: Message) -> None:
        params = message.get("params") or {}
        result = self.aggregate.initialize_result(params.get("protocolVersion"))
        self.session.protocol_version = result["protocolVersion"]
        caps = params.get("capabilities")
        self.session.capabilities = caps if isinstance(caps, dict) else {}
        info = params.get("clientInfo")
        self.session.client_info = info if isinstance(info, dict) else {}
        self._init_result = result
        self.open_links()
        self._own(message, jsonrpc.result(message["id"], result))

    def _list(self, message: Message) -> None:
        method = message["method"]
        p = self._start(message)
        params = message.get("params")
        cursor = params.get("cursor") if isinstance(params, dict) else None

        def answer(result: dict[str, Any]) -> None:
            if not self.session.closed:
                self._own(message, jsonrpc.result(message["id"], result), p)

        def refused(reason: Failure) -> None:
            reason.trap(Refused)
            error = reason.value
            assert isinstance(error, Refused)
            self._own(message, jsonrpc.error(message["id"], error.code, error.text), p)

        try:
            page = self.aggregate.list_page(method, self.catalogs(), self.guard, cursor, self.clock)
        except Refused as error:
            self._own(message, jsonrpc.error(message["id"], error.code, error.text), p)
            return
        if isinstance(page, Deferred):
            page.addCallbacks(answer, refused).addErrback(lambda f: log.failure("endpoint list", f))
        else:
            answer(page)

    def _set_level(self, message: Message) -> None:
        """Every member's child that logs does so at the client's level: one
        answer for all (the endpoint offers logging whatever its members do)."""
        links = [link for link in self.links.values() if _serving(link) and _logs(link)]
        p = self._start(message)
        if not links:
            self._own(message, jsonrpc.result(message["id"], {}), p)
            return
        fanout = _FanOut(p, len(links))
        self.fanouts[message["id"]] = fanout
        for link in links:
            copy = {**message, "params": dict(message.get("params") or {})}
            assert link.upstream is not None
            link.upstream.handle(link, copy, Kind.REQUEST)

    def _route(self, message: Message) -> None:
        try:
            route = self.aggregate.route(message, self.guard, self._catalog)
        except Refused as refused:
            if message["method"] == "tools/call":
                params = message.get("params")
                shown = params.get("name") if isinstance(params, dict) else None
                self.aggregate.tool_refused(shown, self.session.principal, refused.text)
            self._own(
                message, jsonrpc.error(message["id"], refused.code, refused.text, refused.data)
            )
            return
        self.open_links()
        link = self.links.get(route.server)
        if link is None or not _serving(link):
            text = (
                link.unavailable
                if link is not None and link.unavailable
                else _state_text(route.server, link)
            )
            self._own(
                message,
                jsonrpc.error(
                    message["id"],
                    jsonrpc.SERVER_UNAVAILABLE,
                    text,
                    {"server": route.server, "state": _state(link)},
                ),
                server=route.server,
            )
            return
        assert link.upstream is not None
        try:
            link.backend.refresh(link, link.upstream)
        except CredentialError as e:
            self._own(
                message,
                jsonrpc.error(message["id"], jsonrpc.FORBIDDEN, f"Forbidden: {e}"),
                server=route.server,
            )
            return
        self.routes[message["id"]] = (link, message["method"])
        link.upstream.handle(link, route.message, Kind.REQUEST)

    # The client's notifications and responses

    def _notification(self, message: Message) -> None:
        method = message["method"]
        if method == "notifications/initialized":
            return
        if method == "notifications/cancelled":
            params = message.get("params")
            request_id = params.get("requestId") if isinstance(params, dict) else None
            route = self.routes.get(request_id) if isinstance(request_id, str | int) else None
            if route is not None and route[0].upstream is not None:
                route[0].upstream.handle(route[0], message, Kind.NOTIFICATION)
            return
        for link in self.links.values():
            if link.upstream is not None:
                link.upstream.handle(link, dict(message), Kind.NOTIFICATION)

    def _response(self, message: Message) -> None:
        request_id = message.get("id")
        out = self._outbound.pop(request_id, None) if isinstance(request_id, int) else None
        if out is None:
            log.debug(
                "endpoint {endpoint}: dropped a response to an unknown request",
                endpoint=self.aggregate.name,
            )
            return
        link, member_id = out
        if link.upstream is not None:
            link.upstream.handle(link, {**message, "id": member_id}, Kind.RESPONSE)

    # What the members send

    def from_member(self, link: MemberLink, message: Message, related: RequestId | None) -> None:
        if self.session.closed:
            return
        method = message.get("method")
        if method is None:
            request_id = message.get("id")
            fanout = self.fanouts.get(request_id)  # type: ignore[arg-type]
            if fanout is not None:
                self._fanned(request_id, fanout, message, link)  # type: ignore[arg-type]
                return
            sent = self.routes.pop(request_id, None)  # type: ignore[arg-type]
            if sent is not None:
                message = self.aggregate.shown_result(link.server, sent[1], message)
            self.session.deliver(message, related)
        elif "id" in message:
            # The member asks the client: the endpoint's own id, unique across members.
            out_id = next(self._ids)
            self._outbound[out_id] = (link, message["id"])
            self.session.deliver({**message, "id": out_id}, related)
        elif method in CHANGED.values():
            return  # the endpoint says so itself, from the member's catalog
        elif method == "notifications/cancelled":
            params = message.get("params")
            member_id = params.get("requestId") if isinstance(params, dict) else None
            for out_id, (owner, their_id) in list(self._outbound.items()):
                if owner is link and their_id == member_id:
                    del self._outbound[out_id]
                    self.session.deliver(
                        {**message, "params": {**params, "requestId": out_id}},  # type: ignore[dict-item]
                        None,
                    )
        else:
            self.session.deliver(self.aggregate.shown_notification(link.server, message), related)

    def _fanned(
        self, request_id: RequestId, fanout: _FanOut, message: Message, link: MemberLink
    ) -> None:
        fanout.waiting -= 1
        if "error" in message and fanout.error is None and _logs(link):
            fanout.error = message
        if fanout.waiting == 0:
            del self.fanouts[request_id]
            answer = fanout.error or jsonrpc.result(request_id, {})
            self._own({"id": request_id}, {**answer, "id": request_id}, fanout.pending)

    def list_changed(self, method: str) -> None:
        """A member's list changed (or the member came or went): the client is told,
        once for all that changed at the same time."""
        if self.session.closed or self._init_result is None:
            return
        notification = CHANGED[method]
        if not self._changed:
            self.clock.callLater(0, self._tell_changed)
        self._changed.add(notification)

    def _tell_changed(self) -> None:
        changed, self._changed = self._changed, set()
        if self.session.closed:
            return
        for method in sorted(changed):
            self.session.deliver(jsonrpc.notification(method), None)


@attrs.define(eq=False)
class _FanOut:
    pending: Pending
    waiting: int
    error: Message | None = None


def _serving(link: MemberLink) -> bool:
    upstream = link.upstream
    return upstream is not None and upstream.state not in (ChildState.FAILED, ChildState.STOPPED)


def _logs(link: MemberLink) -> bool:
    """Whether a member's child offers logging (or has not said yet: it is starting)."""
    init = link.upstream.init_result if link.upstream is not None else None
    return init is None or "logging" in (init.get("capabilities") or {})


def _state(link: MemberLink | None) -> str:
    if link is None or link.upstream is None:
        return "unavailable"
    return link.upstream.state.value


def _state_text(server: str, link: MemberLink | None) -> str:
    if link is None:
        return f"MCP server '{server}' is not available to this client"
    if link.upstream is None:
        return f"MCP server '{server}' is unavailable"
    return link.upstream.unavailable_text()


class AggregateBackend(Backend):
    """An endpoint, as the transports see it: a server named C{endpoints/NAME}
    whose sessions are spread over its members."""

    def __init__(
        self,
        aggregate: Aggregate,
        server: ServerConfig,
        backends: Mapping[str, Backend],
        reactor: Any,
        recorder: Recorder | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.aggregate = aggregate
        self.member_backends = backends
        super().__init__(server, reactor, {}, recorder, tracer=tracer)

    def open(self, session: Downstream) -> AggregateUpstream:  # type: ignore[override]
        upstream = AggregateUpstream(
            self.aggregate,
            self.member_backends.get,
            session,  # type: ignore[arg-type]
            self.reactor,
        )
        upstream.tracer = self.tracer
        return upstream

    def close(self, session: Downstream, upstream: Upstream) -> None:
        upstream.close()  # type: ignore[attr-defined]

    @property
    def per_principal(self) -> bool:
        """A member runs a child per principal: the session's claims matter
        (each request routed to it checks them, L{AggregateUpstream._route})."""
        return any(b is not None and b.per_principal for _, b in self.members())

    def upstreams(self) -> Iterator[Upstream]:
        return iter(())

    def members(self) -> list[tuple[str, Backend | None]]:
        return [(name, self.member_backends.get(name)) for name in self.aggregate.members]

    @property
    def state(self) -> str:
        """Running while any member runs; the most hopeful state otherwise."""
        states = {b.state for _, b in self.members() if b is not None}
        for state in ("running", "starting", "restarting", "failed"):
            if state in states:
                return state
        return "stopped"

    def status(self) -> dict[str, Any]:
        return {
            "name": self.aggregate.name,
            "endpoint": True,
            "state": self.state,
            "servers": [
                {"name": name, "state": backend.state if backend is not None else "absent"}
                for name, backend in self.members()
            ],
        }
