# -*- test-case-name: tests.test_audit -*-
"""What the core reports of sessions and requests, to whoever records it.

The core is given one L{Recorder} and knows nothing of what is behind it:
the audit trail and the metrics each implement it, and the service gives
the core either one, or several told at once. A request is reported once,
when it ends, as a L{RequestEnded}: its status is what the code that ended
it says (L{Status}), never guessed from the number of an error.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import attrs

from mcptwist.child.record import ChildRecorder

# How a request ended: answered, answered with an error, given up on after
# request_timeout, or cancelled (by its client, or cut by its session's end).
Status = Literal["ok", "error", "timeout", "cancelled"]


# The records are never changed once made. They are not frozen: on the path of
# every request, a frozen attrs class takes twice as long to make.


@attrs.define
class Described:
    """What a request asked for, as its record gives it (taken when it starts,
    before the bridge rewrites anything in it)."""

    name: str | None
    arg_size: int = 0
    arg_sha256: str = ""
    # The request's arguments: only for a server that audits them.
    arguments: Any = None


@attrs.define
class RequestEnded:
    """One request, once it has ended."""

    session: str | None
    server: str
    principal: str | None
    peer: str | None
    method: str
    name: str | None
    arg_size: int
    arg_sha256: str
    status: Status
    # The code of its error answer, whoever answered (None: no error).
    error_code: int | None
    latency_ms: float
    child_pid: int | None
    arguments: Any = None
    # How long the child took, from the request written to it to its answer
    # (None: it never reached a child, or the record does not say).
    child_ms: float | None = None
    # A tools/call answered with a result that says isError.
    tool_error: bool = False


@attrs.define
class ToolEvent:
    """Something the bridge did about a tool: pinned it on first sight, found
    its definition changed, accepted a change, refused a call to it (hidden
    or denied), or left it out of an endpoint's list (its name clashed)."""

    kind: Literal["tool_pinned", "tool_changed", "tool_accepted", "tool_refused", "name_clash"]
    server: str
    tool: str
    detail: str = ""
    endpoint: str | None = None
    principal: str | None = None
    # The digests (SHA-256, hex) of the pinned definition and of the one served.
    pinned: str | None = None
    current: str | None = None
    policy: str | None = None


class Recorder(ChildRecorder, Protocol):
    """Told when sessions open and close, and how each request ended."""

    @property
    def recording(self) -> bool:
        """Whether sessions and requests are recorded at all (if not, the core
        spares itself the work)."""

    @property
    def detailed(self) -> bool:
        """Whether a request's record holds the digest of its arguments (if
        not, only its name is needed)."""

    def request_ended(self, ended: RequestEnded) -> None: ...

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

    def tool_event(self, event: ToolEvent) -> None: ...


class BaseRecorder:
    """A L{Recorder} that records nothing: a recorder derives from it and
    spells out only what it records.

    It records sessions and requests (C{recording}), by their names only
    (not C{detailed}); a recorder whose answer changes makes them properties.
    """

    recording: bool = True
    detailed: bool = False

    def request_ended(self, ended: RequestEnded) -> None:
        pass

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
        pass

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
        pass

    def tool_event(self, event: ToolEvent) -> None:
        pass

    def child_spawned(self, *, server: str, pid: int | None, command: str) -> None:
        pass

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
        pass
