"""A 2026-07-28 retry sent to another node than the one whose child waits,
and a task followed from another node than the one that holds it.

Two real nodes, n1 and n2, share a real redis-server (its registry gives
each node the other's address) and each run server-everything. A raw
2026-07-28 client speaks to each node itself, as a balancer that spreads
requests without a session may make it: the call goes to n1, whose child
asks for input; the retry, with the answers and the C{requestState}, goes
to n2, which forwards it to n1, where the call completes. A task created on
n1 is followed by a listen stream opened on n2, which listens on n1 for it.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from ..support import messages
from . import cluster_support as cs
from . import harness as h

TOOL = "trigger-elicitation-request"
# What the user answers to server-everything's form (its only required field is name).
ANSWER = {"name": "Ada Lovelace", "check": True, "email": "ada@example.com"}


def call(request_id: int, **params: Any) -> dict[str, Any]:
    """The tools/call of server-everything's elicitation tool, as a 2026-07-28
    client that takes elicitation sends it."""
    return messages.modern(
        request_id,
        "tools/call",
        {"name": TOOL, "arguments": {}, **params},
        caps={"elicitation": {}},
    )


def post(node: cs.Node, message: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST a 2026-07-28 request to one node's server-everything: the status
    and the one JSON-RPC message that answers it."""
    status, headers, body = h.http(
        "POST",
        f"{node.base}/servers/everything/mcp",
        message,
        headers=messages.headers(message),
        timeout=30,
    )
    answers = h.jsonrpc_body(headers, body)
    final = [a for a in answers if "id" in a and "method" not in a]
    assert len(final) == 1, (status, body[:2000])
    return status, final[0]


def accepted(asked: dict[str, Any]) -> dict[str, Any]:
    """The answers to every input request of an input_required result: accept, with the form."""
    return {key: {"action": "accept", "content": ANSWER} for key in asked["inputRequests"]}


def audited(node: cs.Node) -> list[dict[str, Any]]:
    """The tools/call records of a node's audit trail."""
    path = node.bridge.dir / "audit.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    records = [json.loads(line) for line in lines]
    return [r for r in records if r.get("event") == "request" and r.get("method") == "tools/call"]


class RetryOnAnotherNodeTests(SynchronousTestCase):
    def test_retry_on_another_node(self) -> None:
        """The retry sent to n2 completes the call on n1, where it ran; the
        same retry again is refused, as is a retry for a call of a node
        that was killed: the client is told to send the request again."""
        cluster = cs.start_cluster(
            self,
            size=2,
            balancer=False,
            servers=h.everything_server_toml(),
            extra='[audit]\npath = "audit.jsonl"\n\n',
        )
        n1, n2 = cluster.nodes

        status, first = post(n1, call(1))
        asked = first["result"]
        self.assertEqual((status, asked["resultType"]), (200, "input_required"), first)
        self.assertTrue(asked["requestState"].startswith("n1."), asked)
        [question] = asked["inputRequests"].values()
        self.assertEqual(question["method"], "elicitation/create", question)
        self.assertEqual(question["params"]["requestedSchema"]["required"], ["name"], question)

        retry = call(2, inputResponses=accepted(asked), requestState=asked["requestState"])
        status, final = post(n2, retry)
        self.assertEqual((status, final["id"], final["result"]["resultType"]), (200, 2, "complete"))
        text = h.tool_text(final)
        self.assertIn("User provided the requested information", text)
        self.assertIn("Name: Ada Lovelace", text)
        self.assertIn("Email: ada@example.com", text)

        # The call ran on n1, both its rounds, in one stateless session there;
        # n2 only passed the retry on: no session, no call, nothing audited.
        rounds = audited(n1)
        self.assertEqual([(r["name"], r["status"]) for r in rounds], [(TOOL, "ok")] * 2, rounds)
        self.assertEqual(len({r["session"] for r in rounds}), 1, rounds)
        self.assertIn("opened on everything (stateless)", n1.log)
        self.assertEqual(audited(n2), [])
        self.assertNotIn("opened on everything", n2.log)
        self.assertEqual(n2.sessions(), set())

        # The state was used: the same retry again is refused.
        status, again = post(n2, dict(retry, id=3))
        self.assertEqual((status, again["error"]["code"]), (400, -32602), again)
        self.assertEqual(len(audited(n1)), 2)

        # A call waiting on n1 when n1 dies: its retry is refused, and the
        # client told to send the request again without the state.
        status, second = post(n1, call(4))
        parked = second["result"]
        self.assertEqual(parked["resultType"], "input_required", second)
        n1.kill()
        retry = call(5, inputResponses=accepted(parked), requestState=parked["requestState"])
        status, lost = post(n2, retry)
        self.assertEqual((status, lost["id"], lost["error"]["code"]), (400, 5, -32602), lost)
        self.assertIn("send the request again without it", lost["error"]["message"])
        # Sent again whole, the call starts over on n2.
        status, anew = post(n2, call(6))
        self.assertEqual(anew["result"]["resultType"], "input_required", anew)
        self.assertTrue(anew["result"]["requestState"].startswith("n2."), anew)


