# -*- test-case-name: tests.test_stateless -*-
"""Stateless (2026-07-28) requests carried onto session-era children.

A modern client sends every request on its own, with no session. The bridge
keeps the child's session itself: each principal gets one stateless I{hub}
per server (a L{ClientSession} whose sink is a L{StatelessSink}), and each
request becomes a L{ModernCall}, a downstream of its own that the router
serves like any session (ids rewritten, progress and cancellation mapped).

When the child asks the client something while serving a call (elicitation,
sampling, roots), the call answers the HTTP request with an C{input_required}
result and I{parks}: the child keeps waiting while the client gathers the
input, and the retry, which carries the answers and the signed
C{requestState}, resumes the very same call. A client that never retries
does not leave the child hanging: after C{input_timeout} the child's
questions are answered with an error and its request is cancelled.

C{subscriptions/listen} streams (L{Listen}) live in the hub too: they get
the child's list-changed and resource-updated notifications that their
filter asked for, tagged with their subscription id.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mcptwist.cluster.keys import STATE, ClusterKeys, b64, unb64
from mcptwist.mcp import era, jsonrpc, protocol
from mcptwist.mcp.era import LIST_CHANGED
from mcptwist.mcp.jsonrpc import Kind, Message, RequestId

if TYPE_CHECKING:
    from mcptwist.routing.record import Status
    from mcptwist.routing.sessions import ClientSession
    from mcptwist.routing.upstream import Pending, Upstream

log = Logger(namespace="mcptwist.stateless")

# The router checks capabilities before it asks a client: a call takes every
# question, and answers those its client did not declare itself.
EVERY_CAPABILITY: Final[dict[str, Any]] = {c: {} for c in protocol.CLIENT_CAPABILITY_FOR.values()}
# The id of a call's request inside its own downstream: each call is alone there.
CALL_ID: Final = 1
# How long to wait for more questions from the child before answering
# input_required: a child may ask several at once, written one after another.
INPUT_GATHER: Final = 0.05
STATE_TTL: Final = 3600.0
# Calls one hub keeps parked (waiting for a client's retry); the oldest gives way.
MAX_PARKED: Final = 64


class Responder(Protocol):
    """The HTTP side of one round of a call: where its messages go."""

    def notify(self, message: Message) -> None:
        """A notification that belongs to the request (progress, a log line)."""

    def answer(self, message: Message, status: int = 200) -> None:
        """The final message of this HTTP request; it ends the response."""


class StateSigner:
    """Signs and checks C{requestState}: the client may not forge or replay it.

    The state names a parked call and its round, and is bound to the
    principal, the server, the method and the request's parameters; it
    expires. Parked calls live in one process: without a cluster the key
    does too. In a cluster a state is C{NODE.BODY.MAC} under the cluster's
    keys, so that any node can tell a genuine state of another node (and
    forward its retry there) from a forged one.
    """

    def __init__(
        self, key: bytes | None = None, node: str | None = None, keys: ClusterKeys | None = None
    ) -> None:
        self._key = key or secrets.token_bytes(32)
        self.node = node
        self._keys = keys if node is not None else None

    def rekey(self, keys: ClusterKeys) -> None:
        """New cluster keys (a rotation)."""
        if self._keys is not None:
            self._keys = keys

    def sign(self, payload: str) -> str:
        body = b64(payload.encode())
        if self._keys is not None:
            named = f"{self.node}.{body}"
            return f"{named}.{b64(self._keys.mac(STATE, named.encode()))}"
        return f"{body}.{b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())}"

    def verify(self, token: object) -> str | None:
        """The payload of a state this node made, or None."""
        opened = self._open(token)
        return opened[1] if opened is not None and opened[0] == self.node else None

    def owner(self, token: object) -> str | None:
        """The node that made a genuine state (None: forged, or no cluster)."""
        opened = self._open(token) if self._keys is not None else None
        return opened[0] if opened is not None else None

    def _open(self, token: object) -> tuple[str | None, str] | None:
        """(node, payload) of a genuine state."""
        if not isinstance(token, str) or len(token) > 4096:
            return None
        keys = self._keys
        if keys is None:
            if token.count(".") != 1:
                return None
            body, mac = token.split(".")
            node = None
        else:
            if token.count(".") != 2:
                return None
            node, body, mac = token.split(".")
        try:
            payload = unb64(body).decode()
            given = unb64(mac)
        except (ValueError, UnicodeDecodeError):
            return None
        if keys is not None:
            if not keys.check(STATE, f"{node}.{body}".encode(), given):
                return None
        else:
            expected = hmac.new(self._key, payload.encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(given, expected):
                return None
        return node, payload


def request_digest(server: str, principal: str, message: Message) -> str:
    """What a retry must repeat of its original: server, principal, method, parameters."""
    params = message.get("params")
    salient = (
        {k: v for k, v in params.items() if k not in ("_meta", "inputResponses", "requestState")}
        if isinstance(params, dict)
        else {}
    )
    blob = jsonrpc.dumps([server, principal, message.get("method"), salient])
    return hashlib.sha256(blob).hexdigest()[:32]


class Dialect(Protocol):
    """How a call speaks to its child: the request it sends, and the answer
    it makes of the child's."""

    def request(self, call: ModernCall) -> Message: ...

    def answer(self, call: ModernCall, message: Message) -> Message: ...


