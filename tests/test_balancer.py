"""The balancer configurations in etc/, checked by the balancers themselves.

C{etc/haproxy/haproxy.cfg} is read by C{haproxy -c} with every combination of
environment the file documents (the integration tests in
C{tests/integration/test_cluster.py} run it); its timeouts are compared with
the bridge's defaults, which they must exceed. C{etc/nginx/mcptwist.conf} is
read by C{nginx -t} inside an http block (tests/packages.sh installs nginx;
tests/integration/test_cluster_nginx.py routes through it). The compose example's node configuration is loaded as each
node loads it, its HAProxy environment given to C{haproxy -c}, and the whole
file to C{docker compose config} where Compose is installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from mcptwist.config.keys import digest_text
from mcptwist.config.load import load_config
from mcptwist.config.model import BridgeConfig, ServerConfig
from mcptwist.security.auth import hash_token

from .support.certs import make_ca, make_server_cert

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_CFG = ROOT / "etc" / "haproxy" / "haproxy.cfg"
NGINX_CONF = ROOT / "etc" / "nginx" / "mcptwist.conf"
COMPOSE = ROOT / "etc" / "compose"


def program(name: str, *fallbacks: str, ci: bool = True) -> str:
    """A program's path; skip without it (fail under CI, which installs it,
    unless C{ci} is false)."""
    found = shutil.which(name) or next((f for f in fallbacks if os.access(f, os.X_OK)), None)
    if found:
        return found
    if ci and os.environ.get("CI"):
        raise AssertionError(f"CI is set but {name} is not installed")
    raise SkipTest(f"{name} is not installed")


def haproxy_check(env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """C{haproxy -c} of the shipped file with only C{env} of MCPTWIST_*."""
    haproxy = program("haproxy", "/usr/sbin/haproxy")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MCPTWIST_")}
    return subprocess.run(
        [haproxy, "-c", "-f", str(HAPROXY_CFG)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def balancer_pem(directory: str) -> Path:
    """A PEM of a certificate and its key, as HAProxy's crt takes it."""
    cert, key = make_server_cert(directory, make_ca(directory), "balancer")
    pem = Path(directory) / "balancer.pem"
    pem.write_text(Path(cert).read_text() + Path(key).read_text())
    return pem


