"""The dashboard in a real browser: headless Debian Chromium, driven by Selenium,
against a real bridge with two servers and an endpoint.

The browser sends the admin token as the Basic credentials it would send
after its prompt (set through the DevTools protocol, as no prompt can be
answered headless). Screenshots (light, dark, phone) are kept in
C{screenshots/} under the test run's temporary folder.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from mcptwist.config.keys import digest_text
from mcptwist.security.auth import hash_token

from . import harness as h

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ADMIN = "mcpt_dashboard_admin_token_for_tests"
SERVER_ACCEPT = "application/json, text/event-stream"
PROTOCOL = "2025-11-25"
WAIT = 20.0


def config() -> str:
    return (
        "[[auth.tokens]]\n"
        'name = "ops"\n'
        f'hash = "{digest_text(hash_token(ADMIN))}"\n'
        'servers = ["*"]\n'
        "admin = true\n"
        '[audit]\npath = "audit.jsonl"\n'
        + h.python_server_toml("example", ["-m", "mcptwist.example"])
        + h.python_server_toml("spare", ["-m", "mcptwist.example"])
        + '[endpoints.team]\nservers = ["example", "spare"]\nprefix.spare = "sp"\n'
    )


class DashboardBrowserTests(SynchronousTestCase):
    def setUp(self) -> None:
        if not os.path.exists(CHROMIUM) or not os.path.exists(CHROMEDRIVER):
            raise SkipTest(
                f"{CHROMIUM} and {CHROMEDRIVER} are needed (apt-get install chromium "
                "chromium-driver; tests/packages.sh installs them)"
            )
        os.environ["SE_OFFLINE"] = "true"
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.bridge = h.start_bridge(self, config())
        self.bearer = {"Authorization": f"Bearer {ADMIN}"}
        self.shots = Path(os.path.abspath("screenshots"))
        self.shots.mkdir(exist_ok=True)
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in (
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--window-size=1280,1000",
        ):
            options.add_argument(argument)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(
            service=Service(executable_path=CHROMEDRIVER), options=options
        )
        self.addCleanup(self.driver.quit)
        credentials = base64.b64encode(f"operator:{ADMIN}".encode()).decode()
        self.driver.execute_cdp_cmd("Network.enable", {})
        self.driver.execute_cdp_cmd(
            "Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {credentials}"}}
        )

    # Helpers

    def admin_pid(self, name: str) -> int:
        status, _, body = h.http(
            "GET", self.bridge.url(f"/admin/servers/{name}"), headers=self.bearer
        )
        self.assertEqual(status, 200, body)
        pid: int = json.loads(body)["pid"]
        return pid

    def text(self, selector: str) -> str:
        from selenium.webdriver.common.by import By

        elements = self.driver.find_elements(By.CSS_SELECTOR, selector)
        return str(elements[0].text) if elements else ""

    def until(self, check: Any, what: str) -> Any:
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, WAIT, poll_frequency=0.2).until(
            lambda _: check(), message=what
        )

    def calls(self, count: int) -> None:
        """C{count} tool calls to C{example} in one session, over raw HTTP."""
        headers = {**self.bearer, "Accept": SERVER_ACCEPT}
        init = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": PROTOCOL,
                "capabilities": {},
                "clientInfo": {"name": "t"},
            },
        }
        url = self.bridge.mcp_url("example")
        status, answer, body = h.http("POST", url, init, headers)
        self.assertEqual(status, 200, body)
        headers["Mcp-Session-Id"] = answer["mcp-session-id"]
        headers["MCP-Protocol-Version"] = PROTOCOL
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        self.assertEqual(h.http("POST", url, note, headers)[0], 202)
        for i in range(count):
            call = {
                "jsonrpc": "2.0",
                "id": i + 1,
                "method": "tools/call",
                "params": {"name": "uuid", "arguments": {}},
            }
            status, _, body = h.http("POST", url, call, headers)
            self.assertEqual(status, 200, body)

    def screenshot(self, name: str) -> None:
        path = self.shots / name
        self.assertTrue(self.driver.save_screenshot(str(path)), path)

    # The test

    def test_the_dashboard(self) -> None:
        from selenium.webdriver.common.alert import Alert
        from selenium.webdriver.support import expected_conditions

        # Without the token the page is refused, and names no server.
        status, headers, body = h.http("GET", self.bridge.url("/admin/ui"))
        self.assertEqual(status, 401)
        self.assertIn("Basic", headers["www-authenticate"])
        for name in (b"example", b"spare", b"team"):
            self.assertNotIn(name, body)

        # With it, the page shows the running servers, their pids, and the endpoint.
        pid = self.admin_pid("example")
        self.driver.get(self.bridge.url("/admin/ui"))
        card = 'article.server[data-server="example"]'
        self.until(lambda: self.text(f"{card} .pid") == str(pid), "the example server's pid")
        self.until(lambda: self.text('article.server[data-server="spare"] .state'), "spare")
        self.assertEqual(self.text(f"{card} .state"), "running")
        self.until(lambda: "team" in self.text('article.endpoint[data-endpoint="team"]'), "team")

        # Calls show in its numbers and its chart while they run.
        before = int(self.text(f"{card} .calls-total") or 0)
        self.calls(12)
        self.until(
            lambda: int(self.text(f"{card} .calls-total") or 0) >= before + 12,
            "the call count to grow",
        )
        canvases = self.driver.execute_script(
            "return document.querySelectorAll(arguments[0] + ' .chart canvas').length", card
        )
        self.assertEqual(canvases, 3)
        # The audit trail's tail shows the calls.
        self.until(lambda: "tools/call" in self.text("#audit-rows"), "the audit tail")
        self.screenshot("dashboard-light.png")

        # Dark colour scheme.
        self.driver.execute_cdp_cmd(
            "Emulation.setEmulatedMedia",
            {"features": [{"name": "prefers-color-scheme", "value": "dark"}]},
        )
        background = "return getComputedStyle(document.body).backgroundColor"
        self.until(
            lambda: self.driver.execute_script(background) == "rgb(13, 17, 23)", "dark colours"
        )
        self.until(
            lambda: (
                self.driver.execute_script(
                    "return document.querySelectorAll('.chart canvas').length"
                )
                == 6
            ),
            "the charts redrawn",
        )
        self.screenshot("dashboard-dark.png")

        # A phone-sized screen: the cards stack, nothing spills sideways.
        self.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True},
        )
        self.until(
            lambda: self.driver.execute_script(
                "return document.documentElement.scrollWidth <= window.innerWidth"
            ),
            "the page to fit a phone's width",
        )
        self.screenshot("dashboard-phone.png")
        self.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        self.driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})

        # Restart, after the confirmation: the child's pid changes.
        self.driver.find_element("css selector", f'{card} button[data-action="restart"]').click()
        alert = self.until(lambda: expected_conditions.alert_is_present()(self.driver), "confirm")
        self.assertIn("Restart the server example?", alert.text)
        Alert(self.driver).accept()
        new_pid = self.until(
            lambda: (p := self.admin_pid("example")) != pid and p, "the pid to change"
        )
        self.until(lambda: self.text(f"{card} .pid") == str(new_pid), "the page's new pid")
        self.until(lambda: "restart" in self.text("#audit-rows"), "the restart audited")

        # No Content-Security-Policy violation, nor any other error, in the console.
        log = self.driver.get_log("browser")
        self.assertEqual(
            [e for e in log if "Content Security Policy" in e["message"] or e["level"] == "SEVERE"],
            [],
        )