class PassThrough:
    """A child that speaks 2026-07-28: the request goes as the client sent it,
    and the child's answer comes back as it is (its id restored)."""

    def request(self, call: ModernCall) -> Message:
        # Copied: the router rewrites its id and progress token in place.
        message = dict(call.request.message, id=CALL_ID)
        params = message.get("params")
        if isinstance(params, dict):
            meta = params.get("_meta")
            message["params"] = dict(params)
            if isinstance(meta, dict):
                message["params"]["_meta"] = dict(meta)
        return message

    def answer(self, call: ModernCall, message: Message) -> Message:
        message["id"] = call.request.id
        return message


class Translation:
    """A session-era child: the request is carried over in its terms, and the
    answer given the revision's shape."""

    def request(self, call: ModernCall) -> Message:
        if call.method == "server/discover":
            # Answered from the child's handshake, once it is ready.
            return jsonrpc.request(
                CALL_ID, "initialize", {"protocolVersion": protocol.LATEST_LEGACY}
            )
        message = era.for_child(call.request.message)
        message["id"] = CALL_ID
        return message

    def answer(self, call: ModernCall, message: Message) -> Message:
        error = message.get("error")
        if isinstance(error, dict):
            return jsonrpc.error(call.request.id, *modern_error(error, call.request))
        result = message.get("result")
        if call.method == "server/discover":
            return jsonrpc.result(call.request.id, era.discover(result or {}, call.server_info()))
        return jsonrpc.result(
            call.request.id, era.complete(call.method, result, call.server_info())
        )


PASS_THROUGH: Final = PassThrough()
TRANSLATION: Final = Translation()


