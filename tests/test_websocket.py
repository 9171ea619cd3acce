"""MCP over WebSocket (web/websocket.py), on a real site and channel.

A raw connection (a StringTransport) to a L{BridgeSite} over fake children,
and the C{websockets} library's sans-I/O client protocol on the other end:
the upgrade meets the gate, then frames go both ways, in memory.
"""

from __future__ import annotations

from typing import Any

import txaio
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from mcptwist.config.model import (
    AuthConfig,
    BridgeConfig,
    Bucket,
    EndpointConfig,
    ServerConfig,
    ServerLimits,
    TasksConfig,
    TokenConfig,
)
from mcptwist.mcp import era, jsonrpc
from mcptwist.mcp.jsonrpc import Message, RequestId
from mcptwist.ops.metrics import Metrics
from mcptwist.routing.stateless import INPUT_GATHER, StatelessSink
from mcptwist.security.auth import hash_token
from mcptwist.service.site import BridgeSite
from mcptwist.web.channel import ConnectionCounter

from .support.bridge import Bridge, Service
from .support.messages import INIT, call, modern
from .support.modern import ModernReactor

TOKEN = "mcpt_websocket_test_token"
KiB = 1024


class Site(Bridge):
    """A site over fake children (server C{s}), and WebSockets to it."""

    def __init__(self, test: SynchronousTestCase, **settings: Any) -> None:
        servers = settings.pop("servers", (ServerConfig(name="s", command="fake"),))
        settings.setdefault("insecure", True)
        super().__init__(test, *servers, **settings)
        self.metrics = Metrics()
        self.registry.recorder = self.metrics
        self.site = BridgeSite(self.app.resource(), reactor=self.reactor)
        self.site.audit = self.audit
        self.site.connections = ConnectionCounter(self.config.limits.max_connections_per_ip)
        self.site.configure(self.config.limits)
        # Autobahn's timers (pings, handshake and close deadlines) run on txaio's loop.
        test.patch(txaio.config, "loop", self.reactor)

    def socket(self, path: str = "/servers/s/ws", **headers: str) -> Socket:
        return Socket(self.site, path, headers)


class Socket:
    """A client's WebSocket over a StringTransport."""

    def __init__(self, site: BridgeSite, path: str, headers: dict[str, str]) -> None:
        address = IPv4Address("TCP", "192.0.2.1", 40000)
        self.channel = site.buildProtocol(address)
        self.transport = StringTransport(peerAddress=address)
        # Autobahn gives the connection to its protocol through this attribute.
        self.transport.protocol = self.channel
        self.channel.makeConnection(self.transport)
        self.client = ClientProtocol(
            parse_uri("ws://127.0.0.1" + path),
            subprotocols=[headers.pop("subprotocol", "mcp")],
            max_size=None,
        )
        request = self.client.connect()
        for name, value in headers.items():
            request.headers[name] = value
        self.client.send_request(request)
        self.frames: list[Frame] = []
        self.response: Response | None = None
        self._pump()

    def _pump(self) -> None:
        for data in self.client.data_to_send():
            if data:
                self.transport.protocol.dataReceived(data)
        written = self.transport.value()
        self.transport.clear()
        if written:
            self.client.receive_data(written)
        for event in self.client.events_received():
            if isinstance(event, Response):
                self.response = event
            else:
                self.frames.append(event)

    @property
    def status(self) -> int:
        assert self.response is not None
        return self.response.status_code

    def send(self, message: Any) -> None:
        self.send_raw(jsonrpc.dumps(message))

    def send_raw(self, data: bytes) -> None:
        self.client.send_text(data)
        self._pump()

    def read(self) -> list[Message]:
        """The messages received since the last read."""
        self._pump()
        texts = [f for f in self.frames if f.opcode is Opcode.TEXT]
        self.frames = [f for f in self.frames if f.opcode is not Opcode.TEXT]
        return [jsonrpc.loads(f.data) for f in texts]

    def close_code(self) -> int | None:
        self._pump()
        closes = [f for f in self.frames if f.opcode is Opcode.CLOSE]
        return int.from_bytes(closes[0].data[:2], "big") if closes else None

    def lose(self, reason: Failure | None = None) -> None:
        """The TCP connection ends."""
        self.transport.protocol.connectionLost(reason or Failure(ConnectionDone()))

    def initialize(self) -> Message:
        self.send(INIT)
        [answer] = self.read()
        self.send(jsonrpc.notification("notifications/initialized"))
        return answer


