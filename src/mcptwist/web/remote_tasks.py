# -*- test-case-name: tests.test_cluster_listen -*-
"""A listen stream that follows tasks held on other nodes of a cluster.

A task lives on the node that accepted it, and its id names that node. A
2026-07-28 client's C{subscriptions/listen} whose filter names C{taskIds}
may reach any node; the tasks held elsewhere are followed from there: for
each other node that holds some of them, the listening node opens a
C{subscriptions/listen} on that node over a hop (L{Forwarder.open}: the
client's own headers, so the principal is the same there, and a hop that is
never forwarded again) whose filter names only that node's tasks. The ids
that node acknowledges are agreed to the client too, and its
C{notifications/tasks} are relayed on the client's stream, tagged with the
client's subscription id.

The client's acknowledgement comes first on its stream, and names every id
agreed: its stream is held (L{EventConnection.hold}) until each node
acknowledged, or until L{ACK_WAIT} seconds have passed (a node that did not
answer by then is logged, and its tasks are not agreed). Closing the
client's stream closes the hops; a hop that breaks off is logged, and the
client's stream goes on. A hop whose tasks have all ended is closed: nothing
more can come on it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from mcptwist.mcp import era, jsonrpc
from mcptwist.mcp.jsonrpc import Message, RequestId
from mcptwist.routing.tasks import TERMINAL

from .forward import Forwarder
from .sse import EventConnection, EventReader, EventTooLarge, message_event

log = Logger(namespace="mcptwist.cluster")

# How long a client's acknowledgement waits for the other nodes' (seconds).
ACK_WAIT: Final = 5.0
# Room in one relayed event beyond a task's result (its fields, its questions).
EVENT_ROOM: Final = 1024 * 1024
_ACKNOWLEDGED: Final = "notifications/subscriptions/acknowledged"
_TASKS: Final = "notifications/tasks"


def hop_listen(listen: Message, task_ids: list[str]) -> bytes:
    """The body of a hop's C{subscriptions/listen}: the client's request (its
    id and C{_meta}) with a filter that names only C{task_ids}."""
    params = listen.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    return jsonrpc.dumps(
        jsonrpc.request(
            listen["id"],
            "subscriptions/listen",
            {
                "_meta": meta if isinstance(meta, dict) else {},
                "notifications": {"taskIds": task_ids},
            },
        )
    )


class NodeListen:
    """The hop to one other node: a listen there for the tasks it holds.

    @ivar agreed: the task ids that node acknowledged (None: not yet).
    @ivar answered: whether its acknowledgement is in, or will never come.
    """

    def __init__(
        self,
        node: str,
        asked: list[str],
        subscription: RequestId,
        relay: Callable[[Message], None],
        on_answer: Callable[[], None],
        max_event: int,
    ) -> None:
        self.node = node
        self.asked = asked
        self.subscription = subscription
        self.relay = relay
        self.on_answer = on_answer
        self.agreed: list[str] | None = None
        self.answered = False
        self.closed = False
        self._reader = EventReader(max_event)
        # The agreed tasks that have not ended yet.
        self._running: set[str] = set()
        self._request: Deferred[Any] | None = None
        self._stream: _HopStream | None = None

    def start(
        self, forwarder: Forwarder, request: Request, client_ip: str | None, listen: Message
    ) -> None:
        self._request = forwarder.open(
            request, hop_listen(listen, self.asked), client_ip, self.node
        )
        self._request.addCallbacks(self._responded, self._failed).addErrback(
            lambda f: log.failure("reading node {node}'s listen stream", f, node=self.node)
        )

    def close(self) -> None:
        """Stop following this node's tasks: the hop is closed."""
        if self.closed:
            return
        self.closed = True
        if self._request is not None and not self._request.called:
            self._request.cancel()
        if self._stream is not None and self._stream.transport is not None:
            self._stream.transport.loseConnection()

    def _answer(self, agreed: list[str]) -> None:
        if self.answered:
            return
        self.answered = True
        self.agreed = agreed
        self._running = set(agreed)
        self.on_answer()

    def _give_up(self, why: str, **fields: object) -> None:
        """The hop failed before or after its acknowledgement: logged, and closed."""
        if self.closed:
            return
        if self.answered:
            log.warn(
                "the listen stream of node {node} broke off ({why}): "
                "its tasks are no longer followed on this stream",
                node=self.node,
                why=why.format(**fields),
            )
        else:
            log.warn(
                "node {node} did not acknowledge a listen stream ({why}): "
                "its {count} task(s) are not followed on this stream",
                node=self.node,
                why=why.format(**fields),
                count=len(self.asked),
            )
        self.close()
        self._answer(self.agreed or [])

    def _responded(self, response: Any) -> None:
        self._request = None
        if response is None:
            self._give_up("it is not in the cluster's registry")
            return
        kinds = response.headers.getRawHeaders(b"content-type") or [b""]
        if response.code != 200 or not kinds[0].startswith(b"text/event-stream"):
            kind = kinds[0].decode("latin-1")
            self._give_up("it answered {code} {kind}", code=response.code, kind=kind)
        stream = self._stream = _HopStream(self)
        response.deliverBody(stream)
        if self.closed and stream.transport is not None:
            # Refused, or no longer wanted: its connection is let go.
            stream.transport.loseConnection()

    def _failed(self, reason: Failure) -> None:
        self._request = None
        if reason.check(CancelledError) and self.closed:
            return
        self._give_up("{error}", error=reason.getErrorMessage())

    def _received(self, chunk: bytes) -> None:
        if self.closed:
            return
        try:
            events = self._reader.feed(chunk)
            for data in events:
                self._event(jsonrpc.loads(data))
                if self.closed:
                    return
        except (EventTooLarge, jsonrpc.ProtocolError) as e:
            self._give_up("{error}", error=e)

    def _event(self, message: object) -> None:
        if not isinstance(message, dict):
            return
        params = message.get("params")
        params = params if isinstance(params, dict) else {}
        method = message.get("method")
        if method == _ACKNOWLEDGED and not self.answered:
            wanted = params.get("notifications")
            given = wanted.get("taskIds") if isinstance(wanted, dict) else None
            given = set(given) if isinstance(given, list) else set()
            self._answer([task_id for task_id in self.asked if task_id in given])
            if not self._running:
                self.close()
        elif method == _TASKS and params.get("taskId") in self._running:
            self.relay(
                jsonrpc.notification(
                    _TASKS, {**params, "_meta": {era.META_SUBSCRIPTION: self.subscription}}
                )
            )
            if params.get("status") in TERMINAL:
                self._running.discard(params["taskId"])
                if not self._running:
                    self.close()

    def _lost(self, reason: Failure) -> None:
        self._stream = None
        self._give_up("{error}", error=reason.getErrorMessage())


