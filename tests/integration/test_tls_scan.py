"""An sslyze scan of a real TLS listener built the way the bridge builds it.

sslyze 6 requires C{cryptography<47}, while pyOpenSSL 26 requires
C{cryptography>=49}: the two cannot share a virtualenv. The scanner
therefore runs from its own venv, created on first use under
C{build/sslyze-venv} (about 15 s with PyPI reachable) and reused after.
Set C{SSLYZE_PYTHON} to a Python that has sslyze to use that instead.
Without network access the test is skipped (under C{CI}, it fails).

The listener comes from an C{ssl:} endpoint string, through
L{parse_ssl_endpoint}, L{ReloadableTLS} and L{listening_factory}, so the
scan covers what a migrated C{ssl:} configuration serves.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import endpoints, reactor, ssl
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from mcptwist.config.endpoints import join_description, parse_ssl_endpoint
from mcptwist.config.model import ListenerConfig
from mcptwist.security.ipfilter import listening_factory
from mcptwist.security.tls import ReloadableTLS, tls_factory
from tests.support.tls import cert_dir, listen, make_site

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / "build" / "sslyze-venv"
REQUIREMENT = "sslyze>=6.3,<7"
SCANS = (
    "--sslv2",
    "--sslv3",
    "--tlsv1",
    "--tlsv1_1",
    "--tlsv1_2",
    "--tlsv1_3",
    "--compression",
    "--reneg",
    "--heartbleed",
    "--robot",
    "--openssl_ccs",
    "--fallback",
)
# Substrings of IANA suite names that mean a weak suite.
WEAK = ("_CBC_", "RC4", "3DES", "_DES", "NULL", "EXPORT", "anon", "MD5")
AEAD = ("_GCM_", "CHACHA20_POLY1305", "_CCM")


def _unavailable(message: str) -> None:
    if os.environ.get("CI"):
        raise AssertionError("CI is set but " + message)
    raise SkipTest(message)


def sslyze_python() -> str:
    """A Python with sslyze: C{SSLYZE_PYTHON}, or the venv, created if needed."""
    given = os.environ.get("SSLYZE_PYTHON")
    if given:
        return given
    python = VENV / "bin" / "python"
    if python.exists():
        check = subprocess.run([python, "-c", "import sslyze"], capture_output=True, timeout=60)
        if check.returncode == 0:
            return str(python)
        shutil.rmtree(VENV)
    VENV.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the final place, then rename: a half-made venv is never used.
    staging = Path(tempfile.mkdtemp(prefix="sslyze-venv-", dir=VENV.parent))
    try:
        subprocess.run([sys.executable, "-m", "venv", staging], check=True, timeout=120)
        pip = subprocess.run(
            [staging / "bin" / "python", "-m", "pip", "install", "-q", REQUIREMENT],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if pip.returncode != 0:
            _unavailable(f"cannot install {REQUIREMENT} ({pip.stderr.strip()[-500:]})")
        staging.rename(VENV)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return str(python)


def scan(python: str, port: int) -> dict[str, Any]:
    """Run sslyze against 127.0.0.1:PORT; its scan result for the server."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "scan.json")
        result = subprocess.run(
            [
                python,
                "-m",
                "sslyze",
                f"--json_out={out}",
                "--quiet",
                "--mozilla_config=disable",
                *SCANS,
                f"127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0 or not os.path.exists(out):
            raise AssertionError(f"sslyze failed ({result.returncode}): {result.stderr[-2000:]}")
        with open(out) as f:
            document = json.load(f)
    [server] = document["server_scan_results"]
    assert server["scan_status"] == "COMPLETED", server.get("connectivity_error_trace")
    results: dict[str, Any] = server["scan_result"]
    return results


def accepted(results: dict[str, Any], name: str) -> list[str]:
    return [
        suite["cipher_suite"]["name"] for suite in results[name]["result"]["accepted_cipher_suites"]
    ]


def problems(results: dict[str, Any]) -> list[str]:
    """Everything in a scan that breaks the bridge's TLS policy."""
    found = []
    for name, entry in results.items():
        if entry is not None and entry["status"] not in ("COMPLETED", "NOT_SCHEDULED"):
            found.append(f"{name}: scan {entry['status']}: {entry.get('error_trace')}")
    for legacy in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1"):
        suites = accepted(results, f"{legacy}_cipher_suites")
        if suites:
            found.append(f"{legacy} accepted: {suites}")
    tls12 = accepted(results, "tls_1_2_cipher_suites")
    tls13 = accepted(results, "tls_1_3_cipher_suites")
    if not tls12 or not tls13:
        found.append(f"TLS 1.2 and 1.3 must both work: {tls12}, {tls13}")
    for suite in tls12:
        if not suite.startswith(("TLS_ECDHE_", "TLS_DHE_")):
            found.append(f"{suite}: no forward secrecy")
        if any(weak in suite for weak in WEAK) or suite.endswith("_SHA"):
            found.append(f"{suite}: weak cipher or SHA-1 MAC")
        if not any(aead in suite for aead in AEAD):
            found.append(f"{suite}: not AEAD")
    checks = {
        "tls_compression": ("supports_compression", False),
        "heartbleed": ("is_vulnerable_to_heartbleed", False),
        "openssl_ccs_injection": ("is_vulnerable_to_ccs_injection", False),
        "tls_fallback_scsv": ("supports_fallback_scsv", True),
    }
    for name, (key, good) in checks.items():
        if results[name]["result"][key] != good:
            found.append(f"{name}: {key} is {results[name]['result'][key]}")
    reneg = results["session_renegotiation"]["result"]
    if reneg["is_vulnerable_to_client_renegotiation_dos"]:
        found.append("client-initiated renegotiation is accepted")
    if not reneg["supports_secure_renegotiation"]:
        found.append("insecure renegotiation (no RFC 5746)")
    robot = results["robot"]["result"]["robot_result"]
    if not robot.startswith("NOT_VULNERABLE"):
        found.append(f"ROBOT: {robot}")
    return found


class TLSScanTests(TestCase):
    timeout = 900

    async def test_sslyze_finds_nothing_weak(self) -> None:
        python = await deferToThread(sslyze_python)
        certs = cert_dir(self)
        cert, key = certs.one
        description = join_description(
            ["ssl", "0"],
            [("interface", "127.0.0.1"), ("privateKey", key), ("certKey", cert)],
        )
        parsed = parse_ssl_endpoint(description)
        assert parsed is not None
        tcp, tls = parsed
        factory = listening_factory(ListenerConfig(tcp, tls=tls), make_site(), ReloadableTLS(tls))
        port = await listen(self, factory, endpoints.serverFromString(reactor, tcp))
        results = await deferToThread(scan, python, port)
        self.assertEqual(problems(results), [])
        self.assertEqual(
            sorted(accepted(results, "tls_1_2_cipher_suites")),
            [
                "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
                "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
                "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
            ],
        )

    async def test_the_check_catches_twisted_defaults(self) -> None:
        """Control: Twisted's default cipher list is flagged (why tls.py replaces it)."""
        python = await deferToThread(sslyze_python)
        cert, key = cert_dir(self).one
        with open(cert, "rb") as c, open(key, "rb") as k:
            pem = ssl.PrivateCertificate.loadPEM(c.read() + k.read())
        options = ssl.CertificateOptions(
            privateKey=pem.privateKey.original, certificate=pem.original
        )
        port = await listen(self, tls_factory(options, make_site()))
        found = problems(await deferToThread(scan, python, port))
        self.assertIn("TLS_RSA_WITH_AES_128_CBC_SHA: no forward secrecy", found)
        self.assertIn("TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA: weak cipher or SHA-1 MAC", found)
