"""The gate, fuzzed: generated paths, headers and bodies, sent as raw bytes to a
bridge's own HTTP site (its channel, gate, routes and admin API), with and
without authentication.

Whatever arrives, no message reaches a server's child for a principal that
may not use that server, no admin action runs without the admin scope and a
grant of the server it acts on, no list shows a server outside the caller's
grants, no session answers another principal, and nothing is a 500.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.config.model import (
    AdminConfig,
    AuthConfig,
    BridgeConfig,
    CommandConfig,
    LimitsConfig,
    ServerConfig,
    TokenConfig,
)
from mcptwist.security.auth import ANONYMOUS, ANONYMOUS_REMOTE, Principal, hash_token
from mcptwist.service.bridge import BridgeService

from .support.children import FakeProcessReactor

# token -> (name, servers, admin)
TOKENS: dict[str, tuple[str, frozenset[str], bool]] = {
    "tok-root-0123456789": ("root", frozenset({"*"}), True),
    "tok-ops-s-0123456789": ("ops-s", frozenset({"s"}), True),
    "tok-alice-0123456789": ("alice", frozenset({"s"}), False),
    "tok-bob-0123456789": ("bob", frozenset({"t"}), False),
}
SERVERS = ("s", "t")
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "f"}},
}
BODIES: list[Any] = [
    INITIALIZE,
    {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "x", "arguments": {}}},
    {"jsonrpc": "2.0", "id": 3, "method": "tools/list"},
    {"jsonrpc": "2.0", "id": 4, "method": "ping"},
    {"jsonrpc": "2.0", "method": "notifications/initialized"},
    [{"jsonrpc": "2.0", "id": 5, "method": "ping"}, {"jsonrpc": "2.0", "id": 6, "method": "ping"}],
    {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "x", "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}},
    },
    {"name": "n", "config": {"command": "fake"}},
    {"name": "t", "config": {"command": "/bin/sh", "args": ["-c", "id"]}},
]
SEGMENTS = [
    "servers", "admin", "s", "t", "u", "mcp", "sse", "messages", "sessions", "stop", "start",
    "restart", "stderr", "reload", "metrics", "health", ".well-known",
    "oauth-protected-resource", "", ".", "..", "%2e%2e", "S", "%73", "s%2Fmcp", "mcp%00",
]  # fmt: skip
KNOWN_PATHS = [
    "/", "/health", "/metrics", "/servers", "/servers/s", "/servers/t", "/servers/s/mcp",
    "/servers/t/mcp", "/servers/s/sse", "/servers/t/sse", "/servers/s/messages",
    "/servers/t/messages", "/admin/servers", "/admin/servers/s", "/admin/servers/t",
    "/admin/servers/t/stop", "/admin/servers/s/restart", "/admin/servers/t/start",
    "/admin/servers/t/stderr", "/admin/servers/s/stderr", "/admin/sessions",
    "/admin/sessions?server=t", "/admin/reload",
]  # fmt: skip


@attrs.frozen
class Sent:
    method: str
    path: str
    token: str | None
    headers: tuple[tuple[str, str], ...]
    body: bytes | None


def paths() -> st.SearchStrategy[str]:
    built = st.lists(st.sampled_from(SEGMENTS), max_size=5).map(lambda s: "/" + "/".join(s))
    # Paths the bridge serves, more often than made-up ones.
    path = st.one_of(st.sampled_from(KNOWN_PATHS), st.sampled_from(KNOWN_PATHS), built)
    query = st.sampled_from(["", "?server=t", "?session_id=SESSION", "?access_token=x", "?lines=5"])
    return st.builds(lambda p, q: p + q, path, query)


def bodies() -> st.SearchStrategy[bytes | None]:
    return st.one_of(
        st.none(),
        st.sampled_from(BODIES).map(lambda b: json.dumps(b).encode()),
        st.binary(max_size=40),
    )


JSON_POST = (
    ("content-type", "application/json"),
    ("accept", "application/json, text/event-stream"),
)


def _template(method: str, path: str, server: str, who: str, token: str | None) -> Sent:
    """A request as a client that knows the bridge would send it."""
    path = path.replace("X", server).replace("WHO", who)
    headers: tuple[tuple[str, str], ...] = JSON_POST if method == "POST" else ()
    body: Any = None
    if path.endswith("/mcp") and method == "POST":
        call = {"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "x"}}
        body = INITIALIZE if who == "new" else call
        if who != "new":
            headers += (("mcp-session-id", f"SESSION-{who}"),)
    elif path.endswith("/mcp"):
        headers = (("accept", "text/event-stream"), ("mcp-session-id", f"SESSION-{who}"))
    elif path == "/admin/servers" and method == "POST":
        body = {"name": server, "config": {"command": "fake"}}
    return Sent(method, path, token, headers, json.dumps(body).encode() if body else None)


TEMPLATES = [
    ("POST", "/servers/X/mcp"),
    ("GET", "/servers/X/mcp"),
    ("DELETE", "/servers/X/mcp"),
    ("GET", "/servers/X/sse"),
    ("GET", "/servers"),
    ("GET", "/servers/X"),
    ("GET", "/metrics"),
    ("GET", "/admin/servers"),
    ("GET", "/admin/servers/X"),
    ("GET", "/admin/servers/X/stderr"),
    ("POST", "/admin/servers/X/stop"),
    ("POST", "/admin/servers/X/start"),
    ("POST", "/admin/servers/X/restart"),
    ("DELETE", "/admin/servers/X"),
    ("POST", "/admin/servers"),
    ("POST", "/admin/reload"),
    ("GET", "/admin/sessions"),
    ("GET", "/admin/sessions?server=X"),
    ("DELETE", "/admin/sessions/SESSION-WHO"),
]


def plausible() -> st.SearchStrategy[Sent]:
    """Well-formed requests, by every principal, for every server and session."""
    return st.builds(
        lambda template, server, who, token: _template(*template, server, who, token),
        st.sampled_from(TEMPLATES),
        st.sampled_from([*SERVERS, "u"]),
        st.sampled_from(["new", "alice", "bob", "root"]),
        st.sampled_from([*TOKENS, None, "nope"]),
    )


def requests() -> st.SearchStrategy[Sent]:
    return st.one_of(plausible(), chaotic())


def chaotic() -> st.SearchStrategy[Sent]:
    """Anything: methods, paths, headers and bodies in every combination."""
    optional = lambda values: st.sampled_from([None, *values])  # noqa: E731
    return st.builds(
        lambda method, path, token, content_type, accept, session, version, origin, host, body: (
            Sent(
                method,
                path,
                token,
                tuple(
                    (k, v)
                    for k, v in (
                        ("content-type", content_type),
                        ("accept", accept),
                        ("mcp-session-id", session),
                        ("mcp-protocol-version", version),
                        ("origin", origin),
                        ("host", host),
                    )
                    if v is not None
                ),
                body,
            )
        ),
        # Weighted towards what the bridge serves: a valid token, a JSON POST.
        st.sampled_from(["GET", "GET", "POST", "POST", "POST", "DELETE", "PUT", "OPTIONS", "HEAD"]),
        paths(),
        optional([*TOKENS, *TOKENS, "nope", "tok-root-0123456789x"]),
        optional(["application/json", "application/json", "application/json", "text/plain"]),
        optional(["application/json, text/event-stream", "text/event-stream", "*/*"]),
        optional(["SESSION-alice", "SESSION-bob", "SESSION-root", "unknown-session"]),
        optional(["2025-11-25", "2026-07-28", "1999-01-01"]),
        # Mostly absent: a browser's Origin or a foreign Host stops most requests at once.
        optional([None, None, None, "http://evil.example", "http://localhost:6274"]),
        optional([None, None, None, "evil.example", "localhost"]),
        bodies(),
    )


class Recorder:
    """Stands for the admin API's control and records every call made on it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        def record(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args))
            return method(*args, **kwargs)

        return record


