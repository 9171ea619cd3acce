"""A cluster on this host for integration tests: a redis-server
(C{redis_support}), N bridge nodes and HAProxy running the shipped
C{etc/haproxy/haproxy.cfg}.

Every process listens on 127.0.0.1, on ports picked before any of them
starts, so that each node knows the URL it is reached at (C{advertise}) and
the balancer knows every node. Each node is a real C{twistd mcpbridge} with a
C{[cluster]} table (C{node_id} n1..nN, one key shared through the environment,
the Redis URL, its own URL) serving the built-in example server, behind a
listener that trusts the balancer's C{X-Forwarded-For}. HAProxy gets its
addresses through the environment, as the shipped file expects, and a
runtime API socket that the tests read server states from.

L{Cluster.stop} (a cleanup of the test that made it) stops the balancer, then
every node (each checked for a clean exit with no child left), then Redis.
Everything here is synchronous, like C{harness}.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client as http_client
import json
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest

from . import harness as h
from .redis_support import RedisServer

HAPROXY_CFG = h.REPO / "etc" / "haproxy" / "haproxy.cfg"
SERVER = "example"
STOP_TIMEOUT = 10.0
# A node of a cluster drains on SIGTERM: keep it short, so that a test's
# cleanup stops every node within the harness's deadline.
DRAIN_TIMEOUT = 3.0

# One line of the shipped log-format (see haproxy.cfg):
# CLIENT [DATE] FRONTEND BACKEND/SERVER TR/Tw/Tc/Tr/Ta STATUS BYTES TERM
# ac/fc/bc/sc/rc sq/bq node=NODE "METHOD PATH VERSION"
_LOG_LINE = re.compile(
    r"^(?P<client>\S+) \[(?P<date>[^\]]+)\] (?P<frontend>\S+) (?P<backend>[^/\s]+)/(?P<server>\S+) "
    r"(?P<timers>\S+) (?P<status>-?\d+) (?P<bytes>\d+) (?P<term>\S+) "
    r"\S+/\S+/\S+/\S+/(?P<retries>\+?\d+) \S+ node=(?P<node>\S+) "
    r'"(?P<method>\S+) (?P<path>\S+) (?P<version>\S+)"$'
)


def require_binary(name: str, *fallbacks: str) -> str:
    """The path of a program the cluster needs; skip (fail under CI) without it."""
    found = shutil.which(name) or next((f for f in fallbacks if os.access(f, os.X_OK)), None)
    if found:
        return found
    message = f"{name} is not installed (apt-get install {name})"
    if os.environ.get("CI"):
        raise AssertionError("CI is set but " + message)
    raise SkipTest(message)


def free_ports(count: int) -> list[int]:
    """C{count} distinct free ports on 127.0.0.1 (held together while chosen)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def connects(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


class Node:
    """One bridge node of the cluster (a L{harness.Bridge} with [cluster])."""

    def __init__(
        self,
        directory: Path,
        node_id: str,
        port: int,
        key: str,
        redis_url: str | None,
        servers: str,
        extra: str = "",
        drain_timeout: float = DRAIN_TIMEOUT,
    ) -> None:
        self.id = node_id
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.address = f"127.0.0.1:{port}"
        self.config = (
            f"drain_timeout = {drain_timeout:g}\n"
            + extra
            + node_toml(node_id, port, redis_url)
            + servers
        )
        directory.mkdir()
        self.bridge = h.Bridge(
            self.config,
            listen=None,
            directory=directory,
            env={"MCPTWIST_CLUSTER_KEY": key},
        )
        self.redis = redis_url is not None
        self.gone = False

    @property
    def pid(self) -> int:
        return self.bridge.pid

    @property
    def log(self) -> str:
        return self.bridge.log

    def get_json(self, path: str) -> tuple[int, Any]:
        return self.bridge.get_json(path)

    def health(self) -> tuple[int, Any]:
        """/health's status and body."""
        return health(self.base)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until /health answers 200, and, for a node given a Redis, says it
        reaches it (where /health names anything: not with authentication)."""
        wait_healthy(self.id, self.base, self.redis, timeout)

    def sessions(self) -> set[str]:
        """The ids of the sessions this node holds (its admin API)."""
        return held_sessions(self.id, self.bridge)

    def kill(self) -> None:
        """SIGKILL the node (not its children, which see their stdin close and
        exit); wait until none of its children is left."""
        children = self.bridge.children()
        self.gone = True
        self.bridge.stopped = True
        self.bridge.proc.send_signal(signal.SIGKILL)
        self.bridge.proc.wait(timeout=5)
        self.died_at = time.time()
        self._reaped(children)

    def terminate(self) -> None:
        """SIGTERM, as a rolling restart does: a node of a cluster drains."""
        self.children_before_stop = self.bridge.children()
        self.bridge.proc.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout: float) -> None:
        """Wait for the node to exit by itself (after L{terminate}, or an
        admin drain): with status 0, leaving no child behind."""
        self.gone = True
        self.bridge.stopped = True
        try:
            code = self.bridge.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.bridge.proc.pid, signal.SIGKILL)
            self.bridge.proc.wait(timeout=5)
            raise AssertionError(
                f"{self.id} did not exit within {timeout:g}s:\n{self.log[-4000:]}"
            ) from None
        self._reaped(getattr(self, "children_before_stop", {}))
        # twistd ends itself with the signal that stopped it.
        if code not in (0, -signal.SIGTERM):
            raise AssertionError(f"{self.id} exited with {code}:\n{self.log[-4000:]}")

    def _reaped(self, children: Mapping[int, str]) -> None:
        try:
            h.wait_for(
                lambda: not h.Bridge._leftovers(children),
                h.ORPHAN_REAP_GRACE + 5,
                f"the children of node {self.id} to exit",
            )
        finally:
            for pid in h.Bridge._leftovers(children):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.bridge._log_file.close()

    def stop(self) -> None:
        if not self.gone:
            self.bridge.stop()


def health(base: str) -> tuple[int, Any]:
    """A node's /health: its status and body."""
    status, _, body = h.http("GET", f"{base}/health", timeout=5)
    return status, json.loads(body)


def wait_healthy(node_id: str, base: str, redis: bool, timeout: float = 30.0) -> None:
    """Until a node's /health answers 200, and, for a node given a Redis
    (C{redis}), says it reaches it (where /health names anything: not with
    authentication)."""

    def healthy() -> bool:
        status, body = health(base)
        reached = body.get("cluster", {}).get("redis", "up")
        return status == 200 and (not redis or reached == "up")

    h.wait_for(healthy, timeout, f"{node_id}'s /health to answer 200")


def held_sessions(node_id: str, bridge: h.Bridge) -> set[str]:
    """The ids of the sessions a node holds (its admin API, asked directly)."""
    status, body = bridge.get_json("/admin/sessions")
    if status != 200:
        raise AssertionError(f"{node_id}: GET /admin/sessions gave {status}: {body}")
    return {s["id"] for s in body["sessions"]}


def node_toml(node_id: str, port: int, redis_url: str | None) -> str:
    """A node's listener (trusting the balancer and the other nodes, all on
    127.0.0.1) and its [cluster] table."""
    cluster = (
        "\n[[listeners]]\n"
        f"endpoint = {h.toml_str(f'tcp:{port}:interface=127.0.0.1')}\n"
        'trusted_proxies = ["127.0.0.1"]\n\n'
        "[cluster]\n"
        f"node_id = {h.toml_str(node_id)}\n"
        'keys = ["${MCPTWIST_CLUSTER_KEY}"]\n'
        f"advertise = {h.toml_str(f'http://127.0.0.1:{port}')}\n"
    )
    if redis_url is not None:
        cluster += f"redis = {h.toml_str(redis_url)}\n"
    return cluster + "\n"


def example_servers() -> str:
    """The built-in example server, as every node serves it."""
    return h.python_server_toml(SERVER, ["-m", "mcptwist.example"])


class HAProxy:
    """HAProxy with the shipped configuration, its addresses from the environment."""

    def __init__(
        self,
        directory: Path,
        port: int,
        nodes: Sequence[str],
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.binary = require_binary("haproxy", "/usr/sbin/haproxy")
        self.dir = directory
        self.port = port
        self.socket_path = directory / "haproxy.sock"
        self.env = haproxy_env(port, nodes, self.socket_path, env)
        self.tls = "MCPTWIST_TLS_PEM" in self.env
        self.base = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"
        checked = h.run([self.binary, "-c", "-f", str(HAPROXY_CFG)], timeout=20, env=self.env)
        if checked.returncode != 0:
            raise AssertionError(f"haproxy -c refused the shipped config:\n{checked.stderr}")
        self.log_path = directory / "haproxy.log"
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [self.binary, "-db", "-f", str(HAPROXY_CFG)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        try:
            h.wait_for(self._ready, 10.0, "haproxy to listen")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"haproxy exited with {self.proc.returncode}:\n{self.log}")
        return connects(self.port) and self.socket_path.exists()

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def requests(self) -> list[dict[str, str]]:
        """Every request HAProxy logged so far, parsed (see the config's log-format)."""
        found = []
        for line in self.log.splitlines():
            match = _LOG_LINE.match(line)
            if match:
                found.append(match.groupdict())
        return found

    def runtime(self, command: str) -> str:
        """One command of the runtime API (its stats socket)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.socket_path))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def states(self) -> dict[str, str]:
        """Each node server's status as HAProxy sees it (UP, DOWN, MAINT, ...)."""
        lines = self.runtime("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        states = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == "nodes" and row.get("svname") not in ("BACKEND", None):
                states[row["svname"]] = row["status"].split(" ")[0]
        return states

    def wait_state(self, server: str, state: str, timeout: float = 15.0) -> None:
        h.wait_for(
            lambda: self.states().get(server) == state,
            timeout,
            f"haproxy to see {server} {state} (states: {self.states()})",
            interval=0.1,
        )

    def stop(self) -> None:
        _stop_process(self.proc)
        self._log_file.close()


def haproxy_env(
    port: int,
    nodes: Sequence[str],
    socket_path: Path | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment the shipped haproxy.cfg reads: its address, the nodes'
    (MCPTWIST_NODE1..), and the runtime API socket."""
    env = dict(os.environ)
    for name in [k for k in env if k.startswith("MCPTWIST_")]:
        del env[name]
    env["MCPTWIST_BIND"] = f"127.0.0.1:{port}"
    for i, address in enumerate(nodes, 1):
        env[f"MCPTWIST_NODE{i}"] = address
    if socket_path is not None:
        env["MCPTWIST_STATS_SOCKET"] = str(socket_path)
    env.update(extra or {})
    return env


class Cluster:
    """Redis, C{size} nodes n1..nN and HAProxy in front of them.

    With C{redis=False} no Redis runs; with C{redis_in_config=False} it runs
    but the nodes are not told about it; with C{balancer=False} no HAProxy
    runs (a test that speaks to each node itself). C{servers} is the nodes' servers
    (default: the example server), C{extra} goes at the top of every node's
    configuration (before any table), C{haproxy_env} adds to the balancer's
    environment, and each node drains for C{drain_timeout} at most when it stops.
    """

    def __init__(
        self,
        size: int = 3,
        redis: bool = True,
        redis_in_config: bool = True,
        servers: str | None = None,
        extra: str = "",
        haproxy_env: Mapping[str, str] | None = None,
        drain_timeout: float = DRAIN_TIMEOUT,
        balancer: bool = True,
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mcptwist-cluster-"))
        self.key = secrets.token_urlsafe(32)
        ports = free_ports(size + 1)
        self.extra = extra
        self.drain_timeout = drain_timeout
        self.restarts = 0
        self.redis: RedisServer | None = None
        self.nodes: list[Node] = []
        self.haproxy: HAProxy | None = None
        try:
            if redis:
                self.redis = RedisServer()
            redis_url = self.redis.url if self.redis is not None and redis_in_config else None
            servers = servers if servers is not None else example_servers()
            self.redis_url, self.servers = redis_url, servers
            with ThreadPoolExecutor(size) as pool:
                starting = [
                    pool.submit(
                        Node,
                        self.dir / f"n{i}",
                        f"n{i}",
                        ports[i - 1],
                        self.key,
                        redis_url,
                        servers,
                        extra,
                        drain_timeout,
                    )
                    for i in range(1, size + 1)
                ]
                failures = []
                for future in starting:
                    try:
                        self.nodes.append(future.result())
                    except BaseException as e:
                        failures.append(e)
                if failures:
                    raise failures[0]
            # Every node healthy first: HAProxy takes a server for UP until its
            # checks fail, so a node still starting its children would flap.
            for node in self.nodes:
                node.wait_healthy()
            if not balancer:
                return
            self.haproxy = HAProxy(
                self.dir, ports[size], [n.address for n in self.nodes], haproxy_env
            )
            for node in self.nodes:
                self.haproxy.wait_state(node.id, "UP")
        except BaseException:
            self.stop()
            raise

    def node(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.id == node_id)

    def restart(self, node_id: str) -> Node:
        """Start a node again, on its port, once it has exited (after
        L{Node.kill} or L{Node.wait_exit}); back when HAProxy has it UP."""
        old = self.node(node_id)
        assert old.gone, f"{node_id} still runs"
        self.restarts += 1
        new = Node(
            self.dir / f"{node_id}-{self.restarts}",
            node_id,
            old.port,
            self.key,
            self.redis_url,
            self.servers,
            self.extra,
            self.drain_timeout,
        )
        self.nodes[self.nodes.index(old)] = new
        new.wait_healthy()
        if self.haproxy is not None:
            self.haproxy.wait_state(node_id, "UP")
        return new

    @property
    def base(self) -> str:
        assert self.haproxy is not None
        return self.haproxy.base

    def mcp_url(self, name: str = SERVER) -> str:
        return f"{self.base}/servers/{name}/mcp"

    def sse_url(self, name: str = SERVER) -> str:
        return f"{self.base}/servers/{name}/sse"

    def logs(self) -> str:
        """The tail of every log, for a failure's message."""
        parts = []
        if self.haproxy is not None:
            parts.append(f"--- haproxy ---\n{self.haproxy.log[-6000:]}")
        for node in self.nodes:
            parts.append(f"--- {node.id} ---\n{node.log[-3000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop the balancer, every node and Redis; raise the first problem."""
        problems: list[BaseException] = []
        if self.haproxy is not None:
            try:
                self.haproxy.stop()
            except BaseException as e:
                problems.append(e)
        for node in self.nodes:
            try:
                node.stop()
            except BaseException as e:
                problems.append(e)
        if self.redis is not None:
            try:
                self.redis.close()
            except BaseException as e:
                problems.append(e)
        if problems:
            raise problems[0]
        shutil.rmtree(self.dir, ignore_errors=True)


def start_cluster(test: Any, **options: Any) -> Cluster:
    """Start a cluster and register its (checked) stop as a cleanup of C{test}."""
    cluster = Cluster(**options)
    test.addCleanup(cluster.stop)
    return cluster


class ClusterClient:
    """C{clients/cluster_client.py}: many SDK sessions in one process,
    driven by commands on its stdin (see that script)."""

    def __init__(
        self,
        test: Any,
        base: str,
        sessions: str,
        calls: int = 3,
        options: Sequence[str] = (),
        timeout: float = 60.0,
    ) -> None:
        self.timeout = timeout
        argv = h.client_argv(
            "cluster_client.py",
            "--base",
            base,
            "--sessions",
            sessions,
            "--calls",
            str(calls),
            *options,
        )
        self.stderr_file = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr_file,
            text=True,
            env=h.python_env(),
            start_new_session=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._read_lines, daemon=True)
        self.reader.start()
        test.addCleanup(self.end)

    @property
    def stderr(self) -> str:
        self.stderr_file.seek(0)
        return self.stderr_file.read().decode(errors="replace")[-4000:]

    def read(self, event: str) -> dict[str, Any]:
        """The next report, which must be C{event}."""
        try:
            line = self.lines.get(timeout=self.timeout)
        except queue.Empty:
            line = ""
        if not line:
            stderr = self.stderr
            self.end()
            raise AssertionError(
                f"the cluster client said nothing within {self.timeout:g}s "
                f"(waiting for {event!r}); stderr:\n{stderr}"
            )
        report: dict[str, Any] = json.loads(line)
        if report["event"] != event:
            raise AssertionError(
                f"the cluster client said {report['event']!r}, not {event!r}: "
                f"{json.dumps(report)[:6000]}\nstderr:\n{self.stderr}"
            )
        return report

    def _read_lines(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def command(self, word: str, event: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()
        return self.read(event)

    def close(self) -> dict[str, Any]:
        report = self.command("close", "closed")
        self.proc.wait(timeout=30)
        return report

    def end(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.reader.join(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self.stderr_file.close()


def assert_all_well(report: Mapping[str, Any], calls: int) -> None:
    """Every session of a L{ClusterClient} report made C{calls} good calls,
    all in one session (if any), with no error and no wrong answer."""
    for s in report["sessions"]:
        assert not s["errors"] and not s["wrong"], s
        assert s["connects"] == 1, s
        if s["kind"] == "modern":
            assert s["ids"] == [] and s["good"] == {"-": calls}, s
        else:
            assert len(s["ids"]) == 1 and s["good"] == {s["ids"][0]: calls}, s


def accepted_at(request: Mapping[str, str]) -> float:
    """When HAProxy accepted a request it logged (its local time, as this process's)."""
    accepted = datetime.datetime.strptime(request["date"], "%d/%b/%Y:%H:%M:%S.%f")
    return accepted.timestamp()


def node_of(session_id: str) -> str:
    """The node a session id names (its first field)."""
    return session_id.partition(".")[0]


def tls_context(cafile: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cafile)


class LegacyStream:
    """A legacy HTTP+SSE session held open by hand: GET .../sse, and the
    session id of its C{endpoint} event."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.connection = http_client.HTTPConnection(parsed.netloc, timeout=timeout)
        self.connection.request("GET", parsed.path, headers={"Accept": "text/event-stream"})
        self.response = self.connection.getresponse()
        if self.response.status != 200:
            raise AssertionError(f"GET {url} gave {self.response.status}")
        endpoint = None
        while endpoint is None:
            line = self.response.readline().decode()
            if not line:
                raise AssertionError(f"GET {url} ended before its endpoint event")
            if line.startswith("data:"):
                endpoint = line[5:].strip()
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(endpoint).query)
        self.session_id = query["session_id"][0]

    def close(self) -> None:
        self.connection.close()
