"""The worker-level owner: runs request batches detached from their requests.

Once a response is complete, the middleware hands the request's `Batch` to the owner of
its event loop and returns, so the server is done with the request at once: uvicorn's
`--limit-concurrency` stops counting it and daphne's `application_close_timeout` no
longer applies to it. The owner runs batches on worker tasks, and lives as long as the
server: opened at `lifespan.startup` where the server runs lifespan, or else (daphne, test
harnesses) started on first use, detached from any request.

At `lifespan.shutdown`, `shutdown()` waits for every batch up to a deadline and then
cancels what is left: tasks still running end `cancelled` (or `abandoned`, for a sync
task whose thread runs on), tasks not started end `abandoned`, each logged by name.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import enum
import heapq
import inspect
import itertools
import logging
import sys
import threading
from typing import TYPE_CHECKING, Any

import anyio

from . import _backend, _context, _registry
from ._batch import Batch, HeldBatch
from ._call import OwnCancellation, call_sync, in_context, is_async
from ._pressure import pressure
from ._task import NO_KWARGS, TaskState, note_lost
from ._threads import Job, pool

if TYPE_CHECKING:
    from anyio.abc import TaskStatus

    from ._backend import Workers
    from ._task import Stats, TaskHandle

__all__ = ["Owner", "run_to_the_end"]

logger = logging.getLogger("post_response")

_ABANDONED, _DROPPED, _PENDING = TaskState.ABANDONED, TaskState.DROPPED, TaskState.PENDING
_COMPLETED, _RUNNING = TaskState.COMPLETED, TaskState.RUNNING
_SHUT_DOWN = "the server shut down"
_COMPACT_AT = 64


class Life(enum.Enum):
    NEW = "new"  # built; batches submitted now wait until it serves
    SERVING = "serving"
    STOPPING = "stopping"  # shutting down: no new worker, what runs is being cancelled
    CLOSED = "closed"  # every batch ended; later ones are abandoned at once


class _Key:
    """Who has a key: `busy` while a task with it runs (or waits for its next attempt);
    `next` is the one task with it waiting to run, `due` once its delay is over."""

    __slots__ = ("busy", "due", "next")

    def __init__(self, *, busy: bool) -> None:
        self.busy = busy
        self.next: HeldBatch | None = None
        self.due = False


class Owner:
    """Runs the batches of one event loop's requests, detached from those requests.

    Worker tasks take batches from a queue; a worker that finished one takes the next, or
    parks until one comes, so a busy server reuses its workers instead of starting a task
    per request. A worker is started when a batch arrives and none is parked, so batches of
    different requests never wait for each other, and one retires when `SPARE_WORKERS`
    others are parked. With `max_running`, at most that many tasks run at once; the
    batches beyond wait in the queue, costing no task, and with `max_queued` at most that
    many tasks wait: the tasks of a batch that cannot start are dropped past it.

    A worker survives whatever a batch raises except the owner's own cancellation, so no
    task can stop the batches of other requests.

    Tasks that must wait (a delay, a key another task holds, a backoff before the next
    attempt) are held here as batches of their own that hold no worker, thread or
    `max_running` slot: one timer task per owner serves a heap of due times, and a dict
    keeps, per key, whether a task with it runs and the one task waiting for it. At
    shutdown, delays end at once and a task waiting for its next attempt is abandoned.

    On asyncio there are no workers: a batch is started as soon as `max_running` lets it,
    and each of its tasks gets an asyncio task of its own (`_step`), started when the one
    before it has ended (tasks of a request run one after another). A task without options
    runs there as it is, in its own context snapshot, with nothing around it but its state
    changes; a sync one without options gets no asyncio task: it goes to a worker thread,
    which has the loop end it and start the next (`_to_thread`). The others (and batches
    run `concurrency` at a time, or held for a delay, key or retry) take the general path
    of `Batch`. Trio keeps parked workers.
    """

    SPARE_WORKERS = 64

    def __init__(
        self,
        max_running: int | None = None,
        max_queued: int | None = None,
        shutdown_timeout: float | None = 20.0,
    ) -> None:
        self._backend = _backend.current()
        self.life = Life.NEW
        self._workers: Workers | None = None
        # Accepted and not finished. A dict used as a set: at thousands of waiting batches
        # its table costs a third of a set's per entry (~30 B instead of ~105). From its
        # first batch until it closes, the process's registry holds the owner instead of
        # each of them (`_hold`).
        self._batches: dict[Batch, None] = {}
        self._waiting: collections.deque[Batch] = collections.deque()  # not started yet
        self._parked: list[Any] = []  # where idle workers wait (see Backend.spot)
        self._running = 0  # batches being run by workers
        self._max_running = max_running
        self._max_queued = max_queued
        self._shutdown_timeout = shutdown_timeout
        self._limiter = None if max_running is None else anyio.CapacityLimiter(max_running)
        self._tokens_lent = False  # some batch holds tokens of the limiter per task
        self._finished: anyio.Event | None = None  # set when a batch ends, if someone waits
        self._stop = anyio.Event()
        self._closed = anyio.Event()
        self._why = _SHUT_DOWN  # why what is left is cancelled, for the logs
        self._keys: dict[str, _Key] = {}
        self._timers: list[tuple[float, int, HeldBatch, bool]] = []  # (due, n, batch, retry)
        self._compact_at = _COMPACT_AT  # the heap's size past which `_compact` runs
        self._order = itertools.count()  # ties on the heap go first come, first served
        self._tick: anyio.Event | None = None  # set to wake the timer
        self._timing = False  # the timer task was started
        self._flushing = False  # shutting down: delays are over, backoffs abandoned
        self._alone = self._backend.runs_tasks_alone  # a loop task per task, no workers
        self._pumping = False  # starting queued batches (`_pump`), not to be re-entered
        self._stopping_tasks = False  # the owner cancels its tasks: not a task's own cancel
        self._thread = threading.get_ident()  # the event loop's: `let_go` may come from another
        self._call_soon = (
            self._backend.call_from_thread
            if self._alone
            else sys.modules["trio"].lowlevel.current_trio_token().run_sync_soon
        )

    @classmethod
    def spawn(
        cls,
        max_running: int | None = None,
        max_queued: int | None = None,
        shutdown_timeout: float | None = 20.0,
    ) -> Owner:
        """An owner serving from a detached task, for servers that run no lifespan."""
        owner = cls(max_running, max_queued, shutdown_timeout)
        owner._backend.spawn(owner._serve_detached)
        return owner

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run submitted batches until `shutdown()` (or until the event loop closes: then
        finish them first, within the shutdown timeout)."""
        try:
            async with self._backend.workers() as workers:
                self._workers = workers
                self.life = Life.SERVING
                for _ in range(len(self._waiting)):  # submitted before it served
                    self._wake()
                if self._timers:
                    self._start_timer()
                task_status.started()
                try:
                    await self._stop.wait()
                except self._backend.cancelled:
                    if self.life is Life.SERVING:  # not by stop(): the loop closes under us
                        await self._finish_before_the_loop_closes()
                    raise
                finally:
                    self.life = Life.STOPPING  # the end of the block stops the workers
                    await self._stop_tasks()
        finally:
            self._workers = None
            self.life = Life.CLOSED
            while self._waiting:
                batch = self._waiting.popleft()
                batch.abandon(_ABANDONED, f"{self._cause()} before it started")
                self._drop(batch)  # after: the registry says "done" once it is logged
            self._abandon_held()
            if not self._batches:  # else the last `_drop` does it
                _registry.discard(self)
            self._closed.set()

    async def _finish_before_the_loop_closes(self) -> None:
        """The event loop is being closed without a lifespan shutdown (`asyncio.run()` or
        `anyio.run()` returning, a test client's portal closing): let the tasks finish,
        as at a shutdown, rather than have the loop cancel them."""
        closed = "the event loop closed without a lifespan shutdown"
        self._why = closed  # for tasks abandoned at once: those waiting for a retry
        with anyio.CancelScope(shield=True):
            await self._drain(self._shutdown_timeout)
        self._why = (
            f"{closed}, and shutdown_timeout={self._shutdown_timeout}s passed (in tests: "
            "`with TestClient(app)`, or the post_response.pytest_plugin, waits for tasks)"
        )

    def stop(self) -> None:
        """Make `serve()` return now, cancelling what still runs (see `shutdown()`)."""
        if self.life is not Life.CLOSED:
            self.life = Life.STOPPING
        self._stop.set()

    async def _serve_detached(self) -> None:
        try:
            await self.serve()
        except Exception:  # a trio system task must not raise: it would crash the run
            logger.exception("The post_response owner failed")

    def submit(self, batch: Batch) -> None:
        """Queue `batch` for the owner's workers; the caller does not wait for it."""
        if self.life is Life.CLOSED:
            batch.abandon(_ABANDONED, "the server had already shut down")
            return
        if self._admit(batch):
            batches, unfinished = self._batches, _registry.unfinished  # (`_hold`, inline)
            if not batches:
                unfinished[self] = None
            batches[batch] = None
            unfinished.pop(batch, None)
            limit = self._max_running
            if (
                self._alone
                and not self._waiting
                and self.life is Life.SERVING
                and (limit is None or self._running < limit)
            ):
                self._launch(batch)  # the usual case: straight on, no queue
                return
            self._waiting.append(batch)
            self._wake()

    def _hold(self, batch: Batch) -> None:
        """Take `batch` on: the process's registry of unfinished work reaches it through
        the owner from now on (one entry per batch, not two)."""
        batches = self._batches
        if not batches:
            _registry.unfinished[self] = None  # until the owner closes (see `_drop`)
        batches[batch] = None
        _registry.unfinished.pop(batch, None)

    def _drop(self, batch: Batch) -> None:
        """`batch` is over: let go of it, and wake those who wait for batches to end."""
        batches = self._batches
        batches.pop(batch, None)
        if not batches:
            if self.life is Life.CLOSED:
                _registry.discard(self)
            elif _registry.waiters:
                _registry.notify_if_idle()
        if self._finished is not None:  # wake those who join
            self._finished.set()
            self._finished = None

    def batches(self) -> list[Batch]:
        """The batches accepted and not finished (for the registry's reports)."""
        return list(self._batches)

    async def run_here(self, batch: Batch) -> None:
        """Run `batch` in the caller's task (the middleware's `detach=False`)."""
        if self._admit(batch, inline=True):
            self._running += 1
            try:
                await batch.run()
            finally:
                self._running -= 1

    def _admit(self, batch: Batch, *, inline: bool = False) -> bool:
        """Count `batch`'s tasks as queued, dropping those past `max_queued` when they would
        have to wait; False when nothing is left to run.

        A detached batch that runs one task at a time needs no limiter: a worker takes it
        only below `max_running`. The others hold a token of it per running task.
        """
        batch.backend = self._backend
        if inline or batch.settings.concurrency > 1:
            batch.limiter = self._limiter
            self._tokens_lent = True
        if not inline:
            batch.owner = self  # it hands the tasks that must wait back to this owner
        limit = self._max_running
        if batch.skip_reason is None and (limit is None or not self._full()):
            for task in batch._tasks:  # the usual case: all pending, none dropped
                if task.state is _PENDING:
                    task._enqueue()
            return True
        tasks = batch.runnable()
        dropped = []
        if self._full():
            stats, limit = batch.request.stats, self._max_queued
            pressure.note("max_running", self._max_running, stats.queued)
            if limit is not None:
                if stats.queued >= limit // 2:
                    pressure.note("max_queued", limit, stats.queued)
                room = max(limit - stats.queued, 0)
                tasks, dropped = tasks[:room], tasks[room:]
                for task in dropped:
                    task._end(_DROPPED)
                    note_lost(task)
        for task in tasks:
            task._enqueue()
        if dropped:
            self._log_drops(batch, [task.name for task in dropped])
        if dropped and not any(task.state is TaskState.PENDING for task in batch.tasks()):
            batch.close()  # nothing left to run or to skip
            return False
        return True

    def _full(self) -> bool:
        """Whether a new task would have to wait for `max_running`: only then is it queued."""
        limit = self._max_running
        return limit is not None and (
            self._running >= limit
            or (
                self._tokens_lent
                and self._limiter is not None
                and self._limiter.available_tokens < 1
            )
        )

    def _log_drops(self, batch: Batch, names: list[str]) -> None:
        """Drops are logged once per request, naming each task: under overload, a log
        record per task would only add to the load."""
        request = batch.request
        logger.error(
            "Dropped %d tasks of %s, max_queued=%d tasks already waiting to run: %s",
            len(names),
            batch.label,
            self._max_queued,
            ", ".join(map(repr, names)),
            extra={
                "task_names": names,
                "task_outcome": _DROPPED.value,
                "request_method": request.method,
                "request_path": request.path,
            },
        )

    def _wake(self) -> None:
        """Get a worker onto the queue: a parked one, or else a new one."""
        workers = self._workers
        if workers is None or self.life is not Life.SERVING:
            return
        if self._max_running is not None and self._running >= self._max_running:
            return  # a worker takes the next batch when it is done with its own
        if self._alone:
            self._pump()
        elif self._parked:
            self._backend.wake(self._parked.pop())
        else:
            workers.start(self._work)

    async def _work(self) -> None:
        """A worker: run queued batches, one after another; park when there are none."""
        limit = self._max_running
        try:
            while self.life is Life.SERVING:
                while self._waiting and (limit is None or self._running < limit):
                    await self._run(self._waiting.popleft())  # no local keeps it once run
                if len(self._parked) >= self.SPARE_WORKERS:
                    return
                spot = self._backend.spot()
                self._parked.append(spot)
                await spot
        finally:
            if self._waiting:  # however this worker ended, queued batches still get one
                self._wake()

    async def _run(self, batch: Batch) -> None:
        self._running += 1
        try:
            await batch.run(cancelled=_ABANDONED)
        except self._backend.cancelled:
            raise
        except BaseException:
            logger.exception("post_response failed running the tasks of %s", batch.label)
            batch.abandon(_ABANDONED, "post_response failed running them (see the error above)")
        finally:
            self._running -= 1
            self._drop(batch)

    # asyncio: a task of the event loop per post_response task, no workers.

    def _pump(self) -> None:
        """Start queued batches while `max_running` lets them (iterative: a batch that ends
        at once, its tasks cancelled meanwhile, starts the next one from here)."""
        if self._pumping:
            return
        self._pumping = True
        try:
            waiting, limit = self._waiting, self._max_running
            while waiting and self.life is Life.SERVING:
                if limit is not None and self._running >= limit:
                    return
                self._launch(waiting.popleft())
        finally:
            self._pumping = False

    def _launch(self, batch: Batch) -> None:
        """Start running `batch` (`max_running` lets it)."""
        if type(batch) is Batch and batch.settings.concurrency == 1:
            self._running += 1
            self._next(batch)
        else:  # held, or run `concurrency` at a time: the general path, on one task
            batch.runner = self._backend.start(self._run_alone(batch), _EMPTY_CONTEXT())

    async def _run_alone(self, batch: Batch) -> None:
        try:
            await self._run(batch)
        finally:
            batch.runner = None
            if self._waiting:
                self._wake()

    def _next(self, batch: Batch) -> None:
        """Start `batch`'s next task on a loop task of its own, or end the batch."""
        if self.life is not Life.SERVING:  # stopping: what has not started is abandoned
            self._end_batch(batch, f"{self._cause()} before it started")
            return
        task = batch.request.take(close=True)
        if task is None:
            self._end_batch(batch, None)
            return
        func = task.func
        if (
            task.state is _PENDING
            and task._plan is None  # no options of its own (timeout, key...), no queue
            and batch.skip_reason is None
            and batch.settings.plain
        ):  # nothing to do around the task: it runs as it is
            code = getattr(func, "__code__", None)
            if code is not None and code.co_flags & _CO_COROUTINE:  # an `async def`
                step = self._step(batch, task, plain=True)
                batch.runner = self._backend.start(step, task.context)
                return
            try:
                sync = not is_async(func)
            except BaseException:  # a hostile callable: the general path fails it, logged
                sync = False
            if sync:
                self._to_thread(batch, task)
                return
        batch.runner = self._backend.start(self._step(batch, task, plain=False), _EMPTY_CONTEXT())

    async def _step(self, batch: Batch, task: TaskHandle, *, plain: bool) -> None:
        """Run one task of `batch`, then start the next. A plain task (see `_next`) runs here
        as it is, in its context snapshot; the others take the general path."""
        try:
            if plain:
                task._start()
                try:
                    await task.func(*task.args, **(task._kwargs or NO_KWARGS))  # type: ignore[misc]
                except self._backend.cancelled as exc:
                    if self._stopping_tasks:  # the owner's, not the task's own
                        raise
                    self._backend.forgive_self_cancel()
                    await batch._fail(task, exc, _OWN_CANCEL)
                except BaseException as exc:  # SystemExit too: the task failed, not the loop
                    await batch._fail(task, exc, "failed")
                else:
                    task._end(_COMPLETED)  # logged at DEBUG level there
            else:
                await batch._one(task)
        except self._backend.cancelled:
            self._stopped(batch, task)
            raise
        except BaseException:
            self._give_up(batch)
            return
        self._next(batch)

    # The ends of a loop task that runs a batch (`_step`, `_after_thread`). Their `except`
    # clauses call these rather than both coroutines being one with a parameter more: that
    # costs every plain async task (a keyword default is a dict lookup, the coroutine grows).

    def _stopped(self, batch: Batch, task: TaskHandle) -> None:
        """The loop task running `task` was cancelled by the owner: the task is interrupted
        if it had not ended, the batch's tasks not started are abandoned."""
        if task.state is _RUNNING or task.state is _PENDING:
            batch._interrupted(task)
        self._end_batch(batch, f"{self._cause()} before it started")

    def _give_up(self, batch: Batch) -> None:
        """post_response itself failed running `batch` (called in an `except` clause, whose
        error is logged): end the batch, so that the owner goes on with the others."""
        logger.exception("post_response failed running the tasks of %s", batch.label)
        self._end_batch(batch, "post_response failed running them (see the error above)")

    # A plain sync task (see `_next`) goes to a worker thread straight from `_next`, with no
    # loop task, coroutine or future of its own: the thread has the loop call `_thread_ended`,
    # which ends the task and starts the next one. Only a failure, or a returned awaitable,
    # takes a loop task (`_after_thread`). While it is in the thread, the batch's `runner`
    # is its `_ThreadJob`, which `_stop_tasks` leaves to its thread at shutdown.

    def _to_thread(self, batch: Batch, task: TaskHandle) -> None:
        job = _ThreadJob(self, batch, task)
        batch.runner = job
        try:
            taken = pool.submit(job)
        except BaseException:  # no thread could be started: the batch ends, the owner goes on
            pool.withdraw(job)
            self._give_up(batch)
            return
        if taken:
            task._start()
        else:  # it is queued until a thread takes it (`_thread_started`)
            pool.note_wait()

    def _thread_started(self, job: _ThreadJob) -> None:
        """A thread took `job`, which had to wait for one (called on the loop)."""
        task = job.task
        if job.batch.runner is job and task.state is _PENDING:
            task._start()
        pool.note_wait(job)

    def _thread_ended(
        self, job: _ThreadJob, returned: tuple[Any] | None, error: BaseException | None
    ) -> None:
        """`job`'s call returned or raised (called on the loop): end its task, start the next."""
        batch, task = job.batch, job.task
        if batch.runner is not job:  # left to its thread at shutdown, and logged then
            return
        ran = task.state is _RUNNING  # else cancelled while it waited for a thread: ended
        if ran and (returned is not None or error is not None):
            after = self._after_thread(batch, task, returned, error)
            batch.runner = self._backend.start(after, _EMPTY_CONTEXT())
            return
        try:
            if ran:
                task._end(_COMPLETED)
            self._next(batch)
        except BaseException:  # a loop callback: nobody above would end the batch
            self._give_up(batch)

    async def _after_thread(
        self,
        batch: Batch,
        task: TaskHandle,
        returned: tuple[Any] | None,
        error: BaseException | None,
    ) -> None:
        """End a plain sync task that raised, or await what it returned (as `call` does),
        then start the next one; on a loop task, as `_step`."""
        backend = self._backend
        try:
            if error is None and returned is not None:  # e.g. `add_task(lambda: notify(user))`
                try:
                    await in_context(task.context, returned[0], backend)
                except OwnCancellation as own:
                    await batch._fail(task, own.error, _OWN_CANCEL)
                except backend.cancelled:
                    raise
                except BaseException as exc:
                    await batch._fail(task, exc, "failed")
                else:
                    task._end(_COMPLETED)
            elif error is not None:  # raised in its thread: whatever it is, the task's own
                its_own = isinstance(error, backend.cancelled)
                await batch._fail(task, error, _OWN_CANCEL if its_own else "failed")
        except backend.cancelled:
            self._stopped(batch, task)
            raise
        except BaseException:
            self._give_up(batch)
            return
        self._next(batch)

    def _leave(self, job: _ThreadJob) -> None:
        """Shutdown: the owner stops waiting for `job`; its task ends as `_step` ends one
        cancelled in `call`: abandoned before it started if no thread has taken it yet
        (it never runs), else abandoned while its thread runs on."""
        batch, task = job.batch, job.task
        if not pool.withdraw(job) and task.state is _PENDING:
            task._start()  # a thread has it: it runs, whatever the loop has heard
        batch._interrupted(task)
        self._end_batch(batch, f"{self._cause()} before it started")

    def _end_batch(self, batch: Batch, abandoned: str | None) -> None:
        """`batch` is over (its tasks not started abandoned, for the reason given)."""
        batch.runner = None
        # The registry reaches an owner's batch through it (see `_hold`): `_drop` is enough.
        if abandoned is not None:
            batch.abandon(_ABANDONED, abandoned)
        self._running -= 1
        self._drop(batch)
        if self._waiting:
            self._wake()

    async def _stop_tasks(self) -> None:
        """Cancel the loop tasks running batches (asyncio) and wait for them; leave sync
        tasks to their threads."""
        tasks = []
        for batch in list(self._batches):  # `_leave` drops batches
            runner = batch.runner
            if type(runner) is _ThreadJob:
                self._leave(runner)
            elif runner is not None:
                tasks.append(runner)
        if tasks:
            self._stopping_tasks = True
            await self._backend.stop(tasks)

    # Tasks that wait: for a delay, for their key, for their next attempt.

    def hold(self, task: TaskHandle, batch: Batch) -> bool:
        """Take `task` (with a key or a delay, its turn come in `batch`) to run later, or
        return False to let `batch` run it now, with its key marked busy."""
        key = task.key
        if task.delay and not self._flushing:
            if not self.can_hold(task, key):
                self._drop_held(task)
                return True
            held = self._held(task, batch)
            if key is not None:
                self._wait_for_key(key, held, due=False)
            self._at(anyio.current_time() + task.delay, held, retry=False)
            return True
        if key is None:
            return False
        state = self._keys.get(key)
        if state is None:
            self._keys[key] = _Key(busy=True)
            return False
        if not state.busy:  # only a delayed task waits: the newer one replaces it, and runs
            self._supersede(state)
            state.busy = True
            return False
        if not self.can_hold(task, key):
            self._drop_held(task)
            return True
        self._wait_for_key(key, self._held(task, batch), due=True)
        return True

    def can_hold(self, task: TaskHandle, key: str | None = None) -> bool:
        """Whether `task` may wait here (for its delay, its key or its next attempt): at
        most `max_queued` tasks do, so that a flood of distinct keys, long delays or failing
        tasks cannot exhaust memory. One that replaces the task waiting for its `key` takes
        its place; a replay always may (dropped, it would stay in the journal until the
        next start: see `room`)."""
        limit, stats = self._max_queued, task.request_tasks.stats
        if limit is None or stats.held < limit // 2:
            return True
        if key is not None and (state := self._keys.get(key)) and state.next is not None:
            return True
        pressure.note("held", limit, stats.held)
        return stats.held < limit or task.replayed

    def _drop_held(self, task: TaskHandle) -> None:
        task._lose(
            _DROPPED,
            logging.ERROR,
            "dropped: max_queued=%d tasks already wait for a delay, a key or a retry",
            self._max_queued,
        )

    def release(self, key: str) -> None:
        """The task that had `key` ended: start the one waiting for it, if it is due."""
        state = self._keys.get(key)
        if state is None:
            return
        held = state.next
        if held is not None and held.task.state is not _PENDING:  # cancelled meanwhile
            self._forget(held)
            state.next = held = None
        if held is None:
            del self._keys[key]
        elif not state.due:
            state.busy = False  # its task waits for its delay
        else:
            state.next, state.due = None, False
            self._start(held)

    def retry_later(self, task: TaskHandle, seconds: float, batch: Batch) -> None:
        """Run `task` again in `seconds`; it keeps its key meanwhile."""
        held = self._held(task, batch)
        if self._flushing:
            self._abandon_retry(held)
        else:
            self._at(anyio.current_time() + seconds, held, retry=True)

    def _held(self, task: TaskHandle, batch: Batch) -> HeldBatch:
        task._unqueue()
        held = HeldBatch.of(task, batch.settings, self)
        self._hold(held)  # joined and drained like any batch
        plan = task._planned()
        plan.held, plan.taken = held, True
        task.request_tasks.stats.hold(1)
        return held

    def _unhold(self, held: HeldBatch) -> None:
        """`held`'s task no longer waits here: it starts, or ended while it waited."""
        plan = held.task._planned()
        if plan.held is held:
            plan.held = None
            held.task.request_tasks.stats.hold(-1)

    def let_go(self, held: HeldBatch) -> None:
        """`held`'s task ended while it waited here (cancelled, or superseded within its
        request): let go of it now, not once its delay or backoff is over, so that joins
        do not wait for it and a key it kept is free. From any thread."""
        if threading.get_ident() == self._thread:
            self._let_go(held)
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing holds it now
            self._call_soon(self._let_go, held)

    def _let_go(self, held: HeldBatch) -> None:
        task = held.task
        if task._planned().held is not held:  # started, or let go of already
            return
        self._forget(held)  # its entry on the timer's heap, if it has one, is skipped
        key = task.key
        if key is None:
            return
        state = self._keys.get(key)
        if state is not None and state.next is held:  # it waited for its delay or its key
            state.next = None
            if not state.busy:
                del self._keys[key]
        else:  # it waited for its next attempt, and kept its key meanwhile
            self.release(key)

    def _wait_for_key(self, key: str, held: HeldBatch, *, due: bool) -> None:
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _Key(busy=False)
        self._supersede(state)
        state.next, state.due = held, due

    def _supersede(self, state: _Key) -> None:
        """A newer task with the key replaces the one waiting for it."""
        held = state.next
        if held is not None:
            state.next = None
            self._forget(held)  # first: the task has nothing more to tell the owner
            if held.task.state is _PENDING:
                held.task._supersede()

    def _start(self, held: HeldBatch) -> None:
        task = held.task
        task._planned().cleared = True
        self._unhold(held)
        self.submit(held)
        if task.state is not _PENDING:  # dropped, or too late: it will not run
            self._drop(held)  # else joins and the shutdown would wait for it for ever
            if task.key is not None:
                self.release(task.key)

    def _forget(self, batch: HeldBatch) -> None:
        """A held batch whose task will not run (it ended while it waited)."""
        self._unhold(batch)
        batch.close()
        self._drop(batch)

    def _due(self, held: HeldBatch, *, retry: bool) -> None:
        """`held`'s delay or backoff is over."""
        if held not in self._batches:  # let go of already (superseded, cancelled)
            return
        task = held.task
        key = task.key
        if task.state is not _PENDING:  # cancelled or superseded while it waited
            self._forget(held)
            if key is not None and retry:
                self.release(key)  # it kept its key through the backoff
            elif key is not None and (state := self._keys.get(key)) and state.next is held:
                state.next = None
                if not state.busy:
                    del self._keys[key]
            return
        if retry or key is None:
            self._start(held)
            return
        state = self._keys[key]
        if state.busy:
            state.due = True  # runs when the task with its key ends
        else:
            state.next, state.busy = None, True
            self._start(held)

    def _at(self, due: float, held: HeldBatch, *, retry: bool) -> None:
        if self.life is Life.CLOSED:  # no timer will ever serve it
            held.abandon(_ABANDONED, "the server had already shut down")
            self._forget(held)
            return
        timers = self._timers
        heapq.heappush(timers, (due, next(self._order), held, retry))
        if len(timers) > self._compact_at:  # a debounce's superseded tasks, say
            self._compact()
        if not self._timing:
            self._start_timer()
        elif timers[0][2] is held and self._tick is not None:
            self._tick.set()  # the timer sleeps until a later time

    def _compact(self) -> None:
        """Take off the timer's heap the tasks let go of while they waited, which it would
        otherwise keep until their time (with their arguments), so that a burst of
        requests debouncing one key with a long delay holds one task, not one per request."""
        timers, batches = self._timers, self._batches
        timers[:] = [entry for entry in timers if entry[2] in batches]  # the timer's list
        heapq.heapify(timers)
        self._compact_at = max(2 * len(timers), _COMPACT_AT)

    def _start_timer(self) -> None:
        workers = self._workers
        if workers is not None and self.life is Life.SERVING:
            self._timing = True
            workers.start(self._time)

    async def _time(self) -> None:
        """The timer: start each held batch when its time has come."""
        timers = self._timers
        while True:
            tick = self._tick = anyio.Event()
            if not timers:
                await tick.wait()
            else:
                with anyio.move_on_after(timers[0][0] - anyio.current_time()):
                    await tick.wait()
            now = anyio.current_time()
            while timers and timers[0][0] <= now:
                _, _, held, retry = heapq.heappop(timers)
                try:
                    self._due(held, retry=retry)
                except Exception:  # the timer serves every held task: it must go on
                    logger.exception(
                        "post_response failed to start the held tasks of %s", held.label
                    )
                    held.abandon(_ABANDONED, "post_response failed to start it (see above)")
                    self._forget(held)

    def _flush(self) -> None:
        """Shutdown: delayed tasks are due now; tasks waiting for a retry are abandoned."""
        self._flushing = True
        timers = sorted(self._timers)
        self._timers.clear()  # the timer's own list: it must not start them a second time
        for _, _, held, retry in timers:
            if held not in self._batches:  # let go of already (superseded, cancelled)
                continue
            if retry:
                self._abandon_retry(held)
            else:
                self._due(held, retry=False)

    def _abandon_retry(self, held: HeldBatch) -> None:
        task = held.task
        if task.state is _PENDING:
            task._lose(
                _ABANDONED,
                logging.ERROR,
                "abandoned: %s while it waited for its next attempt, after %d failed",
                self._cause(),
                task.attempt,
            )
        self._forget(held)
        if task.key is not None:
            self.release(task.key)

    def _abandon_held(self) -> None:
        """The owner closed: the held tasks that never got to run are abandoned."""
        held = [batch for _, _, batch, _ in self._timers]
        held += [state.next for state in self._keys.values() if state.next is not None]
        self._timers, self._keys = [], {}
        for batch in held:
            self._unhold(batch)
            batch.abandon(_ABANDONED, f"{self._cause()} before it started")
            self._drop(batch)

    async def shutdown(self, deadline: float | None) -> None:
        """Wait for every batch at most `deadline` seconds (None: no limit); cancel the rest.

        Every task that does not complete is logged by name with its final state.
        """
        await self._drain(deadline)
        self.stop()
        await self._closed.wait()

    async def _drain(self, deadline: float | None) -> None:
        """Wait for every batch at most `deadline` seconds, saying what is waited for."""
        self._flush()
        if not self._batches:
            return
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

    def _cause(self) -> str:
        return self._why

    async def join(self) -> None:
        """Wait until no batch is left (batches submitted meanwhile included).

        Called from inside a task, it does not wait for that task's own batch.
        """
        caller = _context.current()
        while self._batches and (
            caller is None or any(batch.origin is not caller for batch in self._batches)
        ):
            await self._one_finished()

    async def room(self, stats: Stats) -> None:
        """Wait while a new task would be dropped (`max_queued` tasks already wait), as
        long as the owner serves: for work that must not be dropped, replays."""
        limit = self._max_queued
        while (
            limit is not None
            and self.life is Life.SERVING
            and self._full()
            and stats.queued >= limit
        ):
            await self._one_finished()

    async def join_request(self, request: _context.RequestTasks) -> None:
        """Wait until no batch of `request`'s tasks is left (its held tasks included)."""
        while any(batch.origin is request for batch in self._batches):
            await self._one_finished()

    async def _one_finished(self) -> None:
        if self._finished is None:
            self._finished = anyio.Event()
        await self._finished.wait()

    def _count(self) -> tuple[int, int]:
        states = [task.state for batch in self._batches for task in batch.tasks()]
        return states.count(TaskState.RUNNING), states.count(TaskState.PENDING)


