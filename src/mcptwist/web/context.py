# -*- test-case-name: tests.test_web -*-
"""What a transport may ask of the HTTP surface that serves it.

The transports (L{streamable<mcptwist.web.streamable>},
L{legacy_sse<mcptwist.web.legacy_sse>}, L{modern<mcptwist.web.modern>})
depend on this protocol alone, not on the app that implements it
(L{BridgeApp<mcptwist.web.app.BridgeApp>}), which dispatches to them.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from mcptwist.config.model import BridgeConfig
from mcptwist.mcp.jsonrpc import RequestId
from mcptwist.routing.backends import Backend
from mcptwist.routing.sessions import ClientSession, SessionRegistry, Sink
from mcptwist.routing.stateless import StateSigner
from mcptwist.routing.tasks import TaskStore
from mcptwist.routing.tools import ToolView
from mcptwist.routing.trace import Tracer

from .access import AccessControl
from .forward import Forwarder
from .http import HTTPProblem
from .sse import EventConnection, Heartbeat


class TransportContext(Protocol):
    """The servers, sessions, limits and streams a transport works with."""

    @property
    def config(self) -> BridgeConfig:
        """The bridge-wide settings in force (a reload replaces them)."""

    @property
    def registry(self) -> SessionRegistry: ...

    @property
    def clock(self) -> IReactorTime: ...

    @property
    def access(self) -> AccessControl: ...

    @property
    def signer(self) -> StateSigner:
        """Signs the requestState of stateless calls waiting for their client's input."""

    @property
    def tasks(self) -> TaskStore:
        """The tasks of 2026-07-28 clients (the tasks extension)."""

    @property
    def tracer(self) -> Tracer | None:
        """Follows each request in spans (None: not traced)."""

    @property
    def forwarder(self) -> Forwarder | None:
        """In a cluster: sends a retry to the node whose call waits for it."""

    def backend(self, name: str, draining: bool = False) -> Backend:
        """The server's backend (404 if there is none); with C{draining}, also
        one a reload retired, whose sessions go on."""

    def open_session(
        self,
        request: Request,
        backend: Backend,
        transport: str,
        sink_factory: Callable[[str], Sink],
        request_id: RequestId | None = None,
    ) -> ClientSession:
        """A new session for this request's principal, or the HTTP refusal."""

    def refusing_sessions(
        self, request: Request, server: str, request_id: RequestId | None
    ) -> AbstractContextManager[None]:
        """Turn a session that cannot be opened into its HTTP refusal, audited."""

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

    def find_session(
        self, request: Request, session_id: str | None, name: str
    ) -> ClientSession | None:
        """The open session with this id on this server, if this request's
        principal opened it (what it may see refreshed to its grants now)."""

    def refresh(
        self, request: Request, session: ClientSession, request_id: RequestId | None
    ) -> None:
        """Before a session's requests: a child per principal gets its
        credentials as this request presents them (or the HTTP refusal)."""

    def tool_view(self, request: Request, backend: Backend) -> ToolView | None:
        """What of a server's tools this request's principal may see and call."""

    @property
    def heartbeat(self) -> Heartbeat:
        """The timer of every stream, which also runs what is due soon."""

    def stream(self, request: Request, label: str) -> EventConnection:
        """Start an SSE response on this request (or refuse: too many streams)."""

    def count_stream(self, request: Request) -> Callable[[], None]:
        """Count a stream of this request's principal that is not an SSE
        response (a WebSocket's), or refuse: too many; what gives it back."""
