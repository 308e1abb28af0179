"""The per-request task list and the one context variable that carries it.

The middleware puts a fresh `RequestTasks` in the variable before it calls the app.
Everything the app runs inherits that same object (tasks, threads, sync views), so
`add_task()` only ever appends to it and never has to `.set()` anything: a `.set()`
made inside a framework's worker thread or child task would be invisible to us.

Each task runs in a snapshot of its caller's context. `contextvars.copy_context()` is
exactly that snapshot and the cheapest one; contextvars-extras' `bind_to_snapshot_context`
costs many times more per call (docs/benchmarks.md), too much for the request path, so
it is not used for that. Its sandbox serves the WSGI middleware (`sandboxed`). This is the only
module that imports contextvars-extras.
"""

from __future__ import annotations

import enum
import os
import threading
from contextvars import Context, ContextVar, copy_context
from typing import TYPE_CHECKING, ParamSpec, Protocol, TypeVar, cast

from contextvars_extras.context_management import bind_to_sandbox_context

from ._errors import RequestFinishedError, TaskLimitError
from ._text import escape

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from ._dispatch import Dispatchers
    from ._journal import Recorder
    from ._task import Stats, TaskHandle

__all__ = [
    "Capture",
    "Phase",
    "RequestTasks",
    "activate",
    "captures",
    "current",
    "deactivate",
    "sandboxed",
    "snapshot",
]


class Phase(enum.Enum):
    """Where a request is in its life, as far as its task list is concerned."""

    COLLECTING = "collecting"  # the app is running: add_task() appends
    DRAINING = "draining"  # the tasks are running: add_task() appends to the same drain
    CLOSED = "closed"  # all done: add_task() is an error


# Guards the hand-over between add_task() (from any thread a request left behind) and the
# end of a drain: a task is either seen by the drain or refused, never left pending.
_lock = threading.Lock()


def _new_lock_after_fork() -> None:
    """A fork taken while another thread held the lock (a task calling add_task(), say)
    would leave it held for ever in the child, whose every request then hangs."""
    global _lock  # noqa: PLW0603  (rebound in a forked child only)
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_after_fork)


class RequestTasks:
    """The tasks one request added, in order, and the phase the request is in.

    Only this object changes its phase and its list. It keeps the request's method and
    path, not its scope, so tasks waiting to run do not keep whole requests alive. They
    are kept raw (as the client sent them, decoded by the server) for structured log
    fields; `label` is their escaped form for messages.
    """

    __slots__ = (
        "dispatchers",
        "journal",
        "keyed",
        "limit",
        "method",
        "next",
        "path",
        "phase",
        "stats",
        "tasks",
    )

    def __init__(
        self,
        limit: int,
        method: str,
        path: str,
        stats: Stats,
        dispatchers: Dispatchers | None = None,
    ) -> None:
        # Empty until the first task, then a list made for it: `[task]` holds one slot
        # (32 B less than appending to `[]`), and a request without tasks makes no list.
        self.tasks: list[TaskHandle] | tuple[()] = ()
        self.next = 0  # the index of the next task to run
        self.limit = limit
        self.phase = Phase.COLLECTING
        self.method = method
        self.path = path
        self.stats = stats
        self.dispatchers = dispatchers  # how tasks are handed to a queue (post_response.celery)
        self.keyed: dict[str, TaskHandle] | None = None  # the last task given each key
        self.journal: Recorder | None = None  # set by a middleware with `journal=`

    @property
    def label(self) -> str:
        """The request as logs name it: `GET /path` or `WEBSOCKET /path`, with control
        characters escaped (they come from the client). Computed only when a message needs it."""
        return f"{escape(self.method)} {escape(self.path)}"

    def add(self, task: TaskHandle) -> None:
        """Append `task`, unless the request is closed or at its limit."""
        with _lock:
            if self.phase is Phase.CLOSED:
                msg = (
                    f"add_task({task.name!r}) was called after the tasks of {self.label} had "
                    "all run, so nothing would ever run this one. Call add_task() while the "
                    "request or one of its tasks is still running."
                )
                raise RequestFinishedError(msg)
            if len(self.tasks) >= self.limit:
                msg = (
                    f"{self.label} already added {self.limit} tasks, the `max_tasks` limit of "
                    f"PostResponseMiddleware, so {task.name!r} was not added. A task that keeps "
                    "adding itself is the usual cause; otherwise raise the limit with "
                    "`PostResponseMiddleware(app, max_tasks=...)`."
                )
                raise TaskLimitError(msg)
            tasks = self.tasks
            if tasks:
                tasks.append(task)
            else:
                self.tasks = [task]

    def keep_last(self, task: TaskHandle, key: str) -> TaskHandle | None:
        """Note `task` as the request's last task with `key`; return the one before it."""
        with _lock:
            keyed = self.keyed
            if keyed is None:
                keyed = self.keyed = {}
            earlier = keyed.get(key)
            keyed[key] = task
        return None if earlier is task else earlier

    def with_key(self, key: str) -> list[TaskHandle]:
        """The request's tasks with `key`, in order."""
        with _lock:
            return [task for task in self.tasks if task.key == key]

    def drain(self) -> None:
        """The response is over: tasks added from now on join the running drain."""
        self.phase = Phase.DRAINING

    def take(self, *, close: bool) -> TaskHandle | None:
        """The next task not yet taken, in the order they were added; or None, and then,
        with `close`, the request is closed in the same step (no add_task() slips between)."""
        tasks, taken = self.tasks, self.next
        if taken < len(tasks):  # only the drain takes: no lock needed to move on
            self.next = taken + 1
            return tasks[taken]
        with _lock:
            if self.next < len(tasks):
                self.next += 1
                return tasks[self.next - 1]
            if close:
                self._close()
            return None

    def close_if_done(self) -> bool:
        """Close the request unless tasks were added that no one has taken yet."""
        with _lock:
            if self.next < len(self.tasks):
                return False
            self._close()
            return True

    def close(self) -> Sequence[TaskHandle]:
        """Accept no more tasks; return those never taken."""
        with _lock:
            left = self.tasks[self.next :]
            self._close()
            return left

    def _close(self) -> None:
        # Each task's context snapshot refers back to this object; holding on to the tasks
        # would leave every request that added one as a reference cycle for the garbage
        # collector, instead of being freed as soon as the last task ends.
        self.phase = Phase.CLOSED
        self.tasks = ()
        self.next = 0
        self.keyed = None


_current: ContextVar[RequestTasks | None] = ContextVar("post_response.tasks", default=None)


class Capture(Protocol):
    """What `post_response.testing.capture_tasks()` records tasks into."""

    # Stands in for a request for add_task() called outside any (Django's test client,
    # a view called directly); the tasks of requests the middleware handles join its list.
    request: RequestTasks

    def take_over(self, request: RequestTasks, skip_reason: str | None) -> None:
        """Record a finished request's tasks that its outcome lets run; skip the others."""


# Active captures, innermost last. Process-wide, not per context: test clients run the
# app in threads and event loops of their own.
captures: list[Capture] = []

current = _current.get  # -> the running request's tasks, or None outside any request
activate = _current.set  # -> a token for deactivate()
deactivate = _current.reset
snapshot: Callable[[], Context] = copy_context  # the caller's context, frozen for a task

_P = ParamSpec("_P")
_R = TypeVar("_R")


def sandboxed(func: Callable[_P, _R]) -> Callable[_P, _R]:
    """`func`, run at each call in a fresh copy of the caller's context: what it sets stays
    in that call (a WSGI server thread serves request after request in one context)."""
    return cast("Callable[_P, _R]", bind_to_sandbox_context(func))
