"""A child per principal, with each principal's own credentials, driven by
real clients against a real bridge and real children.

Server C{who} runs the stdio fixture in C{sharing = "principal"} mode; its
environment takes C{GH_TOKEN} from a claim of each client's JWT,
C{DB_PASSWORD} from the client's entry of a 0600 secrets file and C{API_KEY}
from a systemd credential (a real C{systemd-run} unit where systemd runs,
otherwise the same directory systemd would make: C{$CREDENTIALS_DIRECTORY},
0500, its files 0400). The fixture reports its environment through a tool,
and dumps it, with every line it reads, to files the tests search.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jwt
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from ..support.idp import SECRET, SECRET_ISSUER
from . import harness as h

AUD = "https://mcp.example.com"
MODERN = "2026-07-28"
# Each principal's values, as its JWT claims and the secrets file give them.
CLAIMS = {"alice": "gh-alice-7f3a9c", "bob": "gh-bob-52e8d1"}
DB = {"alice": "db-alice-c41b07", "bob": "db-bob-9d2e66"}
API_KEY = "systemd-api-key-0e5f3b"


def token(sub: str, **claims: Any) -> str:
    now = int(time.time())
    payload = {
        "sub": sub,
        "aud": AUD,
        "iss": SECRET_ISSUER,
        "iat": now,
        "exp": now + 600,
        "mcp_servers": "*",
        **claims,
    }
    return jwt.encode(payload, SECRET, "HS256")


def said(call: dict[str, Any]) -> str:
    """The text of one call of C{sdk_client.py}'s list_and_call (asserted: no error)."""
    assert "error" not in call and not call.get("is_error"), call
    return "".join(call["texts"])


def write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w") as f:
        f.write(text)


def secrets_text(db: dict[str, str]) -> str:
    return "".join(f'["jwt:{who}"]\nDB_PASSWORD = "{value}"\n' for who, value in db.items())


def credentials_directory(root: Path) -> Path:
    """What systemd makes of C{LoadCredential=api_key:...}: a directory only
    the service may read, holding one read-only file per credential."""
    directory = root / "credentials"
    directory.mkdir()
    (directory / "api_key").write_text(API_KEY)
    (directory / "api_key").chmod(0o400)
    directory.chmod(0o500)
    return directory


class PrincipalMixin:
    bridge: h.Bridge
    dir: Path
    dumps: Path
    secrets: Path

    def config(self, **server: Any) -> str:
        self.dumps = self.dir / "dumps"
        self.dumps.mkdir()
        key = self.dir / "jwt.secret"
        key.write_bytes(SECRET)
        self.secrets = self.dir / "secrets.toml"
        write_private(self.secrets, secrets_text(DB))
        extra = "\n".join(f"{k} = {json.dumps(v)}" for k, v in server.items())
        fixture = str(h.FIXTURES / "stdio_fixture.py")
        return f"""
[auth]
authorization_servers = [{h.toml_str(SECRET_ISSUER)}]
resource_url = {h.toml_str(AUD)}

[auth.jwt]
issuer = {h.toml_str(SECRET_ISSUER)}
audience = [{h.toml_str(AUD)}]
key_file = {h.toml_str(str(key))}
algorithms = ["HS256"]

[secrets]
file = {h.toml_str(str(self.secrets))}

[audit]
path = {h.toml_str(str(self.dir / "audit.jsonl"))}

[servers.who]
command = {h.toml_str(h.PYTHON)}
args = [{h.toml_str(fixture)}, "--dump", {h.toml_str(str(self.dumps))}]
sharing = "principal"
{extra}

[servers.who.env]
GH_TOKEN = "${{claim:gh_token}}"
DB_PASSWORD = "${{secret:DB_PASSWORD}}"
API_KEY = "${{credential:api_key}}"
"""

    def token(self, who: str, **claims: Any) -> str:
        return token(who, **{"gh_token": CLAIMS.get(who, f"gh-{who}"), **claims})

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {token('ops', scope='mcp:admin')}"}

    def sdk(
        self, who: str, transport: str, mode: str, *args: str, bearer: str | None = None
    ) -> dict[str, Any]:
        path = "/servers/who/" + ("mcp" if transport == "http" else "sse")
        argv = ("--url", self.bridge.url(path), "--transport", transport, "--mode", mode)
        argv += ("--bearer", bearer or self.token(who))
        try:
            return h.run_client("sdk_client.py", *argv, *args)
        except AssertionError as e:
            raise AssertionError(f"{e}\nbridge log:\n{self.bridge.log[-4000:]}") from None

    def getenv(self, who: str, transport: str, mode: str, *names: str) -> dict[str, str]:
        """The values of some of the child's variables, and its pid, as the
        principal's client sees them (one session)."""
        calls: list[str] = []
        for name in (*names, "pid"):
            calls += (name if name == "pid" else "getenv", json.dumps({"name": name}))
        result = self.sdk(who, transport, mode, "list_and_call", *calls)
        assert result.get("ok"), json.dumps(result)[:3000]
        return {
            name: said(call) for name, call in zip((*names, "pid"), result["calls"], strict=True)
        }

    def initialize(self, who: str) -> tuple[int, dict[str, str], bytes]:
        """A raw initialize of server who, as C{who}: (status, headers, body)."""
        body = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {}},
        }
        headers = {
            "Accept": "application/json, text/event-stream",
            "Authorization": f"Bearer {self.token(who)}",
        }
        return h.http("POST", self.bridge.mcp_url("who"), body, headers)

    def status(self) -> dict[str, Any]:
        code, _, body = h.http("GET", self.bridge.url("/servers/who"), headers=self.admin())
        assert code == 200, (code, body)
        return json.loads(body)  # type: ignore[no-any-return]

    def running(self) -> dict[str, int]:
        """The running children of C{who}: each principal's pid."""
        return {
            c["principal"]: c["pid"]
            for c in self.status()["children"]
            if c["state"] == "running" and c["pid"]
        }

    def audit(self) -> list[dict[str, Any]]:
        path = self.dir / "audit.jsonl"
        text = path.read_text() if path.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line.strip()]


