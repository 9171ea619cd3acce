# -*- test-case-name: tests.test_silent_child,tests.test_audit -*-
"""What a supervisor reports of its children, to whoever records it.

The audit trail and the metrics each implement it; the supervisor knows
neither.
"""

from __future__ import annotations

from typing import Protocol


class ChildRecorder(Protocol):
    """Told when a child starts and when it ends."""

    def child_spawned(self, *, server: str, pid: int | None, command: str) -> None: ...

    def child_exited(
        self,
        *,
        server: str,
        pid: int | None,
        exit_code: int | None,
        signal: int | None,
        reason: str,
        stopping: bool = False,
    ) -> None: ...
