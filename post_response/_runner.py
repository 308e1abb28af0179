"""Runs one request's tasks: order, concurrency, timeouts, isolation and reporting.

Knows nothing about ASGI or servers: a `Batch` gets a request's task list, the settings
and, when the request's outcome says so, the reason to skip the tasks not marked
`always`. The middleware runs it in place, or hands it to an `Owner` that runs it
detached from the request.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import inspect
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar
from asgiref.sync import iscoroutinefunction

from ._context import Phase, captures
from ._task import UNSET, TaskState

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Generator
    from contextvars import Context

    from ._context import RequestTasks
    from ._options import ErrorHook
    from ._task import TaskHandle

__all__ = [
    "THREADS",
    "Batch",
    "Settings",
    "TaskEnvironment",
    "TaskSpans",
    "asyncio_loop",
    "finished",
    "run_now",
    "wait_idle",
]

logger = logging.getLogger("post_response")

THREADS = 40  # threads for sync tasks: per process on asyncio, per run on trio
_limiter: RunVar[anyio.CapacityLimiter] = RunVar("post_response.threads")
_T = TypeVar("_T")

_PENDING, _CANCELLED = TaskState.PENDING, TaskState.CANCELLED


class TaskEnvironment(Protocol):
    """What a framework needs around each task (Django: its database connections)."""

    def run_sync(self, call: Callable[[], _T]) -> _T:
        """Call `call` in the worker thread that runs a sync task."""

    def run_async(self, awaitable: Awaitable[_T]) -> Awaitable[_T]:
        """Wrap an async task; awaited inside the task's context."""


class TaskSpans(Protocol):
    """Tracing: a span around each task that runs."""

    def start(self, task: TaskHandle) -> object:
        """Open the task's span (and make it current in the task's context)."""

    def end(self, span: object, task: TaskHandle, error: BaseException | None) -> None:
        """Close the span, recording the task's outcome and `error` if it failed."""


@dataclass(frozen=True)
class Settings:
    """How to run a request's tasks (the middleware builds it from its options)."""

    concurrency: int = 1
    timeout: float | None = None
    on_error: ErrorHook | None = None
    environment: TaskEnvironment | None = None
    spans: TaskSpans | None = None