class PrincipalTests(PrincipalMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mcptwist-principal-"))
        credentials = credentials_directory(self.dir)
        # The bridge's stop removes its directory: this one must be writable then.
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.addCleanup(lambda: credentials.exists() and credentials.chmod(0o700))
        config = self.config(max_children=3, child_idle_timeout=3)
        self.bridge = h.start_bridge(
            self, config, directory=self.dir, env={"CREDENTIALS_DIRECTORY": str(credentials)}
        )

    def test_two_principals_two_children(self) -> None:
        """Alice and Bob each see their own token, password and pid, and the
        one systemd key; each principal's sessions share its child, over
        Streamable HTTP (both eras) and HTTP+SSE."""
        seen: dict[str, set[str]] = {"alice": set(), "bob": set()}
        for transport, mode in (("http", "legacy"), ("http", MODERN), ("sse", "legacy")):
            for who in ("alice", "bob"):
                values = self.getenv(who, transport, mode, "GH_TOKEN", "DB_PASSWORD", "API_KEY")
                self.assertEqual(
                    (values["GH_TOKEN"], values["DB_PASSWORD"], values["API_KEY"]),
                    (CLAIMS[who], DB[who], API_KEY),
                    f"{who} over {transport} ({mode})",
                )
                seen[who].add(values["pid"])
        self.assertEqual(len(seen["alice"]), 1, "one child for all of alice's sessions")
        self.assertEqual(len(seen["bob"]), 1)
        self.assertNotEqual(seen["alice"], seen["bob"])
        running = self.running()
        self.assertEqual(
            {who: str(pid) for who, pid in running.items()},
            {"jwt:alice": seen["alice"].pop(), "jwt:bob": seen["bob"].pop()},
        )

    def test_twenty_concurrent_clients(self) -> None:
        """Twenty clients at once, ten per principal, over both transports:
        every answer is the right one, and the ten of a principal share its child."""
        result = h.run_client(
            "concurrent_clients.py",
            "--base",
            self.bridge.base,
            "--server",
            "who",
            "--clients",
            "20",
            "--calls",
            "5",
            "--transport",
            "mixed",
            "--bearer",
            self.token("alice"),
            "--bearer",
            self.token("bob"),
            timeout=120,
        )
        self.assertEqual(result.get("bad"), [], json.dumps(result)[:3000])
        self.assertEqual(result["answers"], 100)
        self.assertEqual(sorted(self.running()), ["jwt:alice", "jwt:bob"])
        code, _, raw = h.http("GET", self.bridge.url("/metrics"), headers=self.admin())
        self.assertEqual(code, 200)
        self.assertIn('mcptwist_children{server="who"} 2.0', raw.decode())
        self.assertNotIn("alice", raw.decode())
        spawned = [r for r in self.audit() if r["event"] == "child_spawned"]
        self.assertEqual(len(spawned), 2, spawned)

    def test_missing_credential(self) -> None:
        """Carol has no entry in the secrets file: a 403 JSON-RPC error naming
        the key, an audit record, and no child."""
        result = self.sdk("carol", "http", "legacy", "info")
        self.assertFalse(result.get("ok"), result)
        self.assertIn("DB_PASSWORD", json.dumps(result))
        code, _, raw = self.initialize("carol")
        self.assertEqual(code, 403)
        error = json.loads(raw)["error"]
        self.assertIn("'DB_PASSWORD'", error["message"])
        self.assertIn("jwt:carol", error["message"])
        refused = [r for r in self.audit() if r["event"] == "credential_missing"]
        self.assertTrue(refused)
        self.assertEqual({r["principal"] for r in refused}, {"jwt:carol"})
        self.assertEqual(self.status()["children"], [])
        self.assertEqual(list(self.dumps.glob("*.env")), [])

    def test_no_client_credential_reaches_the_child(self) -> None:
        """The client's Authorization header (its JWT, its cookies) is
        nowhere in the child's environment or in any line the child read;
        the secret values are nowhere in the bridge's log, audit trail,
        status, admin answers or metrics."""
        alice = self.token("alice")
        cookie = "session=cookie-value-3b9f"
        for transport, mode in (("http", "legacy"), ("http", MODERN), ("sse", "legacy")):
            result = self.sdk("alice", transport, mode, "list_and_call", "pid", "{}", bearer=alice)
            self.assertTrue(result.get("ok"), result)
        # A raw request with a cookie too, and a tool call naming no secret.
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "pid"}}
        headers = {
            "Accept": "application/json, text/event-stream",
            "Authorization": f"Bearer {alice}",
            "Cookie": cookie,
            "MCP-Protocol-Version": MODERN,
            "Mcp-Method": "tools/call",
            "Mcp-Name": "pid",
        }
        body["params"]["_meta"] = {
            "io.modelcontextprotocol/protocolVersion": MODERN,
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
        }
        code, _, raw = h.http("POST", self.bridge.mcp_url("who"), body, headers)
        self.assertEqual(code, 200, raw)
        dumped = [p.read_text() for p in self.dumps.iterdir()]
        self.assertTrue(dumped)
        for text in dumped:
            for leaked in (alice, "Bearer", cookie, "cookie-value"):
                self.assertNotIn(leaked, text)
        env = json.loads(next(self.dumps.glob("*.env")).read_text())
        self.assertEqual(env["GH_TOKEN"], CLAIMS["alice"])
        self.assertNotIn("AUTHORIZATION", {k.upper() for k in env})
        # What the operator sees names alice, never a secret value.
        seen = [self.bridge.log, (self.dir / "audit.jsonl").read_text()]
        for path in ("/servers", "/servers/who", "/health", "/admin/sessions", "/metrics"):
            code, _, raw = h.http("GET", self.bridge.url(path), headers=self.admin())
            self.assertEqual(code, 200, (path, raw[:300]))
            seen.append(raw.decode())
        self.assertIn("jwt:alice", seen[2] + seen[3])
        for text in seen:
            for secret in (CLAIMS["alice"], DB["alice"], DB["bob"], API_KEY):
                self.assertNotIn(secret, text)

    def test_pool_full(self) -> None:
        """With max_children children running, a fourth principal gets 503
        with Retry-After; the others go on."""
        for who in ("alice", "bob", "dave"):
            if who == "dave":
                write_private(self.secrets, secrets_text({**DB, "dave": "db-dave", "erin": "e"}))
            self.getenv(who, "http", "legacy", "GH_TOKEN")
        # The first three may have been reaped (idle): keep them busy.
        with ThreadPoolExecutor(3) as pool:
            busy = [
                pool.submit(self.sdk, who, "http", "legacy", "call", "sleep", '{"seconds": 4}')
                for who in ("alice", "bob", "dave")
            ]
            h.wait_for(lambda: len(self.running()) == 3, 20.0, "three children")
            code, headers_, raw = self.initialize("erin")
            self.assertEqual(code, 503, raw)
            self.assertEqual(headers_.get("retry-after"), "5")
            self.assertIn("max_children", json.loads(raw)["error"]["message"])
            for future in busy:
                self.assertTrue(future.result().get("ok"))

    def test_idle_child_is_reaped(self) -> None:
        """A principal's child stops child_idle_timeout after its last session."""
        values = self.getenv("alice", "http", "legacy", "GH_TOKEN")
        pid = int(values["pid"])
        self.assertTrue(h.process_state(pid))
        h.wait_for(lambda: not self.running(), 20.0, "alice's child to be reaped")
        h.wait_for(lambda: h.process_state(pid) in (None, "Z"), 10.0, "the reaped child to exit")

    def test_changed_secret_restarts_after_in_flight(self) -> None:
        """Alice's password changes while her child works on a call: the call
        is answered by the old child, her next call gets a new child with the
        new password, on the same session."""
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(
                self.sdk,
                "alice",
                "http",
                "legacy",
                "list_and_call",
                "pid",
                "{}",
                "sleep",
                '{"seconds": 3}',
                "getenv",
                '{"name": "DB_PASSWORD"}',
                "pid",
                "{}",
            )
            h.wait_for(lambda: self.running().get("jwt:alice"), 20.0, "alice's child")
            old = self.running()["jwt:alice"]
            time.sleep(1.0)  # the sleep call is in flight
            write_private(self.secrets, secrets_text({**DB, "alice": "db-alice-rotated"}))
            # Another client of alice's, on a session of its own, asks meanwhile.
            other = self.getenv("alice", "http", "legacy", "DB_PASSWORD")
            result = slow.result()
        self.assertTrue(result.get("ok"), result)
        first, sleep, password, last = (said(c) for c in result["calls"])
        self.assertEqual(first, str(old))
        self.assertEqual(sleep, "slept", "the call in flight finished on the old child")
        self.assertEqual(password, "db-alice-rotated")
        self.assertNotEqual(last, str(old))
        self.assertEqual(other["DB_PASSWORD"], "db-alice-rotated")
        self.assertEqual(other["pid"], last)
        h.wait_for(lambda: h.process_state(old) in (None, "Z"), 10.0, "the old child to exit")