class ModernCall:
    """One modern request, through all its rounds, as the router sees it."""

    stateless = True

    def __init__(
        self,
        hub: ClientSession,
        request: era.ModernRequest,
        responder: Responder,
        clock: IReactorTime,
        signer: StateSigner,
        input_timeout: float,
        peer: str | None = None,
    ) -> None:
        assert hub.upstream is not None
        self.hub = hub
        self.upstream: Upstream = hub.upstream
        self.request = request
        self.responder: Responder | None = responder
        self.clock = clock
        self.signer = signer
        self.input_timeout = input_timeout
        self.principal = hub.principal
        self.peer = peer
        self.method = request.method
        self.protocol_version: str | None = era.MODERN
        self.log_level = request.log_level
        self.client_info = request.client_info
        self.capabilities = EVERY_CAPABILITY
        self.declared = request.capabilities
        # What a retry's requestState must match; computed when first parked.
        self.digest: str | None = None
        self.park_id = self.id = secrets.token_urlsafe(12)
        self.round = 0
        self.started = self.first_started = clock.seconds()
        self.ended = False
        # How the router ended the call's request on the child.
        self._status: Status = "ok"
        self._counted = False
        # Questions of the child not yet answered: key -> (bridge id, method, params).
        self._asked: dict[str, tuple[int, str, Any]] = {}
        # Answers the client gave before they were asked (a first request's inputResponses).
        self._preanswered: dict[str, Any] = {}
        self._final: Message | None = None
        # Refused (a capability the client lacks): the child finishes, its answer is dropped.
        self._lingering = False
        self._child_done = False
        # That refusal, for a retry that arrives after it (the call was parked).
        self._refusal: Message | None = None
        self._gather: IDelayedCall | None = None
        self._expiry: IDelayedCall | None = None
        self._params = request.message.get("params")
        # How the call speaks to its child, chosen once: the child's revision or the session era.
        self._dialect: Dialect = PASS_THROUGH if self.upstream.modern else TRANSLATION
        # A listen stream on a child that speaks this revision: it lasts until the client leaves.
        self._listening = self.upstream.modern and self.method == "subscriptions/listen"
        # Told how the call ended, however it ended (a task follows its call so).
        self.on_end: Callable[[Status], None] | None = None
        # A task's call; or the first rounds of a call that becomes a task on
        # its retry (they ask the client that will own the task).
        self.in_task = False
        self.before_task = False

    @property
    def sink(self) -> StatelessSink:
        sink = self.hub.sink
        assert isinstance(sink, StatelessSink)
        return sink

    def start(self, preanswered: dict[str, Any] | None = None) -> None:
        """Send the request to the child."""
        self._preanswered = dict(preanswered or {})
        self.sink.calls.add(self)
        # In flight, parked included, until it ends; a listen stream is a
        # stream (capped as one), not a request.
        self._counted = self.method != "subscriptions/listen"
        if self._counted:
            self.hub.call_started()
        self.upstream.attach(self)
        self.upstream.handle(self, self._dialect.request(self), Kind.REQUEST)
        if self._listening:
            self.upstream.pause_timer(self, CALL_ID)  # it lasts until the client leaves

    def resume(
        self,
        responder: Responder,
        request: era.ModernRequest,
        answers: dict[str, Any],
        peer: str | None = None,
    ) -> None:
        """A retry: take the client's answers, then go on where the child waits."""
        self._cancel(self._expiry)
        self.sink.parked.pop(self.park_id, None)
        self.sink.calls.add(self)
        self.responder = responder
        self.request = request
        self.peer = peer
        self.declared = request.capabilities
        self.log_level = request.log_level
        self.upstream.attach(self)  # a more verbose level may reach the child
        meta = (request.message.get("params") or {}).get("_meta")
        token = meta.get("progressToken") if isinstance(meta, dict) else None
        self.upstream.retoken(self, CALL_ID, token)
        if self._refusal is not None:
            responder.answer(dict(self._refusal, id=request.id), 400)
            self.responder = None
            self._refusal = None
            if self._child_done:
                self._end("error", None, record=False)
            else:
                # The child finishes with the error it was given, within its timeout.
                self.upstream.resume_timer(self, CALL_ID)
            return
        for key in list(self._asked):
            if key in answers:
                bridge_id, _, _ = self._asked.pop(key)
                self.upstream.handle(self, jsonrpc.result(bridge_id, answers[key]), Kind.RESPONSE)
        if self._final is not None:
            self._respond(self._final)
        elif self._asked:
            # The client left some questions unanswered: ask them again.
            self._ask()
        else:
            self.upstream.resume_timer(self, CALL_ID)

    def abandon(self, why: str) -> None:
        """The client went away (its HTTP response closed): cancel on the child."""
        if self.ended:
            return
        self.responder = None
        self.upstream.handle(
            self,
            jsonrpc.notification("notifications/cancelled", {"requestId": CALL_ID, "reason": why}),
            Kind.NOTIFICATION,
        )
        self._end("cancelled", None)

    # Downstream

    def deliver(
        self, message: Message, related: RequestId | None, encoded: bytes | None = None
    ) -> None:
        if self.ended:
            return
        if self._listening:
            _restore_subscription(message, self.request.id)
        if "method" not in message:
            self._respond(message)
        elif "id" in message:
            self._question(message)
        elif message["method"] == "notifications/cancelled":
            # The child withdrew a question: it is no longer asked.
            withdrawn = (message.get("params") or {}).get("requestId")
            for key, (bridge_id, _, _) in list(self._asked.items()):
                if bridge_id == withdrawn:
                    del self._asked[key]
        elif self.responder is not None and (
            related == CALL_ID or message["method"] == "notifications/message"
        ):
            self.responder.notify(message)

    def cancelled(self, request_id: RequestId) -> None:
        self._end("cancelled", None)

    def request_started(self, request: Pending, message: Message) -> None:
        """The call is its own record (one per round)."""

    def request_ended(self, request: Pending, status: Status, error_code: int | None) -> None:
        self._status = status

    # The child's answer

    def _respond(self, message: Message) -> None:
        if self._lingering:
            if self._refusal is not None:
                # Parked: the retry still has to hear of the refusal.
                self._child_done = True
                self.upstream.detach(self)
            else:
                self._end("ok", None, record=False)
            return
        if self.responder is None:
            self._final = message  # parked: the retry gets it
            return
        error = message.get("error")
        answer = self._dialect.answer(self, message)
        status = 200
        if isinstance(error, dict) and answer["error"].get("code") == jsonrpc.METHOD_NOT_FOUND:
            status = 404
        self.responder.answer(answer, status)
        self.responder = None
        self._end(self._status, error)

    def server_info(self) -> dict[str, Any]:
        init = self.upstream.init_result or {}
        info = init.get("serverInfo")
        return info if isinstance(info, dict) else {"name": self.hub.server, "version": "unknown"}

    # The child's questions: multi round-trip requests

    def _question(self, message: Message) -> None:
        bridge_id = message["id"]
        method = message["method"]
        refusal: str | None = None
        capability = protocol.CLIENT_CAPABILITY_FOR.get(method)
        if self.method not in era.INPUT_METHODS:
            refusal = f"{self.method} cannot ask the client for input ({method})"
        elif capability is None:
            refusal = f"a {self.method} request cannot carry {method} to a client"
        if refusal is not None:
            self._answer_child(bridge_id, jsonrpc.METHOD_NOT_FOUND, refusal)
            return
        assert capability is not None
        if capability not in self.declared:
            # The revision's answer: the request needs a capability its client lacks.
            self._answer_child(
                bridge_id, jsonrpc.METHOD_NOT_FOUND, f"the client does not support {method}"
            )
            missing = jsonrpc.error(
                self.request.id,
                jsonrpc.MISSING_CAPABILITY,
                f"Missing required client capability: {capability} (the server asked for {method})",
                {"requiredCapabilities": {capability: {}}},
            )
            if self.responder is not None:
                self.responder.answer(missing, 400)
                self.responder = None
            else:
                # Parked: the retry gets the refusal; the child's other questions
                # are answered now, so that it finishes instead of waiting.
                self._refusal = missing
                for other, _, _ in self._asked.values():
                    self._answer_child(other, jsonrpc.UNANSWERABLE, "the request was refused")
                self._asked.clear()
            self._record("error", {"code": jsonrpc.MISSING_CAPABILITY})
            # The child goes on with an error in hand: its answer ends the call.
            self._lingering = True
            return
        if self._lingering:
            self._answer_child(
                bridge_id, jsonrpc.UNANSWERABLE, "the client's request was already answered"
            )
            return
        origin = self.upstream.question_origin(bridge_id)
        key = origin if isinstance(origin, str) and origin else f"{capability}-{bridge_id}"
        while key in self._asked:
            key += "'"
        if key in self._preanswered:
            self.upstream.handle(
                self, jsonrpc.result(bridge_id, self._preanswered.pop(key)), Kind.RESPONSE
            )
            return
        params = message.get("params")
        self._asked[key] = (bridge_id, method, params if isinstance(params, dict) else {})
        if self.responder is not None and self._gather is None:
            self._gather = self.clock.callLater(INPUT_GATHER, self._ask)

    def _ask(self) -> None:
        """Answer this round with input_required, and park until the retry."""
        self._gather = None
        if self.responder is None or self.ended or not self._asked:
            return
        self.round += 1
        if self.digest is None:
            self.digest = request_digest(self.hub.server, self.hub.principal, self.request.message)
        state = self.signer.sign(
            jsonrpc.dumps(
                {
                    "p": self.park_id,
                    "r": self.round,
                    "d": self.digest,
                    "x": int(self.clock.seconds() + STATE_TTL),
                }
            ).decode()
        )
        result = {
            "resultType": "input_required",
            "inputRequests": {
                key: {"method": method, "params": params}
                for key, (_, method, params) in self._asked.items()
            },
            "requestState": state,
            "_meta": {era.META_SERVER: self.server_info()},
        }
        self.responder.answer(jsonrpc.result(self.request.id, result))
        self.responder = None
        self._record("ok", None)
        self.sink.calls.discard(self)
        self.sink.park(self)
        self.upstream.pause_timer(self, CALL_ID)
        # However many rounds, the whole call stays within max_request_timeout.
        left = (
            self.first_started + self.hub.backend.server.max_request_timeout - self.clock.seconds()
        )
        self._expiry = self.clock.callLater(max(0.0, min(self.input_timeout, left)), self._expired)

    def matches(self, payload: dict[str, Any], digest: str, now: float) -> bool:
        """Whether a verified state names this call's current round."""
        return (
            payload.get("r") == self.round
            and payload.get("d") == digest == self.digest
            and isinstance(payload.get("x"), int)
            and payload["x"] >= now
        )

    def _expired(self) -> None:
        self._expiry = None
        text = f"the client did not answer within {self.input_timeout:g}s (input_timeout)"
        for bridge_id, _, _ in self._asked.values():
            self._answer_child(bridge_id, jsonrpc.UNANSWERABLE, text)
        self._asked.clear()
        log.info("call {call} on {server}: {text}", call=self.id, server=self.hub.server, text=text)
        self._end("timeout", None, record=False)

    def close_listen(self) -> None:
        """End a listen stream passed to the child gracefully (the bridge is stopping)."""
        if self.responder is not None:
            meta = {era.META_SUBSCRIPTION: self.request.id}
            self.responder.answer(
                jsonrpc.result(self.request.id, {"resultType": "complete", "_meta": meta})
            )
            self.responder = None
        self._end("ok", None)

    def _answer_child(self, bridge_id: int, code: int, text: str) -> None:
        self.upstream.handle(self, jsonrpc.error(bridge_id, code, text), Kind.RESPONSE)

    def _fail(self, code: int, text: str, data: Any = None, status: int = 200) -> None:
        if self.responder is not None:
            self.responder.answer(jsonrpc.error(self.request.id, code, text, data), status)
            self.responder = None
        self._end("error", {"code": code})

    def _end(self, status: Status, error: Any, record: bool = True) -> None:
        if self.ended:
            return
        self.ended = True
        if self._counted:
            self.hub.call_ended()
        self._cancel(self._gather)
        self._cancel(self._expiry)
        self.sink.calls.discard(self)
        self.sink.parked.pop(self.park_id, None)
        # Detaching cancels on the child whatever it still works on for this call.
        self.upstream.detach(self)
        self.sink.settled()
        if record:
            self._record(status, error)
        if self.on_end is not None:
            self.on_end(status)

    def _record(self, status: Status, error: Any) -> None:
        """One record per round (an input_required answer is a success)."""
        code = error.get("code") if isinstance(error, dict) else None
        self.hub.record_call(self.method, self._params, status, code, self.started, self.peer)
        self.started = self.clock.seconds()

    @staticmethod
    def _cancel(call: IDelayedCall | None) -> None:
        if call is not None and call.active():
            call.cancel()


