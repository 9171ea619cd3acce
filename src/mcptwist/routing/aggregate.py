# -*- test-case-name: tests.test_aggregate -*-
"""Aggregating endpoints: several servers behind one URL.

An L{Aggregate} is one C{[endpoints.NAME]}: its members, its naming rule and
its filters. It merges its members' lists (from each child's L{Catalog}),
finds the member a request is for by the name or URI it carries, and
renames what comes back. What one client may see of the members is its
L{Guard}. The sessions of an endpoint, and their links to its members, are
in L{mcptwist.routing.members}.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any, Final, Protocol

import attrs
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mcptwist import __version__
from mcptwist.config.model import EndpointConfig, ServerConfig, endpoint_key
from mcptwist.mcp import jsonrpc, protocol
from mcptwist.mcp.jsonrpc import Message
from mcptwist.mcp.naming import BadCursor, NameFilter, Namer, decode_cursor, encode_cursor, page
from mcptwist.routing.catalog import LISTS, Catalog
from mcptwist.routing.pins import PinBook
from mcptwist.routing.record import Recorder, ToolEvent
from mcptwist.routing.tools import unknown_tool

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
# The list of a member that has none to give (one list, never changed, so
# that merged lists made with it can be kept).
NOTHING: Final[list[dict[str, Any]]] = []
# Merged lists kept per endpoint (by method and guard key).
MAX_LISTINGS: Final = 256
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

    @property
    def key(self) -> Hashable:
        """What decides what this client sees: clients of one key see the same lists."""


class Everyone:
    """The guard without authentication or rules: everything is allowed."""

    key = ()

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


class Refused(Exception):
    """A request the aggregate answers with an error, without any member.

    C{status} is the HTTP status that says why, when the code alone cannot:
    several refusals share a JSON-RPC code (a member blocked and a member's
    rate limit are both -32000), not a status (503 and 429)."""

    def __init__(self, code: int, text: str, data: Any = None, status: int | None = None) -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.data = data
        self.status = status


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
        self.key = endpoint_key(config.name)
        self.namer = Namer(config.prefixes, config.separator, config.rename)
        self.filter = NameFilter(config.include, config.exclude)
        self._servers = servers
        self.pins = pins
        self.recorder = recorder
        # Each member's filter, built once for the settings it is built from.
        self._filters: dict[str, tuple[ServerConfig | None, NameFilter]] = {}
        # Merged lists by method and guard, with the member lists they were made of.
        self._listings: dict[
            tuple[str, Hashable],
            tuple[list[tuple[str, list[dict[str, Any]]]], list[tuple[str, list[dict[str, Any]]]]],
        ] = {}

    @property
    def members(self) -> tuple[str, ...]:
        return self.config.servers

    def member_filter(self, server: str) -> NameFilter:
        config = self._servers(server)
        kept = self._filters.get(server)
        if kept is None or kept[0] is not config:
            built = NameFilter(config.include, config.exclude) if config else NameFilter()
            kept = self._filters[server] = (config, built)
        return kept[1]

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

    def tool_visible(self, guard: Guard, server: str, name: str, shown: str | None = None) -> bool:
        """Whether a member's tool is shown to (and may be called by) this client
        (C{shown}: its name as shown, if known)."""
        return (
            self.member_filter(server).allows(name)
            and self.filter.allows(shown if shown is not None else self.namer.expose(server, name))
            and guard.tool(server, name)
            and not self._hidden(server, name)
        )

    def _hidden(self, server: str, name: str) -> bool:
        """Whether the member's pins hide this tool (hide policy, a changed definition)."""
        config = self._servers(server)
        return self.pins is not None and config is not None and self.pins.hidden(config, name)

    # Lists

    def merge(
        self, method: str, lists: list[tuple[str, list[dict[str, Any]]]], guard: Guard
    ) -> list[tuple[str, list[dict[str, Any]]]]:
        """Each member's items as clients see them (renamed copies), in the
        order given; hidden tools left out, and a clash refused."""
        named = _NAMED.get(method)
        uri_key = _URI.get(method)
        taken: dict[str, str] = {}
        merged: list[tuple[str, list[dict[str, Any]]]] = []
        for server, items in lists:
            shown_items: list[dict[str, Any]] = []
            for item in items:
                if named is not None:
                    own = item.get(named)
                    if not isinstance(own, str):
                        continue
                    shown = self.namer.expose(server, own)
                    if method == "tools/list" and not self.tool_visible(guard, server, own, shown):
                        continue
                    first = taken.get(shown)
                    renamed = self.namer.renamed_from(shown)
                    if renamed is not None and renamed != (server, own):
                        # That name is a rename's: a call to it reaches the renamed tool.
                        first = renamed[0]
                    if first is not None:
                        self._clash(server, named, own, shown, first)
                        continue
                    taken[shown] = server
                    shown_items.append({**item, named: shown})
                elif uri_key is not None:
                    uri = item.get(uri_key)
                    if isinstance(uri, str):
                        shown_items.append({**item, uri_key: self.namer.expose_uri(server, uri)})
            merged.append((server, shown_items))
        return merged

    def catalogs(
        self, guard: Guard, catalog_of: Callable[[str], Catalog | None]
    ) -> list[tuple[str, Catalog | None]]:
        """The catalog of each member this client may use, in the endpoint's
        order (None for one that cannot serve now: down, full, or blocked)."""
        return [
            (server, catalog_of(server) if self.blocked(server) is None else None)
            for server in self.members
            if guard.sees(server)
        ]

    def list_page(
        self,
        method: str,
        catalogs: list[tuple[str, Catalog | None]],
        guard: Guard,
        cursor: object,
        clock: IReactorTime,
    ) -> dict[str, Any] | Deferred[dict[str, Any]]:
        """One page of a merged list: at once when every member's list is at
        hand, or once they are fetched. L{Refused} (raised, or the Deferred's
        failure) for a cursor this endpoint did not make."""
        kept = cached_lists(method, catalogs)
        if kept is not None:
            return self.page(method, self.listing(method, kept, guard), cursor)
        d = gather_lists(self, method, catalogs, clock)
        return d.addCallback(
            lambda lists: self.page(method, self.listing(method, lists, guard), cursor)
        )

    def listing(
        self, method: str, lists: list[tuple[str, list[dict[str, Any]]]], guard: Guard
    ) -> list[tuple[str, list[dict[str, Any]]]]:
        """L{merge}, kept for clients of the same guard key until a member's
        list is another (a catalog replaces its list when it changes)."""
        key = (method, guard.key)
        kept = self._listings.get(key)
        if kept is not None and _same(kept[0], lists):
            return kept[1]
        merged = self.merge(method, lists, guard)
        if len(self._listings) >= MAX_LISTINGS:
            del self._listings[next(iter(self._listings))]
        self._listings[key] = (lists, merged)
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
        self, method: str, merged: list[tuple[str, list[dict[str, Any]]]], cursor: object
    ) -> dict[str, Any]:
        """One page of a merged list; L{Refused} for a cursor it did not make
        (or that names a member this client no longer sees)."""
        members = [server for server, _ in merged]
        start = (0, 0)
        if cursor is not None:
            try:
                server, offset = decode_cursor(cursor)
            except BadCursor:
                raise Refused(jsonrpc.INVALID_PARAMS, "Invalid params: unknown cursor") from None
            if server not in members:
                raise Refused(jsonrpc.INVALID_PARAMS, "Invalid params: unknown cursor")
            start = (members.index(server), offset)
        items, following = page([items for _, items in merged], start, self.config.page_size)
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
        elif len(self.members) == 1 and guard.sees(self.members[0]):
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
                status=503,
            )
        refusal = guard.admit(server)
        if refusal is not None:
            raise Refused(jsonrpc.RATE_LIMITED, refusal, status=429)
        routed = {**message, "params": params} if params or "params" in message else message
        return Route(server, routed)

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
    listed = catalog.lists_tool(name) if catalog is not None else None
    return listed is None or listed


