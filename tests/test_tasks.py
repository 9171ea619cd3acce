"""Durable tasks (the tasks extension of 2026-07-28) served by the bridge for
any child: lifecycle, bounds and expiry, cancellation, principals, status
notifications."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.config.model import AuthConfig, ServerConfig, TasksConfig, TokenConfig
from mcptwist.mcp import era, jsonrpc
from mcptwist.mcp.jsonrpc import Message
from mcptwist.routing.tasks import TaskLimit, TaskStore, task_support, timestamp
from mcptwist.security.auth import hash_token

from .support.bridge import Bridge, Client
from .support.messages import events, modern
from .support.modern import ModernReactor

TASKS = {"extensions": {era.TASKS_EXTENSION: {}}}
ALICE, BOB = "Bearer mcpt_alice", "Bearer mcpt_bob"


def slow(id: int, caps: dict[str, Any] | None = None) -> Message:
    return modern(
        id, "tools/call", {"name": "slow", "arguments": {"n": id}}, TASKS if caps is None else caps
    )


def task_request(id: int, method: str, task_id: str, **params: Any) -> Message:
    return modern(id, method, {"taskId": task_id, **params}, TASKS)


class TaskStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = TaskStore(
            self.clock, TasksConfig(ttl=60, max_tasks=3, max_tasks_per_principal=2)
        )

    def test_envelope(self) -> None:
        task = self.store.create("alice", "s")
        created = self.store.created(task)
        self.assertEqual(created["resultType"], "task")
        self.assertEqual(created["status"], "working")
        self.assertEqual(created["ttlMs"], 60_000)
        self.assertEqual(created["pollIntervalMs"], 1000)
        self.assertEqual(created["createdAt"], "2023-11-14T22:13:20.000Z")
        self.assertEqual(timestamp(0.5), "1970-01-01T00:00:00.500Z")

    def test_principals_see_only_their_own(self) -> None:
        task = self.store.create("alice", "s")
        self.assertIs(self.store.find("alice", task.id), task)
        self.assertIsNone(self.store.find("bob", task.id))
        self.assertIsNone(self.store.find("alice", 5))

    def test_expiry(self) -> None:
        task = self.store.create("alice", "s")
        self.store.finish(task, "completed", result={"content": []})
        self.clock.advance(59)
        self.assertIs(self.store.find("alice", task.id), task)
        self.clock.advance(1)
        self.assertEqual(len(self.store), 0)
        self.assertIsNone(self.store.find("alice", task.id))

    def test_bounds_push_out_finished_tasks_then_refuse(self) -> None:
        first = self.store.create("alice", "s")
        self.store.create("alice", "s")
        with self.assertRaises(TaskLimit):
            self.store.create("alice", "s")  # both running
        self.store.finish(first, "completed", result={})
        self.store.create("alice", "s")
        self.assertIsNone(self.store.find("alice", first.id))
        self.store.create("bob", "s")  # 3 tasks: the bridge is full of running ones
        with self.assertRaises(TaskLimit):
            self.store.create("carol", "s")

    def test_task_support(self) -> None:
        tools = [
            {"name": "a", "execution": {"taskSupport": "required"}},
            {"name": "b", "execution": {"taskSupport": "forbidden"}},
            {"name": "c"},
        ]
        by_name = {t["name"]: t for t in tools}
        self.assertEqual(task_support(by_name["a"], "a", ()), "required")
        self.assertEqual(task_support(by_name["b"], "b", ()), "forbidden")
        self.assertEqual(task_support(by_name["b"], "b", ("b*",)), "optional")
        self.assertEqual(task_support(by_name["c"], "c", ("c*",)), "optional")
        self.assertEqual(task_support(by_name["c"], "c", ()), "forbidden")
        self.assertEqual(task_support(None, "x", ()), "forbidden")


class TaskFlowTests(SynchronousTestCase):
    """Through the HTTP surface, over a fake session-era child."""

    def setUp(self) -> None:
        tokens = tuple(
            TokenConfig(name, hash_token(f"mcpt_{name}"), frozenset({"*"}))
            for name in ("alice", "bob")
        )
        server = ServerConfig(name="s", command="fake", task_tools=("slow",))
        self.client = Client(
            Bridge(
                self,
                server,
                hold=True,
                auth=AuthConfig(tokens=tokens),
                tasks=TasksConfig(ttl=600, max_result_size=200),
            )
        )

    def post(self, message: Message, who: str = ALICE) -> tuple[int, Any]:
        return self.client.post(message, accept="application/json", authorization=who)

    def create(self, id: int = 1) -> str:
        status, body = self.post(slow(id))
        self.assertEqual(status, 200, body)
        self.assertEqual(body["result"]["resultType"], "task")
        return str(body["result"]["taskId"])

    def get(self, task_id: str, who: str = ALICE) -> Any:
        return self.post(task_request(9, "tasks/get", task_id), who)[1]

    def test_lifecycle(self) -> None:
        task_id = self.create()
        self.assertEqual(self.get(task_id)["result"]["status"], "working")
        self.client.child.answer(self.client.held("tools/call"))
        result = self.get(task_id)["result"]
        self.assertEqual((result["status"], result["resultType"]), ("completed", "complete"))
        self.assertEqual(result["result"]["content"][0]["text"], "{'n': 1}")

    def test_a_client_without_the_extension_gets_a_plain_call(self) -> None:
        d = self.client.start(slow(1, caps={}), accept="application/json", authorization=ALICE)
        self.client.child.answer(self.client.held("tools/call"))
        status, body = self.client.finish(d)
        self.assertNotIn("taskId", body["result"])
        status, body = self.post(modern(2, "tasks/get", {"taskId": "x"}, {}))
        self.assertEqual((status, body["error"]["code"]), (400, jsonrpc.MISSING_CAPABILITY))

    def test_the_child_runs_the_call_without_the_extension(self) -> None:
        self.create()
        held = self.client.held("tools/call")
        self.assertNotIn("_meta", held["params"])

    def test_cancel_reaches_the_child(self) -> None:
        task_id = self.create()
        held = self.client.held("tools/call")
        _, body = self.post(task_request(2, "tasks/cancel", task_id))
        self.assertEqual(body["result"], {"resultType": "complete"})
        [cancelled] = self.client.child.notifications("notifications/cancelled")
        self.assertEqual(cancelled["params"]["requestId"], held["id"])
        self.assertEqual(self.get(task_id)["result"]["status"], "cancelled")
        # A late answer changes nothing; a second cancel is the same ack.
        self.client.child.answer(held)
        self.assertEqual(self.get(task_id)["result"]["status"], "cancelled")
        self.assertEqual(
            self.post(task_request(3, "tasks/cancel", task_id))[1]["result"],
            {"resultType": "complete"},
        )

    def test_another_principal_can_neither_get_nor_cancel(self) -> None:
        task_id = self.create()
        for method in ("tasks/get", "tasks/cancel"):
            _, body = self.post(task_request(2, method, task_id), BOB)
            self.assertEqual(body["error"]["code"], jsonrpc.INVALID_PARAMS, method)
        self.assertEqual(self.client.child.notifications("notifications/cancelled"), [])
        self.assertEqual(self.get(task_id)["result"]["status"], "working")

    def test_survives_the_clients_disconnect(self) -> None:
        task_id = self.create()
        self.client.bridge.client.flush()  # the creating response is long closed
        self.client.child.answer(self.client.held("tools/call"))
        self.assertEqual(self.get(task_id)["result"]["status"], "completed")

    def test_an_error_fails_the_task_and_a_large_result_too(self) -> None:
        first, second = self.create(1), self.create(2)
        one, two = self.client.child.held
        self.client.child.send(jsonrpc.error(one["id"], -32603, "crashed"))
        self.client.child.send(jsonrpc.result(two["id"], {"content": [{"text": "x" * 300}]}))
        failed = self.get(first)["result"]
        self.assertEqual(failed["status"], "failed")
        self.assertEqual(failed["error"]["code"], -32603)
        self.assertNotIn("result", failed)
        self.assertIn("max_result_size", self.get(second)["result"]["error"]["message"])

    def test_removed_methods_and_unknown_tasks(self) -> None:
        for method in ("tasks/result", "tasks/list"):
            status, body = self.post(modern(1, method, {}, TASKS))
            self.assertEqual((status, body["error"]["code"]), (404, jsonrpc.METHOD_NOT_FOUND))
        self.assertEqual(self.get("nope")["error"]["code"], jsonrpc.INVALID_PARAMS)

    def test_discover_names_the_extension(self) -> None:
        _, body = self.post(modern(1, "server/discover"))
        self.assertIn(era.TASKS_EXTENSION, body["result"]["capabilities"]["extensions"])


def ask(id: str, text: str) -> Message:
    """The child's elicitation, as a session-era child sends it (no link to a request)."""
    return jsonrpc.request(id, "elicitation/create", {"message": text, "requestedSchema": {}})