_EMPTY_CONTEXT = contextvars.Context  # where the general path runs: each task gets its own
_CO_COROUTINE = inspect.CO_COROUTINE
_OWN_CANCEL = "failed: it raised a cancellation of its own"


class _ThreadJob(Job):
    """A plain sync task of `batch`, for a worker thread (see `Owner._to_thread`)."""

    __slots__ = ("batch", "owner", "task")

    def __init__(self, owner: Owner, batch: Batch, task: TaskHandle) -> None:
        self.owner = owner
        self.batch = batch
        self.task = task
        self.waited = 0.0

    def run(self) -> None:
        """In the worker thread: call the task in its context snapshot, then tell the loop."""
        owner, task = self.owner, self.task
        tell = owner._backend.call_from_thread
        try:
            if self.waited:
                if task.state is not _PENDING:  # cancelled while it waited for a thread
                    tell(owner._thread_ended, self, None, None)
                    return
                tell(owner._thread_started, self)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass
        try:
            try:
                returned = call_sync(task.context, task.func, task.args, task._kwargs or NO_KWARGS)
            except BaseException as exc:  # SystemExit too: the task failed, not the thread
                tell(owner._thread_ended, self, None, exc)
            else:
                tell(owner._thread_ended, self, returned, None)
        except RuntimeError:  # the loop is closed
            return


def run_to_the_end(batch: Batch, max_running: int | None, max_queued: int | None) -> None:
    """Run `batch` from sync code and wait for it: on an event loop of its own, in this
    thread, or in a thread of its own if a loop already runs in this one."""

    async def run() -> None:
        await Owner(max_running, max_queued).run_here(batch)

    trio = sys.modules.get("trio")
    if _backend.asyncio_loop() is None and not (trio is not None and trio.lowlevel.in_trio_run()):
        anyio.run(run)
        return
    thread = threading.Thread(target=anyio.run, args=(run,), name="post_response")
    thread.start()
    thread.join()