class _HopStream(Protocol):
    """The body of a hop's answer, handed to its L{NodeListen}."""

    def __init__(self, listen: NodeListen) -> None:
        self.listen = listen

    def dataReceived(self, data: bytes) -> None:
        self.listen._received(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.listen._lost(reason)


class RemoteTasks:
    """The tasks of one client's listen stream held on other nodes: one
    L{NodeListen} per node, and the client's acknowledgement once they answered."""

    def __init__(
        self,
        connection: EventConnection,
        clock: IReactorTime,
        acknowledgement: Callable[[list[str]], Message],
        wait: float = ACK_WAIT,
    ) -> None:
        self.connection = connection
        self.clock = clock
        self.acknowledgement = acknowledgement
        self.wait = wait
        self.nodes: list[NodeListen] = []
        self._deadline: IDelayedCall | None = None
        self._starting = False

    def start(
        self,
        forwarder: Forwarder,
        request: Request,
        client_ip: str | None,
        listen: Message,
        remote: Mapping[str, list[str]],
        max_event: int,
    ) -> None:
        """Hold the client's stream, and open a hop to each node of C{remote}
        (node: the ids it holds)."""
        connection = self.connection
        connection.hold()
        connection.done.addBoth(self._ended)
        self._deadline = self.clock.callLater(self.wait, self._late)

        def relay(message: Message) -> None:
            connection.send(message_event(message))

        self._starting = True
        for node, ids in remote.items():
            hop = NodeListen(node, ids, listen["id"], relay, self._answered, max_event)
            self.nodes.append(hop)
            hop.start(forwarder, request, client_ip, listen)
        self._starting = False
        self._answered()

    def _answered(self) -> None:
        if self._starting or self._deadline is None:
            return
        if all(hop.answered for hop in self.nodes):
            self._acknowledge()

    def _late(self) -> None:
        self._deadline = None
        for hop in self.nodes:
            if not hop.answered:
                hop._give_up("no answer within {wait:g}s", wait=self.wait)
        self._acknowledge()

    def _acknowledge(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None
        agreed = [task_id for hop in self.nodes for task_id in hop.agreed or []]
        self.connection.release(message_event(self.acknowledgement(agreed)))

    def _ended(self, _: object) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        for hop in self.nodes:
            hop.close()
