# -*- test-case-name: tests.test_modern -*-
"""The stateless revision (2026-07-28) on C{/servers/NAME/mcp}.

Each POST carries one request that stands on its own. It is checked
(C{era.check}), then served by a L{ModernCall} on the principal's stateless
hub: its answer goes back as C{application/json}, or as an SSE stream once
the request has something to say before its answer (progress, log lines) and
the client accepts one. Closing the response cancels the request in the
child. C{subscriptions/listen} opens a stream of the child's change
notifications. GET and DELETE do not exist in this revision (405).
"""

from __future__ import annotations

from collections.abc import Callable
from fnmatch import fnmatchcase
from typing import Any, Final, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import NOT_DONE_YET, Request

from mcptwist.mcp import era, jsonrpc
from mcptwist.mcp.era import LIST_CHANGED, agreed_filter
from mcptwist.mcp.jsonrpc import Kind, Message
from mcptwist.routing.aggregate import CHANGED, Refused
from mcptwist.routing.backends import Backend
from mcptwist.routing.catalog import LISTS, Catalog
from mcptwist.routing.members import AggregateBackend
from mcptwist.routing.sessions import ClientSession
from mcptwist.routing.stateless import (
    Listen,
    ModernCall,
    Responder,
    StatelessSink,
    request_digest,
)
from mcptwist.routing.tasks import Task, TaskLimit, task_support

from .admission import peer_of, principal_id, principal_of
from .context import TransportContext
from .forward import HOP_HEADER, Forwarder
from .http import HTTPProblem, finish_with
from .remote_tasks import EVENT_ROOM, RemoteTasks
from .sse import EventConnection, message_event

log = Logger(namespace="mcptwist.web.modern")

ALLOW: Final = {b"allow": b"POST"}
# Bounds of a client's subscriptions/listen streams on one server.
MAX_LISTENS: Final = 32
MAX_LISTEN_URIS: Final = 256
MAX_LISTEN_TASKS: Final = 256


class Responding(Responder, Protocol):
    """A call's responder as L{serve} holds it: told when its client has gone."""

    gone: bool
    done: bool


class MessageStream(Protocol):
    """A stream of one request's messages that is not an SSE response (a
    WebSocket's frames): C{done} fires when it ends, whoever ended it."""

    done: Deferred[None]

    def send_message(self, message: Message) -> None: ...

    def finish(self) -> None: ...


Stream = EventConnection | MessageStream


class SocketRequest(Request):
    """A request that came as a message on a socket (L{websocket
    <mcptwist.web.websocket>}), not as a POST of its own.

    This module serves it as it would the POST: what it answers at once is
    its answer, and what it writes and finishes later is one message. It
    makes its own responder and streams, whose messages go back on the
    socket, and it is never forwarded to another node (the socket is held
    by this one).
    """

    # Why the client ended the request (a cancel, the socket closed), once it has.
    why: str | None = None

    def responder(self, label: str, rewrite: Callable[[Message], Message] | None) -> Responding:
        raise NotImplementedError

    def stream(self, label: str) -> MessageStream:
        raise NotImplementedError


class _ChildListen:
    """The responder of a child's own listen stream whose filter named the
    bridge's tasks: the child's acknowledgement is sent with the tasks the
    bridge follows (L{_acknowledge_tasks}), whose notifications then join
    the stream."""

    def __init__(
        self,
        inner: Responding,
        ctx: TransportContext,
        request: Request,
        listen: era.ModernRequest,
        stream: Callable[[], Stream | None],
    ) -> None:
        self.inner = inner
        self.ctx = ctx
        self.request = request
        self.listen: era.ModernRequest | None = listen
        self.stream = stream

    @property
    def gone(self) -> bool:
        return self.inner.gone

    @gone.setter
    def gone(self, value: bool) -> None:
        self.inner.gone = value

    @property
    def done(self) -> bool:
        return self.inner.done

    @done.setter
    def done(self, value: bool) -> None:
        self.inner.done = value

    def notify(self, message: Message) -> None:
        listen = self.listen
        if listen is not None and message.get("method") == ACKNOWLEDGED:
            self.listen = None
            connection = self.stream()
            if connection is not None:
                params = message.get("params")
                agreed = params.get("notifications") if isinstance(params, dict) else None
                agreed = agreed if isinstance(agreed, dict) else {}
                _acknowledge_tasks(self.ctx, self.request, connection, listen, agreed)
            return
        self.inner.notify(message)

    def answer(self, message: Message, status: int = 200) -> None:
        self.inner.answer(message, status)


ACKNOWLEDGED: Final = "notifications/subscriptions/acknowledged"


class HTTPResponder:
    """One HTTP request of a call: JSON, or SSE from its first notification."""

    def __init__(
        self,
        ctx: TransportContext,
        request: Request,
        json_ok: bool,
        sse_ok: bool,
        label: str,
        rewrite: Callable[[Message], Message] | None = None,
    ) -> None:
        self.rewrite = rewrite
        self.ctx = ctx
        self.request = request
        self.json_ok = json_ok
        self.sse_ok = sse_ok
        self.label = label
        self.connection: EventConnection | None = None
        self.gone = False
        self.done = False

    def notify(self, message: Message) -> None:
        connection = self.stream()
        if connection is not None:
            send(connection, message)

    def answer(self, message: Message, status: int = 200) -> None:
        if self.done:
            return
        self.done = True
        if self.rewrite is not None:
            message = self.rewrite(message)
        if self.gone:
            return
        if self.connection is None and not self.json_ok:
            self._stream()
        if self.connection is not None:
            send(self.connection, message)
            self.connection.finish()
            return
        request = self.request
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        finish_with(request, jsonrpc.dumps(message))

    def stream(self) -> EventConnection | None:
        """The response's SSE stream (opened now if it is not yet), or None:
        no stream to be had, or the client is gone."""
        if self.done or self.gone or not self.sse_ok:
            return None
        return self._stream()

    def _stream(self) -> EventConnection | None:
        if self.connection is None:
            try:
                self.connection = self.ctx.stream(self.request, self.label)
            except HTTPProblem:
                # No stream for this principal now: the answer comes as JSON.
                self.sse_ok = False
                return None
        return self.connection


