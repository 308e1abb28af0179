"""Detached execution: the owner, global backpressure, and graceful shutdown at lifespan."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from post_response import PostResponseMiddleware, TaskHandle, TaskState, _threads, add_task
from post_response._pressure import pressure
from post_response._threads import THREADS, pool
from post_response._types import Message, Receive, Scope, Send

from .harness import Exchange, http_scope

pytestmark = pytest.mark.anyio

OK: list[Message] = [
    {"type": "http.response.start", "status": 200, "headers": []},
    {"type": "http.response.body", "body": b"ok"},
]


def adding(*tasks: Any, log: list[str] | None = None) -> Any:
    """An app that adds `tasks` (each a callable, or (callable, args...)), then answers 200."""
    handles: list[TaskHandle] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # an app with its own cleanup at shutdown
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            if log is not None:
                log.append("app cleanup")
            await send({"type": "lifespan.shutdown.complete"})
            return
        for task in tasks:
            func, *args = task if isinstance(task, tuple) else (task,)
            handles.append(add_task(func, *args))
        for message in OK:
            await send(message)

    app.handles = handles  # type: ignore[attr-defined]
    return app


async def until(condition: Callable[[], bool]) -> None:
    """Let other tasks run until `condition` holds (the test's `fail_after` bounds it)."""
    while not condition():
        await anyio.sleep(0)


async def request(app: PostResponseMiddleware) -> None:
    """One request, without waiting for its tasks (unlike `Exchange.run`)."""
    await app(http_scope(), Exchange().receive, Exchange().send)


@asynccontextmanager
async def lifespan(app: PostResponseMiddleware) -> AsyncIterator[list[Message]]:
    """Run the app's lifespan around the block: startup on entry, shutdown on exit."""
    to_app, app_receives = anyio.create_memory_object_stream[Message](10)
    sent: list[Message] = []
    started = anyio.Event()

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "lifespan.startup.complete":
            started.set()

    async with anyio.create_task_group() as group, to_app, app_receives:
        group.start_soon(
            app, {"type": "lifespan", "asgi": {"version": "3.0"}}, app_receives.receive, send
        )
        await to_app.send({"type": "lifespan.startup"})
        await started.wait()
        yield sent
        await to_app.send({"type": "lifespan.shutdown"})


async def test_the_app_call_returns_before_its_tasks_run(detach: bool) -> None:
    """Detached, the request's app call is over before its tasks start; inline, after they end."""
    log: list[str] = []
    app = PostResponseMiddleware(adding((log.append, "task")), detach=detach)
    await request(app)
    log.append("app call returned")
    await app.join()
    assert log == (["app call returned", "task"] if detach else ["task", "app call returned"])


async def test_max_running_bounds_tasks_across_requests() -> None:
    """With `max_running=3`, ten requests' tasks run three at a time, the rest queued; every
    request's app call returns at once."""
    running = peak = 0
    release = anyio.Event()

    async def work() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1

    app = PostResponseMiddleware(adding(work), max_running=3)
    with anyio.fail_after(10):
        for _ in range(10):
            await request(app)  # returns although its task has to wait
        await until(lambda: app.stats.running == 3)
        assert (app.stats.running, app.stats.queued) == (3, 7)
        release.set()
        await app.join()
    assert peak == 3
    assert app.stats.snapshot()["completed"] == 10


async def test_max_running_bounds_sync_tasks_across_requests() -> None:
    """The same with sync tasks, which hold their `max_running` slot while in their thread."""
    lock, release = threading.Lock(), threading.Event()
    running = peak = 0

    def work() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        release.wait(10)
        with lock:
            running -= 1

    app = PostResponseMiddleware(adding(work), max_running=3)
    try:
        with anyio.fail_after(10):
            for _ in range(10):
                await request(app)
            await until(lambda: app.stats.running == 3 and running == 3)
            assert (app.stats.running, app.stats.queued) == (3, 7)
    finally:
        release.set()
    with anyio.fail_after(10):
        await app.join()
    assert peak == 3
    assert app.stats.snapshot()["completed"] == 10


async def test_max_queued_drops_counts_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    """Past `max_queued` waiting tasks, new ones are dropped: counted, and logged by name."""
    release = anyio.Event()

    async def blocker() -> None:
        await release.wait()

    async def notify(user: str) -> None:
        pass

    app = PostResponseMiddleware(
        adding(blocker, (notify, "a"), (notify, "b")), max_running=1, max_queued=3
    )
    with anyio.fail_after(10):
        await request(app)  # blocker runs, its two followers wait: 2 queued
        await until(lambda: app.stats.running == 1)
        await request(app)  # one more fits; the next two are dropped
        assert app.stats.queued == 3
        release.set()
        await app.join()
    stats = app.stats.snapshot()
    assert (stats["dropped"], stats["completed"], stats["queued"]) == (2, 4, 0)
    [record] = [r for r in caplog.records if r.getMessage().startswith("Dropped")]
    assert record.levelno == logging.ERROR
    assert record.getMessage() == (
        "Dropped 2 tasks of GET /, max_queued=3 tasks already waiting to run: "
        "'tests.test_owner.test_max_queued_drops_counts_and_logs.<locals>.notify', "
        "'tests.test_owner.test_max_queued_drops_counts_and_logs.<locals>.notify'"
    )


async def test_shutdown_waits_for_tasks_before_the_apps_own_cleanup() -> None:
    """At `lifespan.shutdown` the middleware lets queued and running tasks finish first, then
    passes the message on: the app's cleanup (closing a pool, say) comes after the tasks."""
    log: list[str] = []
    gate = anyio.Event()

    async def task(name: str) -> None:
        await gate.wait()
        log.append(name)

    app = PostResponseMiddleware(adding((task, "first"), (task, "second"), log=log))
    with anyio.fail_after(10):
        async with lifespan(app) as sent:
            await request(app)
            await until(lambda: app.stats.running == 1)
            gate.set()  # shutdown starts right after: the tasks are still running then
    assert log == ["first", "second", "app cleanup"]
    assert sent[-1] == {"type": "lifespan.shutdown.complete"}


async def test_shutdown_timeout_cancels_running_and_abandons_queued(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Past `shutdown_timeout`, a running task is cancelled and a queued one abandoned; each is
    logged by name, and the app's cleanup still runs."""
    log: list[str] = []

    async def forever() -> None:
        await anyio.sleep_forever()

    async def never_reached() -> None:
        log.append("ran")

    app = PostResponseMiddleware(adding(forever, never_reached, log=log), shutdown_timeout=0.05)
    with anyio.fail_after(10):
        async with lifespan(app):
            await request(app)
    first, second = app_handles(app)
    assert (first.state, second.state) == (TaskState.CANCELLED, TaskState.ABANDONED)
    assert log == ["app cleanup"]
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert (
        "Shutdown: shutdown_timeout=0.05s reached; cancelling 1 running tasks "
        "and abandoning 1 that have not started"
    ) in messages
    assert any(
        m.endswith(".forever' of GET / cancelled while running: the server shut down")
        for m in messages
    )
    assert any(".never_reached' of GET / abandoned: the server shut down" in m for m in messages)


async def test_an_on_error_hook_cut_by_the_shutdown_deadline_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A slow async `on_error` still running at the deadline is cancelled, and that is said:
    the operator otherwise never learns that the hook's report was not made."""
    hooked = anyio.Event()

    async def fails() -> None:
        raise ValueError("boom")

    async def slow_hook(task: TaskHandle, exc: BaseException) -> None:
        hooked.set()
        await anyio.sleep_forever()

    app = PostResponseMiddleware(adding(fails), shutdown_timeout=0.05, on_error=slow_hook)
    with anyio.fail_after(10):
        async with lifespan(app):
            await request(app)
            await hooked.wait()
    (task,) = app_handles(app)
    assert task.state is TaskState.FAILED
    assert app.stats.snapshot()["failed"] == 1
    cut = [r.getMessage() for r in caplog.records if "on_error hook" in r.getMessage()]
    assert len(cut) == 1, cut
    assert cut[0].endswith(
        ".fails' of GET / failed, and its on_error hook was cancelled: the server shut down"
    ), cut


async def test_a_request_after_shutdown_has_its_tasks_abandoned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A request served after the owner shut down cannot run its tasks: each is logged."""
    app = PostResponseMiddleware(adding(anyio.sleep_forever))
    async with lifespan(app):
        pass
    await request(app)
    [handle] = app_handles(app)
    assert handle.state is TaskState.ABANDONED
    assert any("the server had already shut down" in r.getMessage() for r in caplog.records)


def app_handles(app: PostResponseMiddleware) -> list[TaskHandle]:
    handles: list[TaskHandle] = app.app.handles  # type: ignore[attr-defined]
    return handles


async def test_workers_do_not_keep_the_requests_that_started_them_alive() -> None:
    """A value the request put in a context variable is freed once its tasks ran, although
    the worker that ran them lives on (parked for the next request)."""
    import contextvars
    import gc
    import weakref

    class Session:
        pass

    session: contextvars.ContextVar[Session] = contextvars.ContextVar("session")
    alive: list[weakref.ref[Session]] = []

    async def task() -> None:
        pass

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        value = Session()
        alive.append(weakref.ref(value))
        session.set(value)
        add_task(task)
        for message in OK:
            await send(message)

    middleware = PostResponseMiddleware(app)
    for _ in range(3):
        async with anyio.create_task_group() as group:  # a task per request, as servers do
            group.start_soon(request, middleware)
    await middleware.join()
    gc.collect()
    assert len(alive) == 3
    assert [ref() for ref in alive] == [None, None, None]


@pytest.fixture
def fresh_warnings() -> None:
    """Each test sees the first warning of each limit (they are rate-limited per process)."""
    pressure.reset()


@pytest.fixture
def patience(monkeypatch: pytest.MonkeyPatch) -> float:
    """How long sync tasks wait for a thread before the pool is warned about: shorter."""
    monkeypatch.setattr(_threads, "PATIENCE", 0.1)
    return 0.1


@pytest.mark.usefixtures("fresh_warnings")
async def test_a_limit_that_bites_is_warned_about_once_not_per_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Reaching `max_running`, then half of `max_queued`, logs one WARNING each, however
    many requests keep them reached, before anything is dropped."""
    release = anyio.Event()

    async def blocker() -> None:
        await release.wait()

    app = PostResponseMiddleware(adding(blocker), max_running=1, max_queued=4)
    with anyio.fail_after(10):
        for _ in range(4):
            await request(app)  # the first runs; the next three wait
        await until(lambda: app.stats.running == 1)
        for _ in range(3):
            await request(app)  # four waiting: one more fits, the last two are dropped
        release.set()
        await app.join()
    warnings = [r.getMessage() for r in caplog.records if getattr(r, "limit", None)]
    assert [m.split(" ")[0] for m in warnings] == ["max_running=1", "Tasks"]
    assert "reached half of max_queued=4 (" in warnings[1]
    assert app.stats.snapshot()["dropped"] == 2


@pytest.mark.usefixtures("fresh_warnings")
async def test_busy_threads_are_warned_about_once(
    caplog: pytest.LogCaptureFixture, patience: float
) -> None:
    """More sync tasks than threads, holding them: one WARNING names the pool as the limit
    that bites."""
    release = threading.Event()
    app = PostResponseMiddleware(adding(*[(release.wait, 10)] * (THREADS + 3)), concurrency=64)
    try:
        with anyio.fail_after(10):
            await request(app)
            await until(lambda: app.stats.running == THREADS)
            assert app.stats.queued == 3  # waiting for a thread: queued, not running
            await anyio.sleep(patience)
    finally:
        release.set()
    with anyio.fail_after(10):
        await app.join()
    [warning] = threads_warnings(caplog)
    assert warning.getMessage().startswith(f"All {THREADS} worker threads for sync tasks are busy")
    assert app.stats.snapshot()["completed"] == THREADS + 3


def holding(gates: list[threading.Event], entered: list[int]) -> Any:
    """An app whose request number i adds one sync task that waits for `gates[i]`."""
    lock = threading.Lock()

    def hold(gate: threading.Event) -> None:
        with lock:
            entered.append(1)
        gate.wait(10)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await adding()(scope, receive, send)
            return
        handles.append(add_task(hold, gates[len(handles)]))
        for message in OK:
            await send(message)

    handles: list[TaskHandle] = []
    app.handles = handles  # type: ignore[attr-defined]
    return app


async def fill_the_threads(app: PostResponseMiddleware, entered: list[int]) -> None:
    """`THREADS + 1` requests to a `holding` app: every thread held, one task queued."""
    for _ in range(THREADS + 1):
        await request(app)
    await until(lambda: len(entered) == THREADS and app.stats.queued == 1)


def threads_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The WARNINGs that the thread pool is the limit that bites."""
    return [r for r in caplog.records if getattr(r, "limit", None) == "threads"]


@pytest.mark.usefixtures("fresh_warnings")
async def test_sync_tasks_beyond_the_threads_wait_queued_then_run(
    caplog: pytest.LogCaptureFixture, patience: float
) -> None:
    """With every thread held by a request's sync task, the next requests' sync tasks are
    queued, not running, and warned about once; they start when threads free up."""
    first, late = threading.Event(), threading.Event()
    entered: list[int] = []
    app = PostResponseMiddleware(holding([first] * THREADS + [late] * 3, entered))
    try:
        with anyio.fail_after(10):
            for _ in range(THREADS + 3):
                await request(app)
            await until(lambda: len(entered) == THREADS and app.stats.running == THREADS)
            assert app.stats.queued == 3
            await anyio.sleep(patience)
            first.set()  # the three late tasks get threads and start
            await until(lambda: app.stats.running == 3 and len(entered) == THREADS + 3)
            assert app.stats.queued == 0
            assert [h.state for h in app_handles(app)[THREADS:]] == [TaskState.RUNNING] * 3
    finally:
        first.set()
        late.set()
    with anyio.fail_after(10):
        await app.join()
    assert app.stats.snapshot()["completed"] == THREADS + 3
    [warning] = threads_warnings(caplog)
    assert warning.getMessage().startswith(f"All {THREADS} worker threads for sync tasks are busy")


@pytest.mark.usefixtures("fresh_warnings")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # trio's limiter warns at once
async def test_threads_busy_for_a_moment_are_not_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A sync task that waits for a thread a moment (under load: threads done with their
    task waiting for the GIL before they take the next) is no sign of long sync tasks: no
    WARNING."""
    gate = threading.Event()
    entered: list[int] = []
    app = PostResponseMiddleware(holding([gate] * (THREADS + 1), entered))
    try:
        with anyio.fail_after(10):
            await fill_the_threads(app, entered)
    finally:
        gate.set()
    with anyio.fail_after(10):
        await app.join()
    assert app.stats.snapshot()["completed"] == THREADS + 1
    assert threads_warnings(caplog) == []


@pytest.mark.usefixtures("fresh_warnings")
async def test_threads_held_are_warned_about_while_they_are(
    caplog: pytest.LogCaptureFixture, patience: float
) -> None:
    """With every thread held, a sync task that comes once another has waited for a thread
    `PATIENCE` seconds brings the WARNING, before any thread is free."""
    gate = threading.Event()
    entered: list[int] = []
    app = PostResponseMiddleware(holding([gate] * (THREADS + 2), entered))
    try:
        with anyio.fail_after(10):
            await fill_the_threads(app, entered)
            await anyio.sleep(patience)
            await request(app)
            [warning] = threads_warnings(caplog)
            assert warning.getMessage().startswith(f"All {THREADS} worker threads")
    finally:
        gate.set()
    with anyio.fail_after(10):
        await app.join()


async def test_shutdown_leaves_sync_tasks_to_their_threads(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Past `shutdown_timeout`, a sync task in its thread is abandoned while running (its
    thread runs on) and one still waiting for a thread is abandoned before it started; it
    never runs, and threads that end later change no state or counter."""
    gate = threading.Event()
    entered: list[int] = []
    app = PostResponseMiddleware(holding([gate] * (THREADS + 1), entered), shutdown_timeout=0.05)
    try:
        with anyio.fail_after(10):
            async with lifespan(app):
                await fill_the_threads(app, entered)
            states = [h.state for h in app_handles(app)]
            assert states == [TaskState.ABANDONED] * (THREADS + 1)
    finally:
        gate.set()
    if anyio_backend == "asyncio":  # the threads' reports reach the loop, and change nothing
        with anyio.fail_after(10):
            await until(lambda: pool.busy() == 0)
            await anyio.sleep(0)
    assert len(entered) == THREADS
    counts = app.stats.snapshot()
    assert (counts["running"], counts["queued"], counts["completed"]) == (0, 0, 0)
    assert counts["abandoned"] == THREADS + 1
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    running = [m for m in messages if "abandoned while running: the server shut down" in m]
    waiting = [m for m in messages if f"all {THREADS} worker threads were busy" in m]
    assert (len(running), len(waiting)) == (THREADS, 1)
    assert all("thread keeps running" in m for m in running)
