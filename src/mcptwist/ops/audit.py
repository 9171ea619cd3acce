# -*- test-case-name: tests.test_audit -*-
"""The audit trail: who did what through the bridge, one JSON object a line.

Audit events go through their own L{Logger} and L{LogPublisher}, never
through the global publisher, so they never reach the main log, and a bridge
without C{audit.path} pays one attribute test per event.

Every line has the same shape::

    {"ts": "2026-11-21T23:59:59.123456Z", "event": "request", ...fields}

C{ts} is UTC with microseconds, from the injected clock. Only the fields
named by the event method are written; a field whose value is None is left
out. Nothing secret is ever written: the callers pass no token, no
environment and no child arguments. Request arguments are written only when
the caller passes C{arguments}, which it does only for a server whose
operator turned C{audit_arguments} on; otherwise a request carries only the
size and SHA-256 of its arguments (L{argument_digest}).

The events are encoded by L{mcptwist.ops.audit_encoding} and written by
L{mcptwist.ops.audit_file}, which rotates the file by size.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Final, Literal

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel, LogPublisher

from mcptwist.config.model import AuditConfig
from mcptwist.ops.audit_encoding import timestamp
from mcptwist.ops.audit_file import AuditFileObserver
from mcptwist.ops.metrics import Metrics
from mcptwist.routing.record import RequestEnded, ToolEvent
from mcptwist.security.ipfilter import rate_key

NAMESPACE: Final = "mcptwist.audit"


class AuditError(Exception):
    """The audit file cannot be opened at start, worded for the operator."""


def _writer_for(config: AuditConfig) -> AuditFileObserver | None:
    """A writer of C{config}'s file, not yet open (None without a path)."""
    if config.path is None:
        return None
    return AuditFileObserver(config.path, config.max_size, config.keep)


def _open_writer(writer: AuditFileObserver) -> None:
    """Open a writer's file.

    @raise AuditError: if its directory does not exist or it cannot be opened.
    """
    path = writer.path
    directory = os.path.dirname(path)
    # Checked when the configuration is read, but the directory may have gone since.
    if not os.path.isdir(directory):
        raise AuditError(
            f"audit.path {path!r}: the directory {directory!r} does not exist; "
            "create it (writable by the bridge's user) or change audit.path"
        )
    try:
        writer.open()
    except OSError as e:
        raise AuditError(
            f"audit.path {path!r} cannot be opened for appending ({e.strerror}); "
            "check that it is a regular file the bridge's user may write"
        ) from None


# The last records written, kept for the dashboard.
TAIL: Final = 500
# The events that are refusals (their outcome is "refused").
_REFUSALS: Final = frozenset(
    {
        "auth_failure",
        "access_refused",
        "credential_missing",
        "rate_limited",
        "ip_refused",
        "http_refused",
        "tool_refused",
    }
)

REFUSAL_WINDOW: Final = 10.0
# Clients whose refusals are being coalesced at once; beyond this, refusals of
# new clients share one burst per kind (L{OVERFLOW}) until windows end.
REFUSAL_KEYS: Final = 10_000
# Distinct peers a burst record names (an IPv6 /64 holds more than any file).
BURST_PEERS: Final = 8
OVERFLOW: Final = "*"


@attrs.define
class _Burst:
    """Refusals of one kind from one client (an address, or an IPv6 /64, as
    rate limits count them) within a window: the first is written, the rest
    counted."""

    since: float
    until: float
    repeated: int = 0
    last: float = 0.0
    fields: Mapping[str, object] = attrs.field(factory=dict)
    # Distinct peers of the counted refusals, at most BURST_PEERS of them.
    peers: list[str] = attrs.field(factory=list)
    more_peers: bool = False

    def count(self, fields: Mapping[str, object], peer: str | None, now: float) -> None:
        self.repeated += 1
        self.fields = fields
        self.last = now
        if peer is not None and peer not in self.peers:
            if len(self.peers) < BURST_PEERS:
                self.peers.append(peer)
            else:
                self.more_peers = True