def post(
    ctx: TransportContext,
    request: Request,
    name: str,
    messages: list[Message],
    kinds: list[Kind],
    batch: bool,
    json_ok: bool,
    sse_ok: bool,
) -> bytes | int:
    if batch:
        raise HTTPProblem(
            400, jsonrpc.INVALID_REQUEST, "Invalid Request: a batch is not allowed in 2026-07-28"
        )
    message, kind = messages[0], kinds[0]
    if kind is Kind.RESPONSE:
        raise HTTPProblem(
            400,
            jsonrpc.INVALID_REQUEST,
            "Invalid Request: a client sends no responses in 2026-07-28",
            message.get("id"),
        )
    if kind is Kind.NOTIFICATION:
        # The revision defines no client notifications over HTTP: closing a
        # response is how a request is cancelled.
        request.setResponseCode(202)
        return b""
    try:
        checked = era.check(message, lambda header: _headers(request, header))
    except era.Refusal as refusal:
        raise HTTPProblem(
            refusal.status, refusal.code, refusal.message, refusal.id, data=refusal.data
        ) from None
    if checked.method == "subscriptions/listen" and not sse_ok:
        raise HTTPProblem(
            406,
            jsonrpc.INVALID_REQUEST,
            "Not Acceptable: subscriptions/listen answers with a text/event-stream",
            checked.id,
        )
    return handle(ctx, request, name, checked, json_ok, sse_ok)


def handle(
    ctx: TransportContext,
    request: Request,
    name: str,
    checked: era.ModernRequest,
    json_ok: bool,
    sse_ok: bool,
) -> bytes | int:
    """Serve a checked request: a task request, a request to an endpoint, or
    one to a server (over HTTP, or on a socket: a L{SocketRequest})."""
    if checked.method == "subscriptions/listen" and ctx.tasks.enabled:
        _check_task_filter(checked)
    backend = ctx.backend(name)
    if checked.method == "subscriptions/listen" and _hopped(ctx, request):
        return _hopped_listen(ctx, request, name, checked)
    if ctx.tasks.enabled and checked.method in era.ANY_TASK_METHOD:
        return _task_request(ctx, request, checked)
    if isinstance(backend, AggregateBackend):
        return endpoint_post(ctx, request, backend, checked, json_ok, sse_ok)
    return serve(ctx, request, name, checked, json_ok, sse_ok)


def _task_request(
    ctx: TransportContext, request: Request, checked: era.ModernRequest
) -> bytes | int:
    """C{tasks/get}, C{tasks/update} or C{tasks/cancel}: answered by the bridge,
    for the principal's own tasks only (another's are unknown to it)."""
    method = checked.method
    if method in era.REMOVED_TASK_METHODS:
        raise HTTPProblem(
            404,
            jsonrpc.METHOD_NOT_FOUND,
            f"Method not found: {method} does not exist in the tasks extension "
            "(tasks/get inlines a task's result)",
            checked.id,
        )
    if not era.declares_tasks(checked.capabilities):
        raise HTTPProblem(
            400,
            jsonrpc.MISSING_CAPABILITY,
            f"Missing required client capability: {method} needs the {era.TASKS_EXTENSION} extension",
            checked.id,
            data=_TASKS_REQUIRED,
        )
    params = checked.message.get("params") or {}
    task_id = params.get("taskId")
    if not isinstance(task_id, str):
        raise HTTPProblem(
            400, jsonrpc.INVALID_PARAMS, "Invalid params: taskId must be a string", checked.id
        )
    unknown = HTTPProblem(
        200,
        jsonrpc.INVALID_PARAMS,
        f"Invalid params: no task {task_id!r} (unknown, or expired)",
        checked.id,
    )
    forwarder = ctx.forwarder
    owner, dot, _ = task_id.partition(".")
    if forwarder is not None and dot and owner != forwarder.node:
        # A task lives on the node that accepted it: the request goes there, once.
        return _forward(ctx, forwarder, request, owner, unknown, "a task request")
    tasks = ctx.tasks
    task = tasks.find(principal_id(request), task_id)
    if task is None:
        return unknown.render(request)
    if method == "tasks/get":
        return _json(request, jsonrpc.result(checked.id, tasks.detailed(task)))
    if method == "tasks/cancel":
        tasks.cancel(task)
    else:
        answers = params.get("inputResponses")
        if not (isinstance(answers, dict) and all(isinstance(v, dict) for v in answers.values())):
            raise HTTPProblem(
                400,
                jsonrpc.INVALID_PARAMS,
                "Invalid params: inputResponses must map each input request's key to its result object",
                checked.id,
            )
        tasks.update(task, answers)
    return _json(request, jsonrpc.result(checked.id, {"resultType": "complete"}))


