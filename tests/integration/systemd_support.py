"""systemd stood in for by its own tools, for integration tests.

C{systemd-socket-activate} stands in for systemd: it binds the sockets, names
them (C{LISTEN_FDNAMES}) and, on the first connection, execs twistd in its own
process, so that C{LISTEN_PID} is the bridge's pid, as under a real socket
unit (L{ActivatedBridge}). sd_notify goes to a datagram socket a test binds
(L{NotifySocket}), given as C{NOTIFY_SOCKET}. Unit files are read as systemd
reads their keys (L{read_unit}), and checked by C{systemd-analyze verify}
(L{verify_units}).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from . import harness as h

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
UNITS = h.REPO / "etc" / "systemd"


class NotifySocket:
    """Where systemd would listen: a datagram socket collecting sd_notify messages."""

    def __init__(self, test: SynchronousTestCase) -> None:
        # A short path of its own: Unix socket paths are limited to 107 bytes.
        directory = tempfile.mkdtemp(prefix="sdn-")
        test.addCleanup(shutil.rmtree, directory, True)
        self.address = os.path.join(directory, "notify")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        test.addCleanup(self.socket.close)
        self.socket.bind(self.address)
        self.socket.setblocking(False)
        self.received: list[dict[str, str]] = []

    def poll(self) -> list[dict[str, str]]:
        """Every message so far, each as its fields."""
        while True:
            try:
                data = self.socket.recv(65536).decode("utf-8")
            except BlockingIOError:
                return self.received
            self.received.append(dict(line.split("=", 1) for line in data.splitlines() if line))


class ActivatedBridge(h.Bridge):
    """A bridge started by C{systemd-socket-activate}, on sockets it inherits.

    C{sockets} are (name, port) pairs, each a listening socket on 127.0.0.1
    named C{name}. The base URL is that of the C{http} socket. The config is
    written to C{mcpbridge.toml} in C{directory} (default: a new temporary
    one), and C{command} is what gets exec'd with the sockets (default:
    C{twistd -n --pidfile= mcpbridge --config} that file). The checked stop
    of L{h.Bridge} applies: SIGTERM, a clean exit, no child left.
    """

    def __init__(
        self,
        config: str,
        sockets: Sequence[tuple[str, int]],
        env: Mapping[str, str] | None = None,
        wait: bool = True,
        directory: Path | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        if SOCKET_ACTIVATE is None:
            raise SkipTest("systemd-socket-activate is not installed")
        self.dir = directory or Path(tempfile.mkdtemp(prefix="mcptwist-sd-"))
        self.context = None
        self.headers = {}
        self.log_path = self.dir / "bridge.log"
        config_path = self.dir / "mcpbridge.toml"
        config_path.write_text(config)
        self.ports = dict(sockets)
        argv = [SOCKET_ACTIVATE]
        for _, port in sockets:
            argv += ["--listen", f"127.0.0.1:{port}"]
        argv.append("--fdname=" + ":".join(name for name, _ in sockets))
        # systemd-socket-activate passes on only PATH, HOME, USER, TERM and these.
        child_env = {
            "PYTHONPATH": h.python_env()["PYTHONPATH"],
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        for name, value in child_env.items():
            argv += ["-E", f"{name}={value}"]
        if command is None:
            command = [h.TWISTD, "-n", "--pidfile=", "mcpbridge", "--config", str(config_path)]
        argv += command
        self.argv = argv
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=str(self.dir),
            env=h.python_env(),
            start_new_session=True,
        )
        self.stopped = False
        self.port = self.ports.get("http", sockets[0][1])
        self.base = f"http://127.0.0.1:{self.port}"
        try:
            h.wait_for(self._activate, h.STARTUP_TIMEOUT, "systemd-socket-activate to listen")
            if wait:
                h.wait_for(self._listening, h.STARTUP_TIMEOUT, "the bridge to log 'listening on'")
                h.wait_for(self._answers, h.STARTUP_TIMEOUT, "the bridge to answer HTTP")
        except BaseException:
            self._abort()
            raise

    def _activate(self) -> bool:
        """Connect once: systemd-socket-activate runs its command on a first connection."""
        self.alive()
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"the bridge exited with {self.proc.returncode}:\n{self.log}")


def start(test: SynchronousTestCase, *args: Any, **kwargs: Any) -> ActivatedBridge:
    bridge = ActivatedBridge(*args, **kwargs)
    test.addCleanup(bridge.stop)
    return bridge


def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file's sections, each a list of (key, value) in order (keys repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path}: {line!r} outside a section"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: Mapping[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: Mapping[str, list[tuple[str, str]]], section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= appears {len(found)} times"
    return found[0]


def verify_units(directory: Path, units: Sequence[str]) -> tuple[int, list[str]]:
    """What C{systemd-analyze verify} says of C{units} (file names in
    C{directory}; an instance of a template there is verified as systemd
    would load it): its exit status and the lines it wrote. Skips without
    systemd-analyze."""
    if SYSTEMD_ANALYZE is None:
        raise SkipTest("systemd-analyze is not installed")
    result = h.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", *(str(directory / u) for u in units)],
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )
    problems = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    version = int(re.findall(r"\d+", h.run([SYSTEMD_ANALYZE, "--version"], 10).stdout)[0])
    if version < 253:
        # notify-reload is newer than this systemd, which falls back to its default.
        problems = [p for p in problems if "notify-reload" not in p]
    return result.returncode, problems
