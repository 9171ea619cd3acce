"""The shipped nginx configuration (etc/nginx/mcptwist.conf) in front of
three real nodes: each session stays on the node its id names, and the
sessions of a node that dies get 404 from another node, so their clients
open new ones."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from . import cluster_support as cs
from . import harness as h

NGINX_CONF = h.REPO / "etc" / "nginx" / "mcptwist.conf"
NODES = ("n1", "n2", "n3")
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t"}},
}
JSON = {"Accept": "application/json"}


class Nginx:
    """nginx with the shipped file, its addresses made this test's."""

    def __init__(self, test: SynchronousTestCase, cluster: cs.Cluster) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(nginx).exists():
            raise SkipTest("nginx is not installed (tests/packages.sh installs it)")
        self.dir = Path(tempfile.mkdtemp(prefix="mcptwist-nginx-"))
        test.addCleanup(shutil.rmtree, self.dir, True)
        [self.port] = cs.free_ports(1)
        text = NGINX_CONF.read_text()
        for i, node in enumerate(cluster.nodes, 1):
            text = text.replace(f"127.0.0.1:880{i}", node.address)
        text = text.replace("127.0.0.1:8800", f"127.0.0.1:{self.port}")
        text = text.replace("/var/log/nginx/mcptwist.log", str(self.dir / "access.log"))
        (self.dir / "mcptwist.conf").write_text(text)
        main = self.dir / "nginx.conf"
        main.write_text(
            f"pid {self.dir}/nginx.pid;\n"
            f"error_log {self.dir}/error.log;\n"
            "events {}\n"
            "http {\n"
            f"    client_body_temp_path {self.dir}/body;\n"
            f"    proxy_temp_path {self.dir}/proxy;\n"
            f"    include {self.dir}/mcptwist.conf;\n"
            "}\n"
        )
        self.proc = subprocess.Popen(
            [nginx, "-c", str(main), "-p", str(self.dir), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        test.addCleanup(self.stop)
        self.base = f"http://127.0.0.1:{self.port}"
        h.wait_for(lambda: cs.connects(self.port), 10.0, "nginx to listen")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def upstreams(self) -> list[tuple[str, str]]:
        """(the node a request's session named, or "mcptwist_nodes"; the
        address that answered it), for each request logged."""
        log = (self.dir / "access.log").read_text() if (self.dir / "access.log").exists() else ""
        return re.findall(r"upstream=(.+?) session_node=(\S+)", log)


class NginxTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cluster = cs.start_cluster(self, balancer=False, drain_timeout=1)
        self.nginx = Nginx(self, self.cluster)

    def test_a_draining_node_passes_new_sessions_on(self) -> None:
        """nginx keeps a draining node in its pool: the node refuses each new
        session with 503, nginx passes it to the next node, and every new
        session opens; the node's own session goes on."""
        cluster = cs.start_cluster(self, balancer=False, drain_timeout=30)
        nginx = Nginx(self, cluster)
        victim = cluster.nodes[0]
        # A session held by the node (no stream open: nginx counts no
        # connection to it, so its least_conn takes each node in turn).
        status, headers, _ = h.http("POST", f"{victim.base}/servers/example/mcp", INIT, JSON)
        self.assertEqual(status, 200)
        held = {"Mcp-Session-Id": headers["mcp-session-id"], **JSON}
        victim.terminate()
        h.wait_for(lambda: victim.health()[0] == 503, 10.0, "the node to drain")
        for _ in range(6):
            status, headers, body = h.http("POST", f"{nginx.base}/servers/example/mcp", INIT, JSON)
            self.assertEqual(status, 200, body)
            session = headers["mcp-session-id"]
            self.assertNotEqual(cs.node_of(session), victim.id)
            h.http("DELETE", f"{nginx.base}/servers/example/mcp", None, {"Mcp-Session-Id": session})
        passed_on = [u for u, _ in nginx.upstreams() if u.startswith(victim.address + ",")]
        self.assertTrue(passed_on, f"none sent to {victim.address}: {nginx.upstreams()}")
        ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
        url = f"{victim.base}/servers/example/mcp"
        self.assertEqual(h.http("POST", url, ping, held)[0], 200, "its own session goes on")
        h.http("DELETE", url, None, held)
        victim.wait_exit(timeout=20)

    def test_sessions_stay_on_their_node(self) -> None:
        """Sessions of every kind through nginx: every answer right, and every
        request of a session answered by the node its id names."""
        client = cs.ClusterClient(self, self.nginx.base, "http=6,sse=3,modern=3", calls=3)
        cs.assert_all_well(client.read("ready"), 3)
        cs.assert_all_well(client.command("calls", "called"), 6)
        report = client.close()
        ids = [s["ids"][0] for s in report["sessions"] if s["ids"]]
        self.assertEqual(len(ids), 9)
        addresses = {f"mcptwist_{n.id}": n.address for n in self.cluster.nodes}
        pinned = [(a, u) for a, u in self.nginx.upstreams() if u != "mcptwist_nodes"]
        self.assertTrue(pinned)
        self.assertEqual([(a, u) for a, u in pinned if addresses[u] != a], [])

    def test_a_dead_nodes_sessions_get_404(self) -> None:
        """A node is killed: a request of one of its sessions goes to a backup
        node, which answers 404 (the client opens a new session)."""
        client = cs.ClusterClient(self, self.nginx.base, "http=6", calls=1)
        ready = client.read("ready")
        cs.assert_all_well(ready, 1)
        victim = cs.node_of(ready["sessions"][0]["ids"][0])
        self.cluster.node(victim).kill()
        listing = {"jsonrpc": "2.0", "id": 7, "method": "tools/list"}
        headers: dict[str, Any] = {
            "Accept": "application/json, text/event-stream",
            "Mcp-Session-Id": ready["sessions"][0]["ids"][0],
            "MCP-Protocol-Version": "2025-06-18",
        }
        status, _, body = h.http("POST", f"{self.nginx.base}/servers/example/mcp", listing, headers)
        self.assertEqual(status, 404, body)
        self.assertIn("Session not found", json.loads(body)["error"]["message"])
        # The others' sessions go on.
        called = client.command("calls", "called")
        for session in called["sessions"]:
            if cs.node_of(session["ids"][0]) != victim:
                self.assertEqual(session["errors"], [], session)
        client.close()
