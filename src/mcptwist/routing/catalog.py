# -*- test-case-name: tests.test_aggregate -*-
"""What one child offers: its tools, prompts, resources and templates, fetched
once and kept until the child says they changed.

Each L{Upstream} has a L{Catalog}. An aggregating endpoint answers its
clients' lists from its members' catalogs, so a C{tools/list} on an endpoint
of ten servers costs what one does. A list is fetched (every page of it)
the first time it is asked for, and again only after the child sends its
C{list_changed} notification, or when a new child takes the old one's place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from mcptwist.child.supervisor import ChildState
from mcptwist.mcp.jsonrpc import Message

log = Logger(namespace="mcptwist.routing")

# Each list: the key of its items in a result, and the capability that offers it.
LISTS: Final = {
    "tools/list": ("tools", "tools"),
    "prompts/list": ("prompts", "prompts"),
    "resources/list": ("resources", "resources"),
    "resources/templates/list": ("resourceTemplates", "resources"),
}
# The lists each list_changed notification makes stale.
STALE_AFTER: Final = {
    "notifications/tools/list_changed": ("tools/list",),
    "notifications/prompts/list_changed": ("prompts/list",),
    "notifications/resources/list_changed": ("resources/list", "resources/templates/list"),
}
# Bounds on what is fetched of one list: a child that pages forever is cut off.
MAX_PAGES: Final = 100
MAX_ITEMS: Final = 10_000


class Source(Protocol):
    """What a catalog asks of its upstream."""

    @property
    def label(self) -> str: ...

    @property
    def state(self) -> ChildState: ...

    @property
    def init_result(self) -> dict[str, Any] | None: ...

    def when_ready(self) -> Deferred[None]: ...

    def ask(
        self, method: str, params: dict[str, Any], answered: Callable[[Message], None]
    ) -> None: ...

    def catalog_used(self) -> None: ...

    def unavailable_text(self) -> str: ...


class Unavailable(Exception):
    """The child cannot be asked now (failed, stopped), or failed the list."""


class Catalog:
    """One child's lists, fetched once and kept current by its notifications."""

    def __init__(self, upstream: Source) -> None:
        self._upstream = upstream
        self._lists: dict[str, list[dict[str, Any]]] = {}
        self._waiting: dict[str, list[Deferred[list[dict[str, Any]]]]] = {}
        # Each list's generation, bumped whenever what was fetched of it may be
        # stale: an answer to an older fetch is dropped (and a new one sent).
        self._generations: dict[str, int] = dict.fromkeys(LISTS, 0)
        # The generation of each list's fetch under way (one at a time).
        self._fetching: dict[str, int] = {}
        # Lists waiting for the child to be ready.
        self._until_ready: set[str] = set()
        self.used = False
        # The names of the tools kept, and the list they were taken from.
        # The kept tools by name, made once per list the child gives.
        self._by_name: dict[Any, dict[str, Any]] = {}
        self._names_of: list[dict[str, Any]] | None = None
        # Told (with the method) whenever a list is known to have changed.
        self.watchers: list[Callable[[str], None]] = []
        # Reviews a fresh tools list before it is kept (pinning); may drop tools.
        self.review: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None

    def cached(self, method: str) -> list[dict[str, Any]] | None:
        return self._lists.get(method)

    def lists_tool(self, name: str) -> bool | None:
        """Whether the child lists a tool of this name (None: its tools are not kept)."""
        tools = self._tools_by_name()
        return None if tools is None else name in tools

    def tool(self, name: str) -> dict[str, Any] | None:
        """The definition of the child's tool of this name, if it lists one."""
        tools = self._tools_by_name()
        return None if tools is None else tools.get(name)

    def _tools_by_name(self) -> dict[Any, dict[str, Any]] | None:
        tools = self._lists.get("tools/list")
        if tools is None:
            return None
        if self._names_of is not tools:
            self._by_name = {t.get("name"): t for t in tools}
            self._names_of = tools
        return self._by_name

    def offers(self, method: str) -> bool:
        """Whether the child declared the capability of this list."""
        init = self._upstream.init_result or {}
        capabilities = init.get("capabilities")
        return isinstance(capabilities, dict) and LISTS[method][1] in capabilities

    def get(self, method: str) -> Deferred[list[dict[str, Any]]]:
        """The whole list (every page), from the cache or fetched; fails with
        L{Unavailable} when the child is down or refuses."""
        kept = self._lists.get(method)
        if kept is not None:
            return succeed(kept)
        d: Deferred[list[dict[str, Any]]] = Deferred()
        self._waiting.setdefault(method, []).append(d)
        if not self.used:
            self.used = True
            self._upstream.catalog_used()
        self._fetch(method)
        return d

    def _fetch(self, method: str) -> None:
        """Fetch a list someone waits for, unless its current fetch is under way."""
        if method not in self._waiting or self._fetching.get(method) == self._generations[method]:
            return
        upstream = self._upstream
        if upstream.state in (ChildState.FAILED, ChildState.STOPPED, ChildState.RESTARTING):
            # A child that is starting is waited for; one that crashed is not.
            self._settle(method, Unavailable(upstream.unavailable_text()))
            return
        if upstream.init_result is None or upstream.state is not ChildState.RUNNING:
            if method not in self._until_ready:
                self._until_ready.add(method)
                upstream.when_ready().addCallback(lambda _: self._ready_for(method))
            return
        generation = self._generations[method]
        if not self.offers(method):
            self._keep(method, [], generation)
            return
        self._fetching[method] = generation
        self._page(method, None, [], generation, 0)

    def _ready_for(self, method: str) -> None:
        self._until_ready.discard(method)
        self._fetch(method)

    def _page(
        self,
        method: str,
        cursor: str | None,
        items: list[dict[str, Any]],
        generation: int,
        pages: int,
    ) -> None:
        def answered(response: Message) -> None:
            if generation != self._generations[method]:
                return  # stale: the fetch after the change is under way
            result = response.get("result")
            if not isinstance(result, dict):
                error = response.get("error")
                text = error.get("message") if isinstance(error, dict) else None
                self._settle(method, Unavailable(f"{method} failed: {text or response}"))
                return
            found = result.get(LISTS[method][0])
            if isinstance(found, list):
                items.extend(i for i in found if isinstance(i, dict))
            following = result.get("nextCursor")
            more = isinstance(following, str) and bool(following)
            if more and pages + 1 < MAX_PAGES and len(items) < MAX_ITEMS:
                self._page(method, following, items, generation, pages + 1)
                return
            if len(items) > MAX_ITEMS or more:
                log.warn(
                    "{server}: kept the first {count} items of its {method} only",
                    server=self._upstream.label,
                    count=min(len(items), MAX_ITEMS),
                    method=method,
                )
            self._keep(method, items[:MAX_ITEMS], generation)

        self._upstream.ask(method, {"cursor": cursor} if cursor else {}, answered)

    def _keep(self, method: str, items: list[dict[str, Any]], generation: int) -> None:
        self._fetching.pop(method, None)
        if method == "tools/list" and self.review is not None:
            items = self.review(items)
        if generation == self._generations[method]:
            self._lists[method] = items
        for d in self._waiting.pop(method, []):
            d.callback(items)

    def _settle(self, method: str, failure: Exception) -> None:
        self._fetching.pop(method, None)
        for d in self._waiting.pop(method, []):
            d.errback(failure)

    def _stale(self, method: str) -> None:
        """What was fetched of a list no longer holds: fetch it again if
        someone waits (or, for tools under review, at once)."""
        self._generations[method] += 1
        self._lists.pop(method, None)
        if method == "tools/list" and self.review is not None and self.used:
            self.get(method).addErrback(lambda _: None)
        else:
            self._fetch(method)

    def changed(self, notification: str) -> None:
        """The child says a list changed: fetch it again (when next asked,
        but at once for tools under review)."""
        methods = STALE_AFTER.get(notification, ())
        for method in methods:
            self._stale(method)
        for method in methods:
            for watcher in list(self.watchers):
                watcher(method)

    def reset(self, gone: bool = False) -> None:
        """A new child, or none (C{gone}: its lists are gone, and watchers are
        told): nothing fetched from the old one holds."""
        stale = list(self._lists)
        for method in LISTS:
            self._generations[method] += 1
            self._lists.pop(method, None)
            self._fetch(method)
        if gone:
            for method in stale:
                for watcher in list(self.watchers):
                    watcher(method)

    def ready(self) -> None:
        """A new child is ready: what it offers may differ from the last one's.
        Its tools are reviewed (pinned) at once, whether or not anyone asks."""
        if self.review is not None and self.offers("tools/list"):
            self.get("tools/list").addErrback(lambda _: None)
        if self.used:
            for method in LISTS:
                if self.offers(method):
                    for watcher in list(self.watchers):
                        watcher(method)

    def refresh_tools(self) -> None:
        """The review of tools changed (a pin was accepted): review them again."""
        self.changed("notifications/tools/list_changed")