# The error data of a request that needs the tasks extension.
_TASKS_REQUIRED: Final[dict[str, Any]] = {
    "requiredCapabilities": {"extensions": {era.TASKS_EXTENSION: {}}}
}


def _check_task_filter(checked: era.ModernRequest) -> None:
    """A listen filter's C{taskIds}: only from a client that declared the tasks
    extension, and bounded."""
    wanted = (checked.message.get("params") or {}).get("notifications")
    if not isinstance(wanted, dict) or "taskIds" not in wanted:
        return
    if not era.declares_tasks(checked.capabilities):
        raise HTTPProblem(
            400,
            jsonrpc.MISSING_CAPABILITY,
            f"Missing required client capability: task notifications need the "
            f"{era.TASKS_EXTENSION} extension",
            checked.id,
            data=_TASKS_REQUIRED,
        )
    ids = wanted["taskIds"]
    if not isinstance(ids, list) or len(ids) > MAX_LISTEN_TASKS:
        raise HTTPProblem(
            400,
            jsonrpc.INVALID_PARAMS,
            f"Invalid params: taskIds must be a list of at most {MAX_LISTEN_TASKS} task ids",
            checked.id,
        )


def _listened_tasks(
    ctx: TransportContext, request: Request, checked: era.ModernRequest
) -> list[Task]:
    """The tasks a listen stream follows: those of its C{taskIds} that are the
    principal's and live on this node (another's, or an unknown id, is not agreed)."""
    if not ctx.tasks.enabled:
        return []
    principal = principal_id(request)
    found = (ctx.tasks.find(principal, task_id) for task_id in _asked_tasks(checked))
    return [task for task in found if task is not None]


def _follow_tasks(
    ctx: TransportContext,
    connection: Stream,
    checked: era.ModernRequest,
    tasks: list[Task],
) -> None:
    """Send each task's state on the stream (C{notifications/tasks}, the task as
    C{tasks/get} shows it): now, then at each change of its status, until the
    task ends or the stream closes."""
    store = ctx.tasks

    def tell(task: Task) -> None:
        shown = store.detailed(task)
        del shown["resultType"]
        shown["_meta"] = {era.META_SUBSCRIPTION: checked.id}
        send(connection, jsonrpc.notification("notifications/tasks", shown))

    for task in tasks:
        tell(task)
        store.watch(task, tell)

    def ended(_: object) -> None:
        for task in tasks:
            store.unwatch(task.id, tell)

    connection.done.addBoth(ended)


def _without_task_ids(checked: era.ModernRequest) -> era.ModernRequest:
    """A listen request as a child sees it: without the bridge's task ids."""
    params = checked.message.get("params")
    wanted = params.get("notifications") if isinstance(params, dict) else None
    if not isinstance(wanted, dict) or "taskIds" not in wanted:
        return checked
    assert isinstance(params, dict)
    narrowed = {k: v for k, v in wanted.items() if k != "taskIds"}
    message = {**checked.message, "params": {**params, "notifications": narrowed}}
    return attrs.evolve(checked, message=message)


def _acknowledge_tasks(
    ctx: TransportContext,
    request: Request,
    connection: Stream,
    checked: era.ModernRequest,
    agreed: dict[str, Any],
    hopped: bool = False,
) -> None:
    """Acknowledge a listen stream (C{agreed}: its filter as agreed, without
    tasks), then follow the tasks its filter names. Those held here are
    agreed at once; in a cluster, those held on other nodes are followed
    there over a hop (not from a stream that came over one, C{hopped}, nor
    from a socket's, whose requests this node serves alone), and agreed as
    those nodes acknowledge them (L{RemoteTasks})."""
    tasks = _listened_tasks(ctx, request, checked)
    remote = {} if hopped else _remote_tasks(ctx, checked)

    def acknowledgement(elsewhere: list[str]) -> Message:
        found = {task.id for task in tasks}.union(elsewhere)
        ids = [task_id for task_id in _asked_tasks(checked) if task_id in found]
        return jsonrpc.notification(
            "notifications/subscriptions/acknowledged",
            {
                "_meta": {era.META_SUBSCRIPTION: checked.id},
                "notifications": {**agreed, "taskIds": ids} if ids else agreed,
            },
        )

    forwarder = ctx.forwarder
    if remote and forwarder is not None and isinstance(connection, EventConnection):
        max_event = ctx.tasks.config.max_result_size + EVENT_ROOM
        RemoteTasks(connection, ctx.clock, acknowledgement).start(
            forwarder, request, peer_of(request), checked.message, remote, max_event
        )
    else:
        send(connection, acknowledgement([]))
    _follow_tasks(ctx, connection, checked, tasks)


def _remote_tasks(ctx: TransportContext, checked: era.ModernRequest) -> dict[str, list[str]]:
    """The task ids of a listen's filter that name another node of the cluster, by node."""
    forwarder = ctx.forwarder
    if forwarder is None or not ctx.tasks.enabled:
        return {}
    remote: dict[str, list[str]] = {}
    for task_id in _asked_tasks(checked):
        node, dot, _ = task_id.partition(".")
        if dot and node != forwarder.node:
            remote.setdefault(node, []).append(task_id)
    return remote


