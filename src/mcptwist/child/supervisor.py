# -*- test-case-name: tests.test_supervisor -*-
"""Keep one MCP server's child running: spawn, restart with backoff, give up.

The supervisor owns the state machine of a child slot::

    starting -> running -> restarting -> starting ...
                        \\-> failed      (crash-loop breaker tripped)
    any -> stopped                       (stopService)

A child that exits has crashed; so has one that is alive but broken (it
closed its stdout or stdin, or answers nothing and its owner gives up on it):
the supervisor then answers what waited on it at once (through its owner),
stops it, and restarts it like a crashed one, under the same backoff and
breaker.

It knows nothing of JSON-RPC: messages and exits go to its owner (the router),
which also decides when a freshly spawned child is ready (its handshake done).
"""

from __future__ import annotations

import enum
import os
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mcptwist.child.process import Child, describe_exit, stderr_buffer
from mcptwist.config.model import ServerConfig
from mcptwist.mcp import jsonrpc

if TYPE_CHECKING:
    from mcptwist.child.record import ChildRecorder

log = Logger(namespace="mcptwist.supervisor")


class ChildState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


class SupervisorOwner(Protocol):
    def child_spawned(self, child: Child) -> None: ...

    def child_message(self, child: Child, message: jsonrpc.Message) -> None: ...

    def child_oversize(self, child: Child, size: int, head: bytes, tail: bytes) -> None: ...

    def child_lost(self, child: Child, why: str) -> None: ...