class Surface:
    """A bridge serving servers C{s} (shared) and C{t} (a child per session)
    over fake children, reached through its own HTTP site with raw bytes."""

    def __init__(self, test: SynchronousTestCase, auth: bool, local: bool) -> None:
        self.test = test
        self.auth = auth
        self.reactor = FakeProcessReactor()
        servers = {
            "s": ServerConfig(name="s", command="fake-s"),
            "t": ServerConfig(name="t", command="fake-t", sharing="session"),
        }
        tokens = tuple(
            TokenConfig(name, hash_token(token), servers=grants, admin=admin)
            for token, (name, grants, admin) in TOKENS.items()
        )
        config = BridgeConfig(
            servers=servers,
            auth=AuthConfig(tokens=tokens if auth else ()),
            limits=LimitsConfig(per_principal=None, per_ip=None),
            admin=AdminConfig(commands={"fake": CommandConfig("fake", "fake-s")}),
        )
        self.service = BridgeService(config, self.reactor, {})
        self.service.startService()
        self.site = self.service.site
        # As a listener bound to a network address (or to loopback) says.
        self.site.local = local
        api = self.service.web.admin.api  # type: ignore[union-attr]
        self.control = Recorder(api.control)
        api.control = self.control
        self.reactor.advance(1)
        self.sessions: dict[str, tuple[str, str]] = {}
        for token, server in (
            ("tok-alice-0123456789", "s"),
            ("tok-bob-0123456789", "t"),
            ("tok-root-0123456789", "t"),
        ):
            name = TOKENS[token][0]
            sent = Sent(
                "POST",
                f"/servers/{server}/mcp",
                token if auth else None,
                (("content-type", "application/json"), ("accept", "application/json")),
                json.dumps(INITIALIZE).encode(),
            )
            status, headers, _ = self.send(sent)
            test.assertEqual(status, 200)
            self.sessions[f"SESSION-{name}"] = (headers["mcp-session-id"], server)

    def close(self) -> None:
        self.service.stopService()
        self.reactor.advance(10)

    def principal(self, token: str | None) -> Principal | None:
        """Who the bridge must take the sender for (None: nobody)."""
        if not self.auth:
            # Without authentication only a client on this host is an operator.
            return ANONYMOUS if self.site.local else ANONYMOUS_REMOTE
        if token not in TOKENS:
            return None
        name, grants, admin = TOKENS[token]
        return Principal(name, "token", grants, admin)

    def raw(self, sent: Sent) -> bytes:
        path = sent.path
        headers = dict(sent.headers)
        session = headers.get("mcp-session-id")
        if session in self.sessions:
            headers["mcp-session-id"] = self.sessions[session][0]
        for label, (session_id, _) in self.sessions.items():
            path = path.replace(label, session_id)
        if "SESSION" in path:
            path = path.replace("SESSION", self.sessions["SESSION-alice"][0])
        headers.setdefault("host", "127.0.0.1:8080")
        if sent.token is not None:
            headers["authorization"] = f"Bearer {sent.token}"
        lines = [f"{sent.method} {path} HTTP/1.1"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        body = sent.body or b""
        if sent.body is not None:
            lines.append(f"content-length: {len(body)}")
        lines.append("connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    def send(self, sent: Sent) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of one request on a connection of its own."""
        # A listener on loopback is reached from this host; one open to the
        # network, from elsewhere.
        peer = IPv4Address("TCP", "127.0.0.1" if self.site.local else "192.0.2.7", 40000)
        protocol = self.site.buildProtocol(peer)
        transport = StringTransport(
            peerAddress=peer, hostAddress=IPv4Address("TCP", "10.0.0.1", 8080)
        )
        protocol.makeConnection(transport)
        protocol.dataReceived(self.raw(sent))
        self.reactor.advance(0)
        answer = transport.value()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.reactor.advance(0)
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1]) if lines[0].startswith("HTTP/") else 0
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        return status, headers, body

    def received(self) -> dict[str, int]:
        """How many messages each server's children have been sent."""
        counts = dict.fromkeys(SERVERS, 0)
        for child in self.reactor.children:
            server = next(a for a in child.args if a.startswith("fake-"))[len("fake-") :]
            counts[server] += len(child.received)
        return counts


