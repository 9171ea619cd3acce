# -*- test-case-name: tests.test_record -*-
"""Several recorders as one: what the core reports, told to each of them.

The service gives the core the audit trail alone, or the audit trail and the
metrics together as L{Recorders}; the core reports each session, request and
child once, whoever records it.
"""

from __future__ import annotations

from mcptwist.routing.record import Recorder, RequestEnded, ToolEvent


class Recorders:
    """A L{Recorder} that tells each of its recorders, in order."""

    def __init__(self, *recorders: Recorder) -> None:
        self.recorders = recorders

    @property
    def recording(self) -> bool:
        """Whether any of them records sessions and requests (each decides
        for itself: an audit trail starts recording when a reload gives it a
        file)."""
        return any(recorder.recording for recorder in self.recorders)

    @property
    def detailed(self) -> bool:
        """Whether any of them wants the digest of a request's arguments."""
        # Asked at every request's start: a loop costs half what any() does.
        for recorder in self.recorders:  # noqa: SIM110
            if recorder.detailed:
                return True
        return False

    def request_ended(self, ended: RequestEnded) -> None:
        for recorder in self.recorders:
            recorder.request_ended(ended)

    def session_opened(
        self,
        *,
        session: str,
        server: str,
        principal: str | None,
        peer: str | None,
        transport: str | None,
        protocol_version: str | None,
    ) -> None:
        for recorder in self.recorders:
            recorder.session_opened(
                session=session,
                server=server,
                principal=principal,
                peer=peer,
                transport=transport,
                protocol_version=protocol_version,
            )

    def session_closed(
        self,
        *,
        session: str,
        server: str,
        principal: str | None,
        reason: str,
        duration: float,
        transport: str | None = None,
    ) -> None:
        for recorder in self.recorders:
            recorder.session_closed(
                session=session,
                server=server,
                principal=principal,
                reason=reason,
                duration=duration,
                transport=transport,
            )

    def tool_event(self, event: ToolEvent) -> None:
        for recorder in self.recorders:
            recorder.tool_event(event)

    def child_spawned(self, *, server: str, pid: int | None, command: str) -> None:
        for recorder in self.recorders:
            recorder.child_spawned(server=server, pid=pid, command=command)

    def child_exited(
        self,
        *,
        server: str,
        pid: int | None,
        exit_code: int | None,
        signal: int | None,
        reason: str,
        stopping: bool = False,
    ) -> None:
        for recorder in self.recorders:
            recorder.child_exited(
                server=server,
                pid=pid,
                exit_code=exit_code,
                signal=signal,
                reason=reason,
                stopping=stopping,
            )
