"""The admin API over HTTP, against a fake control, with the audit trail read
back; and the admin command line, run in-process against it over a real socket."""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request
from twisted.web.test.requesthelper import DummyChannel

from mcptwist.__main__ import AdminClient, main
from mcptwist.config.load import requested_server
from mcptwist.config.model import AuditConfig, CommandConfig, ConfigError
from mcptwist.ops.audit import AuditTrail
from mcptwist.security.auth import Principal
from mcptwist.web.admin import AdminAPI
from mcptwist.web.admission import Admission, admit
from mcptwist.web.http import HTTPProblem

from .support.certs import make_ca, make_server_cert
from .support.messages import JSON_BODY

ADMIN = Principal("ops", "token", frozenset({"*"}), admin=True)
USER = Principal("alice", "token", frozenset({"*"}), admin=False)
TOKENS = {"admin-token-123": ADMIN, "user-token-456": USER}
SESSION = "Zq3-session-id_0123456789abcdefghijklmnopqrstu"


def running(name: str, pid: int) -> dict[str, Any]:
    return {
        "name": name,
        "sharing": "shared",
        "state": "running",
        "pid": pid,
        "uptime": 3725.5,
        "restarts": 2,
        "next_attempt_in": None,
        "last_exit": None,
        "stderr": ["starting", "ready"],
        "sessions": 1,
        "in_flight": 3,
        "server_info": {"name": name, "version": "1.0"},
    }


class FakeControl:
    """An L{AdminControl} over a dict of statuses; records what it was asked."""

    def __init__(self) -> None:
        self.status: dict[str, dict[str, Any]] = {
            "s": running("s", 4242),
            "t": {
                "name": "t",
                "sharing": "session",
                "state": "running",
                "children": [
                    {"state": "running", "pid": 7, "restarts": 1, "in_flight": 2, "sessions": 1}
                ],
                "running_children": 1,
                "max_children": 16,
                "sessions": 1,
            },
        }
        self.stderr_lines = {"s": [f"line {i}" for i in range(300)], "t": []}
        self.session_list: list[dict[str, Any]] = [
            {
                "id": SESSION,
                "server": "s",
                "transport": "streamable_http",
                "principal": "token:ops",
                "peer": "127.0.0.1",
                "client": "inspector",
                "age": 75.0,
                "idle": 4.0,
                "stream_open": True,
            },
            {
                "id": "other-session",
                "server": "t",
                "transport": "sse",
                "principal": "jwt:carol",
                "peer": "192.0.2.7",
                "client": None,
                "age": 90000.0,
                "idle": 0.2,
                "stream_open": False,
            },
        ]
        self.calls: list[tuple[Any, ...]] = []
        self.held: list[Deferred[None]] | None = None
        self.failure: Exception | None = None
        self.reload_result: dict[str, Any] = {
            "ok": True,
            "error": None,
            "changes": {"added": ["u"], "removed": [], "changed": ["s"]},
        }
        self.reload_error: Exception | None = None
        self.commands = {
            "time": CommandConfig("time", "uvx", ("mcp-server-time",)),
            "x": CommandConfig("x", "x"),
        }

    def servers(self) -> list[dict[str, Any]]:
        return [dict(s) for s in self.status.values()]

    def server(self, name: str) -> dict[str, Any] | None:
        status = self.status.get(name)
        return None if status is None else dict(status)

    def _act(self, action: str, name: str, state: str) -> Deferred[dict[str, Any]]:
        if name not in self.status:
            raise KeyError(name)
        self.calls.append((action, name))
        if self.failure is not None:
            return fail(self.failure)
        self.status[name]["state"] = state
        result = dict(self.status[name])
        if self.held is not None:
            d: Deferred[None] = Deferred()
            self.held.append(d)
            return d.addCallback(lambda _: result)
        return succeed(result)

    def start(self, name: str) -> Deferred[dict[str, Any]]:
        return self._act("start", name, "running")

    def stop(self, name: str) -> Deferred[dict[str, Any]]:
        return self._act("stop", name, "stopped")

    def restart(self, name: str) -> Deferred[dict[str, Any]]:
        return self._act("restart", name, "running")

    def stderr(self, name: str, lines: int) -> list[str]:
        return self.stderr_lines[name][-lines:]

    def sessions(self, server: str | None) -> list[dict[str, Any]]:
        return [s for s in self.session_list if server is None or s["server"] == server]

    def close_session(self, session_id: str) -> bool:
        before = len(self.session_list)
        self.session_list = [s for s in self.session_list if s["id"] != session_id]
        return len(self.session_list) < before

    def add_server(self, name: str, table: dict[str, Any]) -> Deferred[dict[str, Any]]:
        if not self.commands:
            raise PermissionError("adding servers at run time is off")
        if name in self.status:
            raise ValueError(f"a server named {name!r} exists")
        server = requested_server(name, table, self.commands)
        assert server is not None
        self.calls.append(("add_server", name, server.command))
        self.status[name] = running(name, 5000)
        return succeed(dict(self.status[name]))

    def remove_server(self, name: str) -> Deferred[dict[str, Any]]:
        status = self.status.pop(name)
        self.calls.append(("remove_server", name))
        return succeed(status)

    def reload(self) -> Deferred[dict[str, Any]]:
        self.calls.append(("reload",))
        if self.reload_error is not None:
            raise self.reload_error
        return succeed(self.reload_result)


