"""Several nodes on one host, as the template units of C{etc/systemd/cluster/}
run them, behind a local HAProxy.

systemd is not PID 1 here: C{systemd-socket-activate} stands in for it, as in
C{test_systemd}. Node PORT is the instance C{mcpbridge@PORT}: the socket its
C{.socket} unit names (C{ListenStream=}, C{FileDescriptorName=}) is bound, and
the C{ExecStart=} of its C{.service} unit runs with the unit's
C{Environment=}, the variables of C{cluster.env} (the test's key and Redis)
and what systemd itself sets (C{LOGS_DIRECTORY}, C{NOTIFY_SOCKET}), on
C{node.toml}; the C{/opt/mcptwist} paths point at this checkout's
environment. A real redis-server and HAProxy with the shipped
C{etc/haproxy/haproxy.cfg} (its servers named C{n<port>} through
C{MCPTWIST_NODEk_ID}) make up the rest of the host.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shlex
import shutil
import socket
import tempfile
from pathlib import Path

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.config.load import load_config
from mcptwist.config.model import BridgeConfig, ConfigError, ServerConfig
from mcptwist.service.bridge import BridgeService

from . import cluster_support as cs
from . import harness as h
from .redis_support import start_redis
from .systemd_support import (
    UNITS,
    NotifySocket,
    one,
    read_unit,
    start,
    values,
    verify_units,
)

CLUSTER = UNITS / "cluster"
SOCKET = CLUSTER / "mcpbridge@.socket"
SERVICE = CLUSTER / "mcpbridge@.service"
NODE_TOML = CLUSTER / "node.toml"
CLUSTER_ENV = CLUSTER / "cluster.env"
# Where the units and node.toml expect the installed bridge and its configuration.
INSTALLED = "/opt/mcptwist/bin/"
CONFIGURATION = "/etc/mcptwist/"
# The ports of the instances, as docs/scaling.md numbers them.
PORTS = range(8801, 8900)
# ${NAME} or ${NAME:-default} in node.toml.
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")


def expand(text: str, port: int, state: Path) -> str:
    """A unit's value with the systemd specifiers these units use expanded:
    %i (the instance: the port), %S (the root of state directories), %%."""

    def specifier(match: re.Match[str]) -> str:
        found = {"i": str(port), "S": str(state), "%": "%"}.get(match.group(1))
        if found is None:
            raise AssertionError(f"the units use %{match.group(1)}, which this test does not know")
        return found

    return re.sub(r"%(.)", specifier, text)


def environment_lines(port: int, state: Path) -> dict[str, str]:
    """What the service's Environment= lines set for instance PORT."""
    found: dict[str, str] = {}
    for line in values(read_unit(SERVICE), "Service", "Environment"):
        for assignment in shlex.split(expand(line, port, state)):
            name, _, value = assignment.partition("=")
            found[name] = value
    return found


def environment_file(path: Path) -> dict[str, str]:
    """The variables of an EnvironmentFile= (NAME=VALUE lines; # comments)."""
    found: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            found[name] = value
    return found


def node_environ(port: int, key: str, redis_url: str, state: Path, logs: Path) -> dict[str, str]:
    """The variables node PORT runs with, as systemd would give them: the
    unit's Environment=, overridden by cluster.env's (its values replaced by
    the test's key and Redis), and LOGS_DIRECTORY (LogsDirectory=)."""
    shipped = environment_file(CLUSTER_ENV)
    assert set(shipped) == {"MCPTWIST_CLUSTER_KEY", "MCPTWIST_REDIS"}, shipped
    return {
        **environment_lines(port, state),
        "MCPTWIST_CLUSTER_KEY": key,
        "MCPTWIST_REDIS": redis_url,
        "LOGS_DIRECTORY": str(logs),
    }


def ports_in(candidates: range, count: int) -> list[int]:
    """C{count} ports of C{candidates} free on 127.0.0.1 now."""
    found: list[int] = []
    with contextlib.ExitStack() as held:
        for port in candidates:
            s = held.enter_context(socket.socket())
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            found.append(port)
            if len(found) == count:
                return found
    raise AssertionError(f"fewer than {count} free ports in {candidates}")


def load_node_toml(directory: Path, port: int, key: str, redis_url: str) -> BridgeConfig:
    """node.toml as instance PORT reads it, its logs directory in C{directory}."""
    environ = node_environ(port, key, redis_url, directory, directory)
    return load_config(NODE_TOML, environ)


