"""The in-memory harness: a bridge over fake children, driven through StubTreq.

L{Bridge} is the HTTP surface alone, wired as the service wires it, with
nothing running on the clock; L{Service} is the whole service, started.
Both take requests through the same client (L{Harness}). L{Client} speaks
the 2026-07-28 revision to a L{Bridge}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import orjson
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed

from mcptwist.config.model import BridgeConfig, ServerConfig
from mcptwist.mcp import jsonrpc
from mcptwist.mcp.jsonrpc import Message
from mcptwist.ops.audit import AuditTrail
from mcptwist.routing.backends import make_backend
from mcptwist.routing.sessions import SessionRegistry
from mcptwist.routing.stateless import ModernCall, StatelessSink
from mcptwist.service.bridge import BridgeService
from mcptwist.web.access import AccessControl
from mcptwist.web.app import BridgeApp
from mcptwist.web.modern import HTTPResponder

from .children import FakeChild, FakeProcessReactor
from .messages import ACCEPT_BOTH, INIT, JSON, headers


class Harness:
    """Requests through a StubTreq client, each flushed until it is answered."""

    test: SynchronousTestCase
    client: StubTreq

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> Any:
        """The response to one request (its body not read yet)."""
        return self._respond(method, path, body, headers, raw)

    def _respond(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> Any:
        data = raw if raw is not None else (jsonrpc.dumps(body) if body is not None else None)
        d = self.client.request(method, "http://127.0.0.1" + path, data=data, headers=headers or {})
        self.client.flush()
        return self.test.successResultOf(d)

    def content(self, response: Any) -> bytes:
        d = self.client.content(response)
        self.client.flush()
        return self.test.successResultOf(d)  # type: ignore[no-any-return]

    def json(self, response: Any) -> Any:
        return jsonrpc.loads(self.content(response))

    def exchange(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, Any]:
        """One request: (status, headers, JSON body or None), or the response
        itself for an event stream (it stays open)."""
        response = self._respond(method, path, body, headers)
        if response.headers.getRawHeaders("content-type") == ["text/event-stream"]:
            return response.code, response.headers, response
        content = self.content(response)
        return response.code, response.headers, orjson.loads(content) if content else None

    def open_session(
        self,
        server: str = "s",
        init: jsonrpc.Message = INIT,
        headers: dict[str, str] | None = None,
    ) -> str:
        """A Streamable HTTP session, initialized; C{headers} go with each request."""
        extra = headers or {}
        response = self._respond("POST", f"/servers/{server}/mcp", init, {**JSON, **extra})
        self.test.assertEqual(response.code, 200)
        [session_id] = response.headers.getRawHeaders("mcp-session-id")
        self.json(response)
        self._respond(
            "POST",
            f"/servers/{server}/mcp",
            jsonrpc.notification("notifications/initialized"),
            {**JSON, "mcp-session-id": session_id, **extra},
        )
        return str(session_id)

    def stream(self, response: Any) -> list[bytes]:
        """The chunks of a streamed response, read as they come."""
        chunks: list[bytes] = []
        d = self.client.collect(response, chunks.append)
        # A stream that the test cuts off ends with ResponseFailed.
        d.addErrback(lambda f: f.trap(ResponseFailed))
        self.client.flush()
        return chunks


class Bridge(Harness):
    """A bridge's HTTP surface over fake children (server C{s} unless told).

    It is wired as the service wires it: the audit trail its config asks for,
    access control, each principal's caps. Nothing runs on the clock (no
    reaper, no heartbeat): a test advances it and reaps itself.
    """

    def __init__(
        self,
        test: SynchronousTestCase,
        *servers: ServerConfig,
        hold: bool = False,
        fetch: Any = None,
        store: Any = None,
        reactor: FakeProcessReactor | None = None,
        **settings: Any,
    ) -> None:
        self.test = test
        self.reactor = reactor or FakeProcessReactor(hold=hold)
        servers = servers or (ServerConfig(name="s", command="fake"),)
        self.config = BridgeConfig(servers={s.name: s for s in servers}, **settings)
        self.audit = AuditTrail(self.config.audit, self.reactor)
        self.audit.start()
        self.backends = {s.name: make_backend(s, self.reactor, {}, self.audit) for s in servers}
        for backend in self.backends.values():
            backend.startService()
        self.access = AccessControl.from_config(
            self.config, self.reactor, self.audit, fetch, store=store
        )
        self.registry = SessionRegistry(
            self.reactor, self.config.max_sessions, caps=self.access.caps, recorder=self.audit
        )
        self.app = BridgeApp(self.config, self.backends, self.registry, self.reactor, self.access)
        self.client = StubTreq(self.app.resource())
        test.addCleanup(self.close)

    def close(self) -> None:
        """End every session, so that no stream outlives its test."""
        self.registry.stopService()
        self.client.flush()
        self.audit.stop()


class Service(Harness):
    """A L{BridgeService} over fake children, started (its admin API, reloads,
    reaper), listening nowhere: requests come in through the client."""

    def __init__(
        self,
        test: SynchronousTestCase,
        config: BridgeConfig,
        environ: dict[str, str] | None = None,
        on_spawn: Callable[[FakeChild], None] | None = None,
        store: Any = None,
        reactor: FakeProcessReactor | None = None,
        telemetry: Any = None,
    ) -> None:
        self.test = test
        self.reactor = reactor or FakeProcessReactor()
        self.reactor.on_spawn = on_spawn
        self.config = attrs.evolve(config, listeners=())
        self.service = BridgeService(
            self.config, self.reactor, environ or {}, store=store, telemetry=telemetry
        )
        self.service.privilegedStartService()
        self.service.startService()
        self.client = StubTreq(self.service.resource)
        test.addCleanup(self.close)

    def close(self) -> None:
        """Stop the service, and give its children the time to end."""
        if self.service.running:
            self.service.stopService()
        self.client.flush()
        self.reactor.advance(10)


def send(bridge: Bridge, message: Message, headers: dict[str, str]) -> Deferred[Any]:
    """POST a message to server s; the Deferred fires with the response, maybe later."""
    treq: Any = bridge.client
    d: Deferred[Any] = treq.request(
        "POST", "http://127.0.0.1/servers/s/mcp", data=jsonrpc.dumps(message), headers=headers
    )
    treq.flush()
    return d


class Client:
    """A 2026-07-28 client of a bridge over fake children."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.test = bridge.test

    @property
    def child(self) -> FakeChild:
        return self.bridge.reactor.child

    def start(self, message: Message, accept: str = ACCEPT_BOTH, **extra: str) -> Deferred[Any]:
        """Send a request whose answer may come later; the Deferred fires with the response."""
        return send(self.bridge, message, headers(message, accept, **extra))

    def post(self, message: Message, accept: str = ACCEPT_BOTH, **extra: str) -> tuple[int, Any]:
        """Send a request answered at once: (status, JSON body)."""
        response = self.test.successResultOf(self.start(message, accept, **extra))
        return response.code, self.bridge.json(response)

    def finish(self, d: Deferred[Any]) -> tuple[int, Any]:
        """The status and JSON body of a request answered by now."""
        self.bridge.client.flush()
        response = self.test.successResultOf(d)
        self.test.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        return response.code, self.bridge.json(response)

    def held(self, method: str) -> Message:
        """The one request of this method the child holds."""
        [found] = [m for m in self.child.held if m["method"] == method]
        return found

    def calls(self) -> list[ModernCall]:
        calls: list[ModernCall] = []
        for hub in self.bridge.registry.sessions.values():
            if isinstance(hub.sink, StatelessSink):
                calls += hub.sink.calls
        return calls

    def hang_up(self) -> None:
        """The client closes every response of a call that is still open."""
        for c in self.calls():
            responder = c.responder
            assert isinstance(responder, HTTPResponder)
            responder.request.channel.transport.loseConnection()
        self.bridge.client.flush()
