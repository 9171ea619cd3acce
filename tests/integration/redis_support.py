"""A real redis-server for integration tests: Debian's, on a free loopback
port, in a temporary directory, without persistence; it can be stopped and
started again on the same port (a Redis outage)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest

from .harness import wait_for

STARTUP_TIMEOUT = 10.0


def free_port() -> int:
    """A loopback port free now (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_binary() -> str:
    """Debian's redis-server (tests/packages.sh installs it)."""
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if found is None:
        message = "redis-server is not installed (sh tests/packages.sh installs it)"
        if os.environ.get("CI"):
            raise AssertionError("CI is set but " + message)
        raise SkipTest(message)
    return found


class RedisServer:
    """One redis-server process; L{stop} and L{start} keep its port."""

    def __init__(self, password: str | None = None) -> None:
        self.binary = redis_binary()
        self.dir = Path(tempfile.mkdtemp(prefix="mcptwist-redis-"))
        self.port = free_port()
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
        ]
        if self.password:
            argv += ["--requirepass", self.password]
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for(self._answers, STARTUP_TIMEOUT, "redis-server to answer PING")

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"redis-server exited: {(self.dir / 'redis.log').read_text()}")
        try:
            return self.command("PING") == "PONG"
        except OSError:
            return False

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            process.wait(10)

    def close(self) -> None:
        """Stop it for good and remove its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def command(self, *args: str) -> Any:
        """One command over a fresh connection; its reply (RESP2, decoded)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2.0) as s:
            if self.password:
                s.sendall(_encode(["AUTH", self.password]))
            s.sendall(_encode(list(args)))
            reader = s.makefile("rb")
            if self.password:
                _reply(reader)
            return _reply(reader)


def _encode(words: list[str]) -> bytes:
    parts = [b"*%d\r\n" % len(words)]
    for word in words:
        data = word.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _reply(reader: Any) -> Any:
    line = reader.readline().rstrip(b"\r\n")
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = reader.read(size + 2)[:-2]
        return data.decode()
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_reply(reader) for _ in range(count)]
    raise RuntimeError(f"unexpected reply {line!r}")


def start_redis(test: Any, password: str | None = None) -> RedisServer:
    """Start a redis-server, closed when C{test} ends."""
    server = RedisServer(password)
    test.addCleanup(server.close)
    return server
