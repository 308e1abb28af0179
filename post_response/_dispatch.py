"""Handing tasks to a queue instead of running them here: the dispatcher hook.

A dispatcher looks at each new task when `add_task()` is called and returns how to hand
it over (a zero-argument callable, called in a worker thread after the response), or
None to leave it to run here. `post_response.celery` is one; other queues plug in the
same way. Each middleware has its own `Dispatchers`, built from its options.
"""

from __future__ import annotations

import sys
from importlib import import_module
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._task import TaskHandle

__all__ = ["Dispatcher", "Dispatchers"]


class Dispatcher(Protocol):
    def __call__(self, task: TaskHandle) -> Callable[[], object] | None:
        """How to hand `task` to a queue, or None when it is not for this queue.

        Raise (a `TypeError`) when the task is for this queue but cannot travel: the
        error reaches the code that called `add_task()`.
        """


class Dispatchers:
    """The dispatchers of one middleware, asked in order.

    Celery's joins by itself once Celery has been imported, with the middleware's
    `celery_app` if it has one, so that a Celery task object (which is callable) is
    enqueued and never run in the web process by mistake.
    """

    __slots__ = ("_celery_app", "_chain")

    def __init__(self, celery_app: object = None) -> None:
        self._celery_app = celery_app
        self._chain: tuple[Dispatcher, ...] | None = None

    def route(self, task: TaskHandle) -> None:
        """Set the task's `dispatch` when a dispatcher takes the task."""
        chain = self._chain
        if chain is None:
            if "celery" not in sys.modules:  # the usual case: nothing to ask
                return
            chain = self._chain = (self._celery(),)
        for dispatcher in chain:
            dispatch = dispatcher(task)
            if dispatch is not None:
                task._planned().dispatch = dispatch
                return

    def _celery(self) -> Dispatcher:
        celery: Callable[[object], Dispatcher]
        celery = import_module("post_response.celery").CeleryDispatcher
        return celery(self._celery_app)