class AuditTrail:
    """The bridge's audit trail; every method is a no-op without C{path}.

    Call L{start} before anything can emit events and L{stop} after the
    rest of the bridge has stopped; events outside that window are dropped
    (and counted, and warned about once).

    Callers must never pass a token, a child's environment or its
    arguments: what reaches these methods reaches the file.

    It is a L{Recorder}: the core reports sessions, requests and children to
    it, and to the metrics beside it (L{mcptwist.ops.record.Recorders}), never
    through it. The refusals (C{auth_failure}, C{access_refused},
    C{rate_limited}, C{ip_refused}, C{http_refused}) come only here: it
    counts them in its L{metrics}, if any, whether or not a file is written.

    The methods belong on the reactor thread (use C{callFromThread} from
    others), but the writer is locked, so a stray call from a thread is safe.
    """

    def __init__(self, config: AuditConfig, clock: IReactorTime) -> None:
        self._clock = clock
        self.publisher = LogPublisher()
        """Audit events only; add observers here to forward them elsewhere."""
        # The log_logger of the events published (they go to the publisher
        # directly, not through Logger.emit).
        self._log = Logger(namespace=NAMESPACE, observer=self.publisher)
        # Counts the refusals, whether or not a file is written.
        self.metrics: Metrics | None = None
        # Refusals repeat without limit (a client retrying a bad token): the
        # first of each kind and client in a window is written, the rest counted.
        self._refusals: dict[tuple[str, str | None], _Burst] = {}
        self._flusher = LoopingCall(self.flush_refusals)
        self._flusher.clock = clock
        # The last records written, as written (nothing else, nothing secret).
        self.tail: deque[dict[str, object]] = deque(maxlen=TAIL)
        # Sets config, enabled and the writer, which is not open until start():
        # events before then are dropped and counted.
        self._install(config, _writer_for(config))

    @property
    def recording(self) -> bool:
        """Whether sessions and requests are written (a file is)."""
        return self.enabled

    @property
    def detailed(self) -> bool:
        """Whether a request's line holds the digest of its arguments (it is written)."""
        return self.enabled

    @property
    def lost(self) -> int:
        """Events that could not be written (see L{AuditFileObserver.lost})."""
        return 0 if self._writer is None else self._writer.lost

    def start(self) -> None:
        """Open the audit file.

        @raise AuditError: if its directory does not exist or it cannot be opened.
        """
        if self._writer is None:
            return
        _open_writer(self._writer)
        self._schedule_flushes()

    def stop(self) -> None:
        """Write what is pending, sync and close the file."""
        if self._flusher.running:
            self._flusher.stop()
        self.flush_refusals(everything=True)
        if self._writer is not None:
            self._writer.close()

    def _refusal(self, event: str, fields: Mapping[str, object]) -> None:
        """Write a refusal, unless one of its kind from its client was written
        within L{REFUSAL_WINDOW}: then count it, for one line that says how many.

        The client is what rate limits count (L{rate_key}: an IPv6 /64 is one
        client), so that a host cycling through its addresses, or retrying as
        fast as it can, writes a bounded number of lines.
        """
        peer = fields.get("peer")
        peer = peer if isinstance(peer, str) else None
        key = (event, rate_key(peer))
        burst = self._refusals.get(key)
        now = self._clock.seconds()
        if burst is None and len(self._refusals) >= REFUSAL_KEYS:
            # Too many clients at once: new ones share a burst until windows end.
            key = (event, OVERFLOW)
            burst = self._refusals.get(key)
        if burst is not None:
            burst.count(fields, peer, now)
            return
        self._refusals[key] = _Burst(now, now + REFUSAL_WINDOW)
        self._emit(event, fields)

    def flush_refusals(self, everything: bool = False) -> None:
        """Write one line per burst whose window has ended: the last refusal, and
        C{repeated}: how many like it were not written, C{peers}: their distinct
        addresses (the first L{BURST_PEERS}; C{peers_more} if there were more),
        C{since} and C{until}: the first and last refusal of the window, and
        C{overflow} if the burst gathered clients beyond L{REFUSAL_KEYS}."""
        now = self._clock.seconds()
        for key, burst in list(self._refusals.items()):
            if everything or now >= burst.until:
                del self._refusals[key]
                if burst.repeated:
                    self._emit(
                        key[0],
                        {
                            **burst.fields,
                            "repeated": burst.repeated,
                            "peers": burst.peers or None,
                            "peers_more": burst.more_peers or None,
                            "since": timestamp(burst.since),
                            "until": timestamp(burst.last),
                            "overflow": True if key[1] == OVERFLOW else None,
                        },
                    )

    def reconfigure(self, config: AuditConfig) -> None:
        """Take a reloaded [audit]: another path, size or count, or none.

        @raise AuditError: if the new file cannot be opened; the old one is
            then kept.
        """
        if config == self.config:
            self.reopen()
            return
        writer = _writer_for(config)
        if writer is not None:
            _open_writer(writer)
        self.flush_refusals(everything=True)
        if self._writer is not None:
            self.publisher.removeObserver(self._writer)
            self._writer.close()
        self._install(config, writer)
        self._schedule_flushes()

    def _install(self, config: AuditConfig, writer: AuditFileObserver | None) -> None:
        """Write events with C{writer} (None: none are written), for C{config}."""
        self.config = config
        self._writer = writer
        self.enabled = writer is not None
        if writer is not None:
            self.publisher.addObserver(writer)

    def _schedule_flushes(self) -> None:
        """Flush refusal bursts every L{REFUSAL_WINDOW} while a file is written."""
        if self._writer is not None:
            if not self._flusher.running:
                self._flusher.start(REFUSAL_WINDOW, now=False)
        elif self._flusher.running:
            self._flusher.stop()

    def reopen(self) -> None:
        """Reopen the same path (on SIGHUP, after logrotate moved the file)."""
        if self._writer is not None:
            self._writer.reopen()

    def _emit(self, event: str, fields: Mapping[str, object]) -> None:
        record: dict[str, object] = {"ts": timestamp(self._clock.seconds()), "event": event}
        for key, value in fields.items():
            if value is not None:
                record[key] = value
        self.tail.append(record)
        # The event Logger.emit would build, without its validation and copies.
        self.publisher(
            {
                "audit": record,
                "log_logger": self._log,
                "log_level": LogLevel.info,
                "log_namespace": NAMESPACE,
                "log_source": None,
                "log_format": None,
                "log_time": time.time(),
            }
        )

    def recent(
        self,
        limit: int,
        server: str | None = None,
        principal: str | None = None,
        outcome: str | None = None,
        visible: Callable[[str], bool] | None = None,
    ) -> list[dict[str, object]]:
        """The last C{limit} records written, newest first, of a server (its
        C{server}, or the C{target} of an admin action), a principal, an
        outcome (L{outcome_of}); with C{visible}, only the records of the
        servers it accepts, and of no server when it accepts C{"*"}."""
        found: list[dict[str, object]] = []
        for record in reversed(self.tail):
            if len(found) >= limit:
                break
            subject = record.get("server", record.get("target"))
            if visible is not None and not visible(
                subject.partition("/")[0] if isinstance(subject, str) else "*"
            ):
                continue
            if server is not None and subject != server:
                continue
            if principal is not None and record.get("principal") != principal:
                continue
            if outcome is not None and outcome_of(record) != outcome:
                continue
            found.append(record)
        return found

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
        """A client opened an MCP session (C{initialize} answered)."""
        if not self.enabled:
            return
        self._emit(
            "session_opened",
            {
                "session": session,
                "server": server,
                "principal": principal,
                "peer": peer,
                "transport": transport,
                "protocol_version": protocol_version,
            },
        )

    def tool_event(self, event: ToolEvent) -> None:
        """Something done about a tool (see L{ToolEvent}), a core event: the
        metrics hear of it from the core too."""
        if not self.enabled:
            return
        self._emit(
            event.kind,
            {
                key: value
                for key, value in attrs.asdict(event).items()
                if key != "kind" and value not in (None, "")
            },
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
        """A session ended (C{DELETE}, idle timeout, child exit, shutdown)."""
        if not self.enabled:
            return
        self._emit(
            "session_closed",
            {
                "session": session,
                "server": server,
                "principal": principal,
                "reason": reason,
                "duration": round(duration, 3),
            },
        )

    def request_ended(self, ended: RequestEnded) -> None:
        """A request finished. Its C{arguments} are there only if its server audits them.

        Its C{status} is one of L{mcptwist.ops.metrics.STATUSES}; its
        C{error_code} is the JSON-RPC error code of an error answer.
        """
        if not self.enabled:
            return
        self._emit(
            "request",
            {
                "session": ended.session,
                "server": ended.server,
                "principal": ended.principal,
                "peer": ended.peer,
                "method": ended.method,
                "name": ended.name,
                "arg_size": ended.arg_size,
                "arg_sha256": ended.arg_sha256,
                "status": ended.status,
                "error_code": ended.error_code,
                "latency_ms": round(ended.latency_ms, 3),
                "child_pid": ended.child_pid,
                "arguments": ended.arguments,
            },
        )

    def auth_failure(self, *, peer: str | None, reason: str, route: str | None) -> None:
        """Authentication failed (no, malformed, unknown or expired credential)."""
        if self.metrics is not None:
            self.metrics.auth_failure(reason)
        if not self.enabled:
            return
        self._refusal("auth_failure", {"peer": peer, "reason": reason, "route": route})

    def access_refused(
        self, *, principal: str | None, peer: str | None, server: str | None, route: str | None
    ) -> None:
        """An authenticated principal asked for what it may not use."""
        if self.metrics is not None:
            self.metrics.access_refused()
        if not self.enabled:
            return
        self._refusal(
            "access_refused",
            {"principal": principal, "peer": peer, "server": server, "route": route},
        )

    def credential_missing(
        self, *, principal: str | None, peer: str | None, server: str, reason: str
    ) -> None:
        """A principal's child could not be started: a value it needs is missing
        (C{reason} names the key, never a value)."""
        if self.metrics is not None:
            self.metrics.access_refused()
        if not self.enabled:
            return
        self._refusal(
            "credential_missing",
            {"principal": principal, "peer": peer, "server": server, "reason": reason},
        )

    def rate_limited(
        self,
        *,
        principal: str | None,
        peer: str | None,
        server: str | None,
        scope: str,
        retry_after: float,
    ) -> None:
        """A request was refused by a rate limit or cap (C{scope} says which)."""
        if self.metrics is not None:
            self.metrics.rate_limited(scope)
        if not self.enabled:
            return
        self._refusal(
            "rate_limited",
            {
                "principal": principal,
                "peer": peer,
                "server": server,
                "scope": scope,
                "retry_after": round(retry_after, 3),
            },
        )

    def ip_refused(
        self, *, peer: str | None, listener: str | None, scope: Literal["listener", "server"]
    ) -> None:
        """A connection or request was refused by an IP allow/deny list."""
        if self.metrics is not None:
            self.metrics.ip_refused(scope)
        if not self.enabled:
            return
        self._refusal("ip_refused", {"peer": peer, "listener": listener, "scope": scope})

    def http_refused(self, *, peer: str | None, listener: str | None, reason: str) -> None:
        """A connection or request refused while it was received: too many
        connections from its address, too slow, or too large (C{reason})."""
        if self.metrics is not None:
            self.metrics.http_refused(reason)
        if not self.enabled:
            return
        self._refusal("http_refused", {"peer": peer, "listener": listener, "reason": reason})

    def admin_action(
        self,
        *,
        principal: str | None,
        peer: str | None,
        action: str,
        target: str | None,
        outcome: str,
    ) -> None:
        """An administrative call (restart a server, reload, …) and its outcome."""
        if not self.enabled:
            return
        self._emit(
            "admin_action",
            {
                "principal": principal,
                "peer": peer,
                "action": action,
                "target": target,
                "outcome": outcome,
            },
        )

    def child_spawned(self, *, server: str, pid: int | None, command: str) -> None:
        """A child started. C{command} is the program only: never args or env."""
        if not self.enabled:
            return
        self._emit("child_spawned", {"server": server, "pid": pid, "command": command})

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
        """A child ended, with its exit status or the signal that ended it
        (C{stopping}: the bridge ended it)."""
        if not self.enabled:
            return
        self._emit(
            "child_exited",
            {
                "server": server,
                "pid": pid,
                "exit_code": exit_code,
                "signal": signal,
                "reason": reason,
            },
        )

    def tls_reloaded(self, *, listener: str, outcome: str, detail: str | None) -> None:
        """A listener's certificate was re-read (C{outcome} "ok"), or did not
        load and the old one was kept (C{outcome} "refused")."""
        if not self.enabled:
            return
        self._emit("tls_reloaded", {"listener": listener, "outcome": outcome, "detail": detail})


def outcome_of(record: Mapping[str, object]) -> str | None:
    """How the event a record tells of ended: a request's status (C{ok},
    C{error}, C{timeout}, C{cancelled}); C{ok} or C{error} for an admin action
    or a certificate reload; C{refused} for a refusal; None for an event that
    has no outcome (a session opened, a child spawned)."""
    event = record.get("event")
    if event == "request":
        status = record.get("status")
        return status if isinstance(status, str) else None
    if event in _REFUSALS:
        return "refused"
    outcome = record.get("outcome")
    if isinstance(outcome, str):
        return "ok" if outcome == "ok" or outcome.startswith("ok:") else "error"
    return None