def _asked_tasks(checked: era.ModernRequest) -> list[str]:
    """The task ids a listen's filter names, each once, in its order."""
    wanted = (checked.message.get("params") or {}).get("notifications")
    ids = wanted.get("taskIds") if isinstance(wanted, dict) else None
    return (
        list(dict.fromkeys(i for i in ids if isinstance(i, str))) if isinstance(ids, list) else []
    )


def _hopped_listen(
    ctx: TransportContext, request: Request, name: str, checked: era.ModernRequest
) -> int:
    """A listen another node opened here for its client (over a genuine hop):
    the tasks of its filter held here, and nothing else (it is never
    forwarded again)."""
    try:
        connection = ctx.stream(request, f"{name} listen (hop)")
    except HTTPProblem as problem:
        problem.id = checked.id
        raise
    _acknowledge_tasks(ctx, request, connection, checked, {}, hopped=True)
    return NOT_DONE_YET


def _hopped(ctx: TransportContext, request: Request) -> bool:
    """Whether a request came from another node of the cluster over a genuine hop."""
    forwarder = ctx.forwarder
    if forwarder is None or not request.requestHeaders.hasHeader(HOP_HEADER):
        return False
    return forwarder.hopped_from(request, _body(request)) is not None


def _body(request: Request) -> bytes:
    content = request.content
    assert content is not None
    content.seek(0)
    body: bytes = content.read()
    return body


def _advertise_tasks(message: Message) -> Message:
    """A C{server/discover} answer that names the tasks extension the bridge serves."""
    result = message.get("result")
    if isinstance(result, dict):
        capabilities = result.get("capabilities")
        capabilities = dict(capabilities) if isinstance(capabilities, dict) else {}
        extensions = capabilities.get("extensions")
        extensions = dict(extensions) if isinstance(extensions, dict) else {}
        extensions[era.TASKS_EXTENSION] = {}
        capabilities["extensions"] = extensions
        result["capabilities"] = capabilities
    return message


def _new_task(
    ctx: TransportContext, request: Request, name: str, checked: era.ModernRequest
) -> Task:
    """A new task of the request's principal, or 429 when the store is full."""
    try:
        return ctx.tasks.create(principal_id(request), name)
    except TaskLimit as limit:
        raise ctx.refused(
            request, name, "tasks", 429, f"Too Many Requests: {limit}", 5, checked.id
        ) from None


def _as_task(
    ctx: TransportContext,
    request: Request,
    name: str,
    checked: era.ModernRequest,
    hub: ClientSession,
    translated: bool,
) -> bytes:
    """Run a C{tools/call} as a task: answered at once with the task, while the
    call goes on in the child with the task as its only responder."""
    ctx.access.admit_requests(request, hub, 1, checked.id)
    task = _new_task(ctx, request, name, checked)
    # The child runs the call itself: it is not asked to make a task of it.
    message = era.without_tasks(checked.message)
    running = attrs.evolve(checked, message=message)
    call = ModernCall(
        hub,
        running,
        _NO_RESPONDER,
        ctx.clock,
        ctx.signer,
        hub.backend.server.input_timeout,
        peer_of(request),
    )
    call.responder = ctx.tasks.run(task, call)
    params = checked.message.get("params") or {}
    answers = params.get("inputResponses")
    call.start(answers if translated else None)
    return _json(request, jsonrpc.result(checked.id, ctx.tasks.created(task)))


def _after_input(hub: ClientSession, tool: str) -> bool:
    """Whether a tool asks its client first and runs as a task from the retry on."""
    return any(fnmatchcase(tool, glob) for glob in hub.backend.server.task_after_input)


def _retry_as_task(
    ctx: TransportContext,
    request: Request,
    name: str,
    checked: era.ModernRequest,
    call: ModernCall,
    answers: dict[str, Any],
) -> bytes:
    """The retry of a parked call that answers its questions: the call goes on
    as a task, and the retry is answered at once with the task (without the
    requestState of the rounds before: a task is followed by its id)."""
    task = _new_task(ctx, request, name, checked)
    running = attrs.evolve(checked, message=era.without_tasks(checked.message))
    call.resume(ctx.tasks.run(task, call), running, answers, peer_of(request))
    return _json(request, jsonrpc.result(checked.id, ctx.tasks.created(task)))


