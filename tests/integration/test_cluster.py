"""A cluster through HAProxy: real bridge nodes with [cluster], a real
redis-server and HAProxy running the shipped C{etc/haproxy/haproxy.cfg},
driven by the official Python SDK on both transports and in both eras.

The SDK sessions run many to a process (C{clients/cluster_client.py}): "http"
is Streamable HTTP with the initialize handshake (a session, its id in
C{Mcp-Session-Id}), "sse" the legacy HTTP+SSE transport (its id in the POSTs'
C{session_id}), "modern" Streamable HTTP in 2026-07-28 (no session: any node
answers). Every call's answer is checked against the text the call sent.

Where a request went is read from three places: the session ids the clients
used (NODE.RANDOM.MAC), each node's own list of its sessions (its admin API,
asked directly), and HAProxy's log (the node a request named, the server
that answered, the status).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from pathlib import Path
from typing import Any

import jwt
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.cluster.keys import ClusterKeys, SessionIds

from ..support.certs import make_ca, make_server_cert
from ..support.idp import SECRET, SECRET_ISSUER
from . import cluster_support as cs
from . import harness as h

NODES = ("n1", "n2", "n3")
ALL_KINDS = "http=10,modern=10,sse=10"
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "forger", "version": "1"},
    },
}
LIST = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
ACCEPT = {"Accept": "application/json, text/event-stream"}
IN_SESSION = {**ACCEPT, "MCP-Protocol-Version": "2025-06-18"}
OK = ("200", "202")


def sessions_of(report: dict[str, Any], *kinds: str) -> list[dict[str, Any]]:
    return [s for s in report["sessions"] if not kinds or s["kind"] in kinds]


def good_calls(session: dict[str, Any]) -> int:
    return sum(session["good"].values())


class StickinessTests(SynchronousTestCase):
    def test_sessions_stay_on_their_node(self) -> None:
        """30 concurrent SDK sessions, ten of each kind: every session-era
        session is held by the node its id names and by no other, every one
        of its requests reached that node, and every answer is right; the
        2026-07-28 requests are spread over the nodes."""
        cluster = cs.start_cluster(self)
        client = cs.ClusterClient(self, cluster.base, ALL_KINDS, calls=3)
        ready = client.read("ready")
        cs.assert_all_well(ready, 3)
        held = {node.id: node.sessions() for node in cluster.nodes}
        ids = [s["ids"][0] for s in sessions_of(ready, "http", "sse")]
        self.assertEqual(len(set(ids)), 20)
        for session_id in ids:
            owner = cs.node_of(session_id)
            self.assertIn(owner, NODES)
            where = sorted(n for n, ids_held in held.items() if session_id in ids_held)
            self.assertEqual(where, [owner], session_id[:3])
        # leastconn spread the new sessions over every node.
        self.assertEqual({cs.node_of(i) for i in ids}, set(NODES))

        called = client.command("calls", "called")
        cs.assert_all_well(called, 6)
        client.close()

        assert cluster.haproxy is not None
        requests = cluster.haproxy.requests()
        named = [r for r in requests if r["node"] != "-"]
        # 20 sessions x (6 calls, at least one list or notification) at least.
        self.assertGreater(len(named), 20 * 7)
        strays = [r for r in named if r["server"] != r["node"] or r["retries"] != "0"]
        self.assertEqual(strays, [])
        # Closing ends a session with a DELETE (200), nothing else failed.
        self.assertEqual([r for r in named if r["status"] not in OK], [])
        modern_servers = {
            r["server"] for r in requests if r["node"] == "-" and r["method"] == "POST"
        }
        self.assertEqual(modern_servers, set(NODES))


class NodeLossTests(SynchronousTestCase):
    def test_a_killed_node(self) -> None:
        """SIGKILL one node while every client calls in a loop: its session
        clients get 404 (or lose their stream), start a new session on
        another node through the SDK and go on; the sessions of the other
        nodes see no error at all; a 2026-07-28 client loses at most the call
        that was in flight on the dead node."""
        cluster = cs.start_cluster(self)
        assert cluster.haproxy is not None
        client = cs.ClusterClient(self, cluster.base, "http=6,modern=6,sse=6", calls=2)
        ready = client.read("ready")
        cs.assert_all_well(ready, 2)
        # The node holding most sessions dies, one holding both kinds if any.
        kinds = {
            n: [
                s["kind"] for s in sessions_of(ready, "http", "sse") if cs.node_of(s["ids"][0]) == n
            ]
            for n in NODES
        }
        victim = max(NODES, key=lambda n: ({"http", "sse"} <= set(kinds[n]), len(kinds[n])))
        client.command("loop", "looping")
        time.sleep(1.5)
        killed_at = time.time()
        cluster.node(victim).kill()
        cluster.haproxy.wait_state(victim, "DOWN")
        time.sleep(4.0)
        stopped = client.command("stop", "stopped")
        client.close()

        after_kill = 0
        for s in stopped["sessions"]:
            self.assertEqual(s["wrong"], [], s)
            if s["kind"] == "modern":
                # At most the call in flight when the node died failed.
                self.assertLessEqual(len(s["errors"]), 1, s)
                for error in s["errors"]:
                    self.assertLess(error["ended"] - killed_at, 2.5, s)
                self.assertGreater(good_calls(s), 2, s)
                continue
            first = s["ids"][0]
            if cs.node_of(first) != victim:
                # Nobody else noticed.
                self.assertEqual((s["errors"], s["ids"], s["connects"]), ([], [first], 1), s)
                continue
            after_kill += 1
            self.assertGreaterEqual(len(s["errors"]), 1, s)
            self.assertEqual({e["session"] for e in s["errors"]}, {first}, s)
            # Recovered: a new session, on a live node, whose calls succeed.
            self.assertEqual(len(s["ids"]), 2, s)
            self.assertNotEqual(cs.node_of(s["ids"][1]), victim, s)
            self.assertGreater(s["good"].get(s["ids"][1], 0), 0, s)
            # Streamable HTTP: 404 (-32001), or for the call in flight a 502
            # (-32603) or its answer's stream cut (-32000, once the SDK's tries
            # to resume it got 404); HTTP+SSE: the stream broke (-32000).
            codes = (-32001, -32603, -32000) if s["kind"] == "http" else (-32000,)
            self.assertIn(s["errors"][0]["code"], codes, s)
        self.assertGreaterEqual(after_kill, 2)

        # What HAProxy did with the requests of the dead node's sessions once it
        # was dead: it tried the node, then sent them to another node, which
        # answered 404.
        late = [
            r
            for r in cluster.haproxy.requests()
            if r["node"] == victim and cs.accepted_at(r) > cluster.node(victim).died_at
        ]
        self.assertTrue(late)
        for r in late:
            self.assertEqual((r["server"] == victim, r["status"]), (False, "404"), r)
            self.assertTrue(r["retries"].startswith("+"), r)


def forged_ids(genuine: str) -> dict[str, str]:
    """Ids no node made, each naming a node of the cluster."""
    node, random_part, mac = genuine.split(".")
    other = next(n for n in NODES if n != node)
    flipped = ("A" if mac[0] != "A" else "B") + mac[1:]
    changed = random_part[:5] + ("x" if random_part[5] != "x" else "y") + random_part[6:]
    mac16 = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")
    wrong_key = SessionIds(node, ClusterKeys([secrets.token_bytes(32)])).new()
    return {
        "tampered MAC": f"{node}.{random_part}.{flipped}",
        "tampered random part": f"{node}.{changed}.{mac}",
        "moved to another node": f"{other}.{random_part}.{mac}",
        "random": f"{other}.{secrets.token_urlsafe(24)}.{mac16}",
        "signed with another key": wrong_key,
        "not a cluster id": secrets.token_urlsafe(32),
        "truncated": f"{node}.{random_part}",
    }


class ForgeryTests(SynchronousTestCase):
    def test_forged_session_ids_are_unknown_everywhere(self) -> None:
        """Forged and tampered Mcp-Session-Id and legacy session_id values
        get 404 through HAProxy (from the node they name) and on every node
        directly; the genuine ids they were made from still work, and only on
        their own node."""
        cluster = cs.start_cluster(self)
        assert cluster.haproxy is not None
        status, headers, _ = h.http("POST", cluster.mcp_url(), INIT, headers=ACCEPT)
        self.assertEqual(status, 200)
        genuine = headers["mcp-session-id"]
        legacy = cs.LegacyStream(f"{cluster.base}/servers/{cs.SERVER}/sse")
        self.addCleanup(legacy.close)
        genuine_legacy = legacy.session_id

        bases = {"haproxy": cluster.base, **{n.id: n.base for n in cluster.nodes}}
        for label, forged in {
            **forged_ids(genuine),
            **{f"legacy {k}": v for k, v in forged_ids(genuine_legacy).items()},
        }.items():
            for where, base in bases.items():
                status, _, body = h.http(
                    "POST",
                    f"{base}/servers/{cs.SERVER}/mcp",
                    LIST,
                    headers={**IN_SESSION, "Mcp-Session-Id": forged},
                )
                self.assertEqual(status, 404, f"{label} at {where}: {body[:200]!r}")
                status, _, body = h.http(
                    "POST",
                    f"{base}/servers/{cs.SERVER}/messages?session_id={forged}",
                    LIST,
                )
                self.assertEqual(status, 404, f"legacy {label} at {where}: {body[:200]!r}")

        # The genuine ones: through HAProxy and on their node, nowhere else.
        # (A legacy POST is answered 202, its answer on the stream.)
        for session_id, url, headers_, accepted in (
            (genuine, "/mcp", {**IN_SESSION, "Mcp-Session-Id": genuine}, 200),
            (genuine_legacy, f"/messages?session_id={genuine_legacy}", {}, 202),
        ):
            for where, base in bases.items():
                status, _, _ = h.http(
                    "POST", f"{base}/servers/{cs.SERVER}{url}", LIST, headers=headers_
                )
                holds = where in ("haproxy", cs.node_of(session_id))
                self.assertEqual(status, accepted if holds else 404, (where, session_id[:3]))

        # HAProxy took each forged id to the node it names: the refusal is that node's.
        for r in cluster.haproxy.requests():
            if r["node"] in NODES:
                self.assertEqual(r["server"], r["node"], r)


class DrainTests(SynchronousTestCase):
    def test_a_draining_node_keeps_its_sessions(self) -> None:
        """A node told to stop (SIGTERM) drains: its /health answers 503, so
        HAProxy takes it for DOWN, yet the requests of its sessions still
        reach it and succeed (option persist), while new sessions and
        2026-07-28 requests go to the other nodes. Once its sessions have
        ended it exits by itself."""
        # Through HAProxy a node learns that a client left an SSE stream only
        # when a write fails: at the next heartbeat (every 2 s here).
        cluster = cs.start_cluster(self, drain_timeout=60, extra="heartbeat_interval = 2\n")
        assert cluster.haproxy is not None
        client = cs.ClusterClient(self, cluster.base, "http=6,sse=6", calls=2)
        ready = client.read("ready")
        cs.assert_all_well(ready, 2)
        holding = [cs.node_of(s["ids"][0]) for s in ready["sessions"]]
        draining = cluster.node(max(NODES, key=holding.count))
        draining.terminate()
        cluster.haproxy.wait_state(draining.id, "DOWN")
        status, health = draining.health()
        self.assertEqual((status, health["status"]), (503, "draining"))
        logged_before = len(cluster.haproxy.requests())

        called = client.command("calls", "called")
        cs.assert_all_well(called, 4)
        newcomers = cs.ClusterClient(self, cluster.base, "http=4,sse=4,modern=4", calls=2)
        fresh = newcomers.read("ready")
        cs.assert_all_well(fresh, 2)
        newcomers.close()
        self.assertNotIn(
            draining.id, {cs.node_of(s["ids"][0]) for s in sessions_of(fresh, "http", "sse")}
        )
        late = cluster.haproxy.requests()[logged_before:]
        to_draining = [r for r in late if r["server"] == draining.id]
        # Only the draining node's own sessions reached it, and were served.
        self.assertGreaterEqual(len(to_draining), 2 * holding.count(draining.id))
        self.assertEqual(
            [r for r in to_draining if r["node"] != draining.id or r["status"] not in OK], []
        )
        self.assertEqual({r["server"] for r in late if r["node"] == draining.id}, {draining.id})

        # The clients leave: the node has nothing left to serve, and stops.
        client.close()
        draining.wait_exit(timeout=15)


def token_hash(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


class PrincipalHashTests(SynchronousTestCase):
    def test_each_principal_stays_on_one_node(self) -> None:
        """With MCPTWIST_HASH_PRINCIPAL, every request without a session of
        one principal goes to one node: a static token's, and a JWT
        subject's across two different tokens."""
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        key = directory / "jwt.secret"
        key.write_bytes(SECRET)
        tokens = {f"static-{i}": secrets.token_urlsafe(24) for i in range(3)}
        auth = (
            "[auth]\n"
            f"authorization_servers = [{h.toml_str(SECRET_ISSUER)}]\n"
            'resource_url = "https://mcp.example.com"\n\n'
            "[auth.jwt]\n"
            f"issuer = {h.toml_str(SECRET_ISSUER)}\n"
            'audience = ["https://mcp.example.com"]\n'
            f"key_file = {h.toml_str(str(key))}\n"
            'algorithms = ["HS256"]\n'
            'default_servers = ["*"]\n\n'
            + "".join(
                f'[[auth.tokens]]\nname = "{name}"\nhash = "{token_hash(token)}"\n\n'
                for name, token in tokens.items()
            )
        )
        cluster = cs.start_cluster(self, extra=auth, haproxy_env={"MCPTWIST_HASH_PRINCIPAL": "1"})
        assert cluster.haproxy is not None
        now = int(time.time())
        jwts = {
            f"jwt-carol-{i}": jwt.encode(
                {
                    "sub": "carol",
                    "aud": "https://mcp.example.com",
                    "iss": SECRET_ISSUER,
                    "iat": now - i,
                    "exp": now + 600,
                    "jti": secrets.token_hex(8),
                },
                SECRET,
                "HS256",
            )
            for i in range(2)
        }
        servers: dict[str, set[str]] = {}
        for name, bearer in {**tokens, **jwts}.items():
            logged_before = len(cluster.haproxy.requests())
            client = cs.ClusterClient(
                self, cluster.base, "modern=3,http=1", calls=3, options=(f"--bearer={bearer}",)
            )
            cs.assert_all_well(client.read("ready"), 3)
            client.close()
            unnamed = [r for r in cluster.haproxy.requests()[logged_before:] if r["node"] == "-"]
            self.assertGreaterEqual(len(unnamed), 10)
            servers[name] = {r["server"] for r in unnamed}
        for name, used in servers.items():
            self.assertEqual(len(used), 1, (name, used))
        self.assertEqual(servers["jwt-carol-0"], servers["jwt-carol-1"])