LONG = "trigger-long-running-operation"
TASKS = {"extensions": {"io.modelcontextprotocol/tasks": {}}}


def read_events(response: http.client.HTTPResponse, until: float) -> list[dict[str, Any]]:
    """The JSON-RPC messages of an SSE response, read until a task ends or C{until}."""
    seen: list[dict[str, Any]] = []
    data: list[str] = []
    while time.monotonic() < until:
        line = response.readline().decode()
        if not line:
            break
        line = line.rstrip("\r\n")
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            seen.append(json.loads("\n".join(data)))
            data = []
            params = seen[-1].get("params", {})
            if params.get("status") in ("completed", "failed", "cancelled"):
                break
    return seen


class TaskListenTests(SynchronousTestCase):
    def test_a_task_followed_from_another_node(self) -> None:
        """A listen stream opened on n2 for a task held on n1 agrees it, and
        carries its states, working then completed (with its result), as n1
        sends them."""
        cluster = cs.start_cluster(
            self,
            size=2,
            balancer=False,
            servers=h.everything_server_toml(extra=f'task_tools = ["{LONG}"]'),
        )
        n1, n2 = cluster.nodes
        # server-everything asks its client for roots 350 ms after it starts:
        # its child is started first, so that the task is not what it asks.
        status, listed = post(n1, messages.modern(0, "tools/list", {}, caps=TASKS))
        self.assertEqual(status, 200, listed)
        time.sleep(1.0)
        message = messages.modern(
            1, "tools/call", {"name": LONG, "arguments": {"duration": 3, "steps": 3}}, caps=TASKS
        )
        status, created = post(n1, message)
        self.assertEqual((status, created["result"]["resultType"]), (200, "task"), created)
        task_id = created["result"]["taskId"]
        self.assertTrue(task_id.startswith("n1."), task_id)

        listen = messages.modern(
            "L", "subscriptions/listen", {"notifications": {"taskIds": [task_id]}}, caps=TASKS
        )
        address = urllib.parse.urlsplit(n2.base)
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
        self.addCleanup(connection.close)
        connection.request(
            "POST",
            "/servers/everything/mcp",
            json.dumps(listen).encode(),
            messages.headers(listen),
        )
        response = connection.getresponse()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.getheader("content-type"), "text/event-stream")
        seen = read_events(response, time.monotonic() + 30)
        ack, *notes = seen
        self.assertEqual(ack["method"], "notifications/subscriptions/acknowledged", seen)
        self.assertEqual(ack["params"]["notifications"], {"taskIds": [task_id]}, seen)
        self.assertEqual({m["method"] for m in notes}, {"notifications/tasks"}, seen)
        self.assertEqual(
            [(m["params"]["taskId"], m["params"]["status"]) for m in notes],
            [(task_id, "working"), (task_id, "completed")],
            seen,
        )
        final = notes[-1]["params"]
        self.assertEqual(final["_meta"], {"io.modelcontextprotocol/subscriptionId": "L"})
        self.assertIn("Long running operation completed", final["result"]["content"][0]["text"])