class SystemdCredentialTests(PrincipalMixin, SynchronousTestCase):
    """C{${credential:NAME}} under a real systemd unit (C{systemd-run
    -p LoadCredential=}), where systemd runs the machine."""

    def setUp(self) -> None:
        if not Path("/run/systemd/system").is_dir() or shutil.which("systemd-run") is None:
            raise SkipTest(
                "systemd does not run this machine: PrincipalTests use the directory "
                "systemd would make"
            )
        self.dir = Path(tempfile.mkdtemp(prefix="mcptwist-principal-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        source = self.dir / "api_key.source"
        source.write_text(API_KEY)
        source.chmod(0o600)
        config = self.dir / "mcpbridge.toml"
        config.write_text(self.config())
        unit = f"mcptwist-test-{os.getpid()}-{int(time.time())}"
        self.log = self.dir / "bridge.log"
        self.proc = subprocess.Popen(
            [
                "systemd-run",
                "--quiet",
                "--wait",
                "--collect",
                f"--unit={unit}",
                "-p",
                f"LoadCredential=api_key:{source}",
                "-p",
                f"WorkingDirectory={self.dir}",
                "--setenv=PYTHONPATH=" + str(h.SRC),
                h.TWISTD,
                "-n",
                "--pidfile=",
                "mcpbridge",
                "--config",
                str(config),
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--logfile",
                str(self.log),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.addCleanup(subprocess.run, ["systemctl", "stop", unit], check=False)

    def test_credential_from_systemd(self) -> None:
        match = h.wait_for(
            lambda: h._LISTENING.search(self.log.read_text()) if self.log.exists() else None,
            h.STARTUP_TIMEOUT,
            "the unit's bridge to listen",
        )
        base = f"http://127.0.0.1:{match.group(1)}"

        class Unit:
            log = ""

            def url(self, path: str) -> str:
                return base + path

        self.bridge = Unit()  # type: ignore[assignment]
        values = self.getenv("alice", "http", "legacy", "API_KEY", "CREDENTIALS_DIRECTORY")
        self.assertEqual(values["API_KEY"], API_KEY)
        self.assertEqual(
            values["CREDENTIALS_DIRECTORY"], "", "the child does not get the directory"
        )