def serve(
    ctx: TransportContext,
    request: Request,
    name: str,
    checked: era.ModernRequest,
    json_ok: bool,
    sse_ok: bool,
    rewrite: Callable[[Message], Message] | None = None,
    tools_known: bool = False,
) -> bytes | int:
    """Serve a checked request on a server: on the principal's hub, as a call
    (C{rewrite} changes its answer: an endpoint's names). With tasks on, a
    C{tools/call} waits for the child's tools to be known (C{tools_known}
    once they are, or cannot be), which say whether it runs as a task."""
    params = checked.message.get("params") or {}
    principal = principal_id(request)
    answers = params.get("inputResponses")
    if answers is not None and not (
        isinstance(answers, dict) and all(isinstance(v, dict) for v in answers.values())
    ):
        raise HTTPProblem(
            400,
            jsonrpc.INVALID_PARAMS,
            "Invalid params: inputResponses must map each input request's key to its result object",
            checked.id,
        )
    state = params.get("requestState")
    forwarder = ctx.forwarder
    if state is not None and forwarder is not None:
        owner = ctx.signer.owner(state)
        if owner is not None and owner != forwarder.node:
            return _forward(ctx, forwarder, request, owner, _invalid_state(checked), "a retry")
    hub = open_hub(ctx, request, name, checked)
    assert hub.upstream is not None
    # A hub serves every request of its principal id: what each may see is
    # taken from the credentials it presents.
    view = ctx.tool_view(request, hub.backend)
    if view is not None:
        if checked.method == "tools/call":
            refusal = view.refusal(checked.message, hub.upstream.catalog.lists_tool)
            if refusal is not None:
                hub.refuse(checked.message, refusal, peer_of(request))
                return _json(request, refusal)
        elif checked.method not in ("tools/list", "server/discover"):
            refusal = view.blocked_refusal(checked.message)
            if refusal is not None:
                hub.refuse(checked.message, refusal, peer_of(request))
                return _json(request, refusal)
        if checked.method == "tools/list":
            inner = rewrite
            rewrite = view.listed if inner is None else (lambda m: view.listed(inner(m)))
    # A child that speaks this revision gets its requests as they are: its own
    # input_required, requestState and listen streams included.
    translated = not hub.upstream.modern
    # A tool that asks first (task_after_input): its first rounds, then the
    # retry that answers them, which runs on as a task.
    asks_first = task_on_retry = False
    if ctx.tasks.enabled:
        if checked.method == "server/discover":
            shown = rewrite
            rewrite = _advertise_tasks if shown is None else (lambda m: _advertise_tasks(shown(m)))
        elif checked.method == "tools/call" and params.get("requestState") is None:
            catalog = hub.upstream.catalog
            tools = catalog.cached("tools/list")
            tool = str(params.get("name"))
            declared = era.declares_tasks(checked.capabilities)
            globs = hub.backend.server.task_tools
            # Only a client that can take a task waits for the child's tools
            # (once): the others' calls go to the child at once, as before.
            if (
                tools is None
                and declared
                and not tools_known
                and task_support(None, tool, globs) == "forbidden"
            ):
                return _after_tools(ctx, request, name, checked, json_ok, sse_ok, rewrite, catalog)
            support = task_support(catalog.tool(tool), tool, globs)
            if support == "required" and not declared:
                return _json(
                    request,
                    jsonrpc.error(
                        checked.id,
                        jsonrpc.MISSING_CAPABILITY,
                        f"Missing required client capability: tool {params.get('name')!r} "
                        f"runs only as a task ({era.TASKS_EXTENSION})",
                        _TASKS_REQUIRED,
                    ),
                    400,
                )
            asks_first = support != "forbidden" and declared and _after_input(hub, tool)
            if support != "forbidden" and declared and not asks_first:
                return _as_task(ctx, request, name, checked, hub, translated)
        elif checked.method == "tools/call" and translated:
            task_on_retry = era.declares_tasks(checked.capabilities) and _after_input(
                hub, str(params.get("name"))
            )
    if checked.method == "subscriptions/listen" and translated:
        return _listen(ctx, request, name, checked, hub)
    listen: era.ModernRequest | None = None
    if checked.method == "subscriptions/listen" and ctx.tasks.enabled and _asked_tasks(checked):
        # The child's own stream, with the bridge's tasks merged in: the
        # child knows nothing of them, so their ids are not its to see.
        listen = checked
        checked = _without_task_ids(checked)
    state = params.get("requestState") if translated else None
    if state is not None:
        call = _parked_call(ctx, name, principal, checked, state)
        hub = call.hub
        if task_on_retry:
            return _retry_as_task(ctx, request, name, checked, call, answers or {})
    elif checked.method != "subscriptions/listen":
        ctx.access.admit_requests(request, hub, 1, checked.id)
    # A server set to json_response answers JSON to clients that take it
    # (a listen stream is a stream or nothing).
    prefer_json = (
        json_ok and hub.backend.server.json_response and checked.method != "subscriptions/listen"
    )
    responder: Responding = (
        request.responder(f"{name} socket", rewrite)
        if isinstance(request, SocketRequest)
        else HTTPResponder(
            ctx, request, json_ok, sse_ok and not prefer_json, f"{name} POST", rewrite
        )
    )
    if listen is not None:
        responder = _child_listen(ctx, request, name, responder, listen)
    peer = peer_of(request)
    if state is not None:
        call.resume(responder, checked, answers or {}, peer)
    else:
        call = ModernCall(
            hub,
            checked,
            responder,
            ctx.clock,
            ctx.signer,
            hub.backend.server.input_timeout,
            peer,
        )
        call.before_task = asks_first
        call.start(answers if translated else None)

    def vanished(_: object) -> None:
        responder.gone = True
        if not responder.done and call.responder is responder:
            why = request.why if isinstance(request, SocketRequest) else None
            call.abandon(why or "the client closed the HTTP response")

    if not responder.done:
        request.notifyFinish().addErrback(vanished)
    return NOT_DONE_YET


def _child_listen(
    ctx: TransportContext,
    request: Request,
    name: str,
    responder: Responding,
    listen: era.ModernRequest,
) -> Responding:
    """A child's listen stream that also follows the bridge's tasks."""
    if isinstance(responder, HTTPResponder):
        return _ChildListen(responder, ctx, request, listen, responder.stream)

    def frames() -> Stream | None:
        try:
            return _stream(ctx, request, f"{name} listen")
        except HTTPProblem:
            return None

    return _ChildListen(responder, ctx, request, listen, frames)


def _stream(ctx: TransportContext, request: Request, label: str) -> Stream:
    """The stream of a listen: an SSE response, or a socket's frames."""
    if isinstance(request, SocketRequest):
        return request.stream(label)
    return ctx.stream(request, label)


