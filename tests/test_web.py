"""The HTTP surface, in memory: StubTreq in front, fake children behind."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import datetimeToString

from mcptwist.config.model import (
    AuthConfig,
    LimitsConfig,
    RestartPolicy,
    ServerConfig,
    TokenConfig,
)
from mcptwist.mcp import jsonrpc
from mcptwist.security.auth import hash_token
from mcptwist.web import http

from .support.bridge import Bridge, send
from .support.messages import BOTH, INIT, JSON, STREAM, bearer, decode


def stream_at_heartbeat(test: SynchronousTestCase, bridge: Bridge, answer: Any) -> Any:
    """The response to a POST whose answer is slow in coming: none at the
    first heartbeat, a stream at the second (between half an interval and
    one after the request)."""
    bridge.app.heartbeat.beat()
    bridge.client.flush()
    test.assertNoResult(answer)
    bridge.app.heartbeat.beat()
    bridge.client.flush()
    return test.successResultOf(answer)


class StreamableTests(SynchronousTestCase):
    def test_initialize_json(self) -> None:
        bridge = Bridge(self)
        response = bridge.request("POST", "/servers/s/mcp", INIT, JSON)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        [session_id] = response.headers.getRawHeaders("mcp-session-id")
        self.assertGreaterEqual(len(session_id), 40)
        self.assertTrue(all(0x21 <= ord(c) <= 0x7E for c in session_id))
        body = bridge.json(response)
        self.assertEqual(body["id"], 1)
        self.assertEqual(body["result"]["protocolVersion"], "2025-06-18")

    def test_a_quick_answer_is_json_for_a_client_that_takes_either(self) -> None:
        bridge = Bridge(self)
        sid = bridge.open_session()
        response = bridge.request(
            "POST",
            "/servers/s/mcp",
            jsonrpc.request(2, "tools/call", {"name": "e", "arguments": {"a": 1}}),
            {**BOTH, "mcp-session-id": sid},
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(bridge.json(response)["id"], 2)
        [session] = bridge.registry.sessions.values()
        self.assertEqual(list(session.sink._channels), [0])  # type: ignore[attr-defined]

    def test_a_message_before_the_answer_opens_the_stream(self) -> None:
        """A client that takes either: a notification for the request comes
        first, so the answer is a stream (primed, in 2025-11-25)."""
        bridge = Bridge(self, hold=True)
        init = jsonrpc.request(
            1, "initialize", {"protocolVersion": "2025-11-25", "capabilities": {}}
        )
        sid = bridge.open_session(init=init)
        message = jsonrpc.request(
            2, "tools/call", {"name": "slow", "_meta": {"progressToken": "p"}}
        )
        d = send(bridge, message, {**BOTH, "mcp-session-id": sid})
        self.assertNoResult(d)
        child = bridge.reactor.child
        [held] = child.held
        progress = {"progressToken": held["params"]["_meta"]["progressToken"], "progress": 1}
        child.send(jsonrpc.notification("notifications/progress", progress))
        bridge.client.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/event-stream"])
        chunks = bridge.stream(response)
        child.answer(held)
        bridge.client.flush()
        priming, notice, answer = decode(b"".join(chunks))
        self.assertEqual(priming["data"], "")
        self.assertEqual(jsonrpc.loads(notice["data"])["params"]["progressToken"], "p")
        self.assertEqual(jsonrpc.loads(answer["data"])["id"], 2)

    def test_no_stream_to_be_had_the_answer_is_json(self) -> None:
        """A client at its cap of streams when a notification would open one:
        the notification goes to the session's own stream, the answer is JSON."""
        tokens = (TokenConfig("user", hash_token("mcpt_user")),)
        bridge = Bridge(
            self,
            hold=True,
            auth=AuthConfig(tokens=tokens),
            limits=LimitsConfig(max_streams_per_principal=1),
        )
        user = bearer("mcpt_user")
        sid = bridge.open_session(headers=user)
        own = bridge.request(
            "GET", "/servers/s/mcp", headers={**user, **STREAM, "mcp-session-id": sid}
        )
        chunks = bridge.stream(own)
        message = jsonrpc.request(2, "tools/call", {"name": "slow", "_meta": {"progressToken": 7}})
        d = send(bridge, message, {**BOTH, **user, "mcp-session-id": sid})
        child = bridge.reactor.child
        [held] = child.held
        progress = {"progressToken": held["params"]["_meta"]["progressToken"], "progress": 1}
        child.send(jsonrpc.notification("notifications/progress", progress))
        child.answer(held)
        bridge.client.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(bridge.json(response)["id"], 2)
        [notice] = [e for e in decode(b"".join(chunks)) if e.get("data")]
        self.assertEqual(jsonrpc.loads(notice["data"])["params"]["progressToken"], 7)

    def test_a_slow_answer_opens_the_stream_at_the_heartbeat(self) -> None:
        """An older revision has no priming event: the stream opens with a
        comment, and the answer comes on it when it is ready."""
        bridge = Bridge(self, hold=True)
        sid = bridge.open_session()  # 2025-06-18
        d = send(
            bridge,
            jsonrpc.request(3, "tools/call", {"name": "slow"}),
            {**BOTH, "mcp-session-id": sid},
        )
        response = stream_at_heartbeat(self, bridge, d)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/event-stream"])
        chunks = bridge.stream(response)
        self.assertEqual(b"".join(chunks), b": stream open\n\n")
        child = bridge.reactor.child
        child.answer(child.held[0])
        bridge.client.flush()
        [answer] = decode(b"".join(chunks))
        self.assertEqual(jsonrpc.loads(answer["data"])["id"], 3)

    def test_request_answered_as_sse_with_event_ids(self) -> None:
        """A client that takes only a stream gets one from the start."""
        bridge = Bridge(self)
        sid = bridge.open_session()
        response = bridge.request(
            "POST",
            "/servers/s/mcp",
            jsonrpc.request(2, "tools/call", {"name": "e", "arguments": {"a": 1}}),
            {**BOTH, "accept": "text/event-stream", "mcp-session-id": sid},
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/event-stream"])
        events = decode(b"".join(bridge.stream(response)))
        self.assertEqual(len(events), 1)
        self.assertRegex(events[0]["id"], r"^\d+-\d+$")
        self.assertEqual(jsonrpc.loads(events[0]["data"])["id"], 2)
        # Delivered live: nothing is kept for resumption.
        [session] = bridge.registry.sessions.values()
        self.assertEqual(list(session.sink._channels), [0])  # type: ignore[attr-defined]

    def test_cancelled_request_json_answer_is_an_error_the_client_ignores(self) -> None:
        bridge = Bridge(self, hold=True)
        sid = bridge.open_session()
        h = {**BOTH, "mcp-session-id": sid}
        d = send(bridge, jsonrpc.request(4, "tools/call", {"name": "slow"}), h)
        cancel = jsonrpc.notification("notifications/cancelled", {"requestId": 4})
        self.assertEqual(bridge.request("POST", "/servers/s/mcp", cancel, h).code, 202)
        response = self.successResultOf(d)
        self.assertEqual(bridge.json(response)["error"]["code"], jsonrpc.REQUEST_CANCELLED)

    def test_cancelled_request_stream_ends_without_a_response(self) -> None:
        bridge = Bridge(self, hold=True)
        sid = bridge.open_session()
        h = {**BOTH, "accept": "text/event-stream", "mcp-session-id": sid}
        d = bridge.client.request(
            "POST",
            "http://127.0.0.1/servers/s/mcp",
            data=jsonrpc.dumps(jsonrpc.request(4, "tools/call", {"name": "slow"})),
            headers=h,
        )
        bridge.client.flush()
        cancel = jsonrpc.notification("notifications/cancelled", {"requestId": 4})
        self.assertEqual(bridge.request("POST", "/servers/s/mcp", cancel, h).code, 202)
        response = self.successResultOf(d)
        self.assertEqual(decode(b"".join(bridge.stream(response))), [])
        child = bridge.reactor.child
        self.assertEqual(
            child.notifications("notifications/cancelled")[0]["params"]["requestId"],
            child.held[0]["id"],
        )

    def test_json_response_setting(self) -> None:
        bridge = Bridge(self, ServerConfig(name="s", command="fake", json_response=True))
        sid = bridge.open_session()
        response = bridge.request(
            "POST", "/servers/s/mcp", jsonrpc.request(2, "ping"), {**BOTH, "mcp-session-id": sid}
        )
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(bridge.json(response)["result"], {})

    def test_notification_gets_202_and_no_body(self) -> None:
        bridge = Bridge(self)
        sid = bridge.open_session()
        response = bridge.request(
            "POST",
            "/servers/s/mcp",
            jsonrpc.notification("notifications/roots/list_changed"),
            {**JSON, "mcp-session-id": sid},
        )
        self.assertEqual(response.code, 202)
        self.assertEqual(bridge.content(response), b"")
        self.assertEqual(
            len(bridge.reactor.child.notifications("notifications/roots/list_changed")), 1
        )

    def test_session_errors(self) -> None:
        bridge = Bridge(self)
        ping = jsonrpc.request(5, "ping")
        missing = bridge.request("POST", "/servers/s/mcp", ping, JSON)
        self.assertEqual(missing.code, 400)
        self.assertIn("Mcp-Session-Id", bridge.json(missing)["error"]["message"])
        unknown = bridge.request("POST", "/servers/s/mcp", ping, {**JSON, "mcp-session-id": "nope"})
        self.assertEqual(unknown.code, 404)
        self.assertEqual(bridge.json(unknown)["error"]["code"], -32001)

    def test_delete_ends_the_session(self) -> None:
        bridge = Bridge(self)
        sid = bridge.open_session()
        self.assertEqual(
            bridge.request("DELETE", "/servers/s/mcp", headers={"mcp-session-id": sid}).code, 200
        )
        after = bridge.request(
            "POST", "/servers/s/mcp", jsonrpc.request(5, "ping"), {**JSON, "mcp-session-id": sid}
        )
        self.assertEqual(after.code, 404)
        self.assertEqual(bridge.registry.sessions, {})

    def test_session_of_another_server_is_unknown(self) -> None:
        bridge = Bridge(
            self, ServerConfig(name="a", command="fake"), ServerConfig(name="b", command="fake")
        )
        sid = bridge.open_session("a")
        response = bridge.request(
            "POST", "/servers/b/mcp", jsonrpc.request(5, "ping"), {**JSON, "mcp-session-id": sid}
        )
        self.assertEqual(response.code, 404)

    def test_bad_requests(self) -> None:
        bridge = Bridge(self, ServerConfig(name="s", command="fake", max_message_size=2048))
        sid = bridge.open_session()
        h = {**JSON, "mcp-session-id": sid}
        cases = [
            (
                dict(
                    body=jsonrpc.request(5, "ping"),
                    headers={**h, "mcp-protocol-version": "2099-01-01"},
                ),
                400,
                jsonrpc.INVALID_REQUEST,
            ),
            (
                dict(body=jsonrpc.request(5, "ping"), headers={**h, "accept": "text/html"}),
                406,
                jsonrpc.INVALID_REQUEST,
            ),
            (
                dict(body=jsonrpc.request(5, "ping"), headers={**h, "content-type": "text/plain"}),
                415,
                jsonrpc.INVALID_REQUEST,
            ),
            (dict(raw=b"{not json", headers=h), 400, jsonrpc.PARSE_ERROR),
            (dict(raw=b'{"jsonrpc": "2.0"}', headers=h), 400, jsonrpc.INVALID_REQUEST),
            (
                dict(raw=b'[{"jsonrpc": "2.0", "id": 1, "method": "ping"}]', headers=h),
                400,
                jsonrpc.INVALID_REQUEST,
            ),
            (
                dict(body=jsonrpc.request(5, "x", {"blob": "x" * 4000}), headers=h),
                413,
                jsonrpc.INVALID_REQUEST,
            ),
        ]
        for kwargs, status, code in cases:
            response = bridge.request("POST", "/servers/s/mcp", **kwargs)  # type: ignore[arg-type]
            self.assertEqual(response.code, status, kwargs)
            self.assertEqual(bridge.json(response)["error"]["code"], code, kwargs)

    def test_array_params_refused_and_the_id_stays_usable(self) -> None:
        bridge = Bridge(self)
        sid = bridge.open_session()
        h = {**BOTH, "mcp-session-id": sid}
        bad = bridge.request(
            "POST",
            "/servers/s/mcp",
            raw=b'{"jsonrpc":"2.0","id":5,"method":"logging/setLevel","params":["debug"]}',
            headers=h,
        )
        self.assertEqual(bad.code, 400)
        body = bridge.json(bad)
        self.assertEqual((body["id"], body["error"]["code"]), (5, jsonrpc.INVALID_PARAMS))
        good = bridge.request(
            "POST", "/servers/s/mcp", jsonrpc.request(5, "ping"), {**JSON, "mcp-session-id": sid}
        )
        self.assertEqual(bridge.json(good)["result"], {})

    def test_priming_id_never_ahead_of_replayed_events(self) -> None:
        bridge = Bridge(self)
        init = jsonrpc.request(
            1, "initialize", {"protocolVersion": "2025-11-25", "capabilities": {}}
        )
        sid = bridge.open_session(init=init)
        for _ in range(3):
            bridge.reactor.child.send(jsonrpc.notification("notifications/tools/list_changed"))
        stream = bridge.request(
            "GET", "/servers/s/mcp", headers={"accept": "text/event-stream", "mcp-session-id": sid}
        )
        ids = [e["id"] for e in decode(b"".join(bridge.stream(stream)))]
        self.assertEqual(ids, ["0-1", "0-2", "0-3", "0-3"])

    def test_batch_allowed_for_2025_03_26(self) -> None:
        bridge = Bridge(self)
        init = jsonrpc.request(
            1, "initialize", {"protocolVersion": "2025-03-26", "capabilities": {}}
        )
        sid = bridge.open_session(init=init)
        batch = [
            jsonrpc.request(7, "ping"),
            jsonrpc.request(8, "ping"),
            jsonrpc.notification("notifications/x"),
        ]
        response = bridge.request(
            "POST",
            "/servers/s/mcp",
            raw=jsonrpc.dumps(batch),
            headers={**JSON, "mcp-session-id": sid},
        )
        self.assertEqual(sorted(m["id"] for m in bridge.json(response)), [7, 8])

    def test_origin_checked(self) -> None:
        bridge = Bridge(self)
        evil = bridge.request(
            "POST", "/servers/s/mcp", INIT, {**JSON, "origin": "http://evil.example.com"}
        )
        self.assertEqual(evil.code, 403)
        self.assertEqual(bridge.json(evil)["error"]["code"], jsonrpc.SERVER_UNAVAILABLE)
        self.assertEqual(bridge.registry.sessions, {})
        # By default no web page may, a local one included (any local page could).
        local = bridge.request(
            "POST", "/servers/s/mcp", INIT, {**JSON, "origin": "http://localhost:6274"}
        )
        self.assertEqual(local.code, 403)
        self.assertIn("allowed", bridge.json(local)["error"]["message"])
        self.assertEqual(bridge.registry.sessions, {})
        # The bridge's own origin (scheme and Host), which no page can have: served.
        own = bridge.request("POST", "/servers/s/mcp", INIT, {**JSON, "origin": "http://127.0.0.1"})
        self.assertEqual(own.code, 200)
        other_port = bridge.request(
            "POST", "/servers/s/mcp", INIT, {**JSON, "origin": "http://127.0.0.1:3000"}
        )
        self.assertEqual(other_port.code, 403)
        # Any Host answered: a rebound page (its name in Host and Origin) is still refused.
        anyhost = Bridge(self, allowed_hosts=("*",))
        rebound = anyhost.request(
            "POST",
            "/servers/s/mcp",
            INIT,
            {**JSON, "host": "evil.example:8080", "origin": "http://evil.example:8080"},
        )
        self.assertEqual(rebound.code, 403)
        self.assertEqual(anyhost.registry.sessions, {})
        inspector = Bridge(self, allowed_origins=("http://localhost:6274",))
        self.assertEqual(
            inspector.request(
                "POST", "/servers/s/mcp", INIT, {**JSON, "origin": "http://localhost:6274"}
            ).code,
            200,
        )
        configured = Bridge(self, allowed_origins=("https://app.example.com",))
        self.assertEqual(
            configured.request(
                "POST", "/servers/s/mcp", INIT, {**JSON, "origin": "https://app.example.com"}
            ).code,
            200,
        )
        self.assertEqual(
            configured.request(
                "POST", "/servers/s/mcp", INIT, {**JSON, "origin": "http://localhost:1"}
            ).code,
            403,
        )

    def test_host_checked_against_dns_rebinding(self) -> None:
        """A page that rebinds its name to 127.0.0.1 is refused even without Origin."""
        bridge = Bridge(self)
        d = bridge.client.get("http://evil.example.com/servers")
        bridge.client.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 421)
        self.assertIn("allowed_hosts", bridge.json(response)["error"]["message"])
        d = bridge.client.get("http://localhost:8080/servers")
        bridge.client.flush()
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_unknown_server_and_method(self) -> None:
        bridge = Bridge(self)
        response = bridge.request("POST", "/servers/nope/mcp", INIT, JSON)
        self.assertEqual(response.code, 404)
        self.assertIn("nope", bridge.json(response)["error"]["message"])
        put = bridge.request("PUT", "/servers/s/mcp")
        self.assertEqual(put.code, 405)
        self.assertEqual(bridge.json(put)["error"]["code"], jsonrpc.INVALID_REQUEST)

    def test_message_endpoints_name_the_methods_they_take(self) -> None:
        """Every other method is refused (405) with the endpoint's methods in
        Allow, on a server that exists or not; a stream is not opened by HEAD."""
        bridge = Bridge(self)
        for server in ("s", "nope"):
            for endpoint, allowed, methods in (
                ("mcp", {"GET", "POST", "DELETE"}, ("HEAD", "PUT", "PATCH", "OPTIONS")),
                ("sse", {"GET", "HEAD"}, ("POST", "DELETE", "PUT", "PATCH", "OPTIONS")),
                ("messages", {"POST"}, ("GET", "HEAD", "DELETE", "PUT", "PATCH", "OPTIONS")),
            ):
                for method in methods:
                    response = bridge.request(method, f"/servers/{server}/{endpoint}")
                    where = (method, server, endpoint)
                    self.assertEqual(response.code, 405, where)
                    [allow] = response.headers.getRawHeaders("allow")
                    self.assertEqual(set(allow.split(", ")), allowed, where)
                    if method != "HEAD":
                        body = bridge.json(response)
                        self.assertEqual(
                            body["error"],
                            {"code": jsonrpc.INVALID_REQUEST, "message": "Method Not Allowed"},
                        )
        head = bridge.request("HEAD", "/servers/s/sse", headers={"accept": "text/event-stream"})
        self.assertEqual(head.code, 405)
        self.assertEqual(head.headers.getRawHeaders("allow"), ["GET"])
        self.assertEqual(bridge.request("HEAD", "/servers/nope/sse").code, 404)
        self.assertEqual(bridge.registry.sessions, {})

    def test_get_stream_carries_unrelated_messages_and_is_single(self) -> None:
        bridge = Bridge(self)
        sid = bridge.open_session()
        stream = bridge.request(
            "GET", "/servers/s/mcp", headers={"accept": "text/event-stream", "mcp-session-id": sid}
        )
        self.assertEqual(stream.code, 200)
        chunks = bridge.stream(stream)
        bridge.reactor.child.send(jsonrpc.notification("notifications/tools/list_changed"))
        bridge.client.flush()
        events = decode(b"".join(chunks))
        self.assertEqual(
            [jsonrpc.loads(e["data"])["method"] for e in events if e["data"]],
            ["notifications/tools/list_changed"],
        )
        second = bridge.request(
            "GET", "/servers/s/mcp", headers={"accept": "text/event-stream", "mcp-session-id": sid}
        )
        self.assertEqual(second.code, 409)

    def test_lost_post_stream_resumed_with_last_event_id(self) -> None:
        """A client that loses a POST stream gets the response on a GET with Last-Event-ID."""
        bridge = Bridge(self, hold=True)
        init = jsonrpc.request(
            1, "initialize", {"protocolVersion": "2025-11-25", "capabilities": {}}
        )
        sid = bridge.open_session(init=init)
        h = {**BOTH, "mcp-session-id": sid}
        d = bridge.client.request(
            "POST",
            "http://127.0.0.1/servers/s/mcp",
            data=jsonrpc.dumps(jsonrpc.request(9, "tools/call", {"name": "slow"})),
            headers=h,
        )
        bridge.client.flush()
        self.assertNoResult(d)
        response = stream_at_heartbeat(self, bridge, d)
        chunks = bridge.stream(response)
        [priming] = decode(b"".join(chunks))
        self.assertEqual(priming["data"], "")
        # The connection drops before the answer.
        [session] = bridge.registry.sessions.values()
        [channel] = [c for c in session.sink._channels.values() if c.number]  # type: ignore[attr-defined]
        channel.connection.request.channel.transport.loseConnection()
        bridge.client.flush()
        self.assertIsNone(channel.connection)
        child = bridge.reactor.child
        child.answer(child.held[0])
        resumed = bridge.request(
            "GET",
            "/servers/s/mcp",
            headers={
                "accept": "text/event-stream",
                "mcp-session-id": sid,
                "last-event-id": priming["id"],
            },
        )
        events = decode(b"".join(bridge.stream(resumed)))
        self.assertEqual([jsonrpc.loads(e["data"])["id"] for e in events], [9])


