"""The per-request task list and the one context variable that carries it.

The middleware puts a fresh `RequestTasks` in the variable before it calls the app.
Everything the app runs inherits that same object (tasks, threads, sync views), so
`add_task()` only ever appends to it and never has to `.set()` anything: a `.set()`
made inside a framework's worker thread or child task would be invisible to us.

Each task runs in a snapshot of its caller's context. `contextvars.copy_context()` is
exactly that snapshot and costs ~0.05 µs; contextvars-extras' `bind_to_snapshot_context`
costs ~4 µs per call on this machine class, too much for the request path, so it is
not used for that. Its sandbox serves the WSGI middleware (`sandboxed`). This is the only
module that imports contextvars-extras.
"""

from __future__ import annotations

import enum
from contextvars import Context, ContextVar, copy_context
from typing import TYPE_CHECKING, ParamSpec, Protocol, TypeVar, cast

from contextvars_extras.context_management import bind_to_sandbox_context

if TYPE_CHECKING:
    from collections.abc import Callable

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


class RequestTasks:
    """The tasks one request added, in order, with what the logs need to name it.

    It keeps the request's method and path, not its scope, so tasks waiting to run do
    not keep whole requests alive.
    """

    __slots__ = ("celery_app", "limit", "method", "path", "phase", "stats", "tasks")

    def __init__(
        self, limit: int, method: str, path: str, stats: Stats, celery_app: object = None
    ) -> None:
        self.tasks: list[TaskHandle] = []
        self.limit = limit
        self.phase = Phase.COLLECTING
        self.method = method
        self.path = path
        self.stats = stats
        self.celery_app = celery_app  # the middleware's option (post_response.celery)

    def close(self) -> None:
        """Accept no more tasks, and let go of those it holds.

        Each task's context snapshot refers back to this object; holding on to the tasks
        would leave every request that added one as a reference cycle for the garbage
        collector, instead of being freed as soon as the last task ends.
        """
        self.phase = Phase.CLOSED
        self.tasks.clear()

    @property
    def label(self) -> str:
        """The request as logs name it: `GET /path` or `WEBSOCKET /path`."""
        return f"{self.method} {self.path}"


_current: ContextVar[RequestTasks | None] = ContextVar("post_response.tasks", default=None)


class Capture(Protocol):
    """What `post_response.testing.capture_tasks()` records tasks into."""

    # Stands in for a request for add_task() called outside any (Django's test client,
    # a view called directly); the tasks of requests the middleware handles join its list.
    request: RequestTasks


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
