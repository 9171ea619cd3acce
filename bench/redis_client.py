#!/usr/bin/env python3
"""Which Redis client for the cluster's shared state: txredisapi on Twisted's
default reactor, or redis.asyncio on Twisted's asyncio reactor.

    .venv/bin/pip install redis        # redis-py: for this measurement only
    PYTHONPATH=src .venv/bin/python bench/redis_client.py [--calls 2000] [--runs 3]

Starts its own redis-server (Debian's, on a free port, in a temporary
directory), then for each client, in a process of its own: the token-bucket
script of mcptwist.cluster.store (one bucket, as EVALSHA once loaded), C{calls}
at once and C{calls} one after the other, C{runs} times; then what a call
does while redis-server is stopped for 2 s (with and without a 0.25 s
deadline), and how soon after the restart a call succeeds again. Prints one
table; the numbers of a run are kept in bench/notes.md by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.python.failure import Failure

REPO = Path(__file__).resolve().parent.parent
OUTAGE = 2.0
DEADLINE = 0.25
ARGS = ["1", "0", "1", "1000000.0", "1000000000.0"]  # cost, paid, spend, rate, burst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server of its own, no persistence, that can be stopped and started again."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.directory,
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


def parent(calls: int, runs: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        server = RedisServer(directory)
        server.start()
        control = Path(directory) / "control"
        try:
            results = {}
            for client in ("txredisapi", "redis.asyncio"):
                env = {
                    **os.environ,
                    "PYTHONPATH": f"{REPO / 'src'}:{os.environ.get('PYTHONPATH', '')}",
                }
                child = subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        client,
                        "--port",
                        str(server.port),
                        "--calls",
                        str(calls),
                        "--runs",
                        str(runs),
                        "--control",
                        str(control),
                    ],
                    stdout=subprocess.PIPE,
                    env=env,
                    text=True,
                )
                assert child.stdout is not None
                for line in child.stdout:
                    message = json.loads(line)
                    if message.get("stop"):
                        # The child asks: stop redis-server for OUTAGE seconds, then restart it.
                        server.stop()
                        control.write_text("stopped")
                        time.sleep(OUTAGE)
                        server.start()
                        control.write_text(f"started {time.time()}")
                    elif "result" in message:
                        results[client] = message["result"]
                if child.wait() != 0:
                    raise SystemExit(f"{client}: the measurement failed")
        finally:
            server.stop()
    report(results, calls)


def report(results: dict[str, Any], calls: int) -> None:
    def spread(values: list[float]) -> str:
        return f"{min(values):.2f} to {max(values):.2f} s"

    rows = [
        (f"{calls} concurrent EVALSHA", lambda r: spread(r["concurrent"])),
        (f"{calls} concurrent: calls that failed, all runs", lambda r: r["refused"]),
        (f"{calls} sequential EVALSHA", lambda r: spread(r["sequential"])),
        (f"a call while redis-server is stopped {OUTAGE:g} s, no deadline", lambda r: r["outage"]),
        (f"the same, with a {DEADLINE:g} s deadline", lambda r: r["deadline"]),
        ("first success after the restart (a call every 50 ms)", lambda r: r["recovery"]),
        ("RSS after the runs", lambda r: f"{r['rss_mib']:.0f} MiB"),
    ]
    names = list(results)
    print("| | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for label, cell in rows:
        print(f"| {label} | " + " | ".join(str(cell(results[n])) for n in names) + " |")


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def ask_for_outage(control: Path) -> None:
    control.unlink(missing_ok=True)
    print(json.dumps({"stop": True}), flush=True)


def wait_for(control: Path, state: str) -> bool:
    return control.exists() and control.read_text().startswith(state)


def restarted_at(control: Path) -> float:
    """When the parent had restarted redis-server (wall clock)."""
    return float(control.read_text().split()[1])


# txredisapi on the default reactor


def child_txredisapi(port: int, calls: int, runs: int, control: Path) -> dict[str, Any]:
    from twisted.internet import defer, reactor, task

    from mcptwist.cluster.store import TAKE, RedisAddress, TxRedisClient

    # The bridge's own pool: 2 connections, reconnecting at most 2 s apart.
    pool = TxRedisClient(RedisAddress("127.0.0.1", port), reactor, reply_timeout=1.0)
    result: dict[str, Any] = {"concurrent": [], "sequential": [], "refused": 0}

    def take() -> defer.Deferred[Any]:
        return pool.eval(TAKE, ["bench"], ARGS)

    async def outcome(d: defer.Deferred[Any]) -> str:
        began = time.monotonic()
        try:
            await d
        except Exception as e:
            return f"{type(e).__name__} after {time.monotonic() - began:.2f} s"
        return f"succeeded after {time.monotonic() - began:.2f} s"

    async def measure() -> None:
        while not pool.connected():
            await task.deferLater(reactor, 0.01, lambda: None)
        await take()  # loads the script
        for _ in range(runs):
            began = time.monotonic()
            outcomes = await defer.DeferredList([take() for _ in range(calls)], consumeErrors=True)
            result["concurrent"].append(time.monotonic() - began)
            result["refused"] += sum(1 for ok, _ in outcomes if not ok)
            began = time.monotonic()
            for _ in range(calls):
                await take()
            result["sequential"].append(time.monotonic() - began)
        ask_for_outage(control)
        while not wait_for(control, "stopped"):
            await task.deferLater(reactor, 0.01, lambda: None)
        await task.deferLater(reactor, 0.1, lambda: None)
        waiting = defer.Deferred.fromCoroutine(outcome(take()))
        bounded = take()
        bounded.addTimeout(DEADLINE, reactor)
        result["deadline"] = await outcome(bounded)
        # Calls with a deadline every 50 ms, from the outage on, until one succeeds.
        while True:
            attempt = take()
            attempt.addTimeout(DEADLINE, reactor)
            try:
                await attempt
                break
            except Exception:
                await task.deferLater(reactor, 0.05, lambda: None)
        recovered = time.time()
        while not wait_for(control, "started"):
            await task.deferLater(reactor, 0.01, lambda: None)
        result["recovery"] = f"{max(0.0, recovered - restarted_at(control)):.2f} s"
        result["outage"] = await waiting
        result["rss_mib"] = rss_mib()
        await pool.disconnect()

    def done(outcome: Any) -> None:
        if isinstance(outcome, Failure):
            outcome.printTraceback(sys.stderr)
            result["failed"] = outcome.getErrorMessage()
        reactor.stop()

    d = defer.Deferred.fromCoroutine(measure())
    d.addBoth(done)
    reactor.run()
    return result


# redis.asyncio on Twisted's asyncio reactor


def child_asyncio(port: int, calls: int, runs: int, control: Path) -> dict[str, Any]:
    from twisted.internet import asyncioreactor

    asyncioreactor.install()
    import asyncio

    import redis.asyncio as aioredis
    from twisted.internet import defer, reactor, task

    from mcptwist.cluster.store import TAKE

    pool = aioredis.BlockingConnectionPool(
        host="127.0.0.1",
        port=port,
        max_connections=8,
        timeout=DEADLINE,
        socket_timeout=1.0,
        socket_connect_timeout=DEADLINE,
    )
    client = aioredis.Redis(connection_pool=pool)
    script = client.register_script(TAKE)
    result: dict[str, Any] = {"concurrent": [], "sequential": [], "refused": 0}

    def take() -> defer.Deferred[Any]:
        return defer.Deferred.fromFuture(asyncio.ensure_future(script(keys=["bench"], args=ARGS)))

    async def outcome(d: defer.Deferred[Any]) -> str:
        began = time.monotonic()
        try:
            await d
        except Exception as e:
            return f"{type(e).__name__} after {time.monotonic() - began:.2f} s"
        return f"succeeded after {time.monotonic() - began:.2f} s"

    async def measure() -> None:
        await take()
        for _ in range(runs):
            began = time.monotonic()
            outcomes = await defer.DeferredList([take() for _ in range(calls)], consumeErrors=True)
            result["concurrent"].append(time.monotonic() - began)
            result["refused"] += sum(1 for ok, _ in outcomes if not ok)
            began = time.monotonic()
            for _ in range(calls):
                await take()
            result["sequential"].append(time.monotonic() - began)
        ask_for_outage(control)
        while not wait_for(control, "stopped"):
            await task.deferLater(reactor, 0.01, lambda: None)
        await task.deferLater(reactor, 0.1, lambda: None)
        waiting = defer.Deferred.fromCoroutine(outcome(take()))
        bounded = take()
        bounded.addTimeout(DEADLINE, reactor)
        result["deadline"] = await outcome(bounded)
        # Calls with a deadline every 50 ms, from the outage on, until one succeeds.
        while True:
            attempt = take()
            attempt.addTimeout(DEADLINE, reactor)
            try:
                await attempt
                break
            except Exception:
                await task.deferLater(reactor, 0.05, lambda: None)
        recovered = time.time()
        while not wait_for(control, "started"):
            await task.deferLater(reactor, 0.01, lambda: None)
        result["recovery"] = f"{max(0.0, recovered - restarted_at(control)):.2f} s"
        result["outage"] = await waiting
        result["rss_mib"] = rss_mib()
        await defer.Deferred.fromFuture(asyncio.ensure_future(client.aclose()))

    def done(outcome: Any) -> None:
        if isinstance(outcome, Failure):
            outcome.printTraceback(sys.stderr)
            result["failed"] = outcome.getErrorMessage()
        reactor.stop()

    reactor.callWhenRunning(lambda: defer.Deferred.fromCoroutine(measure()).addBoth(done))
    reactor.run()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", choices=("txredisapi", "redis.asyncio"))
    parser.add_argument("--port", type=int)
    parser.add_argument("--control", type=Path)
    args = parser.parse_args()
    if args.child is None:
        parent(args.calls, args.runs)
        return
    measure = child_txredisapi if args.child == "txredisapi" else child_asyncio
    result = measure(args.port, args.calls, args.runs, args.control)
    if "failed" in result:
        raise SystemExit(f"{args.child}: {result['failed']}")
    print(json.dumps({"result": result}), flush=True)


if __name__ == "__main__":
    main()