def _restore_subscription(message: Message, request_id: RequestId) -> None:
    """A modern child's listen stream names the bridge's id: the client's, please."""
    container = message.get("params") if "method" in message else message.get("result")
    meta = container.get("_meta") if isinstance(container, dict) else None
    if isinstance(meta, dict) and era.META_SUBSCRIPTION in meta:
        meta[era.META_SUBSCRIPTION] = request_id


def modern_error(error: dict[str, Any], request: era.ModernRequest) -> tuple[int, str, Any]:
    """A child's (session-era) error as this revision defines it.

    Session-era codes that the revision gave another meaning to are mapped:
    a resource that does not exist is -32602 with its uri (it was -32002).
    """
    code = error.get("code")
    text = error.get("message")
    data = error.get("data")
    if not isinstance(code, int) or isinstance(code, bool):
        code = jsonrpc.INTERNAL_ERROR
    if not isinstance(text, str):
        text = "Error"
    if code == jsonrpc.RESOURCE_NOT_FOUND and request.method == "resources/read":
        params = request.message.get("params") or {}
        code = jsonrpc.INVALID_PARAMS
        data = {**(data if isinstance(data, dict) else {}), "uri": params.get("uri")}
    elif code in (jsonrpc.RESOURCE_NOT_FOUND, jsonrpc.URL_ELICITATION_REQUIRED):
        # RESOURCE_NOT_FOUND's number is also the bridge's MESSAGE_TOO_LARGE; a
        # URL elicitation is what this revision does by input_required.
        code = jsonrpc.INTERNAL_ERROR
    return code, text, data


