# -*- test-case-name: tests.test_telemetry -*-
"""What the router tells a tracer: a request taken, sent to the child, asked
about, ended.

The core knows nothing of OpenTelemetry. A L{Tracer} is injected into each
upstream (None: no tracing, and the router does one attribute test per
request); L{mcptwist.ops.telemetry} implements it. The trace context travels
in the messages themselves: a request's C{params._meta} names its parent,
and the router's request to the child names the span of the hop to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol

from mcptwist.mcp.jsonrpc import Message

if TYPE_CHECKING:
    from mcptwist.routing.record import Status


class Client(Protocol):
    """What a span says of the client that sent a request (a downstream)."""

    id: str
    protocol_version: str | None

    @property
    def stateless(self) -> bool:
        """A 2026-07-28 client: it has no session."""


class QuestionTrace(Protocol):
    """A request the child sent to a client (sampling, elicitation, roots)."""

    def answered(self, answer: Message | None) -> None:
        """The client answered (None: the question was dropped)."""


class CallTrace(Protocol):
    """One client request, from the moment the router takes it until it ends."""

    def sent(self, message: Message) -> None:
        """The request goes to the child as C{message}: the hop to it begins,
        and its context is written into C{message}'s C{params._meta}."""

    def question(self, message: Message) -> QuestionTrace:
        """The child asks the client something while it works on this request."""

    def ended(self, answer: Message | None, status: Status) -> None:
        """The request ended: answered (C{answer}), or not (cancelled, cut)."""


class Tracer(Protocol):
    """Starts the trace of each request the router takes."""

    def request(
        self, server: str, session: Client, message: Message, arguments: bool = False
    ) -> CallTrace:
        """A client's request to C{server}, as the client sent it (its parent is
        its C{params._meta}'s C{traceparent}, else the HTTP request's); with
        C{arguments}, its span records a tool's arguments and result."""

    def incoming(self, headers: Mapping[str, str]) -> AbstractContextManager[None]:
        """The trace context of an HTTP request (its C{traceparent},
        C{tracestate} and C{baggage} headers), current while its messages are
        handed to the router: the parent of those whose C{_meta} names none."""