def _same(
    kept: list[tuple[str, list[dict[str, Any]]]], lists: list[tuple[str, list[dict[str, Any]]]]
) -> bool:
    """Whether two sets of member lists are the very same lists."""
    return len(kept) == len(lists) and all(
        a[0] == b[0] and a[1] is b[1] for a, b in zip(kept, lists, strict=True)
    )


def cached_lists(
    method: str, catalogs: list[tuple[str, Catalog | None]]
) -> list[tuple[str, list[dict[str, Any]]]] | None:
    """Each member's list when every one is at hand (kept, or the member
    cannot serve), without waiting: None if one must be fetched."""
    lists: list[tuple[str, list[dict[str, Any]]]] = []
    for server, catalog in catalogs:
        kept = catalog.cached(method) if catalog is not None else NOTHING
        if kept is None:
            return None
        lists.append((server, kept))
    return lists


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
            (server, items if ok else NOTHING)
            for (server, _), (ok, items) in zip(catalogs, results, strict=True)
        ]
    )


def _empty() -> Deferred[list[dict[str, Any]]]:
    d: Deferred[list[dict[str, Any]]] = Deferred()
    d.callback(NOTHING)
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
    return NOTHING


def endpoint_settings(
    endpoint: EndpointConfig, servers: Mapping[str, ServerConfig]
) -> ServerConfig:
    """The settings the transports read of an endpoint, as of a server: the
    most generous of its members' (each member still applies its own)."""
    members = [servers[s] for s in endpoint.servers if s in servers]
    return ServerConfig(
        name=endpoint_key(endpoint.name),
        command="",
        max_message_size=max(m.max_message_size for m in members),
        request_timeout=max(m.request_timeout for m in members),
        max_request_timeout=max(m.max_request_timeout for m in members),
        input_timeout=max(m.input_timeout for m in members),
        session_idle_timeout=endpoint.session_idle_timeout,
        json_response=endpoint.json_response,
    )
