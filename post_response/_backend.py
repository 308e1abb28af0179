"""Where asyncio and trio differ, behind one seam chosen once per event loop.

The owner and the runner ask the running loop's `Backend` to start a worker, park it
until there is work, run a sync call in a thread, and tell whether a task cancelled
itself. Everything above this module is the same on both.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import sys
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar

from ._call import OwnCancellation
from ._pressure import pressure
from ._threads import THREADS, Call, pool

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Coroutine
    from contextlib import AbstractAsyncContextManager
    from contextvars import Context

    from anyio.abc import TaskGroup, TaskStatus

__all__ = ["Backend", "Workers", "asyncio_loop", "current"]

_T = TypeVar("_T")


class Workers(Protocol):
    """Where an owner's workers run: out of reach of a loop that closes without asking.

    A loop torn down without a lifespan shutdown (`asyncio.run()` returning, a test
    client's portal closing) cancels everything it finds; workers kept here are not
    found, so the owner can finish their tasks first, within its shutdown timeout.
    """

    def start(self, worker: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Start `worker` in an empty context (it outlives the request that starts it)."""

    async def stop(self) -> None:
        """Cancel every worker and wait for them."""


class Backend(Protocol):
    @property
    def cancelled(self) -> type[BaseException]:
        """The exception by which the runtime cancels a task."""

    @property
    def delivers_by_throw(self) -> bool:
        """Whether the loop throws its cancellation into a task (asyncio), so that one
        raised out of a task's own step is the task's (trio sends it in as a value)."""

    def workers(self) -> AbstractAsyncContextManager[Workers]:
        """A place for workers, open while the block runs; its end stops them."""

    def spot(self) -> Any:
        """A new place for a worker to park: await it; `wake(spot)` ends the wait."""

    def wake(self, spot: Any) -> None:
        """End the wait of the worker parked at `spot`."""

    def spawn(self, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run `main` detached from the caller, for as long as the event loop runs."""

    async def run_in_thread(self, call: Callable[[], _T], started: Callable[[], None]) -> _T:
        """Run `call` in a worker thread, calling `started()` here once a thread takes it.

        Cancelled before that, the call never runs; after it, the thread runs on.
        """

    def now(self) -> float:
        """The event loop's clock, as cancel scopes' deadlines read it; callable where
        `anyio.current_time()` is not (an asyncio callback, which anyio cannot tell from
        code outside any loop)."""

    def own_task(self) -> Any:
        """The current asyncio task, whose `_must_cancel` is set while it runs only when it
        called `cancel()` on itself (the loop's own cancellations reach a task while it is
        suspended, and leave it unset); None where tasks cannot do that (trio)."""

    def forgive_self_cancel(self) -> None:
        """Forget a cancellation the current task asked for itself, once it is handled."""

    def call_from_thread(self, callback: Callable[..., object], *args: Any) -> object:
        """Have the loop call `callback(*args)` soon, from any thread; raises RuntimeError
        once the loop is closed. Asyncio only (`runs_tasks_alone`)."""

    @property
    def runs_tasks_alone(self) -> bool:
        """Whether each post_response task can get an event-loop task of its own
        (`start()`); else (trio) the owner runs them on its parked workers."""

    def start(self, coroutine: Coroutine[Any, Any, None], context: Context) -> Any:
        """Start `coroutine` as a task of its own in `context`, out of the loop's sight
        (as workers are): the caller keeps it, and cancels it with `stop()`."""

    async def stop(self, tasks: list[Any]) -> None:
        """Cancel `tasks` (started with `start()`) and wait until they have ended."""


def asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop, or None (under trio)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class AsyncioBackend:
    """Workers are plain asyncio tasks outside any task group (anyio's `start_soon` costs
    several times `create_task`; see docs/benchmarks.md); sync calls go to `_threads`."""

    cancelled = asyncio.CancelledError
    delivers_by_throw = True
    runs_tasks_alone = True

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.call_from_thread = loop.call_soon_threadsafe
        self.now = loop.time

    @contextlib.asynccontextmanager
    async def workers(self) -> AsyncIterator[Workers]:
        workers = _AsyncioWorkers(self.loop)
        try:
            yield workers
        finally:
            await workers.stop()

    def spot(self) -> Any:
        return self.loop.create_future()

    def wake(self, spot: Any) -> None:
        if not spot.done():
            spot.set_result(None)

    def spawn(self, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
        _start_task(self.loop, main(), _detached)

    async def run_in_thread(self, call: Callable[[], _T], started: Callable[[], None]) -> _T:
        loop = self.loop
        future: asyncio.Future[_T] = loop.create_future()
        begun = False

        def begin() -> None:
            nonlocal begun
            if not begun:
                begun = True
                started()
                if job.waited:
                    pool.note_wait(job)

        def settle(start: bool, result: Any, error: BaseException | None) -> None:
            if start:
                loop_call(begin)
            elif error is None:
                loop_call(_set_result, future, result)
            elif isinstance(error, asyncio.CancelledError):  # raised by the call: its own,
                loop_call(_set_exception, future, OwnCancellation(error))  # not the runtime's
            else:  # see `_Raised`
                loop_call(_set_result, future, _Raised(error))

        def loop_call(callback: Callable[..., None], *args: Any) -> None:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(callback, *args)

        job = Call(call, settle)
        if pool.submit(job):
            begin()
        else:
            pool.note_wait()
        try:
            result = await future
        except BaseException:
            if not pool.withdraw(job):  # a thread has it: it is running, whatever we heard
                begin()
            raise
        if isinstance(result, _Raised):
            raise result.error
        return result

    own_task = staticmethod(asyncio.current_task)  # a C function: no frame per task

    def start(self, coroutine: Coroutine[Any, Any, None], context: Context) -> Any:
        task = _create_task(self.loop, coroutine, context)
        _unregister_task(task)
        return task

    async def stop(self, tasks: list[Any]) -> None:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.wait(tasks)

    def forgive_self_cancel(self) -> None:
        task: Any = asyncio.current_task()
        if hasattr(task, "uncancel") and task.cancelling():  # Python 3.11+
            task.uncancel()


class TrioBackend:
    """Workers are tasks of the owner's group; sync calls use trio's daemon threads, at
    most `THREADS` at once per run."""

    delivers_by_throw = False
    runs_tasks_alone = False
    now = staticmethod(anyio.current_time)  # `started()` is called in a task on trio

    @property
    def cancelled(self) -> type[BaseException]:
        return anyio.get_cancelled_exc_class()

    @contextlib.asynccontextmanager
    async def workers(self) -> AsyncIterator[Workers]:
        async with anyio.create_task_group() as host:
            # Shielded: in a run already ending, trio would leave a started child in the
            # cancelled start-up nursery, and both would wait for each other for ever.
            with anyio.CancelScope(shield=True):
                workers: _TrioWorkers = await host.start(_TrioWorkers.host)
            try:
                yield workers
            finally:
                await workers.stop()

    def spot(self) -> Any:
        return _Event()

    def wake(self, spot: Any) -> None:
        spot.wake()

    def spawn(self, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
        trio = sys.modules["trio"]
        trio.lowlevel.spawn_system_task(main, name="post_response owner")

    async def run_in_thread(self, call: Callable[[], _T], started: Callable[[], None]) -> _T:
        admitted, unbounded = _trio_limiters()
        if admitted.available_tokens < 1:
            pressure.note("threads", THREADS, admitted.statistics().tasks_waiting + 1)
        async with admitted:  # waiting here is waiting for a thread: the task is queued
            started()
            return await anyio.to_thread.run_sync(call, abandon_on_cancel=True, limiter=unbounded)

    def own_task(self) -> Any:
        return None  # trio cancels through scopes only, which the task's code owns

    def forgive_self_cancel(self) -> None:
        pass

    def call_from_thread(self, callback: Callable[..., object], *args: Any) -> object:
        msg = "trio runs sync tasks with anyio.to_thread"
        raise NotImplementedError(msg)

    def start(self, coroutine: Coroutine[Any, Any, None], context: Context) -> Any:
        coroutine.close()
        msg = "trio runs post_response tasks on the owner's workers"
        raise NotImplementedError(msg)

    async def stop(self, tasks: list[Any]) -> None:
        pass


class _AsyncioWorkers:
    """Plain asyncio tasks (anyio's `start_soon` costs several times `create_task`; see
    docs/benchmarks.md), left out of `asyncio.all_tasks()`, which is what a closing loop
    cancels; the owner, which the loop does find, cancels them when it is done."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, worker: Callable[[], Coroutine[Any, Any, None]]) -> None:
        task = _start_task(self._loop, worker(), self._tasks)
        _unregister_task(task)

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            with anyio.CancelScope(shield=True):
                await asyncio.wait(tasks)


class _TrioWorkers:
    """Tasks of a shielded task group hosted by a task of its own, so that a run ending
    (which cancels its system tasks) does not reach them; `stop()` cancels them."""

    def __init__(self, group: TaskGroup) -> None:
        self._group = group
        self._stopped = anyio.Event()

    @classmethod
    async def host(cls, *, task_status: TaskStatus[_TrioWorkers]) -> None:
        async with anyio.create_task_group() as group:
            group.cancel_scope.shield = True
            workers = cls(group)
            task_status.started(workers)
            await workers._stopped.wait()
            group.cancel_scope.cancel()

    def start(self, worker: Callable[[], Coroutine[Any, Any, None]]) -> None:
        contextvars.Context().run(self._group.start_soon, worker)

    async def stop(self) -> None:
        self._stopped.set()


class _Event:
    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = anyio.Event()

    def wake(self) -> None:
        self._event.set()

    def __await__(self) -> Any:
        return self._event.wait().__await__()


_trio = TrioBackend()
_last: tuple[object, AsyncioBackend] | None = None  # the last asyncio loop's backend
_backends: RunVar[AsyncioBackend] = RunVar("post_response.backend")
_limiters: RunVar[tuple[anyio.CapacityLimiter, anyio.CapacityLimiter]] = RunVar(
    "post_response.threads"
)
_detached: set[asyncio.Task[None]] = set()  # strong references to spawned owners' tasks


def current() -> Backend:
    """The running event loop's backend."""
    global _last  # noqa: PLW0603  (a one-entry cache: anyio's RunVar costs a lookup per call)
    loop = asyncio_loop()
    if loop is None:
        return _trio
    last = _last
    if last is not None and last[0] is loop:
        return last[1]
    backend = _backends.get(None)
    if backend is None:
        backend = AsyncioBackend(loop)
        _backends.set(backend)
    _last = (loop, backend)
    return backend


def _trio_limiters() -> tuple[anyio.CapacityLimiter, anyio.CapacityLimiter]:
    try:
        return _limiters.get()
    except LookupError:
        limiters = (anyio.CapacityLimiter(THREADS), anyio.CapacityLimiter(math.inf))
        _limiters.set(limiters)
        return limiters


class _Raised:
    """What a sync call raised, carried as the future's result and raised where it is
    awaited. Not the future's exception: a `StopIteration` cannot be one (the future would
    never be done), and a `GeneratorExit` thrown into the awaiting coroutine closes every
    coroutine up the chain instead (as `coroutine.close()` does), the whole batch."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _start_task(
    loop: asyncio.AbstractEventLoop,
    coroutine: Coroutine[Any, Any, None],
    registry: set[asyncio.Task[None]],
) -> asyncio.Task[None]:
    """Start an asyncio task that outlives the request that starts it, kept in `registry`.

    Its context is empty, and so is its done callback's: a task or a callback made in the
    request's context would keep a copy of it, and with it the request's task list, alive
    for as long as the task lives.
    """
    context = contextvars.Context()
    task = context.run(loop.create_task, coroutine)
    registry.add(task)
    task.add_done_callback(registry.discard, context=context)
    return task


def _create_task(
    loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, None], context: Context
) -> asyncio.Task[None]:
    if sys.version_info >= (3, 11):
        return loop.create_task(coroutine, context=context)
    return context.run(loop.create_task, coroutine)  # the task runs in a copy of `context`


# Low-level asyncio API "for third-party task implementations" (Python 3.10-3.13).
_unregister_task: Callable[[asyncio.Task[Any]], None] = getattr(
    asyncio.tasks, "_unregister_task", lambda task: None
)
