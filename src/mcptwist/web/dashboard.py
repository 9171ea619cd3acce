# -*- test-case-name: tests.test_dashboard -*-
"""The dashboard: a page at C{/admin/ui} and the JSON it polls.

The page is static (HTML, one stylesheet, one script and the vendored
uPlot, shipped as package data and read once); its script polls, every two
seconds, C{/admin/overview} (every server and endpoint), C{/admin/history}
(each server's calls over the last minutes, from L{CallHistory}) and
C{/admin/audit} (the tail of the audit trail, filtered), and drives the
admin API's own routes for its buttons, so that every action is audited
there. These routes sit under C{/admin/}: the L{Gate} admits only the
admin scope, takes the token as Basic credentials there (what a browser
can send), and refuses every page but the bridge's own (same origin); the
page's headers forbid it any script, style or connection from elsewhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from importlib import resources
from typing import Any, Final

import attrs
from klein import Klein
from twisted.web.resource import IResource
from twisted.web.server import Request
from werkzeug.exceptions import MethodNotAllowed, NotFound

from mcptwist.mcp import jsonrpc
from mcptwist.ops.audit import AuditTrail
from mcptwist.ops.history import CallHistory

from .admission import principal_of
from .http import HTTPProblem, answered, json_body, route_not_allowed, route_not_found

PAGE_PATH: Final = "/admin/ui"
# The paths the dashboard serves (the rest of /admin/ is the admin API's).
PATHS: Final = (b"/admin/ui", b"/admin/overview", b"/admin/history", b"/admin/audit")
BASIC_CHALLENGE: Final = b'Basic realm="mcptwist admin", charset="UTF-8"'
PAGE_CSP: Final = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# What of a server's stderr the page shows.
STDERR_LINES: Final = 8
DEFAULT_AUDIT_LIMIT: Final = 100
MAX_AUDIT_LIMIT: Final = 500
OUTCOMES: Final = ("ok", "error", "timeout", "cancelled", "refused")
# The files the page loads, by the name in their URL: (file under static/, type).
ASSETS: Final = {
    "dashboard.css": ("dashboard.css", b"text/css; charset=utf-8"),
    "dashboard.js": ("dashboard.js", b"text/javascript; charset=utf-8"),
    "uPlot.iife.min.js": ("vendor/uPlot.iife.min.js", b"text/javascript; charset=utf-8"),
    "uPlot.min.css": ("vendor/uPlot.min.css", b"text/css; charset=utf-8"),
}


@attrs.frozen
class Asset:
    """A static file, read once: its bytes, type and entity tag."""

    body: bytes
    content_type: bytes
    etag: bytes

    @classmethod
    def read(cls, path: str, content_type: bytes) -> Asset:
        body = resources.files("mcptwist.web").joinpath("static", *path.split("/")).read_bytes()
        return cls(body, content_type, b'"%s"' % hashlib.sha256(body).hexdigest()[:32].encode())


def _load_assets() -> tuple[Asset, dict[str, Asset]]:
    page = Asset.read("dashboard.html", b"text/html; charset=utf-8")
    return page, {name: Asset.read(path, kind) for name, (path, kind) in ASSETS.items()}


def serves(path: bytes) -> bool:
    """Whether a path under C{/admin/} is the dashboard's."""
    return path in PATHS or path.startswith(b"/admin/ui/")