def seconds(value: str) -> float:
    """An HAProxy time ("310s", "1m", "500ms", a bare number of ms)."""
    match = re.fullmatch(r"(\d+)(us|ms|s|m|h|d)?", value)
    assert match, value
    unit = {"us": 1e-6, "ms": 1e-3, None: 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return int(match.group(1)) * unit[match.group(2)]


class HAProxyConfigTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.text = HAPROXY_CFG.read_text()

    def check(self, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
        return haproxy_check(env)

    def assertValid(self, env: Mapping[str, str]) -> None:
        result = self.check(env)
        self.assertEqual(result.returncode, 0, f"{dict(env)}:\n{result.stdout}{result.stderr}")

    def test_every_documented_environment(self) -> None:
        """One node; three; three by name; node ids of one's own, principal
        hashing and the runtime API; TLS with a PEM of certificate and key."""
        base = {"MCPTWIST_BIND": "127.0.0.1:8800", "MCPTWIST_NODE1": "127.0.0.1:8801"}
        self.assertValid(base)
        three = {**base, "MCPTWIST_NODE2": "10.0.0.2:8080", "MCPTWIST_NODE3": "10.0.0.3:8080"}
        self.assertValid(three)
        # Nodes by DNS name, none of which resolves yet (compose before its
        # nodes start): refused without MCPTWIST_RESOLVE, valid with it.
        named = {
            **base,
            "MCPTWIST_NODE2": "node2.invalid:8080",
            "MCPTWIST_NODE3": "node3.invalid:8080",
        }
        self.assertNotEqual(self.check(named).returncode, 0)
        self.assertValid({**named, "MCPTWIST_RESOLVE": "1"})
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        self.assertValid(
            {
                **three,
                "MCPTWIST_NODE1_ID": "n8801",
                "MCPTWIST_NODE2_ID": "web-2",
                "MCPTWIST_HASH_PRINCIPAL": "1",
                "MCPTWIST_STATS_SOCKET": os.path.join(directory, "haproxy.sock"),
                "MCPTWIST_SERVER_TIMEOUT": "1h",
            }
        )
        self.assertValid({**three, "MCPTWIST_TLS_PEM": str(balancer_pem(directory))})

    def test_refused_without_an_address_or_a_node(self) -> None:
        """A missing required variable is an error, not a balancer that
        listens nowhere or balances over nothing."""
        self.assertNotEqual(self.check({"MCPTWIST_BIND": "127.0.0.1:8800"}).returncode, 0)
        self.assertNotEqual(self.check({"MCPTWIST_NODE1": "127.0.0.1:8801"}).returncode, 0)

    def test_timeouts_fit_the_bridge(self) -> None:
        """timeout server outlasts a quiet SSE stream (its heartbeat) and the
        longest silent call (a JSON answer after request_timeout)."""
        match = re.search(r'timeout server "\$\{MCPTWIST_SERVER_TIMEOUT-(\w+)\}"', self.text)
        assert match is not None
        server = seconds(match.group(1))
        bridge = BridgeConfig(servers={})
        child = ServerConfig(name="x", command="x")
        self.assertGreater(server, bridge.heartbeat_interval * 2)
        self.assertGreater(server, child.request_timeout)

    def test_routing_rules(self) -> None:
        """The rules the integration tests rely on are the file's own: the
        session's node from the header or either legacy parameter, use-server
        on it, persistence for draining nodes, redispatch for dead ones."""
        for rule in (
            "req.fhdr(mcp-session-id),field(1,.)",
            "urlp(session_id),field(1,.)",
            "urlp(sessionId),field(1,.)",
            "use-server %[var(txn.node)] if { var(txn.node) -m found }",
            "option persist",
            "option redispatch",
            "option httpchk GET /health",
            "balance leastconn",
        ):
            self.assertIn(rule, self.text)


class NginxConfigTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.text = NGINX_CONF.read_text()

    def test_nginx_accepts_it(self) -> None:
        """The file as shipped, included in an http block."""
        nginx = program("nginx", "/usr/sbin/nginx")
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        main = Path(directory) / "nginx.conf"
        main.write_text(
            f"pid {directory}/nginx.pid;\n"
            f"error_log {directory}/error.log;\n"
            "events {}\n"
            "http {\n"
            f"    client_body_temp_path {directory}/body;\n"
            f"    proxy_temp_path {directory}/proxy;\n"
            f"    include {NGINX_CONF};\n"
            "}\n"
        )
        result = subprocess.run(
            [nginx, "-t", "-c", str(main), "-p", directory],
            capture_output=True,
            text=True,
            timeout=30,
        )
        self.assertEqual(result.returncode, 0, result.stderr)

    def test_routing_and_streams(self) -> None:
        """The session's node from the header or either legacy parameter, an
        upstream per node whose backups answer for a dead node, no buffering
        of streams, and a read timeout above the bridge's longest silence."""
        for rule in (
            "map $http_mcp_session_id $mcptwist_session",
            "$arg_session_id$arg_sessionid",
            "proxy_pass http://$mcptwist_upstream;",
            "proxy_http_version 1.1;",
            "proxy_buffering off;",
            "proxy_next_upstream error timeout http_503 non_idempotent;",
        ):
            self.assertIn(rule, self.text)
        for node in ("n1", "n2", "n3"):
            self.assertIn(f"~^{node}\\.      mcptwist_{node};", self.text)
            self.assertIn(f"upstream mcptwist_{node} {{", self.text)
        match = re.search(r"proxy_read_timeout (\d+)s;", self.text)
        assert match is not None
        self.assertGreater(int(match.group(1)), ServerConfig(name="x", command="x").request_timeout)


def service_environment(compose: str, service: str) -> dict[str, str]:
    """The MCPTWIST_* variables a service of compose.yaml sets (its
    environment block, as the file writes it)."""
    block = re.search(rf"^  {service}:\n((?:    .*\n|\n)*)", compose, re.M)
    assert block is not None, service
    found = re.findall(r'^\s+(MCPTWIST_\w+): "?([^"\n]*?)"?$', block.group(1), re.M)
    return dict(found)


class ComposeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.compose = (COMPOSE / "compose.yaml").read_text()
        self.env = {
            "MCPTWIST_CLUSTER_KEY": "k" * 43,
            "MCPTWIST_REDIS_PASSWORD": "a-redis-password",
            "MCPTWIST_TOKEN_HASH": digest_text(hash_token("mcpt_a_client_token")),
            "MCPTWIST_SUBNET": "172.28.0.0/24",
        }

    def test_each_node_loads_its_configuration(self) -> None:
        """node.toml, with a node's environment: its id, the shared key and
        Redis, its own address, the balancer's network trusted, tokens on."""
        for node in ("n1", "n2", "n3"):
            self.assertIn(f"      NODE_ID: {node}\n", self.compose)
            config = load_config(str(COMPOSE / "node.toml"), {**self.env, "NODE_ID": node})
            assert config.cluster is not None
            self.assertEqual(config.cluster.node_id, node)
            self.assertEqual(config.cluster.keys, (b"k" * 43,))
            self.assertEqual(config.cluster.redis, "redis://:a-redis-password@redis:6379/0")
            self.assertEqual(config.cluster.advertise, f"http://{node}:8080")
            [listener] = config.listeners
            self.assertEqual(listener.endpoint, "tcp:8080:interface=0.0.0.0")
            self.assertEqual([str(n) for n in listener.trusted_proxies], ["172.28.0.0/24"])
            self.assertTrue(config.auth.enabled)
            self.assertEqual(list(config.servers), ["example"])

    def test_haproxy_takes_the_compose_environment(self) -> None:
        """The shipped haproxy.cfg with the environment compose.yaml gives it
        (the nodes by their compose names, which do not resolve here)."""
        env = service_environment(self.compose, "haproxy")
        self.assertEqual(
            sorted(env),
            sorted(
                [
                    "MCPTWIST_BIND",
                    "MCPTWIST_TLS_PEM",
                    "MCPTWIST_NODE1",
                    "MCPTWIST_NODE2",
                    "MCPTWIST_NODE3",
                    "MCPTWIST_RESOLVE",
                ]
            ),
        )
        self.assertIn("../haproxy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro", self.compose)
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        env["MCPTWIST_TLS_PEM"] = str(balancer_pem(directory))
        result = haproxy_check(env)
        self.assertEqual(result.returncode, 0, result.stderr)

    def test_compose_accepts_it(self) -> None:
        """docker compose config (or docker-compose) reads the file; without
        the keys in the environment it refuses to start anything."""
        if (
            shutil.which("docker")
            and subprocess.run(
                ["docker", "compose", "version"], capture_output=True, timeout=30
            ).returncode
            == 0
        ):
            compose = ["docker", "compose"]
        elif shutil.which("docker-compose"):
            compose = ["docker-compose"]
        else:
            raise SkipTest("neither docker compose nor docker-compose is installed")
        # Neither this suite's MCPTWIST_ settings nor its Python's: a Debian
        # docker-compose runs on the system's Python.
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("MCPTWIST_", "PYTHON"))}
        argv = [*compose, "-f", str(COMPOSE / "compose.yaml"), "config", "-q"]
        result = subprocess.run(
            argv, env={**clean, **self.env}, capture_output=True, text=True, timeout=60
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        refused = subprocess.run(argv, env=clean, capture_output=True, text=True, timeout=60)
        self.assertNotEqual(refused.returncode, 0)
        self.assertIn("set it in .env", refused.stderr)
