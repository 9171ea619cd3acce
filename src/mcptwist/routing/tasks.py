# -*- test-case-name: tests.test_tasks -*-
"""Durable tasks: the C{io.modelcontextprotocol/tasks} extension (SEP-2663).

A 2026-07-28 client that declares the extension gets a C{tools/call} of a
task-supporting tool answered at once with a task; the call runs on in the
child as a L{ModernCall} whose responder is the task (L{TaskRun}), not an
HTTP response, so the task outlives the client's connection. The client
looks at it with C{tasks/get} (the result or error inlined once it ends),
answers the child's questions with C{tasks/update}, and stops it with
C{tasks/cancel}, which reaches the child as C{notifications/cancelled}.

A task belongs to the principal that created it: no other finds it. Tasks
live in this process's memory: they survive the client's disconnect, not a
restart of the bridge, and in a cluster a task lives on the node that
accepted it. Each is kept C{ttl} seconds from its creation (a task still
running then is cancelled); the store holds at most C{max_tasks}, and
C{max_tasks_per_principal} for one principal (a new task pushes out the
oldest finished one, or is refused when all are running); a result larger
than C{max_result_size} fails its task.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, Final

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mcptwist.config.model import TasksConfig
from mcptwist.mcp import jsonrpc
from mcptwist.mcp.jsonrpc import Message

if TYPE_CHECKING:
    from mcptwist.routing.record import Status
    from mcptwist.routing.stateless import ModernCall

log = Logger(namespace="mcptwist.tasks")

WORKING: Final = "working"
INPUT_REQUIRED: Final = "input_required"
COMPLETED: Final = "completed"
FAILED: Final = "failed"
CANCELLED: Final = "cancelled"
TERMINAL: Final = frozenset({COMPLETED, FAILED, CANCELLED})
# How a tool may run, as its definition's execution.taskSupport says.
TASK_SUPPORT: Final = frozenset({"forbidden", "optional", "required"})
# The longest a store waits between two sweeps of expired tasks.
SWEEP_EVERY: Final = 60.0


class TaskLimit(Exception):
    """No task can be created now: the store is full of running tasks."""


def task_support(tool: Mapping[str, Any] | None, name: str, globs: Iterable[str]) -> str:
    """How tool C{name} may run: C{"required"} or C{"optional"} as its
    definition (C{tool}, if the child lists it) declares
    (C{execution.taskSupport}), C{"optional"} when the operator named it in
    C{task_tools}, otherwise C{"forbidden"}."""
    if tool is not None:
        execution = tool.get("execution")
        support = execution.get("taskSupport") if isinstance(execution, dict) else None
        if support in ("optional", "required"):
            return str(support)
    if any(fnmatchcase(name, glob) for glob in globs):
        return "optional"
    return "forbidden"


def timestamp(seconds: float) -> str:
    """An ISO 8601 time in UTC, to the millisecond."""
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class Task:
    """One task: who owns it, where it stands, and how it ended."""

    def __init__(self, task_id: str, principal: str, server: str, now: float, ttl: float) -> None:
        self.id = task_id
        self.principal = principal
        self.server = server
        self.status = WORKING
        self.created = self.updated = now
        self.expires = now + ttl
        self.ttl = ttl
        self.status_message: str | None = None
        self.result: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        # The child's questions while the task waits for its client.
        self.input_requests: dict[str, Any] | None = None
        # The call that does the work, while it runs.
        self.call: ModernCall | None = None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


class TaskRun:
    """The responder of a task's call: what the call answers goes into the task."""

    def __init__(self, store: TaskStore, task: Task) -> None:
        self.store = store
        self.task = task

    def notify(self, message: Message) -> None:
        """Progress and log lines have no one to reach: a task is looked at, not followed."""

    def answer(self, message: Message, status: int = 200) -> None:
        task = self.task
        if task.finished:
            return
        error = message.get("error")
        if isinstance(error, dict):
            self.store.finish(task, FAILED, error=_error_shape(error))
            return
        result = message.get("result")
        result = result if isinstance(result, dict) else {}
        if result.get("resultType") == INPUT_REQUIRED:
            requests = result.get("inputRequests")
            self.store.touch(task, INPUT_REQUIRED)
            task.input_requests = dict(requests) if isinstance(requests, dict) else {}
            self.store.changed(task)
            return
        size = len(jsonrpc.dumps(result))
        limit = self.store.config.max_result_size
        if size > limit:
            self.store.finish(
                task,
                FAILED,
                error={
                    "code": jsonrpc.INTERNAL_ERROR,
                    "message": f"the result ({size} bytes) is larger than the bridge keeps "
                    f"for a task ({limit} bytes, max_result_size)",
                },
            )
            return
        self.store.finish(task, COMPLETED, result=result)

    def ended(self, status: Status) -> None:
        """The call ended: a task it did not answer ends with it."""
        task = self.task
        task.call = None
        if task.finished:
            return
        if status == "cancelled":
            self.store.finish(task, CANCELLED)
        elif status == "timeout":
            self.store.finish(
                task,
                FAILED,
                error={"code": jsonrpc.REQUEST_TIMEOUT, "message": "the call timed out"},
            )
        else:
            self.store.finish(
                task,
                FAILED,
                error={
                    "code": jsonrpc.INTERNAL_ERROR,
                    "message": "the call ended without a result",
                },
            )


