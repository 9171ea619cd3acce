# -*- test-case-name: tests.test_modern_child -*-
"""A child that speaks 2026-07-28: its requests pass through, session-era clients are translated.

A L{ModernUpstream} is an L{Upstream} whose child has no handshake. Its
I{handshake} is a C{server/discover}, whose answer stands in for an
C{initialize} result, so session-era clients are answered as usual.

Requests of stateless clients go to the child as they came, with their own
C{_meta}; their results, C{input_required} rounds and listen streams come
back as they are.

Requests of session-era clients get the revision's C{_meta}, built from the
session's C{initialize} and log level. When the child answers one with
C{input_required}, the bridge asks the session each question as a
server-to-client request, then retries the request with the answers and the
child's C{requestState}. The bridge keeps one C{subscriptions/listen} stream
open on the child for the list changes and resource updates that its
session-era clients subscribed to.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.logger import Logger

from mcptwist.child.process import Child
from mcptwist.mcp import era, jsonrpc, protocol
from mcptwist.mcp.era import LIST_CHANGED, agreed_filter
from mcptwist.mcp.jsonrpc import Message
from mcptwist.routing.record import Status
from mcptwist.routing.trace import QuestionTrace
from mcptwist.routing.upstream import (
    BRIDGE_CAPABILITIES,
    BRIDGE_INFO,
    Downstream,
    Pending,
    Upstream,
)

log = Logger(namespace="mcptwist.routing")


@attrs.define(eq=False)
class _Round:
    """A session-era client's request that the child answered with input_required."""

    pending: Pending
    state: Any
    # The bridge's ids of the questions still unanswered, and their keys.
    waiting: dict[int, str] = attrs.field(factory=dict)
    answers: dict[str, Any] = attrs.field(factory=dict)
    # The spans of its questions, by the bridge's ids, while traced.
    traces: dict[int, QuestionTrace] = attrs.field(factory=dict)