class TLSTests(SynchronousTestCase):
    def test_the_balancer_terminates_tls(self) -> None:
        """With MCPTWIST_TLS_PEM the balancer speaks TLS (with HSTS) and the
        SDK works through it on both transports and in both eras."""
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        ca = make_ca(str(directory))
        cert, key = make_server_cert(str(directory), ca, "balancer")
        pem = directory / "balancer.pem"
        pem.write_text(Path(cert).read_text() + Path(key).read_text())
        cluster = cs.start_cluster(
            self, size=2, redis=False, haproxy_env={"MCPTWIST_TLS_PEM": str(pem)}
        )
        self.assertTrue(cluster.base.startswith("https://"))
        client = cs.ClusterClient(
            self, cluster.base, "http=2,modern=2,sse=2", calls=2, options=("--cafile", ca.path)
        )
        cs.assert_all_well(client.read("ready"), 2)
        client.close()
        status, headers, _ = h.http(
            "GET", f"{cluster.base}/health", context=cs.tls_context(ca.path)
        )
        self.assertEqual(status, 200)
        self.assertEqual(headers["strict-transport-security"], "max-age=31536000")


class StreamTests(SynchronousTestCase):
    def test_events_are_not_held_back(self) -> None:
        """An answer on an HTTP+SSE stream crosses the balancer at once:
        one client calling one call at a time makes hundreds of calls in two
        seconds (without option http-no-delay, HAProxy held each event back
        for about 190 ms: about ten)."""
        cluster = cs.start_cluster(self, size=1, redis=False)
        client = cs.ClusterClient(self, cluster.base, "sse=1", calls=1, options=("--pause", "0"))
        client.read("ready")
        client.command("loop", "looping")
        time.sleep(2.0)
        stopped = client.command("stop", "stopped")
        client.close()
        session = stopped["sessions"][0]
        self.assertEqual(session["errors"], [])
        self.assertGreater(good_calls(session), 100)


