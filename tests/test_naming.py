# -*- test-case-name: tests.test_naming -*-
"""Names on an aggregating endpoint: namespacing, cursors and filters, as properties."""

from __future__ import annotations

import string

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.mcp.naming import (
    URI_SCHEME,
    BadCursor,
    NameFilter,
    Namer,
    clashing_prefixes,
    decode_cursor,
    encode_cursor,
    page,
)

NAME_CHARS = string.ascii_letters + string.digits + "_.-"
names = st.text(NAME_CHARS, min_size=1, max_size=20)
prefixes = st.text(string.ascii_lowercase + string.digits + "_-", min_size=1, max_size=8)
separators = st.sampled_from(["__", "_", ".", "-", "___"])


@st.composite
def namers(draw: st.DrawFn) -> Namer:
    """A naming rule the loader would accept: prefixes that cannot be confused."""
    separator = draw(separators)
    chosen = draw(st.dictionaries(names, prefixes, min_size=1, max_size=5))
    if clashing_prefixes(chosen, separator) is not None:
        # Make them distinct and unconfusable the way an operator would: by name.
        chosen = {server: f"p{i}" for i, server in enumerate(chosen)}
    return Namer(chosen, separator)


@st.composite
def renaming(draw: st.DrawFn) -> tuple[Namer, list[tuple[str, str]]]:
    """A rule with renames the loader would accept (each new name unique and
    outside every prefix's names), and the tools it is used on."""
    namer = draw(namers())
    servers = sorted(namer.prefixes)
    tools = draw(
        st.lists(st.tuples(st.sampled_from(servers), names), min_size=1, max_size=8, unique=True)
    )
    rename: dict[tuple[str, str], str] = {}
    for key in draw(st.lists(st.sampled_from(tools), unique=True)):
        new = "r" + draw(names)
        clashes = new in rename.values() or any(
            new.startswith(p + namer.separator) for p in namer.prefixes.values()
        )
        if not clashes:
            rename[key] = new
    return Namer(namer.prefixes, namer.separator, rename), tools


class NamerTests(SynchronousTestCase):
    @settings(max_examples=300)
    @given(namers(), st.data())
    def test_round_trip(self, namer: Namer, data: st.DataObject) -> None:
        """Every member's name comes back as that member and that name."""
        server = data.draw(st.sampled_from(sorted(namer.prefixes)))
        name = data.draw(names)
        self.assertEqual(namer.resolve(namer.expose(server, name)), (server, name))

    @settings(max_examples=300)
    @given(namers(), st.data())
    def test_no_collisions(self, namer: Namer, data: st.DataObject) -> None:
        """Two different (member, name) pairs are never shown alike."""
        servers = sorted(namer.prefixes)
        first = (data.draw(st.sampled_from(servers)), data.draw(names))
        second = (data.draw(st.sampled_from(servers)), data.draw(names))
        if first != second:
            self.assertNotEqual(namer.expose(*first), namer.expose(*second))

    @settings(max_examples=200)
    @given(namers(), st.data())
    def test_uri_round_trip(self, namer: Namer, data: st.DataObject) -> None:
        server = data.draw(st.sampled_from(sorted(namer.prefixes)))
        uri = data.draw(st.sampled_from(["file:///a/b", "mem://x", "time://now/{zone}", "a:b"]))
        shown = namer.expose_uri(server, uri)
        self.assertTrue(shown.startswith(URI_SCHEME))
        self.assertEqual(namer.resolve_uri(shown), (server, uri))

    @settings(max_examples=300)
    @given(renaming())
    def test_renames(self, case: tuple[Namer, list[tuple[str, str]]]) -> None:
        """With renames too, every tool comes back as itself, and no two share a name."""
        namer, tools = case
        shown = {namer.expose(server, tool): (server, tool) for server, tool in tools}
        self.assertEqual(len(shown), len(tools))
        for name, key in shown.items():
            self.assertEqual(namer.resolve(name), key)

    def test_unknown_names(self) -> None:
        namer = Namer({"github": "gh", "time": "time"})
        self.assertIsNone(namer.resolve("nothing"))
        self.assertIsNone(namer.resolve("other__tool"))
        self.assertIsNone(namer.resolve("gh__"))
        self.assertIsNone(namer.resolve(42))
        self.assertIsNone(namer.resolve_uri("file:///etc/passwd"))
        self.assertIsNone(namer.resolve_uri("mcptwist:zz/file:///x"))
        self.assertEqual(namer.resolve("gh__a__b"), ("github", "a__b"))

    def test_rename(self) -> None:
        """A renamed tool answers to its new name, and to that name only."""
        namer = Namer({"github": "gh"}, rename={("github", "create_issue"): "open_issue"})
        self.assertEqual(namer.expose("github", "create_issue"), "open_issue")
        self.assertEqual(namer.resolve("open_issue"), ("github", "create_issue"))
        self.assertIsNone(namer.resolve("gh__create_issue"))

    def test_bare(self) -> None:
        """prefix = "none": names and URIs as the one member has them."""
        namer = Namer({"only": ""})
        self.assertEqual(namer.expose("only", "x"), "x")
        self.assertEqual(namer.resolve("x"), ("only", "x"))
        self.assertEqual(namer.expose_uri("only", "file:///x"), "file:///x")
        self.assertEqual(namer.resolve_uri("file:///x"), ("only", "file:///x"))

    def test_clashing_prefixes(self) -> None:
        self.assertEqual(clashing_prefixes({"a": "x", "b": "x__y"}, "__"), ("a", "b"))
        self.assertIsNone(clashing_prefixes({"a": "x", "b": "xy"}, "__"))
        self.assertIsNotNone(clashing_prefixes({"a": "x", "b": "x"}, "__"))


