"""Running one request's tasks: order, concurrency, timeouts, isolation and reporting.

Knows nothing about ASGI or servers: a `Batch` gets a finished request's task list, the
settings and, when the request's outcome says so, the reason to skip the tasks not
marked `always`. The middleware runs it in place, or hands it to an `Owner` that runs it
detached from the request. Whatever a task raises ends that task, in one state, logged;
only the runtime's own cancellation ends the batch.
"""

from __future__ import annotations

import inspect
import logging
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import anyio

from . import _backend, _context, _registry
from ._call import NotStarted, OwnCancellation, call, has_ended, is_async
from ._task import UNSET, TaskState
from ._threads import THREADS

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from ._backend import Backend
    from ._call import TaskEnvironment
    from ._context import RequestTasks
    from ._dispatch import Dispatchers
    from ._options import ErrorHook
    from ._owner import Owner
    from ._task import TaskHandle

__all__ = ["BACKOFF_CAP", "Batch", "Settings", "TaskSpans", "backoff_delay", "finished"]

logger = logging.getLogger("post_response")

_PENDING, _RUNNING = TaskState.PENDING, TaskState.RUNNING
_CANCELLED, _ABANDONED = TaskState.CANCELLED, TaskState.ABANDONED
_THREAD_RUNS_ON = (
    "its thread keeps running until the function returns (Python cannot stop a thread)"
)


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
    dispatchers: Dispatchers | None = None
    retries: int = 0
    backoff: float = 0.5
    # Nothing to do around each task (no default timeout, span or framework environment):
    # its tasks without options of their own can run as they are (see `Owner`).
    plain: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        plain = self.timeout is None and self.spans is None and self.environment is None
        object.__setattr__(self, "plain", plain)


BACKOFF_CAP = 60.0  # seconds: the longest wait between two attempts


def backoff_delay(backoff: float, retry: int) -> float:
    """Seconds before retry number `retry` (1-based): `backoff` doubled at each retry, at
    most `BACKOFF_CAP`, less a random part of up to half (so that the retries of many
    tasks that failed together do not come back together)."""
    ceiling = min(backoff * 2.0 ** min(retry - 1, 64), BACKOFF_CAP)
    return ceiling * (0.5 + random.random() / 2)  # noqa: S311  (jitter, not a secret)


def finished(request: RequestTasks, settings: Settings, skip_reason: str | None) -> Batch | None:
    """A finished request's tasks, ready to run; or None when there is nothing to run:
    no task, or `post_response.testing.capture_tasks()` took them."""
    if not request.tasks:
        request.close()
        return None
    if _context.captures:
        _context.captures[-1].take_over(request, skip_reason)
        return None
    return Batch(request, settings, skip_reason)