class QuestionsAfterACancelTests(SynchronousTestCase):
    """Anonymous clients (one principal, as tasks see them): a task cancelled
    while its child may still ask, then another task that asks."""

    def setUp(self) -> None:
        server = ServerConfig(name="s", command="fake", task_tools=("slow",))
        self.client = Client(Bridge(self, server, hold=True, tasks=TasksConfig(ttl=600)))

    def post(self, message: Message) -> Any:
        status, body = self.client.post(message, accept="application/json")
        self.assertEqual(status, 200, body)
        return body["result"]

    def cancelled_task(self) -> None:
        task_id = self.post(slow(1))["taskId"]
        self.post(task_request(2, "tasks/cancel", task_id))
        [cancelled] = self.client.child.notifications("notifications/cancelled")
        self.assertEqual(cancelled["params"]["requestId"], self.client.child.held[0]["id"])

    def answers(self, id: str) -> list[Message]:
        return [m for m in self.client.child.received if "method" not in m and m.get("id") == id]

    def test_another_task_of_the_principal_is_asked(self) -> None:
        """The cancelled task's principal is the only one who could read its
        questions: the task that runs now gets the question, and its answer."""
        self.cancelled_task()
        task_id = self.post(slow(3, {"elicitation": {}, **TASKS}))["taskId"]
        self.client.child.send(ask("q", "Delete it?"))
        self.client.bridge.reactor.advance(1)
        waiting = self.post(task_request(4, "tasks/get", task_id))
        self.assertEqual(waiting["status"], "input_required")
        [(key, question)] = waiting["inputRequests"].items()
        self.assertEqual(question["params"]["message"], "Delete it?")
        answer = {"action": "accept", "content": {"confirm": True}}
        self.post(task_request(5, "tasks/update", task_id, inputResponses={key: answer}))
        [answered] = self.answers("q")
        self.assertEqual(answered["result"], answer)
        self.assertEqual(self.post(task_request(6, "tasks/get", task_id))["status"], "working")

    def test_a_plain_call_is_not_asked(self) -> None:
        """A call that is not a task answers its own client, who may be anyone:
        the cancelled task's question might reach the wrong person."""
        self.cancelled_task()
        d = self.client.start(modern(3, "tools/call", {"name": "echo"}, {"elicitation": {}}))
        self.client.child.send(ask("q", "Delete it?"))
        [refused] = self.answers("q")
        self.assertIn("cannot tell which", refused["error"]["message"])
        self.client.child.answer(self.client.child.held[-1])
        self.assertEqual(self.client.finish(d)[0], 200)

    def test_an_abandoned_plain_call_blurs_the_picture_for_tasks_too(self) -> None:
        """The HTTP client of a plain call went away: its question must not land
        in a task (the tasks' principal is every anonymous client)."""
        d = self.client.start(
            modern(1, "tools/call", {"name": "echo"}, {"elicitation": {}}),
            accept="application/json",
        )
        self.client.hang_up()
        self.failureResultOf(d)
        task_id = self.post(slow(3))["taskId"]
        self.client.child.send(ask("q", "Delete it?"))
        [refused] = self.answers("q")
        self.assertIn("cannot tell which", refused["error"]["message"])
        self.assertEqual(self.post(task_request(4, "tasks/get", task_id))["status"], "working")


