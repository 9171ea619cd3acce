# -*- test-case-name: tests.test_cluster -*-
"""The cluster's keys, and the ids and tokens they make verifiable on every
node: session ids (C{Mcp-Session-Id}, the legacy SSE C{session_id}) and
2026-07-28 request states that name the node holding them.

A session id is C{NODE.RANDOM.MAC}: a balancer routes on its first field
without a lookup, and a node tells a genuine id of another node from a
forged or altered one (which is simply unknown). The first key signs; every
key verifies, so keys rotate without a flag day: add the new key second on
every node, then move it first, then drop the old one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from typing import Final

# Each kind of token has a key of its own, derived from each cluster key,
# so that one kind can never pass for another.
SESSION: Final = b"mcptwist session id"
STATE: Final = b"mcptwist request state"
HOP: Final = b"mcptwist node hop"
# The MAC a session id carries: 128 bits.
SESSION_MAC_BYTES: Final = 16
MAX_SESSION_ID: Final = 200


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64(text: str) -> bytes:
    """Strict: one spelling per value (no padding, no stray low bits)."""
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64(data) != text:
        raise ValueError("not canonical base64url")
    return data


class ClusterKeys:
    """The cluster's keys, each derived once per purpose."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("a cluster needs at least one key")
        self._keys = {
            purpose: [hmac.new(key, purpose, hashlib.sha256).digest() for key in keys]
            for purpose in (SESSION, STATE, HOP)
        }

    def mac(self, purpose: bytes, data: bytes) -> bytes:
        """The MAC of C{data} with the signing (first) key."""
        return hmac.new(self._keys[purpose][0], data, hashlib.sha256).digest()

    def check(self, purpose: bytes, data: bytes, given: bytes, size: int = 32) -> bool:
        """Whether C{given} is the MAC (its first C{size} bytes) of C{data}
        under any of the keys; constant time for each."""
        ok = False
        for key in self._keys[purpose]:
            expected = hmac.new(key, data, hashlib.sha256).digest()[:size]
            ok |= hmac.compare_digest(expected, given)
        return ok


def cluster_keys(keys: Sequence[bytes] | None) -> ClusterKeys | None:
    return ClusterKeys(keys) if keys else None


def _unflagged(size: int) -> str:
    """A random URL-safe id that does not begin with C{-}: an operator pastes
    session ids on command lines (C{mcptwist admin close ID}), where a
    leading dash reads as an option."""
    while True:
        text = secrets.token_urlsafe(size)
        if not text.startswith("-"):
            return text


class SessionIds:
    """Makes session ids, and tells which node made one.

    Without a cluster (C{node} None) an id is 32 random bytes, as it always
    was; with one, C{NODE.RANDOM.MAC}.
    """

    def __init__(self, node: str | None = None, keys: ClusterKeys | None = None) -> None:
        if (node is None) != (keys is None):
            raise ValueError("a node id and the cluster's keys go together")
        self.node = node
        self._keys = keys

    def rekey(self, keys: ClusterKeys) -> None:
        """New keys (a rotation): ids made before verify while their key is listed."""
        if self._keys is not None:
            self._keys = keys

    def new(self) -> str:
        random = secrets.token_urlsafe(24)
        if self.node is None or self._keys is None:
            return _unflagged(32)
        named = f"{self.node}.{random}"
        mac = self._keys.mac(SESSION, named.encode())[:SESSION_MAC_BYTES]
        return f"{named}.{b64(mac)}"

    def owner(self, session_id: str) -> str | None:
        """The node that made this id, if a node of this cluster made it
        (None: forged, altered, or not a cluster's id)."""
        if self._keys is None or len(session_id) > MAX_SESSION_ID or session_id.count(".") != 2:
            return None
        named, _, mac = session_id.rpartition(".")
        node = named.partition(".")[0]
        try:
            given = unb64(mac)
        except ValueError:
            return None
        if len(given) != SESSION_MAC_BYTES:
            return None
        if not self._keys.check(SESSION, named.encode(), given, SESSION_MAC_BYTES):
            return None
        return node