class Batch:
    """One request's tasks, ready to run once its response is complete.

    With `skip_reason`, the tasks not marked `always` are skipped and logged instead of
    run. With a `limiter`, each task holds one of its tokens while it runs, which bounds
    how many tasks run at once across all requests.
    """

    __slots__ = ("limiter", "next", "request", "settings", "skip_reason", "tasks")

    def __init__(
        self,
        request: RequestTasks,
        settings: Settings,
        skip_reason: str | None = None,
        limiter: anyio.CapacityLimiter | None = None,
    ) -> None:
        request.phase = Phase.DRAINING  # add_task() from a task now joins this batch
        self.request = request
        self.tasks = request.tasks
        self.settings = settings
        self.skip_reason = skip_reason
        self.limiter = limiter
        self.next = 0
        _unfinished.add(self)

    async def run(self, *, cancelled: TaskState = _CANCELLED, reason: str = "") -> None:
        """Run every pending task, including those added while this runs, then close.

        If this is cancelled, each task that had not started ends in the `cancelled`
        state (logged with `reason`), and the cancellation propagates.
        """
        try:
            if self.settings.concurrency == 1:
                await self._work()
            else:
                await self._work_concurrently()
        except BaseException:
            self.abandon(cancelled, reason or "the drain was cancelled")
            raise
        finally:
            self.close()

    @property
    def label(self) -> str:
        return self.request.label

    def close(self) -> None:
        """The batch is over: its request accepts no more tasks and lets go of them."""
        self.request.close()
        _unfinished.discard(self)
        if _idle_waiters and not _unfinished:  # the lock only when someone waits
            with _idle:
                _idle.notify_all()

    def capture(self, into: list[TaskHandle]) -> None:
        """For tests: record the tasks that would run into `into`, pending; skip the rest."""
        for task in self.tasks:
            if task.state is not _PENDING:
                continue
            if self._runs(task):
                into.append(task)
            else:
                self._skip(task)
        self.close()

    def enqueue(self, limit: int | None) -> None:
        """Count the tasks that will run as queued; past `limit` queued, drop them instead.

        Drops are logged once per request, naming each task: under overload, a log
        record per task would only add to the load.
        """
        stats, dropped = self.request.stats, []
        for task in self.tasks:
            if task.state is not _PENDING or not self._runs(task):
                continue
            if limit is not None and stats.queued >= limit:
                task._end(TaskState.DROPPED)
                dropped.append(task.name)
            else:
                task._enqueue()
        if dropped:
            request = self.request
            logger.error(
                "Dropped %d tasks of %s, max_queued=%d tasks already waiting to run: %s",
                len(dropped),
                self.label,
                limit,
                ", ".join(map(repr, dropped)),
                extra={
                    "task_names": dropped,
                    "task_outcome": TaskState.DROPPED.value,
                    "request_method": request.method,
                    "request_path": request.path,
                },
            )

    def abandon(self, state: TaskState, reason: str) -> None:
        """End every task that has not started in `state`, logging each with `reason`."""
        level = logging.WARNING if state is _CANCELLED else logging.ERROR
        for task in self.tasks:
            if task.state is _PENDING:
                task._end(state)
                task._log(level, "%s: %s", state.value, reason)

    def _runs(self, task: TaskHandle) -> bool:
        """Whether the request's outcome lets `task` run."""
        return self.skip_reason is None or task.always

    def _skip(self, task: TaskHandle) -> None:
        task._end(TaskState.SKIPPED)
        task._log(logging.WARNING, "skipped: %s", self.skip_reason)

    def _take(self) -> TaskHandle | None:
        """The next pending task in the order they were added, or None."""
        tasks = self.tasks
        while self.next < len(tasks):
            task = tasks[self.next]
            self.next += 1
            if task.state is _PENDING:
                return task
        return None

    async def _work(self) -> None:
        while (task := self._take()) is not None:
            if not self._runs(task):
                self._skip(task)
            elif self.limiter is None:
                await self._run(task)
            else:
                async with self.limiter:
                    await self._run(task)

    async def _work_concurrently(self) -> None:
        # Each worker takes the next task as soon as it is free, so tasks start in
        # order and at most `concurrency` run at once. Tasks added by a task once the
        # others have finished are picked up by the next round.
        while self.next < len(self.tasks):
            async with anyio.create_task_group() as group:
                for _ in range(min(self.settings.concurrency, len(self.tasks) - self.next)):
                    group.start_soon(self._work)

    async def _run(self, task: TaskHandle) -> None:
        """Run one task to its final state: logged, reported, traced."""
        task._start()
        settings = self.settings
        spans = settings.spans
        error: BaseException | None = None
        span = spans.start(task) if spans is not None else None
        timeout = settings.timeout if task.timeout is UNSET else task.timeout
        try:
            if timeout is None:
                await _call(task, settings.environment)
            else:
                with anyio.move_on_after(timeout) as scope:
                    await _call(task, settings.environment)
                if scope.cancelled_caught:
                    error = TimeoutError(f"Task {task.name!r} timed out after {timeout:g}s")
                    await self._timed_out(task, timeout, error)
                    return
        except Exception as exc:
            error = exc
            task._end(TaskState.FAILED)
            task._log(logging.ERROR, "failed", exc_info=exc)
            await self._report(task, exc)
        except BaseException as exc:
            error = exc
            task._end(_CANCELLED)
            task._log(logging.WARNING, "cancelled while running")
            raise
        else:
            task._end(TaskState.COMPLETED)
            task._log(logging.DEBUG, "completed in %.1f ms", (task.duration or 0) * 1000)
        finally:
            if spans is not None:
                spans.end(span, task, error)

    async def _timed_out(self, task: TaskHandle, seconds: float, error: TimeoutError) -> None:
        task._end(TaskState.TIMED_OUT)
        if _is_async(task.func):
            task._log(logging.ERROR, "timed out after %gs and was cancelled", seconds)
        else:
            task._log(
                logging.ERROR,
                "timed out after %gs; its thread keeps running until the function returns "
                "(Python cannot stop a thread)",
                seconds,
            )
        await self._report(task, error)

    async def _report(self, task: TaskHandle, exc: BaseException) -> None:
        """Hand a failure to the `on_error` hook; a failing hook is logged, never raised."""
        hook = self.settings.on_error
        if hook is None:
            return
        try:
            result = hook(task, exc)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("The on_error hook raised for task %r of %s", task.name, self.label)


async def _call(task: TaskHandle, environment: TaskEnvironment | None) -> None:
    context, func = task.context, task.func
    if task.dispatch is not None:  # a Celery task, enqueued (post_response.celery)
        await _in_thread(functools.partial(context.run, task.dispatch))
        return
    if _is_async(func):
        coroutine: Awaitable[Any] = context.run(func, *task.args, **task.kwargs)  # type: ignore[arg-type]
        if environment is not None:
            coroutine = context.run(environment.run_async, coroutine)
        await _InContext(context, coroutine)
        return
    call: Callable[[], tuple[Awaitable[Any]] | None]
    call = functools.partial(_call_sync, context, func, task.args, task.kwargs)
    if environment is not None:
        call = functools.partial(environment.run_sync, call)
    returned = await _in_thread(call)
    if returned is not None:  # e.g. `add_task(lambda: notify(user))`
        await _InContext(context, returned[0])


