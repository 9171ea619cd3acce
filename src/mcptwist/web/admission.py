# -*- test-case-name: tests.test_access -*-
"""What the gate found out about a request, kept on the request itself.

The L{Gate<mcptwist.web.app.Gate>} keeps an L{Admission} on the request
(L{admit}) when it first judges it (from its head, before the body is
read), and everything that answers the request reads it back with
L{admission_of} (a plain attribute: it is read several times a request).
"""

from __future__ import annotations

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from mcptwist.security.auth import ANONYMOUS, Principal
from mcptwist.security.ratelimit import Refusal

log = Logger(namespace="mcptwist.web")


@attrs.define(eq=False)
class Admission:
    """A request past the gate's checks that come before credentials: what
    they found, and who it is once authentication has settled."""

    # The client's address (None for a Unix-socket peer).
    ip: str | None
    # The path split on "/" (see the gate's _segments).
    parts: list[bytes]
    # On an operator's route (the admin API, metrics).
    operator: bool = False
    # None while authentication runs; a Failure when it refused.
    who: Principal | Failure | None = None
    # Authorised (rate limits charged) already: the server its path names.
    checked: bool = False
    server: str | None = None
    # The access rules it was judged under (AccessControl.generation).
    generation: int = 0
    # With a cluster's shared rate limits: each verdict, by what was charged.
    # None until the first is asked.
    verdicts: dict[str, Verdict] | None = None
    _waiting: list[Deferred[None]] = attrs.field(factory=list)

    @property
    def principal(self) -> Principal:
        """Who made the request (anonymous until authenticated)."""
        who = self.who
        return who if isinstance(who, Principal) else ANONYMOUS

    def settle(self, result: Principal | Failure) -> None:
        """Authentication's outcome (its Deferred's last callback)."""
        self.who = result
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def settled(self) -> Deferred[None]:
        """A Deferred that fires once L{who} is known."""
        d: Deferred[None] = Deferred()
        if self.who is not None:
            d.callback(None)
        else:
            self._waiting.append(d)
        return d


class Verdict:
    """A cluster's shared rate limits on one charge of a request: waiting for
    the store, then the refusal or None. However often the request is
    judged (its head, then its body), the store is asked once."""

    def __init__(self, decision: Deferred[Refusal | None]) -> None:
        self.known = False
        self.refusal: Refusal | None = None
        self._waiting: list[Deferred[None]] = []
        decision.addCallbacks(self._decided, self._failed)

    def _decided(self, refusal: Refusal | None) -> None:
        self.known = True
        self.refusal = refusal
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def _failed(self, failure: Failure) -> None:
        # RateLimiter.decide answers even when the store fails: this is a bug.
        log.failure("while deciding a shared rate limit; the request is let through", failure)
        self._decided(None)

    def ready(self) -> Deferred[None]:
        """A Deferred that fires once the verdict is known."""
        d: Deferred[None] = Deferred()
        if self.known:
            d.callback(None)
        else:
            self._waiting.append(d)
        return d


def admit(request: Request, admission: Admission) -> None:
    """Keep the gate's admission on the request."""
    request.mcptwist_admission = admission  # type: ignore[attr-defined]


def admission_of(request: Request) -> Admission | None:
    """The gate's admission of this request; None if no gate judged it."""
    admission: Admission | None = getattr(request, "mcptwist_admission", None)
    return admission


def principal_of(request: Request) -> Principal:
    """Who made this request (anonymous if no gate judged it)."""
    admission = admission_of(request)
    return admission.principal if admission is not None else ANONYMOUS


def principal_id(request: Request) -> str:
    return principal_of(request).id


def peer_of(request: Request) -> str | None:
    """The client's address as the gate found it (None for a Unix-socket
    peer, or if no gate judged the request)."""
    admission = admission_of(request)
    return admission.ip if admission is not None else None


__all__ = [
    "Admission",
    "Verdict",
    "admission_of",
    "admit",
    "peer_of",
    "principal_id",
    "principal_of",
]
