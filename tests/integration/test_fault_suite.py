"""The fault suite of "make the core fast and unbreakable".

Every test runs the real daemon with real children (C{fault_fixture.py}, a
stdio MCP server that misbehaves on request) and real clients, and checks
the same things afterwards:

  - the bridge stays up: C{GET /health} answers 200;
  - memory stays bounded: the growth of the bridge's VmRSS is below a bound
    stated in each test;
  - nothing hangs: every client call is bounded and must return within a
    stated time (an answer, a JSON-RPC error or a clean close);
  - no response reaches the wrong client: clients reuse the same request ids
    with arguments of their own, and every answer is checked;
  - nothing leaks: the bridge's open file descriptors and its descendant
    processes come back to what they were at a quiet moment before.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from twisted.python import log
from twisted.trial.unittest import SynchronousTestCase

from . import fault_support as fs
from . import harness as h
from .fault_support import Baseline, LegacyClient, StreamableClient

PROMPT = 3.0  # seconds within which a caller must hear of a fault
JSON_ONLY = {"Accept": "application/json", "Content-Type": "application/json"}


def report(text: str) -> None:
    """Measurements worth keeping: into trial's log (_trial_temp/test.log)."""
    log.msg(f"fault suite: {text}")


def run_async(coroutine: Any, timeout: float) -> Any:
    """Run a scenario in its own event loop, bounded as a whole."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


async def poll(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Await a blocking predicate (run in a thread) until it holds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(predicate)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.05)


async def timed(coroutine: Any) -> tuple[Any, float]:
    """The outcome of a coroutine (or the exception it raised) and when it ended."""
    try:
        outcome = await coroutine
    except Exception as e:
        outcome = e
    return outcome, time.monotonic()


def raw_session(bridge: h.Bridge, name: str, version: str = fs.PROTOCOL) -> dict[str, str]:
    """A Streamable HTTP session made with urllib; its request headers (JSON answers)."""
    message = fs.initialize(version=version)
    code, headers, body = h.http("POST", bridge.mcp_url(name), message, JSON_ONLY)
    assert code == 200, (code, body)
    session = {**JSON_ONLY, "Mcp-Session-Id": headers["mcp-session-id"]}
    code, _, body = h.http("POST", bridge.mcp_url(name), fs.INITIALIZED, session)
    assert code == 202, (code, body)
    return session


def raw_call(
    bridge: h.Bridge, name: str, session: dict[str, str], request_id: Any, tool: str, args: Any
) -> dict[str, Any]:
    code, headers, body = h.http(
        "POST", bridge.mcp_url(name), fs.tool_call(request_id, tool, args), session, timeout=30
    )
    assert code == 200, (code, body)
    [message] = h.jsonrpc_body(headers, body)
    return message


def warm_up(bridge: h.Bridge, name: str) -> None:
    """One session, one call, then DELETE: the bridge has served every kind of request."""
    session = raw_session(bridge, name)
    answer = raw_call(bridge, name, session, 1, "echo", {"message": "warm"})
    assert fs.text_of(answer) == "Echo: warm", answer
    code, _, body = h.http("DELETE", bridge.mcp_url(name), None, session)
    assert code == 200, (code, body)


class KillUnderLoadTests(SynchronousTestCase):
    """SIGKILL the child while 50 calls from five sessions are in flight."""

    def test_sigkill_during_50_concurrent_calls(self) -> None:
        bridge = h.start_bridge(self, fs.fixture_server("fx") + fs.restart_policy("fx"))
        url = bridge.mcp_url("fx")
        warm_up(bridge, "fx")
        baseline = Baseline.take(bridge)
        old_pid = bridge.status("fx")["pid"]

        async def scenario() -> None:
            async with fs.new_http() as http:
                clients: list[Any] = [
                    await StreamableClient(http, url, sse=True).open(),
                    await StreamableClient(http, url, sse=True).open(),
                    await StreamableClient(http, url, sse=False).open(),
                    await LegacyClient(http, bridge.base, "fx").open(),
                    await LegacyClient(http, bridge.base, "fx").open(),
                ]
                # Every client uses the ids 1..10; the arguments name the caller.
                calls = [
                    timed(c.call(k, "sleep", {"seconds": 60, "message": f"{i}-{k}"}, 30))
                    for i, c in enumerate(clients)
                    for k in range(1, 11)
                ]
                tasks = [asyncio.ensure_future(call) for call in calls]
                await poll(lambda: bridge.status("fx")["in_flight"] == 50, 20, "50 calls in flight")
                killed_at = time.monotonic()
                os.kill(old_pid, signal.SIGKILL)
                outcomes = await asyncio.gather(*tasks)
                for n, (outcome, ended) in enumerate(outcomes):
                    i, k = divmod(n, 10)
                    self.assertIsInstance(outcome, dict, f"client {i} call {k + 1}: {outcome!r}")
                    self.assertEqual(outcome["id"], k + 1)
                    error = outcome.get("error")
                    self.assertIsNotNone(error, f"client {i} call {k + 1}: {outcome}")
                    self.assertEqual(error["code"], -32000)
                    self.assertIn("killed by SIGKILL", error["message"])
                    self.assertLess(ended - killed_at, PROMPT, f"client {i} call {k + 1} was late")
                # The child comes back, and 50 calls work again, each answered to its caller.
                await poll(
                    lambda: (
                        bridge.status("fx")["state"] == "running"
                        and bridge.status("fx")["pid"] not in (None, old_pid)
                    ),
                    20,
                    "a new child",
                )
                again = await asyncio.gather(
                    *(
                        c.call(k, "echo", {"message": f"{i}-{k}"}, 20)
                        for i, c in enumerate(clients)
                        for k in range(1, 11)
                    )
                )
                for n, answer in enumerate(again):
                    i, k = divmod(n, 10)
                    self.assertEqual(fs.text_of(answer), f"Echo: {i}-{k + 1}")
                for c in clients:
                    self.assertEqual(c.strays, [], "answers that were not asked for")
                for c in clients:
                    if isinstance(c, LegacyClient):
                        await c.close()
                    else:
                        self.assertEqual(await c.delete(), 200)

        run_async(scenario(), 90)
        status = bridge.status("fx")
        self.assertEqual((status["restarts"], status["last_exit"]), (1, "killed by SIGKILL"))
        h.wait_for(lambda: h.process_state(old_pid) is None, 5, "the killed child to be reaped")
        h.wait_for(lambda: fs.total_sessions(bridge) == 0, 10, "no session left")
        baseline.check(self, bridge, rss_bound_mib=20, descendants={status["pid"]})


class CrashLoopTests(SynchronousTestCase):
    """A child that exits at once, forever: the breaker trips, cool-downs stay bounded."""

    def test_exit_at_once(self) -> None:
        cooldown = 1.0
        bridge = h.start_bridge(
            self,
            fs.fixture_server("crashy", "--exit-at-once")
            + fs.restart_policy(
                "crashy",
                initial_delay=0.05,
                max_delay=0.2,
                crash_limit=4,
                crash_window=30,
                cooldown=cooldown,
            )
            + fs.fixture_server("fx"),
        )
        first_failed = bridge.wait_state("crashy", "failed", timeout=10)
        started = time.monotonic()
        self.assertEqual(first_failed["restarts"], 3)  # crash_limit 4: four attempts
        self.assertIsNone(first_failed["pid"])
        self.assertEqual(first_failed["last_exit"], "exited with code 3")
        self.assertIn("fault_fixture: exiting at once", first_failed["stderr"])
        code, body = fs.health(bridge)
        self.assertEqual(code, 503)
        self.assertEqual(list(body["servers"]), ["crashy"])
        baseline = Baseline.take(bridge)
        fx_pid = bridge.status("fx")["pid"]
        self.assertEqual(baseline.descendants, {fx_pid})

        # While it loops through cool-downs, every client hears of it promptly.
        answers = 0
        while time.monotonic() - started < 5 * cooldown:
            asked = time.monotonic()
            code, headers, body = h.http(
                "POST", bridge.mcp_url("crashy"), fs.initialize(), JSON_ONLY, timeout=10
            )
            self.assertLess(time.monotonic() - asked, PROMPT)
            self.assertEqual(code, 200, body)
            [message] = h.jsonrpc_body(headers, body)
            self.assertEqual(message["error"]["code"], -32000, message)
            self.assertIn("crashy", message["error"]["message"])
            self.assertNotIn("mcp-session-id", headers)
            answers += 1
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        # Each cool-down allows crash_limit - 1 more restarts, no more.
        restarts = bridge.status("crashy")["restarts"]
        cycles = 1 + int(elapsed / cooldown) + 1
        self.assertGreater(restarts, 3, "the breaker never tried again after its cool-down")
        self.assertLessEqual(restarts, 3 * cycles, f"{restarts} restarts in {elapsed:.1f}s")
        self.assertEqual(
            raw_call(bridge, "fx", raw_session(bridge, "fx"), 1, "echo", {"message": "ok"})[
                "result"
            ]["content"][0]["text"],
            "Echo: ok",
        )
        # Dozens of spawns later, no pipe, process or session is left over (measured
        # while the server rests in "failed", as the baseline was).
        self.assertGreater(answers, 10)
        self.assertEqual(fs.servers_status(bridge)["crashy"]["sessions"], 0)
        code, body = fs.health(bridge)
        self.assertEqual((code, list(body["servers"])), (503, ["crashy"]))
        h.wait_for(
            lambda: (
                bridge.status("crashy")["state"] == "failed"
                and fs.fd_count(bridge.pid) <= baseline.fds
                and set(bridge.children()) == {fx_pid}
            ),
            10,
            f"crashy failed again with {baseline.fds} fds and only fx's child "
            f"(fds now {fs.fd_targets(bridge.pid)}, before {baseline.fd_targets})",
        )
        bridge.assert_no_zombies()
        grown = (fs.rss_kib(bridge.pid) - baseline.rss_kib) / 1024
        self.assertLess(grown, 10, f"RSS grew {grown:.1f} MiB over the crash loop")


STDOUT_ABUSE = 'max_message_size = "64KiB"\nrequest_timeout = 8\n'


class StdoutAbuseTests(SynchronousTestCase):
    """Garbage, lines split across writes, oversize lines, wrongly typed notifications."""

    def setUp(self) -> None:
        self.bridge = h.start_bridge(
            self,
            fs.fixture_server("fx", extra=STDOUT_ABUSE)
            + fs.fixture_server("short", extra='max_message_size = "64KiB"\nrequest_timeout = 4\n'),
        )

    def test_garbage_partial_and_huge_lines_among_calls(self) -> None:
        bridge = self.bridge
        url = bridge.mcp_url("fx")
        warm_up(bridge, "fx")
        baseline = Baseline.take(bridge)
        pid = bridge.status("fx")["pid"]

        async def scenario() -> None:
            async with fs.new_http() as http:
                a = await StreamableClient(http, url, sse=True).open()
                b = await StreamableClient(http, url, sse=False).open()
                c = await LegacyClient(http, bridge.base, "fx").open()

                async def echoes(client: Any, who: str) -> None:
                    for k in range(100, 110):
                        answer = await client.call(k, "echo", {"message": f"{who}-{k}"}, 15)
                        self.assertEqual(fs.text_of(answer), f"Echo: {who}-{k}")
                        await asyncio.sleep(0.05)

                async def oversize(client: Any, request_id: int, order: str) -> None:
                    started = time.monotonic()
                    answer = await client.call(
                        request_id, "huge", {"size": 200_000, "order": order}, 15
                    )
                    self.assertLess(time.monotonic() - started, PROMPT, f"order {order}")
                    self.assertEqual(answer["error"]["code"], -32002, answer)
                    self.assertIn("max_message_size of 65536", answer["error"]["message"])

                async def partial() -> None:
                    answer = await a.call(
                        1, "partial", {"message": "split", "pieces": 5, "pause": 0.2}, 15
                    )
                    self.assertEqual(fs.text_of(answer), "Partial: split")

                async def junk() -> None:
                    answer = await c.call(1, "junk", {"size": 1 << 20}, 15)
                    self.assertEqual(fs.text_of(answer), "junked")

                async def just_fits() -> None:
                    answer = await b.call(2, "huge", {"size": 60_000}, 15)
                    self.assertEqual(len(fs.text_of(answer) or ""), 60_000)

                await asyncio.gather(
                    echoes(a, "a"),
                    echoes(b, "b"),
                    echoes(c, "c"),
                    partial(),
                    junk(),
                    oversize(b, 1, "jir"),
                    oversize(c, 2, "rji"),
                    just_fits(),
                )
                for client in (a, b, c):
                    self.assertEqual(client.strays, [])
                await c.close()
                await a.delete()
                await b.delete()

        run_async(scenario(), 60)
        status = bridge.status("fx")
        self.assertEqual((status["pid"], status["restarts"], status["state"]), (pid, 0, "running"))
        log = bridge.log
        self.assertIn("fx: dropped a 200", log)
        self.assertIn("fx: dropped a 1048576-byte message", log)
        self.assertIn("skipped a stdout line that is not JSON-RPC", log)
        self.assertNotIn("Unhandled Error", log)
        baseline.check(self, bridge, rss_bound_mib=20)

    def test_oversize_response_with_the_id_last(self) -> None:
        """{"jsonrpc","result","id"} is a common key order (e.g. Jackson, some Go and
        Rust encoders); its oversize answer must reach the caller at once, not after
        request_timeout."""
        session = raw_session(self.bridge, "short")
        started = time.monotonic()
        answer = raw_call(
            self.bridge, "short", session, 1, "huge", {"size": 200_000, "order": "jri"}
        )
        took = time.monotonic() - started
        self.assertEqual(answer["error"]["code"], -32002, answer)
        self.assertLess(took, PROMPT)

    def test_wrongly_typed_notifications_from_the_child(self) -> None:
        """Well-formed JSON-RPC with wrongly typed params must not stop the bridge reading."""
        session = raw_session(self.bridge, "short")
        pid = self.bridge.status("short")["pid"]
        notes = [
            {"method": "notifications/message", "params": {"level": 7, "data": "x"}},
            {"method": "notifications/message", "params": {"level": None}},
            {"method": "notifications/progress", "params": {"progressToken": [1]}},
            {"method": "notifications/progress", "params": {"progressToken": True}},
            {"method": "notifications/cancelled", "params": {"requestId": {"a": 1}}},
            {"method": "roots/list", "id": [5]},
            {"method": "notifications/message", "params": {"level": ["info"], "data": "x"}},
            {"method": "notifications/message", "params": {"level": {"a": 1}}},
            {"method": "notifications/resources/updated", "params": {"uri": {"a": 1}}},
            {"method": "notifications/resources/updated", "params": {"uri": [1]}},
        ]
        for n, note in enumerate(notes):
            line = json.dumps({"jsonrpc": "2.0", **note})
            started = time.monotonic()
            answer = raw_call(self.bridge, "short", session, n, "raw", {"lines": [line]})
            self.assertEqual(fs.text_of(answer), "raw", f"after {line}: {answer}")
            answer = raw_call(self.bridge, "short", session, 100 + n, "echo", {"message": "m"})
            self.assertEqual(fs.text_of(answer), "Echo: m", f"after {line}: {answer}")
            self.assertLess(time.monotonic() - started, PROMPT, f"after {line}")
        self.assertEqual(self.bridge.status("short")["pid"], pid)
        self.assertNotIn("Unhandled Error", self.bridge.log)


class NeverAnswersTests(SynchronousTestCase):
    """A tool that never answers: timeouts, client cancels and DELETE all reach the child."""

    def test_timeouts_answered_and_cancelled_on_the_child(self) -> None:
        record = Path(tempfile.mkdtemp(prefix="mcptwist-fault-")) / "received.jsonl"
        self.addCleanup(lambda: record.unlink(missing_ok=True) or record.parent.rmdir())
        timeout = 1.5
        bridge = h.start_bridge(
            self,
            fs.fixture_server(
                "fx", "--record", str(record), extra=f"request_timeout = {timeout}\n"
            ),
        )
        url = bridge.mcp_url("fx")
        warm_up(bridge, "fx")
        baseline = Baseline.take(bridge)
        pid = bridge.status("fx")["pid"]

        async def scenario() -> None:
            async with fs.new_http() as http:
                clients: list[Any] = [
                    await StreamableClient(http, url, sse=True).open(),
                    await StreamableClient(http, url, sse=False).open(),
                    await LegacyClient(http, bridge.base, "fx").open(),
                ]
                sent = time.monotonic()
                outcomes = await asyncio.gather(
                    *(
                        timed(c.call(k, "hang", {"who": f"{i}-{k}"}, 15))
                        for i, c in enumerate(clients)
                        for k in range(1, 5)
                    )
                )
                for n, (answer, ended) in enumerate(outcomes):
                    self.assertIsInstance(answer, dict, answer)
                    self.assertEqual(answer["id"], n % 4 + 1)
                    self.assertEqual(answer["error"]["code"], -32001, answer)
                    self.assertIn("timed out", answer["error"]["message"])
                    self.assertGreater(ended - sent, timeout - 0.2)
                    self.assertLess(ended - sent, timeout + PROMPT)

                # A client that gives up by itself (JSON reply: a -32800 it ignores).
                giver = clients[1]
                pending = asyncio.ensure_future(timed(giver.call(50, "hang", {"who": "c"}, 15)))
                await poll(lambda: bridge.status("fx")["in_flight"] == 1, 10, "one in flight")
                await giver.notify(
                    "notifications/cancelled", {"requestId": 50, "reason": "the test gave up"}
                )
                answer, _ = await pending
                self.assertEqual(answer["error"]["code"], -32800, answer)

                # A session deleted while its call hangs: the call is answered, then gone.
                leaver = clients[0]
                pending = asyncio.ensure_future(timed(leaver.call(60, "hang", {"who": "d"}, 15)))
                await poll(lambda: bridge.status("fx")["in_flight"] == 1, 10, "one in flight")
                self.assertEqual(await leaver.delete(), 200)
                answer, _ = await pending
                self.assertIsInstance(answer, dict, answer)
                self.assertEqual(answer["error"]["message"], "Session terminated")
                await clients[2].close()
                await clients[1].delete()
                for c in clients:
                    self.assertEqual(c.strays, [])

        run_async(scenario(), 60)

        # The child was told about every one of them, with the reason.
        def cancellations() -> dict[str, Any] | None:
            calls, cancelled = {}, {}
            for line in record.read_text().splitlines():
                try:
                    message = json.loads(line)
                except ValueError:
                    continue  # a line still being written
                if message.get("method") == "tools/call" and message["params"]["name"] == "hang":
                    calls[message["id"]] = message["params"]["arguments"]["who"]
                elif message.get("method") == "notifications/cancelled":
                    cancelled[message["params"]["requestId"]] = message["params"]["reason"]
            if len(calls) == 14 and set(cancelled) >= set(calls):
                return {who: cancelled[child_id] for child_id, who in calls.items()}
            return None

        reasons = h.wait_for(cancellations, 10, "notifications/cancelled for every hang")
        self.assertEqual(
            reasons,
            {
                **{f"{i}-{k}": "timed out" for i in range(3) for k in range(1, 5)},
                "c": "the test gave up",
                "d": "client session closed",
            },
        )
        h.wait_for(lambda: bridge.status("fx")["in_flight"] == 0, 5, "nothing in flight")
        self.assertEqual((bridge.status("fx")["pid"], bridge.status("fx")["restarts"]), (pid, 0))
        self.assertEqual(fs.total_sessions(bridge), 0)
        baseline.check(self, bridge, rss_bound_mib=15)


class RawStream:
    """An SSE response read (or not) through a raw socket."""

    def __init__(
        self,
        bridge: h.Bridge,
        path: str,
        headers: dict[str, str],
        rcvbuf: int,
        method: str = "GET",
        body: bytes = b"",
    ) -> None:
        self.sock = fs.connect(bridge.port, timeout=10, rcvbuf=rcvbuf)
        headers = {"Accept": "text/event-stream", **headers}
        self.sock.sendall(fs.http_request(method, path, headers, body))
        self.head = fs.read_until(self.sock, b"\n\n", 10, limit=4096)
        if not self.head.startswith(b"HTTP/1.1 200"):
            raise AssertionError(f"{method} {path}: {self.head[:300]!r}")

    def ended(self, timeout: float) -> str:
        """Read everything until the bridge closes the stream: how it ended."""
        _, how = fs.drain_count(self.sock, timeout)
        return how

    def close(self) -> None:
        self.sock.close()


def legacy_stream(bridge: h.Bridge, name: str, rcvbuf: int = 4096) -> RawStream:
    stream = RawStream(bridge, f"/servers/{name}/sse", {}, rcvbuf)
    if b"event: endpoint" not in stream.head:
        stream.head += fs.read_until(stream.sock, b"event: endpoint", 5)
    return stream


def get_stream(
    bridge: h.Bridge, name: str, session: dict[str, str], rcvbuf: int = 4096
) -> RawStream:
    headers = {"Mcp-Session-Id": session["Mcp-Session-Id"], "MCP-Protocol-Version": fs.PROTOCOL}
    return RawStream(bridge, f"/servers/{name}/mcp", headers, rcvbuf)


class FastReader(threading.Thread):
    """Reads an SSE stream as fast as it can and counts the events holding a marker."""

    def __init__(self, stream: RawStream, marker: bytes) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.marker = marker
        self.count = stream.head.count(marker)
        self.how = ""
        self.tail = b""
        self.stop = threading.Event()

    def run(self) -> None:
        carry = b""
        sock = self.stream.sock
        sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                chunk = sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError as e:
                self.how = f"error {e!r}"
                return
            if not chunk:
                self.how = "eof"
                return
            data = carry + chunk
            self.tail = (self.tail + chunk)[-4096:]
            self.count += data.count(self.marker)
            # Keep a tail shorter than the marker, so that no occurrence counts twice.
            tail = len(self.marker) - 1
            carry = data[-tail:] if tail else b""
            self.count -= carry.count(self.marker)

    def finish(self) -> None:
        self.stop.set()
        self.join(5)
        self.stream.close()


FLOOD_CONFIG = 'stream_buffer = "1MiB"\n'


class FloodTests(SynchronousTestCase):
    """A child that sends far more than some clients read."""

    def setUp(self) -> None:
        self.bridge = h.start_bridge(
            self,
            FLOOD_CONFIG
            + fs.fixture_server("fx", extra="request_timeout = 60\n")
            + fs.fixture_server("other"),
        )
        warm_up(self.bridge, "fx")
        warm_up(self.bridge, "other")
        self.baseline = Baseline.take(self.bridge)
        self.pids = {name: self.bridge.status(name)["pid"] for name in ("fx", "other")}

    def latency_probe(self, name: str) -> tuple[threading.Event, list[float]]:
        """Echo calls on a server every 50 ms until stopped: their durations."""
        stop = threading.Event()
        durations: list[float] = []
        session = raw_session(self.bridge, name)

        def probe() -> None:
            k = 0
            while not stop.is_set():
                k += 1
                started = time.monotonic()
                answer = raw_call(self.bridge, name, session, k, "echo", {"message": f"p{k}"})
                durations.append(time.monotonic() - started)
                if fs.text_of(answer) != f"Echo: p{k}":
                    durations.append(float("inf"))
                time.sleep(0.05)
            h.http("DELETE", self.bridge.mcp_url(name), None, session)

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 15)
        self.addCleanup(stop.set)
        return stop, durations

    def test_notification_flood_drops_slow_readers_only(self) -> None:
        """50 000 notifications/message, fanned out to every session of the server."""
        bridge = self.bridge
        count, size = 50_000, 500
        slow_legacy = legacy_stream(bridge, "fx")
        self.addCleanup(slow_legacy.close)
        slow_session = raw_session(bridge, "fx")
        slow_get = get_stream(bridge, "fx", slow_session)
        self.addCleanup(slow_get.close)
        fast = FastReader(legacy_stream(bridge, "fx", rcvbuf=1 << 20), b"notifications/message")
        fast.start()
        self.addCleanup(fast.finish)
        caller = raw_session(bridge, "fx")
        neighbour = raw_session(bridge, "fx")
        stop_probe, other_latency = self.latency_probe("other")

        started = time.monotonic()
        answer = raw_call(bridge, "fx", caller, 1, "flood", {"count": count, "size": size})
        flood_seconds = time.monotonic() - started
        self.assertEqual(fs.text_of(answer), f"flooded {count}")
        # A neighbour on the same child still gets through.
        started = time.monotonic()
        echo = raw_call(bridge, "fx", neighbour, 1, "echo", {"message": "n"})
        self.assertEqual(fs.text_of(echo), "Echo: n")
        self.assertLess(time.monotonic() - started, PROMPT)
        stop_probe.set()

        # Both slow readers were dropped (and logged); the fast one got every message.
        self.assertIn(slow_legacy.ended(15), ("reset", "eof"), "the slow legacy reader")
        self.assertIn(slow_get.ended(15), ("reset", "eof"), "the slow GET reader")
        log = bridge.log
        self.assertIn("dropped a slow SSE reader fx SSE", log)
        self.assertIn("dropped a slow SSE reader fx GET", log)
        self.assertEqual(log.count("dropped a slow SSE reader"), 2, "only the slow ones")
        h.wait_for(lambda: fast.count >= count, 20, f"the fast reader to count {count}")
        self.assertEqual(fast.count, count)
        self.assertEqual(fast.how, "", "the fast reader was disconnected")
        # The other server never noticed.
        self.assertLess(
            max(other_latency), 1.0, f"echo on 'other' during the flood: {other_latency}"
        )
        # The slow GET reader's session outlives its stream: reopen it, call.
        again = get_stream(bridge, "fx", slow_session)
        again.close()
        echo = raw_call(bridge, "fx", slow_session, 1, "echo", {"message": "back"})
        self.assertEqual(fs.text_of(echo), "Echo: back")
        fast.finish()
        for session in (slow_session, caller, neighbour):
            h.http("DELETE", bridge.mcp_url("fx"), None, session)
        h.wait_for(lambda: fs.total_sessions(bridge) == 0, 10, "no session left")
        self.assertEqual({n: bridge.status(n)["pid"] for n in self.pids}, self.pids)
        metrics = self.baseline.check(self, bridge, rss_bound_mib=25)
        report(f"flood of {count} x {size} B in {flood_seconds:.1f}s; {metrics}")

    def test_slow_readers_of_progress_and_get_streams(self) -> None:
        """A POST stream (progress) and a GET stream that stop being read while the child
        sends a lot; a fast reader of the same flood gets all of it."""
        bridge = self.bridge
        count, size = 20_000, 1000
        # Slow: a POST whose SSE answer carries 20 000 progress notifications, unread.
        slow = raw_session(bridge, "fx")
        slow_post = fs.connect(bridge.port, timeout=10, rcvbuf=4096)
        self.addCleanup(slow_post.close)
        body = json.dumps(
            fs.tool_call(1, "flood", {"count": count, "size": size, "kind": "progress"}, "t")
        )
        slow_post.sendall(
            fs.http_request(
                "POST",
                "/servers/fx/mcp",
                {**slow, "Accept": fs.ACCEPT_BOTH, "MCP-Protocol-Version": fs.PROTOCOL},
                body.encode(),
            )
        )
        # Slow: a GET stream of another session, unread, while a third floods messages.
        quiet = raw_session(bridge, "fx")
        slow_get = get_stream(bridge, "fx", quiet)
        self.addCleanup(slow_get.close)

        # Fast: the same flood on a POST stream read as fast as a socket can be.
        fast_session = raw_session(bridge, "fx")
        call = fs.tool_call(7, "flood", {"count": count, "size": size, "kind": "progress"}, 77)
        fast = FastReader(
            RawStream(
                bridge,
                "/servers/fx/mcp",
                {**fast_session, "Accept": fs.ACCEPT_BOTH, "Connection": "close"},
                rcvbuf=4 << 20,
                method="POST",
                body=json.dumps(call).encode(),
            ),
            b'"progressToken":77',
        )
        fast.start()
        self.addCleanup(fast.finish)
        fast.join(60)
        self.assertEqual(fast.how, "eof", "the fast POST stream did not end by itself")
        self.assertEqual(fast.count, count)
        self.assertIn(
            f'"id":7,"result":{{"content":[{{"type":"text","text":"flooded {count}"'.encode(),
            fast.tail,
        )
        h.http("DELETE", bridge.mcp_url("fx"), None, fast_session)
        flooder = raw_session(bridge, "fx")
        answer = raw_call(bridge, "fx", flooder, 1, "flood", {"count": count, "size": size})
        self.assertEqual(fs.text_of(answer), f"flooded {count}")

        h.wait_for(
            lambda: bridge.log.count("dropped a slow SSE reader") >= 2,
            30,
            "two slow readers dropped",
        )
        self.assertIn("dropped a slow SSE reader fx POST", bridge.log)
        self.assertIn("dropped a slow SSE reader fx GET", bridge.log)
        self.assertEqual(bridge.log.count("dropped a slow SSE reader"), 2, "only the slow ones")
        self.assertIn(fs.drain_count(slow_post, 15)[1], ("reset", "eof"))
        self.assertIn(slow_get.ended(15), ("reset", "eof"))
        # Both sessions go on: the slow POST's call finished on the child; calls work.
        h.wait_for(lambda: bridge.status("fx")["in_flight"] == 0, 30, "the slow call to end")
        for session in (slow, quiet, flooder):
            echo = raw_call(bridge, "fx", session, 2, "echo", {"message": "still"})
            self.assertEqual(fs.text_of(echo), "Echo: still")
            h.http("DELETE", bridge.mcp_url("fx"), None, session)
        h.wait_for(lambda: fs.total_sessions(bridge) == 0, 10, "no session left")
        metrics = self.baseline.check(self, bridge, rss_bound_mib=25)
        report(f"progress/GET flood of {count} x {size} B; {metrics}")


class DisconnectTests(SynchronousTestCase):
    """Clients that close their socket while the bridge is working for them."""

    def test_clients_vanish_mid_request(self) -> None:
        bridge = h.start_bridge(
            self,
            fs.fixture_server("fx", extra="request_timeout = 3\n")
            + fs.fixture_server(
                "per",
                "--slow-start",
                "1",
                extra='sharing = "session"\nmax_children = 4\n',
            ),
        )
        warm_up(bridge, "fx")
        baseline = Baseline.take(bridge)
        session = raw_session(bridge, "fx")
        stream_headers = {**session, "MCP-Protocol-Version": fs.PROTOCOL}

        def post(headers: dict[str, str], message: Any, read: bytes | None) -> None:
            sock = fs.connect(bridge.port)
            body = json.dumps(message).encode()
            sock.sendall(fs.http_request("POST", "/servers/fx/mcp", headers, body))
            if read is not None:
                self.assertIn(read, fs.read_until(sock, read, 10))
            sock.close()

        for i in range(30):
            # A JSON answer, gone before it comes; an SSE answer (to a client
            # that takes only a stream), gone after its head.
            post(session, fs.tool_call(f"j{i}", "sleep", {"seconds": 0.3}), None)
            post(
                {**stream_headers, "Accept": "text/event-stream"},
                fs.tool_call(f"s{i}", "sleep", {"seconds": 0.3}),
                b"retry:",
            )
        for i in range(10):
            post(session, fs.tool_call(f"h{i}", "hang", {}), None)
            # A body that never arrives in full.
            sock = fs.connect(bridge.port)
            sock.sendall(
                fs.http_request(
                    "POST", "/servers/fx/mcp", {**session, "Content-Length": "1000"}, b'{"jsonrpc"'
                )
            )
            time.sleep(0.01)
            sock.close()
        for i in range(20):
            # A legacy session whose stream is dropped while its call runs.
            stream = legacy_stream(bridge, "fx", rcvbuf=65536)
            endpoint = re.search(rb"data: (/servers/fx/messages\?\S+)", stream.head)
            assert endpoint is not None, stream.head
            code, _, _ = h.http(
                "POST",
                bridge.url(endpoint.group(1).decode()),
                fs.tool_call(i, "sleep", {"seconds": 0.3}),
                {"Content-Type": "application/json"},
            )
            self.assertEqual(code, 202)
            stream.close()
        for _ in range(3):
            # initialize of a child of its own, abandoned while the child starts.
            sock = fs.connect(bridge.port)
            body = json.dumps(fs.initialize()).encode()
            sock.sendall(fs.http_request("POST", "/servers/per/mcp", JSON_ONLY, body))
            time.sleep(0.2)
            sock.close()

        # The sleeps end, the hangs time out; nothing is left of the dropped clients.
        h.wait_for(lambda: bridge.status("fx")["in_flight"] == 0, 15, "nothing in flight")
        h.wait_for(
            lambda: fs.servers_status(bridge)["per"]["children"] == [], 15, "per's children gone"
        )
        status = fs.servers_status(bridge)
        self.assertEqual((status["fx"]["sessions"], status["per"]["sessions"]), (1, 0))
        # The surviving session goes on, and may reuse the ids of the dropped requests.
        for request_id in ("j0", "s0", "h0"):
            answer = raw_call(bridge, "fx", session, request_id, "echo", {"message": request_id})
            self.assertEqual(fs.text_of(answer), f"Echo: {request_id}")
        # per still serves (its capacity came back).
        per = raw_session(bridge, "per")
        self.assertEqual(
            fs.text_of(raw_call(bridge, "per", per, 1, "echo", {"message": "p"})), "Echo: p"
        )
        h.http("DELETE", bridge.mcp_url("per"), None, per)
        h.http("DELETE", bridge.mcp_url("fx"), None, session)
        h.wait_for(lambda: fs.total_sessions(bridge) == 0, 10, "no session left")
        log = bridge.log
        self.assertEqual(len(re.findall(r"session \S+ on per failed to initialize", log)), 3)
        self.assertEqual(len(re.findall(r"session \S+ on fx stream closed", log)), 20)
        self.assertNotIn("Unhandled Error", log)
        self.assertNotIn("Traceback", log)
        baseline.check(self, bridge, rss_bound_mib=15)


class ChurnTests(SynchronousTestCase):
    """1 000 connect/disconnect cycles: fds, sessions and memory come back."""

    CYCLES = 1000

    def test_1000_connect_disconnect_cycles(self) -> None:
        bridge = h.start_bridge(self, fs.fixture_server("fx"))
        warm_up(bridge, "fx")
        baseline = Baseline.take(bridge)
        port = bridge.port

        def legacy() -> None:
            stream = legacy_stream(bridge, "fx", rcvbuf=65536)
            stream.close()

        def streamable() -> None:
            session = raw_session(bridge, "fx")
            stream = get_stream(bridge, "fx", session, rcvbuf=65536)
            stream.close()
            code, _, _ = h.http("DELETE", bridge.mcp_url("fx"), None, session)
            assert code == 200, code

        def bare() -> None:
            fs.connect(port).close()

        def half_request() -> None:
            sock = fs.connect(port)
            sock.sendall(b"POST /servers/fx/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
            sock.close()

        kinds = [legacy, streamable, bare, half_request]
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            for future in [pool.submit(kinds[i % 4]) for i in range(self.CYCLES)]:
                future.result(timeout=60)
        seconds = time.monotonic() - started
        self.assertLess(seconds, 60)
        h.wait_for(lambda: fs.total_sessions(bridge) == 0, 15, "every session to end")
        log = bridge.log
        self.assertEqual(log.count("on fx stream closed"), self.CYCLES // 4)
        self.assertEqual(log.count("on fx ended by the client"), self.CYCLES // 4 + 1)
        metrics = baseline.check(self, bridge, rss_bound_mib=20)
        report(f"{self.CYCLES} cycles in {seconds:.1f}s; {metrics}")


class AbandonedSessionTests(SynchronousTestCase):
    """1 000 sessions opened and abandoned (never DELETEd) are reaped."""

    # The registry reaps every quarter of the shortest session_idle_timeout (1 to 30 s).
    IDLE = 6
    REAP_INTERVAL = max(1.0, IDLE / 4)

    def test_1000_abandoned_sessions_are_reaped(self) -> None:
        idle = self.IDLE
        bridge = h.start_bridge(
            self,
            fs.fixture_server("fx", extra=f"session_idle_timeout = {idle}\n")
            + fs.fixture_server(
                "per",
                extra=f'sharing = "session"\nmax_children = 20\nsession_idle_timeout = {idle}\n',
            ),
        )
        started = time.monotonic()
        baseline = Baseline.take(bridge)
        fx_pid = bridge.status("fx")["pid"]

        def abandon(name: str) -> None:
            code, headers, body = h.http("POST", bridge.mcp_url(name), fs.initialize(), JSON_ONLY)
            assert code == 200 and "mcp-session-id" in headers, (code, body)

        with ThreadPoolExecutor(8) as pool:
            jobs = [pool.submit(abandon, "fx") for _ in range(1000)]
            jobs += [pool.submit(abandon, "per") for _ in range(20)]
            for job in jobs:
                job.result(timeout=60)
        created = time.monotonic() - started
        # (Made well within session_idle_timeout, so none has expired yet.)
        self.assertLess(created, idle - 1, "too slow to make 1020 sessions")
        # One more child than max_children: 503 with Retry-After.
        code, headers, body = h.http("POST", bridge.mcp_url("per"), fs.initialize(), JSON_ONLY)
        self.assertEqual((code, headers.get("retry-after")), (503, "5"), body)
        status = fs.servers_status(bridge)
        self.assertEqual((status["fx"]["sessions"], status["per"]["sessions"]), (1000, 20))
        self.assertEqual(len(status["per"]["children"]), 20)
        self.assertEqual(len(bridge.children()), 21)

        h.wait_for(lambda: fs.total_sessions(bridge) == 0, 40, "every session to be reaped")
        reaped = time.monotonic() - started
        # Within idle + one reap interval (+ a margin) of the last one's creation.
        self.assertLess(reaped - created, idle + self.REAP_INTERVAL + 3)
        self.assertEqual(bridge.log.count("on fx expired after"), 1000)
        self.assertEqual(bridge.log.count("on per expired after"), 20)
        h.wait_for(lambda: fs.servers_status(bridge)["per"]["children"] == [], 10, "no child")
        metrics = baseline.check(self, bridge, rss_bound_mib=30, descendants={fx_pid})
        # The capacity came back: a new session on per gets a child and works.
        per = raw_session(bridge, "per")
        self.assertEqual(
            fs.text_of(raw_call(bridge, "per", per, 1, "echo", {"message": "x"})), "Echo: x"
        )
        report(f"1020 sessions made in {created:.1f}s, reaped {reaped:.1f}s after start; {metrics}")

    def test_idle_sessions_do_not_multiply_broadcasts(self) -> None:
        """100 sessions that never opened a stream, then 300 log messages of 4 KB (1.2 MB
        in all) broadcast by the child: the bridge keeps them once, not once per session."""
        bridge = h.start_bridge(self, fs.fixture_server("fx"))
        warm_up(bridge, "fx")
        for _ in range(100):
            code, _, body = h.http("POST", bridge.mcp_url("fx"), fs.initialize(), JSON_ONLY)
            self.assertEqual(code, 200, body)
        baseline = Baseline.take(bridge)
        caller = raw_session(bridge, "fx")
        answer = raw_call(bridge, "fx", caller, 1, "flood", {"count": 300, "size": 4000})
        self.assertEqual(fs.text_of(answer), "flooded 300")
        grown = (fs.rss_kib(bridge.pid) - baseline.rss_kib) / 1024
        self.assertLess(grown, 30, f"RSS grew {grown:.0f} MiB for 1.2 MB of broadcasts")


class SigtermUnderLoadTests(SynchronousTestCase):
    """SIGTERM while 20 clients call in a loop, on shared, stubborn and per-session children."""

    TERM_AFTER = 1.0
    KILL_AFTER = 1.0
    MARGIN = 3.0

    def test_sigterm_with_20_clients_calling(self) -> None:
        stop = f"term_after = {self.TERM_AFTER}\nkill_after = {self.KILL_AFTER}\n"
        bridge = h.start_bridge(
            self,
            fs.fixture_server("fx", extra=stop)
            + fs.fixture_server("stub", "--stubborn", extra=stop, fixture=fs.STDIO_FIXTURE)
            + fs.fixture_server("per", extra=stop + 'sharing = "session"\nmax_children = 8\n'),
        )
        budget = self.TERM_AFTER + self.KILL_AFTER + self.MARGIN
        signalled: list[float] = []

        async def client(http: Any, i: int) -> dict[str, Any]:
            kind = i % 4
            name = ("fx", "fx", "stub", "per")[kind]
            c: Any
            if kind == 1:
                c = await LegacyClient(http, bridge.base, name).open()
            else:
                c = await StreamableClient(http, bridge.mcp_url(name), sse=kind != 2).open()
            report: dict[str, Any] = {"client": i, "ok": 0, "wrong": [], "end": None}
            k = 0
            try:
                while True:
                    k += 1
                    tool, args, want = (
                        ("echo", {"message": f"{i}-{k}"}, f"Echo: {i}-{k}")
                        if name == "stub"
                        else ("sleep", {"seconds": 0.05, "message": f"{i}-{k}"}, f"slept {i}-{k}")
                    )
                    try:
                        answer = await c.call(k, tool, args, 15)
                    except TimeoutError:
                        report["end"] = "hang"
                        break
                    except fs.Closed as e:
                        report["end"] = f"closed: {e}"
                        break
                    except fs.HTTPStatus as e:
                        report["end"] = f"http {e.status}"
                        break
                    if "error" in answer:
                        report["end"] = (
                            f"error {answer['error']['code']}: {answer['error']['message']}"
                        )
                        break
                    if fs.text_of(answer) != want or answer.get("id") != k:
                        report["wrong"].append(answer)
                    report["ok"] += 1
            except Exception as e:
                report["end"] = f"unexpected {e!r}"
            report["ended"] = time.monotonic()
            report["strays"] = c.strays
            if isinstance(c, LegacyClient):
                await c.close()
            return report

        async def scenario() -> tuple[list[dict[str, Any]], dict[int, str]]:
            async with fs.new_http() as http:
                tasks = [asyncio.ensure_future(client(http, i)) for i in range(20)]
                await asyncio.sleep(2.0)
                await poll(
                    lambda: len(fs.servers_status(bridge)["per"]["children"]) == 5, 10, "5 children"
                )
                children = bridge.children()
                signalled.append(time.monotonic())
                bridge.proc.send_signal(signal.SIGTERM)
                reports = await asyncio.gather(*tasks)
                return reports, children

        reports, children = run_async(scenario(), 60)
        sent = signalled[0]
        # The bridge exits 0 within the stop budget; its children went before it did.
        try:
            code = bridge.proc.wait(timeout=budget + 5)
        except Exception:
            code = None
        exited = time.monotonic() - sent
        # The bridge waits for its children: none may be left when it has exited.
        left = fs.children_gone_at(children, time.monotonic() + 0.5)
        exit_code, _, leftovers = fs.terminate(bridge, 5)
        # twistd ends itself with the signal that stopped it (see test_exit_status_is_0).
        self.assertIn(code, (0, -signal.SIGTERM), bridge.log[-4000:])
        self.assertEqual(exit_code, code)
        self.assertLess(exited, budget, f"the bridge took {exited:.1f}s to exit")
        self.assertEqual((left, leftovers), ({}, {}), "children outlived the bridge")
        self.assertEqual(len(children), 7, children)  # fx, stub and five of per
        for r in reports:
            who = f"client {r['client']}: {r}"
            self.assertGreater(r["ok"], 0, who)
            self.assertEqual((r["wrong"], r["strays"]), ([], []), who)
            self.assertIsNotNone(r["end"], who)
            self.assertFalse(r["end"].startswith(("hang", "unexpected", "http 5")), who)
            self.assertLess(r["ended"] - sent, budget, who)
        self.assertIn("every child has stopped", bridge.log)
        report(
            f"exit {code} after {exited:.2f}s; calls answered before: "
            f"{sum(r['ok'] for r in reports)}; ends: "
            f"{sorted({re.sub(r'[0-9]+', 'N', r['end'][:60]) for r in reports})}"
        )

    def test_exit_status_after_sigterm(self) -> None:
        """After a clean shutdown twistd ends with the signal that stopped it, as
        daemons conventionally do: systemd counts SIGTERM as a clean exit, and a
        shell or container sees 143 (128 + 15)."""
        bridge = h.start_bridge(self, fs.fixture_server("fx"))
        # "listening on" comes before twistd starts the reactor (and installs its
        # signal handlers); a running child means the reactor runs.
        bridge.wait_state("fx", "running")
        code, _, leftovers = fs.terminate(bridge, 10)
        self.assertEqual(leftovers, {})
        self.assertIn("Server Shut Down.", bridge.log)
        self.assertEqual(code, -signal.SIGTERM)


# Fuzzing the HTTP surface

# Tools that must not be called by the fuzzer: they hang, sleep, flood or end the child.
UNSAFE_TOOLS = frozenset(
    {"hang", "sleep", "exit", "flood", "huge", "junk", "raw", "partial", "badnote"}
)
FUZZ_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    database=None,  # nothing written into the working tree
    derandomize=not os.environ.get("FAULT_SUITE_RANDOM"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
LOG_LEVELS = ["debug", "info", "notice", "warning", "error", "critical", "alert", "emergency"]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
good_ids = st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.text(max_size=12)
request_ids = good_ids | good_ids | json_values
versions = st.sampled_from(["2.0", "2.0", "2.0", "2.0", "1.0"]) | json_values


def shaped(method: Any, params: Any) -> Any:
    """A message for one method: usually well-formed, with params of its kind."""
    return st.fixed_dictionaries(
        {"jsonrpc": versions, "method": method},
        optional={"id": request_ids, "params": params | json_values},
    )


tool_params = st.fixed_dictionaries(
    {"name": st.sampled_from(["echo", "pid", "nope"]) | json_values},
    optional={
        "arguments": st.fixed_dictionaries({}, optional={"message": json_values}) | json_values,
        "_meta": st.fixed_dictionaries({}, optional={"progressToken": json_values}),
    },
)
messages = st.one_of(
    shaped(st.just("tools/call"), tool_params),
    shaped(
        st.just("logging/setLevel"),
        st.fixed_dictionaries({"level": st.sampled_from(LOG_LEVELS) | json_values}),
    ),
    shaped(
        st.just("initialize"),
        st.fixed_dictionaries(
            {},
            optional={
                "protocolVersion": st.sampled_from(["2025-11-25", "2025-03-26", "1999-01-01"])
                | json_values,
                "capabilities": json_values,
                "clientInfo": json_values,
            },
        ),
    ),
    shaped(
        st.sampled_from(["resources/subscribe", "resources/unsubscribe", "resources/read"]),
        st.fixed_dictionaries({"uri": st.text(max_size=10) | json_values}),
    ),
    shaped(
        st.sampled_from(["notifications/cancelled", "notifications/progress"]),
        st.fixed_dictionaries(
            {},
            optional={
                "requestId": request_ids,
                "progressToken": json_values,
                "reason": json_values,
            },
        ),
    ),
    shaped(
        st.sampled_from(["ping", "tools/list", "notifications/initialized", "completion/complete"])
        | st.text(max_size=20)
        | json_values,
        json_values,
    ),
    st.fixed_dictionaries(
        {},
        optional={
            "jsonrpc": versions,
            "id": request_ids,
            "method": st.text(max_size=10) | json_values,
            "params": json_values,
            "result": json_values,
            "error": json_values,
        },
    ),
)
OVERSIZE = b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"pad":"' + b"a" * 70_000 + b'"}}'
bodies = st.one_of(
    messages.map(lambda m: json.dumps(m).encode()),
    messages.map(lambda m: json.dumps(m).encode()),
    st.lists(messages, max_size=3).map(lambda m: json.dumps(m).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.tuples(messages, st.integers(0, 50)).map(lambda t: json.dumps(t[0]).encode()[: t[1]]),
    st.binary(max_size=100),
    st.just(OVERSIZE),
    st.just(b""),
)
header_text = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"),
    max_size=30,
)


def message_list(body: bytes) -> list[Any]:
    try:
        parsed = json.loads(body)
    except ValueError:
        return []
    return parsed if isinstance(parsed, list) else [parsed]


def unsafe(body: bytes) -> bool:
    """Whether a body calls one of the tools the fuzzer must leave alone."""
    for m in message_list(body):
        if isinstance(m, dict) and isinstance(m.get("params"), dict):
            name = m["params"].get("name")
            if isinstance(name, str) and name in UNSAFE_TOOLS:
                return True
    return False


def check_jsonrpc_answer(status: int, headers: dict[str, str], body: bytes) -> None:
    """A well-formed answer: never 5xx; a JSON body of an error is a JSON-RPC error."""
    assert 200 <= status < 500, f"status {status}: {body[:500]!r}"
    kind = headers.get("content-type", "")
    if status >= 400:
        assert kind.startswith("application/json") or not body.strip() or status in (400,), (
            status,
            headers,
            body[:300],
        )
    if not kind.startswith("application/json") or not body.strip():
        return
    parsed = json.loads(body)
    items = parsed if isinstance(parsed, list) else [parsed]
    if status >= 400:
        assert isinstance(parsed, dict), parsed
    for item in items:
        if status >= 400 or "jsonrpc" in item:
            assert item.get("jsonrpc") == "2.0", item
            assert "id" in item, item
            if status >= 400:
                error = item.get("error")
                assert isinstance(error, dict), item
                assert isinstance(error.get("code"), int), item
                assert isinstance(error.get("message"), str), item


class MalformedHTTPTests(SynchronousTestCase):
    """Inputs that once broke the bridge (500s, no answer), one test each."""

    def setUp(self) -> None:
        self.bridge = h.start_bridge(self, fs.fixture_server("fx"))

    def raw(self, data: bytes) -> tuple[int, dict[str, str], bytes]:
        sock = fs.connect(self.bridge.port, timeout=10)
        try:
            sock.sendall(data)
            response, how = fs.read_to_end(sock, 10)
        finally:
            sock.close()
        self.assertNotEqual(how, "timeout")
        self.assertTrue(response, f"no answer at all ({how})")
        return fs.parse_response(response)

    def test_set_level_with_a_list(self) -> None:
        """logging/setLevel whose level is a list: a JSON-RPC error (-32602), not a 500."""
        session = raw_session(self.bridge, "fx")
        message = {"jsonrpc": "2.0", "id": 1, "method": "logging/setLevel"}
        for accept in ("application/json", fs.ACCEPT_BOTH):
            body = json.dumps({**message, "params": {"level": ["debug"]}}).encode()
            status, headers, answer = self.raw(
                fs.http_request(
                    "POST",
                    "/servers/fx/mcp",
                    {**session, "Accept": accept, "Connection": "close"},
                    body,
                )
            )
            self.assertEqual(status, 200, answer)
            [reply] = h.jsonrpc_body(headers, answer)
            self.assertEqual(reply["error"]["code"], -32602)

    def test_last_event_id_with_superscript_digits(self) -> None:
        """Last-Event-ID: ²-1 ('²'.isdigit() but int('²') fails): 4xx or a fresh stream."""
        session = raw_session(self.bridge, "fx")
        sock = fs.connect(self.bridge.port, timeout=10)
        self.addCleanup(sock.close)
        headers = {
            "Mcp-Session-Id": session["Mcp-Session-Id"],
            "Accept": "text/event-stream",
            "Last-Event-ID": "\u00b2-1",
        }
        sock.sendall(fs.http_request("GET", "/servers/fx/mcp", headers))
        head = fs.read_until(sock, b"\r\n\r\n", 10)
        self.assertRegex(head, rb"^HTTP/1\.1 [234]\d\d ")

    def test_content_type_with_a_next_line_character(self) -> None:
        """A POST with Content-Type: \\x850 (a latin-1 NEL, then text): a 415."""
        data = (
            b"POST /servers/fx/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: \x850\r\n"
            b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
        )
        status, _, _ = self.raw(data)
        self.assertEqual(status, 415)

    def test_host_that_is_not_a_valid_domain_name(self) -> None:
        """Host: a 64-character label, or an empty label: a 4xx, not Twisted's HTML 500."""
        for host in ("x" * 64, "a..b", ".a"):
            data = fs.http_request("GET", "/health", {"Connection": "close"}, host=host)
            status, headers, body = self.raw(data)
            self.assertEqual(status, 421, (host, body))
            self.assertEqual(headers["content-type"], "application/json")