class EagerSocket(Socket):
    """A client that sends bytes right behind its upgrade request, in the same read."""

    extra = b"x" * 20_000

    def _pump(self) -> None:
        if self.extra:
            data = b"".join(self.client.data_to_send()) + self.extra
            self.extra = b""
            self.transport.protocol.dataReceived(data)
        super()._pump()


class UpgradeTests(SynchronousTestCase):
    def test_bytes_behind_the_upgrade_request_do_not_stall_the_socket(self) -> None:
        """What came with the upgrade request is neither HTTP nor frames: it is
        dropped, and the socket is read on."""
        site = Site(self)
        socket = EagerSocket(site.site, "/servers/s/ws", {})
        self.assertEqual(socket.status, 101)
        self.assertNotEqual(socket.transport.producerState, "paused")
        self.assertIn("serverInfo", socket.initialize()["result"])

    def test_session(self) -> None:
        """The upgrade answers 101 with the mcp subprotocol; the first message
        of the session era opens a session on the WebSocket transport,
        counted as such."""
        site = Site(self)
        socket = site.socket()
        self.assertEqual(socket.status, 101)
        assert socket.response is not None
        self.assertEqual(socket.response.headers["Sec-WebSocket-Protocol"], "mcp")
        self.assertEqual(site.registry.sessions, {})
        socket.send(INIT)
        [session] = site.registry.sessions.values()
        self.assertEqual(session.transport, "websocket")
        [answer] = socket.read()
        self.assertEqual(answer["result"]["serverInfo"]["name"], "fake")
        opened = site.metrics.registry.get_sample_value(
            "mcptwist_sessions_opened_total", {"server": "s", "transport": "websocket"}
        )
        self.assertEqual(opened, 1.0)

    def endpoint_socket(self, on_spawn: Any = None) -> tuple[Service, Socket]:
        """A socket to /endpoints/all/ws, an endpoint of the one server s (prefix s)."""
        endpoint = EndpointConfig(name="all", servers=("s",), prefixes={"s": "s"})
        config = BridgeConfig(
            servers={"s": ServerConfig(name="s", command="fake")},
            endpoints={"all": endpoint},
            insecure=True,
        )
        service = Service(self, config, on_spawn=on_spawn)
        self.patch(txaio.config, "loop", service.reactor)
        site = BridgeSite(service.service.resource, reactor=service.reactor)
        site.configure(config.limits)
        return service, Socket(site, "/endpoints/all/ws", {})

    def test_endpoint(self) -> None:
        """/endpoints/NAME/ws serves an aggregating endpoint the same way."""
        _, socket = self.endpoint_socket()
        self.assertEqual(socket.status, 101)
        answer = socket.initialize()
        self.assertIn("serverInfo", answer["result"])

    def test_endpoint_in_2026_07_28(self) -> None:
        """A 2026-07-28 socket on an endpoint: its tools namespaced, a call routed."""
        echo = {"name": "echo", "inputSchema": {"type": "object"}}
        service, socket = self.endpoint_socket(
            on_spawn=lambda child: child.lists.update({"tools/list": [echo]})
        )
        socket.send(modern(1, "tools/call", {"name": "s__echo", "arguments": {"a": 1}}))
        [called] = socket.read()
        self.assertEqual(called["id"], 1)
        self.assertEqual(called["result"]["content"][0]["text"], "{'a': 1}")
        [sent] = service.reactor.child.requests("tools/call")
        self.assertEqual(sent["params"]["name"], "echo")

    def test_subprotocol_required(self) -> None:
        """An upgrade that does not offer mcp is refused (400) before any session."""
        site = Site(self)
        socket = site.socket(subprotocol="chat")
        self.assertEqual(socket.status, 400)
        self.assertEqual(site.registry.sessions, {})

    def test_not_an_upgrade(self) -> None:
        """A plain GET is told to upgrade (426)."""
        site = Site(self)
        response = site.request("GET", "/servers/s/ws")
        self.assertEqual(response.code, 426)
        self.assertIn("Upgrade Required", site.json(response)["error"]["message"])

    def test_cross_site_origin(self) -> None:
        """A browser page of another site cannot open the socket (403)."""
        site = Site(self)
        socket = site.socket(Origin="https://evil.example")
        self.assertEqual(socket.status, 403)
        self.assertEqual(site.registry.sessions, {})

    def test_credentials(self) -> None:
        """Authentication judges the upgrade's headers: none is 401 with a
        challenge, as is a token in the URL; a token in the header opens the socket."""
        auth = AuthConfig(tokens=(TokenConfig("user", hash_token(TOKEN)),))
        site = Site(self, auth=auth)
        refused = site.socket()
        self.assertEqual(refused.status, 401)
        assert refused.response is not None
        self.assertIn("Bearer", refused.response.headers["WWW-Authenticate"])
        self.assertEqual(site.socket(Authorization=f"Bearer {TOKEN}").status, 101)
        self.assertEqual(site.socket(f"/servers/s/ws?access_token={TOKEN}").status, 401)

    def test_grants(self) -> None:
        """A principal without a grant of the server is refused the upgrade (403)."""
        auth = AuthConfig(tokens=(TokenConfig("user", hash_token(TOKEN), servers=("other",)),))
        site = Site(self, auth=auth)
        self.assertEqual(site.socket(Authorization=f"Bearer {TOKEN}").status, 403)


