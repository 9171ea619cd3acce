# -*- test-case-name: tests.test_audit -*-
"""What the router reports of sessions and requests, to whoever records it.

The audit trail and the metrics implement it; the router knows neither.
"""

from __future__ import annotations

from typing import Protocol

from mcptwist.child.record import ChildRecorder


class Recorder(ChildRecorder, Protocol):
    """Told when sessions open and close, and how each request ended."""

    @property
    def enabled(self) -> bool:
        """Whether a request's record is written anywhere (else only counted)."""

    @property
    def metrics(self) -> object | None:
        """The metrics it feeds, if any."""

    def request(
        self,
        *,
        session: str | None,
        server: str,
        principal: str | None,
        peer: str | None,
        method: str,
        name: str | None,
        arg_size: int,
        arg_sha256: str,
        status: str,
        error_code: int | None,
        latency_ms: float,
        child_pid: int | None,
        arguments: object | None = None,
    ) -> None: ...

    def session_opened(
        self,
        *,
        session: str,
        server: str,
        principal: str | None,
        peer: str | None,
        transport: str | None,
        protocol_version: str | None,
    ) -> None: ...

    def session_closed(
        self,
        *,
        session: str,
        server: str,
        principal: str | None,
        reason: str,
        duration: float,
        transport: str | None = None,
    ) -> None: ...