class LegacySSETests(SynchronousTestCase):
    def open(self, bridge: Bridge) -> tuple[list[bytes], str]:
        response = bridge.request("GET", "/servers/s/sse", headers={"accept": "text/event-stream"})
        self.assertEqual(response.code, 200)
        chunks = bridge.stream(response)
        [endpoint] = decode(b"".join(chunks))
        self.assertEqual(endpoint["event"], "endpoint")
        self.assertTrue(endpoint["data"].startswith("/servers/s/messages?session_id="))
        return chunks, endpoint["data"]

    def test_round_trip(self) -> None:
        bridge = Bridge(self)
        chunks, endpoint = self.open(bridge)
        response = bridge.request("POST", endpoint, INIT, {"content-type": "application/json"})
        self.assertEqual(response.code, 202)
        self.assertEqual(bridge.content(response), b"Accepted")
        bridge.request(
            "POST",
            endpoint,
            jsonrpc.request(2, "tools/call", {"name": "e", "arguments": {"x": 1}}),
            {"content-type": "application/json"},
        )
        messages = [e for e in decode(b"".join(chunks)) if e.get("event") == "message"]
        self.assertEqual([jsonrpc.loads(e["data"])["id"] for e in messages], [1, 2])

    def test_unknown_and_missing_session(self) -> None:
        bridge = Bridge(self)
        self.assertEqual(
            bridge.request(
                "POST",
                "/servers/s/messages?session_id=zzz",
                INIT,
                {"content-type": "application/json"},
            ).code,
            404,
        )
        self.assertEqual(
            bridge.request(
                "POST", "/servers/s/messages", INIT, {"content-type": "application/json"}
            ).code,
            400,
        )

    def test_bad_json_is_400_with_body(self) -> None:
        bridge = Bridge(self)
        _, endpoint = self.open(bridge)
        response = bridge.request(
            "POST", endpoint, raw=b"{", headers={"content-type": "application/json"}
        )
        self.assertEqual(response.code, 400)
        self.assertEqual(bridge.json(response)["error"]["code"], jsonrpc.PARSE_ERROR)

    def test_both_transports_share_one_child(self) -> None:
        bridge = Bridge(self)
        _, endpoint = self.open(bridge)
        bridge.request("POST", endpoint, INIT, {"content-type": "application/json"})
        bridge.open_session()
        self.assertEqual(len(bridge.reactor.children), 1)
        self.assertEqual(bridge.backends["s"].status()["sessions"], 2)


