# -*- test-case-name: tests.test_routing -*-
"""Route JSON-RPC between client sessions and a child: the multiplexer.

An L{Upstream} owns one child (through its L{Supervisor}) and any number of
client sessions. It initializes the child once and answers every client's
C{initialize} from the child's result; rewrites request ids so that clients
never collide; maps progress tokens and cancellations both ways; sends each
response, and each server-to-client request, to the client it belongs to;
and fans notifications out (list changes to all, resource updates to
subscribers, log messages by each client's level). Every request gets an
answer: the child's, a timeout, or an error when the child dies.

A server is served by a L{SharedBackend} (one upstream for every session) or
a L{SessionBackend} (one upstream, so one child, per session).
"""

from __future__ import annotations

import itertools
import re
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mcptwist import __version__
from mcptwist.child.process import Child
from mcptwist.child.supervisor import ChildState, Supervisor
from mcptwist.config.model import ServerConfig
from mcptwist.mcp import jsonrpc, protocol
from mcptwist.mcp.jsonrpc import Kind, Message, RequestId
from mcptwist.routing.catalog import STALE_AFTER, Catalog
from mcptwist.routing.record import Described, Recorder, Status
from mcptwist.routing.trace import CallTrace, QuestionTrace, Tracer

log = Logger(namespace="mcptwist.routing")

MAX_QUEUED: Final = 10_000
STDERR_IN_ERRORS: Final = 20
# Requests during which a child has no reason to ask its client anything.
CANNOT_ASK: Final = frozenset(
    {"resources/subscribe", "resources/unsubscribe", "logging/setLevel", "ping"}
)
# A client's stream of a child's changes (2026-07-28): a request that never ends.
LISTEN: Final = "subscriptions/listen"
# How long after a cancellation a child's request to a client may still be its.
ABANDONED_GRACE: Final = 5.0
BRIDGE_INFO: Final = {"name": protocol.BRIDGE_NAME, "version": __version__}
BRIDGE_CAPABILITIES: Final = {
    "sampling": {},
    "elicitation": {},
    "roots": {"listChanged": True},
}
# Telling which request an oversize response answered, from its first and last
# bytes: SDKs write either {"jsonrpc","id","result"|"error"} or, like the
# TypeScript SDK, {"result"|"error", ..., "jsonrpc","id"}.
_JSONRPC: Final = rb'(?:"jsonrpc"\s*:\s*"2\.0"\s*,\s*)?'
_RESPONSE_HEAD: Final = re.compile(
    rb"^\s*\{\s*" + _JSONRPC + rb'"id"\s*:\s*(-?\d+)\s*,\s*' + _JSONRPC + rb'"(?:result|error)"\s*:'
)
_RESULT_KEY: Final = re.compile(rb'"(?:result|error)"\s*:')
_METHOD_KEY: Final = re.compile(rb'"method"\s*:')
_ID_TAIL: Final = re.compile(rb',\s*"id"\s*:\s*(-?\d+)\s*\}\s*$')


def oversize_response_id(head: bytes, tail: bytes) -> int | None:
    """The integer id of the response an oversize line was, or None if it is not one.

    With the id first, the key after it says whether it is a response; with
    the id last, the line is a response when a result or error key comes
    before any method key (a request's params may hold a "result" key).
    """
    match = _RESPONSE_HEAD.search(head)
    if match is None:
        result = _RESULT_KEY.search(head)
        method = _METHOD_KEY.search(head)
        if result is not None and (method is None or result.start() < method.start()):
            match = _ID_TAIL.search(tail)
    return int(match.group(1)) if match is not None else None


class Downstream(Protocol):
    """A client session, as the router sees it."""

    id: str
    protocol_version: str | None
    capabilities: dict[str, Any]
    client_info: dict[str, Any]
    log_level: str | None

    @property
    def stateless(self) -> bool:
        """A stateless (2026-07-28) client: it gets log lines only when it asked
        for them, and holds no session-wide state (roots) in the child."""

    def deliver(
        self, message: Message, related: RequestId | None, encoded: bytes | None = None
    ) -> None:
        """Send a message to the client; C{related} is the request it belongs to.

        C{encoded}, when given, is the message already serialised (broadcasts).
        """

    def cancelled(self, request_id: RequestId) -> None:
        """The client cancelled this request: it will get no response."""

    def request_started(self, request: Pending, message: Message) -> None:
        """The router took one of this client's requests (C{message}, as the
        client sent it): it will end exactly once."""

    def request_ended(self, request: Pending, status: Status, error_code: int | None) -> None:
        """One of this client's requests ended, and how (before its answer, if
        it gets one, is delivered)."""


class CapacityError(Exception):
    """No child can be started for a new session (the server's limit is reached)."""


class PrincipalCapacityError(CapacityError):
    """This principal already holds its share of the server's children."""


class CredentialError(CapacityError):
    """A value this principal's child needs is missing: no child is started."""


@attrs.define(eq=False)
class Pending:
    """A request in flight, and the only record of it: a client's, from the
    moment the router takes it until it ends, or one of the bridge's own."""

    method: str
    started: float
    session: Downstream | None = None
    client_id: RequestId | None = None
    # The child's id of it, once forwarded (sent, or queued while the child
    # starts); 0 while the bridge holds it itself.
    child_id: int = 0
    progress_token: Any = None
    # Told of the answer (and how the request ended) before its client is.
    on_response: Callable[[Message, Status], None] | None = None
    timer: IDelayedCall | None = None
    sent_to: Child | None = None
    # The request as sent (a child of 2026-07-28 may need it again, with input).
    request: Message | None = None
    # What its client's records say it asked for (None: it is not recorded).
    described: Described | None = None
    # When it was written to the child (0: not yet).
    sent_at: float = 0.0
    # Answered with a tool's error (a tools/call result with isError).
    tool_error: bool = False
    # Its spans, while a tracer follows it.
    trace: CallTrace | None = None


