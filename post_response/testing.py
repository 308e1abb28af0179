"""Helpers for testing code that calls `add_task()`.

- `capture_tasks()` records the tasks that requests add instead of running them, so a test
  can assert on their functions and arguments, then run them when it chooses.
- `wait_for_tasks()` blocks until every task handed off so far has ended.
- `requests_wait_for_tasks()` makes each request return from the app only once its tasks
  have ended, so an existing suite that asserts on their effects right after each request
  passes unchanged (the `post_response.pytest_plugin` turns it on for every test).

    from post_response.testing import capture_tasks

    def test_signup_sends_a_welcome_email(client):
        with capture_tasks() as tasks:
            response = client.post("/signup", params={"email": "ada@example.com"})
        assert response.status_code == 200
        [task] = tasks
        assert (task.func, task.args) == (send_welcome_email, ("ada@example.com",))
        tasks.run()  # run it now, in this test: its exceptions reach the test
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, overload

import anyio
import anyio.to_thread
from asgiref.sync import sync_to_async

from . import _backend, _context, _registry
from ._call import call
from ._checks import check_flag
from ._errors import ConfigurationError, PostResponseError
from ._task import Stats, TaskHandle, TaskState, lost

if TYPE_CHECKING:
    from types import ModuleType

    from ._call import TaskEnvironment

__all__ = [
    "CapturedTasks",
    "TasksLostError",
    "capture_tasks",
    "requests_wait_for_tasks",
    "wait_for_tasks",
    "wait_for_tasks_async",
]


class TasksLostError(PostResponseError, RuntimeError):
    """Tasks were cancelled, abandoned or dropped by the runtime instead of run to their end."""


class CapturedTasks(Sequence[TaskHandle]):
    """The tasks recorded by `capture_tasks()`, in the order they were added, not yet run.

    Each is a `TaskHandle`: `.func`, `.args`, `.kwargs`, `.name`, `.state`.
    """

    def __init__(self) -> None:
        # add_task() outside any request (Django's test client, a view called directly)
        # lands here too, as if in this pseudo-request.
        self.request = _context.RequestTasks(sys.maxsize, "TEST", "(captured)", Stats())

    @overload
    def __getitem__(self, index: int) -> TaskHandle: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[TaskHandle]: ...
    def __getitem__(self, index: int | slice) -> TaskHandle | Sequence[TaskHandle]:
        return self.request.tasks[index]

    def __len__(self) -> int:
        return len(self.request.tasks)

    def __repr__(self) -> str:
        return f"<CapturedTasks {list(self)!r}>"

    def take_over(self, request: _context.RequestTasks, skip_reason: str | None) -> None:
        """Record a finished request's tasks that its outcome lets run; skip the others."""
        request.drain()
        while (task := request.take(close=True)) is not None:
            if task.state is not TaskState.PENDING:
                continue
            if skip_reason is None or task.always:
                self.request.add(task)
            else:
                task._end(TaskState.SKIPPED)
                task._log(logging.WARNING, "skipped: %s", skip_reason)

    async def arun(self) -> None:
        """Run the captured tasks that are still pending, in order, each in its context
        snapshot. The first failure propagates, and the tasks after it stay pending.

        Under Django they use the test's database connections, as its views do (the ones
        `sync_to_async` calls use here): inside a `TestCase`'s transaction.
        """
        environment = None
        if _django() is not None and _backend.asyncio_loop() is not None:
            environment = await sync_to_async(_test_connections)()
        await self._run(environment)

    async def _run(self, environment: TaskEnvironment | None) -> None:
        for task in list(self):
            await _run_now(task, environment)

    def run(self) -> None:
        """`arun()` for sync tests (it starts an event loop; in async tests, `await arun()`)."""
        _refuse_in_event_loop("CapturedTasks.run()")
        anyio.run(self._run, _test_connections())


@contextlib.contextmanager
def capture_tasks(*, run: bool = False) -> Iterator[CapturedTasks]:
    """Record the tasks added while the block runs, instead of running them.

    Tasks from requests handled by `PostResponseMiddleware` are captured once their
    request is over, if its outcome policy would run them (skipped ones are skipped as
    usual). `add_task()` called outside any request, as under Django's test client, which
    does not go through the ASGI app, is captured too instead of raising.

    Args:
        run: Run the captured tasks when the block ends (like Django's
            `captureOnCommitCallbacks(execute=True)`).
    """
    check_flag(run, "capture_tasks(run=...)")
    if run:  # before the block, not once it ran
        _refuse_in_event_loop("capture_tasks(run=True)")
    captured = CapturedTasks()
    _context.captures.append(captured)
    try:
        yield captured
    finally:
        _context.captures.remove(captured)
    if run:
        captured.run()