class RollingRestartTests(SynchronousTestCase):
    def test_every_node_restarted_under_load(self) -> None:
        """Each of the three nodes is stopped (SIGTERM: it drains) and
        started again, one after the other, while sessions of every kind
        call without pause. No call fails but those the specification lets a
        client retry: a request on a session its node has ended (404: the
        client opens a new session, which another node takes); and no
        answer ever reaches the wrong call."""
        cluster = cs.start_cluster(self, drain_timeout=3, extra="heartbeat_interval = 2\n")
        client = cs.ClusterClient(
            self, cluster.base, "http=4,sse=3,modern=3", calls=1, options=["--pause", "0.02"]
        )
        cs.assert_all_well(client.read("ready"), 1)
        client.command("loop", "looping")
        time.sleep(1.0)
        for node_id in NODES:
            node = cluster.node(node_id)
            node.terminate()
            node.wait_exit(timeout=30)
            cluster.restart(node_id)
            time.sleep(1.0)
        report = client.command("stop", "stopped")
        client.close()
        calls = sum(good_calls(s) for s in report["sessions"])
        self.assertGreater(calls, 100, "the clients kept calling")
        wrong = [w for s in report["sessions"] for w in s["wrong"]]
        self.assertEqual(wrong, [])
        errors = [(s["kind"], e) for s in report["sessions"] for e in s["errors"]]
        failed = [(kind, e) for kind, e in errors if not _retryable(kind, e)]
        assert cluster.haproxy is not None
        odd = [r for r in cluster.haproxy.requests() if r["status"] not in (*OK, "404")]
        self.assertEqual(failed, [], f"{len(errors)} errors in all; balancer: {odd}")
        # Every session-era session that lost its node went on in a new one.
        for session in sessions_of(report, "http", "sse"):
            nodes = {cs.node_of(i) for i in session["ids"]}
            self.assertGreaterEqual(len(session["ids"]), 1, session)
            self.assertTrue(nodes <= set(NODES), session)


def _retryable(kind: str, error: dict[str, Any]) -> bool:
    """A failed call the specification lets a client make again: its
    session was ended by its node (404, "Session not found"), or, on the
    deprecated HTTP+SSE transport, its stream was closed by its node (the
    client must open a new one)."""
    message = str(error.get("message", ""))
    return (
        error.get("code") == -32001
        or "Session not found" in message
        or (kind == "sse" and "onnection closed" in message)
    )