def _after_tools(
    ctx: TransportContext,
    request: Request,
    name: str,
    checked: era.ModernRequest,
    json_ok: bool,
    sse_ok: bool,
    rewrite: Callable[[Message], Message] | None,
    catalog: Catalog,
) -> int:
    """Serve a C{tools/call} once the child's tools are known (or cannot be:
    then it runs as the child answers it, never as a task)."""

    def go(_: object) -> None:
        if request.finished or request.channel is None:
            return
        try:
            body = serve(ctx, request, name, checked, json_ok, sse_ok, rewrite, tools_known=True)
        except HTTPProblem as problem:
            body = problem.render(request)
        if body is not NOT_DONE_YET:
            assert isinstance(body, bytes)
            finish_with(request, body)

    catalog.get("tools/list").addBoth(go).addErrback(
        lambda f: log.failure("a tools/call waiting for the tools list", f)
    )
    return NOT_DONE_YET


def endpoint_post(
    ctx: TransportContext,
    request: Request,
    backend: AggregateBackend,
    checked: era.ModernRequest,
    json_ok: bool,
    sse_ok: bool,
) -> bytes | int:
    """A request to an endpoint: answered from its members' catalogs, or
    renamed and served by the member it names."""
    aggregate = backend.aggregate
    guard = ctx.access.guard(principal_of(request), peer_of(request))
    method = checked.method
    if method == "server/discover":
        result = era.discover(aggregate.initialize_result(None), aggregate.server_info())
        discovered = jsonrpc.result(checked.id, result)
        return _json(request, _advertise_tasks(discovered) if ctx.tasks.enabled else discovered)
    if method in LISTS or method == "subscriptions/listen":
        catalogs = aggregate.catalogs(
            guard, lambda server: member_catalog(ctx, request, server, checked)
        )
        if method == "subscriptions/listen":
            if aggregate.namer.bare and catalogs:
                # The lone member's stream, as it is.
                return serve(ctx, request, aggregate.members[0], checked, json_ok, sse_ok)
            return _endpoint_listen(ctx, request, backend, checked, catalogs)
        cursor = (checked.message.get("params") or {}).get("cursor")

        def answer(page: dict[str, Any]) -> Message:
            return jsonrpc.result(checked.id, era.complete(method, page, aggregate.server_info()))

        def refusal(error: Refused) -> Message:
            return jsonrpc.error(checked.id, error.code, error.text)

        try:
            page = aggregate.list_page(method, catalogs, guard, cursor, ctx.clock)
        except Refused as error:
            return _json(request, refusal(error))
        if not isinstance(page, Deferred):
            return _json(request, answer(page))

        def write(message: Message) -> None:
            if request.finished or request.channel is None:
                return
            request.setHeader(b"content-type", b"application/json")
            finish_with(request, jsonrpc.dumps(message))

        def failed(reason: Failure) -> None:
            reason.trap(Refused)
            assert isinstance(reason.value, Refused)
            write(refusal(reason.value))

        page.addCallbacks(lambda result: write(answer(result)), failed).addErrback(
            lambda f: log.failure("endpoint list", f)
        )
        return NOT_DONE_YET
    try:
        route = aggregate.route(
            checked.message, guard, lambda server: member_catalog(ctx, request, server, checked)
        )
    except Refused as refused:
        if method == "tools/call":
            shown = (checked.message.get("params") or {}).get("name")
            aggregate.tool_refused(shown, principal_id(request), refused.text)
        status = refused.status or (404 if refused.code == jsonrpc.METHOD_NOT_FOUND else 200)
        return _json(
            request, jsonrpc.error(checked.id, refused.code, refused.text, refused.data), status
        )
    routed = attrs.evolve(checked, message=route.message)
    server = route.server
    rewrite = None
    if method == "resources/read":
        rewrite = lambda m: aggregate.shown_result(server, method, m)  # noqa: E731
    return serve(ctx, request, server, routed, json_ok, sse_ok, rewrite)


