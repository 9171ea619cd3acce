# -*- test-case-name: tests.test_naming -*-
"""Names on an aggregating endpoint: how a member server's tools, prompts and
resources are shown to clients, and found again.

An endpoint puts several servers behind one URL. Each member's tool (and
prompt) C{NAME} is shown as C{PREFIX + SEPARATOR + NAME} (by default
C{SERVER__NAME}), unless the endpoint renames it; a resource URI C{URI} is
shown as C{mcptwist:PREFIX/URI}, so URIs of different servers never collide
and the member is found from the URI alone. An endpoint of one server may do
without a prefix (C{prefix = "none"}): its names and URIs are shown as they are.

Also here: the filters (C{include} and C{exclude} glob lists), and the
cursor of a merged list, which says where in each member's list a page starts.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import json
from collections.abc import Mapping, Sequence
from typing import Final, TypeVar

import attrs

SEPARATOR: Final = "__"
URI_SCHEME: Final = "mcptwist:"
T = TypeVar("T")


@attrs.frozen
class Namer:
    """The naming rule of one endpoint.

    C{prefixes} maps each member server to its prefix (all of them non-empty,
    none a prefix of another once the separator is added), or is the one
    member mapped to C{""} (no prefix). C{rename} maps a member's own name of
    a tool or prompt, as C{(server, name)}, to the name shown.
    """

    prefixes: Mapping[str, str]
    separator: str = SEPARATOR
    rename: Mapping[tuple[str, str], str] = attrs.field(factory=dict)
    _by_prefix: dict[str, str] = attrs.field(init=False)
    _renamed: dict[str, tuple[str, str]] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(
            self, "_by_prefix", {prefix: server for server, prefix in self.prefixes.items()}
        )
        object.__setattr__(self, "_renamed", {shown: key for key, shown in self.rename.items()})

    @property
    def bare(self) -> bool:
        """Names and URIs are shown as the one member has them."""
        return "" in self._by_prefix

    def expose(self, server: str, name: str) -> str:
        """The name a client sees for a member's tool or prompt."""
        renamed = self.rename.get((server, name))
        if renamed is not None:
            return renamed
        prefix = self.prefixes[server]
        return f"{prefix}{self.separator}{name}" if prefix else name

    def resolve(self, shown: object) -> tuple[str, str] | None:
        """The member and its own name behind a name a client sent, or None."""
        if not isinstance(shown, str):
            return None
        key = self._renamed.get(shown)
        if key is not None:
            return key
        server, name = self._split(shown)
        if server is None or (server, name) in self.rename:
            # A renamed tool answers to its new name only.
            return None
        return server, name

    def _split(self, shown: str) -> tuple[str | None, str]:
        if self.bare:
            return self._by_prefix[""], shown
        # Prefixes cannot be confused (see clashing_prefixes): one matches at most.
        for prefix, server in self._by_prefix.items():
            head = prefix + self.separator
            if shown.startswith(head) and len(shown) > len(head):
                return server, shown[len(head) :]
        return None, shown

    def renamed_from(self, shown: str) -> tuple[str, str] | None:
        """The member and tool a rename gives this name, if one does."""
        return self._renamed.get(shown)

    def expose_uri(self, server: str, uri: str) -> str:
        """The URI (or URI template) a client sees for a member's resource."""
        prefix = self.prefixes[server]
        return f"{URI_SCHEME}{prefix}/{uri}" if prefix else uri

    def resolve_uri(self, shown: object) -> tuple[str, str] | None:
        """The member and its own URI behind a URI a client sent, or None."""
        if not isinstance(shown, str):
            return None
        if self.bare:
            return self._by_prefix[""], shown
        if not shown.startswith(URI_SCHEME):
            return None
        prefix, slash, uri = shown[len(URI_SCHEME) :].partition("/")
        server = self._by_prefix.get(prefix)
        if server is None or not slash or not uri:
            return None
        return server, uri


def clashing_prefixes(prefixes: Mapping[str, str], separator: str) -> tuple[str, str] | None:
    """Two members whose names could be confused (one's prefix and separator
    begins the other's), or None: such a rule cannot be resolved."""
    items = sorted(prefixes.items(), key=lambda item: item[1])
    for server, prefix in items:
        for other, theirs in items:
            if other != server and (theirs + separator).startswith(prefix + separator):
                return server, other
    return None


@attrs.frozen
class NameFilter:
    """C{include} and C{exclude} glob lists (case-sensitive): a name passes if
    it matches an include pattern (or there are none) and no exclude pattern."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @property
    def everything(self) -> bool:
        return not self.include and not self.exclude

    def allows(self, name: str) -> bool:
        if self.include and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)


class BadCursor(ValueError):
    """A cursor this endpoint did not make."""


def encode_cursor(server: str, offset: int) -> str:
    """Where the next page of a merged list starts: at C{offset} in the list
    of the member C{server} (members are listed in the endpoint's order)."""
    text = json.dumps([server, offset], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(text).decode().rstrip("=")


def decode_cursor(cursor: object) -> tuple[str, int]:
    """The (member, offset) of a cursor; L{BadCursor} otherwise."""
    if not isinstance(cursor, str) or len(cursor) > 256:
        raise BadCursor(cursor)
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error):
        raise BadCursor(cursor) from None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not isinstance(value[0], str)
        or type(value[1]) is not int
        or value[1] < 0
    ):
        raise BadCursor(cursor)
    return value[0], value[1]


def page(
    lists: Sequence[list[T]], start: tuple[int, int], size: int
) -> tuple[list[T], tuple[int, int] | None]:
    """One page of the lists joined in order, from C{start} (member, offset):
    at most C{size} items, and where the next page starts (None: the end)."""
    items: list[T] = []
    member, offset = start
    while member < len(lists):
        rest = lists[member][offset:]
        room = size - len(items)
        if len(rest) > room:
            items.extend(rest[:room])
            return items, (member, offset + room)
        items.extend(rest)
        member, offset = member + 1, 0
        if len(items) == size:
            break
    while member < len(lists) and not lists[member]:
        member += 1
    return items, ((member, 0) if member < len(lists) else None)