class CursorTests(SynchronousTestCase):
    @given(names, st.integers(min_value=0, max_value=10**9))
    def test_round_trip(self, server: str, offset: int) -> None:
        self.assertEqual(decode_cursor(encode_cursor(server, offset)), (server, offset))

    @given(st.one_of(st.text(max_size=40), st.integers(), st.none()))
    def test_garbage(self, cursor: object) -> None:
        """Anything else is refused, never taken for a position."""
        try:
            server, offset = decode_cursor(cursor)
        except BadCursor:
            return
        self.assertEqual(encode_cursor(server, offset).rstrip("="), str(cursor).rstrip("="))

    @settings(max_examples=300)
    @given(
        st.lists(st.lists(st.integers(), max_size=7), min_size=1, max_size=6),
        st.integers(min_value=1, max_value=9),
    )
    def test_pages_cover_everything_once(self, lists: list[list[int]], size: int) -> None:
        """Following the cursors gives every member's items once, in order."""
        seen: list[int] = []
        start: tuple[int, int] | None = (0, 0)
        pages = 0
        while start is not None:
            items, start = page(lists, start, size)
            self.assertLessEqual(len(items), size)
            seen.extend(items)
            pages += 1
            self.assertLessEqual(pages, sum(map(len, lists)) + 1)
        self.assertEqual(seen, [i for items in lists for i in items])


class FilterTests(SynchronousTestCase):
    @given(names)
    def test_everything(self, name: str) -> None:
        self.assertTrue(NameFilter().allows(name))

    @given(names)
    def test_exclude_wins(self, name: str) -> None:
        self.assertFalse(NameFilter(include=("*",), exclude=(name,)).allows(name))

    def test_globs(self) -> None:
        f = NameFilter(include=("get_*", "list_*"), exclude=("*_secret",))
        self.assertTrue(f.allows("get_issue"))
        self.assertFalse(f.allows("delete_repo"))
        self.assertFalse(f.allows("get_secret"))
        self.assertFalse(NameFilter(include=("Get*",)).allows("get"))