class Listen:
    """One C{subscriptions/listen} stream: the notifications its filter asked for."""

    def __init__(
        self,
        request_id: RequestId,
        agreed: dict[str, Any],
        send: Callable[[Message], None],
        finish: Callable[[Message | None], None],
    ) -> None:
        self.request_id = request_id
        self.agreed = agreed
        self.send = send
        self.finish = finish
        self.uris = frozenset(agreed.get("resourceSubscriptions", ()))

    def wants(self, message: Message) -> bool:
        method = message.get("method")
        if method in LIST_CHANGED:
            return bool(self.agreed.get(LIST_CHANGED[method][0]))
        if method == "notifications/resources/updated":
            params = message.get("params")
            return isinstance(params, dict) and params.get("uri") in self.uris
        return False

    def tagged(self, message: Message) -> Message:
        params = message.get("params")
        params = dict(params) if isinstance(params, dict) else {}
        meta = params.get("_meta")
        params["_meta"] = {
            **(meta if isinstance(meta, dict) else {}),
            era.META_SUBSCRIPTION: self.request_id,
        }
        return {"jsonrpc": "2.0", "method": message["method"], "params": params}


class StatelessSink:
    """A stateless hub's sink: its calls, parked calls and listen streams."""

    def __init__(self) -> None:
        self.session: ClientSession | None = None
        self.calls: set[ModernCall] = set()
        self.parked: dict[str, ModernCall] = {}
        self.listens: set[Listen] = set()
        self._ids = itertools.count(1)
        self._on_idle: Callable[[], None] | None = None

    @property
    def connected(self) -> bool:
        return bool(self.calls or self.parked or self.listens)

    def when_idle(self, callback: Callable[[], None]) -> None:
        """Call C{callback} once nothing is in flight, waiting or listening (now if so)."""
        self._on_idle = callback
        self.settled()

    def settled(self) -> None:
        """Something ended: tell whoever waits for the hub to be idle."""
        if self._on_idle is not None and not self.connected:
            callback, self._on_idle = self._on_idle, None
            callback()

    def park(self, call: ModernCall) -> None:
        self.parked[call.park_id] = call
        while len(self.parked) > MAX_PARKED:
            oldest = next(iter(self.parked.values()))
            oldest._expired()

    def deliver(
        self, message: Message, related: RequestId | None, encoded: bytes | None = None
    ) -> None:
        if "method" not in message:
            # The child's answer to the hub's own resources/subscribe.
            error = message.get("error")
            if error is not None:
                log.warn("resources/subscribe for a listen stream failed: {error}", error=error)
            return
        if "id" in message:
            # A question with no call to ask it of: the child gets an error.
            assert self.session is not None and self.session.upstream is not None
            self.session.upstream.handle(
                self.session,
                jsonrpc.error(
                    message["id"],
                    jsonrpc.METHOD_NOT_FOUND,
                    f"{message['method']}: no request of a stateless client is waiting for it",
                ),
                Kind.RESPONSE,
            )
            return
        for listen in list(self.listens):
            if listen.wants(message):
                listen.send(listen.tagged(message))

    def cancelled(self, request_id: RequestId) -> None:
        pass

    def subscribe(self, uris: frozenset[str], add: bool) -> None:
        """Subscribe the hub (and so the child, once) to resources, or give them up."""
        if not uris:
            return
        assert self.session is not None and self.session.upstream is not None
        # Resources another stream still follows stay subscribed.
        still = set() if add else {u for listen in self.listens for u in listen.uris}
        for uri in sorted(uris - still):
            method = "resources/subscribe" if add else "resources/unsubscribe"
            self.session.upstream.handle(
                self.session,
                jsonrpc.request(f"listen-{next(self._ids)}", method, {"uri": uri}),
                Kind.REQUEST,
            )

    def close(self) -> None:
        for call in list(self.calls):
            if call.method == "subscriptions/listen":
                call.close_listen()
            else:
                call._fail(jsonrpc.SERVER_UNAVAILABLE, "the server is going away", status=503)
        for call in list(self.parked.values()):
            call._expired()
        for listen in list(self.listens):
            listen.finish(
                jsonrpc.result(
                    listen.request_id,
                    {"resultType": "complete", "_meta": {era.META_SUBSCRIPTION: listen.request_id}},
                )
            )
        self.listens.clear()
