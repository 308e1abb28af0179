"""The worker-level owner: runs request batches detached from their requests.

Once a response is complete, the middleware hands the request's `Batch` to the owner of
its event loop and returns, so the server is done with the request at once: uvicorn's
`--limit-concurrency` stops counting it and daphne's `application_close_timeout` no
longer applies to it. The owner runs batches on worker tasks, and lives as long as the
server: opened at `lifespan.startup` where the server runs lifespan, or else (daphne, test
harnesses) started on first use as a detached task: an asyncio task, or a trio system task.

At `lifespan.shutdown`, `shutdown()` waits for every batch up to a deadline and then
cancels what is left: tasks still running end `cancelled`, tasks not started end
`abandoned`, each logged by name. (A process that exits without a lifespan shutdown
logs the tasks it leaves behind at exit: see `_runner`.)
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import sys
from typing import TYPE_CHECKING, Any

import anyio

from . import _context
from ._runner import asyncio_loop
from ._task import TaskState

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from anyio.abc import TaskGroup, TaskStatus

    from ._runner import Batch

__all__ = ["Owner"]

logger = logging.getLogger("post_response")

_ABANDONED = TaskState.ABANDONED
_detached: set[asyncio.Task[None]] = set()  # strong references to fallback owners' tasks


class Owner:
    """Runs the batches of one event loop's requests, detached from those requests.

    Worker tasks take batches from a queue; a worker that finished one takes the next, or
    parks until one comes, so a busy server reuses its workers instead of starting a task
    per request. A worker is started when a batch arrives and none is parked, so batches of
    different requests never wait for each other, and one retires when `SPARE_WORKERS`
    others are parked. With `max_batches`, at most that many batches run at once; the rest
    stay queued, costing no task, until a worker is free.

    On asyncio, workers are plain asyncio tasks parked on futures: anyio's `start_soon` and
    `Event` cost ~30 µs and ~3 µs a request here, against ~5 µs and ~1 µs. On trio they
    are tasks of the owner's task group, parked on anyio events.
    """

    SPARE_WORKERS = 64

    def __init__(self, max_batches: int | None = None) -> None:
        self._group: TaskGroup | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # set while serving on asyncio
        self._workers: set[asyncio.Task[None]] = set()  # asyncio's, outside the group
        self._batches: set[Batch] = set()  # submitted and not finished
        self._waiting: collections.deque[Batch] = collections.deque()  # not started yet
        self._parked: list[asyncio.Future[None] | anyio.Event] = []  # a worker's each
        self._running = 0  # batches being run by workers
        self._max_batches = max_batches
        # Bounds running tasks (not just batches): a batch may run several at once.
        self.limiter = None if max_batches is None else anyio.CapacityLimiter(max_batches)
        self._finished: anyio.Event | None = None  # set when a batch ends, if someone waits
        self._stop = anyio.Event()
        self._stopped = anyio.Event()
        self._stopping = False
        self.closed = False

    @classmethod
    def spawn(cls, max_batches: int | None = None) -> Owner:
        """An owner serving from a detached task, for servers that run no lifespan."""
        owner = cls(max_batches)
        trio = sys.modules.get("trio")
        if trio is not None and trio.lowlevel.in_trio_run():
            trio.lowlevel.spawn_system_task(owner._serve_detached, name="post_response owner")
        else:
            _start_task(asyncio.get_running_loop(), owner._serve_detached(), _detached)
        return owner

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run submitted batches until `shutdown()` (or until cancelled)."""
        self._loop = asyncio_loop()
        try:
            async with anyio.create_task_group() as group:
                self._group = group
                for _ in range(len(self._waiting)):  # submitted before the group was open
                    self._wake()
                task_status.started()
                await self._stop.wait()
                group.cancel_scope.cancel()  # what shutdown() gave up on
        finally:
            self._stopping = True
            await self._cancel_workers()
            self._group = None
            self.closed = True
            while self._waiting:
                batch = self._waiting.popleft()
                self._batches.discard(batch)
                batch.abandon(_ABANDONED, "the server shut down before it started")
                batch.close()
            self._stopped.set()

    async def _cancel_workers(self) -> None:
        """Cancel the asyncio workers (trio's went with the group) and wait for them."""
        workers = list(self._workers)
        for worker in workers:
            worker.cancel()
        if workers:
            with anyio.CancelScope(shield=True):
                await asyncio.wait(workers)

    def stop(self) -> None:
        """Make `serve()` return now, cancelling what still runs (see `shutdown()`)."""
        self._stopping = True
        self._stop.set()

    async def _serve_detached(self) -> None:
        try:
            await self.serve()
        except Exception:  # a trio system task must not raise: it would crash the run
            logger.exception("The post_response owner failed")

    def submit(self, batch: Batch) -> None:
        """Queue `batch` for the owner's workers; the caller does not wait for it."""
        if self.closed:
            batch.abandon(_ABANDONED, "the server had already shut down")
            batch.close()
            return
        self._batches.add(batch)
        self._waiting.append(batch)
        self._wake()

    def _wake(self) -> None:
        """Get a worker onto the queue: a parked one, or else a new one."""
        group = self._group
        if group is None or self._stopping:  # not serving yet, or stopping
            return
        if self._max_batches is not None and self._running >= self._max_batches:
            return  # a worker takes the next batch when it is done with its own
        while self._parked:
            parked = self._parked.pop()
            if isinstance(parked, anyio.Event):
                parked.set()
                return
            if not parked.done():
                parked.set_result(None)
                return
        if self._loop is None:  # an empty context: the worker outlives this request
            contextvars.Context().run(group.start_soon, self._work)
        else:
            _start_task(self._loop, self._work(), self._workers)

    async def _work(self) -> None:
        """A worker: run queued batches, one after another; park when there are none."""
        limit = self._max_batches
        while True:
            while self._waiting and (limit is None or self._running < limit):
                await self._run(self._waiting.popleft())  # no local keeps it once run
            if len(self._parked) >= self.SPARE_WORKERS:
                return
            if self._loop is None:
                event = anyio.Event()
                self._parked.append(event)
                await event.wait()
            else:
                future = self._loop.create_future()
                self._parked.append(future)
                await future

    async def _run(self, batch: Batch) -> None:
        self._running += 1
        try:
            await batch.run(cancelled=_ABANDONED, reason="the server shut down before it started")
        finally:
            self._running -= 1
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
        while self._batches and (
            caller is None or any(batch.request is not caller for batch in self._batches)
        ):
            if self._finished is None:
                self._finished = anyio.Event()
            await self._finished.wait()

    def _count(self) -> tuple[int, int]:
        states = [task.state for batch in self._batches for task in batch.tasks]
        return states.count(TaskState.RUNNING), states.count(TaskState.PENDING)


def _start_task(
    loop: asyncio.AbstractEventLoop,
    coroutine: Coroutine[Any, Any, None],
    registry: set[asyncio.Task[None]],
) -> None:
    """Start an asyncio task that outlives the request that starts it, kept in `registry`.

    Its context is empty, and so is its done callback's: a task or a callback made in the
    request's context would keep a copy of it, and with it the request's task list, alive
    for as long as the task lives.
    """
    context = contextvars.Context()
    task = context.run(loop.create_task, coroutine)
    registry.add(task)
    task.add_done_callback(registry.discard, context=context)
