"""The path of one request and its answer through the rooms.

docs/architecture.md draws it: a C{tools/call} POSTed to
C{/servers/NAME/mcp} enters each room at most once on the way in and once on
the way out. Here the call stack is recorded on every call made while the
request travels. A room may call down and come back (the router asking the
supervisor for its child's pid, the gate asking security who is calling),
but a room entered again from a room below it (the message come back up into
a room it already passed) fails the test.
"""

from __future__ import annotations

import sys
from types import FrameType, TracebackType
from typing import Any, Final

from twisted.trial.unittest import SynchronousTestCase

from mcptwist.config.model import BridgeConfig, ServerConfig
from mcptwist.mcp import jsonrpc

from .support.bridge import Service
from .support.messages import JSON

# The layers of setup.cfg's contract, lowest first.
ROOMS: Final = ("mcp", "config", "security", "child", "routing", "ops", "web", "service")


def _room(frame: FrameType) -> str | None:
    parts = frame.f_globals.get("__name__", "").split(".")
    if len(parts) > 2 and parts[0] == "mcptwist" and parts[1] in ROOMS:
        return parts[1]
    return None


def _reentered(stack: tuple[str, ...]) -> bool:
    return any(
        stack[j] in stack[:j] and ROOMS.index(stack[j - 1]) < ROOMS.index(stack[j])
        for j in range(1, len(stack))
    )


class Passages:
    """The rooms on the call stack at every call into the bridge's code, in
    the order they were entered (a run of frames of one room counts once)."""

    def __init__(self) -> None:
        self.stacks: set[tuple[str, ...]] = set()

    def __enter__(self) -> Passages:
        self._previous = sys.getprofile()
        sys.setprofile(self._profile)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        sys.setprofile(self._previous)

    def _profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event != "call" or _room(frame) is None:
            return
        rooms: list[str] = []
        current: FrameType | None = frame
        while current is not None:
            room = _room(current)
            if room is not None and (not rooms or rooms[-1] != room):
                rooms.append(room)
            current = current.f_back
        self.stacks.add(tuple(reversed(rooms)))

    def reentered(self) -> list[tuple[str, ...]]:
        """The stacks on which a room was entered again from a room below it."""
        return sorted(s for s in self.stacks if _reentered(s))

    def reaches(self, *path: str) -> bool:
        """Whether some stack passes through these rooms in this order, one calling the next."""
        return any(s[i : i + len(path)] == path for s in self.stacks for i in range(len(s)))


class FlowTests(SynchronousTestCase):
    def test_a_call_and_its_answer_pass_each_room_once(self) -> None:
        bridge = Service(self, BridgeConfig(servers={"s": ServerConfig(name="s", command="fake")}))
        session = bridge.open_session()
        child = bridge.reactor.child
        child.hold = True
        call = jsonrpc.request(7, "tools/call", {"name": "echo", "arguments": {"x": 1}})
        with Passages() as inbound:
            d = bridge.client.request(
                "POST",
                "http://127.0.0.1/servers/s/mcp",
                data=jsonrpc.dumps(call),
                headers={**JSON, "mcp-session-id": session},
            )
            bridge.client.flush()
        [held] = child.held
        with Passages() as outbound:
            child.answer(held)
            bridge.client.flush()
        response = self.successResultOf(d)
        self.assertEqual(bridge.json(response)["id"], 7)

        self.assertEqual(inbound.reentered(), [])
        self.assertEqual(outbound.reentered(), [])
        # The request goes down through the rooms to the child's stdin ...
        self.assertTrue(inbound.reaches("web", "routing", "child"), sorted(inbound.stacks))
        self.assertFalse(inbound.reaches("child", "routing"))
        # ... and the answer comes back up from its stdout, reported once on the way.
        self.assertTrue(outbound.reaches("child", "routing", "web"), sorted(outbound.stacks))
        self.assertTrue(outbound.reaches("child", "routing", "ops"), sorted(outbound.stacks))
        self.assertFalse(outbound.reaches("web", "routing"))

    def test_a_room_entered_again_from_below_is_seen(self) -> None:
        """The check above can fail: a stack that comes back up into a room
        is reported; one that calls down and returns is not."""
        passages = Passages()
        passages.stacks = {
            ("web", "routing", "child"),
            ("child", "routing", "child"),
            ("web", "routing", "web"),
            ("child", "routing", "web", "routing"),
            ("web", "routing", "child", "routing"),
        }
        self.assertEqual(
            passages.reentered(),
            [("web", "routing", "child", "routing"), ("web", "routing", "web")],
        )
