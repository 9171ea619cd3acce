"""What a started bridge has imported: the libraries of a feature only once it
is configured or used.

Each test starts C{twistd -n mcpbridge} in a fresh process, waits for it to
answer one request, and lists which of the optional libraries it imported.
A default start must import none of them (pyOpenSSL is imported by Twisted's
reactor whenever it is installed, unless the bridge hides it: see
L{mcptwist.service.lazytls}); each feature must import its own.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.support.certs import make_ca, make_server_cert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The optional libraries, by top-level package: TLS, JWT, OpenTelemetry,
# Redis, WebSocket, the REST face's schema checks, the cluster's HTTP client,
# and the test-only property library.
OPTIONAL = (
    "OpenSSL",
    "autobahn",
    "cryptography",
    "hypothesis",
    "jsonschema",
    "jwt",
    "opentelemetry",
    "referencing",
    "service_identity",
    "treq",
    "txredisapi",
)

MARK = "startup-report "

# Runs twistd in this process. A thread waits for the port, sends one
# request (over TLS when a CA is given) and hands its answer's status line to
# the reactor, which prints the optional packages imported by then and
# stops. With "agent", the reactor first fetches /health over HTTPS through
# twisted.web.client, whose TLS goes through the endpoints imported at start.
PROBE = """
import json, os, socket, ssl, sys, threading, time

spec = json.loads(sys.argv[1])


def imported():
    return sorted({m.split(".")[0] for m in sys.modules} & set(spec["optional"]))


def report(status, fetched=None):
    print(spec["mark"] + json.dumps({"imported": imported(), "status": status,
                                     "fetched": fetched}), flush=True)
    from twisted.internet import reactor
    reactor.stop()


def agent_then_report(status):
    from twisted.internet import reactor
    from twisted.internet.ssl import Certificate
    from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

    with open(spec["ca"], "rb") as f:
        policy = BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(f.read()))
    d = Agent(reactor, contextFactory=policy).request(
        b"GET", b"https://localhost:%d/servers" % spec["port"])
    d.addCallbacks(lambda r: report(status, r.code), lambda f: report(status, repr(f.value)))


def probe():
    deadline = time.monotonic() + 30
    while True:
        try:
            s = socket.create_connection(("127.0.0.1", spec["port"]), timeout=10)
            break
        except OSError:
            if time.monotonic() > deadline:
                os._exit(3)
            time.sleep(0.05)
    if spec["ca"]:
        s = ssl.create_default_context(cafile=spec["ca"]).wrap_socket(
            s, server_hostname="localhost")
    s.sendall(spec["request"].encode())
    answer = b""
    while b"\\r\\n" not in answer:
        chunk = s.recv(4096)
        if not chunk:
            break
        answer += chunk
    status = answer.split(b"\\r\\n", 1)[0].decode("latin-1")
    from twisted.internet import reactor
    reactor.callFromThread(agent_then_report if spec["agent"] else report, status)


threading.Thread(target=probe, daemon=True).start()
from twisted.scripts.twistd import run

sys.argv = ["twistd", "-n", "--pidfile=", "--logfile", spec["log"], "mcpbridge", *spec["args"]]
run()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def get(path: str, port: int, headers: str = "") -> str:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}Connection: close\r\n\r\n"


class StartupImportTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.port = free_port()

    def start(
        self,
        config: str | None = None,
        request: str | None = None,
        ca: str | None = None,
        agent: bool = False,
    ) -> dict[str, Any]:
        """Start a bridge (on self.port; from C{config}, else the default
        start) and report what it had imported once it answered."""
        if config is None:
            args = ["--listen", f"tcp:{self.port}:interface=127.0.0.1"]
        else:
            path = os.path.join(self.dir, "bridge.toml")
            with open(path, "w") as f:
                f.write(config)
            args = ["--config", path]
        spec = {
            "port": self.port,
            "args": args,
            "optional": OPTIONAL,
            "mark": MARK,
            "request": request or get("/servers", self.port),
            "ca": ca,
            "agent": agent,
            "log": os.path.join(self.dir, "twistd.log"),
        }
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "src"), ROOT]))
        done = subprocess.run(
            [sys.executable, "-c", PROBE, json.dumps(spec)],
            capture_output=True,
            text=True,
            cwd=self.dir,
            env=env,
            timeout=90,
        )
        # twistd logs what the process prints.
        log = self.log()
        reports = [line.partition(MARK)[2] for line in log.splitlines() if MARK in line]
        self.assertEqual(len(reports), 1, (done.returncode, done.stdout, done.stderr, log[-3000:]))
        result: dict[str, Any] = json.loads(reports[0])
        return result

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "twistd.log")) as f:
                return f.read()
        except OSError:
            return ""

    def config(self, extra: str, listener: str | None = None) -> str:
        listen = listener or f'listen = ["tcp:{self.port}:interface=127.0.0.1"]\n'
        return (
            listen + f'\n[servers.example]\ncommand = "{sys.executable}"\n'
            'args = ["-m", "mcptwist.example"]\n\n' + extra
        )

    def test_default_start_imports_no_optional_library(self) -> None:
        """C{twistd -n mcpbridge}, answering a request: no TLS, JWT,
        OpenTelemetry, Redis, WebSocket, schema checks or cluster client."""
        result = self.start()
        self.assertEqual(result, {"imported": [], "status": "HTTP/1.1 200 OK", "fetched": None})

    def test_tls_listener(self) -> None:
        """A TLS listener loads pyOpenSSL and serves HTTPS; an HTTPS request
        made by the bridge's process (twisted.web.client, through the
        endpoints imported without pyOpenSSL) works too."""
        ca = make_ca(self.dir)
        cert, key = make_server_cert(self.dir, ca)
        listener = (
            f'[[listeners]]\nendpoint = "tcp:{self.port}:interface=127.0.0.1"\n'
            f'tls = {{ certificate = "{cert}", key = "{key}" }}\n'
        )
        result = self.start(self.config("", listener), ca=ca.path, agent=True)
        self.assertEqual(result["status"], "HTTP/1.1 200 OK")
        self.assertEqual(result["fetched"], 200)
        self.assertEqual(
            [m for m in result["imported"] if m in ("OpenSSL", "cryptography")],
            ["OpenSSL", "cryptography"],
        )

    def test_jwt(self) -> None:
        """[auth.jwt] loads PyJWT when it checks the first token; not pyOpenSSL."""
        secret = os.path.join(self.dir, "secret")
        with open(secret, "w") as f:
            f.write("s" * 40)
        os.chmod(secret, 0o600)
        result = self.start(
            self.config(
                '[auth]\nauthorization_servers = ["https://idp.example"]\n'
                'resource_url = "https://mcp.example"\n'
                '[auth.jwt]\naudience = ["https://mcp.example"]\n'
                f'issuer = "https://idp.example"\nkey_file = "{secret}"\n'
            ),
            request=get("/servers", self.port, "Authorization: Bearer e30.e30.c2ln\r\n"),
        )
        self.assertEqual(result["status"], "HTTP/1.1 401 Unauthorized")
        self.assertIn("jwt", result["imported"])
        self.assertNotIn("OpenSSL", result["imported"])

    def test_telemetry(self) -> None:
        """[telemetry] loads OpenTelemetry."""
        result = self.start(self.config('[telemetry]\nendpoint = "http://127.0.0.1:9"\n'))
        self.assertIn("opentelemetry", result["imported"])

    def test_cluster_redis(self) -> None:
        """[cluster] with redis loads txredisapi (it connects lazily: no Redis needed)."""
        result = self.start(
            self.config(
                f'[cluster]\nnode_id = "n1"\nkeys = ["{"k" * 40}"]\n'
                'redis = "redis://127.0.0.1:9/0"\n'
                f'advertise = "http://127.0.0.1:{self.port}"\n'
            )
        )
        self.assertIn("txredisapi", result["imported"])

    def test_websocket_upgrade(self) -> None:
        """The first WebSocket upgrade loads Autobahn."""
        headers = (
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: mcp\r\n"
        )
        result = self.start(request=get("/servers/example/ws", self.port, headers))
        self.assertEqual(result["status"], "HTTP/1.1 101 Switching Protocols")
        self.assertIn("autobahn", result["imported"])