class TaskAfterInputTests(SynchronousTestCase):
    """A tool named in C{task_after_input}: its first round asks the client,
    the retry that answers becomes a task."""

    def setUp(self) -> None:
        server = ServerConfig(
            name="s", command="fake", task_tools=("ask", "slow"), task_after_input=("ask",)
        )
        self.client = Client(Bridge(self, server, hold=True, tasks=TasksConfig(ttl=600)))
        self.caps = {"elicitation": {}, **TASKS}

    def test_asks_first_then_runs_as_a_task(self) -> None:
        # A task cancelled just before, whose child may still ask, changes nothing:
        # the first rounds ask the client that will own the task.
        _, body = self.client.post(slow(9), accept="application/json")
        self.client.post(
            task_request(8, "tasks/cancel", body["result"]["taskId"]), accept="application/json"
        )
        d = self.client.start(
            modern(1, "tools/call", {"name": "ask"}, self.caps), accept="application/json"
        )
        self.client.child.send(ask("q", "Your name?"))
        self.client.bridge.reactor.advance(1)
        status, body = self.client.finish(d)
        first = body["result"]
        self.assertEqual((status, first["resultType"]), (200, "input_required"))
        self.assertNotIn("taskId", first)
        [key] = first["inputRequests"]
        answer = {"action": "accept", "content": {"name": "Alice"}}
        retry = modern(
            2,
            "tools/call",
            {"name": "ask", "inputResponses": {key: answer}, "requestState": first["requestState"]},
            self.caps,
        )
        status, body = self.client.post(retry, accept="application/json")
        created = body["result"]
        self.assertEqual((status, created["resultType"]), (200, "task"))
        self.assertNotIn("requestState", created)
        [answered] = [m for m in self.client.child.received if m.get("id") == "q"]
        self.assertEqual(answered["result"], answer)
        self.client.child.answer(self.client.child.held[-1])
        _, body = self.client.post(
            task_request(3, "tasks/get", created["taskId"]), accept="application/json"
        )
        self.assertEqual(body["result"]["status"], "completed")

    def test_without_the_extension_the_retry_is_a_plain_round(self) -> None:
        caps = {"elicitation": {}}
        d = self.client.start(
            modern(1, "tools/call", {"name": "ask"}, caps), accept="application/json"
        )
        self.client.child.send(ask("q", "Your name?"))
        self.client.bridge.reactor.advance(1)
        first = self.client.finish(d)[1]["result"]
        [key] = first["inputRequests"]
        retry = modern(
            2,
            "tools/call",
            {
                "name": "ask",
                "inputResponses": {key: {"action": "decline"}},
                "requestState": first["requestState"],
            },
            caps,
        )
        d = self.client.start(retry, accept="application/json")
        self.client.child.answer(self.client.held("tools/call"))
        status, body = self.client.finish(d)
        self.assertEqual((status, body["result"]["resultType"]), (200, "complete"))


