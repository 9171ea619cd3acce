# -*- test-case-name: tests.test_admin -*-
"""The admin API: servers' status and lifecycle, sessions and reload, over HTTP.

Every route is under C{/admin}. The L{Gate} admits only principals with the
admin scope there; this resource checks that again before any route, so it
is safe wherever it is mounted. An admin acts only on the servers its grants
name: it sees, drives and closes sessions of those alone, and lists show no
other; adding a server needs a grant of its name, a reload a grant of all. Every call that changes something is written
to the audit trail with its outcome, failures included, and runs to its end
even if the client goes away (the outcome is audited then too).

The work is done by an L{AdminControl}, which the service implements; this
module is only its HTTP face. Errors are JSON-RPC error bodies, as everywhere
in the bridge, with the status a client can act on: 400 bad body or query,
403 not an admin, not granted the server, or adding servers is off,
404 unknown server or session, 405 wrong method, 409 the name exists,
415 not JSON, 422 a configuration error (naming key and fix).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Final, Protocol, TypeVar

from klein import Klein
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request
from werkzeug.exceptions import MethodNotAllowed, NotFound

from mcptwist.config.model import ConfigError
from mcptwist.mcp import jsonrpc
from mcptwist.ops.audit import AuditTrail
from mcptwist.security.auth import Principal

from .access import identity
from .admission import admission_of, peer_of, principal_of
from .dashboard import Dashboard, serves
from .forward import Forwarder
from .http import (
    HTTPProblem,
    answered,
    json_body,
    read_body,
    require_json,
    route_not_allowed,
    route_not_found,
)

log = Logger(namespace="mcptwist.web.admin")

T = TypeVar("T")

MAX_BODY: Final = 1024 * 1024
DEFAULT_STDERR_LINES: Final = 100
MAX_STDERR_LINES: Final = 10_000
_ADD_FORM: Final = (
    'send {"name": "NAME", "config": {"command": "ONE OF [admin.commands]", ...other settings}}'
)


class AdminControl(Protocol):
    """What the admin API drives; the service implements it."""

    def servers(self) -> list[dict[str, Any]]:
        """The full status of every server."""

    def server(self, name: str) -> dict[str, Any] | None:
        """The full status of one server; None if there is none of that name."""

    def start(self, name: str) -> Deferred[dict[str, Any]]:
        """Start a stopped server; its status then. KeyError if unknown."""

    def stop(self, name: str) -> Deferred[dict[str, Any]]:
        """Stop a server (its sessions end); its status then. KeyError if unknown."""

    def restart(self, name: str) -> Deferred[dict[str, Any]]:
        """Stop and start a server; its status then. KeyError if unknown."""

    def stop_child(self, name: str, principal: str) -> dict[str, Any]:
        """Stop one principal's child of a server in principal mode (its sessions
        end); the server's status. KeyError if the server is unknown,
        LookupError if that principal has no child there."""

    def stderr(self, name: str, lines: int) -> list[str]:
        """The last C{lines} lines a server wrote to stderr. KeyError if unknown."""

    def sessions(self, server: str | None) -> list[dict[str, Any]]:
        """The open sessions, of every server or of one."""

    def close_session(self, session_id: str) -> bool:
        """Close a session; False if there is none with this id."""

    def add_server(self, name: str, table: dict[str, Any]) -> Deferred[dict[str, Any]]:
        """Add and start a server until the next reload; its status.

        The table's C{command} names one of the configuration's
        C{[admin.commands]}; nothing in it is expanded. ConfigError if the
        name or the table is not a valid server (config.requested_server),
        ValueError if the name is taken, PermissionError if the
        configuration allows no commands.
        """

    def remove_server(self, name: str) -> Deferred[dict[str, Any]]:
        """Stop and forget a server until the next reload. KeyError if unknown."""

    def reload(self) -> Deferred[dict[str, Any]]:
        """Re-read the configuration: C{{"ok": bool, "error": str | None, "changes": {...}}}."""

    def drain(self) -> dict[str, Any]:
        """Start draining the node (then it stops): C{{"draining": True,
        "already": bool, "sessions": int, "drain_timeout": float}}."""

    def pins(self) -> dict[str, dict[str, Any]]:
        """Every server's pins: how many tools are pinned, which changed and how,
        its C{on_tool_change} policy and whether it blocks the server."""

    def accept_tools(self, server: str, tools: list[str] | None) -> list[str]:
        """Pin the definitions a server serves now of these changed tools (all
        by default); the names accepted. KeyError if the server is unknown."""

    def cluster(self) -> Deferred[dict[str, Any]]:
        """Every node's record (this one marked C{"self": true}), this node's id,
        and whether the cluster's Redis is up (C{"up"}, C{"down"}, or None
        without one); without a Redis, or while it is down, this node alone."""


class Problem(HTTPProblem):
    """An L{HTTPProblem} whose error carries C{data} for programs to read."""

    def __init__(self, status: int, code: int, message: str, data: Any) -> None:
        super().__init__(status, code, message)
        self.data = data

    def render(self, request: IRequest) -> bytes:
        request.setResponseCode(self.status)
        return json_body(request, jsonrpc.error(None, self.code, self.message, self.data))


def config_problem(error: ConfigError) -> Problem:
    """The 422 for a configuration error: which key, what is wrong, how to fix it."""
    return Problem(
        422,
        jsonrpc.INVALID_PARAMS,
        f"Unprocessable Content: {error.key}: {error.problem}. Fix: {error.fix}",
        {"key": error.key, "problem": error.problem, "fix": error.fix},
    )


def bad_request(message: str) -> HTTPProblem:
    return HTTPProblem(400, jsonrpc.INVALID_REQUEST, f"Bad Request: {message}")


def no_server(name: str) -> HTTPProblem:
    return HTTPProblem(404, jsonrpc.INVALID_REQUEST, f"Not Found: no MCP server is named {name!r}")


def not_granted(what: str) -> HTTPProblem:
    return HTTPProblem(403, jsonrpc.FORBIDDEN, f"Forbidden: {what}")


class _AdminOnly(Resource):
    """Refuses (403) any request whose principal is not an admin, then routes."""

    isLeaf = True

    def __init__(self, api: AdminAPI, routes: IResource) -> None:
        super().__init__()
        self.api = api
        self.routes = routes

    def render(self, request: Request) -> bytes | int:
        admission = admission_of(request)
        who = admission.who if admission is not None else None
        # Without the Gate in front nobody is authenticated: nobody is admitted.
        if not isinstance(who, Principal) or not who.admin:
            self.api.audit.access_refused(
                principal=identity(who) if isinstance(who, Principal) else None,
                peer=peer_of(request),
                server=None,
                route=request.path.decode("utf-8", "replace"),
            )
            return HTTPProblem(
                403, jsonrpc.FORBIDDEN, "Forbidden: this needs the admin scope"
            ).render(request)
        dashboard = self.api.dashboard
        if dashboard is not None and serves(request.path):
            page: bytes | int = dashboard.render(request)
            return page
        answer: bytes | int = self.routes.render(request)
        return answer


class AdminAPI:
    """The routes under C{/admin} (full paths: the resource is a leaf at the root)."""

    app = Klein()

    def __init__(
        self,
        control: AdminControl,
        audit: AuditTrail,
        forwarder: Forwarder | None = None,
        dashboard: Dashboard | None = None,
    ) -> None:
        self.control = control
        self.audit = audit
        # In a cluster: sends an admin request to another node, or to all.
        self.forwarder = forwarder
        # The dashboard's page and JSON, behind the same check (None: not served).
        self.dashboard = dashboard.resource() if dashboard is not None else None

    def resource(self) -> IResource:
        return _AdminOnly(self, self.app.resource())

    # Servers

    @app.route("/admin/servers", methods=["GET"])
    @answered
    def list_servers(self, request: Request) -> bytes:
        principal = principal_of(request)
        servers = [s for s in self.control.servers() if principal.holds(s["name"])]
        return json_body(request, {"servers": servers})

    @app.route("/admin/servers/<name>", methods=["GET"])
    @answered
    def get_server(self, request: Request, name: str) -> bytes:
        self._granted(request, name)
        status = self.control.server(name)
        if status is None:
            raise no_server(name)
        return json_body(request, status)

    @app.route("/admin/servers/<name>/start", methods=["POST"])
    @answered
    async def start(self, request: Request, name: str) -> bytes:
        return await self._lifecycle(request, "start", name, self.control.start)

    @app.route("/admin/servers/<name>/stop", methods=["POST"])
    @answered
    async def stop(self, request: Request, name: str) -> bytes:
        return await self._lifecycle(request, "stop", name, self.control.stop)

    @app.route("/admin/servers/<name>/children/<principal>/stop", methods=["POST"])
    @answered
    def stop_child(self, request: Request, name: str, principal: str) -> bytes:
        self._granted(request, name, "stop_child")
        self._require_json(request, "stop_child", name)
        try:
            status = self.control.stop_child(name, principal)
        except KeyError:
            problem = no_server(name)
        except LookupError as e:
            problem = HTTPProblem(404, jsonrpc.INVALID_REQUEST, f"Not Found: {e}")
        else:
            self._record(request, "stop_child", f"{name}/{principal}", "ok")
            return json_body(request, status)
        self._record(request, "stop_child", f"{name}/{principal}", _failed(problem))
        raise problem

    @app.route("/admin/servers/<name>/restart", methods=["POST"])
    @answered
    async def restart(self, request: Request, name: str) -> bytes:
        return await self._lifecycle(request, "restart", name, self.control.restart)

    async def _lifecycle(
        self,
        request: Request,
        action: str,
        name: str,
        call: Callable[[str], Deferred[dict[str, Any]]],
    ) -> bytes:
        self._granted(request, name, action)
        self._require_json(request, action, name)
        status = await self._perform(
            request, action, name, lambda: call(name), lambda e: _server_error(e, name)
        )
        return json_body(request, status)

    @app.route("/admin/servers/<name>/stderr", methods=["GET"])
    @answered
    def stderr(self, request: Request, name: str) -> bytes:
        self._granted(request, name)
        lines = _lines(request)
        try:
            text = self.control.stderr(name, lines)
        except KeyError:
            raise no_server(name) from None
        return json_body(request, {"server": name, "lines": text})

    @app.route("/admin/servers", methods=["POST"])
    @answered
    async def add_server(self, request: Request) -> bytes:
        try:
            require_json(request)
            name, table = _add_body(read_body(request, MAX_BODY))
        except HTTPProblem as problem:
            self._record(request, "add_server", None, _failed(problem))
            raise
        self._granted(request, name, "add_server")

        # The name is checked with the rest of the table, by config.parse_server.
        status = await self._perform(
            request,
            "add_server",
            name,
            lambda: self.control.add_server(name, table),
            lambda e: _add_error(e, name),
        )
        request.setResponseCode(201)
        return json_body(request, status)

    @app.route("/admin/servers/<name>", methods=["DELETE"])
    @answered
    async def remove_server(self, request: Request, name: str) -> bytes:
        self._granted(request, name, "remove_server")
        status = await self._perform(
            request,
            "remove_server",
            name,
            lambda: self.control.remove_server(name),
            lambda e: _server_error(e, name),
        )
        return json_body(request, status)

    # Sessions

    @app.route("/admin/sessions", methods=["GET"])
    @answered
    def list_sessions(self, request: Request) -> bytes:
        server = _query(request, b"server")
        if server is not None:
            self._granted(request, server)
            if self.control.server(server) is None:
                raise no_server(server)
        principal = principal_of(request)
        sessions = [s for s in self.control.sessions(server) if principal.holds(s["server"])]
        return json_body(request, {"sessions": sessions})

    @app.route("/admin/sessions/<session_id>", methods=["DELETE"])
    @answered
    def close_session(self, request: Request, session_id: str) -> bytes:
        principal = principal_of(request)
        try:
            # A session of a server the admin may not use is not there for it.
            closed = any(
                s["id"] == session_id and principal.holds(s["server"])
                for s in self.control.sessions(None)
            ) and self.control.close_session(session_id)
        except Exception as error:
            self._record(request, "close_session", session_id, f"error: {error!r}")
            raise
        if not closed:
            problem = HTTPProblem(
                404, jsonrpc.INVALID_REQUEST, "Not Found: no open session has this id"
            )
            self._record(request, "close_session", session_id, _failed(problem))
            raise problem
        self._record(request, "close_session", session_id, "ok")
        return json_body(request, {"closed": session_id})

    # Tool pins

    @app.route("/admin/pins", methods=["GET"])
    @answered
    def list_pins(self, request: Request) -> bytes:
        principal = principal_of(request)
        pins = {name: p for name, p in self.control.pins().items() if principal.holds(name)}
        return json_body(request, {"servers": pins})

    @app.route("/admin/pins/<name>/accept", methods=["POST"])
    @answered
    def accept_tools(self, request: Request, name: str) -> bytes:
        self._granted(request, name, "accept_tools")
        self._require_json(request, "accept_tools", name)
        try:
            tools = _accept_body(read_body(request, MAX_BODY))
            accepted = self.control.accept_tools(name, tools)
        except HTTPProblem as problem:
            self._record(request, "accept_tools", name, _failed(problem))
            raise
        except KeyError:
            missing = no_server(name)
            self._record(request, "accept_tools", name, _failed(missing))
            raise missing from None
        self._record(request, "accept_tools", name, f"ok: {', '.join(accepted) or 'nothing'}")
        return json_body(request, {"server": name, "accepted": accepted})

    # The cluster

    @app.route("/admin/cluster", methods=["GET"])
    @answered
    async def cluster(self, request: Request) -> bytes:
        principal = principal_of(request)
        view = await self.control.cluster()
        # Each node's servers, as every list here: those the admin's grants name.
        for node in view["nodes"]:
            servers = node.get("servers")
            if isinstance(servers, dict):
                node["servers"] = {n: s for n, s in servers.items() if principal.holds(n)}
        return json_body(request, view)

    # Configuration

    @app.route("/admin/reload", methods=["POST"])
    @answered
    async def reload(self, request: Request) -> bytes:
        self._granted(request, "*", "reload")
        self._require_json(request, "reload", None)
        result = await self._perform(
            request, "reload", None, self.control.reload, _reload_error, _reload_refusal
        )
        return json_body(request, result)

    @app.route("/admin/drain", methods=["POST"])
    @answered
    async def drain(self, request: Request) -> bytes:
        self._granted(request, "*", "drain")
        self._require_json(request, "drain", None)
        result = self.control.drain()
        self._record(request, "drain", None, f"ok: {result['sessions']} sessions held")
        request.setResponseCode(202)
        return json_body(request, result)

    # The cluster's nodes

    @app.route("/admin/nodes/<node>/<path:rest>", methods=["GET", "POST", "DELETE"])
    @answered
    async def on_node(self, request: Request, node: str, rest: str) -> bytes:
        """Any admin request, for one node of the cluster or (C{all}) each:
        sent there as it is, credentials included (the node checks them)."""
        forwarder = self.forwarder
        if forwarder is None:
            raise HTTPProblem(
                404, jsonrpc.INVALID_REQUEST, "Not Found: this bridge is not part of a cluster"
            )
        content = request.content
        body = content.read() if content is not None else b""
        target = f"{node}:/admin/{rest}"
        if forwarder.hopped_from(request, body) is not None:
            raise HTTPProblem(
                400, jsonrpc.INVALID_REQUEST, "Bad Request: a forwarded request is not sent on"
            )
        query = request.uri.partition(b"?")[2].decode("latin-1")
        path = f"/admin/{rest}" + (f"?{query}" if query else "")
        peer = peer_of(request)
        if node != "all":
            status, answer = await forwarder.relay(request, body, peer, node, path)
            if request.method != b"GET":
                self._record(request, "node", target, f"{status}")
            request.setResponseCode(status)
            request.setHeader(b"content-type", b"application/json")
            return answer
        directory = forwarder.directory
        nodes = sorted(await directory.node_ids()) if directory is not None else []
        answers = await gatherResults(
            [forwarder.relay(request, body, peer, n, path) for n in nodes]
        )
        result = {}
        for n, (status, answer) in zip(nodes, answers, strict=True):
            try:
                parsed: Any = json.loads(answer)
            except ValueError:
                parsed = answer.decode("utf-8", "replace")
            result[n] = {"status": status, "body": parsed}
        if request.method != b"GET":
            outcome = ", ".join(f"{n}: {r['status']}" for n, r in result.items()) or "no node"
            self._record(request, "node", target, outcome)
        return json_body(request, {"nodes": result})

    # Errors for what no route matched

    not_found = app.handle_errors(NotFound)(route_not_found)
    not_allowed = app.handle_errors(MethodNotAllowed)(route_not_allowed)

    # Auditing

    def _record(self, request: Request, action: str, target: str | None, outcome: str) -> None:
        self.audit.admin_action(
            principal=identity(principal_of(request)),
            peer=peer_of(request),
            action=action,
            target=target,
            outcome=outcome,
        )

    def _granted(self, request: Request, server: str, action: str | None = None) -> None:
        """Refuse (403, audited) a server the principal's grants do not name;
        C{"*"}: one that needs a grant of every server. The answer is the same
        whether or not the server exists."""
        principal = principal_of(request)
        granted = "*" in principal.servers if server == "*" else principal.holds(server)
        if granted:
            return
        self.audit.access_refused(
            principal=identity(principal),
            peer=peer_of(request),
            server=None if server == "*" else server,
            route=request.path.decode("utf-8", "replace"),
        )
        problem = not_granted(
            'this needs a grant of every server (servers = ["*"])'
            if server == "*"
            else f"{principal.name!r} may not use this server"
        )
        if action is not None:
            self._record(request, action, None if server == "*" else server, _failed(problem))
        raise problem

    def _require_json(self, request: Request, action: str, target: str | None) -> None:
        """A POST must say it is JSON: browsers cannot send that cross-site unasked."""
        try:
            require_json(request)
        except HTTPProblem as problem:
            self._record(request, action, target, _failed(problem))
            raise

    async def _perform(
        self,
        request: Request,
        action: str,
        target: str | None,
        call: Callable[[], Deferred[T]],
        errors: Callable[[BaseException], HTTPProblem | None],
        refusal: Callable[[T], HTTPProblem | None] = lambda result: None,
    ) -> T:
        """Run a change, audit its outcome, and give its result or its HTTPProblem.

        The change runs to its end even if the client goes away (cancelling
        the request cancels only the wait), and is audited when it ends.
        """

        def problem_of(error: BaseException, failure: Failure | None) -> HTTPProblem:
            problem = errors(error)
            if problem is None:
                log.failure(
                    "admin {action} of {target} failed",
                    failure or Failure(error),
                    action=action,
                    target=target,
                )
                problem = HTTPProblem(
                    500,
                    jsonrpc.INTERNAL_ERROR,
                    f"Internal error in the bridge: {action} failed ({_describe(error)}); "
                    "see the bridge's log",
                )
            return problem

        try:
            d = call()
        except Exception as error:
            problem = problem_of(error, None)
            self._record(request, action, target, _failed(problem))
            raise problem from None
        waiting: Deferred[T] = Deferred()

        def failed(failure: Failure) -> None:
            error = failure.value if failure.value is not None else Exception(repr(failure))
            problem = problem_of(error, failure)
            self._record(request, action, target, _failed(problem))
            if not waiting.called:  # else the client went away
                waiting.errback(problem)

        def succeeded(result: T) -> None:
            try:
                problem = refusal(result)
            except Exception:
                failed(Failure())
                return
            self._record(request, action, target, "ok" if problem is None else _failed(problem))
            if waiting.called:
                return
            if problem is None:
                waiting.callback(result)
            else:
                waiting.errback(problem)

        d.addCallbacks(succeeded, failed)
        return await waiting


def _failed(problem: HTTPProblem) -> str:
    return f"error: {problem.message}"


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _server_error(error: BaseException, name: str) -> HTTPProblem | None:
    if isinstance(error, KeyError):
        return no_server(name)
    if isinstance(error, ConfigError):
        return config_problem(error)
    return None


def _add_error(error: BaseException, name: str) -> HTTPProblem | None:
    if isinstance(error, ConfigError):
        return config_problem(error)
    if isinstance(error, PermissionError):
        return not_granted(str(error))
    if isinstance(error, ValueError):
        return HTTPProblem(
            409,
            jsonrpc.INVALID_PARAMS,
            f"Conflict: a server named {name!r} already exists; "
            "remove it first, or choose another name",
        )
    return None


def _reload_error(error: BaseException) -> HTTPProblem | None:
    if isinstance(error, ConfigError):
        return config_problem(error)
    return None


def _reload_refusal(result: dict[str, Any]) -> HTTPProblem | None:
    """A reload that reports failure: 422, with the service's answer as data."""
    if result.get("ok"):
        return None
    reason = result.get("error") or "the configuration was not applied"
    return Problem(422, jsonrpc.INVALID_PARAMS, f"Reload failed: {reason}", result)