class Supervisor(Service):
    """Runs, restarts and stops the child of one server (or one session)."""

    def __init__(
        self,
        server: ServerConfig,
        owner: SupervisorOwner,
        reactor: Any,
        environ: Mapping[str, str],
        label: str | None = None,
        recorder: ChildRecorder | None = None,
    ) -> None:
        self.server = server
        self.owner = owner
        self.recorder = recorder
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.environ = environ
        self.label = label or server.name
        self.state = ChildState.STOPPED
        self.child: Child | None = None
        self.restarts = 0
        self.last_exit: str | None = None
        self.stderr = stderr_buffer(server)
        self._crashes: deque[float] = deque()
        self._consecutive = 0
        self._restart_call: IDelayedCall | None = None
        self._abandoned: str | None = None
        # Why the child, alive but of no more use, is being stopped.
        self._broken: str | None = None
        self._settled: list[Deferred[None]] = []

    # Service

    def startService(self) -> None:
        super().startService()
        self._spawn()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._set_state(ChildState.STOPPED)
        if self._restart_call is not None and self._restart_call.active():
            self._restart_call.cancel()
        if self.child is None:
            return succeed(None)
        return self.child.stop()

    # Owner's controls

    def mark_ready(self, child: Child) -> None:
        """The owner finished the child's handshake: it now serves requests."""
        if child is self.child and self.state is ChildState.STARTING:
            self._set_state(ChildState.RUNNING)

    def abandon(self, child: Child, why: str) -> None:
        """The owner gave up on this child (for example a failed handshake)."""
        if child is self.child and child.exit_reason is None and self._broken is None:
            log.warn(
                "{server}: killing child (pid {pid}): {why}",
                server=self.label,
                pid=child.pid,
                why=why,
            )
            self._abandoned = why
            child.kill()

    def child_broken(self, child: Child, why: str) -> None:
        """The child runs but is of no more use (it closed its stdout or stdin,
        or its owner gave up on its silence): answer what waited on it now,
        stop it, and restart it as a crashed child once it has exited."""
        if (
            child is not self.child
            or child.exit_reason is not None
            or self._broken is not None
            or self.state not in (ChildState.STARTING, ChildState.RUNNING)
        ):
            return
        log.warn(
            "{server}: child (pid {pid}) {why}; stopping it",
            server=self.label,
            pid=child.pid,
            why=why,
        )
        self._broken = self.last_exit = why
        self._set_state(ChildState.RESTARTING)
        self.owner.child_lost(child, why)
        child.stop()

    def restart(self) -> Deferred[None]:
        """Stop the current child (if any) and start a fresh one now."""
        self._crashes.clear()
        self._consecutive = 0
        # An operator's restart supersedes the stop of a broken child.
        self._broken = None
        if self._restart_call is not None and self._restart_call.active():
            self._restart_call.cancel()
        old = self.child
        if old is None or old.ended.called:
            self._spawn()
            return succeed(None)
        self._set_state(ChildState.RESTARTING)
        d = old.stop()
        d.addCallback(lambda _: self._spawn() if self.running else None)
        return d

    def settled(self) -> Deferred[None]:
        """Fires once the child has left C{starting}: it serves, or it failed
        (crashed, or will be retried): what readiness waits for."""
        if self.state is not ChildState.STARTING:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._settled.append(d)
        return d

    @property
    def pid(self) -> int | None:
        child = self.child
        return child.pid if child is not None and child.exit_reason is None else None

    def uptime(self) -> float | None:
        if self.state is ChildState.RUNNING and self.child is not None:
            return max(0.0, self.clock.seconds() - self.child.started)
        return None

    # Internals

    def _set_state(self, state: ChildState) -> None:
        if state is not self.state:
            log.info(
                "{server}: {old} -> {new}",
                server=self.label,
                old=self.state.value,
                new=state.value,
            )
            self.state = state
        if state is not ChildState.STARTING and self._settled:
            waiting, self._settled = self._settled, []
            for d in waiting:
                d.callback(None)

    def _spawn(self) -> None:
        self._restart_call = None
        self._broken = None
        if not self.running:
            return
        child = Child(
            server=self.server,
            listener=self,
            reactor=self.reactor,
            stderr_tail=self.stderr,
            started=self.clock.seconds(),
            # A test reactor provides killpg so that no real group is signalled.
            killpg=getattr(self.reactor, "killpg", os.killpg),
        )
        self.child = child
        self._set_state(ChildState.STARTING)
        try:
            child.spawn(self.environ)
        except Exception as e:
            log.error(
                "{server}: cannot spawn {command}: {error}",
                server=self.label,
                command=self.server.command,
                error=e,
            )
            child.exit_reason = Failure(e)
            self._crashed(child, f"could not be spawned: {e}")
            return
        if self.recorder is not None:
            self.recorder.child_spawned(
                server=self.label, pid=child.pid, command=os.path.basename(self.server.command)
            )
        self.owner.child_spawned(child)

    # ChildListener

    def child_message(self, child: Child, message: jsonrpc.Message) -> None:
        if child is self.child:
            self.owner.child_message(child, message)

    def child_oversize(self, child: Child, size: int, head: bytes, tail: bytes) -> None:
        if child is self.child:
            self.owner.child_oversize(child, size, head, tail)

    def child_exited(self, child: Child, reason: Failure) -> None:
        how = describe_exit(reason)
        # The bridge is stopping or restarting the child: its end is no crash
        # (unless it was stopped for being broken).
        stopping = self.state in (ChildState.STOPPED, ChildState.RESTARTING)
        broken = self._broken if child is self.child else None
        if broken is not None:
            how = f"{broken}, so it was stopped ({how})"
        if self.recorder is not None:
            value = reason.value
            self.recorder.child_exited(
                server=self.label,
                pid=child.pid,
                exit_code=getattr(value, "exitCode", None),
                signal=getattr(value, "signal", None),
                reason=how,
                stopping=stopping or self._abandoned is not None,
            )
        if child is not self.child:
            return
        self._broken = None
        if self._abandoned is not None:
            how, self._abandoned = f"{self._abandoned} (so it was killed)", None
        if stopping and not self.running:
            self.owner.child_lost(child, f"was stopped ({how})")
            return
        if self.state is ChildState.RESTARTING and broken is None:
            # An operator restart: not a crash.
            self.owner.child_lost(child, f"was restarted ({how})")
            return
        self._crashed(child, how)

    def _crashed(self, child: Child, how: str) -> None:
        now = self.clock.seconds()
        if now - child.started > self.server.restart.crash_window:
            self._consecutive = 0
        self._consecutive += 1
        self._crashes.append(now)
        window = self.server.restart.crash_window
        while self._crashes and self._crashes[0] < now - window:
            self._crashes.popleft()
        self.last_exit = how
        policy = self.server.restart
        if len(self._crashes) >= policy.crash_limit:
            self._set_state(ChildState.FAILED)
            log.error(
                "{server}: child {how}; {count} crashes within {window:g}s, giving up for "
                "{cooldown:g}s (see its stderr in GET /servers/{name})",
                server=self.label,
                how=how,
                count=len(self._crashes),
                window=window,
                cooldown=policy.cooldown,
                name=self.server.name,
            )
            self._restart_call = self.clock.callLater(policy.cooldown, self._retry)
            self.owner.child_lost(
                child,
                f"{how} and has failed ({len(self._crashes)} crashes within {window:g}s)",
            )
            return
        # The exponent is capped: a child that crashes forever, slowly enough
        # never to trip the breaker, must not overflow the float.
        delay = min(policy.initial_delay * 2 ** min(self._consecutive - 1, 32), policy.max_delay)
        self.restarts += 1
        self._set_state(ChildState.RESTARTING)
        log.warn(
            "{server}: child {how}; restarting in {delay:g}s",
            server=self.label,
            how=how,
            delay=delay,
        )
        # Scheduled before the owner hears of it: the owner may stop us at once.
        self._restart_call = self.clock.callLater(delay, self._spawn)
        self.owner.child_lost(child, how)

    def _retry(self) -> None:
        """The breaker's cool-down has passed: try the server again."""
        log.info("{server}: cool-down over, trying again", server=self.label)
        self._crashes.clear()
        self._consecutive = 0
        self._spawn()

    def next_attempt(self) -> float | None:
        """Seconds until the next spawn, when one is scheduled."""
        call = self._restart_call
        if call is None or not call.active():
            return None
        return max(0.0, call.getTime() - self.clock.seconds())

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "pid": self.pid,
            "uptime": self.uptime(),
            "restarts": self.restarts,
            "next_attempt_in": self.next_attempt(),
            "last_exit": self.last_exit,
            "stderr": list(self.stderr),
        }