class Batch:
    """One request's tasks, ready to run once its response is complete.

    With `skip_reason`, the tasks not marked `always` are skipped and logged instead of
    run. The owner that runs it sets `limiter`: each task then holds one of its tokens
    while it runs, which bounds how many tasks run at once across all requests. An owner
    that runs it detached also sets `owner`: a task with a delay, a busy key or a retry to
    wait for is then handed to it instead of waited for here. Without one (`detach=False`)
    delays and backoffs are slept here, and keys act within the request only.
    """

    backend: Backend  # set by the owner that admits it

    __slots__ = (
        "_tasks",
        "backend",
        "limiter",
        "owner",
        "request",
        "runner",
        "settings",
        "skip_reason",
    )

    def __init__(
        self, request: RequestTasks, settings: Settings, skip_reason: str | None = None
    ) -> None:
        request.drain()  # add_task() from a task now joins this batch
        self.request = request
        # Kept for reports once the request lets go of it.
        self._tasks: Sequence[TaskHandle] = request.tasks
        self.settings = settings
        self.skip_reason = skip_reason
        self.limiter: anyio.CapacityLimiter | None = None
        self.owner: Owner | None = None
        self.runner: object = None  # the event-loop task running it now, if it has its own
        _registry.unfinished[self] = None  # (`_registry.add`, without the call)

    @property
    def label(self) -> str:
        return self.request.label

    @property
    def origin(self) -> RequestTasks:
        """The request whose tasks these are."""
        return self.request

    def batches(self) -> list[Batch]:
        """Itself, as the registry asks of what it holds (`_registry.Holder`)."""
        return [self]

    def tasks(self) -> Sequence[TaskHandle]:
        """Every task of the batch so far, in the order they were added."""
        return self._tasks

    def runnable(self) -> list[TaskHandle]:
        """The pending tasks that the request's outcome lets run."""
        if self.skip_reason is None:
            return [t for t in self._tasks if t.state is _PENDING]
        return [t for t in self._tasks if t.state is _PENDING and t.always]

    def _why(self) -> str:
        """Why the runtime cancelled the batch, for the logs: its owner says (it shuts
        down); run inline (no owner), the request was cancelled."""
        owner = self.owner
        return "the request was cancelled" if owner is None else owner._cause()

    def runs(self, task: TaskHandle) -> bool:
        """Whether the request's outcome lets `task` run."""
        return self.skip_reason is None or task.always

    async def run(self, *, cancelled: TaskState = _CANCELLED) -> None:
        """Run every pending task, including those added while this runs, then end.

        If the runtime cancels this (shutdown, the server cancelling the request), each
        task not started yet ends in `cancelled`, each logged with the reason `_why()`
        gives then, and the cancellation propagates.
        """
        try:
            if self.settings.concurrency == 1:
                await self._work(close=True)
            else:
                await self._work_concurrently()
        except BaseException:
            self.abandon(cancelled, f"{self._why()} before it started")
            raise
        finally:
            self._ended()

    def close(self) -> None:
        """The batch is over: its request accepts no more tasks."""
        self.request.close()
        self._ended()

    def _ended(self) -> None:
        _registry.discard(self)

    def abandon(self, state: TaskState, reason: str) -> None:
        """End every task that has not started in `state`, logging each with `reason`."""
        level = logging.WARNING if state is _CANCELLED else logging.ERROR
        self.request.close()
        for task in self._tasks:
            if task.state is _PENDING:
                task._lose(state, level, "%s: %s", state.value, reason)
        self._ended()

    async def _work(self, *, close: bool) -> None:
        request, limiter = self.request, self.limiter
        while True:
            if limiter is None:
                if (task := request.take(close=close)) is None:
                    return
                if task.state is _PENDING and self.skip_reason is None and task._plan is None:
                    await self._run(task)  # the usual case, without one more call
                else:
                    await self._one(task)
                continue
            # Taken once a token is held: tasks start in order. A free token is taken
            # without a turn of the event loop (anyio's `async with` checkpoints twice).
            try:
                limiter.acquire_nowait()
            except anyio.WouldBlock:
                await limiter.acquire()
            try:
                if (task := request.take(close=close)) is None:
                    return
                await self._one(task)
            finally:
                limiter.release()

    async def _one(self, task: TaskHandle) -> None:
        if task.state is not _PENDING:  # cancelled with its handle
            return
        if self.runs(task):
            if task._plan is not None:  # a key, a delay, retries: one test for the others
                await self._run_scheduled(task)
            else:
                await self._run(task)
        else:
            task._end(TaskState.SKIPPED)
            task._log(logging.WARNING, "skipped: %s", self.skip_reason)

    async def _run_scheduled(self, task: TaskHandle) -> None:
        """Run a task with a key or a delay: now, if its owner lets it, else later."""
        owner, plan = self.owner, task._planned()
        if owner is None:  # run inside the request: wait here
            if plan.delay:
                await anyio.sleep(plan.delay)
            if task.state is _PENDING:  # not cancelled (or superseded) meanwhile
                await self._run(task)
            return
        if plan.cleared:  # the owner's batch for it, which frees its key after it
            await self._run(task)
            return
        plan.taken = True  # its key is the owner's to free from now on
        if owner.hold(task, self):
            return  # the owner runs it once its delay is over and its key is free
        try:
            await self._run(task)
        finally:
            if plan.key is not None and task.state is not _PENDING:  # not waiting for a retry
                owner.release(plan.key)

    async def _work_concurrently(self) -> None:
        # Each worker takes the next task as soon as it is free, so tasks start in order
        # and at most `concurrency` run at once. Tasks added by a task once the others
        # have finished are picked up by the next round.
        while not self.request.close_if_done():
            async with anyio.create_task_group() as group:
                for _ in range(self.settings.concurrency):
                    group.start_soon(self._work_unclosed)

    async def _work_unclosed(self) -> None:
        await self._work(close=False)

    async def _run(self, task: TaskHandle) -> None:
        """Run one task to its final state: logged, reported, traced."""
        settings = self.settings
        spans = settings.spans
        timeout = settings.timeout if task.timeout is UNSET else task.timeout
        scope = anyio.CancelScope() if timeout is not None else None
        span: object = None
        started: Callable[[], None] = task._start

        if scope is not None or spans is not None:

            def started() -> None:
                nonlocal span
                task._start()
                if scope is not None and timeout is not None:  # counts from the start; on
                    # asyncio, maybe in a loop callback (a thread took it): not anyio's clock
                    scope.deadline = self.backend.now() + timeout
                if spans is not None:
                    span = spans.start(task)

        backend, environment = self.backend, settings.environment
        error: BaseException | None = None
        again = False  # the attempt failed and is retried here (no owner), after a backoff
        try:
            if timeout is None or scope is None:
                await call(task, environment, backend, started)
            else:
                with scope:
                    await call(task, environment, backend, started)
                if scope.cancelled_caught:
                    error = TimeoutError(f"Task {task.name!r} timed out after {timeout:g}s")
                    again = await self._timed_out(task, timeout, error)
                    return
        except NotStarted:
            return  # cancelled while it waited for a thread, and logged then
        except OwnCancellation as own:
            error = own.error
            await self._fail(task, own.error, "failed: it raised a cancellation of its own")
        except backend.cancelled as exc:
            error = exc
            self._interrupted(task)
            raise
        except BaseException as exc:
            error = exc
            again = await self._fail(task, exc, "failed")
        else:
            if task.state is _RUNNING:  # not cancelled as its thread took it
                task._end(TaskState.COMPLETED)  # and logged there
        finally:
            if spans is not None and span is not None:
                spans.end(span, task, error)
            if again:
                await self._again(task)

    async def _again(self, task: TaskHandle) -> None:
        """Run a task whose attempt failed once more, after its backoff, here."""
        await anyio.sleep(task._planned().pause)
        if task.state is _PENDING:  # not cancelled meanwhile
            await self._run(task)

    def _retry(self, task: TaskHandle, exc: BaseException) -> bool:
        """Whether `task`, whose attempt just raised `exc`, gets another: then it is pending
        again, held by the owner until its backoff is over (or by this batch, without one)."""
        settings, plan = self.settings, task._plan
        retries = settings.retries if plan is None or plan.retries is None else plan.retries
        if not retries or task.dispatch is not None:  # a queue (Celery) retries its own tasks
            return False
        plan = task._planned()
        if plan.tries >= retries or not _worth_a_retry(task, exc, plan.retry_on):
            return False
        owner = self.owner
        if owner is not None and not owner.can_hold(task):
            task._log(
                logging.WARNING,
                "failed (attempt %d of %d): not retried, max_queued=%d tasks already wait "
                "for a delay, a key or a retry",
                task.attempt,
                retries + 1,
                owner._max_queued,
            )
            return False
        backoff = settings.backoff if plan.backoff is None else plan.backoff
        wait = backoff_delay(backoff, plan.tries + 1)
        task._log(
            logging.WARNING,
            "failed (attempt %d of %d): %s; retrying in %.2fs",
            task.attempt,
            retries + 1,
            _summary(exc),
            wait,
        )
        task._pause()
        if owner is not None:
            owner.retry_later(task, wait, self)
            return False
        plan.pause = wait
        return True

    def _interrupted(self, task: TaskHandle) -> None:
        """The runtime cancelled the batch while `task` waited for a thread or ran."""
        if has_ended(task):  # cancelled as its thread took it
            return
        why = self._why()
        if task.state is _PENDING:
            task._lose(
                _ABANDONED,
                logging.ERROR,
                "abandoned: %s before it started; all %d worker threads were busy until then",
                why,
                THREADS,
            )
        elif is_async(task.func) and task.dispatch is None:
            task._lose(_CANCELLED, logging.WARNING, "cancelled while running: %s", why)
        else:
            task._lose(
                _ABANDONED, logging.ERROR, "abandoned while running: %s; %s", why, _THREAD_RUNS_ON
            )

    async def _fail(self, task: TaskHandle, exc: BaseException, what: str) -> bool:
        """End `task` failed, unless it is retried; True when it is retried here."""
        if has_ended(task):  # cancelled as its thread took it
            return False
        if task.state is _PENDING:  # failed before it started (a thread could not be had)
            task._start()
        if self._retry(task, exc):
            return True
        if task.state is not _RUNNING:  # the owner retries it (shutting down: abandoned it)
            return False
        task._end(TaskState.FAILED)
        if task._plan is not None and task._plan.tries:
            what += f" after {task.attempt} attempts"
        task._log(logging.ERROR, what, exc_info=exc)
        await self._report(task, exc)
        return False

    async def _timed_out(self, task: TaskHandle, seconds: float, error: TimeoutError) -> bool:
        if has_ended(task):  # cancelled as its thread took it
            return False
        if self._retry(task, error):
            return True
        if task.state is not _RUNNING:  # the owner retries it (shutting down: abandoned it)
            return False
        task._end(TaskState.TIMED_OUT)
        if is_async(task.func) and task.dispatch is None:
            task._log(logging.ERROR, "timed out after %gs and was cancelled", seconds)
        else:
            task._log(logging.ERROR, "timed out after %gs; %s", seconds, _THREAD_RUNS_ON)
        await self._report(task, error)
        return False

    async def _report(self, task: TaskHandle, exc: BaseException) -> None:
        """Hand a failure to the `on_error` hook; a failing hook is logged, never raised."""
        hook = self.settings.on_error
        if hook is None:
            return
        try:
            result = hook(task, exc)
            if inspect.isawaitable(result):
                await result
        except _backend.current().cancelled:  # the runtime's: the shutdown deadline, say
            task._log(
                logging.WARNING,
                "%s, and its on_error hook was cancelled: %s",
                task.state.value,
                self._why(),
            )
            raise
        except BaseException:
            logger.exception(
                "The on_error hook raised for task %r of %s",
                task.name,
                self.label,
                extra=task._fields(),
            )


