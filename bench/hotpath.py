"""The bridge's own Python work per call, in one process: no sockets, no child process.

A started L{BridgeService} (metrics, audit, history, as a default config has them)
serves one shared server whose child is the test suite's in-memory fake, and a
listener's site takes each request over an in-memory transport, keep-alive, one
after another. What is timed is the CPU of the whole exchange: parsing the request,
the gate, routing, the child's framing, and writing the answer. System calls and
the kernel's share are not in it: it is for comparing a change with what came before
(bench/notes.md), run back to back with it (a virtual machine's speed drifts), next
to the full run's figures, which are the ones that count.

    PYTHONPATH=src:. python bench/hotpath.py [--calls N] [--rounds R] [--profile NAME]

Each scenario runs R rounds of N calls; the figure is the best round's µs per call.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mcptwist.config.model import BridgeConfig, ListenerConfig, ServerConfig
from mcptwist.mcp import era, jsonrpc
from mcptwist.service.bridge import BridgeService
from tests.support.children import FakeProcessReactor

PEER = IPv4Address("TCP", "127.0.0.1", 40000)
INIT = jsonrpc.request(
    0,
    "initialize",
    {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "hotpath"}},
)


def http(method: str, path: str, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def call(id: int) -> bytes:
    return jsonrpc.dumps(
        jsonrpc.request(id, "tools/call", {"name": "echo", "arguments": {"text": f"call {id}"}})
    )


class Bench:
    def __init__(self) -> None:
        self.reactor = FakeProcessReactor()
        config = BridgeConfig(
            servers={"s": ServerConfig(name="s", command="fake")},
            max_sessions=20000,
            listeners=(),
        )
        self.service = BridgeService(config, self.reactor, {})
        self.service.privilegedStartService()
        self.service.startService()
        self.site = self.service._listener(
            ListenerConfig(endpoint="tcp:0:interface=127.0.0.1")
        ).site

    def stop(self) -> None:
        """End every connection and the service, as a bridge that stops."""
        for channel in list(self.site.channels):
            channel.connectionLost(Failure(ConnectionDone()))
        self.service.stopService()
        self.reactor.advance(10)

    def connect(self) -> tuple[Any, StringTransport]:
        channel = self.site.buildProtocol(PEER)
        transport = StringTransport(peerAddress=PEER)
        channel.makeConnection(transport)
        return channel, transport

    def streamable(self, accept: str) -> Callable[[int], None]:
        channel, transport = self.connect()
        channel.dataReceived(
            http(
                "POST",
                "/servers/s/mcp",
                jsonrpc.dumps(INIT),
                content_type="application/json",
                accept="application/json, text/event-stream",
            )
        )
        head = transport.value().split(b"\r\n\r\n")[0].decode("latin-1")
        session = next(
            line.split(":", 1)[1].strip()
            for line in head.split("\r\n")
            if line.lower().startswith("mcp-session-id")
        )
        transport.clear()
        notice = jsonrpc.dumps(jsonrpc.notification("notifications/initialized"))
        common = {
            "content_type": "application/json",
            "accept": accept,
            "mcp_session_id": session,
            "mcp_protocol_version": "2025-06-18",
        }
        channel.dataReceived(http("POST", "/servers/s/mcp", notice, **common))
        transport.clear()

        def one(i: int) -> None:
            channel.dataReceived(http("POST", "/servers/s/mcp", call(i), **common))
            if not i % 256:
                assert b"call" in transport.value(), transport.value()[:300]
                transport.clear()

        return one

    def sse(self) -> Callable[[int], None]:
        stream, events = self.connect()
        stream.dataReceived(http("GET", "/servers/s/sse", accept="text/event-stream"))
        endpoint = events.value().split(b"data: ", 1)[1].split(b"\n", 1)[0].decode()
        channel, transport = self.connect()
        channel.dataReceived(
            http("POST", endpoint, jsonrpc.dumps(INIT), content_type="application/json")
        )
        notice = jsonrpc.dumps(jsonrpc.notification("notifications/initialized"))
        channel.dataReceived(http("POST", endpoint, notice, content_type="application/json"))
        events.clear()
        transport.clear()

        def one(i: int) -> None:
            channel.dataReceived(http("POST", endpoint, call(i), content_type="application/json"))
            if not i % 256:
                assert b"call" in events.value(), events.value()[:300]
                events.clear()
                transport.clear()

        return one

    def modern(self) -> Callable[[int], None]:
        channel, transport = self.connect()
        meta = {
            era.META_VERSION: era.MODERN,
            era.META_CLIENT: {"name": "hotpath"},
            era.META_CAPABILITIES: {},
        }

        def one(i: int) -> None:
            message = jsonrpc.request(
                i,
                "tools/call",
                {"name": "echo", "arguments": {"text": f"call {i}"}, "_meta": meta},
            )
            channel.dataReceived(
                http(
                    "POST",
                    "/servers/s/mcp",
                    jsonrpc.dumps(message),
                    content_type="application/json",
                    accept="application/json, text/event-stream",
                    mcp_protocol_version=era.MODERN,
                    mcp_method="tools/call",
                    mcp_name="echo",
                )
            )
            if not i % 256:
                assert b"call" in transport.value(), transport.value()[:300]
                transport.clear()

        return one


SCENARIOS: dict[str, Callable[[Bench], Callable[[int], None]]] = {
    "streamable (accepts JSON or SSE)": lambda b: b.streamable(
        "application/json, text/event-stream"
    ),
    "streamable (accepts JSON only)": lambda b: b.streamable("application/json"),
    "http+sse": lambda b: b.sse(),
    "2026-07-28": lambda b: b.modern(),
}


def measure(one: Callable[[int], None], calls: int, rounds: int, start: int = 1) -> float:
    best = float("inf")
    for r in range(rounds):
        first = start + r * calls
        t0 = time.process_time()
        for i in range(first, first + calls):
            one(i)
        best = min(best, (time.process_time() - t0) / calls)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", help="profile this scenario (a prefix of its name)")
    args = parser.parse_args()
    for name, make in SCENARIOS.items():
        if args.profile and not name.startswith(args.profile):
            continue
        bench = Bench()
        one = make(bench)
        measure(one, 500, 1)  # warm up
        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(measure, one, args.calls, 1, 1_000_000)
            pstats.Stats(profile).sort_stats("tottime").print_stats(40)
        else:
            print(f"{name:36} {measure(one, args.calls, args.rounds, 10_000):7.1f} µs/call")
        bench.stop()


if __name__ == "__main__":
    main()
