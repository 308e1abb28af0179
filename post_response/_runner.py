"""Runs one request's tasks: order, concurrency, timeouts, isolation and reporting.

Knows nothing about ASGI: it is given the task list, a label for the logs and, when
the request's outcome says so, the reason to skip the tasks not marked `always`.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar
from asgiref.sync import iscoroutinefunction

from ._task import UNSET, TaskState

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Generator
    from contextvars import Context

    from ._task import TaskHandle

    ErrorHook = Callable[[TaskHandle, BaseException], object]

__all__ = ["THREADS", "Settings", "cancel_pending", "drain"]

logger = logging.getLogger("post_response")

THREADS = 40  # worker threads for sync tasks, per event loop, apart from anyio's default pool
_limiter: RunVar[anyio.CapacityLimiter] = RunVar("post_response.threads")

_PENDING, _RUNNING = TaskState.PENDING, TaskState.RUNNING


@dataclass(frozen=True)
class Settings:
    """How to run a request's tasks (the middleware builds it from its options)."""

    concurrency: int = 1
    timeout: float | None = None
    on_error: ErrorHook | None = None


async def drain(
    tasks: list[TaskHandle], label: str, settings: Settings, skip_reason: str | None = None
) -> None:
    """Run every pending task of `tasks`, including those added while this runs.

    With `skip_reason`, tasks not marked `always` are skipped and logged instead.
    If the drain itself is cancelled, every task it had not started is marked
    cancelled and logged, and the cancellation propagates.
    """
    batch = _Drain(tasks, label, settings, skip_reason)
    try:
        if settings.concurrency == 1:
            await batch.work()
        else:
            await batch.work_concurrently()
    except BaseException:
        cancel_pending(tasks[batch.next :], label, "the drain was cancelled")
        raise


def cancel_pending(tasks: list[TaskHandle], label: str, reason: str) -> None:
    """Mark each task that has not started as cancelled, and log it with `reason`."""
    for task in tasks:
        if task.state is _PENDING:
            task.state = TaskState.CANCELLED
            logger.warning("Task %r of %s cancelled before it ran: %s", task.name, label, reason)


class _Drain:
    __slots__ = ("label", "next", "settings", "skip_reason", "tasks")

    def __init__(
        self, tasks: list[TaskHandle], label: str, settings: Settings, skip_reason: str | None
    ) -> None:
        self.tasks = tasks
        self.label = label
        self.settings = settings
        self.skip_reason = skip_reason
        self.next = 0

    def take(self) -> TaskHandle | None:
        """The next pending task in the order they were added, or None."""
        tasks = self.tasks
        while self.next < len(tasks):
            task = tasks[self.next]
            self.next += 1
            if task.state is _PENDING:
                return task
        return None

    async def work(self) -> None:
        while (task := self.take()) is not None:
            if self.skip_reason is None or task.always:
                await self.run(task)
            else:
                task.state = TaskState.SKIPPED
                logger.warning("Task %r of %s skipped: %s", task.name, self.label, self.skip_reason)

    async def work_concurrently(self) -> None:
        # Each worker takes the next task as soon as it is free, so tasks start in
        # order and at most `concurrency` run at once. Tasks added by a task once the
        # others have finished are picked up by the next round.
        while self.next < len(self.tasks):
            async with anyio.create_task_group() as group:
                for _ in range(min(self.settings.concurrency, len(self.tasks) - self.next)):
                    group.start_soon(self.work)

    async def run(self, task: TaskHandle) -> None:
        task.state = _RUNNING
        timeout = self.settings.timeout if task.timeout is UNSET else task.timeout
        try:
            if timeout is None:
                await _call(task)
            else:
                with anyio.move_on_after(timeout) as scope:
                    await _call(task)
                if scope.cancelled_caught:
                    await self.timed_out(task, timeout)
                    return
        except Exception as exc:
            task.state = TaskState.FAILED
            logger.error("Task %r of %s failed", task.name, self.label, exc_info=exc)
            await self.report(task, exc)
            return
        except BaseException:
            task.state = TaskState.CANCELLED
            logger.warning("Task %r of %s cancelled while running", task.name, self.label)
            raise
        task.state = TaskState.COMPLETED

    async def timed_out(self, task: TaskHandle, seconds: float) -> None:
        task.state = TaskState.TIMED_OUT
        if _is_async(task.func):
            logger.error(
                "Task %r of %s timed out after %gs and was cancelled",
                task.name,
                self.label,
                seconds,
            )
        else:
            logger.error(
                "Task %r of %s timed out after %gs; its thread keeps running until the "
                "function returns (Python cannot stop a thread)",
                task.name,
                self.label,
                seconds,
            )
        await self.report(task, TimeoutError(f"Task {task.name!r} timed out after {seconds:g}s"))

    async def report(self, task: TaskHandle, exc: BaseException) -> None:
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


async def _call(task: TaskHandle) -> None:
    context, func = task.context, task.func
    if _is_async(func):
        await _InContext(context, context.run(func, *task.args, **task.kwargs))  # type: ignore[arg-type]
        return
    awaitable = await anyio.to_thread.run_sync(
        functools.partial(_call_sync, context, func, task.args, task.kwargs),
        abandon_on_cancel=True,
        limiter=_thread_limiter(),
    )
    if awaitable is not None:  # e.g. `add_task(lambda: notify(user))`
        await _InContext(context, awaitable[0])


def _call_sync(
    context: Context, func: Callable[..., object], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Awaitable[Any]] | None:
    """Call `func` in `context` (in a worker thread); box what must still be awaited."""
    result = context.run(func, *args, **kwargs)
    return (result,) if inspect.isawaitable(result) else None


def _is_async(func: object) -> bool:
    while isinstance(func, functools.partial):
        func = func.func
    # A callable object counts when its class defines `async def __call__`.
    return iscoroutinefunction(func) or iscoroutinefunction(type(func).__call__)


def _thread_limiter() -> anyio.CapacityLimiter:
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