class StatusTests(SynchronousTestCase):
    def test_servers_and_health(self) -> None:
        bridge = Bridge(self)
        bridge.open_session()
        [status] = bridge.json(bridge.request("GET", "/servers"))["servers"]
        self.assertEqual(status["name"], "s")
        self.assertEqual(status["state"], "running")
        self.assertEqual(status["pid"], bridge.reactor.child.pid)
        self.assertEqual(status["sessions"], 1)
        health = bridge.request("GET", "/health")
        self.assertEqual(health.code, 200)
        self.assertEqual(bridge.json(health)["status"], "ok")

    def test_health_503_with_reasons(self) -> None:
        broken = ServerConfig(
            name="broken", command="fake", restart=RestartPolicy(initial_delay=0.1, crash_limit=1)
        )
        bridge = Bridge(self, ServerConfig(name="ok", command="fake"), broken)
        [child] = [
            c
            for c in bridge.reactor.children
            if c.args[-1] == "fake" and c is bridge.reactor.children[1]
        ]
        child.send_raw(b"fatal: no config\n", fd=2)
        child.exit(3)
        health = bridge.request("GET", "/health")
        self.assertEqual(health.code, 503)
        body = bridge.json(health)
        self.assertEqual(list(body["servers"]), ["broken"])
        self.assertIn("failed", body["servers"]["broken"])
        status = bridge.json(bridge.request("GET", "/servers/broken"))
        self.assertEqual(status["stderr"], ["fatal: no config"])
        # A client of the failed server gets a JSON-RPC error naming the problem.
        response = bridge.request("POST", "/servers/broken/mcp", INIT, BOTH)
        self.assertIsNone(response.headers.getRawHeaders("mcp-session-id"))
        error = bridge.json(response)["error"]
        self.assertIn("failed", error["message"])
        self.assertIn("fatal: no config", error["message"])
        self.assertEqual(bridge.registry.sessions, {})


class DateTests(SynchronousTestCase):
    def test_formatted_once_a_second(self) -> None:
        formatted: list[float] = []

        def format_date(seconds: float) -> bytes:
            formatted.append(seconds)
            return datetimeToString(seconds)

        self.patch(http, "datetimeToString", format_date)
        now = [1_700_000_000.25]
        self.patch(http.time, "time", lambda: now[0])
        self.assertEqual(http.http_date(), b"Tue, 14 Nov 2023 22:13:20 GMT")
        now[0] += 0.5
        self.assertEqual(http.http_date(), b"Tue, 14 Nov 2023 22:13:20 GMT")
        now[0] += 0.5
        self.assertEqual(http.http_date(), b"Tue, 14 Nov 2023 22:13:21 GMT")
        self.assertEqual(formatted, [1_700_000_000, 1_700_000_001])
