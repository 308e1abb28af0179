"""The worker-level owner: runs request batches detached from their requests.

Once a response is complete, the middleware hands the request's `Batch` to the owner of
its event loop and returns, so the server is done with the request at once: uvicorn's
`--limit-concurrency` stops counting it and daphne's `application_close_timeout` no
longer applies to it. The owner runs each batch as a task of a task group that lives as
long as the server: opened at `lifespan.startup` where the server runs lifespan, or else
(daphne, test harnesses) spawned on first use as a detached task: an asyncio task, or a
trio system task.

At `lifespan.shutdown`, `shutdown()` waits for every batch up to a deadline and then
cancels what is left: tasks still running end `cancelled`, tasks not started end
`abandoned`, each logged by name. A process that exits without a lifespan shutdown logs
the tasks it leaves behind as `abandoned` at exit.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import logging
import sys
import weakref
from typing import TYPE_CHECKING

import anyio

from . import _context
from ._task import TaskState

if TYPE_CHECKING:
    from anyio.abc import TaskGroup, TaskStatus

    from ._runner import Batch

__all__ = ["Owner"]

logger = logging.getLogger("post_response")

_ABANDONED = TaskState.ABANDONED
_UNFINISHED = (TaskState.PENDING, TaskState.RUNNING)
_owners: weakref.WeakSet[Owner] = weakref.WeakSet()
_detached: set[asyncio.Task[None]] = set()  # strong references to fallback owners' tasks


class Owner:
    """Runs the batches of one event loop's requests, detached from those requests."""

    def __init__(self) -> None:
        self._group: TaskGroup | None = None
        self._batches: set[Batch] = set()  # submitted and not finished
        self._early: list[Batch] = []  # submitted before serve() opened the group
        self._finished: anyio.Event | None = None  # set when a batch ends, if someone waits
        self._stop = anyio.Event()
        self._stopped = anyio.Event()
        self.closed = False
        _owners.add(self)

    @classmethod
    def spawn(cls) -> Owner:
        """An owner serving from a detached task, for servers that run no lifespan."""
        owner = cls()
        trio = sys.modules.get("trio")
        if trio is not None and trio.lowlevel.in_trio_run():
            trio.lowlevel.spawn_system_task(owner._serve_detached, name="post_response owner")
        else:
            # An empty context, so the task does not keep the first request's values alive.
            loop = asyncio.get_running_loop()
            task = contextvars.Context().run(loop.create_task, owner._serve_detached())
            _detached.add(task)
            task.add_done_callback(_detached.discard)
        return owner

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run submitted batches until `shutdown()` (or until cancelled)."""
        try:
            async with anyio.create_task_group() as group:
                self._group = group
                for batch in self._early:
                    group.start_soon(self._run, batch)
                self._early.clear()
                task_status.started()
                await self._stop.wait()
                group.cancel_scope.cancel()  # what shutdown() gave up on
        finally:
            self._group = None
            self.closed = True
            self._stopped.set()

    def stop(self) -> None:
        """Make `serve()` return now, cancelling what still runs (see `shutdown()`)."""
        self._stop.set()

    async def _serve_detached(self) -> None:
        try:
            await self.serve()
        except Exception:  # a trio system task must not raise: it would crash the run
            logger.exception("The post_response owner failed")

    def submit(self, batch: Batch) -> None:
        """Run `batch` in the owner's task group; the caller does not wait for it."""
        if self.closed:
            batch.abandon(_ABANDONED, "the server had already shut down")
            batch.request.close()
            return
        self._batches.add(batch)
        if self._group is None:
            self._early.append(batch)
        else:
            self._group.start_soon(self._run, batch)

    async def _run(self, batch: Batch) -> None:
        try:
            await batch.run(cancelled=_ABANDONED, reason="the server shut down before it started")
        finally:
            self._batches.discard(batch)
            if self._finished is not None:
                self._finished.set()
                self._finished = None

    async def shutdown(self, deadline: float | None) -> None:
        """Wait for every batch at most `deadline` seconds (None: no limit); cancel the rest.

        Every task that does not complete is logged by name with its final state.
        """
        if self._batches:
            running, waiting = self._count()
            logger.info(
                "Shutdown: waiting for %d running and %d queued tasks (shutdown_timeout=%s)",
                running,
                waiting,
                deadline,
            )
            with anyio.move_on_after(deadline):
                await self.join()
            if self._batches:
                running, waiting = self._count()
                logger.error(
                    "Shutdown: shutdown_timeout=%ss reached; cancelling %d running tasks "
                    "and abandoning %d that have not started",
                    deadline,
                    running,
                    waiting,
                )
        self.stop()
        await self._stopped.wait()

    async def join(self) -> None:
        """Wait until no batch is left (batches submitted meanwhile included).

        Called from inside a task, it does not wait for that task's own batch.
        """
        caller = _context.current()
        while any(batch.request is not caller for batch in self._batches):
            if self._finished is None:
                self._finished = anyio.Event()
            await self._finished.wait()

    def _count(self) -> tuple[int, int]:
        states = [task.state for batch in self._batches for task in batch.tasks]
        return states.count(TaskState.RUNNING), states.count(TaskState.PENDING)

    def abandon_at_exit(self) -> None:
        """The process is exiting with batches unfinished: log each of their tasks."""
        for batch in list(self._batches):
            for task in batch.tasks:
                if task.state in _UNFINISHED:
                    was = task.state.value
                    task._end(_ABANDONED)
                    logger.error(
                        "Task %r of %s abandoned: the process exited while it was %s",
                        task.name,
                        batch.label,
                        was,
                    )


@atexit.register
def _abandon_at_exit() -> None:
    for owner in list(_owners):
        owner.abandon_at_exit()