class FrontDoor(Resource):
    """Stands in for the Gate: says who is asking, then hands over the request.

    With C{tokens}, the principal is the one the bearer token names (401
    without one); otherwise it is C{principal} (None: not set at all).
    """

    isLeaf = True

    def __init__(
        self,
        inner: IResource,
        principal: Principal | None = ADMIN,
        tokens: dict[str, Principal] | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.principal = principal
        self.tokens = tokens

    def render(self, request: Any) -> Any:
        admission = Admission("127.0.0.1", [])
        admit(request, admission)
        if self.tokens is not None:
            value = (request.getHeader(b"authorization") or b"").decode("latin-1")
            principal = self.tokens.get(value.removeprefix("Bearer "))
            if principal is None:
                return HTTPProblem(401, -32001, "Unauthorized: no valid token").render(request)
            admission.who = principal
        elif self.principal is not None:
            admission.who = self.principal
        return self.inner.render(request)


class Admin:
    """The admin API over a fake control, in memory, with its audit trail."""

    def __init__(
        self,
        test: SynchronousTestCase,
        principal: Principal | None = ADMIN,
        tokens: dict[str, Principal] | None = None,
    ) -> None:
        self.test = test
        directory = test.mktemp()
        os.makedirs(directory)
        self.audit_path = os.path.join(directory, "audit.jsonl")
        self.clock = Clock()
        self.audit = AuditTrail(AuditConfig(path=self.audit_path), self.clock)
        self.audit.start()
        self.control = FakeControl()
        self.api = AdminAPI(self.control, self.audit)
        self.client = StubTreq(FrontDoor(self.api.resource(), principal, tokens))
        test.addCleanup(self.close)

    def close(self) -> None:
        self.client.flush()
        self.audit.stop()

    def raw(
        self, method: str, path: str, data: bytes | None, headers: dict[str, str]
    ) -> tuple[int, Any, bytes]:
        d = self.client.request(method, "http://127.0.0.1" + path, data=data, headers=headers)
        self.client.flush()
        response = self.test.successResultOf(d)
        d = self.client.content(response)
        self.client.flush()
        return response.code, response.headers, self.test.successResultOf(d)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
    ) -> tuple[int, Any, Any]:
        """(status, headers, JSON body) of one request; a POST is JSON unless told."""
        if headers is None:
            headers = JSON_BODY if method == "POST" else {}
        if data is None and body is not None:
            data = json.dumps(body).encode()
        status, response_headers, content = self.raw(method, path, data, headers)
        self.test.assertEqual(
            response_headers.getRawHeaders("content-type"), ["application/json"], content
        )
        return status, response_headers, json.loads(content)

    def events(self, kind: str = "admin_action") -> list[dict[str, Any]]:
        self.audit.flush_refusals(everything=True)
        with open(self.audit_path, "rb") as f:
            lines = [json.loads(line) for line in f]
        return [e for e in lines if e["event"] == kind]


def action(name: str, target: str | None, outcome: str = "ok") -> dict[str, Any]:
    """The audit fields of an admin action by the admin principal."""
    return {
        "event": "admin_action",
        "principal": "token:ops",
        "peer": "127.0.0.1",
        "action": name,
        **({"target": target} if target is not None else {}),
        "outcome": outcome,
    }


def fields(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in e.items() if k != "ts"} for e in events]


class ReadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.admin = Admin(self)

    def test_servers(self) -> None:
        status, _, body = self.admin.request("GET", "/admin/servers")
        self.assertEqual(status, 200)
        self.assertEqual(body, {"servers": self.admin.control.servers()})
        self.assertEqual(self.admin.events(), [])

    def test_server(self) -> None:
        status, _, body = self.admin.request("GET", "/admin/servers/s")
        self.assertEqual((status, body), (200, self.admin.control.status["s"]))

    def test_unknown_server(self) -> None:
        status, _, body = self.admin.request("GET", "/admin/servers/nope")
        self.assertEqual(status, 404)
        self.assertEqual(body["jsonrpc"], "2.0")
        self.assertEqual(body["error"]["code"], -32600)
        self.assertIn("'nope'", body["error"]["message"])

    def test_stderr(self) -> None:
        status, _, body = self.admin.request("GET", "/admin/servers/s/stderr")
        self.assertEqual(status, 200)
        self.assertEqual(body["server"], "s")
        self.assertEqual(body["lines"], [f"line {i}" for i in range(200, 300)])
        _, _, body = self.admin.request("GET", "/admin/servers/s/stderr?lines=3")
        self.assertEqual(body["lines"], ["line 297", "line 298", "line 299"])
        status, _, body = self.admin.request("GET", "/admin/servers/s/stderr?lines=10000")
        self.assertEqual((status, len(body["lines"])), (200, 300))

    def test_stderr_bad_lines(self) -> None:
        for value in ("0", "-1", "10001", "abc", "1.5", "", "٣", "9" * 5000):
            status, _, body = self.admin.request("GET", f"/admin/servers/s/stderr?lines={value}")
            self.assertEqual(status, 400, value)
            self.assertIn("1 to 10000", body["error"]["message"])

    def test_stderr_unknown_server(self) -> None:
        status, _, _ = self.admin.request("GET", "/admin/servers/nope/stderr")
        self.assertEqual(status, 404)

    def test_sessions(self) -> None:
        status, _, body = self.admin.request("GET", "/admin/sessions")
        self.assertEqual((status, body), (200, {"sessions": self.admin.control.session_list}))
        _, _, body = self.admin.request("GET", "/admin/sessions?server=t")
        self.assertEqual([s["id"] for s in body["sessions"]], ["other-session"])
        status, _, body = self.admin.request("GET", "/admin/sessions?server=nope")
        self.assertEqual(status, 404)
        self.assertIn("'nope'", body["error"]["message"])

    def test_head(self) -> None:
        status, _, content = self.admin.raw("HEAD", "/admin/servers", None, {})
        self.assertEqual((status, content), (200, b""))

    def test_unknown_routes(self) -> None:
        for path in ("/admin", "/admin/", "/admin/nothing", "/admin/servers/s/nothing", "/x"):
            status, _, body = self.admin.request("GET", path)
            self.assertEqual(status, 404, path)
            self.assertEqual(body["error"]["code"], -32600)

    def test_wrong_methods(self) -> None:
        cases = [
            ("GET", "/admin/servers/s/start", "POST"),
            ("GET", "/admin/servers/s/stop", "POST"),
            ("DELETE", "/admin/servers/s/restart", "POST"),
            ("GET", "/admin/reload", "POST"),
            ("POST", "/admin/servers/s/stderr", "GET"),
            ("PUT", "/admin/servers", "GET"),
            ("POST", "/admin/sessions", "GET"),
            ("GET", "/admin/sessions/x", "DELETE"),
            ("POST", "/admin/servers/s", "DELETE"),
        ]
        for method, path, allowed in cases:
            status, headers, body = self.admin.request(method, path, {})
            self.assertEqual(status, 405, (method, path))
            self.assertEqual(body["error"]["message"], "Method Not Allowed")
            [allow] = headers.getRawHeaders("allow")
            self.assertIn(allowed, allow.split(", "), (method, path))
        self.assertEqual(self.admin.control.calls, [])


class LifecycleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.admin = Admin(self)

    def test_start_stop_restart(self) -> None:
        for verb, state in (("stop", "stopped"), ("start", "running"), ("restart", "running")):
            status, _, body = self.admin.request("POST", f"/admin/servers/s/{verb}")
            self.assertEqual(status, 200)
            self.assertEqual(body["state"], state)
            self.assertEqual(body["pid"], 4242)
        self.assertEqual(
            self.admin.control.calls, [("stop", "s"), ("start", "s"), ("restart", "s")]
        )
        self.assertEqual(
            fields(self.admin.events()),
            [action("stop", "s"), action("start", "s"), action("restart", "s")],
        )

    def test_any_json_content_type_and_body(self) -> None:
        status, _, _ = self.admin.request(
            "POST",
            "/admin/servers/s/restart",
            headers={"content-type": "Application/JSON; charset=utf-8"},
            data=b"not even json",
        )
        self.assertEqual(status, 200)

    def test_unknown_server(self) -> None:
        for verb in ("start", "stop", "restart"):
            status, _, body = self.admin.request("POST", f"/admin/servers/nope/{verb}")
            self.assertEqual(status, 404)
            self.assertEqual(body["error"]["message"], "Not Found: no MCP server is named 'nope'")
        self.assertEqual(
            fields(self.admin.events()),
            [
                action(verb, "nope", "error: Not Found: no MCP server is named 'nope'")
                for verb in ("start", "stop", "restart")
            ],
        )

    def test_not_json(self) -> None:
        for headers in (
            {},
            {"content-type": "text/plain"},
            {"content-type": "application/x-www-form-urlencoded"},
        ):
            status, _, body = self.admin.request(
                "POST", "/admin/servers/s/restart", headers=headers, data=b"{}"
            )
            self.assertEqual(status, 415, headers)
            self.assertIn("application/json", body["error"]["message"])
        self.assertEqual(self.admin.control.calls, [])
        [first, *_] = self.admin.events()
        self.assertEqual(first["action"], "restart")
        self.assertEqual(first["target"], "s")
        self.assertTrue(first["outcome"].startswith("error: Unsupported Media Type"))
        self.assertEqual(len(self.admin.events()), 3)

    def test_unexpected_failure(self) -> None:
        self.admin.control.failure = RuntimeError("the child would not die")
        status, _, body = self.admin.request("POST", "/admin/servers/s/stop")
        self.assertEqual(status, 500)
        self.assertEqual(body["error"]["code"], -32603)
        self.assertIn(
            "stop failed (RuntimeError: the child would not die)", body["error"]["message"]
        )
        [event] = self.admin.events()
        self.assertEqual(event["outcome"], "error: " + body["error"]["message"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_slow_action_answers_when_done(self) -> None:
        self.admin.control.held = []
        d = self.admin.client.request(
            "POST", "http://127.0.0.1/admin/servers/s/restart", headers=JSON_BODY
        )
        self.admin.client.flush()
        self.assertNoResult(d)
        self.assertEqual(self.admin.events(), [])
        self.admin.control.held.pop().callback(None)
        self.admin.client.flush()
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual(fields(self.admin.events()), [action("restart", "s")])

    def test_client_gone_before_the_action_ends(self) -> None:
        """The action is not cancelled with the request, and is audited when it ends."""
        self.admin.control.held = []
        channel = DummyChannel()
        request: Any = Request(channel)
        request.method = b"POST"
        request.uri = request.path = b"/admin/servers/s/restart"
        request.prepath, request.postpath = [], [b"admin", b"servers", b"s", b"restart"]
        request.args = {}
        request.requestHeaders.setRawHeaders(b"content-type", [b"application/json"])
        request.content = io.BytesIO(b"{}")
        admit(request, Admission("127.0.0.1", [], who=ADMIN))
        self.assertIs(self.admin.api.resource().render(request), NOT_DONE_YET)
        [held] = self.admin.control.held
        request.connectionLost(Failure(ConnectionDone()))
        self.assertFalse(held.called)
        self.assertEqual(self.admin.events(), [])
        held.callback(None)
        self.assertEqual(fields(self.admin.events()), [action("restart", "s")])
        self.assertEqual(channel.transport.written.getvalue(), b"")


class ServerConfigTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.admin = Admin(self)

    def add(self, body: Any, **kwargs: Any) -> tuple[int, Any]:
        status, _, answer = self.admin.request("POST", "/admin/servers", body, **kwargs)
        return status, answer

    def test_add(self) -> None:
        status, body = self.add({"name": "new", "config": {"command": "time"}})
        self.assertEqual(status, 201)
        self.assertEqual(body["name"], "new")
        self.assertEqual(self.admin.control.calls, [("add_server", "new", "uvx")])
        status, _, body = self.admin.request("GET", "/admin/servers/new")
        self.assertEqual((status, body["state"]), (200, "running"))
        self.assertEqual(fields(self.admin.events()), [action("add_server", "new")])

    def test_add_existing(self) -> None:
        status, body = self.add({"name": "s", "config": {"command": "x"}})
        self.assertEqual(status, 409)
        self.assertIn("'s' already exists", body["error"]["message"])
        [event] = self.admin.events()
        self.assertEqual((event["target"], event["outcome"][:16]), ("s", "error: Conflict:"))

    def test_add_config_error(self) -> None:
        status, body = self.add({"name": "new", "config": {"sharing": "session"}})
        self.assertEqual(status, 422)
        error = body["error"]
        self.assertEqual(error["code"], -32602)
        self.assertEqual(error["data"]["key"], "servers.new.command")
        self.assertIn(
            'servers.new.command: missing. Fix: send "command": one of time, x', error["message"]
        )
        status, body = self.add({"name": "new", "config": {"command": "x", "sharnig": "shared"}})
        self.assertEqual(status, 422)
        self.assertIn("did you mean sharing?", body["error"]["message"])
        [first, _] = self.admin.events()
        self.assertEqual(first["target"], "new")
        self.assertEqual(first["outcome"], "error: " + error["message"])
        self.assertEqual(self.admin.control.calls, [])

    def test_add_what_the_configuration_does_not_name(self) -> None:
        """A program, arguments, environment or directory in the request: 422,
        and nothing runs."""
        for config, key in (
            ({"command": "/bin/sh"}, "servers.new.command"),
            ({"command": "x", "args": ["-c", "id"]}, "servers.new.args"),
            ({"command": "x", "env": {"LD_PRELOAD": "/tmp/e.so"}}, "servers.new.env"),
            ({"command": "x", "cwd": "/"}, "servers.new.cwd"),
        ):
            status, body = self.add({"name": "new", "config": config})
            self.assertEqual((status, body["error"]["data"]["key"]), (422, key), config)
        self.assertEqual(self.admin.control.calls, [])

    def test_adding_is_off(self) -> None:
        self.admin.control.commands = {}
        status, body = self.add({"name": "new", "config": {"command": "x"}})
        self.assertEqual(status, 403)
        self.assertIn("off", body["error"]["message"])
        [event] = self.admin.events()
        self.assertEqual((event["target"], event["outcome"][:17]), ("new", "error: Forbidden:"))
        self.assertEqual(self.admin.control.calls, [])

    def test_add_bad_name(self) -> None:
        for name in ("bad name", "-x", "x" * 65, "a/b", ".."):
            status, body = self.add({"name": name, "config": {"command": "x"}})
            self.assertEqual(status, 422, name)
            self.assertEqual(body["error"]["data"]["key"], f"servers.{name}")
            self.assertIn("letters, digits", body["error"]["message"])
        self.assertEqual(self.admin.control.calls, [])
        self.assertEqual(len(self.admin.events()), 5)

    def test_add_bad_body(self) -> None:
        cases: list[tuple[bytes, str]] = [
            (b"{", "not JSON"),
            (b"\xff", "not JSON"),
            (b"", "not JSON"),
            (b"[]", "JSON object"),
            (b'"new"', "JSON object"),
            (b'{"name": "new"}', '"config" must be a JSON object'),
            (b'{"name": "new", "config": []}', '"config" must be a JSON object'),
            (b'{"config": {}}', '"name" must be a non-empty string'),
            (b'{"name": 1, "config": {}}', '"name" must be a non-empty string'),
            (b'{"name": "", "config": {}}', '"name" must be a non-empty string'),
            (b'{"name": "new", "config": {}, "start": true}', "unknown key 'start'"),
        ]
        for data, message in cases:
            status, body = self.add(None, data=data)
            self.assertEqual(status, 400, data)
            self.assertIn(message, body["error"]["message"], data)
            self.assertIn('"config": {', body["error"]["message"])
        events = self.admin.events()
        self.assertEqual(len(events), len(cases))
        self.assertEqual({e.get("target") for e in events}, {None})
        self.assertEqual(self.admin.control.calls, [])

    def test_add_not_json(self) -> None:
        status, _ = self.add({"name": "new", "config": {"command": "x"}}, headers={})
        self.assertEqual(status, 415)
        status, _ = self.add(
            {"name": "new", "config": {"command": "x"}}, headers={"content-type": "text/plain"}
        )
        self.assertEqual(status, 415)
        self.assertEqual(self.admin.control.calls, [])
        self.assertEqual(len(self.admin.events()), 2)

    def test_remove(self) -> None:
        status, _, body = self.admin.request("DELETE", "/admin/servers/s")
        self.assertEqual((status, body["name"]), (200, "s"))
        status, _, _ = self.admin.request("DELETE", "/admin/servers/s")
        self.assertEqual(status, 404)
        self.assertEqual(
            fields(self.admin.events()),
            [
                action("remove_server", "s"),
                action("remove_server", "s", "error: Not Found: no MCP server is named 's'"),
            ],
        )

    def test_reload(self) -> None:
        status, _, body = self.admin.request("POST", "/admin/reload")
        self.assertEqual((status, body), (200, self.admin.control.reload_result))
        self.assertEqual(fields(self.admin.events()), [action("reload", None)])

    def test_reload_refused(self) -> None:
        self.admin.control.reload_result = {
            "ok": False,
            "error": 'bridge.toml: servers.s.command: missing. Fix: add command = "..."',
            "changes": {},
        }
        status, _, body = self.admin.request("POST", "/admin/reload")
        self.assertEqual(status, 422)
        self.assertEqual(
            body["error"]["message"],
            'Reload failed: bridge.toml: servers.s.command: missing. Fix: add command = "..."',
        )
        self.assertEqual(body["error"]["data"], self.admin.control.reload_result)
        [event] = self.admin.events()
        self.assertEqual(event["outcome"], "error: " + body["error"]["message"])

    def test_reload_config_error(self) -> None:
        self.admin.control.reload_error = ConfigError("b.toml", "listen", "is empty", "give one")
        status, _, body = self.admin.request("POST", "/admin/reload")
        self.assertEqual(status, 422)
        self.assertEqual(
            body["error"]["data"], {"key": "listen", "problem": "is empty", "fix": "give one"}
        )

    def test_reload_not_json(self) -> None:
        status, _, _ = self.admin.request("POST", "/admin/reload", headers={})
        self.assertEqual(status, 415)
        self.assertEqual(self.admin.control.calls, [])
        [event] = self.admin.events()
        self.assertEqual(event["action"], "reload")

    def test_close_session(self) -> None:
        status, _, body = self.admin.request("DELETE", f"/admin/sessions/{SESSION}")
        self.assertEqual((status, body), (200, {"closed": SESSION}))
        status, _, body = self.admin.request("DELETE", f"/admin/sessions/{SESSION}")
        self.assertEqual(status, 404)
        self.assertEqual(body["error"]["message"], "Not Found: no open session has this id")
        self.assertEqual(
            fields(self.admin.events()),
            [
                action("close_session", SESSION),
                action("close_session", SESSION, "error: Not Found: no open session has this id"),
            ],
        )

    @settings(max_examples=300, deadline=None)
    @given(
        st.one_of(
            st.binary(max_size=64),
            st.builds(
                lambda v: json.dumps(v).encode(),
                st.recursive(
                    st.none()
                    | st.booleans()
                    | st.integers()
                    | st.floats(allow_nan=False)
                    | st.text(max_size=12),
                    lambda inner: (
                        st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
                    ),
                    max_leaves=12,
                ),
            ),
            st.builds(
                lambda name, table: json.dumps({"name": name, "config": table}).encode(),
                st.sampled_from(["new", "s", "bad name", "", "x" * 70]) | st.text(max_size=10),
                st.dictionaries(
                    st.sampled_from(
                        [
                            "command",
                            "args",
                            "env",
                            "env_passthrough",
                            "cwd",
                            "sharing",
                            "type",
                            "url",
                            "disabled",
                            "restart",
                            "limits",
                            "allow",
                            "deny",
                            "max_message_size",
                            "request_timeout",
                            "max_request_timeout",
                            "stderr_lines",
                            "json_response",
                        ]
                    )
                    | st.text(max_size=6),
                    st.recursive(
                        st.none()
                        | st.booleans()
                        | st.integers()
                        | st.floats()
                        | st.text(max_size=12)
                        | st.just("uvx")
                        | st.just("${HOME}")
                        | st.just("16MiB"),
                        lambda inner: (
                            st.lists(inner, max_size=3)
                            | st.dictionaries(st.text(max_size=6), inner, max_size=3)
                        ),
                        max_leaves=8,
                    ),
                    max_size=5,
                ),
            ),
        )
    )
    def test_any_body_is_never_a_500(self, data: bytes) -> None:
        status, _, body = self.admin.raw("POST", "/admin/servers", data, JSON_BODY)
        self.assertIn(status, (201, 400, 409, 422), body)
        answer = json.loads(body)
        if status != 201:
            self.assertEqual(set(answer), {"jsonrpc", "id", "error"})
        self.assertEqual(self.flushLoggedErrors(), [])


class AdminOnlyTests(SynchronousTestCase):
    """The API refuses whoever is not an admin, even without the Gate in front."""

    ROUTES = [
        ("GET", "/admin/servers"),
        ("GET", "/admin/servers/s"),
        ("POST", "/admin/servers/s/restart"),
        ("GET", "/admin/servers/s/stderr"),
        ("GET", "/admin/sessions"),
        ("DELETE", f"/admin/sessions/{SESSION}"),
        ("POST", "/admin/servers"),
        ("DELETE", "/admin/servers/s"),
        ("POST", "/admin/reload"),
        ("GET", "/admin/nothing"),
    ]

    def check(self, admin: Admin, principal: str | None) -> None:
        for method, path in self.ROUTES:
            status, _, body = admin.request(method, path, {"name": "new", "config": {}})
            self.assertEqual(status, 403, (method, path))
            self.assertEqual(body["error"]["message"], "Forbidden: this needs the admin scope")
        self.assertEqual(admin.control.calls, [])
        self.assertEqual(admin.events(), [])
        first, rest = admin.events("access_refused")
        self.assertEqual(first.get("principal"), principal)
        self.assertEqual(first["route"], "/admin/servers")
        self.assertEqual(rest["repeated"], len(self.ROUTES) - 1)

    def test_not_admin(self) -> None:
        self.check(Admin(self, USER), "token:alice")

    def test_no_principal(self) -> None:
        self.check(Admin(self, None), None)


# The command line


class Forwarder(http.server.BaseHTTPRequestHandler):
    """Hands each HTTP request to the in-memory admin API, and its answer back."""

    server: AdminHTTPServer

    def forward(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        data = self.rfile.read(length) if length else None
        self.server.seen.append((self.command, self.path, dict(self.headers.items())))
        if self.server.canned is not None:
            status, headers, content = self.server.canned
        else:
            keep = ("content-type", "authorization", "accept")
            forwarded = {k: v for k, v in self.headers.items() if k.lower() in keep}
            status, response_headers, content = self.server.admin.raw(
                self.command, self.path, data, forwarded
            )
            headers = {k.decode(): v[0].decode() for k, v in response_headers.getAllRawHeaders()}
        self.send_response(status)
        for name, value in headers.items():
            if name.lower() not in ("content-length", "date", "server"):
                self.send_header(name, value)
        self.send_header("content-length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    do_GET = do_POST = do_DELETE = forward

    def log_message(self, format: str, *args: Any) -> None:
        pass


class AdminHTTPServer(http.server.HTTPServer):
    def __init__(self, admin: Admin) -> None:
        super().__init__(("127.0.0.1", 0), Forwarder)
        self.admin = admin
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.canned: tuple[int, dict[str, str], bytes] | None = None


class CommandTests(SynchronousTestCase):
    """C{python -m mcptwist admin ...} against the admin API over a real socket."""

    def setUp(self) -> None:
        self.admin = Admin(self, tokens=TOKENS)
        self.server = self.serve(AdminHTTPServer(self.admin))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.token_file = self.write("token", "admin-token-123\n")
        self.patch(os, "environ", {"PATH": os.environ.get("PATH", "")})

    def serve(self, server: AdminHTTPServer) -> AdminHTTPServer:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join()

        self.addCleanup(stop)
        return server

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.directory, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def run_admin(
        self, *argv: str, token: bool = True, url: str | None = None
    ) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        args = ["admin", "--url", url or self.url]
        if token:
            args += ["--token-file", self.token_file]
        status = main([*args, *argv], out, err)
        for secret in TOKENS:
            self.assertNotIn(secret, out.getvalue() + err.getvalue())
        return status, out.getvalue(), err.getvalue()

    def test_servers_table(self) -> None:
        status, out, err = self.run_admin("servers")
        self.assertEqual((status, err), (0, ""))
        header, s, t = out.splitlines()
        self.assertEqual(
            header.split(),
            ["NAME", "STATE", "PID", "UPTIME", "RESTARTS", "SESSIONS", "IN_FLIGHT"],
        )
        self.assertEqual(s.split(), ["s", "running", "4242", "1h02m", "2", "1", "3"])
        self.assertEqual(t.split(), ["t", "running", "1/16", "children", "-", "1", "1", "2"])
        # Aligned: every column starts where its header does.
        for column in ("STATE", "UPTIME", "IN_FLIGHT"):
            self.assertEqual(s[header.index(column) - 1], " ")
            self.assertNotEqual(s[header.index(column)], " ")
        [(method, path, headers)] = self.server.seen
        self.assertEqual((method, path), ("GET", "/admin/servers"))
        self.assertEqual(headers["Authorization"], "Bearer admin-token-123")

    def test_servers_json(self) -> None:
        status, out, _ = self.run_admin("--json", "servers")
        self.assertEqual(status, 0)
        self.assertEqual(json.loads(out), {"servers": self.admin.control.servers()})
        # Options are taken after the command too.
        status, out2, _ = self.run_admin("servers", "--json")
        self.assertEqual((status, out2), (0, out))

    def test_status(self) -> None:
        status, out, _ = self.run_admin("status", "s")
        self.assertEqual(status, 0)
        lines = out.splitlines()
        self.assertIn("state:           running", lines)
        self.assertIn("uptime:          1h02m", lines)
        self.assertIn("last_exit:       -", lines)
        self.assertIn('server_info:     {"name": "s", "version": "1.0"}', lines)
        self.assertEqual(lines[-3:], [lines[-3], "  starting", "  ready"])
        self.assertTrue(lines[-3].startswith("stderr (last 2 lines"))

    def test_lifecycle(self) -> None:
        for verb, done in (
            ("stop", "stopped s: stopped"),
            ("start", "started s: running"),
            ("restart", "restarted s: running"),
        ):
            status, out, _ = self.run_admin(verb, "s")
            self.assertEqual(status, 0)
            self.assertEqual(out, f"{done} (pid 4242)\n")
        self.assertEqual([c[0] for c in self.admin.control.calls], ["stop", "start", "restart"])
        for (method, path, headers), verb in zip(
            self.server.seen, ("stop", "start", "restart"), strict=True
        ):
            self.assertEqual((method, path), ("POST", f"/admin/servers/s/{verb}"))
            self.assertEqual(headers["Content-Type"], "application/json")
        self.assertEqual(
            [(e["principal"], e["action"], e["outcome"]) for e in self.admin.events()],
            [("token:ops", v, "ok") for v in ("stop", "start", "restart")],
        )

    def test_refused(self) -> None:
        status, out, err = self.run_admin("restart", "nope")
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(err, "mcptwist admin: Not Found: no MCP server is named 'nope'\n")

    def test_stderr(self) -> None:
        status, out, _ = self.run_admin("stderr", "s", "-n", "2")
        self.assertEqual((status, out), (0, "line 298\nline 299\n"))
        self.assertEqual(self.server.seen[-1][1], "/admin/servers/s/stderr?lines=2")
        status, out, _ = self.run_admin("stderr", "s")
        self.assertEqual(len(out.splitlines()), 100)
        status, _, err = self.run_admin("stderr", "s", "-n", "0")
        self.assertEqual(status, 2)
        self.assertIn("-n must be from 1 to 10000", err)

    def test_sessions(self) -> None:
        status, out, _ = self.run_admin("sessions")
        self.assertEqual(status, 0)
        header, first, second = out.splitlines()
        self.assertEqual(
            header.split(),
            ["ID", "SERVER", "TRANSPORT", "PRINCIPAL", "PEER", "CLIENT", "AGE", "IDLE", "STREAM"],
        )
        self.assertEqual(
            first.split(),
            [
                SESSION,
                "s",
                "streamable_http",
                "token:ops",
                "127.0.0.1",
                "inspector",
                "1m15s",
                "4s",
                "yes",
            ],
        )
        self.assertEqual(
            second.split(),
            ["other-session", "t", "sse", "jwt:carol", "192.0.2.7", "-", "1d01h", "0.2s", "no"],
        )
        status, out, _ = self.run_admin("sessions", "--server", "t")
        self.assertEqual(len(out.splitlines()), 2)
        self.assertEqual(self.server.seen[-1][1], "/admin/sessions?server=t")
        self.admin.control.session_list = []
        status, out, _ = self.run_admin("sessions")
        self.assertEqual((status, out), (0, "no open sessions\n"))

    def test_close(self) -> None:
        status, out, _ = self.run_admin("close", SESSION)
        self.assertEqual((status, out), (0, "session closed\n"))
        self.assertEqual(self.server.seen[-1][:2], ("DELETE", f"/admin/sessions/{SESSION}"))
        status, _, err = self.run_admin("close", SESSION)
        self.assertEqual(status, 1)
        self.assertIn("no open session has this id", err)

    def test_add_toml_table(self) -> None:
        path = self.write("new.toml", 'command = "time"\nsharing = "session"\n')
        status, out, err = self.run_admin("add", "new", "--config", path)
        self.assertEqual((status, out, err), (0, "added new: running (pid 5000)\n", ""))
        self.assertEqual(self.admin.control.calls, [("add_server", "new", "uvx")])

    def test_add_command(self) -> None:
        status, out, err = self.run_admin("add", "new", "--command", "time")
        self.assertEqual((status, out, err), (0, "added new: running (pid 5000)\n", ""))
        self.assertEqual(self.server.seen[-1][:2], ("POST", "/admin/servers"))
        path = self.write("other.toml", 'command = "x"\nsharing = "session"\n')
        self.assertEqual(self.run_admin("add", "b", "--command", "time", "--config", path)[0], 0)
        self.assertEqual(
            self.admin.control.calls, [("add_server", "new", "uvx"), ("add_server", "b", "uvx")]
        )

    def test_add_wrapped(self) -> None:
        toml = self.write("a.toml", '[servers.time]\ncommand = "time"\n')
        mcp = self.write(
            "b.json", '{"mcpServers": {"x": {"command": "time"}, "y": {"command": "x"}}}'
        )
        self.assertEqual(self.run_admin("add", "time", "--config", toml)[0], 0)
        self.assertEqual(self.run_admin("add", "y", "--config", mcp)[0], 0)
        status, _, err = self.run_admin("add", "z", "--config", mcp)
        self.assertEqual(status, 2)
        self.assertIn("no mcpServers entry named 'z' (it has: x, y)", err)
        self.assertEqual(
            self.admin.control.calls, [("add_server", "time", "uvx"), ("add_server", "y", "x")]
        )

    def test_add_errors(self) -> None:
        path = self.write("bad.toml", 'command = "x"\nargs = ["x"]\n')
        status, _, err = self.run_admin("add", "new", "--config", path)
        self.assertEqual(status, 1)
        self.assertIn("servers.new.args: cannot be given over HTTP", err)
        status, _, err = self.run_admin("add", "new")
        self.assertEqual(status, 1)
        self.assertIn("servers.new.command: missing", err)
        status, _, err = self.run_admin(
            "add", "s", "--config", self.write("s.json", '{"command": "x"}')
        )
        self.assertEqual(status, 1)
        self.assertIn("already exists", err)
        status, _, err = self.run_admin("add", "new", "--config", self.write("broken.toml", "= ="))
        self.assertEqual(status, 2)
        self.assertIn("is not valid TOML", err)
        status, _, err = self.run_admin(
            "add", "new", "--config", os.path.join(self.directory, "none")
        )
        self.assertEqual(status, 2)
        self.assertIn("cannot read", err)

    def test_remove(self) -> None:
        self.assertEqual(self.run_admin("remove", "s")[:2], (0, "removed s\n"))
        self.assertEqual(self.server.seen[-1][:2], ("DELETE", "/admin/servers/s"))

    def test_reload(self) -> None:
        status, out, _ = self.run_admin("reload")
        self.assertEqual(status, 0)
        self.assertEqual(out, "configuration reloaded\n  added: u\n  removed: none\n  changed: s\n")
        self.admin.control.reload_result = {
            "ok": False,
            "error": "x.toml: listen: is empty. Fix: y",
            "changes": {},
        }
        status, out, err = self.run_admin("reload")
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(err, "mcptwist admin: Reload failed: x.toml: listen: is empty. Fix: y\n")

    def test_token_from_environment(self) -> None:
        os.environ["MCPTWIST_TOKEN"] = "admin-token-123"
        self.assertEqual(self.run_admin("servers", token=False)[0], 0)
        self.assertEqual(self.server.seen[-1][2]["Authorization"], "Bearer admin-token-123")

    def test_url_from_environment(self) -> None:
        os.environ["MCPTWIST_URL"] = self.url
        out, err = io.StringIO(), io.StringIO()
        status = main(["admin", "--token-file", self.token_file, "servers"], out, err)
        self.assertEqual((status, err.getvalue()), (0, ""))

    def test_no_token(self) -> None:
        status, _, err = self.run_admin("servers", token=False)
        self.assertEqual(status, 1)
        self.assertIn("Unauthorized", err)
        self.assertIn("--token-file", err)
        self.assertNotIn("Authorization", self.server.seen[-1][2])

    def test_not_an_admin_token(self) -> None:
        os.environ["MCPTWIST_TOKEN"] = "user-token-456"
        status, _, err = self.run_admin("restart", "s", token=False)
        self.assertEqual(status, 1)
        self.assertIn("Forbidden: this needs the admin scope", err)
        self.assertIn("is this token an admin's?", err)
        self.assertEqual(self.admin.control.calls, [])

    def test_bad_token_files(self) -> None:
        for name, text, message in (
            ("empty", "\n", "is empty"),
            ("spaced", "admin-token-123 admin-token-123\n", "characters a token cannot have"),
        ):
            self.token_file = self.write(name, text)
            status, _, err = self.run_admin("servers")
            self.assertEqual(status, 2, name)
            self.assertIn(message, err)
        self.token_file = os.path.join(self.directory, "missing")
        status, _, err = self.run_admin("servers")
        self.assertEqual(status, 2)
        self.assertIn("cannot read the token file", err)
        self.assertEqual(self.server.seen, [])

    def test_connection_refused(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        status, out, err = self.run_admin("servers", url=url)
        self.assertEqual((status, out), (2, ""))
        self.assertEqual(
            err,
            f"mcptwist admin: cannot connect to the bridge at {url}: connection refused "
            "(is it running? give --url or set MCPTWIST_URL)\n",
        )

    def test_bad_url(self) -> None:
        for url in ("ftp://127.0.0.1", "127.0.0.1:8080", "http://[::1", "http://h:port"):
            status, _, err = self.run_admin("servers", url=url)
            self.assertEqual(status, 2, url)
            self.assertIn("is not an http:// or https:// URL", err)

    def test_redirect_not_followed(self) -> None:
        self.server.canned = (302, {"location": "http://evil.example/"}, b"")
        status, _, err = self.run_admin("servers")
        self.assertEqual(status, 1)
        self.assertIn("redirect to http://evil.example/", err)
        self.assertEqual(len(self.server.seen), 1)

    def test_not_the_bridge(self) -> None:
        self.server.canned = (200, {"content-type": "text/html"}, b"<html>")
        status, _, err = self.run_admin("servers")
        self.assertEqual(status, 2)
        self.assertIn("is not JSON: is this the bridge?", err)
        self.server.canned = (500, {"content-type": "text/html"}, b"<html>")
        status, _, err = self.run_admin("servers")
        self.assertEqual(status, 1)
        self.assertIn("HTTP 500", err)

    def test_https(self) -> None:
        ca = make_ca(self.directory)
        cert, key = make_server_cert(self.directory, ca)
        server = AdminHTTPServer(self.admin)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self.serve(server)
        url = f"https://127.0.0.1:{server.server_address[1]}"
        status, out, err = self.run_admin("--cafile", ca.path, "servers", url=url)
        self.assertEqual((status, err), (0, ""))
        self.assertTrue(out.startswith("NAME"))
        status, _, err = self.run_admin("servers", url=url)
        self.assertEqual(status, 2)
        self.assertIn(f"cannot trust the bridge at {url}", err)
        self.assertIn("--cafile", err)
        status, _, err = self.run_admin("--cafile", cert + ".missing", "servers", url=url)
        self.assertEqual(status, 2)
        self.assertIn("cannot use --cafile", err)

    def test_plain_http_warning(self) -> None:
        err = io.StringIO()
        AdminClient("http://192.0.2.1:8080/", "a-token", None, 1, err)
        self.assertEqual(
            err.getvalue(),
            "mcptwist admin: warning: the token goes unencrypted to 192.0.2.1; "
            "use an https:// URL\n",
        )
        for url in ("http://127.0.0.1:8080", "http://localhost", "http://[::1]:8080"):
            AdminClient(url, "a-token", None, 1, err)
        AdminClient("http://192.0.2.1:8080/", None, None, 1, err)
        self.assertEqual(len(err.getvalue().splitlines()), 1)

    def test_usage(self) -> None:
        out, err = io.StringIO(), io.StringIO()
        for argv in (["admin", "--url", self.url], ["admin", "start"], ["admin", "nothing"]):
            with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as caught:
                main(argv, out, err)
            self.assertEqual(caught.exception.code, 2)
        self.assertIn("COMMAND", err.getvalue())
        self.assertEqual(self.server.seen, [])


class CommandModuleTests(SynchronousTestCase):
    def test_admin_does_not_load_the_reactor(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        env.pop("MCPTWIST_TOKEN", None)
        code = (
            "import sys, io\n"
            "from mcptwist.__main__ import AdminClient, main\n"
            "err = io.StringIO()\n"
            "assert main(['admin', '--url', 'http://127.0.0.1:1', 'servers'], io.StringIO(), err) == 2, err.getvalue()\n"
            "assert 'twisted.internet.reactor' not in sys.modules\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, timeout=60, check=False
        )
        self.assertEqual(result.returncode, 0, result.stderr)


SCOPED = Principal("ops-s", "token", frozenset({"s"}), admin=True)


class GrantTests(SynchronousTestCase):
    """An admin whose grants name only server C{s} acts on C{s} alone."""

    def setUp(self) -> None:
        self.admin = Admin(self, SCOPED)

    def refused(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        status, _, answer = self.admin.request(method, path, body)
        self.assertEqual(status, 403, path)
        return dict(answer["error"])

    def test_lists_show_only_granted_servers(self) -> None:
        _, _, body = self.admin.request("GET", "/admin/servers")
        self.assertEqual([s["name"] for s in body["servers"]], ["s"])
        _, _, body = self.admin.request("GET", "/admin/sessions")
        self.assertEqual([s["id"] for s in body["sessions"]], [SESSION])

    def test_other_servers_are_refused_whether_or_not_they_exist(self) -> None:
        for name in ("t", "nope"):
            for method, path in (
                ("GET", f"/admin/servers/{name}"),
                ("GET", f"/admin/servers/{name}/stderr"),
                ("GET", f"/admin/sessions?server={name}"),
                ("POST", f"/admin/servers/{name}/start"),
                ("POST", f"/admin/servers/{name}/stop"),
                ("POST", f"/admin/servers/{name}/restart"),
                ("DELETE", f"/admin/servers/{name}"),
            ):
                error = self.refused(method, path)
                self.assertIn("may not use this server", error["message"])
        self.assertEqual(self.admin.control.calls, [])
        self.assertEqual(self.admin.control.status["t"]["state"], "running")
        refusals = self.admin.events("access_refused")
        self.assertEqual({e["server"] for e in refusals}, {"t", "nope"})

    def test_changes_are_audited_as_refused(self) -> None:
        self.refused("POST", "/admin/servers/t/stop")
        [event] = self.admin.events()
        self.assertEqual(
            (event["action"], event["target"], event["outcome"][:17]),
            ("stop", "t", "error: Forbidden:"),
        )

    def test_granted_server_works(self) -> None:
        status, _, _ = self.admin.request("POST", "/admin/servers/s/restart")
        self.assertEqual(status, 200)
        self.assertEqual(self.admin.control.calls, [("restart", "s")])

    def test_sessions_of_other_servers_cannot_be_closed(self) -> None:
        status, _, _ = self.admin.request("DELETE", "/admin/sessions/other-session")
        self.assertEqual(status, 404)
        self.assertIn("other-session", [s["id"] for s in self.admin.control.session_list])
        status, _, _ = self.admin.request("DELETE", f"/admin/sessions/{SESSION}")
        self.assertEqual(status, 200)

    def test_reload_and_adding_other_names_need_grants(self) -> None:
        error = self.refused("POST", "/admin/reload")
        self.assertIn('servers = ["*"]', error["message"])
        self.refused("POST", "/admin/servers", {"name": "new", "config": {"command": "x"}})
        self.assertEqual(self.admin.control.calls, [])