class UnitNode:
    """Instance mcpbridge@PORT, started as its units say, in C{directory}."""

    def __init__(
        self, test: SynchronousTestCase, directory: Path, port: int, key: str, redis_url: str
    ) -> None:
        self.port = port
        self.id = f"n{port}"
        self.address = f"127.0.0.1:{port}"
        socket_unit, service = read_unit(SOCKET), read_unit(SERVICE)
        listen = expand(one(socket_unit, "Socket", "ListenStream"), port, directory)
        assert listen == self.address, listen
        fd_name = one(socket_unit, "Socket", "FileDescriptorName")
        directory.mkdir()
        state = directory / "state"
        self.logs = directory / "logs"
        # What StateDirectory= and LogsDirectory= make for the instance.
        (state / "mcptwist" / str(port)).mkdir(parents=True)
        self.logs.mkdir()
        config_path = directory / "mcpbridge.toml"
        argv = shlex.split(one(service, "Service", "ExecStart"))
        assert argv[-2:] == ["--config", CONFIGURATION + NODE_TOML.name], argv
        argv = [a.replace(INSTALLED, f"{h.BIN}/") for a in argv[:-1]] + [str(config_path)]
        # The test's copy of node.toml: its paths point here, and a node drains
        # briefly when its stop comes (the harness waits 10 s for it).
        config = f"drain_timeout = {cs.DRAIN_TIMEOUT:g}\n" + NODE_TOML.read_text().replace(
            INSTALLED, f"{h.BIN}/"
        )
        self.notify = NotifySocket(test)
        env = {
            **node_environ(port, key, redis_url, state, self.logs),
            "NOTIFY_SOCKET": self.notify.address,
        }
        self.bridge = start(
            test, config, [(fd_name, port)], env=env, directory=directory, command=argv
        )

    @property
    def base(self) -> str:
        return self.bridge.base

    def wait_ready(self) -> None:
        """Until the node tells systemd READY=1 (Type=notify-reload waits for it)."""
        h.wait_for(
            lambda: any(m.get("READY") == "1" for m in self.notify.poll()),
            h.STARTUP_TIMEOUT,
            f"{self.id} to say READY=1",
        )

    def opened(self) -> set[str]:
        """The sessions its audit trail (in its LogsDirectory=) says were opened."""
        lines = (self.logs / "audit.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        return {r["session"] for r in records if r["event"] == "session_opened"}


class UnitFileTests(SynchronousTestCase):
    """The template units, cluster.env and node.toml agree."""

    def test_units_agree_with_node_toml(self) -> None:
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        config = load_node_toml(
            directory, 8801, secrets.token_urlsafe(32), "redis://127.0.0.1:6379/0"
        )
        # The socket's name is the one node.toml's listener adopts.
        socket_unit, service = read_unit(SOCKET), read_unit(SERVICE)
        [listener] = config.listeners
        name = one(socket_unit, "Socket", "FileDescriptorName")
        self.assertEqual(listener.endpoint, f"systemd:domain=INET:name={name}")
        # An IPv4 literal: an AF_INET socket (a bare port would be dual-stack INET6).
        self.assertEqual(one(socket_unit, "Socket", "ListenStream"), "127.0.0.1:%i")
        self.assertEqual(one(socket_unit, "Socket", "Service"), "mcpbridge@%i.service")
        self.assertEqual(one(socket_unit, "Socket", "NoDelay"), "true")
        for key in ("Requires", "After"):
            listed = {u for v in values(service, "Unit", key) for u in v.split()}
            self.assertIn("mcpbridge@%i.socket", listed, key)
        # Instance 8801 is node n8801 at its own address, and trusts the
        # balancer and the other nodes on this host.
        assert config.cluster is not None
        self.assertEqual(config.cluster.node_id, "n8801")
        self.assertEqual(config.cluster.advertise, "http://127.0.0.1:8801")
        self.assertEqual(config.cluster.redis, "redis://127.0.0.1:6379/0")
        self.assertEqual([str(n) for n in listener.trusted_proxies], ["127.0.0.1/32"])
        self.assertEqual(config.audit.path, str(directory / "audit.jsonl"))
        BridgeService(config, MemoryReactorClock(), {})

        # node.toml reads what the unit and cluster.env set, and nothing else.
        read = {m.group(1): m.group(2) for m in _VARIABLE.finditer(NODE_TOML.read_text())}
        given = set(environment_lines(8801, Path("/var/lib"))) | set(environment_file(CLUSTER_ENV))
        self.assertEqual(
            {n for n in read if n.startswith("MCPTWIST_")},
            {n for n in given if n.startswith("MCPTWIST_")},
        )
        # The rest systemd sets itself: LOGS_DIRECTORY (with a default).
        self.assertEqual(
            {n: d for n, d in read.items() if not n.startswith("MCPTWIST_")},
            {"LOGS_DIRECTORY": ":-/var/log/mcptwist"},
        )
        self.assertEqual(one(service, "Service", "LogsDirectory"), "mcptwist/%i")
        self.assertEqual(
            one(service, "Service", "EnvironmentFile"), CONFIGURATION + CLUSTER_ENV.name
        )
        self.assertEqual(one(service, "Service", "ConfigurationDirectory"), "mcptwist")
        self.assertEqual(
            shlex.split(one(service, "Service", "ExecStart"))[1:],
            ["-n", "--pidfile=", "mcpbridge", "--config", CONFIGURATION + NODE_TOML.name],
        )
        # Stopping takes a drain, then the children's stop: the unit allows both.
        self.assertEqual(one(service, "Service", "Type"), "notify-reload")
        self.assertEqual(one(service, "Service", "KillMode"), "mixed")
        defaults = ServerConfig(name="x", command="x")
        self.assertGreater(
            float(one(service, "Service", "TimeoutStopSec")),
            config.drain_timeout + defaults.term_after + defaults.kill_after,
        )

    def test_the_placeholder_key_is_refused(self) -> None:
        """cluster.env as shipped does not start a node: its key must be replaced."""
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        environ = {
            **node_environ(8801, "x", "y", directory, directory),
            **environment_file(CLUSTER_ENV),
        }
        with self.assertRaises(ConfigError) as raised:
            load_config(NODE_TOML, environ)
        self.assertIn("cluster.keys[0]", str(raised.exception))
        self.assertNotIn("CHANGE-ME", str(raised.exception))

    def test_systemd_analyze_verify(self) -> None:
        """systemd-analyze verify accepts two instances of the templates
        (ExecStart made to exist here)."""
        directory = Path(self.mktemp())
        directory.mkdir()
        for path in (SOCKET, SERVICE):
            (directory / path.name).write_text(path.read_text().replace(INSTALLED, f"{h.BIN}/"))
        units = [
            f"mcpbridge@{port}.{kind}" for port in (8801, 8802) for kind in ("socket", "service")
        ]
        self.assertEqual(verify_units(directory, units), (0, []))


class OneHostTests(SynchronousTestCase):
    def test_two_nodes_behind_haproxy(self) -> None:
        """Two instances and HAProxy on one host: each node says READY to
        systemd, SDK sessions through HAProxy stay on their node, every
        answer is right, and the cluster's view lists both nodes."""
        directory = Path(tempfile.mkdtemp(prefix="mcptwist-units-"))
        self.addCleanup(shutil.rmtree, directory, True)
        redis = start_redis(self)
        key = secrets.token_urlsafe(32)
        nodes = [
            UnitNode(self, directory / f"n{port}", port, key, redis.url)
            for port in ports_in(PORTS, 2)
        ]
        for node in nodes:
            node.wait_ready()
            cs.wait_healthy(node.id, node.base, redis=True)
        ids = {node.id for node in nodes}
        haproxy = cs.HAProxy(
            directory,
            cs.free_ports(1)[0],
            [node.address for node in nodes],
            {f"MCPTWIST_NODE{i}_ID": node.id for i, node in enumerate(nodes, 1)},
        )
        self.addCleanup(haproxy.stop)
        for node in nodes:
            haproxy.wait_state(node.id, "UP")

        client = cs.ClusterClient(self, haproxy.base, "http=4,sse=4,modern=4", calls=2)
        ready = client.read("ready")
        cs.assert_all_well(ready, 2)
        held = {node.id: cs.held_sessions(node.id, node.bridge) for node in nodes}
        sessions = [s["ids"][0] for s in ready["sessions"] if s["kind"] != "modern"]
        for session_id in sessions:
            where = sorted(n for n, ids_held in held.items() if session_id in ids_held)
            self.assertEqual(where, [cs.node_of(session_id)], session_id[:8])
        self.assertEqual({cs.node_of(s) for s in sessions}, ids)
        cs.assert_all_well(client.command("calls", "called"), 4)
        client.close()
        named = [r for r in haproxy.requests() if r["node"] != "-"]
        self.assertTrue(named)
        self.assertEqual([r for r in named if r["server"] != r["node"]], [])

        # Each node audited the sessions it opened, in its own logs directory.
        for node in nodes:
            mine = {s for s in sessions if cs.node_of(s) == node.id}
            self.assertEqual(node.opened() & set(sessions), mine, node.id)

        # The cluster's view, through HAProxy (a client on this host is an
        # operator: there is no [auth] here), lists both nodes at their own address.
        status, _, body = h.http("GET", f"{haproxy.base}/admin/cluster")
        self.assertEqual(status, 200, body)
        listed = {n["node_id"]: n["url"] for n in json.loads(body)["nodes"]}
        self.assertEqual(listed, {node.id: f"http://{node.address}" for node in nodes})