class Dashboard:
    """The dashboard's routes (full paths: mounted behind the admin API's
    check of the admin scope, see L{mcptwist.web.admin.AdminAPI})."""

    app = Klein()

    def __init__(
        self,
        servers: Callable[[], list[dict[str, Any]]],
        endpoints: Callable[[], list[dict[str, Any]]],
        audit: AuditTrail,
        history: CallHistory | None,
    ) -> None:
        self._servers = servers
        self._endpoints = endpoints
        self.audit = audit
        self.history = history
        self.page, self.assets = _load_assets()

    def resource(self) -> IResource:
        resource: IResource = self.app.resource()
        return resource

    # The page and its files

    @app.route(PAGE_PATH, methods=["GET"])
    def page_route(self, request: Request) -> bytes:
        return _send(request, self.page)

    @app.route("/admin/ui/static/<name>", methods=["GET"])
    @answered
    def asset(self, request: Request, name: str) -> bytes:
        asset = self.assets.get(name)
        if asset is None:
            raise HTTPProblem(404, jsonrpc.INVALID_REQUEST, "Not Found: no such file")
        return _send(request, asset)

    # What the page polls

    @app.route("/admin/overview", methods=["GET"])
    @answered
    def overview(self, request: Request) -> bytes:
        principal = principal_of(request)
        servers = [_summary(s) for s in self._servers() if principal.holds(s["name"])]
        endpoints = [
            _endpoint_summary(e)
            for e in self._endpoints()
            if any(principal.holds(m["name"]) for m in e.get("servers", ()))
        ]
        return json_body(
            request,
            {
                "servers": servers,
                "endpoints": endpoints,
                "audit": self.audit.enabled,
                "history": self.history is not None,
                "may_reload": "*" in principal.servers,
            },
        )

    @app.route("/admin/history", methods=["GET"])
    @answered
    def history_route(self, request: Request) -> bytes:
        history = self.history
        if history is None:
            raise HTTPProblem(
                404, jsonrpc.INVALID_REQUEST, "Not Found: no call history is kept here"
            )
        principal = principal_of(request)
        server = _query(request, b"server")
        if server is not None and not principal.holds(server):
            raise HTTPProblem(
                403, jsonrpc.FORBIDDEN, f"Forbidden: {principal.name!r} may not use this server"
            )
        names = (
            [server]
            if server is not None
            else [s["name"] for s in self._servers() if principal.holds(s["name"])]
        )
        return json_body(request, history.snapshot(names))

    @app.route("/admin/audit", methods=["GET"])
    @answered
    def audit_route(self, request: Request) -> bytes:
        principal = principal_of(request)
        outcome = _query(request, b"outcome")
        if outcome is not None and outcome not in OUTCOMES:
            raise _bad(f"outcome must be one of {', '.join(OUTCOMES)}")
        records = self.audit.recent(
            _limit(request),
            server=_query(request, b"server"),
            principal=_query(request, b"principal"),
            outcome=outcome,
            visible=principal.holds,
        )
        return json_body(request, {"enabled": self.audit.enabled, "records": records})

    not_found = app.handle_errors(NotFound)(route_not_found)
    not_allowed = app.handle_errors(MethodNotAllowed)(route_not_allowed)


def _send(request: Request, asset: Asset) -> bytes:
    """A static file with the page's headers; 304 if the client has it."""
    request.setHeader(b"content-security-policy", PAGE_CSP)
    request.setHeader(b"x-frame-options", b"DENY")
    request.setHeader(b"cache-control", b"no-cache")
    request.setHeader(b"etag", asset.etag)
    request.setHeader(b"content-type", asset.content_type)
    if request.getHeader(b"if-none-match") == asset.etag:
        request.setResponseCode(304)
        return b""
    return asset.body


def _summary(status: dict[str, Any]) -> dict[str, Any]:
    """What the page shows of a server's status: one child's, or the sum of
    a pool's (a child per session or per principal)."""
    children = status.get("children")
    if children is None:
        children = [status]
        pids = [status.get("pid")]
    else:
        pids = [c.get("pid") for c in children]
    uptimes = [c["uptime"] for c in children if c.get("uptime") is not None]
    stderr: list[str] = []
    for child in children:
        stderr.extend(child.get("stderr") or ())
    return {
        "name": status["name"],
        "sharing": status.get("sharing"),
        "state": status.get("state"),
        "pids": [p for p in pids if p is not None],
        "uptime": max(uptimes) if uptimes else None,
        "restarts": sum(c.get("restarts") or 0 for c in children),
        "sessions": status.get("sessions", 0),
        "in_flight": sum(c.get("in_flight") or 0 for c in children),
        "unresponsive": any(c.get("unresponsive") for c in children),
        "last_exit": status.get("last_exit"),
        "stopped_by_operator": bool(status.get("stopped_by_operator")),
        "stderr": stderr[-STDERR_LINES:],
    }


def _endpoint_summary(status: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": status["name"],
        "state": status.get("state"),
        "sessions": status.get("sessions", 0),
        "servers": [{"name": m["name"], "state": m["state"]} for m in status.get("servers", ())],
    }


def _bad(message: str) -> HTTPProblem:
    return HTTPProblem(400, jsonrpc.INVALID_REQUEST, f"Bad Request: {message}")


def _query(request: Request, key: bytes) -> str | None:
    """A query parameter as text; None when absent or empty."""
    values = request.args.get(key)
    if not values or not values[-1]:
        return None
    try:
        value: str = values[-1].decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(f"{key.decode()} is not UTF-8") from None
    return value


def _limit(request: Request) -> int:
    text = _query(request, b"limit")
    if text is None:
        return DEFAULT_AUDIT_LIMIT
    if not (text.isascii() and text.isdigit() and len(text) <= 4) or not (
        1 <= int(text) <= MAX_AUDIT_LIMIT
    ):
        raise _bad(f"limit must be a whole number from 1 to {MAX_AUDIT_LIMIT}")
    return int(text)


__all__ = ["BASIC_CHALLENGE", "PAGE_CSP", "PAGE_PATH", "Dashboard", "serves"]