class ModernUpstream(Upstream):
    """One child that speaks 2026-07-28, and the sessions (of either era) it serves."""

    modern = True
    # The child logs only for requests that carried a level: only clients that
    # asked for one see its lines.
    unset_level_logs = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rounds: dict[int, _Round] = {}
        # The bridge's listen stream on the child, and what it asked for.
        self._listen_id: int | None = None
        self._listen_filter: dict[str, Any] = {}

    # The handshake: server/discover

    def child_spawned(self, child: Child) -> None:
        self._listen_id = None
        self._listen_filter = {}
        meta = self._envelope(BRIDGE_CAPABILITIES, BRIDGE_INFO, None)
        self._handshake(child, "server/discover", {"_meta": meta}, self._discovered)

    def _discovered(self, child: Child, response: Message) -> None:
        result = response.get("result")
        if not isinstance(result, dict) or child is not self._child:
            error = response.get("error") or {}
            self.supervisor.abandon(
                child, f"refused server/discover: {error.get('message', response)}"
            )
            return
        meta = result.get("_meta")
        info = meta.get(era.META_SERVER) if isinstance(meta, dict) else None
        capabilities = result.get("capabilities")
        self.init_result = {
            "protocolVersion": protocol.LATEST_LEGACY,
            "capabilities": capabilities if isinstance(capabilities, dict) else {},
            "serverInfo": info if isinstance(info, dict) else {"name": self.server.name},
        }
        if isinstance(result.get("instructions"), str):
            self.init_result["instructions"] = result["instructions"]
        self._ready = True
        self.supervisor.mark_ready(child)
        self._listen()
        self._became_ready()

    # Session-era clients: what the bridge answers itself

    _client_requests = {**Upstream._client_requests, "ping": "_ping"}

    def _ping(self, p: Pending, message: Message) -> None:
        """The revision has no ping: the bridge answers for a child that is up."""
        if self._ready:
            self._end(p, jsonrpc.result(message["id"], {}))
        else:
            self._end(p, self._unavailable(message["id"]))

    def _set_level(self, p: Pending, message: Message) -> None:
        """The level travels with each request: remember it for the session."""
        assert p.session is not None
        level = self._level_of(p, message)
        if level is None:
            return
        p.session.log_level = level
        self._end(p, jsonrpc.result(message["id"], {}))

    def _subscribe(self, p: Pending, message: Message) -> None:
        self._subscription(p, message, add=True)

    def _unsubscribe(self, p: Pending, message: Message) -> None:
        self._subscription(p, message, add=False)

    def _subscription(self, p: Pending, message: Message, add: bool) -> None:
        """Resource subscriptions become the bridge's listen stream on the child."""
        session = p.session
        assert session is not None
        uri = (message.get("params") or {}).get("uri")
        if not isinstance(uri, str):
            self._end(
                p, jsonrpc.error(message["id"], jsonrpc.INVALID_PARAMS, "Invalid params: uri")
            )
            return
        if add:
            self._subscriptions.setdefault(uri, set()).add(session)
        else:
            subscribers = self._subscriptions.get(uri)
            if subscribers is not None:
                subscribers.discard(session)
                if not subscribers:
                    del self._subscriptions[uri]
        self._end(p, jsonrpc.result(message["id"], {}))
        self._listen()  # reopened only if what it follows changed

    def _update_level(self) -> None:
        """Each request carries its own level: the child has none to set."""

    def attach(self, session: Downstream) -> None:
        super().attach(session)
        if not session.stateless and self._listen_id is None:
            self._listen()

    def detach(self, session: Downstream) -> None:
        super().detach(session)  # its rounds end with its requests (_forget)
        if not session.stateless:
            self._listen()

    def _unsubscribed(self, uri: str) -> None:
        """Subscriptions are the listen stream's business (detach reopens it)."""

    def _forget(self, p: Pending) -> bool:
        live = super()._forget(p)
        for out_id, round_ in list(self._rounds.items()):
            if round_.pending is p:
                # The call ended: its client's open questions are withdrawn.
                del self._rounds[out_id]
                question = round_.traces.pop(out_id, None)
                if question is not None:
                    question.answered(None)
                if p.session is not None and p.session in self.sessions:
                    p.session.deliver(
                        jsonrpc.notification(
                            "notifications/cancelled",
                            {"requestId": out_id, "reason": "the request ended"},
                        ),
                        None,
                    )
        return live

    # Session-era requests carried to the child

    def _forward(self, p: Pending, message: Message, on_response: Any = None) -> bool:
        session = p.session
        assert session is not None
        if session.stateless:
            return super()._forward(p, message, on_response)
        # The parsed message is the bridge's own: the envelope goes in place.
        params = message.get("params")
        if params is None:
            params = message["params"] = {}
        meta = params.get("_meta")
        if not isinstance(meta, dict):
            meta = params["_meta"] = {}
        meta.update(self._envelope(session.capabilities, session.client_info, session.log_level))
        forwarded = super()._forward(p, message, on_response)
        if forwarded:
            # Kept for the retry an input_required answer needs.
            p.request = message
        return forwarded

    @staticmethod
    def _envelope(
        capabilities: dict[str, Any], client_info: dict[str, Any], level: str | None
    ) -> dict[str, Any]:
        meta: dict[str, Any] = {
            era.META_VERSION: era.MODERN,
            era.META_CAPABILITIES: capabilities,
            era.META_CLIENT: client_info or BRIDGE_INFO,
        }
        if level is not None:
            meta[era.META_LOG_LEVEL] = level
        return meta

    def _respond(self, p: Pending, message: Message, status: Status | None = None) -> None:
        result = message.get("result")
        if (
            p.session is not None
            and not p.session.stateless
            and isinstance(result, dict)
            and result.get("resultType") == "input_required"
        ):
            self._ask(p, result)
            return
        super()._respond(p, message, status)

    def _ask(self, p: Pending, result: dict[str, Any]) -> None:
        """Ask a session-era client the child's questions, as requests of the server."""
        session = p.session
        assert session is not None and p.client_id is not None
        requests = result.get("inputRequests")
        requests = requests if isinstance(requests, dict) else {}
        round_ = _Round(p, result.get("requestState"))
        questions: list[Message] = []
        for key, request in requests.items():
            method = request.get("method") if isinstance(request, dict) else None
            capability = protocol.CLIENT_CAPABILITY_FOR.get(method)  # type: ignore[arg-type]
            if capability is None or capability not in session.capabilities:
                self._fail(
                    p,
                    jsonrpc.INTERNAL_ERROR,
                    f"MCP server '{self.label}' needs {method} from the client, "
                    "which this client did not declare",
                )
                return
            out_id = next(self._ids)
            round_.waiting[out_id] = key
            params = request.get("params")
            questions.append(
                jsonrpc.request(out_id, method, params if isinstance(params, dict) else None)  # type: ignore[arg-type]
            )
        if not questions:
            self._retry(round_)
            return
        for question in questions:
            self._rounds[question["id"]] = round_
            if p.trace is not None:
                round_.traces[question["id"]] = p.trace.question(question)
            session.deliver(question, p.client_id)

    def _client_response(self, session: Downstream, message: Message) -> None:
        round_ = self._rounds.get(message["id"]) if isinstance(message["id"], int) else None
        if round_ is None:
            super()._client_response(session, message)
            return
        p = round_.pending
        if p.session is not session:
            return  # not this client's question
        del self._rounds[message["id"]]
        key = round_.waiting.pop(message["id"])
        question = round_.traces.pop(message["id"], None)
        if question is not None:
            question.answered(message)
        if self._pending.get(p.child_id) is not p:
            return  # the request ended meanwhile (timeout, cancellation)
        if "error" in message:
            for out_id in round_.waiting:
                self._rounds.pop(out_id, None)
                question = round_.traces.pop(out_id, None)
                if question is not None:
                    question.answered(None)
            error = message["error"]
            self._fail(
                p,
                error.get("code", jsonrpc.INTERNAL_ERROR),
                f"the client could not answer {key}: {error.get('message', '')}",
            )
            return
        round_.answers[key] = message.get("result")
        if not round_.waiting:
            self._retry(round_)

    def _retry(self, round_: _Round) -> None:
        """Send the request again, with the answers and the child's state."""
        p = round_.pending
        original = p.request or {}
        params = dict(original.get("params") or {})
        params["inputResponses"] = round_.answers
        if round_.state is not None:
            params["requestState"] = round_.state
        del self._pending[p.child_id]
        p.child_id = next(self._ids)
        p.sent_to = None
        meta = params.get("_meta")
        if isinstance(meta, dict) and "progressToken" in meta:
            params["_meta"] = dict(meta, progressToken=p.child_id)
        self._pending[p.child_id] = p
        self._send_or_queue(p, {**original, "id": p.child_id, "params": params})

    # The child's notifications

    def _listen(self) -> None:
        """(Re)open the bridge's listen stream for what its session-era clients
        follow, when that changed."""
        if not self._ready or self._child is None:
            return
        wanted = self._wanted()
        if self._listen_id is not None and wanted == self._listen_filter:
            return
        if self._listen_id is not None:
            self._send(
                self._child,
                jsonrpc.notification("notifications/cancelled", {"requestId": self._listen_id}),
            )
            self._listen_id = None
        self._listen_filter = wanted
        if not wanted:
            return
        self._listen_id = next(self._ids)
        meta = self._envelope(BRIDGE_CAPABILITIES, BRIDGE_INFO, None)
        self._send(
            self._child,
            jsonrpc.request(
                self._listen_id, "subscriptions/listen", {"notifications": wanted, "_meta": meta}
            ),
        )

    def _own_request(self, child_id: int, method: str, params: dict[str, Any]) -> Message:
        meta = self._envelope(BRIDGE_CAPABILITIES, BRIDGE_INFO, None)
        return jsonrpc.request(child_id, method, {**params, "_meta": meta})

    def catalog_used(self) -> None:
        self._listen()

    def _wanted(self) -> dict[str, Any]:
        """What the bridge's listen stream asks for."""
        # Only session-era clients need it (stateless ones listen for themselves),
        # and the catalog once it is used (tools are reviewed as soon as the
        # child is ready, so pinning follows their changes).
        if all(s.stateless for s in self.sessions) and not self.catalog.used:
            return {}
        everything: dict[str, Any] = {field: True for field, _ in LIST_CHANGED.values()}
        if self._subscriptions:
            everything["resourceSubscriptions"] = sorted(self._subscriptions)
        return agreed_filter(everything, (self.init_result or {}).get("capabilities"))

    def _child_notification(self, message: Message) -> None:
        params = message.get("params")
        meta = params.get("_meta") if isinstance(params, dict) else None
        subscription = meta.get(era.META_SUBSCRIPTION) if isinstance(meta, dict) else None
        if subscription is not None and subscription == self._listen_id:
            # The bridge's own stream: its news goes to every session, as the session era has it.
            assert isinstance(params, dict) and isinstance(meta, dict)
            if message["method"] == "notifications/subscriptions/acknowledged":
                return
            del meta[era.META_SUBSCRIPTION]
            if not meta:
                del params["_meta"]
        elif subscription is not None:
            listen = self._pending.get(subscription) if isinstance(subscription, int) else None
            if listen is not None and listen.session is not None:
                # A stateless client's listen stream: its notifications go to it alone.
                assert isinstance(meta, dict)
                meta[era.META_SUBSCRIPTION] = listen.client_id
                listen.session.deliver(message, listen.client_id)
            # Otherwise a stream that has closed (the bridge's or a client's): nobody's.
            return
        super()._child_notification(message)