class TaskNotificationTests(SynchronousTestCase):
    """C{notifications/tasks} on a C{subscriptions/listen} stream whose filter
    names task ids (SEP-2663, "Task Status Notifications")."""

    def setUp(self) -> None:
        tokens = tuple(
            TokenConfig(name, hash_token(f"mcpt_{name}"), frozenset({"*"}))
            for name in ("alice", "bob")
        )
        server = ServerConfig(name="s", command="fake", task_tools=("slow",))
        self.client = Client(
            Bridge(
                self, server, hold=True, auth=AuthConfig(tokens=tokens), tasks=TasksConfig(ttl=600)
            )
        )

    def post(self, message: Message, who: str = ALICE) -> Any:
        status, body = self.client.post(message, accept="application/json", authorization=who)
        self.assertEqual(status, 200, body)
        return body["result"]

    def listen(self, task_ids: list[str], who: str = ALICE) -> list[bytes]:
        message = modern(
            "L", "subscriptions/listen", {"notifications": {"taskIds": task_ids}}, TASKS
        )
        response = self.successResultOf(self.client.start(message, authorization=who))
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/event-stream"])
        return self.client.bridge.stream(response)

    def seen(self, chunks: list[bytes]) -> list[Message]:
        self.client.bridge.client.flush()
        return [m for m in events(chunks) if m["method"] == "notifications/tasks"]

    def test_working_input_required_completed(self) -> None:
        task_id = self.post(slow(1, {"elicitation": {}, **TASKS}))["taskId"]
        chunks = self.listen([task_id, "unknown"])
        [ack] = [m for m in events(chunks) if m["method"].endswith("acknowledged")]
        self.assertEqual(ack["params"]["notifications"], {"taskIds": [task_id]})
        self.client.child.send(ask("q", "Delete it?"))
        self.client.bridge.reactor.advance(1)
        [key] = self.seen(chunks)[-1]["params"]["inputRequests"]
        answer = {"action": "accept", "content": {"confirm": True}}
        self.post(task_request(2, "tasks/update", task_id, inputResponses={key: answer}))
        self.client.child.answer(self.client.held("tools/call"))
        seen = self.seen(chunks)
        self.assertEqual(
            [m["params"]["status"] for m in seen],
            ["working", "input_required", "working", "completed"],
        )
        last = seen[-1]["params"]
        self.assertEqual(last["taskId"], task_id)
        self.assertEqual(last["_meta"], {era.META_SUBSCRIPTION: "L"})
        self.assertNotIn("resultType", last)
        # The task as tasks/get shows it.
        got = self.post(task_request(3, "tasks/get", task_id))
        del got["resultType"]
        self.assertEqual({k: v for k, v in last.items() if k != "_meta"}, got)

    def test_cancelled(self) -> None:
        task_id = self.post(slow(1))["taskId"]
        chunks = self.listen([task_id])
        self.post(task_request(2, "tasks/cancel", task_id))
        self.client.child.answer(self.client.held("tools/call"))  # too late: nothing more
        seen = self.seen(chunks)
        self.assertEqual([m["params"]["status"] for m in seen], ["working", "cancelled"])
        self.assertEqual(seen[-1]["params"]["statusMessage"], "the client cancelled the task")

    def test_a_closed_stream_stops_following_and_the_task_goes_on(self) -> None:
        task_id = self.post(slow(1))["taskId"]
        chunks = self.listen([task_id])
        streams = [c for c in self.client.bridge.app.heartbeat.connections if c.label == "s listen"]
        streams[0].request.channel.transport.loseConnection()
        self.client.bridge.client.flush()
        self.client.child.answer(self.client.held("tools/call"))
        self.assertEqual([m["params"]["status"] for m in self.seen(chunks)], ["working"])
        self.assertEqual(self.post(task_request(2, "tasks/get", task_id))["status"], "completed")

    def test_another_principal_gets_nothing(self) -> None:
        task_id = self.post(slow(1))["taskId"]
        chunks = self.listen([task_id], BOB)
        [ack] = events(chunks)
        self.assertEqual(ack["params"]["notifications"], {})
        self.client.child.answer(self.client.held("tools/call"))
        self.assertEqual(self.seen(chunks), [])

    def test_json_tasks_get_is_unchanged_and_the_extension_is_required(self) -> None:
        task_id = self.post(slow(1))["taskId"]
        status, body = self.client.post(task_request(2, "tasks/get", task_id), authorization=ALICE)
        self.assertEqual((status, body["result"]["status"]), (200, "working"))
        message = modern("L", "subscriptions/listen", {"notifications": {"taskIds": [task_id]}})
        status, body = self.client.post(message, authorization=ALICE)
        self.assertEqual((status, body["error"]["code"]), (400, jsonrpc.MISSING_CAPABILITY))


