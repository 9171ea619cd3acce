# -*- test-case-name: tests.test_aggregate -*-
"""Aggregating endpoints: several servers behind one URL.

An L{Aggregate} is one C{[endpoints.NAME]}: its members, its naming rule and
its filters. It merges its members' lists (from each child's L{Catalog}) and
finds the member a request is for by the name or URI it carries.

To the transports an endpoint is a server like any other (named
C{endpoints/NAME}): an L{AggregateBackend} opens each session an
L{AggregateUpstream}, which answers C{initialize}, C{ping} and the lists
itself and hands everything else to the right member through a
L{MemberLink}: a downstream of that member's upstream, as a client session
of its own would be. So ids, progress, cancellation, timeouts and the
server-to-client requests of each member are handled by the member's own
router, and the aggregate only renames on the way in and out.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final, Protocol

import attrs
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mcptwist import __version__
from mcptwist.child.supervisor import ChildState
from mcptwist.config.model import EndpointConfig, ServerConfig
from mcptwist.mcp import jsonrpc, protocol
from mcptwist.mcp.jsonrpc import Kind, Message, RequestId
from mcptwist.mcp.naming import BadCursor, NameFilter, Namer, decode_cursor, encode_cursor, page
from mcptwist.routing.backends import Backend
from mcptwist.routing.catalog import LISTS, Catalog
from mcptwist.routing.pins import PinBook
from mcptwist.routing.record import Recorder, Status, ToolEvent
from mcptwist.routing.tools import unknown_tool
from mcptwist.routing.upstream import CapacityError, Downstream, Pending, Upstream

log = Logger(namespace="mcptwist.aggregate")

# What an endpoint offers, whatever its members: their lists come and go.
CAPABILITIES: Final = {
    "tools": {"listChanged": True},
    "prompts": {"listChanged": True},
    "resources": {"subscribe": True, "listChanged": True},
    "completions": {},
    "logging": {},
}
# The notification that tells clients a list changed, by list.
CHANGED: Final = {
    "tools/list": "notifications/tools/list_changed",
    "prompts/list": "notifications/prompts/list_changed",
    "resources/list": "notifications/resources/list_changed",
    "resources/templates/list": "notifications/resources/list_changed",
}
# The name of a list's items (tools and prompts) or their URI (resources).
_NAMED: Final = {"tools/list": "name", "prompts/list": "name"}
_URI: Final = {"resources/list": "uri", "resources/templates/list": "uriTemplate"}


class Guard(Protocol):
    """What one client may see and use of an endpoint's members."""

    def sees(self, server: str) -> bool:
        """Whether the client may use this member at all (grants, address rules)."""

    def tool(self, server: str, name: str) -> bool:
        """Whether the client's grants allow this tool (by its own name)."""

    def admit(self, server: str) -> str | None:
        """Charge one request to the member's own rate limits: None, or the refusal."""


class Everyone:
    """The guard without authentication or rules: everything is allowed."""

    def sees(self, server: str) -> bool:
        return True

    def tool(self, server: str, name: str) -> bool:
        return True

    def admit(self, server: str) -> str | None:
        return None


EVERYONE: Final = Everyone()


@attrs.define(eq=False)
class Route:
    """Where a client's request goes: the member, and the request as it gets it."""

    server: str
    message: Message
    # What the client called it (for errors and records).
    shown: str | None = None


class Refused(Exception):
    """A request the aggregate answers with an error, without any member."""

    def __init__(self, code: int, text: str, data: Any = None) -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.data = data