def wait_for_tasks(timeout: float | None = 10.0) -> None:
    """Block until every task handed off so far has ended (in any app, loop or thread).

    For tests that let tasks run as in production, detached, and then check their effects.

    Raises:
        RuntimeError: Called on a thread that runs an event loop (an async test): use
            `await wait_for_tasks_async()`.
        TimeoutError: Tasks are still waiting or running after `timeout` seconds; the
            message names them.
        TasksLostError: Since the last call, the runtime cancelled, abandoned or dropped
            tasks instead of running them to their end (their log lines say why); the
            message names them.
    """
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0
    ):
        msg = (
            "wait_for_tasks(timeout=...) must be a number of seconds (0 or more), or None "
            f"to wait for ever; got {timeout!r}."
        )
        raise ConfigurationError(msg)
    if _in_event_loop():  # blocked, the loop could run none of its tasks until the timeout
        msg = (
            "wait_for_tasks() blocks its thread, here an event loop's (an async test): "
            "use `await wait_for_tasks_async()`."
        )
        raise RuntimeError(msg)
    if timeout is not None and timeout > threading.TIMEOUT_MAX:
        timeout = None  # `math.inf`, say: a lock would refuse it (OverflowError)
    left = _registry.wait_idle(timeout)
    if left:
        msg = f"{len(left)} tasks still not done after {timeout}s: {', '.join(left)}"
        raise TimeoutError(msg)
    if lost:
        names = list(lost)
        lost.clear()
        msg = (
            f"{len(names)} tasks did not run to their end: {', '.join(names)}. Their log "
            "lines on the `post_response` logger say why."
        )
        raise TasksLostError(msg)


async def wait_for_tasks_async(timeout: float | None = 10.0) -> None:  # noqa: ASYNC109
    """`wait_for_tasks()` for async tests: waits in a thread, so the tasks can run."""
    await anyio.to_thread.run_sync(wait_for_tasks, timeout, abandon_on_cancel=True)


@contextlib.contextmanager
def requests_wait_for_tasks() -> Iterator[None]:
    """Within the block, a request's call into the app returns only once its tasks ended.

    The tasks still run after the response, detached, with the outcome policy, errors
    and logs of production; only the caller waits: a test client (Starlette's
    `TestClient`, httpx's `ASGITransport`, a WSGI test client) returns once they have
    run, so a test can assert on their effects right away. Under Django's test client,
    which calls views without the ASGI app, the tasks a view adds run when its request
    finishes (as after a 200 response, or skipped when the view raised).
    """
    _registry.held_requests += 1
    disconnect = _hold_django_test_client()
    try:
        yield
    finally:
        _registry.held_requests -= 1
        if disconnect is not None:
            disconnect()


def _in_event_loop() -> bool:
    """An event loop (asyncio's or trio's) runs on this thread."""
    trio = sys.modules.get("trio")
    return _backend.asyncio_loop() is not None or (trio is not None and trio.lowlevel.in_trio_run())


def _refuse_in_event_loop(what: str) -> None:
    """`what` starts an event loop to run the tasks: refuse it inside one (asyncio or trio)."""
    if not _in_event_loop():
        return
    msg = (
        f"{what} runs the tasks in an event loop of its own; inside one (an async test), "
        "use `with capture_tasks() as tasks:`, then `await tasks.arun()`."
    )
    raise RuntimeError(msg)


def _hold_django_test_client() -> Callable[[], None] | None:
    django = _django()
    return None if django is None else django.run_test_client_tasks()


def _test_connections() -> TaskEnvironment | None:
    """Under Django, what runs tasks on this thread's database connections (a test's)."""
    django = _django()
    return None if django is None else django.SharedConnections(django.thread_connections())


def _django() -> ModuleType | None:
    """`post_response._django` where Django is in use (its settings configured), else None."""
    django_conf = sys.modules.get("django.conf")
    if django_conf is None or not django_conf.settings.configured:
        return None
    from . import _django  # noqa: PLC0415  (it imports Django)

    return _django


async def _run_now(task: TaskHandle, environment: TaskEnvironment | None = None) -> None:
    """Run a pending task here and now, in its context; its failure propagates."""
    if task.state is not TaskState.PENDING:
        return
    try:
        await call(task, environment, _backend.current(), task._start)
    except Exception:
        task._end(TaskState.FAILED)
        raise
    except BaseException:
        task._end(TaskState.CANCELLED)
        raise
    task._end(TaskState.COMPLETED)