class HeldBatch(Batch):
    """One task the owner held back (for its delay, its key or its next attempt), as a
    batch of its own, run once the owner lets it; its end frees the task's key."""

    __slots__ = ()

    @classmethod
    def of(cls, task: TaskHandle, settings: Settings, owner: Owner) -> HeldBatch:
        origin = task.request_tasks  # logs and counters stay those of the task's request
        request = _context.RequestTasks(
            1, origin.method, origin.path, origin.stats, origin.dispatchers
        )
        request.tasks = [task]
        batch = cls(request, settings)
        batch.owner = owner
        return batch

    @property
    def task(self) -> TaskHandle:
        return self._tasks[0]

    @property
    def origin(self) -> RequestTasks:
        return self._tasks[0].request_tasks

    async def run(self, *, cancelled: TaskState = _CANCELLED) -> None:
        try:
            await super().run(cancelled=cancelled)
        finally:
            task, owner = self._tasks[0], self.owner
            plan = task._planned()
            ended = task.state is not _PENDING  # not waiting for its next attempt
            if plan.key is not None and plan.cleared and ended and owner is not None:
                owner.release(plan.key)


def _worth_a_retry(
    task: TaskHandle, exc: BaseException, retry_on: type[Exception] | tuple[type[Exception], ...]
) -> bool:
    """Whether `exc` matches `retry_on`; False, logged, when the check itself raises (a
    class whose `__instancecheck__` fails): the task then fails as it is."""
    try:
        return isinstance(exc, retry_on)
    except Exception as error:
        task._log(
            logging.ERROR, "not retried: its retry_on raised %s", _summary(error), exc_info=error
        )
        return False


def _summary(exc: BaseException) -> str:
    """`ValueError: message`, for a line that says an attempt failed (the traceback comes
    with the last attempt's failure). Never raises: an exception whose `str()` raises is
    named by its class alone, as `traceback` does, and the task is still retried."""
    name = type(exc).__name__
    try:
        text = str(exc)
    except BaseException:  # a line about a failure must not fail
        return f"{name} (its str() raised)"
    return f"{name}: {text}" if text else name