class MessageTests(SynchronousTestCase):
    def test_frames(self) -> None:
        """One message per text frame, both ways: requests and their answers,
        and what the child sends on its own."""
        site = Site(self)
        socket = site.socket()
        socket.initialize()
        socket.send(jsonrpc.request(2, "tools/call", {"name": "echo", "arguments": {"a": 1}}))
        [answer] = socket.read()
        self.assertEqual(answer["id"], 2)
        self.assertEqual(answer["result"]["content"][0]["text"], "{'a': 1}")
        site.reactor.child.send(jsonrpc.notification("notifications/tools/list_changed"))
        [notice] = socket.read()
        self.assertEqual(notice["method"], "notifications/tools/list_changed")

    def test_not_json(self) -> None:
        """A frame that is not JSON gets a parse error; the socket stays open."""
        site = Site(self)
        socket = site.socket()
        socket.send_raw(b"{nope")
        [error] = socket.read()
        self.assertEqual(error["error"]["code"], jsonrpc.PARSE_ERROR)
        self.assertEqual(socket.initialize()["id"], 1)

    def test_binary(self) -> None:
        """A binary frame closes the socket with 1003."""
        site = Site(self)
        socket = site.socket()
        socket.client.send_binary(jsonrpc.dumps(INIT))
        socket._pump()
        self.assertEqual(socket.close_code(), 1003)

    def test_oversized(self) -> None:
        """A message over the server's max_message_size closes the socket with 1009."""
        site = Site(self, servers=(ServerConfig(name="s", command="fake", max_message_size=KiB),))
        socket = site.socket()
        socket.initialize()
        socket.send(
            jsonrpc.request(2, "tools/call", {"name": "echo", "arguments": {"a": "x" * KiB}})
        )
        self.assertEqual(socket.close_code(), 1009)

    def test_session_refused(self) -> None:
        """A session that cannot be opened (the bridge is full): the first
        request gets the refusal, then the socket closes with 1013."""
        site = Site(self, max_sessions=0)
        socket = site.socket()
        socket.send(INIT)
        [refused] = socket.read()
        self.assertEqual(refused["id"], 1)
        self.assertIn("Service Unavailable", refused["error"]["message"])
        self.assertEqual(socket.close_code(), 1013)
        self.assertEqual(site.registry.sessions, {})

    def test_rate_limited(self) -> None:
        """Each message is charged like a POSTed one: past the server's burst,
        requests are refused with the rate limit's error."""
        limits = ServerLimits(total=Bucket(0.001, 3))
        site = Site(self, servers=(ServerConfig(name="s", command="fake", limits=limits),))
        socket = site.socket()  # the upgrade takes one token
        socket.initialize()  # and these two
        socket.send(jsonrpc.request(2, "ping"))
        [refused] = socket.read()
        self.assertEqual(refused["id"], 2)
        self.assertEqual(refused["error"]["code"], jsonrpc.RATE_LIMITED)