class ModernChildTaskNotificationTests(SynchronousTestCase):
    """A server whose child speaks 2026-07-28: the listen stream is the
    child's, and the bridge's task notifications are merged into it."""

    def setUp(self) -> None:
        server = ServerConfig(name="s", command="fake", era="modern", task_tools=("slow",))
        bridge = Bridge(self, server, reactor=ModernReactor(), tasks=TasksConfig(ttl=600))
        self.client = Client(bridge)

    def test_the_childs_stream_carries_the_tasks(self) -> None:
        status, body = self.client.post(slow(1), accept="application/json")
        self.assertEqual(status, 200, body)
        task_id = body["result"]["taskId"]
        wanted = {"toolsListChanged": True, "taskIds": [task_id, "unknown"]}
        message = modern("L", "subscriptions/listen", {"notifications": wanted}, TASKS)
        d = self.client.start(message)
        listen = self.client.held("subscriptions/listen")
        self.assertEqual(listen["params"]["notifications"], {"toolsListChanged": True})
        self.assertNoResult(d)  # the stream opens with the child's acknowledgement
        child = self.client.child
        subscription = {era.META_SUBSCRIPTION: listen["id"]}
        child.send(
            jsonrpc.notification(
                "notifications/subscriptions/acknowledged",
                {"notifications": {"toolsListChanged": True}, "_meta": subscription},
            )
        )
        self.client.bridge.client.flush()
        chunks = self.client.bridge.stream(self.successResultOf(d))
        child.send(
            jsonrpc.notification("notifications/tools/list_changed", {"_meta": subscription})
        )
        child.send(jsonrpc.result(self.client.held("tools/call")["id"], {"content": []}))
        self.client.bridge.client.flush()
        seen = [(m["method"], m["params"]) for m in events(chunks)]
        ack, working, changed, completed = seen
        self.assertEqual(ack[1]["notifications"], {"toolsListChanged": True, "taskIds": [task_id]})
        self.assertEqual(ack[1]["_meta"], {era.META_SUBSCRIPTION: "L"})
        self.assertEqual((working[0], working[1]["status"]), ("notifications/tasks", "working"))
        self.assertEqual(changed[0], "notifications/tools/list_changed")
        self.assertEqual(completed[1]["status"], "completed")
        self.assertEqual(completed[1]["_meta"], {era.META_SUBSCRIPTION: "L"})
