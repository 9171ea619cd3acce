# -*- test-case-name: tests.test_store -*-
"""The cluster's Redis store: commands bounded by redis_timeout, up and down
(logged once each way, failing fast while down), the probe that brings it
back, the node registry's records, and the Redis URL's parts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.cluster.store import (
    ANNOUNCE,
    LIMIT,
    NODE,
    NODES,
    TAKE,
    Bucket,
    RedisAddress,
    RedisStore,
)
from mcptwist.config.model import ClusterConfig

SRC = str(Path(__file__).resolve().parents[1] / "src")
PASSWORD = "s3cret-pa55word"


class FakeClient:
    """A Redis connection pool whose answers a test gives by hand."""

    def __init__(self) -> None:
        self.is_connected = True
        self.sent: list[tuple[str, Any, Any]] = []
        self.pending: list[Deferred[Any]] = []
        self.disconnected = False
        self.answer_ping = True

    def connected(self) -> bool:
        return self.is_connected

    def eval(self, script: str, keys: list[str], args: list[str]) -> Deferred[Any]:
        self.sent.append((script, keys, args))
        d: Deferred[Any] = Deferred()
        self.pending.append(d)
        return d

    def ping(self) -> Deferred[Any]:
        self.sent.append(("PING", None, None))
        if self.answer_ping:
            return succeed("PONG")
        d: Deferred[Any] = Deferred()
        self.pending.append(d)
        return d

    def disconnect(self) -> Deferred[None]:
        self.disconnected = True
        return succeed(None)


def config(**kwargs: Any) -> ClusterConfig:
    return ClusterConfig(
        node_id="n1",
        keys=(b"k" * 32,),
        redis=f"redis://:{PASSWORD}@127.0.0.1:6390/2",
        advertise="http://127.0.0.1:8080",
        **kwargs,
    )


class StoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.client = FakeClient()
        self.store = RedisStore(config(), self.clock, lambda: self.client)

    def start(self) -> list[Any]:
        with capturedLogs() as events:
            self.store.start()
        return events

    def test_up_once_probed(self) -> None:
        """Down until the first PING is answered, then up, said once."""
        self.assertFalse(self.store.up)
        events = self.start()
        self.assertTrue(self.store.up)
        self.assertEqual(self.client.sent, [("PING", None, None)])
        self.assertEqual(sum("answers" in e["log_format"] for e in events), 1)

    def test_take(self) -> None:
        """A take is one script over every bucket; its waits come back as floats."""
        self.start()
        answers: list[Any] = []
        self.store.take(
            [Bucket("principal:alice", 0.5, 10), Bucket("ip:10.0.0.1", 2, 4)], cost=2, paid=1
        ).addCallback(answers.append)
        script, keys, args = self.client.sent[-1]
        self.assertEqual(script, TAKE)
        self.assertEqual(keys, [LIMIT + "principal:alice", LIMIT + "ip:10.0.0.1"])
        self.assertEqual(args, ["2", "1", "1", "0.5", "10.0", "2.0", "4.0"])
        self.client.pending[-1].callback(["0", "1.25"])
        self.assertEqual(answers, [(0.0, 1.25)])

    def test_timeout_marks_down_once(self) -> None:
        """A command unanswered after redis_timeout is "unavailable" and marks
        Redis down, logged once (without the password); while down nothing
        is sent and each take is unavailable at once."""
        self.start()
        told: list[bool] = []
        self.store.watch(told.append)
        answers: list[Any] = []
        with capturedLogs() as events:
            self.store.take([Bucket("ip:x", 1, 1)]).addCallback(answers.append)
            self.clock.advance(0.2)
            self.assertEqual(answers, [])
            self.clock.advance(0.05)
            self.assertEqual(answers, [None])
            self.assertFalse(self.store.up)
            sent = len(self.client.sent)
            for _ in range(3):
                self.store.take([Bucket("ip:x", 1, 1)]).addCallback(answers.append)
            self.store.take([Bucket("ip:x", 1, 1)]).addCallback(answers.append)
        self.assertEqual(answers, [None] * 5)
        self.assertEqual(len(self.client.sent), sent)
        self.assertEqual(dict(self.store.fallbacks), {"down": 4, "timeout": 1, "error": 0})
        self.assertEqual(told, [False])
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        text = warnings[0]["log_format"].format(**warnings[0])
        self.assertIn("127.0.0.1:6390/2", text)
        self.assertIn("redis_timeout", text)
        self.assertNotIn(PASSWORD, repr(events))

    def test_error_marks_down(self) -> None:
        """A command that fails (the connection was lost) is unavailable too."""
        self.start()
        answers: list[Any] = []
        self.store.take([Bucket("ip:x", 1, 1)]).addCallback(answers.append)
        with capturedLogs():
            self.client.pending[-1].errback(ConnectionError("Lost connection"))
        self.assertEqual(answers, [None])
        self.assertFalse(self.store.up)
        self.assertEqual(self.store.fallbacks["error"], 1)

    def test_recovery(self) -> None:
        """While down the probe sends nothing over no connection; once one is
        up, a PING answered brings the store back (watchers told, said once)."""
        self.start()
        told: list[bool] = []
        self.store.watch(told.append)
        self.client.is_connected = False
        with capturedLogs() as events:
            self.clock.advance(1)
            self.assertFalse(self.store.up)
            sent = len(self.client.sent)
            self.clock.advance(5)
            self.assertEqual(len(self.client.sent), sent)
            self.client.is_connected = True
            self.clock.advance(1)
        self.assertTrue(self.store.up)
        self.assertEqual(told, [False, True])
        self.assertEqual([e["log_level"] for e in events], [LogLevel.warn, LogLevel.info])

    def test_unanswered_probe(self) -> None:
        """A PING that gets no answer marks the store down; one probe at a time."""
        self.start()
        self.client.answer_ping = False
        with capturedLogs():
            self.clock.advance(1)
            self.clock.advance(0.2)
            self.assertTrue(self.store.up)
            self.assertEqual(len(self.client.pending), 1)
            self.clock.advance(0.05)
        self.assertFalse(self.store.up)

    def test_first_probe_fails(self) -> None:
        """Redis unreachable from the start: the first PING waits for a
        connection (up to the connection timeout), then it is said once,
        however long it lasts."""
        self.client.is_connected = False
        self.client.answer_ping = False
        with capturedLogs() as events:
            self.store.start()
            self.clock.advance(0.9)
            self.assertEqual(events, [])
            self.clock.pump([0.1] + [1] * 30)
        self.assertFalse(self.store.up)
        self.assertEqual(len(events), 1)
        self.assertEqual(len(self.client.pending), 1)

    def test_first_probe_waits_for_the_connection(self) -> None:
        """The pool connects after the store starts: up as soon as the first
        PING is answered, with nothing said of an outage."""
        self.client.is_connected = False
        self.client.answer_ping = False
        with capturedLogs() as events:
            self.store.start()
            self.clock.advance(0.1)
            self.client.pending[0].callback("PONG")
        self.assertTrue(self.store.up)
        self.assertEqual([e["log_level"] for e in events], [LogLevel.info])

    def test_registry(self) -> None:
        """A node's record is written with its TTL in ms and read back by id;
        a record that is not JSON is left out."""
        self.start()
        written: list[bool] = []
        self.store.announce("n1", {"node_id": "n1", "url": "http://a"}, 10).addCallback(
            written.append
        )
        script, keys, args = self.client.sent[-1]
        self.assertEqual((script, keys), (ANNOUNCE, [NODES, NODE + "n1"]))
        self.assertEqual(json.loads(args[1]), {"node_id": "n1", "url": "http://a"})
        self.assertEqual((args[0], args[2]), ("n1", "10000"))
        self.client.pending[-1].callback(1)
        self.assertEqual(written, [True])
        found: list[Any] = []
        self.store.nodes().addCallback(found.append)
        with capturedLogs():
            self.client.pending[-1].callback(["n1", '{"node_id": "n1"}', "n2", "{nope"])
        self.assertEqual(found, [{"n1": {"node_id": "n1"}}])

    def test_down_registry(self) -> None:
        """While down, the registry answers at once: nothing written, no nodes."""
        answers: list[Any] = []
        self.store.announce("n1", {}, 10).addCallback(answers.append)
        self.store.withdraw("n1").addCallback(answers.append)
        self.store.nodes().addCallback(answers.append)
        self.assertEqual(answers, [False, False, None])
        self.assertEqual(self.client.sent, [])

    def test_stop(self) -> None:
        """Stopping closes the connections and ends the probes."""
        self.start()
        self.store.stop()
        self.assertTrue(self.client.disconnected)
        self.assertFalse(self.store.up)
        self.clock.advance(5)
        self.assertEqual(len(self.client.sent), 1)


class AddressTests(SynchronousTestCase):
    def test_parts(self) -> None:
        address = RedisAddress.parse("redis://:p%40ss@redis.example:6380/3")
        self.assertEqual(
            (address.host, address.port, address.db, address.password),
            ("redis.example", 6380, 3, "p@ss"),
        )
        self.assertEqual(str(address), "redis.example:6380/3")
        self.assertNotIn("p@ss", repr(address))

    def test_defaults(self) -> None:
        address = RedisAddress.parse("redis://[::1]")
        self.assertEqual((address.host, address.port, address.db), ("::1", 6379, None))
        self.assertEqual(str(address), "[::1]:6379/0")

    @given(
        st.text("abcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=", min_size=1),
        st.integers(1, 65535),
        st.integers(0, 15),
    )
    def test_password_never_shown(self, password: str, port: int, db: int) -> None:
        address = RedisAddress.parse(f"redis://:{password}@h:{port}/{db}")
        self.assertEqual(address.password, password)
        self.assertEqual(str(address), f"h:{port}/{db}")


class ImportTests(SynchronousTestCase):
    def test_not_imported_by_default(self) -> None:
        """The bridge's own modules load without txredisapi: only a store
        that connects imports it."""
        code = (
            "import sys, mcptwist.tap, mcptwist.service.bridge, mcptwist.cluster.store; "
            "print('txredisapi' in sys.modules)"
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": SRC},
        )
        self.assertEqual(out.stdout.strip(), "False")