class EndTests(SynchronousTestCase):
    def test_closed_by_client(self) -> None:
        """Closing the socket ends the session: its request in flight is
        cancelled in the child, and the connection no longer counts."""
        site = Site(self, hold=True)
        socket = site.socket()
        socket.initialize()
        socket.send(jsonrpc.request(2, "tools/call", {"name": "slow"}))
        child = site.reactor.child
        self.assertEqual(len(child.held), 1)
        socket.client.send_close(1000)
        socket._pump()
        socket.lose()
        self.assertEqual(site.registry.sessions, {})
        [cancelled] = child.notifications("notifications/cancelled")
        self.assertEqual(cancelled["params"]["requestId"], child.held[0]["id"])
        self.assertEqual(site.site.channels, set())
        self.assertEqual(site.site.connections.counts if site.site.connections else {}, {})

    def test_closed_by_bridge(self) -> None:
        """A session the bridge ends closes its socket with 1001."""
        site = Site(self)
        socket = site.socket()
        socket.initialize()
        site.registry.stopService()
        self.assertEqual(socket.close_code(), 1001)

    def test_slow_reader(self) -> None:
        """A reader more than stream_buffer behind is dropped and its session
        ended; another session of the same child is unharmed."""
        site = Site(self, stream_buffer=4 * KiB)
        slow, other = site.socket(), site.socket()
        slow.initialize()
        other.initialize()
        slow.transport.producer.pauseProducing()  # its kernel buffer is full
        child = site.reactor.child
        for _ in range(8):
            child.send(jsonrpc.notification("notifications/message", {"data": "x" * KiB}))
        self.assertTrue(slow.transport.disconnected)
        slow.lose(Failure(ConnectionLost()))
        self.assertEqual(len(site.registry.sessions), 1)
        self.assertEqual(len(other.read()), 8)
        other.send(jsonrpc.request(2, "ping"))
        self.assertEqual(other.read()[0]["id"], 2)


TASKS = {"extensions": {era.TASKS_EXTENSION: {}}}
LISTEN_CAPS = {"tools": {"listChanged": True}}


def elicit(id: RequestId) -> Message:
    return jsonrpc.request(id, "elicitation/create", {"message": "Name?", "requestedSchema": {}})


