"""Calling one task: on the event loop in its context snapshot, or in a worker thread.

`call()` tells its caller when the task starts (at once for an async task; when a thread
takes it for a sync one) and lets every exception of the task through as it is, with one
change: a cancellation that the task raised or asked for itself, rather than one the
runtime delivered, comes out as `OwnCancellation`, an ordinary failure of that task.
"""

from __future__ import annotations

import functools
import inspect
from types import FunctionType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from asgiref.sync import iscoroutinefunction

from ._checks import GENERATORS, returned_generator
from ._task import NO_KWARGS, TaskState

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Generator
    from contextvars import Context

    from ._backend import Backend
    from ._task import TaskHandle

__all__ = [
    "NotStarted",
    "OwnCancellation",
    "TaskEnvironment",
    "call",
    "call_sync",
    "has_ended",
    "in_context",
    "is_async",
]

_T = TypeVar("_T")
_PENDING, _RUNNING = TaskState.PENDING, TaskState.RUNNING


class TaskEnvironment(Protocol):
    """What a framework needs around each task (Django: its database connections)."""

    def run_sync(self, call: Callable[[], _T]) -> _T:
        """Call `call` in the worker thread that runs a sync task."""

    def run_async(self, awaitable: Awaitable[_T]) -> Awaitable[_T]:
        """Wrap an async task; awaited inside the task's context."""


class NotStarted(Exception):
    """The task was cancelled while it waited for a worker thread: it is not called."""


class OwnCancellation(Exception):
    """A task ended with a cancellation that nobody but the task itself asked for.

    It is the task's failure, not the runtime's cancellation: the rest of the batch runs.
    """

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


async def call(
    task: TaskHandle,
    environment: TaskEnvironment | None,
    backend: Backend,
    started: Callable[[], None],
) -> None:
    """Run `task` to its end; `started()` is called once it has started."""
    context, func = task.context, task.func
    if task.dispatch is not None:  # handed to a queue (post_response.celery)
        dispatch = functools.partial(context.run, task.dispatch)
        await backend.run_in_thread(functools.partial(_unless_ended, task, dispatch), started)
        return
    if is_async(func):
        started()
        coroutine: Awaitable[Any] = context.run(func, *task.args, **(task._kwargs or NO_KWARGS))  # type: ignore[arg-type]
        if environment is not None:
            coroutine = context.run(environment.run_async, coroutine)
        await _InContext(context, coroutine, backend)
        return
    call: Callable[[], tuple[Awaitable[Any]] | None]
    call = functools.partial(call_sync, context, func, task.args, task._kwargs or NO_KWARGS)
    if environment is not None:
        call = functools.partial(environment.run_sync, call)
    returned = await backend.run_in_thread(functools.partial(_unless_ended, task, call), started)
    if returned is not None:  # e.g. `add_task(lambda: notify(user))`
        await _InContext(context, returned[0], backend)


def has_ended(task: TaskHandle) -> bool:
    """Whether `task` is in a final state already: cancelled while it waited for a worker
    thread, say, in the moment a thread took it."""
    return task.state is not _PENDING and task.state is not _RUNNING


def _unless_ended(task: TaskHandle, call: Callable[[], _T]) -> _T:
    """In the worker thread: `call()`, unless the task was cancelled while it waited for
    the thread (it is pending until the loop hears that a thread took it)."""
    if has_ended(task):
        raise NotStarted
    return call()


def call_sync(
    context: Context, func: Callable[..., object], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Awaitable[Any]] | None:
    """Call `func` in `context` (in a worker thread); box what must still be awaited.

    Raises:
        InvalidTaskError: `func` returned a generator, whose body nobody would run.
    """
    result = context.run(func, *args, **kwargs)
    if result is None:  # the usual case: no ABC check
        return None
    if inspect.isawaitable(result):
        return (result,)
    if isinstance(result, GENERATORS):
        raise returned_generator(result)
    return None


def is_async(func: object) -> bool:
    """Whether calling `func` returns something to await (`async def`, or a callable
    object whose class defines `async def __call__`)."""
    code = getattr(func, "__code__", None)
    if code is not None:
        if code.co_flags & inspect.CO_COROUTINE:  # `async def`: the usual case
            return True
        if type(func) is FunctionType and not func.__dict__:
            return False  # a plain `def`: only an attribute could mark it as async
    while isinstance(func, functools.partial):
        func = func.func
    return iscoroutinefunction(func) or iscoroutinefunction(type(func).__call__)


def in_context(context: Context, awaitable: Awaitable[_T], backend: Backend) -> Awaitable[_T]:
    """`awaitable`, each of its steps run inside `context` (see `_InContext`)."""
    return _InContext(context, awaitable, backend)


class _InContext:
    """Await an awaitable with each of its steps run inside `context`.

    A coroutine runs in the context of whoever awaits it; this trampoline gives each
    task its own snapshot without spawning an asyncio or trio task per task. It is
    transparent to the event loop: whatever the coroutine yields (an asyncio future, a
    trio trap) is passed up unchanged, and whatever comes back (values, cancellation)
    is passed down.

    It also sees where a cancellation comes from. One the loop throws in, that the task
    did not ask for, is the runtime's and passes through. One the task raises out of its
    own step, or asks for by cancelling its own asyncio task, is the task's failure: it
    comes out as `OwnCancellation`, so the worker running the task carries on.
    """

    __slots__ = ("_awaitable", "_backend", "_context")

    def __init__(self, context: Context, awaitable: Awaitable[Any], backend: Backend) -> None:
        self._context = context
        self._awaitable = awaitable
        self._backend = backend

    def __await__(self) -> Generator[Any, Any, Any]:
        run, backend = self._context.run, self._backend
        inner = run(self._awaitable.__await__)
        send, throw = inner.send, inner.throw
        me = backend.own_task()
        step, value = send, None
        own = False  # the task asked to cancel itself, and that has not reached it yet
        while True:
            try:
                signal = run(step, value)
            except StopIteration as stop:
                return stop.value
            except backend.cancelled as exc:
                if own or (step is send and backend.delivers_by_throw):  # the task's own
                    backend.forgive_self_cancel()
                    raise OwnCancellation(exc) from exc
                raise
            own = (own and step is send) or (me is not None and me._must_cancel)
            try:
                value = yield signal
            except GeneratorExit:
                run(inner.close)
                raise
            except BaseException as exc:
                step, value = throw, exc
            else:
                step = send