def granted(principal: Principal | None, server: str) -> bool:
    if principal is None:
        return False
    return "*" in principal.servers if server == "*" else principal.may_use(server)


def names(body: bytes, key: str, field: str) -> Iterator[str]:
    try:
        document = json.loads(body)
    except ValueError:
        return
    if isinstance(document, dict):
        for entry in document.get(key, []):
            yield entry[field]


class GateFuzzTests(SynchronousTestCase):
    def check(self, surface: Surface, sent: Sent) -> None:
        principal = surface.principal(sent.token)
        before = surface.received()
        surface.control.calls.clear()
        status, _, body = surface.send(sent)
        note = f"{sent} -> {status} {body[:300]!r}"
        self.assertNotEqual(status, 0, note)
        if status != 503:
            self.assertLess(status, 500, note)
        # No child hears from a principal that may not use its server.
        after = surface.received()
        for server in SERVERS:
            if after[server] != before[server]:
                self.assertTrue(granted(principal, server), f"{server}'s child reached: {note}")
        # No admin action without the admin scope and a grant of its target.
        for name, args in surface.control.calls:
            self.assertIsNotNone(principal, note)
            assert principal is not None
            self.assertTrue(principal.admin, f"{name}{args}: {note}")
            self.assertTrue(surface.auth or surface.site.local, f"{name}{args}: {note}")
            if (
                name in ("server", "start", "stop", "restart", "stderr", "remove_server")
                or name == "add_server"
            ):
                self.assertTrue(granted(principal, args[0]), f"{name}{args}: {note}")
            elif name == "reload":
                self.assertTrue(granted(principal, "*"), note)
            elif name == "close_session":
                owner = {sid: server for sid, server in surface.sessions.values()}.get(args[0])
                self.assertTrue(owner is None or granted(principal, owner), note)
        # Status and metrics are for operators only.
        path = sent.path.split("?")[0]
        operator_route = path in ("/servers", "/metrics") or (
            path.startswith("/servers/") and path.count("/") == 2
        )
        if operator_route and status == 200:
            self.assertTrue(principal is not None and principal.admin, note)
        # Lists show only granted servers.
        if status == 200 and sent.method == "GET":
            path = sent.path.split("?")[0]
            listed = []
            if path in ("/servers", "/admin/servers"):
                listed = list(names(body, "servers", "name"))
            elif path == "/admin/sessions":
                listed = list(names(body, "sessions", "server"))
            for server in listed:
                self.assertTrue(granted(principal, server), f"{server} listed: {note}")
        # A session answers only the principal that opened it.
        session = dict(sent.headers).get("mcp-session-id")
        if session in surface.sessions and sent.body is not None and b"initialize" not in sent.body:
            owner = session.removeprefix("SESSION-")
            who = principal.name if principal is not None else None
            if surface.auth and who != owner and sent.path.endswith("/mcp"):
                self.assertGreaterEqual(status, 400, f"another's session answered: {note}")

    @settings(max_examples=1000)
    @given(st.lists(requests(), min_size=1, max_size=4))
    def test_with_authentication(self, sent: list[Sent]) -> None:
        surface = Surface(self, auth=True, local=True)
        try:
            for one in sent:
                self.check(surface, one)
        finally:
            surface.close()

    @settings(max_examples=300)
    @given(st.lists(requests(), min_size=1, max_size=4))
    def test_without_authentication_on_an_open_listener(self, sent: list[Sent]) -> None:
        surface = Surface(self, auth=False, local=False)
        try:
            for one in sent:
                self.check(surface, one)
        finally:
            surface.close()

    @settings(max_examples=200)
    @given(st.lists(requests(), min_size=1, max_size=4))
    def test_without_authentication_on_loopback(self, sent: list[Sent]) -> None:
        surface = Surface(self, auth=False, local=True)
        try:
            for one in sent:
                self.check(surface, one)
        finally:
            surface.close()