class ModernTests(SynchronousTestCase):
    """2026-07-28 on a socket: each request served as a POST to /mcp is."""

    def test_discover_list_and_call(self) -> None:
        """A first request with _meta protocolVersion makes the socket
        stateless: no session is opened, and each answer is a frame shaped
        by the revision, without any header."""
        site = Site(self)
        socket = site.socket()
        socket.send(modern(1, "server/discover"))
        [discovered] = socket.read()
        self.assertEqual(discovered["id"], 1)
        self.assertIn(era.MODERN, discovered["result"]["supportedVersions"])
        socket.send(modern(2, "tools/list"))
        [listed] = socket.read()
        self.assertEqual(listed["result"]["resultType"], "complete")
        socket.send(call(3, arguments={"a": 1}))
        [called] = socket.read()
        self.assertEqual(called["id"], 3)
        self.assertEqual(called["result"]["content"][0]["text"], "{'a': 1}")
        self.assertEqual(called["result"]["_meta"][era.META_SERVER]["name"], "fake")
        transports = [s.transport for s in site.registry.sessions.values()]
        self.assertNotIn("websocket", transports)
        child = site.reactor.child
        [sent] = child.requests("tools/call")
        self.assertNotIn("_meta", sent["params"])
        self.assertEqual(len(child.requests("initialize")), 1, "only the bridge's own")

    def test_concurrent_requests_and_progress(self) -> None:
        """Requests run concurrently on one socket: each gets its progress and
        its answer as frames, in the order the child answers."""
        site = Site(self, hold=True)
        socket = site.socket()
        socket.send(call(1, _meta={"progressToken": "p"}))
        socket.send(call(2))
        child = site.reactor.child
        first, second = child.requests("tools/call")
        child.send(
            jsonrpc.notification(
                "notifications/progress", {"progressToken": first["id"], "progress": 1}
            )
        )
        child.answer(second)
        child.answer(first)
        progress, answered_second, answered_first = socket.read()
        self.assertEqual(progress["params"]["progressToken"], "p")
        self.assertEqual((answered_second["id"], answered_first["id"]), (2, 1))

    def test_input_required_then_retry(self) -> None:
        """A child's question answers the request with input_required; the
        retry, a new request on the socket, resumes the same call."""
        site = Site(self, hold=True)
        socket = site.socket()
        socket.send(call(1))
        child = site.reactor.child
        [held] = child.requests("tools/call")
        child.send(elicit("who"))
        site.reactor.advance(INPUT_GATHER)
        [asked] = socket.read()
        result = asked["result"]
        self.assertEqual(result["resultType"], "input_required")
        self.assertEqual(list(result["inputRequests"]), ["who"])
        answer = {"action": "accept", "content": {"name": "Ada"}}
        socket.send(call(2, requestState=result["requestState"], inputResponses={"who": answer}))
        [given] = [m for m in child.received if m.get("id") == "who" and "method" not in m]
        self.assertEqual(given["result"], answer)
        child.answer(held)
        [done] = socket.read()
        self.assertEqual((done["id"], done["result"]["resultType"]), (2, "complete"))
        socket.send(call(3, requestState=result["requestState"], inputResponses={}))
        [replayed] = socket.read()
        self.assertEqual(replayed["error"]["code"], jsonrpc.INVALID_PARAMS)

    def test_listen_until_cancelled(self) -> None:
        """subscriptions/listen: acknowledged, then the child's list changes
        as frames tagged with its id, until notifications/cancelled names it."""
        site = Site(self, servers=(ServerConfig(name="s", command="fake", sharing="session"),))
        site.reactor.on_spawn = lambda child: child.init_result.update(capabilities=LISTEN_CAPS)
        socket = site.socket()
        socket.send(
            modern("L", "subscriptions/listen", {"notifications": {"toolsListChanged": True}})
        )
        [ack] = socket.read()
        self.assertEqual(ack["method"], "notifications/subscriptions/acknowledged")
        self.assertEqual(ack["params"]["notifications"], {"toolsListChanged": True})
        child = site.reactor.child
        child.send(jsonrpc.notification("notifications/tools/list_changed"))
        [changed] = socket.read()
        self.assertEqual(changed["method"], "notifications/tools/list_changed")
        self.assertEqual(changed["params"]["_meta"], {era.META_SUBSCRIPTION: "L"})
        [hub] = site.registry.sessions.values()
        assert isinstance(hub.sink, StatelessSink)
        self.assertEqual(len(hub.sink.listens), 1)
        socket.send(jsonrpc.notification("notifications/cancelled", {"requestId": "L"}))
        self.assertEqual(hub.sink.listens, set())
        child.send(jsonrpc.notification("notifications/tools/list_changed"))
        self.assertEqual(socket.read(), [])

    def test_cancelled_request(self) -> None:
        """notifications/cancelled naming a request in progress cancels it in
        the child, and it gets no answer; its id may then be used again."""
        site = Site(self, hold=True)
        socket = site.socket()
        socket.send(call(1))
        child = site.reactor.child
        [held] = child.requests("tools/call")
        socket.send(jsonrpc.notification("notifications/cancelled", {"requestId": 1}))
        [cancelled] = child.notifications("notifications/cancelled")
        self.assertEqual(cancelled["params"]["requestId"], held["id"])
        self.assertEqual(cancelled["params"]["reason"], "the client cancelled the request")
        child.answer(held)
        self.assertEqual(socket.read(), [])
        socket.send(call(1))
        self.assertEqual(len(child.requests("tools/call")), 2)

    def test_closing_cancels_in_the_child(self) -> None:
        """Closing the socket cancels its calls in the child, as a closed
        response does."""
        site = Site(self, hold=True)
        socket = site.socket()
        socket.send(call(1))
        child = site.reactor.child
        [held] = child.requests("tools/call")
        socket.lose()
        [cancelled] = child.notifications("notifications/cancelled")
        self.assertEqual(cancelled["params"]["requestId"], held["id"])
        self.assertEqual(site.site.channels, set())

    def test_eras_are_not_mixed(self) -> None:
        """A socket keeps the era of its first message: a message of the
        other era is refused with -32600, and the socket goes on."""
        site = Site(self)
        stateless = site.socket()
        stateless.send(modern(1, "tools/list"))
        stateless.read()
        stateless.send(INIT)
        [refused] = stateless.read()
        self.assertEqual((refused["id"], refused["error"]["code"]), (1, jsonrpc.INVALID_REQUEST))
        self.assertIn(era.MODERN, refused["error"]["message"])
        stateless.send(modern(2, "tools/list"))
        self.assertEqual(stateless.read()[0]["id"], 2)
        session = site.socket()
        session.initialize()
        session.send(modern(2, "tools/list"))
        [refused] = session.read()
        self.assertEqual((refused["id"], refused["error"]["code"]), (2, jsonrpc.INVALID_REQUEST))
        self.assertIn("session era", refused["error"]["message"])

    def test_refusals_of_the_revision(self) -> None:
        """The revision's checks, less the headers a frame does not have: a
        batch, a removed method, an id already in progress."""
        site = Site(self, hold=True)
        socket = site.socket()
        socket.send(call(1))
        socket.send([modern(2, "tools/list")])
        socket.send(modern(3, "ping"))
        socket.send(call(1))
        batch, removed, again = socket.read()
        self.assertEqual(batch["error"]["code"], jsonrpc.INVALID_REQUEST)
        self.assertEqual((removed["id"], removed["error"]["code"]), (3, jsonrpc.METHOD_NOT_FOUND))
        self.assertEqual((again["id"], again["error"]["code"]), (1, jsonrpc.INVALID_REQUEST))

    def test_tool_view(self) -> None:
        """What a client may see and call is the HTTP path's: a tool the
        server's filter hides is not listed, and its call is refused."""
        server = ServerConfig(name="s", command="fake", exclude=("echo",))
        site = Site(self, servers=(server,))
        tools = [{"name": n, "inputSchema": {"type": "object"}} for n in ("echo", "other")]
        site.reactor.child.lists["tools/list"] = tools
        socket = site.socket()
        socket.send(modern(1, "tools/list"))
        [listed] = socket.read()
        self.assertEqual([t["name"] for t in listed["result"]["tools"]], ["other"])
        socket.send(call(2))
        [refused] = socket.read()
        self.assertEqual(refused["id"], 2)
        self.assertIn("error", refused)
        self.assertEqual(site.reactor.child.requests("tools/call"), [])

    def test_tasks(self) -> None:
        """With tasks on, a task tool's call is answered with a task, which
        tasks/get on the same socket shows."""
        server = ServerConfig(name="s", command="fake", task_tools=("slow",))
        site = Site(self, servers=(server,), hold=True, tasks=TasksConfig(ttl=600))
        socket = site.socket()
        socket.send(modern(1, "tools/call", {"name": "slow", "arguments": {}}, TASKS))
        [created] = socket.read()
        self.assertEqual(created["result"]["resultType"], "task")
        task_id = created["result"]["taskId"]
        site.reactor.child.answer(site.reactor.child.requests("tools/call")[0])
        socket.send(modern(2, "tasks/get", {"taskId": task_id}, TASKS))
        [got] = socket.read()
        self.assertEqual(got["result"]["status"], "completed")

    def test_rate_limited(self) -> None:
        """Each frame is charged as a POSTed message is."""
        limits = ServerLimits(total=Bucket(0.001, 3))
        site = Site(self, servers=(ServerConfig(name="s", command="fake", limits=limits),))
        socket = site.socket()  # the upgrade takes one token
        socket.send(modern(1, "tools/list"))
        socket.send(modern(2, "tools/list"))
        socket.send(modern(3, "tools/list"))
        ok, also, refused = socket.read()
        self.assertEqual(refused["id"], 3)
        self.assertEqual(refused["error"]["code"], jsonrpc.RATE_LIMITED)
        self.assertNotIn("error", ok)
        self.assertNotIn("error", also)

    def test_audited_and_counted(self) -> None:
        """Each request is recorded as the HTTP path records it."""
        site = Site(self)
        socket = site.socket()
        socket.send(call(1))
        socket.read()
        calls = site.metrics.registry.get_sample_value(
            "mcptwist_requests_total",
            {"server": "s", "method": "tools/call", "status": "ok"},
        )
        self.assertEqual(calls, 1.0)