def _call_sync(
    context: Context, func: Callable[..., object], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Awaitable[Any]] | None:
    """Call `func` in `context` (in a worker thread); box what must still be awaited."""
    result = context.run(func, *args, **kwargs)
    return (result,) if inspect.isawaitable(result) else None


def finished(
    request: RequestTasks, settings: Settings, skip_reason: str | None, max_queued: int | None
) -> Batch | None:
    """A finished request's tasks, queued and ready to run; or None when there is nothing
    to run: no task, or `post_response.testing.capture_tasks()` took them."""
    if not request.tasks:
        request.close()
        return None
    batch = Batch(request, settings, skip_reason)
    if captures:
        batch.capture(captures[-1].request.tasks)
        return None
    batch.enqueue(max_queued)
    return batch


_unfinished: set[Batch] = set()  # batches not closed yet, for the report at exit
_idle = threading.Condition()  # notified when the last unfinished batch closes...
_idle_waiters = 0  # ...if anybody waits for that


def wait_idle(timeout: float | None) -> list[str]:
    """Block until no batch is unfinished, at most `timeout` seconds; return the names of
    the tasks still waiting or running then (empty: all done)."""
    global _idle_waiters  # noqa: PLW0603
    with _idle:
        _idle_waiters += 1
        try:
            done = _idle.wait_for(lambda: not _unfinished, timeout)
        finally:
            _idle_waiters -= 1
        if done:
            return []
        return [
            f"{task.name} of {batch.label}"
            for batch in list(_unfinished)
            for task in batch.tasks
            if task.state in (_PENDING, TaskState.RUNNING)
        ]


async def run_now(task: TaskHandle) -> None:
    """For tests: run a pending task here and now, in its context; failures propagate."""
    if task.state is not _PENDING:
        return
    task._start()
    try:
        await _call(task, None)
    except Exception:
        task._end(TaskState.FAILED)
        raise
    except BaseException:
        task._end(_CANCELLED)
        raise
    task._end(TaskState.COMPLETED)


@atexit.register
def _abandon_at_exit() -> None:
    """The process exits with tasks not run or still running (the server stopped its event
    loop without a lifespan shutdown, as daphne does): log each as abandoned."""
    for batch in list(_unfinished):
        for task in batch.tasks:
            if task.state in (_PENDING, TaskState.RUNNING):
                was = task.state.value
                task._end(TaskState.ABANDONED)
                task._log(logging.ERROR, "abandoned: the process exited while it was %s", was)


def _is_async(func: object) -> bool:
    code = getattr(func, "__code__", None)
    if code is not None and code.co_flags & inspect.CO_COROUTINE:  # `async def`: the usual case
        return True
    while isinstance(func, functools.partial):
        func = func.func
    # A callable object counts when its class defines `async def __call__`.
    return iscoroutinefunction(func) or iscoroutinefunction(type(func).__call__)


async def _in_thread(call: Callable[[], _T]) -> _T:
    """Run `call` in a worker thread; if the caller is cancelled, leave the thread running.

    On asyncio, our own `ThreadPoolExecutor`, not anyio's worker threads: anyio stops
    those when its root task ends, which under daphne (a Twisted reactor stops the loop)
    never happens, and the process then hangs at exit on SIGTERM. The executor's idle
    threads exit with the interpreter. On trio, anyio's threads are trio's daemon ones.
    """
    loop = asyncio_loop()
    if loop is None:  # trio
        return await anyio.to_thread.run_sync(call, abandon_on_cancel=True, limiter=_trio_limiter())
    return await loop.run_in_executor(_executor(), call)


def asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop, or None (under trio)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


@functools.cache
def _executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(THREADS, thread_name_prefix="post_response")


def _trio_limiter() -> anyio.CapacityLimiter:
    try:
        return _limiter.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(THREADS)
        _limiter.set(limiter)
        return limiter


class _InContext:
    """Await an awaitable with each of its steps run inside `context`.

    A coroutine runs in the context of whoever awaits it; this trampoline gives each
    task its own snapshot without spawning an asyncio or trio task per task. It is
    transparent to the event loop: whatever the coroutine yields (an asyncio future, a
    trio trap) is passed up unchanged, and whatever comes back (values, cancellation)
    is passed down.
    """

    __slots__ = ("_awaitable", "_context")

    def __init__(self, context: Context, awaitable: Awaitable[Any]) -> None:
        self._context = context
        self._awaitable = awaitable

    def __await__(self) -> Generator[Any, Any, Any]:
        run = self._context.run
        inner = run(self._awaitable.__await__)
        step, value = inner.send, None
        while True:
            try:
                signal = run(step, value)
            except StopIteration as stop:
                return stop.value
            try:
                value = yield signal
            except GeneratorExit:
                run(inner.close)
                raise
            except BaseException as exc:  # cancellation and throw(): deliver to the task
                step, value = inner.throw, exc
            else:
                step = inner.send
