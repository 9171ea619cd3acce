"""What the core reports of sessions, requests and children: counted by the
metrics and written by the audit trail, each told once, whichever is on."""

from __future__ import annotations

import os
from typing import Any

import attrs
import orjson
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.config.model import AuditConfig, BridgeConfig, MetricsConfig, ServerConfig
from mcptwist.mcp import jsonrpc
from mcptwist.ops.audit import AuditTrail
from mcptwist.ops.metrics import Metrics
from mcptwist.ops.record import Recorders
from mcptwist.routing.record import RequestEnded
from mcptwist.service.bridge import BridgeService

from .support.bridge import Service
from .support.messages import JSON
from .support.router import ended

INIT = jsonrpc.request(
    0,
    "initialize",
    {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t"}},
)
CALL = jsonrpc.request(1, "tools/call", {"name": "echo", "arguments": {"text": "hi"}})


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    """A sample's value (0 if it has none yet)."""
    return metrics.registry.get_sample_value(name, labels) or 0.0


class ListRecorder:
    """A recorder that keeps the name of each event it is told."""

    def __init__(self, recording: bool = True, detailed: bool = False) -> None:
        self.recording = recording
        self.detailed = detailed
        self.events: list[str] = []

    def request_ended(self, ended: RequestEnded) -> None:
        self.events.append("request_ended")

    def session_opened(self, **fields: Any) -> None:
        self.events.append("session_opened")

    def session_closed(self, **fields: Any) -> None:
        self.events.append("session_closed")

    def child_spawned(self, **fields: Any) -> None:
        self.events.append("child_spawned")

    def child_exited(self, **fields: Any) -> None:
        self.events.append("child_exited")


class RecordersTests(SynchronousTestCase):
    def test_each_is_told_once(self) -> None:
        first, second = ListRecorder(), ListRecorder()
        both = Recorders(first, second)
        both.child_spawned(server="s", pid=1, command="npx")
        both.session_opened(
            session="a",
            server="s",
            principal=None,
            peer=None,
            transport="sse",
            protocol_version=None,
        )
        both.request_ended(ended())
        both.session_closed(session="a", server="s", principal=None, reason="r", duration=1.0)
        both.child_exited(server="s", pid=1, exit_code=0, signal=None, reason="r")
        events = ["child_spawned", "session_opened", "request_ended", "session_closed"]
        self.assertEqual(first.events, [*events, "child_exited"])
        self.assertEqual(second.events, first.events)

    def test_any_of_them_decides(self) -> None:
        """Recording if any records; the digest is taken if any wants it."""
        idle, counting, writing = (
            ListRecorder(recording=False),
            ListRecorder(),
            ListRecorder(detailed=True),
        )
        self.assertFalse(Recorders(idle, idle).recording)
        self.assertTrue(Recorders(idle, counting).recording)
        self.assertFalse(Recorders(idle, counting).detailed)
        self.assertTrue(Recorders(counting, writing).detailed)

    def test_an_audit_trail_without_a_file(self) -> None:
        """It records nothing: beside the metrics, the digest is not taken."""
        trail = AuditTrail(AuditConfig(), Clock())
        self.assertFalse(trail.recording)
        both = Recorders(trail, Metrics())
        self.assertTrue(both.recording)
        self.assertFalse(both.detailed)


class BridgeTests(SynchronousTestCase):
    """Through the service: each request counted once and written once."""

    def start(self, audit: bool, metrics: bool = True) -> BridgeService:
        directory = self.mktemp()
        os.makedirs(directory)
        self.audit_path = os.path.join(directory, "audit.jsonl")
        self.config = BridgeConfig(
            servers={"s": ServerConfig(name="s", command="fake")},
            listeners=(),
            audit=AuditConfig(path=self.audit_path if audit else None),
            metrics=MetricsConfig(enabled=metrics),
        )
        self.bridge = Service(self, self.config)
        return self.bridge.service

    def session(self) -> str:
        status, headers, _ = self.bridge.exchange("POST", "/servers/s/mcp", INIT, JSON)
        self.assertEqual(status, 200)
        [session_id] = headers.getRawHeaders("mcp-session-id")
        return str(session_id)

    def call(self, session_id: str) -> None:
        status, _, body = self.bridge.exchange(
            "POST",
            "/servers/s/mcp",
            CALL,
            {**JSON, "mcp-session-id": session_id},
        )
        self.assertEqual((status, "result" in body), (200, True))

    def calls_counted(self, service: BridgeService) -> float:
        assert service.metrics is not None
        return sample(
            service.metrics, "mcptwist_requests_total", server="s", method="tools/call", status="ok"
        )

    def written(self, event: str) -> list[dict[str, Any]]:
        if not os.path.exists(self.audit_path):
            return []
        with open(self.audit_path, "rb") as f:
            return [e for e in map(orjson.loads, f.read().splitlines()) if e["event"] == event]

    def test_counted_once_and_written_once(self) -> None:
        service = self.start(audit=True)
        self.call(self.session())
        assert service.metrics is not None
        self.assertEqual(self.calls_counted(service), 1.0)
        self.assertEqual(
            [e["method"] for e in self.written("request")], ["initialize", "tools/call"]
        )
        opened = "mcptwist_sessions_opened_total"
        self.assertEqual(sample(service.metrics, opened, server="s", transport="streamable"), 1.0)
        self.assertEqual(len(self.written("session_opened")), 1)
        self.assertEqual(sample(service.metrics, "mcptwist_child_spawns_total", server="s"), 1.0)
        self.assertEqual(len(self.written("child_spawned")), 1)

    def test_counted_without_an_audit_file(self) -> None:
        service = self.start(audit=False)
        self.call(self.session())
        self.assertEqual(self.calls_counted(service), 1.0)
        assert service.metrics is not None
        self.assertEqual(sample(service.metrics, "mcptwist_child_spawns_total", server="s"), 1.0)
        self.assertFalse(os.path.exists(self.audit_path))

    def test_a_reload_that_gives_a_file(self) -> None:
        """The requests of sessions already open are written from then on, and
        those of new ones."""
        service = self.start(audit=False)
        before = self.session()
        self.call(before)
        reloaded = attrs.evolve(self.config, audit=AuditConfig(path=self.audit_path))
        self.successResultOf(service.apply(reloaded))
        self.call(before)
        self.call(self.session())
        self.assertEqual(
            [(e["session"] == before, e["method"]) for e in self.written("request")],
            [(True, "tools/call"), (False, "initialize"), (False, "tools/call")],
        )
        self.assertEqual(self.calls_counted(service), 3.0)

    def test_a_reload_that_gives_a_file_without_metrics(self) -> None:
        """Without metrics nothing is recorded until then; new sessions are after."""
        service = self.start(audit=False, metrics=False)
        self.assertIsNone(service.metrics)
        self.call(self.session())
        reloaded = attrs.evolve(self.config, audit=AuditConfig(path=self.audit_path))
        self.successResultOf(service.apply(reloaded))
        self.call(self.session())
        self.assertEqual(
            [e["method"] for e in self.written("request")], ["initialize", "tools/call"]
        )