class ModernChildTaskTests(SynchronousTestCase):
    def test_a_childs_listen_carries_the_tasks(self) -> None:
        """On a server whose child speaks 2026-07-28, a socket's listen is the
        child's own stream, with the bridge's task notifications merged in."""
        server = ServerConfig(name="s", command="fake", era="modern", task_tools=("slow",))
        site = Site(self, servers=(server,), reactor=ModernReactor(), tasks=TasksConfig(ttl=600))
        socket = site.socket()
        socket.send(modern(1, "tools/call", {"name": "slow", "arguments": {}}, TASKS))
        [created] = socket.read()
        task_id = created["result"]["taskId"]
        wanted = {"toolsListChanged": True, "taskIds": [task_id]}
        socket.send(modern("L", "subscriptions/listen", {"notifications": wanted}, TASKS))
        child = site.reactor.child
        [listen] = [m for m in child.held if m["method"] == "subscriptions/listen"]
        self.assertEqual(listen["params"]["notifications"], {"toolsListChanged": True})
        subscription = {era.META_SUBSCRIPTION: listen["id"]}
        child.send(
            jsonrpc.notification(
                "notifications/subscriptions/acknowledged",
                {"notifications": {"toolsListChanged": True}, "_meta": subscription},
            )
        )
        [call] = [m for m in child.held if m["method"] == "tools/call"]
        child.send(jsonrpc.result(call["id"], {"content": []}))
        ack, working, completed = socket.read()
        self.assertEqual(ack["params"]["notifications"], {**wanted, "taskIds": [task_id]})
        self.assertEqual(ack["params"]["_meta"], {era.META_SUBSCRIPTION: "L"})
        self.assertEqual(
            [working["params"]["status"], completed["params"]["status"]], ["working", "completed"]
        )