class Aggregate:
    """One endpoint: its members, how their names are shown, what is visible."""

    def __init__(
        self,
        config: EndpointConfig,
        servers: Callable[[str], ServerConfig | None],
        pins: PinBook | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.key = f"endpoints/{config.name}"
        self.namer = Namer(config.prefixes, config.separator, config.rename)
        self.filter = NameFilter(config.include, config.exclude)
        self._servers = servers
        self.pins = pins
        self.recorder = recorder

    @property
    def members(self) -> tuple[str, ...]:
        return self.config.servers

    def member_filter(self, server: str) -> NameFilter:
        config = self._servers(server)
        return NameFilter(config.include, config.exclude) if config else NameFilter()

    def blocked(self, server: str) -> str | None:
        """Why a member may not be used now (its pins block it), if so."""
        config = self._servers(server)
        if self.pins is None or config is None:
            return None
        return self.pins.blocked(config)

    def tool_refused(self, shown: object, principal: str | None, why: str) -> None:
        """A call of a tool that is hidden, denied or unknown: logged and recorded."""
        log.info(
            "endpoint {endpoint}: refused a call of {tool!r} by {principal}: {why}",
            endpoint=self.name,
            tool=shown,
            principal=principal,
            why=why,
        )
        if self.recorder is not None:
            found = self.namer.resolve(shown)
            self.recorder.tool_event(
                ToolEvent(
                    "tool_refused",
                    found[0] if found is not None else self.key,
                    str(shown),
                    detail=why,
                    endpoint=self.name,
                    principal=principal,
                )
            )

    def tool_visible(self, guard: Guard, server: str, name: str) -> bool:
        """Whether a member's tool is shown to (and may be called by) this client."""
        return (
            self.member_filter(server).allows(name)
            and self.filter.allows(self.namer.expose(server, name))
            and guard.tool(server, name)
        )

    # Lists

    def merge(
        self, method: str, lists: list[tuple[str, list[dict[str, Any]]]], guard: Guard
    ) -> list[list[dict[str, Any]]]:
        """Each member's items as clients see them (renamed copies), in the
        endpoint's order; hidden tools left out, and a clash refused."""
        named = _NAMED.get(method)
        uri_key = _URI.get(method)
        taken: dict[str, str] = {}
        merged: list[list[dict[str, Any]]] = []
        for server, items in lists:
            shown_items: list[dict[str, Any]] = []
            for item in items:
                if named is not None:
                    own = item.get(named)
                    if not isinstance(own, str):
                        continue
                    if method == "tools/list" and not self.tool_visible(guard, server, own):
                        continue
                    shown = self.namer.expose(server, own)
                    first = taken.get(shown)
                    if first is not None:
                        self._clash(server, named, own, shown, first)
                        continue
                    taken[shown] = server
                    shown_items.append({**item, named: shown})
                elif uri_key is not None:
                    uri = item.get(uri_key)
                    if isinstance(uri, str):
                        shown_items.append({**item, uri_key: self.namer.expose_uri(server, uri)})
            merged.append(shown_items)
        return merged

    def _clash(self, server: str, kind: str, own: str, shown: str, first: str) -> None:
        why = (
            f"{server}'s {kind} {own!r} would be shown as {shown!r}, which {first} has already; "
            "it is left out"
        )
        log.warn("endpoint {endpoint}: {why}", endpoint=self.name, why=why)
        if self.recorder is not None:
            self.recorder.tool_event(
                ToolEvent("name_clash", server, own, detail=why, endpoint=self.name)
            )

    def page(
        self, method: str, merged: list[list[dict[str, Any]]], cursor: object
    ) -> dict[str, Any]:
        """One page of a merged list; L{Refused} for a cursor it did not make."""
        members = list(self.members)
        start = (0, 0)
        if cursor is not None:
            try:
                server, offset = decode_cursor(cursor)
            except BadCursor:
                raise Refused(jsonrpc.INVALID_PARAMS, "Invalid params: unknown cursor") from None
            if server not in members:
                raise Refused(jsonrpc.INVALID_PARAMS, "Invalid params: unknown cursor")
            start = (members.index(server), offset)
        items, following = page(merged, start, self.config.page_size)
        result: dict[str, Any] = {LISTS[method][0]: items}
        if following is not None:
            result["nextCursor"] = encode_cursor(members[following[0]], following[1])
        return result

    # Routing

    def route(
        self,
        message: Message,
        guard: Guard,
        catalog: Callable[[str], Catalog | None] = lambda server: None,
    ) -> Route:
        """The member a request is for, and the request as it gets it; or
        L{Refused} (unknown, hidden and denied names are refused alike: a
        tool is unknown when the member's C{catalog} has its tools and not it)."""
        method = message["method"]
        params = message.get("params")
        params = dict(params) if isinstance(params, dict) else {}
        if method in ("tools/call", "prompts/get"):
            shown = params.get("name")
            found = self.namer.resolve(shown)
            kind = "tool" if method == "tools/call" else "prompt"
            if found is None or not guard.sees(found[0]):
                raise Refused(jsonrpc.INVALID_PARAMS, f"Unknown {kind}: {shown}")
            server, own = found
            if method == "tools/call" and (
                not self.tool_visible(guard, server, own) or not _listed(catalog(server), own)
            ):
                raise Refused(jsonrpc.INVALID_PARAMS, unknown_tool(0, shown)["error"]["message"])
            params["name"] = own
        elif method in ("resources/read", "resources/subscribe", "resources/unsubscribe"):
            shown = params.get("uri")
            found = self.namer.resolve_uri(shown)
            if found is None or not guard.sees(found[0]):
                raise Refused(jsonrpc.RESOURCE_NOT_FOUND, f"Resource not found: {shown}")
            server, params["uri"] = found
        elif method == "completion/complete":
            ref = params.get("ref")
            ref = dict(ref) if isinstance(ref, dict) else {}
            if ref.get("type") == "ref/resource":
                shown = ref.get("uri")
                found = self.namer.resolve_uri(shown)
                if found is not None:
                    ref["uri"] = found[1]
            else:
                shown = ref.get("name")
                found = self.namer.resolve(shown)
                if found is not None:
                    ref["name"] = found[1]
            if found is None or not guard.sees(found[0]):
                raise Refused(jsonrpc.INVALID_PARAMS, f"Invalid params: unknown ref {shown}")
            server = found[0]
            params["ref"] = ref
        elif len(self.members) == 1:
            # Anything else a lone member may know what to do with.
            shown, server = None, self.members[0]
        else:
            raise Refused(jsonrpc.METHOD_NOT_FOUND, f"Method not found: {method}")
        blocked = self.blocked(server)
        if blocked is not None:
            raise Refused(
                jsonrpc.SERVER_UNAVAILABLE,
                f"MCP server '{server}' is {blocked}",
                {"server": server, "state": "blocked"},
            )
        refusal = guard.admit(server)
        if refusal is not None:
            raise Refused(jsonrpc.RATE_LIMITED, refusal)
        routed = {**message, "params": params} if params or "params" in message else message
        return Route(server, routed, shown if isinstance(shown, str) else None)

    def shown_result(self, server: str, method: str, message: Message) -> Message:
        """A member's answer as the client sees it (URIs of resources it read)."""
        if method != "resources/read" or self.namer.bare:
            return message
        result = message.get("result")
        contents = result.get("contents") if isinstance(result, dict) else None
        if isinstance(contents, list):
            result["contents"] = [  # type: ignore[index]
                {**c, "uri": self.namer.expose_uri(server, c["uri"])}
                if isinstance(c, dict) and isinstance(c.get("uri"), str)
                else c
                for c in contents
            ]
        return message

    def shown_notification(self, server: str, message: Message) -> Message:
        """A member's notification as the client sees it (updated resources' URIs)."""
        if message["method"] != "notifications/resources/updated" or self.namer.bare:
            return message
        params = message.get("params")
        if isinstance(params, dict) and isinstance(params.get("uri"), str):
            message["params"] = {**params, "uri": self.namer.expose_uri(server, params["uri"])}
        return message

    def initialize_result(self, requested: object) -> dict[str, Any]:
        return {
            "protocolVersion": protocol.negotiate(requested, protocol.LATEST_LEGACY),
            "capabilities": CAPABILITIES,
            "serverInfo": self.server_info(),
        }

    def server_info(self) -> dict[str, Any]:
        return {"name": f"{protocol.BRIDGE_NAME}/{self.key}", "version": __version__}


def _listed(catalog: Catalog | None, name: str) -> bool:
    """Whether a tool may exist: listed by the member, or its list is not known yet."""
    tools = catalog.cached("tools/list") if catalog is not None else None
    return tools is None or any(t.get("name") == name for t in tools)


def gather_lists(
    aggregate: Aggregate,
    method: str,
    catalogs: list[tuple[str, Catalog | None]],
    clock: IReactorTime,
) -> Deferred[list[tuple[str, list[dict[str, Any]]]]]:
    """Each member's list (a member that is down, refuses, or takes longer than
    the endpoint's C{list_timeout} has none), in the endpoint's order."""
    waits: list[Deferred[list[dict[str, Any]]]] = []
    for server, catalog in catalogs:
        if catalog is None:
            waits.append(_empty())
            continue
        d = catalog.get(method)
        if not d.called:
            d.addTimeout(aggregate.config.list_timeout, clock)
        d.addErrback(_missing, aggregate, server, method)
        waits.append(d)
    joined: Deferred[Any] = DeferredList(waits, consumeErrors=True)
    return joined.addCallback(
        lambda results: [
            (server, items if ok else [])
            for (server, _), (ok, items) in zip(catalogs, results, strict=True)
        ]
    )


def _empty() -> Deferred[list[dict[str, Any]]]:
    d: Deferred[list[dict[str, Any]]] = Deferred()
    d.callback([])
    return d


def _missing(
    reason: Failure, aggregate: Aggregate, server: str, method: str
) -> list[dict[str, Any]]:
    log.info(
        "endpoint {endpoint}: {server} is left out of {method}: {why}",
        endpoint=aggregate.name,
        server=server,
        method=method,
        why=reason.getErrorMessage() or repr(reason.value),
    )
    return []


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
        self.owner.session.request_started(request, message, self.backend.server.audit_arguments)

    def request_ended(self, request: Pending, status: Status, error_code: int | None) -> None:
        pid = self.upstream.supervisor.pid if self.upstream is not None else None
        self.owner.session.request_ended(request, status, error_code, self.server, pid)

    def changed(self, method: str) -> None:
        """The member's catalog changed a list."""
        self.owner.list_changed(method)


class AggregateSession(Downstream, Protocol):
    """The client session an aggregate upstream serves (a ClientSession)."""

    principal: str

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
        self._opened = False
        # Requests of the client a member is working on, by the client's id.
        self.routes: dict[RequestId, tuple[MemberLink, str]] = {}
        # Requests of the members to the client, by the endpoint's id.
        self._outbound: dict[int, tuple[MemberLink, RequestId]] = {}
        self._ids = itertools.count(1)
        # Fan-outs of one client request to every member (log levels).
        self._fanouts: dict[RequestId, _FanOut] = {}
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
            if link.upstream is not None:
                link.upstream.catalog.watchers.remove(link.changed)
                link.backend.close(link, link.upstream)
                link.upstream = None
        self._outbound.clear()

    # Members

    def open_links(self) -> None:
        """Open a link to each member this client may use (once, at initialize)."""
        if self._opened:
            return
        self._opened = True
        for server in self.aggregate.members:
            if not self.guard.sees(server):
                continue
            backend = self._backends(server)
            link = (
                MemberLink(self, server, backend, self.session.id) if backend is not None else None
            )
            if link is None:
                continue
            self.links[server] = link
            try:
                link.upstream = backend.open(link)  # type: ignore[union-attr]
            except CapacityError as e:
                link.unavailable = str(e)
                continue
            link.upstream.catalog.watchers.append(link.changed)

    def catalogs(self) -> list[tuple[str, Catalog | None]]:
        """Each visible member's catalog, None for one that cannot serve."""
        self.open_links()
        return [
            (
                server,
                link.upstream.catalog  # type: ignore[union-attr]
                if _serving(link) and self.aggregate.blocked(server) is None
                else None,
            )
            for server, link in self.links.items()
        ]

    def _catalog(self, server: str) -> Catalog | None:
        link = self.links.get(server)
        return link.upstream.catalog if link is not None and link.upstream is not None else None

    # The client's requests

    def _request(self, message: Message) -> None:
        method = message["method"]
        request_id = message["id"]
        if request_id in self.routes or request_id in self._fanouts:
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
        self.session.request_started(p, message)
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
        error = answer.get("error")
        status: Status = "error" if error is not None else "ok"
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
        d = gather_lists(self.aggregate, method, self.catalogs(), self.clock)

        def merged(lists: list[tuple[str, list[dict[str, Any]]]]) -> None:
            if self.session.closed:
                return
            try:
                result = self.aggregate.page(
                    method, self.aggregate.merge(method, lists, self.guard), cursor
                )
            except Refused as refused:
                self._own(message, jsonrpc.error(message["id"], refused.code, refused.text), p)
                return
            self._own(message, jsonrpc.result(message["id"], result), p)

        d.addCallback(merged)
        d.addErrback(lambda f: log.failure("endpoint list", f))

    def _set_level(self, message: Message) -> None:
        """Every member's child that logs does so at the client's level: one
        answer for all (the endpoint offers logging whatever its members do)."""
        links = [link for link in self.links.values() if _serving(link) and _logs(link)]
        p = self._start(message)
        if not links:
            self._own(message, jsonrpc.result(message["id"], {}), p)
            return
        fanout = _FanOut(p, len(links))
        self._fanouts[message["id"]] = fanout
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
        self.routes[message["id"]] = (link, message["method"])
        assert link.upstream is not None
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
            fanout = self._fanouts.get(request_id)  # type: ignore[arg-type]
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
            del self._fanouts[request_id]
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
    ) -> None:
        self.aggregate = aggregate
        self.member_backends = backends
        super().__init__(server, reactor, {}, recorder)

    def open(self, session: Downstream) -> AggregateUpstream:  # type: ignore[override]
        return AggregateUpstream(
            self.aggregate,
            self.member_backends.get,
            session,  # type: ignore[arg-type]
            self.reactor,
        )

    def close(self, session: Downstream, upstream: Upstream) -> None:
        upstream.close()  # type: ignore[attr-defined]

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


def endpoint_settings(
    endpoint: EndpointConfig, servers: Mapping[str, ServerConfig]
) -> ServerConfig:
    """The settings the transports read of an endpoint, as of a server: the
    most generous of its members' (each member still applies its own)."""
    members = [servers[s] for s in endpoint.servers if s in servers]
    return ServerConfig(
        name=f"endpoints/{endpoint.name}",
        command="",
        max_message_size=max(m.max_message_size for m in members),
        request_timeout=max(m.request_timeout for m in members),
        max_request_timeout=max(m.max_request_timeout for m in members),
        input_timeout=max(m.input_timeout for m in members),
        session_idle_timeout=endpoint.session_idle_timeout,
        json_response=endpoint.json_response,
    )