def _add_body(body: bytes) -> tuple[str, dict[str, Any]]:
    """The name and table of a server to add, from a POST body."""
    try:
        doc = jsonrpc.loads(body)
    except jsonrpc.ProtocolError as e:
        raise bad_request(f"the body is not JSON ({e.message}); {_ADD_FORM}") from None
    if not isinstance(doc, dict):
        raise bad_request(f"the body must be a JSON object; {_ADD_FORM}")
    unknown = sorted(set(doc) - {"name", "config"})
    if unknown:
        raise bad_request(f"unknown key {unknown[0]!r}; {_ADD_FORM}")
    name, table = doc.get("name"), doc.get("config")
    if not isinstance(name, str) or not name:
        raise bad_request(f'"name" must be a non-empty string; {_ADD_FORM}')
    if not isinstance(table, dict):
        raise bad_request(f'"config" must be a JSON object; {_ADD_FORM}')
    return name, table


def _query(request: IRequest, key: bytes) -> str | None:
    values = request.args.get(key)
    if not values:
        return None
    try:
        value: str = values[-1].decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request(f"{key.decode()} is not UTF-8") from None
    return value


def _lines(request: IRequest) -> int:
    text = _query(request, b"lines")
    if text is None:
        return DEFAULT_STDERR_LINES
    if not (text.isascii() and text.isdigit() and len(text) <= 6) or not (
        1 <= int(text) <= MAX_STDERR_LINES
    ):
        raise bad_request(f"lines must be a whole number from 1 to {MAX_STDERR_LINES}")
    return int(text)


__all__ = ["AdminAPI", "AdminControl", "Problem", "config_problem"]


def _accept_body(body: bytes) -> list[str] | None:
    """The tools an accept names (None: every changed one)."""
    if not body.strip():
        return None
    try:
        document = jsonrpc.loads(body)
    except jsonrpc.ProtocolError:
        raise bad_request('the body must be JSON: {"tools": ["NAME", ...]} or empty') from None
    tools = document.get("tools") if isinstance(document, dict) else None
    if tools is None and isinstance(document, dict) and set(document) <= {"tools"}:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, str) for t in tools):
        raise bad_request('send {"tools": ["NAME", ...]}, or nothing to accept every change')
    return tools