def _json(request: Request, message: Message, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return jsonrpc.dumps(message)


def member_catalog(
    ctx: TransportContext, request: Request, server: str, checked: era.ModernRequest
) -> Catalog | None:
    """The catalog of the child that serves this principal's requests to a
    member (None: no session can be opened for it there now)."""
    try:
        hub = open_hub(ctx, request, server, checked)
    except HTTPProblem:
        return None
    return hub.upstream.catalog if hub.upstream is not None else None


def _endpoint_listen(
    ctx: TransportContext,
    request: Request,
    backend: AggregateBackend,
    checked: era.ModernRequest,
    catalogs: list[tuple[str, Catalog | None]],
) -> int:
    """C{subscriptions/listen} on an endpoint of several servers: the list
    changes of every server, and updates of the resources asked for, each
    followed on the server whose URI it is (one whose child speaks the
    session era and declared resource subscriptions)."""
    aggregate = backend.aggregate
    params = checked.message.get("params") or {}
    wanted = params.get("notifications")
    wanted = wanted if isinstance(wanted, dict) else {}
    fields = {LIST_CHANGED[n][0]: n for n in LIST_CHANGED}
    agreed: dict[str, Any] = {field: True for field in fields if wanted.get(field) is True}
    uris = wanted.get("resourceSubscriptions")
    if isinstance(uris, list) and len(uris) > MAX_LISTEN_URIS:
        raise HTTPProblem(
            400,
            jsonrpc.INVALID_PARAMS,
            f"Invalid params: at most {MAX_LISTEN_URIS} resourceSubscriptions per stream",
            checked.id,
        )
    # Each server's resources asked for: (the URI shown, its own).
    followed: dict[str, list[tuple[str, str]]] = {}
    visible = {server for server, catalog in catalogs if catalog is not None}
    for uri in uris if isinstance(uris, list) else []:
        found = aggregate.namer.resolve_uri(uri)
        if found is not None and found[0] in visible:
            followed.setdefault(found[0], []).append((uri, found[1]))
    hubs: list[tuple[str, ClientSession]] = []
    for server in followed:
        hub = open_hub(ctx, request, server, checked)
        if _follows_resources(hub):
            hubs.append((server, hub))
    shown_uris = [shown for server, _ in hubs for shown, _ in followed[server]]
    if shown_uris:
        agreed["resourceSubscriptions"] = shown_uris
    try:
        connection = _stream(ctx, request, f"{backend.server.name} listen")
    except HTTPProblem as problem:
        problem.id = checked.id
        raise
    _acknowledge_tasks(ctx, request, connection, checked, agreed)

    def changed(method: str) -> None:
        field = LIST_CHANGED[CHANGED[method]][0]
        if field in agreed:
            send(
                connection,
                jsonrpc.notification(fields[field], {"_meta": {era.META_SUBSCRIPTION: checked.id}}),
            )

    watched = [c for _, c in catalogs if c is not None]
    for catalog in watched:
        catalog.watchers.append(changed)
        if not catalog.used:
            # The child's list changes matter from now on.
            catalog.get("tools/list").addErrback(lambda _: None)
    listens: list[tuple[ClientSession, Listen]] = []

    def forward(server: str) -> Callable[[Message], None]:
        return lambda m: send(connection, aggregate.shown_notification(server, m))

    for server, hub in hubs:
        listen = Listen(
            checked.id,
            {"resourceSubscriptions": [own for _, own in followed[server]]},
            forward(server),
            lambda m: _finish(connection, m),
        )
        sink = hub.sink
        assert isinstance(sink, StatelessSink)
        sink.listens.add(listen)
        sink.subscribe(listen.uris, add=True)
        listens.append((hub, listen))

    def ended(_: object) -> None:
        for catalog in watched:
            if changed in catalog.watchers:
                catalog.watchers.remove(changed)
        for hub, listen in listens:
            sink = hub.sink
            assert isinstance(sink, StatelessSink)
            if listen in sink.listens:
                sink.listens.discard(listen)
                if not hub.closed:
                    sink.subscribe(listen.uris, add=False)
                sink.settled()
            hub.last_active = ctx.clock.seconds()

    connection.done.addBoth(ended)
    return NOT_DONE_YET


def _follows_resources(hub: ClientSession) -> bool:
    """Whether a hub's child can be followed for resource updates here: a
    session-era child (the hub subscribes it) that declared subscriptions."""
    upstream = hub.upstream
    if upstream is None or upstream.modern:
        return False
    capabilities = (upstream.init_result or {}).get("capabilities")
    resources = capabilities.get("resources") if isinstance(capabilities, dict) else None
    return isinstance(resources, dict) and bool(resources.get("subscribe"))


def _headers(request: IRequest, name: str) -> list[str]:
    values = request.requestHeaders.getRawHeaders(name.encode()) or []
    return [v.decode("latin-1") if isinstance(v, bytes) else str(v) for v in values]


def open_hub(
    ctx: TransportContext, request: Request, name: str, checked: era.ModernRequest
) -> ClientSession:
    """The principal's stateless hub on this server (opened on first use), or
    the HTTP refusal when no session can be opened for it."""
    backend: Backend = ctx.backend(name)
    claims = principal_of(request).claims
    with ctx.refusing_sessions(request, name, checked.id):
        hub = ctx.registry.hub(
            backend, lambda _: StatelessSink(), principal_id(request), peer_of(request), claims
        )
        if hub.claims is not claims and hub.upstream is not None:
            # An open hub: its child gets the credentials this request presents.
            hub.claims = claims
            backend.refresh(hub, hub.upstream)
    sink = hub.sink
    assert isinstance(sink, StatelessSink)
    if sink.session is None:  # a new hub
        sink.session = hub
    return hub


def _invalid_state(checked: era.ModernRequest) -> HTTPProblem:
    """The answer to a retry whose requestState names no call waiting for it
    (what a client gets, too, when the node that held the call is gone)."""
    return HTTPProblem(
        400,
        jsonrpc.INVALID_PARAMS,
        "Invalid params: requestState is not valid for this request "
        "(altered, expired, already used, or for another request); send the request again without it",
        checked.id,
    )


def _forward(
    ctx: TransportContext,
    forwarder: Forwarder,
    request: Request,
    owner: str,
    lost: HTTPProblem,
    what: str,
) -> int:
    """A request for what another node holds (a parked call, a task):
    forwarded there, once; C{lost} when that node is gone."""
    if isinstance(request, SocketRequest):
        # A socket's messages are served by the node that holds it.
        raise lost
    body = _body(request)
    if forwarder.hopped_from(request, body) is not None:
        # Forwarded here already: what this node does not hold is lost.
        raise lost
    forwarder.forward(request, body, peer_of(request), owner, lost).addErrback(
        lambda f: log.failure("forwarding {what} to node {owner}", f, what=what, owner=owner)
    )
    return NOT_DONE_YET


def _parked_call(
    ctx: TransportContext, name: str, principal: str, checked: era.ModernRequest, state: object
) -> ModernCall:
    """The call a retry's requestState names, if the state is genuine and current."""
    invalid = _invalid_state(checked)
    payload_text = ctx.signer.verify(state)
    if payload_text is None:
        raise invalid
    try:
        payload = jsonrpc.loads(payload_text)
    except jsonrpc.ProtocolError:
        raise invalid from None
    if not isinstance(payload, dict):
        raise invalid
    digest = request_digest(name, principal, checked.message)
    now = ctx.clock.seconds()
    for hub in ctx.registry.hubs(name, principal):
        sink = hub.sink
        assert isinstance(sink, StatelessSink)
        call = sink.parked.get(payload.get("p"))  # type: ignore[arg-type]
        if call is not None and call.matches(payload, digest, now):
            hub.last_active = now
            return call
    raise invalid


def _listen(
    ctx: TransportContext,
    request: Request,
    name: str,
    checked: era.ModernRequest,
    hub: ClientSession,
) -> int:
    """C{subscriptions/listen} for a session-era child: acknowledge (once the
    child is ready: the agreed filter depends on what it declared), then
    stream the child's notifications that the filter asked for."""
    sink = hub.sink
    assert isinstance(sink, StatelessSink) and hub.upstream is not None
    params = checked.message.get("params") or {}
    wanted = params.get("notifications")
    wanted = wanted if isinstance(wanted, dict) else {}
    uris = wanted.get("resourceSubscriptions")
    if isinstance(uris, list) and len(uris) > MAX_LISTEN_URIS:
        raise HTTPProblem(
            400,
            jsonrpc.INVALID_PARAMS,
            f"Invalid params: at most {MAX_LISTEN_URIS} resourceSubscriptions per stream",
            checked.id,
        )
    if len(sink.listens) >= MAX_LISTENS:
        raise ctx.refused(
            request,
            name,
            "listens-per-principal",
            429,
            f"Too Many Requests: this client already holds {MAX_LISTENS} listen streams here",
            5,
            checked.id,
        )
    upstream = hub.upstream
    if upstream.init_result is not None:
        return _acknowledge(ctx, request, name, checked, hub, wanted)
    ready = upstream.when_ready()
    ready.addTimeout(hub.backend.server.request_timeout, ctx.clock)
    request.notifyFinish().addErrback(lambda _: ready.cancel())

    def go(_: object) -> None:
        if request.finished or request.channel is None:
            return
        try:
            _acknowledge(ctx, request, name, checked, hub, wanted)
        except HTTPProblem as problem:
            finish_with(request, problem.render(request))

    def failed(reason: Failure) -> None:
        if request.finished or request.channel is None:
            return
        problem = HTTPProblem(
            503,
            jsonrpc.SERVER_UNAVAILABLE,
            f"Service Unavailable: MCP server '{name}' is not ready ({upstream.state.value})",
            checked.id,
            {b"retry-after": b"5"},
        )
        finish_with(request, problem.render(request))

    ready.addCallbacks(go, failed)
    return NOT_DONE_YET


def _acknowledge(
    ctx: TransportContext,
    request: Request,
    name: str,
    checked: era.ModernRequest,
    hub: ClientSession,
    wanted: dict[str, Any],
) -> int:
    sink = hub.sink
    assert isinstance(sink, StatelessSink) and hub.upstream is not None
    params = checked.message.get("params") or {}
    agreed = agreed_filter(wanted, (hub.upstream.init_result or {}).get("capabilities"))
    try:
        connection = _stream(ctx, request, f"{name} listen")
    except HTTPProblem as problem:
        problem.id = checked.id
        raise
    listen = Listen(
        checked.id,
        agreed,
        lambda m: send(connection, m),
        lambda m: _finish(connection, m),
    )
    _acknowledge_tasks(ctx, request, connection, checked, agreed)
    sink.listens.add(listen)
    sink.subscribe(listen.uris, add=True)
    opened = ctx.clock.seconds()

    def ended(_: object) -> None:
        if listen in sink.listens:
            sink.listens.discard(listen)
            if not hub.closed:
                sink.subscribe(listen.uris, add=False)
            sink.settled()
        hub.last_active = ctx.clock.seconds()
        hub.record_call(checked.method, params, "ok", None, opened, peer_of(request))

    connection.done.addBoth(ended)
    return NOT_DONE_YET


class _NoResponder:
    """What a task's call answers before the task takes its place."""

    def notify(self, message: Message) -> None:
        pass

    def answer(self, message: Message, status: int = 200) -> None:
        pass


_NO_RESPONDER: Final = _NoResponder()


def send(connection: Stream, message: Message) -> None:
    """One JSON-RPC message as one SSE event (no event ids in this revision),
    or as one message of a socket's stream."""
    if isinstance(connection, EventConnection):
        connection.send(message_event(message))
    else:
        connection.send_message(message)


def _finish(connection: Stream, message: Message | None) -> None:
    if message is not None:
        send(connection, message)
    connection.finish()


def not_allowed(request: IRequest) -> bytes:
    """GET or DELETE from a 2026-07-28 client: there are no sessions or GET stream."""
    return HTTPProblem(
        405,
        jsonrpc.INVALID_REQUEST,
        "Method Not Allowed: protocol version 2026-07-28 has no sessions and no GET stream; "
        "send each request as a POST",
        headers=ALLOW,
    ).render(request)
