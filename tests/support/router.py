"""Router doubles: a client session as the multiplexer sees it, the messages
a test sends through an L{Upstream} on that session's behalf, and a
request's record as the core reports it."""

from __future__ import annotations

from typing import Any

import attrs

from mcptwist.mcp import jsonrpc
from mcptwist.mcp.jsonrpc import Message, RequestId
from mcptwist.routing.record import RequestEnded, Status
from mcptwist.routing.upstream import Pending, Upstream


@attrs.define(eq=False)
class FakeSession:
    """A client session as the router sees it: it keeps what it is delivered
    and how each of its requests ended."""

    id: str
    protocol_version: str | None = None
    capabilities: dict[str, Any] = attrs.field(factory=dict)
    client_info: dict[str, Any] = attrs.field(factory=dict)
    log_level: str | None = None
    stateless: bool = False
    got: list[tuple[Message, RequestId | None]] = attrs.field(factory=list)
    cancelled_ids: list[RequestId] = attrs.field(factory=list)
    # Its requests the router holds, and how each that ended did.
    in_flight: int = 0
    ended: list[tuple[RequestId | None, Status, int | None]] = attrs.field(factory=list)

    def deliver(
        self, message: Message, related: RequestId | None, encoded: bytes | None = None
    ) -> None:
        if encoded is not None:
            assert jsonrpc.loads(encoded) == message
        self.got.append((message, related))

    def cancelled(self, request_id: RequestId) -> None:
        self.cancelled_ids.append(request_id)

    def request_started(self, request: Pending, message: Message) -> None:
        self.in_flight += 1

    def request_ended(self, request: Pending, status: Status, error_code: int | None) -> None:
        self.in_flight -= 1
        self.ended.append((request.client_id, status, error_code))

    def responses(self) -> dict[RequestId, Message]:
        return {m["id"]: m for m, _ in self.got if "method" not in m}

    def notifications(self, method: str) -> list[Message]:
        return [m for m, _ in self.got if m.get("method") == method and "id" not in m]


def send(upstream: Upstream, session: FakeSession, message: Message) -> None:
    """A message from the session's client, handed to the upstream."""
    upstream.handle(session, message, jsonrpc.classify(message))


def initialize(
    upstream: Upstream,
    session: FakeSession,
    version: str = "2025-11-25",
    caps: dict[str, Any] | None = None,
) -> Message:
    """The session's initialize, sent; the answer it got."""
    send(
        upstream,
        session,
        jsonrpc.request(
            0,
            "initialize",
            {
                "protocolVersion": version,
                "capabilities": caps or {},
                "clientInfo": {"name": session.id},
            },
        ),
    )
    return session.responses()[0]


def call(id: RequestId, text: str, token: Any = None) -> Message:
    """A call of the echo tool, with a progress token if given."""
    params: dict[str, Any] = {"name": "echo", "arguments": {"text": text}}
    if token is not None:
        params["_meta"] = {"progressToken": token}
    return jsonrpc.request(id, "tools/call", params)


def ended(**changes: Any) -> RequestEnded:
    """A tools/call that ended well after 1.5s."""
    base = RequestEnded(
        session="abc",
        server="files",
        principal="alice",
        peer="192.0.2.7",
        method="tools/call",
        name="read",
        arg_size=2,
        arg_sha256="",
        status="ok",
        error_code=None,
        latency_ms=1500.0,
        child_pid=4242,
    )
    return attrs.evolve(base, **changes)