class FuzzTests(SynchronousTestCase):
    """Malformed, truncated, oversize and wrongly typed requests against the live bridge."""

    def setUp(self) -> None:
        self.bridge = h.start_bridge(
            self,
            fs.fixture_server(
                "fx",
                extra='max_message_size = "64KiB"\nrequest_timeout = 5\nsession_idle_timeout = 30\n',
            ),
        )
        warm_up(self.bridge, "fx")
        self.sessions = {version: self.new_session(version) for version in self.VERSIONS}
        # A legacy session whose stream is read (and discarded) all along.
        stream = legacy_stream(self.bridge, "fx", rcvbuf=1 << 20)
        found = re.search(rb"session_id=([\w-]+)", stream.head)
        assert found is not None, stream.head
        self.legacy = found.group(1).decode()
        self.reader = FastReader(stream, b"event: message")
        self.reader.start()
        self.addCleanup(self.reader.finish)
        self.baseline = Baseline.take(self.bridge)
        self.examples = 0
        # Cleanups run before tearDown, and last in first out: this one before stop().
        self.addCleanup(self.still_fine)

    # Sessions the fuzzer uses: the newest revision, and the one that allows batches.
    VERSIONS = (fs.PROTOCOL, "2025-03-26")

    def new_session(self, version: str) -> str:
        return raw_session(self.bridge, "fx", version)["Mcp-Session-Id"]

    def still_fine(self) -> None:
        if self.examples:
            # Still healthy, nothing leaked, and the sessions made on the way still work.
            self.assertEqual(self.reader.how, "", "the legacy stream was closed")
            self.baseline.check(self, self.bridge, rss_bound_mib=20, fd_slack=3)
            for version in self.VERSIONS:
                session = {**JSON_ONLY, "Mcp-Session-Id": self.sessions[version]}
                answer = raw_call(self.bridge, "fx", session, "after", "echo", {"message": "ok"})
                self.assertEqual(fs.text_of(answer), "Echo: ok")
            report(f"{self.id()}: {self.examples} examples")

    def session_id(self, which: str) -> str:
        return which.replace("NEW", self.sessions[fs.PROTOCOL]).replace(
            "OLD", self.sessions["2025-03-26"]
        )

    def send(
        self, method: str, path: str, headers: dict[str, str], body: bytes, framing: str = "exact"
    ) -> tuple[int, dict[str, str], bytes] | None:
        """One request, framed as asked; check the answer. None for a clean close."""
        assume(not unsafe(body))
        path = path.replace("LEGACY", self.legacy)
        lines = [f"{method} {path} HTTP/1.1"]
        if not any(k.lower() == "host" for k in headers):
            lines.append("Host: 127.0.0.1")
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append("Connection: close")
        complete = True
        payload = body
        if framing == "exact":
            lines.append(f"Content-Length: {len(body)}")
        elif framing == "short":
            lines.append(f"Content-Length: {len(body) + 10}")
            complete = False
        elif framing == "junk-length":
            lines.append("Content-Length: 12abc")
        elif framing == "chunked":
            lines.append("Transfer-Encoding: chunked")
            payload = (
                f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b""
            ) + b"0\r\n\r\n"
        else:
            lines.append("Transfer-Encoding: chunked")
            payload = b"zz\r\n" + body
            complete = False
        self.examples += 1
        data = "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + payload
        outcome, response = self.exchange(data, complete, method == "POST")
        if outcome == "closed":
            return None
        status, response_headers, response_body = fs.parse_response(response)
        if method == "DELETE" and status == 200:
            # The fuzzer ended one of its sessions (a valid request): make a new one.
            self.sessions = {v: self.new_session(v) for v in self.VERSIONS}
        if response_headers.get("content-type", "").startswith("text/event-stream"):
            assert status == 200, (status, response[:300])
            return status, response_headers, response_body
        check_jsonrpc_answer(status, response_headers, response_body)
        return status, response_headers, response_body

    def exchange(self, data: bytes, complete: bool, stream_ends: bool) -> tuple[str, bytes]:
        """Send one raw request; ("answer", response) or ("closed", b"").

        C{stream_ends}: an SSE answer ends by itself (a POST's), so it is read whole.
        """
        sock = fs.connect(self.bridge.port, timeout=10)
        try:
            sock.sendall(data)
            if not complete:
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass  # the bridge closed it already
            head = fs.read_until(sock, b"\r\n\r\n", 10, limit=1 << 16)
            if not head:
                assert not complete, f"no answer to a complete request: {data[:300]!r}"
                return "closed", b""
            if b"\r\n\r\n" not in head:
                raise AssertionError(f"incomplete answer {head[:300]!r} to {data[:300]!r}")
            if b"text/event-stream" in head.partition(b"\r\n\r\n")[0].lower() and not stream_ends:
                return "answer", head  # a GET stream: it stays open
            rest, how = fs.read_to_end(sock, 10)
            assert how != "timeout", f"the answer never ended: {(head + rest)[:300]!r}"
            return "answer", head + rest
        except (ConnectionResetError, BrokenPipeError):
            assert not complete, f"reset on a complete request: {data[:300]!r}"
            return "closed", b""
        finally:
            sock.close()

    @FUZZ_SETTINGS
    @given(
        method=st.sampled_from(["POST"] * 6 + ["GET"] * 2 + ["DELETE", "PUT", "HEAD", "OPTIONS"])
        | st.text(
            alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=8
        ),
        path=st.sampled_from(
            [
                "/servers/fx/mcp",
                "/servers/fx/mcp",
                "/servers/fx/mcp",
                "/servers/fx/messages?session_id=LEGACY",
                "/servers/fx/messages?session_id=LEGACY",
                "/servers/fx/messages?sessionId=junk",
                "/servers/fx/messages",
                "/servers/fx/sse",
                "/servers/fx",
                "/servers",
                "/health",
                "/",
                "/servers/nope/mcp",
                "/servers/fx/mcp/extra",
                "//servers//fx/mcp",
                "/servers/%FF/mcp",
                "/servers/fx/mcp?x=%00",
                "*",
            ]
        )
        | st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=30).map(
            lambda p: "/" + p
        ),
        session=st.sampled_from(["NEW", "NEW", "NEW", "OLD", "OLD", None, "", "junk", "NEW NEW"]),
        accept=st.sampled_from(
            [
                fs.ACCEPT_BOTH,
                fs.ACCEPT_BOTH,
                "application/json",
                "text/event-stream",
                None,
                "*/*",
                "image/png",
            ]
        )
        | header_text,
        content_type=st.sampled_from(
            ["application/json"] * 4 + [None, "text/plain", "application/json; charset=utf-8"]
        )
        | header_text,
        version=st.sampled_from([None, None, fs.PROTOCOL, "2024-11-05", "2099-01-01", ""])
        | header_text,
        extra=st.dictionaries(
            st.sampled_from(
                [
                    "Last-Event-ID",
                    "Origin",
                    "Host",
                    "Transfer-Encoding",
                    "Expect",
                    "X-Junk",
                    "Cookie",
                ]
            )
            | st.text(
                alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"),
                min_size=1,
                max_size=10,
            ),
            header_text,
            max_size=3,
        ),
        body=bodies,
        framing=st.sampled_from(
            ["exact"] * 6 + ["short", "chunked", "broken-chunked", "junk-length"]
        ),
    )
    @example(
        method="GET",
        path="/servers/fx/mcp",
        session="NEW",
        accept="text/event-stream",
        content_type=None,
        version=None,
        extra={"Last-Event-ID": "0-99999999999999999999"},
        body=b"",
        framing="exact",
    )
    @example(
        method="POST",
        path="/servers/fx/mcp",
        session="NEW",
        accept=fs.ACCEPT_BOTH,
        content_type="application/json",
        version=fs.PROTOCOL,
        extra={},
        body=OVERSIZE,
        framing="exact",
    )
    def test_raw_requests(
        self,
        method: str,
        path: str,
        session: str | None,
        accept: str | None,
        content_type: str | None,
        version: str | None,
        extra: dict[str, str],
        body: bytes,
        framing: str,
    ) -> None:
        headers: dict[str, str] = {}
        if session is not None:
            headers["Mcp-Session-Id"] = self.session_id(session)
        for name, value in (
            ("Accept", accept),
            ("Content-Type", content_type),
            ("MCP-Protocol-Version", version),
        ):
            if value is not None:
                headers[name] = value
        for name, value in extra.items():
            if name.lower() not in {k.lower() for k in headers} | {"content-length", "connection"}:
                headers[name] = value
        self.send(method, path, headers, body, framing)

    @FUZZ_SETTINGS
    @given(
        route=st.sampled_from(["streamable"] * 3 + ["legacy"]),
        session=st.sampled_from(["NEW", "NEW", "OLD"]),
        accept=st.sampled_from([fs.ACCEPT_BOTH, "application/json"]),
        body=st.one_of(
            messages.map(lambda m: json.dumps(m).encode()),
            st.lists(messages, min_size=1, max_size=4).map(lambda m: json.dumps(m).encode()),
            st.tuples(messages, st.integers(0, 60)).map(
                lambda t: json.dumps(t[0]).encode()[: t[1]]
            ),
        ),
    )
    @example(route="streamable", session="OLD", accept="application/json", body=b"[]")
    @example(route="legacy", session="NEW", accept="application/json", body=OVERSIZE)
    def test_jsonrpc_messages(self, route: str, session: str, accept: str, body: bytes) -> None:
        """Well-framed HTTP, fuzzed JSON-RPC: every answer is JSON-RPC, never a 5xx."""
        headers = {"Content-Type": "application/json", "Accept": accept}
        if route == "streamable":
            path = "/servers/fx/mcp"
            headers["Mcp-Session-Id"] = self.session_id(session)
        else:
            path = "/servers/fx/messages?session_id=LEGACY"
        answer = self.send("POST", path, headers, body)
        assert answer is not None
        status, response_headers, response_body = answer
        assert status in (200, 202, 400, 404, 413), (status, response_body[:300])
        if route == "legacy":
            assert status != 200, status  # answers go to the stream
        if status == 200:
            # Every request of the POST is answered, each with its own id.
            sent = [m for m in message_list(body) if isinstance(m, dict) and "method" in m]
            ids = [m["id"] for m in sent if "id" in m]
            if response_headers.get("content-type", "").startswith("text/event-stream"):
                answers = [json.loads(d) for _, d in fs.sse_events(response_body.decode())]
            else:
                parsed = json.loads(response_body)
                answers = parsed if isinstance(parsed, list) else [parsed]
            responses = [a for a in answers if "method" not in a]
            assert sorted(map(repr, (r["id"] for r in responses))) == sorted(map(repr, ids)), (
                body[:300],
                answers,
            )
            for r in responses:
                assert r.get("jsonrpc") == "2.0" and ("result" in r) != ("error" in r), r

    @FUZZ_SETTINGS
    @given(
        route=st.sampled_from(
            [
                ("POST", "/servers/fx/mcp"),
                ("POST", "/servers/fx/mcp"),
                ("GET", "/servers/fx/mcp"),
                ("DELETE", "/servers/fx/mcp"),
                ("GET", "/servers/fx/sse"),
                ("POST", "/servers/fx/messages?session_id=LEGACY"),
                ("GET", "/servers"),
                ("GET", "/health"),
            ]
        ),
        fuzzed=st.dictionaries(
            st.sampled_from(
                [
                    "Accept",
                    "Content-Type",
                    "MCP-Protocol-Version",
                    "Mcp-Session-Id",
                    "Last-Event-ID",
                    "Origin",
                    "Host",
                ]
            ),
            header_text
            | st.sampled_from(
                [
                    "",
                    "*/*",
                    "text/*",
                    "application/*;q=0",
                    "application/json;;;",
                    "0-1",
                    "1-0",
                    "999-999",
                    "-1",
                    "0-",
                    "2025-03-26",
                    "null",
                    "http://localhost:1",
                    "http://[::1",
                    "localhost:0",
                    "[::1]:99999",
                ]
            ),
            min_size=1,
            max_size=4,
        ),
        body=st.sampled_from(
            [
                json.dumps(fs.tool_call(1, "echo", {"message": "h"})).encode(),
                json.dumps({"jsonrpc": "2.0", "id": 2, "method": "ping"}).encode(),
                json.dumps(fs.initialize(3)).encode(),
                json.dumps(fs.INITIALIZED).encode(),
            ]
        ),
    )
    @example(
        route=("GET", "/servers/fx/mcp"),
        fuzzed={"Last-Event-ID": "1-1", "Accept": "text/event-stream"},
        body=b"",
    )
    def test_wrongly_typed_headers(
        self, route: tuple[str, str], fuzzed: dict[str, str], body: bytes
    ) -> None:
        """Valid requests with fuzzed values in the headers the bridge reads."""
        method, path = route
        headers = {
            "Accept": fs.ACCEPT_BOTH if method == "POST" else "text/event-stream",
            "Content-Type": "application/json",
            "Mcp-Session-Id": self.sessions[fs.PROTOCOL],
        }
        for name, value in fuzzed.items():
            headers[name] = value.strip()
        self.send(method, path, headers, body if method == "POST" else b"")