def _error_shape(error: dict[str, Any]) -> dict[str, Any]:
    code = error.get("code")
    text = error.get("message")
    shaped: dict[str, Any] = {
        "code": code if isinstance(code, int) and not isinstance(code, bool) else -32603,
        "message": text if isinstance(text, str) else "Error",
    }
    if "data" in error:
        shaped["data"] = error["data"]
    return shaped


class TaskStore:
    """Every task of this bridge, by id, bounded in count, size and time."""

    def __init__(self, clock: IReactorTime, config: TasksConfig, node: str | None = None) -> None:
        self.clock = clock
        self.config = config
        # In a cluster, this node's id: every task id starts with it (NODE.RANDOM),
        # so that any node can tell where a task lives.
        self.node = node
        self._tasks: dict[str, Task] = {}
        self._by_principal: dict[str, dict[str, Task]] = {}
        self._sweep: IDelayedCall | None = None
        # Who follows a task's status (a listen stream), by task id.
        self._watchers: dict[str, list[Callable[[Task], None]]] = {}

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def configure(self, config: TasksConfig) -> None:
        """New settings (a reload): they bound new tasks; the tasks held keep their ttl."""
        self.config = config

    def __len__(self) -> int:
        return len(self._tasks)

    def create(self, principal: str, server: str) -> Task:
        """A new working task of this principal's, or L{TaskLimit}."""
        self.expire()
        mine = self._by_principal.get(principal, {})
        if len(mine) >= self.config.max_tasks_per_principal:
            self._make_room(
                mine.values(),
                f"this client holds {len(mine)} tasks, all running (max_tasks_per_principal)",
            )
        if len(self._tasks) >= self.config.max_tasks:
            self._make_room(
                self._tasks.values(), f"the bridge holds {len(self._tasks)} running tasks"
            )
        now = self.clock.seconds()
        random = secrets.token_urlsafe(18)
        task_id = f"{self.node}.{random}" if self.node is not None else random
        task = Task(task_id, principal, server, now, self.config.ttl)
        self._tasks[task.id] = task
        self._by_principal.setdefault(principal, {})[task.id] = task
        self._schedule()
        return task

    def _make_room(self, tasks: Iterable[Task], why: str) -> None:
        """Drop the oldest finished task among these, or refuse."""
        for task in tasks:
            if task.finished:
                self._drop(task)
                return
        raise TaskLimit(f"no task can be created now: {why}")

    def find(self, principal: str, task_id: object) -> Task | None:
        """This principal's task of that id (None: unknown, expired, or another's)."""
        if not isinstance(task_id, str):
            return None
        task = self._tasks.get(task_id)
        if task is None or task.principal != principal:
            return None
        if task.expires <= self.clock.seconds():
            self._expire(task)
            return None
        return task

    def run(self, task: Task, call: ModernCall) -> TaskRun:
        """Tie a task to the call that does its work (before the call starts)."""
        run = TaskRun(self, task)
        task.call = call
        call.in_task = True
        call.on_end = run.ended
        return run

    def touch(self, task: Task, status: str) -> None:
        task.status = status
        task.updated = self.clock.seconds()

    def finish(
        self,
        task: Task,
        status: str,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        if task.finished:
            return
        self.touch(task, status)
        task.result = result
        task.error = error
        task.input_requests = None
        self.changed(task)
        # A finished task changes no more.
        self._watchers.pop(task.id, None)

    def cancel(self, task: Task, why: str = "the client cancelled the task") -> None:
        """Stop a task that runs (the child hears C{notifications/cancelled});
        a finished task stays as it is."""
        if task.finished:
            return
        call = task.call
        task.status_message = why
        self.finish(task, CANCELLED)
        if call is not None and not call.ended:
            call.abandon(why)

    def update(self, task: Task, answers: dict[str, Any]) -> None:
        """The client's answers to the questions a task waits on; the task goes on
        (waiting again while some are still unanswered)."""
        call = task.call
        if task.status != INPUT_REQUIRED or call is None or call.ended:
            return
        self.touch(task, WORKING)
        task.input_requests = None
        self.changed(task)
        call.resume(self.run(task, call), call.request, answers, call.peer)

    def watch(self, task: Task, watcher: Callable[[Task], None]) -> None:
        """Call C{watcher} with the task at each change of its status, until it
        ends (a finished task has nothing more to tell)."""
        if not task.finished:
            self._watchers.setdefault(task.id, []).append(watcher)

    def unwatch(self, task_id: str, watcher: Callable[[Task], None]) -> None:
        """Stop calling C{watcher} (its stream closed); the task goes on."""
        watchers = self._watchers.get(task_id)
        if watchers is not None and watcher in watchers:
            watchers.remove(watcher)
            if not watchers:
                del self._watchers[task_id]

    def changed(self, task: Task) -> None:
        """Tell the task's watchers its new status."""
        for watcher in list(self._watchers.get(task.id, ())):
            try:
                watcher(task)
            except Exception:
                log.failure("telling a watcher of task {task} its status", task=task.id)

    def expire(self) -> None:
        """Drop every task past its time."""
        now = self.clock.seconds()
        for task in [t for t in self._tasks.values() if t.expires <= now]:
            self._expire(task)

    def _expire(self, task: Task) -> None:
        if not task.finished:
            log.info(
                "task {task} on {server} ran past its ttl ({ttl:g}s): cancelled",
                task=task.id,
                server=task.server,
                ttl=task.ttl,
            )
            self.cancel(task, "the task ran past its ttl")
        self._drop(task)

    def _drop(self, task: Task) -> None:
        self._tasks.pop(task.id, None)
        self._watchers.pop(task.id, None)
        mine = self._by_principal.get(task.principal)
        if mine is not None:
            mine.pop(task.id, None)
            if not mine:
                del self._by_principal[task.principal]

    def _schedule(self) -> None:
        if self._sweep is None and self._tasks:
            self._sweep = self.clock.callLater(min(self.config.ttl, SWEEP_EVERY), self._swept)

    def _swept(self) -> None:
        self._sweep = None
        self.expire()
        self._schedule()

    def stop(self) -> None:
        """No more sweeps (the bridge is stopping)."""
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None

    # What clients read

    def envelope(self, task: Task) -> dict[str, Any]:
        """The task's fields as the extension names them."""
        shown: dict[str, Any] = {
            "taskId": task.id,
            "status": task.status,
            "createdAt": timestamp(task.created),
            "lastUpdatedAt": timestamp(task.updated),
            "ttlMs": int(task.ttl * 1000),
            "pollIntervalMs": max(1, int(self.config.poll_interval * 1000)),
        }
        if task.status_message is not None:
            shown["statusMessage"] = task.status_message
        return shown

    def created(self, task: Task) -> dict[str, Any]:
        """The answer to the C{tools/call} that created the task (a C{CreateTaskResult})."""
        return {"resultType": "task", **self.envelope(task)}

    def detailed(self, task: Task) -> dict[str, Any]:
        """The answer to C{tasks/get}: the task, with its result, error or questions."""
        shown = {"resultType": "complete", **self.envelope(task)}
        if task.status == COMPLETED and task.result is not None:
            shown["result"] = task.result
        elif task.status == FAILED and task.error is not None:
            shown["error"] = task.error
        elif task.status == INPUT_REQUIRED and task.input_requests is not None:
            shown["inputRequests"] = task.input_requests
        return shown
