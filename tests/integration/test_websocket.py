# -*- test-case-name: tests.integration.test_websocket -*-
"""MCP over WebSocket against a real bridge and the stdio fixture.

Two independent clients: the official TypeScript SDK's
C{WebSocketClientTransport} (under the Node 22 of tests/node) and the
C{websockets} library speaking raw JSON-RPC, in the session era and in
2026-07-28 (in front of the conformance fixture: an input_required round,
a listen stream that hears a list change). Then what a hostile or slow
client meets: a cross-site Origin (403 on the upgrade), an oversized frame
(close 1009), and a reader that stops reading (dropped, while another session
of the same child goes on).
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.uri import parse_uri

from . import harness as h

FIXTURE = str(h.FIXTURES / "stdio_fixture.py")
CONFORMANCE = str(h.FIXTURES / "conformance_server.py")
SDK = h.NODE_MODULES / "@modelcontextprotocol" / "sdk"
KiB = 1024
MAX_MESSAGE = 256 * KiB
STREAM_BUFFER = 64 * KiB

CONFIG = (
    f'stream_buffer = "{STREAM_BUFFER // KiB}KiB"\n'
    "heartbeat_interval = 5\n"
    + h.python_server_toml(
        "fx", [FIXTURE], f'sharing = "shared"\nmax_message_size = "{MAX_MESSAGE // KiB}KiB"'
    )
    + h.python_server_toml("cf", [CONFORMANCE], 'sharing = "shared"')
)
MODERN = "2026-07-28"

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "1"},
    },
}


def call(tool: str, request_id: int, **arguments: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": tool, "arguments": arguments},
    }


def modern(request_id: Any, method: str, **params: Any) -> dict[str, Any]:
    """A 2026-07-28 request: everything in its _meta, no headers on a socket."""
    meta = {
        "io.modelcontextprotocol/protocolVersion": MODERN,
        "io.modelcontextprotocol/clientCapabilities": {"elicitation": {}},
        "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
    }
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": method,
        "params": {**params, "_meta": meta},
    }


def session(ws: ClientConnection) -> dict[str, Any]:
    """Initialize a session on a socket: the server's answer."""
    ws.send(json.dumps(INIT))
    answer: dict[str, Any] = json.loads(ws.recv(timeout=20))
    ws.send(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}))
    return answer


def ask(ws: ClientConnection, message: dict[str, Any]) -> dict[str, Any]:
    """Send a request; its answer (skipping what the server says meanwhile)."""
    ws.send(json.dumps(message))
    while True:
        answer: dict[str, Any] = json.loads(ws.recv(timeout=20))
        if answer.get("id") == message["id"] and "method" not in answer:
            return answer


class WebSocketTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.bridge = h.start_bridge(self, CONFIG)
        self.url = f"ws://127.0.0.1:{self.bridge.port}/servers/fx/ws"

    def open(self, **options: Any) -> ClientConnection:
        opening = connect(self.url, subprotocols=["mcp"], open_timeout=20, max_size=None, **options)
        ws = opening.__enter__()
        self.addCleanup(opening.__exit__, None, None, None)
        return ws

    def test_typescript_sdk(self) -> None:
        """The TypeScript SDK's WebSocketClientTransport lists and calls tools."""
        h.require_node_tools(SDK)
        result = h.run(
            [h.node(), str(h.CLIENTS / "ws_client.mjs"), str(SDK), self.url, "over a socket"],
            timeout=60,
            env=h.node_env(),
        )
        out = h.parse_client_output(result)
        self.assertEqual(out["server"], "stdio-fixture")
        self.assertIn("echo", out["tools"])
        self.assertEqual(out["echo"], "Echo: over a socket")

    def test_raw_json_rpc(self) -> None:
        """The websockets library, one JSON-RPC message per text frame: the
        session's answers and the child's log notifications come back as frames,
        and the session is the bridge's, on the websocket transport."""
        ws = self.open()
        self.assertEqual(ws.subprotocol, "mcp")
        answer = session(ws)
        self.assertEqual(answer["result"]["serverInfo"]["name"], "stdio-fixture")
        listed = ask(ws, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        self.assertIn("echo", [t["name"] for t in listed["result"]["tools"]])
        echoed = ask(ws, call("echo", 3, message="raw"))
        self.assertEqual(echoed["result"]["content"][0]["text"], "Echo: raw")
        status = self.bridge.status("fx")
        self.assertEqual(status["sessions"], 1)

    def test_cross_site_origin(self) -> None:
        """A page of another site cannot open a socket (403 on the upgrade);
        the bridge's own origin can."""
        with self.assertRaises(InvalidStatus) as caught:
            connect(self.url, subprotocols=["mcp"], origin="https://evil.example", open_timeout=20)
        self.assertEqual(caught.exception.response.status_code, 403)
        own = f"http://127.0.0.1:{self.bridge.port}"
        ws = self.open(origin=own)
        self.assertEqual(session(ws)["id"], 1)

    def test_oversized_frame(self) -> None:
        """A message over the server's max_message_size closes the socket with 1009."""
        ws = self.open()
        session(ws)
        ws.send(json.dumps(call("echo", 2, message="x" * MAX_MESSAGE)))
        with self.assertRaises(ConnectionClosed) as caught:
            ws.recv(timeout=20)
        assert caught.exception.rcvd is not None
        self.assertEqual(caught.exception.rcvd.code, 1009)

    def test_slow_reader(self) -> None:
        """A client that stops reading is dropped once it is stream_buffer
        behind; another session served by the same child is unharmed."""
        other = self.open()
        session(other)
        slow = RawSocket(self.bridge.port)
        self.addCleanup(slow.close)
        slow.send(INIT)
        slow.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        self.assertEqual(ask(other, call("pid", 2))["result"], ask(other, call("pid", 3))["result"])
        # 32 answers of 128 KiB each: far more than the kernel's buffers and
        # stream_buffer hold, for a client that reads nothing.
        for n in range(32):
            slow.send(call("big", 10 + n, size=128 * KiB))
        h.wait_for(
            lambda: "dropped a slow WebSocket reader" in self.bridge.log,
            30,
            "the bridge to drop the slow reader",
        )
        h.wait_for(lambda: self.bridge.status("fx")["sessions"] == 1, 10, "its session to end")
        self.assertTrue(slow.reset())
        echoed = ask(other, call("echo", 4, message="still here"))
        self.assertEqual(echoed["result"]["content"][0]["text"], "Echo: still here")


class ModernWebSocketTests(SynchronousTestCase):
    """2026-07-28 requests on a socket, served as POSTs to /mcp are."""

    def setUp(self) -> None:
        self.bridge = h.start_bridge(self, CONFIG)
        self.url = f"ws://127.0.0.1:{self.bridge.port}/servers/cf/ws"

    def open(self) -> ClientConnection:
        opening = connect(self.url, subprotocols=["mcp"], open_timeout=20, max_size=None)
        ws = opening.__enter__()
        self.addCleanup(opening.__exit__, None, None, None)
        return ws

    def test_discover_list_and_input_required(self) -> None:
        """server/discover, tools/list, then a call whose child asks the
        client's name: input_required, and the retry with requestState (a new
        request on the same socket) gets the tool's answer."""
        ws = self.open()
        discovered = ask(ws, modern(1, "server/discover"))["result"]
        self.assertIn(MODERN, discovered["supportedVersions"])
        self.assertEqual(discovered["resultType"], "complete")
        listed = ask(ws, modern(2, "tools/list"))["result"]
        names = [t["name"] for t in listed["tools"]]
        self.assertIn("test_input_required_result_elicitation", names)
        simple = ask(ws, modern(3, "tools/call", name="test_simple_text", arguments={}))
        self.assertEqual(simple["result"]["resultType"], "complete")
        tool = {"name": "test_input_required_result_elicitation", "arguments": {}}
        asked = ask(ws, modern(4, "tools/call", **tool))["result"]
        self.assertEqual(asked["resultType"], "input_required")
        self.assertEqual(list(asked["inputRequests"]), ["user_name"])
        answers = {"user_name": {"action": "accept", "content": {"name": "Ada"}}}
        retry = modern(
            5, "tools/call", **tool, inputResponses=answers, requestState=asked["requestState"]
        )
        done = ask(ws, retry)["result"]
        self.assertEqual(done["resultType"], "complete")
        self.assertEqual(done["content"][0]["text"], "Hello, Ada!")
        self.assertEqual(self.bridge.status("cf")["sessions"], 1, "the principal's hub alone")

    def test_listen_hears_a_list_change(self) -> None:
        """A listen stream and calls share one socket: the listen is
        acknowledged, a tool that changes the list is called meanwhile, and
        the change arrives tagged with the listen's id; notifications/cancelled
        then ends the listen."""
        ws = self.open()
        ws.send(
            json.dumps(
                modern("L", "subscriptions/listen", notifications={"toolsListChanged": True})
            )
        )
        ack = json.loads(ws.recv(timeout=20))
        self.assertEqual(ack["method"], "notifications/subscriptions/acknowledged")
        self.assertEqual(ack["params"]["notifications"], {"toolsListChanged": True})
        ws.send(json.dumps(modern(2, "tools/call", name="test_trigger_tool_change", arguments={})))
        seen = [json.loads(ws.recv(timeout=20)) for _ in range(2)]
        [changed] = [m for m in seen if m.get("method") == "notifications/tools/list_changed"]
        self.assertEqual(changed["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"], "L")
        [answered] = [m for m in seen if m.get("id") == 2]
        self.assertEqual(answered["result"]["resultType"], "complete")
        ws.send(
            json.dumps(
                {
                    "jsonrpc": "2.0",
                    "method": "notifications/cancelled",
                    "params": {"requestId": "L"},
                }
            )
        )
        again = ask(ws, modern(3, "tools/call", name="test_trigger_tool_change", arguments={}))
        self.assertEqual(again["result"]["resultType"], "complete")
        with self.assertRaises(TimeoutError):
            ws.recv(timeout=1)

    def test_eras_are_not_mixed(self) -> None:
        """A socket that began in 2026-07-28 refuses initialize with a clear
        error, and goes on serving its era."""
        ws = self.open()
        self.assertIn("result", ask(ws, modern(1, "tools/list")))
        refused = ask(ws, INIT)
        self.assertEqual(refused["error"]["code"], -32600)
        self.assertIn("2026-07-28", refused["error"]["message"])
        self.assertIn("result", ask(ws, modern(2, "tools/list")))


class RawSocket:
    """A WebSocket client over a plain socket that reads only when told:
    the websockets library's sans-I/O protocol."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * KiB)
        self.protocol = ClientProtocol(
            parse_uri(f"ws://127.0.0.1:{port}/servers/fx/ws"), subprotocols=["mcp"]
        )
        self.protocol.send_request(self.protocol.connect())
        self._flush()
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise AssertionError(f"the upgrade was refused: {head!r}")
        self.protocol.receive_data(head)
        self.protocol.events_received()

    def send(self, message: dict[str, Any]) -> None:
        self.protocol.send_text(json.dumps(message).encode())
        self._flush()

    def _flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                self.sock.sendall(data)

    def reset(self) -> bool:
        """Whether the bridge has closed the connection (reading what is left)."""
        deadline = time.monotonic() + 20
        self.sock.settimeout(1)
        while time.monotonic() < deadline:
            try:
                if not self.sock.recv(1 << 20):
                    return True
            except TimeoutError:
                continue
            except ConnectionResetError:
                return True
        return False

    def close(self) -> None:
        self.sock.close()
