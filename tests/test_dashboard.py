"""The dashboard through the whole service: its page, files and JSON, the Basic
credentials a browser sends, the same-origin rule, and the audit trail's tail."""

from __future__ import annotations

import base64
import os
from typing import Any

import attrs
import orjson
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.config.model import (
    AuditConfig,
    AuthConfig,
    BridgeConfig,
    EndpointConfig,
    ServerConfig,
    TokenConfig,
)
from mcptwist.security.auth import AuthFailure, bearer_token, hash_token
from mcptwist.web.dashboard import BASIC_CHALLENGE, PAGE_CSP

from .support.bridge import Service
from .support.messages import JSON

ADMIN = "mcpt_admin-token-for-the-dashboard"
SCOPED = "mcpt_scoped-admin-token"
USER = "mcpt_user-token-not-an-admin"
ORIGIN = "http://127.0.0.1"


def basic(token: str, user: str = "anyone") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()}


def config(audit: str | None) -> BridgeConfig:
    return BridgeConfig(
        servers={n: ServerConfig(name=n, command="fake", args=(n,)) for n in ("s", "t")},
        endpoints={
            "team": EndpointConfig(name="team", servers=("s", "t"), prefixes={"s": "s", "t": "t"})
        },
        auth=AuthConfig(
            tokens=(
                TokenConfig("ops", hash_token(ADMIN), admin=True),
                TokenConfig("ops-s", hash_token(SCOPED), frozenset({"s"}), admin=True),
                TokenConfig("alice", hash_token(USER)),
            )
        ),
        audit=AuditConfig(path=audit),
    )


class DashboardTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        self.bridge = Service(self, config(os.path.join(directory, "audit.jsonl")))

    def get(self, path: str, **headers: str) -> tuple[int, Any, bytes]:
        response = self.bridge.request("GET", path, headers=headers or basic(ADMIN))
        return response.code, response.headers, self.bridge.content(response)

    def json(self, path: str, **headers: str) -> Any:
        status, _, body = self.get(path, **headers)
        self.assertEqual(status, 200, body)
        return orjson.loads(body)

    # The page and its files

    def test_the_page_is_served_with_strict_security_headers(self) -> None:
        status, headers, body = self.get("/admin/ui")
        self.assertEqual(status, 200)
        self.assertIn(b"<title>mcptwist dashboard</title>", body)
        self.assertEqual(headers.getRawHeaders("content-security-policy"), [PAGE_CSP.decode()])
        self.assertEqual(headers.getRawHeaders("x-frame-options"), ["DENY"])
        self.assertEqual(headers.getRawHeaders("x-content-type-options"), ["nosniff"])
        self.assertEqual(headers.getRawHeaders("referrer-policy"), ["no-referrer"])
        self.assertEqual(headers.getRawHeaders("content-type"), ["text/html; charset=utf-8"])
        # Nothing inline: the policy would block it.
        self.assertNotIn(b"<script>", body)
        self.assertNotIn(b"style=", body)
        self.assertNotIn(b"<style", body)

    def test_its_files_are_served_with_an_etag(self) -> None:
        for name, kind in (
            ("dashboard.js", "text/javascript; charset=utf-8"),
            ("dashboard.css", "text/css; charset=utf-8"),
            ("uPlot.iife.min.js", "text/javascript; charset=utf-8"),
            ("uPlot.min.css", "text/css; charset=utf-8"),
        ):
            status, headers, body = self.get(f"/admin/ui/static/{name}")
            self.assertEqual((status, headers.getRawHeaders("content-type")), (200, [kind]), name)
            self.assertTrue(body)
            self.assertEqual(headers.getRawHeaders("content-security-policy"), [PAGE_CSP.decode()])
            [etag] = headers.getRawHeaders("etag")
            status, _, body = self.get(
                f"/admin/ui/static/{name}", **basic(ADMIN), **{"If-None-Match": etag}
            )
            self.assertEqual((status, body), (304, b""))

    def test_an_unknown_file_or_a_path_outside_is_not_found(self) -> None:
        for path in (
            "/admin/ui/static/nope.js",
            "/admin/ui/static/vendor/uPlot.min.css",
            "/admin/ui/static/LICENSE",
            "/admin/ui/static/../../admin/servers",
            "/admin/ui/static/%2e%2e%2fdashboard.py",
            "/admin/ui/static/..%2fdashboard.py",
            "/admin/ui/elsewhere",
        ):
            status, _, body = self.get(path)
            self.assertEqual(status, 404, path)
            self.assertNotIn(b"import", body)

    # Credentials

    def test_without_credentials_a_browser_is_asked_for_them(self) -> None:
        status, headers, body = self.get("/admin/ui", Accept="text/html")
        self.assertEqual(status, 401)
        challenges = headers.getRawHeaders("www-authenticate")
        self.assertEqual(challenges[-1], BASIC_CHALLENGE.decode())
        self.assertTrue(challenges[0].startswith("Bearer"))
        self.assertNotIn(b'"s"', body)
        self.assertNotIn(b"team", body)
        # Only the page asks for Basic credentials.
        status, headers, _ = self.get("/admin/overview", Accept="application/json")
        self.assertEqual(status, 401)
        self.assertNotIn("Basic", " ".join(headers.getRawHeaders("www-authenticate")))

    def test_the_token_as_a_basic_password_or_a_bearer_token(self) -> None:
        self.assertEqual(self.get("/admin/ui", **basic(ADMIN, user=""))[0], 200)
        self.assertEqual(self.get("/admin/servers", **basic(ADMIN))[0], 200)
        self.assertEqual(self.get("/admin/ui", Authorization=f"Bearer {ADMIN}")[0], 200)

    def test_a_wrong_or_malformed_basic_credential_is_refused(self) -> None:
        for authorization in (
            basic("mcpt_wrong")["Authorization"],
            "Basic " + base64.b64encode(ADMIN.encode()).decode(),  # no user:
            "Basic !!!",
            "Basic " + base64.b64encode(b"u:not a token").decode(),
        ):
            status, _, _ = self.get("/admin/ui", Authorization=authorization)
            self.assertEqual(status, 401, authorization)

    def test_basic_is_never_accepted_outside_the_admin_api(self) -> None:
        for path in ("/servers", "/servers/s", "/metrics", "/"):
            status, _, body = self.get(path, **basic(ADMIN))
            self.assertEqual(status, 401, path)
            self.assertIn(b"not Bearer", body)
        response = self.bridge.request(
            "POST",
            "/servers/s/mcp",
            {"jsonrpc": "2.0", "id": 1, "method": "ping"},
            {**JSON, **basic(ADMIN)},
        )
        self.assertEqual(response.code, 401)

    def test_a_principal_without_the_admin_scope_is_refused(self) -> None:
        for path in ("/admin/ui", "/admin/ui/static/dashboard.js", "/admin/overview"):
            status, _, body = self.get(path, **basic(USER))
            self.assertEqual(status, 403, path)
            self.assertNotIn(b"<html", body)

    # Cross-site use

    def test_only_the_bridges_own_pages_may_call_it(self) -> None:
        own = {"Origin": ORIGIN}
        cases: list[tuple[dict[str, str], int]] = [
            ({}, 200),
            (own, 200),
            ({**own, "Sec-Fetch-Site": "same-origin"}, 200),
            ({"Sec-Fetch-Site": "none"}, 200),
            ({"Sec-Fetch-Site": "same-origin"}, 200),
            ({"Origin": "http://evil.example"}, 403),
            ({"Origin": "http://127.0.0.1:9999"}, 403),
            ({"Origin": "null"}, 403),
            ({**own, "Sec-Fetch-Site": "cross-site"}, 403),
            ({**own, "Sec-Fetch-Site": "same-site"}, 403),
            ({"Sec-Fetch-Site": "cross-site"}, 403),
            ({"Sec-Fetch-Site": "same-site"}, 403),
        ]
        for extra, expected in cases:
            for path in ("/admin/ui", "/admin/overview"):
                status, _, body = self.get(path, **basic(ADMIN), **extra)
                self.assertEqual(status, expected, (path, extra))
                if expected == 403:
                    self.assertEqual(orjson.loads(body)["error"]["code"], -32000)

    def test_its_own_origin_under_any_name(self) -> None:
        """Reached by a name that allowed_hosts matches only by "*", its own
        origin is served; another is not (a browser keeps Basic credentials
        per origin: a page that rebinds its name has none to send)."""
        anywhere = attrs.evolve(self.bridge.config, allowed_hosts=("*",))
        self.bridge = Service(self, anywhere)
        own = {"Host": "bridge.example.com", "Origin": "http://bridge.example.com"}
        status, _, _ = self.get("/admin/overview", **basic(ADMIN), **own)
        self.assertEqual(status, 200)
        other = {**own, "Origin": "http://evil.example.com"}
        status, _, _ = self.get("/admin/overview", **basic(ADMIN), **other)
        self.assertEqual(status, 403)

    def test_a_cross_site_post_is_refused_before_it_acts(self) -> None:
        pid = self.json("/admin/overview")["servers"][0]["pids"]
        response = self.bridge.request(
            "POST",
            "/admin/servers/s/restart",
            raw=b"{}",
            headers={**JSON, **basic(ADMIN), "Sec-Fetch-Site": "cross-site"},
        )
        self.assertEqual(response.code, 403)
        self.assertEqual(self.json("/admin/overview")["servers"][0]["pids"], pid)

    def test_metrics_still_refuse_every_origin(self) -> None:
        status, _, _ = self.get("/metrics", Authorization=f"Bearer {ADMIN}", Origin=ORIGIN)
        self.assertEqual(status, 403)

    # What the page polls

    def test_the_overview_shows_servers_and_endpoints(self) -> None:
        overview = self.json("/admin/overview")
        self.assertEqual([s["name"] for s in overview["servers"]], ["s", "t"])
        server = overview["servers"][0]
        for key in ("state", "pids", "uptime", "restarts", "sessions", "in_flight", "stderr"):
            self.assertIn(key, server)
        self.assertEqual(len(server["pids"]), 1)
        [endpoint] = overview["endpoints"]
        self.assertEqual(endpoint["name"], "team")
        self.assertEqual([m["name"] for m in endpoint["servers"]], ["s", "t"])
        self.assertEqual((overview["audit"], overview["history"]), (True, True))
        self.assertTrue(overview["may_reload"])

    def test_a_scoped_admin_sees_only_its_servers(self) -> None:
        overview = self.json("/admin/overview", **basic(SCOPED))
        self.assertEqual([s["name"] for s in overview["servers"]], ["s"])
        self.assertFalse(overview["may_reload"])
        history = self.json("/admin/history", **basic(SCOPED))
        self.assertEqual(list(history["servers"]), ["s"])
        self.assertEqual(self.get("/admin/history?server=t", **basic(SCOPED))[0], 403)

    def test_the_history_counts_the_calls(self) -> None:
        self.bridge.open_session("s", headers={"Authorization": f"Bearer {ADMIN}"})
        history = self.json("/admin/history?server=s")
        self.assertEqual(history["bucket"], 5.0)
        self.assertEqual(len(history["t"]), 120)
        series = history["servers"]["s"]
        self.assertEqual(series["total"], 1)
        self.assertGreater(series["calls"][-1], 0)
        self.assertEqual(self.json("/admin/history?server=t")["servers"]["t"]["total"], 0)

    def test_the_audit_tail_is_filtered(self) -> None:
        self.bridge.open_session("s", headers={"Authorization": f"Bearer {ADMIN}"})
        self.get("/admin/ui", **basic(USER))
        response = self.bridge.request(
            "POST", "/admin/servers/t/restart", raw=b"{}", headers={**JSON, **basic(ADMIN)}
        )
        self.assertEqual(response.code, 200)
        audit = self.json("/admin/audit")
        self.assertTrue(audit["enabled"])
        events = [r["event"] for r in audit["records"]]
        self.assertEqual(events[0], "admin_action")
        self.assertIn("request", events)
        self.assertIn("access_refused", events)

        records = self.json("/admin/audit?server=t&outcome=ok")["records"]
        self.assertEqual(
            [(r["event"], r["action"], r["target"]) for r in records],
            [("admin_action", "restart", "t")],
        )
        records = self.json("/admin/audit?principal=token:alice")["records"]
        self.assertEqual([r["event"] for r in records], ["access_refused"])
        records = self.json("/admin/audit?outcome=refused")["records"]
        self.assertTrue(records)
        self.assertTrue(all(r["event"] in ("access_refused", "auth_failure") for r in records))
        records = self.json("/admin/audit?server=s&outcome=ok")["records"]
        self.assertEqual([(r["event"], r["method"]) for r in records], [("request", "initialize")])
        self.assertEqual(len(self.json("/admin/audit?limit=1")["records"]), 1)

    def test_a_scoped_admin_reads_only_its_servers_records(self) -> None:
        self.bridge.request(
            "POST", "/admin/servers/t/restart", raw=b"{}", headers={**JSON, **basic(ADMIN)}
        )
        records = self.json("/admin/audit", **basic(SCOPED))["records"]
        self.assertTrue(records)
        self.assertEqual({r.get("server", r.get("target")) for r in records}, {"s"})

    def test_bad_audit_queries_are_refused(self) -> None:
        for query in ("limit=0", "limit=501", "limit=x", "outcome=maybe"):
            self.assertEqual(self.get(f"/admin/audit?{query}")[0], 400, query)