@attrs.define
class _Silence:
    """What a child let time out since its last message.

    Requests that time out together (a burst of slow calls) are one round:
    a timeout starts a new round only for a request sent after the previous
    round's timeout. So N rounds mean the child said nothing while fresh
    requests waited request_timeout each, N times over.
    """

    timeouts: int = 0
    rounds: int = 0
    # When the last round's request timed out.
    last: float | None = None

    def timed_out(self, sent: float, now: float) -> bool:
        """Count a request (sent at C{sent}) that timed out; True if it made a new round."""
        self.timeouts += 1
        if self.last is not None and sent < self.last:
            return False
        self.rounds += 1
        self.last = now
        return True


@attrs.define(eq=False)
class _Outbound:
    """A server-to-client request, waiting for the client's response."""

    child: Child
    child_id: RequestId
    session: Downstream
    method: str
    trace: QuestionTrace | None = None


@attrs.define(eq=False)
class _Abandoned:
    """A request the bridge gave up on that the child may still be working on."""

    owner: Downstream | None
    child: Child
    expiry: IDelayedCall
    principal: str | None
    # The call of a task (whose questions only its principal's clients read).
    task: bool


class Upstream(Service):
    """One child and the sessions that share it."""

    # Whether the child speaks 2026-07-28 (a ModernUpstream).
    modern = False
    # Follows each client request in spans (None: not traced).
    tracer: Tracer | None = None

    def __init__(
        self,
        server: ServerConfig,
        reactor: Any,
        environ: Mapping[str, str],
        label: str | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self.server = server
        self.clock: IReactorTime = reactor
        self.supervisor = Supervisor(server, self, reactor, environ, label, recorder)
        self.sessions: set[Downstream] = set()
        self.init_result: dict[str, Any] | None = None
        self._child: Child | None = None
        self._ready = False
        self._ids = itertools.count(1)
        # Requests sent (or queued) to the child, by the child's id.
        self._pending: dict[int, Pending] = {}
        # Every client request in flight, by its client and the client's id.
        self._by_client: dict[tuple[Downstream, RequestId], Pending] = {}
        self._outbound: dict[int, _Outbound] = {}
        self._queue: deque[tuple[Pending | None, Message]] = deque()
        # initialize requests waiting for the child's handshake (their timers are their deadlines).
        self._waiting_init: list[tuple[Pending, Message]] = []
        self._subscriptions: dict[str, set[Downstream]] = {}
        # Subscriptions the child is being asked for, with the requests that wait on its answer.
        self._subscribing: dict[str, list[Pending]] = {}
        # Requests the bridge gave up on (timeout, cancellation, session gone) that the
        # child may still be working on: a server-to-client request may belong to them.
        # By the child's id.
        self._abandoned: dict[int, _Abandoned] = {}
        self._child_level: str | None = None
        self._ready_waiters: list[Deferred[None]] = []
        # The current child's silence while its requests time out.
        self._silence = _Silence()
        # What the child offers, for aggregating endpoints.
        self.catalog = Catalog(self)
        # The principal whose child this is (sharing = "principal"), if any.
        self.principal: str | None = None
        # A new configuration (new credentials) waits for the child's requests
        # in flight to end; requests meanwhile wait for the new child.
        self._renewing = False

    @property
    def label(self) -> str:
        return self.supervisor.label

    @property
    def state(self) -> ChildState:
        return self.supervisor.state

    # Service

    def startService(self) -> None:
        super().startService()
        self.supervisor.startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        d = self.supervisor.stopService()
        self._fail_all(f"MCP server '{self.label}' is shutting down")
        return d

    def renew(self, server: ServerConfig) -> None:
        """Restart the child with a new configuration (its principal's new
        credentials) once its clients' requests in flight have been answered;
        requests from now on wait for the new child. Sessions go on."""
        self.server = self.supervisor.server = server
        if not self._ready or self._child is None:
            # Not serving yet: the child about to answer would have the old settings.
            if self.supervisor.running:
                self.supervisor.restart()
            return
        self._renewing = True
        self._renew_when_drained()

    def _renew_when_drained(self) -> None:
        """Restart a renewing child once no client request waits on it (a
        client's listen stream does not count: it never ends by itself)."""
        if not self._renewing:
            return
        child = self._child
        for p in self._pending.values():
            if p.sent_to is child and p.session is not None and p.method != LISTEN:
                return
        self._renewing = False
        self._ready = False
        if self.supervisor.running:
            self.supervisor.restart()

    # Sessions

    def attach(self, session: Downstream) -> None:
        self.sessions.add(session)
        if session.log_level is not None:
            # A stateless call's own log level: the child must log at least that much.
            self._update_level()

    def detach(self, session: Downstream) -> None:
        """Forget a session: cancel its requests and release what it held."""
        self.sessions.discard(session)
        requests = [p for p in self._by_client.values() if p.session is session]
        for p in [p for p in self._pending.values() if p.session is session]:
            self._forget(p)
            if p.sent_to is not None:
                self._cancel_on_child(p, "client session closed")
        if self._queue:
            self._queue = deque(
                (p, m) for p, m in self._queue if p is None or p.session is not session
            )
        for out_id, out in list(self._outbound.items()):
            if out.session is session:
                del self._outbound[out_id]
                if out.trace is not None:
                    out.trace.answered(None)
                self._send(
                    out.child,
                    jsonrpc.error(out.child_id, jsonrpc.UNANSWERABLE, "client session closed"),
                )
        self._waiting_init = [w for w in self._waiting_init if w[0].session is not session]
        for uri, subscribers in list(self._subscriptions.items()):
            if session in subscribers:
                subscribers.discard(session)
                if not subscribers:
                    del self._subscriptions[uri]
                    self._unsubscribed(uri)
        for waiters in self._subscribing.values():
            waiters[:] = [w for w in waiters if w.session is not session]
        for abandoned in self._abandoned.values():
            if abandoned.owner is session:
                abandoned.owner = None
        if session.log_level is not None:
            # The most verbose client may have left: the child can be quieter.
            self._update_level()
        for p in requests:
            self._forget(p)
            if p.trace is not None:
                p.trace.ended(None, "cancelled")
            session.request_ended(p, "cancelled", None)

    def _unsubscribed(self, uri: str) -> None:
        """The last subscriber of a resource left: the child need not follow it."""
        self._internal("resources/unsubscribe", {"uri": uri})

    def _update_level(self) -> None:
        wanted = self._wanted_level()
        if wanted is not None and wanted != self._child_level and self._child_supports("logging"):
            self._child_level = wanted
            self._internal("logging/setLevel", {"level": wanted})

    def question_origin(self, bridge_id: int) -> RequestId | None:
        """The child's own id of a request it sent a client (the bridge renumbered it)."""
        out = self._outbound.get(bridge_id)
        return out.child_id if out is not None else None

    def pause_timer(self, session: Downstream, client_id: RequestId) -> None:
        """A request waits on its client (for input), not on the child: no timeout."""
        p = self._by_client.get((session, client_id))
        if p is not None and p.timer is not None:
            if p.timer.active():
                p.timer.cancel()
            p.timer = None

    def retoken(self, session: Downstream, client_id: RequestId, token: Any) -> None:
        """A retry's progress token (or none) replaces its first request's."""
        p = self._by_client.get((session, client_id))
        if p is not None and p.progress_token is not None:
            p.progress_token = token

    def resume_timer(self, session: Downstream, client_id: RequestId) -> None:
        """The client answered: the child has request_timeout again to finish."""
        p = self._by_client.get((session, client_id))
        if p is not None and p.timer is None:
            p.started = self.clock.seconds()
            p.timer = self.clock.callLater(self.server.request_timeout, self._timed_out, p)

    # Messages from a client

    def handle(self, session: Downstream, message: Message, kind: Kind) -> None:
        """Take one message from a client session (already parsed and classified)."""
        if kind is Kind.REQUEST:
            p = self._take(session, message)
            if p is None:
                return
            handler = self._client_requests.get(p.method)
            if handler is not None:
                getattr(self, handler)(p, message)
            else:
                self._forward(p, message)
        elif kind is Kind.NOTIFICATION:
            self._client_notification(session, message)
        else:
            self._client_response(session, message)

    def _take(self, session: Downstream, message: Message) -> Pending | None:
        """Put a client's request on the books, or refuse it (None) if a request
        of that client with that id is in flight already."""
        client_id = message["id"]
        key = (session, client_id)
        if key in self._by_client:
            session.deliver(
                jsonrpc.error(
                    client_id,
                    jsonrpc.INVALID_REQUEST,
                    f"Invalid Request: id {client_id!r} is already in use by a request in progress",
                ),
                client_id,
            )
            return None
        p = Pending(
            method=message["method"],
            started=self.clock.seconds(),
            session=session,
            client_id=client_id,
        )
        self._by_client[key] = p
        if self.tracer is not None:
            p.trace = self.tracer.request(
                self.server.name, session, message, self.server.trace_arguments
            )
        session.request_started(p, message)
        return p

    def _initialize(self, p: Pending, message: Message) -> None:
        if self._ready:
            self._answer_initialize(p, message)
        elif self.state in (ChildState.FAILED, ChildState.STOPPED):
            self._end(p, self._unavailable(message["id"]))
        else:
            p.timer = self.clock.callLater(self.server.request_timeout, self._init_timed_out, p)
            self._waiting_init.append((p, message))

    def _init_timed_out(self, p: Pending) -> None:
        p.timer = None
        self._waiting_init = [w for w in self._waiting_init if w[0] is not p]
        text = (
            f"MCP server '{self.label}' did not become ready within "
            f"{self.server.request_timeout:g}s ({self.state.value})"
        )
        self._end(p, jsonrpc.error(p.client_id, jsonrpc.REQUEST_TIMEOUT, text), "timeout")

    def _answer_initialize(self, p: Pending, message: Message) -> None:
        assert self.init_result is not None and p.session is not None
        session = p.session
        params = message.get("params") or {}
        version = protocol.negotiate(
            params.get("protocolVersion"), self.init_result.get("protocolVersion")
        )
        session.protocol_version = version
        caps = params.get("capabilities")
        session.capabilities = caps if isinstance(caps, dict) else {}
        info = params.get("clientInfo")
        session.client_info = info if isinstance(info, dict) else {}
        result: dict[str, Any] = {
            "protocolVersion": version,
            "capabilities": self.init_result.get("capabilities", {}),
            "serverInfo": self.init_result.get(
                "serverInfo", {"name": self.server.name, "version": "unknown"}
            ),
        }
        if "instructions" in self.init_result:
            result["instructions"] = self.init_result["instructions"]
        self._end(p, jsonrpc.result(message["id"], result))

    def _level_of(self, p: Pending, message: Message) -> str | None:
        """The level a logging/setLevel asks for; None (and the request refused) if invalid."""
        level = (message.get("params") or {}).get("level")
        if isinstance(level, str) and level in protocol.LOG_RANK:
            return level
        self._end(
            p,
            jsonrpc.error(
                message["id"],
                jsonrpc.INVALID_PARAMS,
                f"Invalid params: level must be one of {', '.join(protocol.LOG_LEVELS)}",
            ),
        )
        return None

    def _set_level(self, p: Pending, message: Message) -> None:
        assert p.session is not None
        params = message.get("params") or {}
        level = self._level_of(p, message)
        if level is None:
            return
        p.session.log_level = level
        wanted = self._wanted_level()
        if wanted == self._child_level and self._child_supports("logging"):
            self._end(p, jsonrpc.result(message["id"], {}))
            return
        self._child_level = wanted
        params["level"] = wanted
        self._forward(p, message)

    def _wanted_level(self) -> str | None:
        levels = [s.log_level for s in self.sessions if s.log_level is not None]
        return min(levels, key=protocol.LOG_RANK.__getitem__) if levels else None

    def _subscribe(self, p: Pending, message: Message) -> None:
        """The child is subscribed once per resource; later subscribers share it."""
        session = p.session
        assert session is not None
        uri = (message.get("params") or {}).get("uri")
        if not isinstance(uri, str):
            self._forward(p, message)
            return
        waiting = self._subscribing.get(uri)
        if waiting is not None:
            # The child is being asked already: answer with its answer.
            waiting.append(p)
            return
        subscribers = self._subscriptions.get(uri)
        if subscribers:
            subscribers.add(session)
            self._end(p, jsonrpc.result(message["id"], {}))
            return
        self._subscribing[uri] = []

        def settled(response: Message, status: Status) -> None:
            waiting = self._subscribing.pop(uri, [])
            if "error" not in response:
                self._subscriptions.setdefault(uri, set()).update(
                    [session, *(w.session for w in waiting if w.session is not None)]
                )
            for other in waiting:
                self._end(other, dict(response, id=other.client_id), status)

        if not self._forward(p, message, on_response=settled):
            self._subscribing.pop(uri, None)

    def _unsubscribe(self, p: Pending, message: Message) -> None:
        session = p.session
        assert session is not None
        uri = (message.get("params") or {}).get("uri")
        subscribers = self._subscriptions.get(uri) if isinstance(uri, str) else None
        if subscribers is not None:
            if session not in subscribers or len(subscribers) > 1:
                # Others still want updates: the child stays subscribed.
                subscribers.discard(session)
                self._end(p, jsonrpc.result(message["id"], {}))
                return
            del self._subscriptions[uri]  # type: ignore[arg-type]
        self._forward(p, message)

    # The requests the bridge handles itself, by the name of their handler.
    _client_requests: dict[str, str] = {
        "initialize": "_initialize",
        "logging/setLevel": "_set_level",
        "resources/subscribe": "_subscribe",
        "resources/unsubscribe": "_unsubscribe",
    }

    def _forward(
        self,
        p: Pending,
        message: Message,
        on_response: Callable[[Message, Status], None] | None = None,
    ) -> bool:
        """Send a client's request to the child; False if it was answered at once instead."""
        if self.state in (ChildState.FAILED, ChildState.STOPPED):
            self._end(p, self._unavailable(message["id"]))
            return False
        child_id = p.child_id = next(self._ids)
        p.on_response = on_response
        message["id"] = child_id
        params = message.get("params")
        if isinstance(params, dict):
            meta = params.get("_meta")
            if isinstance(meta, dict) and "progressToken" in meta:
                p.progress_token = meta["progressToken"]
                meta["progressToken"] = child_id
        self._pending[child_id] = p
        p.timer = self.clock.callLater(self.server.request_timeout, self._timed_out, p)
        self._send_or_queue(p, message)
        return True

    def _client_notification(self, session: Downstream, message: Message) -> None:
        method = message["method"]
        if method == "notifications/initialized":
            return
        if method == "notifications/cancelled":
            params = message.get("params") or {}
            request_id = params.get("requestId")
            p = (
                self._by_client.get((session, request_id))
                if isinstance(request_id, str | int)
                else None
            )
            if p is None or not p.child_id:
                # Unknown, or held by the bridge (it answers those itself).
                return
            self._forget(p)
            if p.sent_to is not None:
                self._cancel_on_child(p, params.get("reason") or "cancelled by the client")
            else:
                self._queue = deque((q, m) for q, m in self._queue if q is not p)
            assert p.client_id is not None
            if p.trace is not None:
                p.trace.ended(None, "cancelled")
            session.request_ended(p, "cancelled", None)
            session.cancelled(p.client_id)
            return
        self._send_or_queue(None, message)

    def _client_response(self, session: Downstream, message: Message) -> None:
        out = self._outbound.get(message["id"]) if isinstance(message["id"], int) else None
        if out is None or out.session is not session:
            log.debug("{server}: dropped a response to an unknown request", server=self.label)
            return
        del self._outbound[message["id"]]
        if out.trace is not None:
            out.trace.answered(message)
        message["id"] = out.child_id
        self._send(out.child, message)

    # Messages from the child

    def child_spawned(self, child: Child) -> None:
        self._handshake(
            child,
            "initialize",
            {
                "protocolVersion": protocol.LATEST_LEGACY,
                "capabilities": BRIDGE_CAPABILITIES,
                "clientInfo": BRIDGE_INFO,
            },
            self._handshake_done,
        )

    def _handshake(
        self,
        child: Child,
        method: str,
        params: dict[str, Any],
        done: Callable[[Child, Message], None],
    ) -> None:
        """Send a new child its first request; it must answer within startup_timeout."""
        self._child = child
        self._ready = False
        self._renewing = False
        self._silence = _Silence()
        child_id = next(self._ids)
        p = Pending(
            method=method,
            started=self.clock.seconds(),
            child_id=child_id,
            on_response=lambda response, _: done(child, response),
        )
        p.timer = self.clock.callLater(
            self.server.startup_timeout,
            self.supervisor.abandon,
            child,
            f"did not answer {method} within {self.server.startup_timeout:g}s (startup_timeout)",
        )
        self._pending[child_id] = p
        p.sent_to = child
        self._send(child, jsonrpc.request(child_id, method, params))

    def _handshake_done(self, child: Child, response: Message) -> None:
        result = response.get("result")
        if not isinstance(result, dict) or child is not self._child:
            error = response.get("error") or {}
            self.supervisor.abandon(child, f"refused initialize: {error.get('message', response)}")
            return
        self.init_result = result
        self._send(child, jsonrpc.notification("notifications/initialized"))
        self._ready = True
        self.supervisor.mark_ready(child)
        # Restore what the sessions had set up on a previous child.
        if self._child_level is not None and self._child_supports("logging"):
            self._internal("logging/setLevel", {"level": self._child_level})
        for uri in self._subscriptions:
            self._internal("resources/subscribe", {"uri": uri})
        self._became_ready()

    def when_ready(self) -> Deferred[None]:
        """Fires once the child has answered its handshake (at once if it has)."""
        d: Deferred[None] = Deferred()
        if self._ready:
            d.callback(None)
        else:
            self._ready_waiters = [w for w in self._ready_waiters if not w.called]
            self._ready_waiters.append(d)
        return d

    def _became_ready(self) -> None:
        """The child answered its handshake: send what waited for it."""
        self.catalog.reset()
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            if not d.called:
                d.callback(None)
        queued, self._queue = self._queue, deque()
        for p, message in queued:
            self._send_or_queue(p, message)
        waiting, self._waiting_init = self._waiting_init, []
        for p, message in waiting:
            self._answer_initialize(p, message)
        self.catalog.ready()

    def child_message(self, child: Child, message: Message) -> None:
        if self._silence.timeouts and child is self._child:
            if self.unresponsive:
                log.info(
                    "{server}: child (pid {pid}) speaks again after {count} timed-out requests",
                    server=self.label,
                    pid=child.pid,
                    count=self._silence.timeouts,
                )
            self._silence = _Silence()
        if "method" not in message:
            p = self._pending.get(message["id"]) if isinstance(message["id"], int) else None
            if p is None or p.sent_to is not child:
                late = self._abandoned.pop(message["id"], None)
                if late is not None and late.expiry.active():
                    late.expiry.cancel()
                log.debug("{server}: dropped a late or unknown response", server=self.label)
                return
            self._respond(p, message)
        elif "id" in message:
            self._child_request(child, message)
        else:
            self._child_notification(message)

    def _respond(self, p: Pending, message: Message, status: Status | None = None) -> None:
        """The answer to a request sent to the child: the child's own, or one the
        bridge gives in its place (C{status} says how it ended, if not as the
        answer has it)."""
        self._end(p, message, status)

    def _end(self, p: Pending, answer: Message, status: Status | None = None) -> None:
        """End a request with its answer: whoever waits on it is told, then its client.

        A request ends once: an answer to one that has already ended reaches
        its client, but does not end it again.
        """
        if status is None:
            status = "error" if "error" in answer else "ok"
        live = self._forget(p)
        if p.on_response is not None:
            p.on_response(answer, status)
        session = p.session
        if session is not None:
            assert p.client_id is not None
            answer["id"] = p.client_id
            if live:
                if p.method == "tools/call":
                    result = answer.get("result")
                    p.tool_error = isinstance(result, dict) and result.get("isError") is True
                if p.trace is not None:
                    p.trace.ended(answer, status)
                error = answer.get("error")
                session.request_ended(
                    p, status, error.get("code") if isinstance(error, dict) else None
                )
            session.deliver(answer, p.client_id)

    def _child_notification(self, message: Message) -> None:
        method = message["method"]
        params = message.get("params")
        if not isinstance(params, dict):
            params = {}
        if method == "notifications/progress":
            token = params.get("progressToken")
            p = self._pending.get(token) if isinstance(token, int) else None
            if p is None or p.session is None or p.progress_token is None:
                return
            params["progressToken"] = p.progress_token
            self._extend(p)
            p.session.deliver(message, p.client_id)
        elif method == "notifications/message":
            self._broadcast(message, self._log_recipients(params.get("level")))
        elif method == "notifications/resources/updated":
            uri = params.get("uri")
            subscribers = self._subscriptions.get(uri, ()) if isinstance(uri, str) else ()
            self._broadcast(message, list(subscribers))
        elif method == "notifications/cancelled":
            request_id = params.get("requestId")
            for out_id, out in list(self._outbound.items()):
                if out.child_id == request_id and out.child is self._child:
                    del self._outbound[out_id]
                    if out.trace is not None:
                        out.trace.answered(None)
                    params["requestId"] = out_id
                    out.session.deliver(message, None)
        elif method in STALE_AFTER:
            self.catalog.changed(method)
            self._broadcast(message, list(self.sessions))
        else:
            self._broadcast(message, list(self.sessions))

    # Whether a session-era client that set no level gets every log line (a
    # child of that era decides itself what to log).
    unset_level_logs = True

    def _log_recipients(self, level: Any) -> list[Downstream]:
        """The sessions a log line at this level is for: those at or below it,
        and those that set no level if the child decides for them. An unknown
        or malformed level is shown to all of them."""
        top = len(protocol.LOG_LEVELS)
        rank = protocol.LOG_RANK.get(level, top) if isinstance(level, str) else top
        unset = self.unset_level_logs
        return [
            s
            for s in self.sessions
            if (s.log_level is None and unset and not s.stateless)
            or (s.log_level is not None and rank >= protocol.LOG_RANK[s.log_level])
        ]

    def _broadcast(self, message: Message, sessions: list[Downstream]) -> None:
        """The same notification to several sessions, serialised once."""
        encoded = jsonrpc.dumps(message) if len(sessions) > 1 else None
        for session in sessions:
            session.deliver(message, None, encoded)

    def _child_request(self, child: Child, message: Message) -> None:
        method = message["method"]
        if method == "ping":
            self._send(child, jsonrpc.result(message["id"], {}))
            return
        target, related, problem = self._target_of(method)
        if target is None:
            log.warn(
                "{server}: refused the child's {method} request: {problem}",
                server=self.label,
                method=method,
                problem=problem,
            )
            self._send(child, jsonrpc.error(message["id"], jsonrpc.UNANSWERABLE, problem))
            return
        capability = protocol.CLIENT_CAPABILITY_FOR.get(method)
        if capability is not None and capability not in target.capabilities:
            self._send(
                child,
                jsonrpc.error(
                    message["id"],
                    jsonrpc.METHOD_NOT_FOUND,
                    f"the client does not support {method}",
                ),
            )
            return
        out_id = next(self._ids)
        out = self._outbound[out_id] = _Outbound(
            child=child, child_id=message["id"], session=target, method=method
        )
        if self.tracer is not None and related is not None:
            p = self._by_client.get((target, related))
            if p is not None and p.trace is not None:
                out.trace = p.trace.question(message)
        message["id"] = out_id
        target.deliver(message, related)

    def _target_of(self, method: str) -> tuple[Downstream | None, RequestId | None, str]:
        """Which client a server-to-client request is for, and during which request.

        It belongs to the client whose request the child is working on: one
        in flight, or one the bridge gave up on that the child may still be
        running. When that could be more than one client, the request is
        refused rather than risk asking the wrong person. Roots belong to
        each client, so a shared child may only ask for them when it serves
        a single client.
        """
        owners: dict[Downstream | None, list[Pending]] = {}
        # A request paused for its client's input (a stateless call between
        # rounds) is blocked in the child: a new question comes from another.
        running = [
            p
            for p in self._pending.values()
            if p.session is not None and p.sent_to and p.method not in CANNOT_ASK
        ]
        active = [p for p in running if p.timer is not None]
        for p in active or running:
            owners.setdefault(p.session, []).append(p)
        if active and any(
            downstream_principal(p.session) != downstream_principal(active[0].session)
            for p in running
        ):
            # A paused request is blocked in the child, but were it to ask, the
            # question must not reach another principal: nobody is asked.
            for p in running:
                if p.timer is None:
                    owners.setdefault(p.session, []).append(p)
        # A request the bridge gave up on may still ask (a child may ignore a
        # cancellation). Only among the requests of one authenticated principal
        # does a child told to cancel stop blurring the picture after a grace period.
        recent = self.clock.seconds() + self.server.request_timeout - ABANDONED_GRACE
        principals = {downstream_principal(o) for o in owners}
        # A task's questions wait in the task, read only by its principal, who may
        # read every task of theirs: among the tasks of one principal (and the first
        # rounds of calls that become tasks), a cancelled task's call hides nothing.
        tasks_of = (
            next(iter(principals))
            if len(principals) == 1 and all(downstream_task(o, before=True) for o in owners)
            else None
        )
        for abandoned in self._abandoned.values():
            principal = abandoned.principal
            if abandoned.task and principal is not None and principal == tasks_of:
                continue
            alone = principals == {principal} and principal not in (None, "anonymous")
            if not alone or abandoned.expiry.getTime() > recent:
                owners.setdefault(abandoned.owner, [])
        # Each session-era client, and each principal of stateless ones, has roots of its own.
        holders = {s if not s.stateless else downstream_principal(s) for s in self.sessions}
        if method == "roots/list" and len(holders) > 1:
            return (
                None,
                None,
                f"roots belong to each client and {len(holders)} clients share this child; "
                'use sharing = "session" for servers that ask for roots',
            )
        if len(owners) == 1:
            [(owner, requests)] = owners.items()
            if owner is None:
                return (
                    None,
                    None,
                    f"the request this {method} belongs to was abandoned by its client",
                )
            calls = [p for p in requests if p.method == "tools/call"] or requests
            related = max(calls, key=lambda p: p.started).client_id if calls else None
            return owner, related, ""
        if not owners and len(self.sessions) == 1:
            return next(iter(self.sessions)), None, ""
        if not owners:
            return (
                None,
                None,
                f"no single client to send {method} to ({len(self.sessions)} connected, none waiting)",
            )
        if all(owner is not None and owner.stateless for owner in owners):
            return (
                None,
                None,
                f"cannot tell which of {len(owners)} 2026-07-28 requests in flight this {method} "
                "is for; such requests that ask the client something must not overlap on one child",
            )
        return (
            None,
            None,
            f"cannot tell which of {len(owners)} clients with requests in flight this {method} is for; "
            'use sharing = "session" for servers that send requests to clients',
        )

    def child_oversize(self, child: Child, size: int, head: bytes, tail: bytes) -> None:
        child_id = oversize_response_id(head, tail)
        p = self._pending.get(child_id) if child_id is not None else None
        if p is not None and p.sent_to is child:
            self._respond(
                p,
                jsonrpc.error(
                    p.child_id,
                    jsonrpc.MESSAGE_TOO_LARGE,
                    f"The response of MCP server '{self.label}' was {size} bytes, more than its "
                    f"max_message_size of {self.server.max_message_size} bytes",
                ),
            )

    def child_lost(self, child: Child, why: str) -> None:
        """A child is gone, could not be spawned, or runs but is of no more use
        (the supervisor stops it): answer what waited on it.

        The one place where a child's end fails the requests sent to it."""
        stderr = self._stderr_for_clients()
        text = f"MCP server '{self.label}' {why}"
        if stderr:
            text += f"; last stderr: {stderr[-1]}"
        if child is self._child:
            self._ready = False
            self.catalog.reset(gone=True)
            for p in [p for p in self._pending.values() if p.sent_to is child]:
                self._fail(
                    p,
                    jsonrpc.SERVER_UNAVAILABLE,
                    text,
                    {"server": self.server.name, "exit": why, "stderr": stderr},
                )
            for out_id, out in list(self._outbound.items()):
                if out.child is child:
                    del self._outbound[out_id]
                    if out.trace is not None:
                        out.trace.answered(None)
            self._forget_abandoned(lambda owner, c: c is not child)
        if self.state in (ChildState.FAILED, ChildState.STOPPED):
            self._fail_all(text)

    # Plumbing

    def _send_or_queue(self, p: Pending | None, message: Message) -> None:
        if self._ready and not self._renewing and self._child is not None:
            if p is not None:
                p.sent_to = self._child
                p.sent_at = self.clock.seconds()
                if p.trace is not None:
                    p.trace.sent(message)
            if not self._send(self._child, message) and p is not None:
                self._fail(
                    p,
                    jsonrpc.SERVER_UNAVAILABLE,
                    f"MCP server '{self.label}' is not reading its stdin: more than "
                    f"{self.server.max_message_size} bytes (its max_message_size) sent to it "
                    "wait unread, so the request was refused",
                )
        elif self.state in (ChildState.FAILED, ChildState.STOPPED):
            if p is not None:
                self._fail(p, jsonrpc.SERVER_UNAVAILABLE, self._unavailable_text())
        elif len(self._queue) >= MAX_QUEUED:
            if p is not None:
                self._fail(
                    p,
                    jsonrpc.SERVER_UNAVAILABLE,
                    f"MCP server '{self.label}' is starting and its queue is full",
                )
        else:
            self._queue.append((p, message))

    def _send(self, child: Child, message: Message) -> bool:
        """Write to the child; False if refused (it leaves too much unread).

        At once while it works on nothing else (the latency of a lone call);
        while it is busy, what this turn of the reactor sends it goes in one
        write (fewer system calls and wake-ups of a child under load)."""
        return child.send(message, at_once=len(self._pending) <= 1)

    def _internal(self, method: str, params: dict[str, Any]) -> None:
        """A request of the bridge's own; its response only gets logged if it is an error."""
        if not self._ready or self._child is None:
            return
        child_id = next(self._ids)

        def check(response: Message, status: Status) -> None:
            if "error" in response:
                log.warn(
                    "{server}: {method} failed: {error}",
                    server=self.label,
                    method=method,
                    error=response["error"],
                )

        p = Pending(
            method=method, started=self.clock.seconds(), child_id=child_id, on_response=check
        )
        p.timer = self.clock.callLater(self.server.request_timeout, self._forget, p)
        self._pending[child_id] = p
        p.sent_to = self._child
        self._send(self._child, jsonrpc.request(child_id, method, params))

    def ask(self, method: str, params: dict[str, Any], answered: Callable[[Message], None]) -> None:
        """A request of the bridge's own to the running child; C{answered} gets
        its answer, or the error that ends it (timeout, the child's end)."""
        if not self._ready or self._child is None:
            answered(jsonrpc.error(0, jsonrpc.SERVER_UNAVAILABLE, self.unavailable_text()))
            return
        child_id = next(self._ids)
        p = Pending(
            method=method,
            started=self.clock.seconds(),
            child_id=child_id,
            on_response=lambda response, _: answered(response),
        )
        p.timer = self.clock.callLater(self.server.request_timeout, self._timed_out, p)
        self._pending[child_id] = p
        self._send_or_queue(p, self._own_request(child_id, method, params))

    def _own_request(self, child_id: int, method: str, params: dict[str, Any]) -> Message:
        """The bridge's own request, as this child is spoken to."""
        return jsonrpc.request(child_id, method, params)

    def catalog_used(self) -> None:
        """An endpoint reads the catalog: the child's list changes matter now."""

    def _timed_out(self, p: Pending) -> None:
        p.timer = None
        seconds = self.clock.seconds() - p.started
        self._fail(
            p,
            jsonrpc.REQUEST_TIMEOUT,
            f"Request timed out: MCP server '{self.label}' did not answer {p.method} within {seconds:g}s",
            status="timeout",
        )
        if p.sent_to is not None:
            self._cancel_on_child(p, "timed out")
            # Silence is judged by clients' requests, not the bridge's own.
            if (
                p.session is not None
                and p.sent_to is self._child
                and self._silence.timed_out(p.started, self.clock.seconds())
            ):
                self._check_silence(p.sent_to)
        else:
            self._queue = deque((q, m) for q, m in self._queue if q is not p)

    @property
    def unresponsive(self) -> bool:
        """The running child has said nothing through unresponsive_after rounds
        of timeouts (see L{_Silence})."""
        limit = self.server.unresponsive_after
        return limit > 0 and self._silence.rounds >= limit and self.state is ChildState.RUNNING

    def _check_silence(self, child: Child) -> None:
        """Another round of silence: is the child unresponsive now?"""
        limit = self.server.unresponsive_after
        if limit <= 0 or self._silence.rounds != limit:
            return
        why = (
            f"answered none of {limit} requests in a row (unresponsive_after), "
            "each sent after the last one timed out, and said nothing meanwhile"
        )
        if self.server.restart_unresponsive:
            self.supervisor.child_broken(child, why)
        else:
            log.warn(
                "{server}: child (pid {pid}) {why}; it is reported unresponsive until it "
                "speaks again (restart_unresponsive is off)",
                server=self.label,
                pid=child.pid,
                why=why,
            )

    def _extend(self, p: Pending) -> None:
        """Progress was made: push the request's deadline out, within the maximum."""
        if p.timer is None or not p.timer.active():
            return
        now = self.clock.seconds()
        deadline = min(
            now + self.server.request_timeout,
            p.started + self.server.max_request_timeout,
        )
        p.timer.reset(max(0.0, deadline - now))

    def _cancel_on_child(self, p: Pending, reason: str) -> None:
        """Tell the child to stop a request the bridge has given up on.

        The child may go on regardless, so the request is remembered (until
        its late answer or a request_timeout) for routing what it asks.
        """
        if p.sent_to is None:
            return
        self._send(
            p.sent_to,
            jsonrpc.notification(
                "notifications/cancelled",
                {"requestId": p.child_id, "reason": reason},
            ),
        )
        owner = p.session if p.session in self.sessions else None
        timer = self.clock.callLater(
            self.server.request_timeout, self._abandoned.pop, p.child_id, None
        )
        self._abandoned[p.child_id] = _Abandoned(
            owner, p.sent_to, timer, downstream_principal(p.session), downstream_task(p.session)
        )

    def _forget_abandoned(self, keep: Callable[[Downstream | None, Child], bool]) -> None:
        for child_id, abandoned in list(self._abandoned.items()):
            if not keep(abandoned.owner, abandoned.child):
                del self._abandoned[child_id]
                if abandoned.expiry.active():
                    abandoned.expiry.cancel()

    def _fail(
        self, p: Pending, code: int, text: str, data: Any = None, status: Status = "error"
    ) -> None:
        self._respond(p, jsonrpc.error(p.child_id, code, text, data), status)

    def _forget(self, p: Pending) -> bool:
        """Take a request off the books (its timer too); False if it was off already."""
        live = self._pending.pop(p.child_id, None) is p
        if p.session is not None:
            live = self._by_client.pop((p.session, p.client_id), None) is p  # type: ignore[arg-type]
        if p.timer is not None and p.timer.active():
            p.timer.cancel()
        p.timer = None
        if self._renewing and live and p.sent_to is not None:
            # Not from inside whatever ends the request: the restart stops the child.
            self.clock.callLater(0, self._renew_when_drained)
        return live

    def _fail_all(self, text: str) -> None:
        self._forget_abandoned(lambda owner, child: False)
        failed = list(self._pending.values())
        for p in failed:
            if p.session is not None:
                self._fail(p, jsonrpc.SERVER_UNAVAILABLE, text)
            else:
                self._forget(p)
        # A queued request is on both lists: it gets one answer.
        answered = set(failed)
        for queued, _ in self._queue:
            if queued is not None and queued not in answered:
                self._fail(queued, jsonrpc.SERVER_UNAVAILABLE, text)
        self._queue.clear()
        waiting, self._waiting_init = self._waiting_init, []
        for p, _ in waiting:
            self._end(p, jsonrpc.error(p.client_id, jsonrpc.SERVER_UNAVAILABLE, text))

    def _stderr_for_clients(self) -> list[str]:
        """The child's last stderr lines, for errors sent to clients (if allowed)."""
        if not self.server.stderr_in_errors:
            return []
        return list(self.supervisor.stderr)[-STDERR_IN_ERRORS:]

    def unavailable_text(self) -> str:
        """Why the server cannot serve now (its state, how its child ended)."""
        return self._unavailable_text()

    def _unavailable_text(self) -> str:
        why = self.supervisor.last_exit
        text = f"MCP server '{self.label}' is {self.state.value}"
        if why:
            text += f" (its child {why})"
        stderr = self._stderr_for_clients()
        if stderr:
            text += f"; last stderr: {stderr[-1]}"
        return text

    def _unavailable(self, id: RequestId) -> Message:
        return jsonrpc.error(
            id,
            jsonrpc.SERVER_UNAVAILABLE,
            self._unavailable_text(),
            {
                "server": self.server.name,
                "state": self.state.value,
                "stderr": self._stderr_for_clients(),
            },
        )

    def _child_supports(self, capability: str) -> bool:
        return bool(self.init_result) and capability in (self.init_result or {}).get(
            "capabilities", {}
        )

    @property
    def in_flight(self) -> int:
        return sum(1 for p in self._pending.values() if p.session is not None)

    @property
    def queued(self) -> int:
        """Messages waiting for the child to be ready."""
        return len(self._queue)

    def status(self) -> dict[str, Any]:
        info = self.init_result.get("serverInfo") if self.init_result else None
        return {
            **self.supervisor.status(),
            "sessions": len(self.sessions),
            "in_flight": self.in_flight,
            "server_info": info,
            "consecutive_timeouts": self._silence.timeouts,
            "unresponsive": self.unresponsive,
        }


def downstream_principal(session: object) -> str | None:
    """Who is behind a downstream (None when the downstream does not say)."""
    principal = getattr(session, "principal", None)
    return principal if isinstance(principal, str) else None


def downstream_task(session: object, before: bool = False) -> bool:
    """Whether a downstream is the call of a task (its C{in_task} says so),
    or, with C{before}, the first rounds of one (C{before_task})."""
    return getattr(session, "in_task", False) is True or (
        before and getattr(session, "before_task", False) is True
    )