class WithoutAuditTests(SynchronousTestCase):
    def test_the_page_says_the_audit_trail_is_off(self) -> None:
        bridge = Service(self, config(None))
        response = bridge.request("GET", "/admin/audit", headers=basic(ADMIN))
        self.assertEqual(response.code, 200)
        self.assertEqual(bridge.json(response), {"enabled": False, "records": []})
        response = bridge.request("GET", "/admin/overview", headers=basic(ADMIN))
        self.assertFalse(bridge.json(response)["audit"])


TOKEN_CHARS = st.sampled_from("ABCxyz0189-._~+/")


class BasicParserTests(SynchronousTestCase):
    """Basic credentials: the password is the token, whatever the user name."""

    @given(
        st.text(st.characters(blacklist_characters=":", blacklist_categories=("Cs",))),
        st.text(TOKEN_CHARS, min_size=1, max_size=64),
        st.text("=", max_size=2),
    )
    def test_the_password_is_the_token(self, user: str, token: str, padding: str) -> None:
        secret = token + padding
        header = b"Basic " + base64.b64encode(f"{user}:{secret}".encode())
        self.assertEqual(bearer_token(header, basic=True), secret)
        with self.assertRaises(AuthFailure):
            bearer_token(header)

    @given(st.binary(max_size=200))
    def test_anything_else_is_refused_as_malformed(self, credentials: bytes) -> None:
        header = b"Basic " + base64.b64encode(credentials)
        try:
            token = bearer_token(header, basic=True)
        except AuthFailure as failure:
            self.assertEqual(failure.status, 401)
        else:
            self.assertEqual(credentials.partition(b":")[2], token.encode())
