"""How tasks run: order, concurrency, threads, context snapshots, failures and timeouts."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
import pytest

from post_response import PostResponseMiddleware, TaskHandle, TaskState, add_task
from post_response._types import Message, Receive, Scope, Send

from .harness import Exchange, wrap

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("detach")]

OK: list[Message] = [
    {"type": "http.response.start", "status": 200, "headers": []},
    {"type": "http.response.body", "body": b"ok"},
]

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def endpoint(adds: Callable[[], Any], **options: Any) -> PostResponseMiddleware:
    """An app whose endpoint calls `adds()` (which calls add_task) and answers 200."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        adds()
        for message in OK:
            await send(message)

    return wrap(app, **options)


async def serve(app: PostResponseMiddleware, path: str = "/") -> Exchange:
    exchange = Exchange()
    with anyio.fail_after(10):
        await exchange.run(app, path=path)
    return exchange


async def test_tasks_run_in_order_one_at_a_time() -> None:
    """By default each task starts only when the previous one has finished."""
    log: list[str] = []

    async def step(name: str) -> None:
        log.append(f"{name} start")
        await anyio.sleep(0)
        log.append(f"{name} end")

    def sync_step(name: str) -> None:
        log.append(f"{name} start")
        log.append(f"{name} end")

    def adds() -> None:
        add_task(step, "a")
        add_task(sync_step, "b")
        add_task(step, name="c")

    await serve(endpoint(adds))
    assert log == ["a start", "a end", "b start", "b end", "c start", "c end"]


async def test_a_sync_task_starts_once_the_sync_task_before_it_returned() -> None:
    """Two sync tasks of one request, threads to spare: the second waits in the queue
    (counted there) until the first has returned."""
    log: list[str] = []
    first_in, release = threading.Event(), threading.Event()

    def first() -> None:
        log.append("first start")
        first_in.set()
        release.wait(10)
        log.append("first end")

    def second() -> None:
        log.append("second")

    app = endpoint(lambda: (add_task(first), add_task(second)))
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(serve, app)
            await anyio.to_thread.run_sync(first_in.wait, 10)
            try:
                assert (app.stats.running, app.stats.queued) == (1, 1)
                assert log == ["first start"]
            finally:
                release.set()
    assert log == ["first start", "first end", "second"]
    assert app.stats.snapshot()["completed"] == 2


@pytest.mark.parametrize("limit", [2, 3])
async def test_concurrency_caps_how_many_run_at_once(limit: int) -> None:
    """With `concurrency=N`, N tasks run together (they wait for each other) and never more."""
    running = peak = 0
    all_in = anyio.Event()
    started: list[int] = []

    async def work(n: int) -> None:
        nonlocal running, peak
        started.append(n)
        running += 1
        peak = max(peak, running)
        if running == limit:
            all_in.set()
        await all_in.wait()  # the first N only finish once N run at the same time
        await anyio.sleep(0)
        running -= 1

    await serve(endpoint(lambda: [add_task(work, n) for n in range(7)], concurrency=limit))
    assert peak == limit
    assert started == list(range(7))


async def test_sync_tasks_run_in_a_worker_thread_async_ones_on_the_loop() -> None:
    """A sync task never blocks the event loop's thread; an async one runs on it."""
    loop_thread = threading.get_ident()
    threads: dict[str, int] = {}

    def sync_task() -> None:
        threads["sync"] = threading.get_ident()

    async def async_task() -> None:
        threads["async"] = threading.get_ident()

    await serve(endpoint(lambda: (add_task(sync_task), add_task(async_task))))
    assert threads["async"] == loop_thread
    assert threads["sync"] != loop_thread


async def test_sync_tasks_do_not_take_the_threads_of_sync_endpoints() -> None:
    """Sync tasks borrow from their own thread limiter, not anyio's default one that
    frameworks run sync endpoints with, so long sync tasks cannot starve endpoints."""
    running, release = threading.Event(), threading.Event()
    borrowed: list[float] = []

    def blocking() -> None:
        running.set()
        release.wait(10)

    async def request() -> None:
        await serve(endpoint(lambda: add_task(blocking)))

    async with anyio.create_task_group() as group:
        group.start_soon(request)
        await anyio.to_thread.run_sync(running.wait, 10)
        borrowed.append(anyio.to_thread.current_default_thread_limiter().borrowed_tokens)
        release.set()
    assert borrowed == [0]


async def test_a_sync_callable_returning_a_coroutine_is_awaited() -> None:
    """`add_task(lambda: notify(x))` awaits the coroutine the lambda returns, not drops it."""
    seen: list[str] = []

    async def notify(user: str) -> None:
        seen.append(user)

    await serve(endpoint(lambda: add_task(lambda: notify("ada"))))
    assert seen == ["ada"]


async def test_callable_objects_and_partials_are_recognised_as_async() -> None:
    """An object with `async def __call__`, and a partial of an async function, run on the loop."""
    import functools

    loop_thread = threading.get_ident()
    threads: list[int] = []

    class Notifier:
        async def __call__(self) -> None:
            threads.append(threading.get_ident())

    async def notify(x: int) -> None:
        threads.append(threading.get_ident())

    await serve(endpoint(lambda: (add_task(Notifier()), add_task(functools.partial(notify, 1)))))
    assert threads == [loop_thread, loop_thread]


class TestContext:
    """Each task runs in a snapshot of its caller's context, taken at `add_task()` time."""

    async def test_values_set_before_add_task_are_seen_later_changes_are_not(self) -> None:
        """Async and sync tasks see the value at `add_task()` time, not later changes."""
        seen: list[str] = []

        async def async_task() -> None:
            seen.append(request_id.get())

        def sync_task() -> None:
            seen.append(request_id.get())

        def adds() -> None:
            request_id.set("r1")
            add_task(async_task)
            add_task(sync_task)
            request_id.set("r2")
            add_task(async_task)

        await serve(endpoint(adds))
        assert seen == ["r1", "r1", "r2"]

    async def test_what_a_task_sets_leaks_nowhere(self) -> None:
        """A task's `.set()` is invisible to the next task and to the app."""
        seen: list[str] = []

        async def setter() -> None:
            request_id.set("from the task")

        def sync_setter() -> None:
            request_id.set("from the sync task")

        async def reader() -> None:
            seen.append(request_id.get())

        def adds() -> None:
            request_id.set("app")
            add_task(setter)
            add_task(reader)
            add_task(sync_setter)
            add_task(reader)

        await serve(endpoint(adds))
        assert seen == ["app", "app"]
        assert request_id.get() == "app"  # the harness runs the app in this very context

    async def test_values_set_in_a_sync_endpoint_are_seen(self) -> None:
        """A sync endpoint run in a worker thread (as frameworks do) sets a value its task sees."""
        seen: list[str] = []

        def task() -> None:
            seen.append(request_id.get())

        def sync_view() -> None:
            request_id.set("set in the thread")
            add_task(task)

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await anyio.to_thread.run_sync(sync_view)
            for message in OK:
                await send(message)

        await serve(wrap(app))
        assert seen == ["set in the thread"]


class TestFailures:
    """A failing task is logged, reported and isolated."""

    @pytest.mark.parametrize("kind", ["async", "sync"])
    async def test_a_failure_is_logged_reported_and_isolated(
        self, kind: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Logged with name, request and traceback; given to the hook; later tasks still run."""
        ran: list[str] = []
        reported: list[tuple[TaskHandle, BaseException]] = []

        async def async_boom() -> None:
            raise ValueError("boom")

        def sync_boom() -> None:
            raise ValueError("boom")

        async def after() -> None:
            ran.append("after")

        def adds() -> None:
            add_task(async_boom if kind == "async" else sync_boom)
            add_task(after)

        app = endpoint(adds, on_error=lambda task, exc: reported.append((task, exc)))
        await serve(app, path="/signup")  # returns normally: nothing escapes to the server

        assert ran == ["after"]
        [(task, exc)] = reported
        assert task.state is TaskState.FAILED
        assert isinstance(exc, ValueError)
        [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert record.name == "post_response"
        assert f"{kind}_boom" in record.getMessage()
        assert "GET /signup" in record.getMessage()
        assert record.exc_info is not None
        assert record.exc_info[1] is exc

    async def test_a_sync_task_raising_cancelled_error_fails_alone(
        self, anyio_backend: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A CancelledError raised in a sync task's thread is that task's failure, not the
        runtime cancelling the tasks: the next task runs."""
        if anyio_backend != "asyncio":
            pytest.skip("asyncio's own cancellation")
        handles: list[TaskHandle] = []

        def cancelled() -> None:
            raise asyncio.CancelledError

        def after() -> None:
            pass

        await serve(endpoint(lambda: handles.extend([add_task(cancelled), add_task(after)])))
        assert [h.state for h in handles] == [TaskState.FAILED, TaskState.COMPLETED]
        [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert record.getMessage().endswith("failed: it raised a cancellation of its own")

    async def test_a_callable_that_breaks_the_async_check_fails_alone(self) -> None:
        """A callable object whose attributes raise where `is_async()` looks fails as a
        task, logged; it reaches neither the server nor the tasks after it."""
        handles: list[TaskHandle] = []

        class Hostile:
            def __getattribute__(self, name: str) -> Any:
                if name in ("_is_coroutine_marker", "_is_coroutine"):
                    raise RuntimeError(name)
                return object.__getattribute__(self, name)

            def __call__(self) -> None:
                pass

        def after() -> None:
            pass

        await serve(endpoint(lambda: handles.extend([add_task(Hostile()), add_task(after)])))
        assert [h.state for h in handles] == [TaskState.FAILED, TaskState.COMPLETED]

    async def test_an_async_error_hook_is_awaited_and_a_failing_hook_is_logged(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The hook may be async; if it raises, that is logged and the drain goes on."""
        calls: list[str] = []

        async def hook(task: TaskHandle, exc: BaseException) -> None:
            calls.append(task.name)
            raise RuntimeError("hook broke")

        async def boom() -> None:
            raise ValueError

        async def after() -> None:
            calls.append("after")

        await serve(
            endpoint(lambda: (add_task(boom).set(name="b1"), add_task(after)), on_error=hook)
        )
        assert calls == ["b1", "after"]
        assert any("on_error hook raised" in r.getMessage() for r in caplog.records)


class TestTimeouts:
    async def test_an_async_task_over_its_timeout_is_cancelled(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """It is reported as timed out, to the log and the hook, and the next task runs."""
        ran: list[str] = []
        cancelled = anyio.Event()
        reported: list[BaseException] = []

        async def forever() -> None:
            try:
                await anyio.sleep_forever()
            finally:
                cancelled.set()

        async def after() -> None:
            ran.append("after")

        handles: list[TaskHandle] = []
        app = endpoint(
            lambda: handles.extend([add_task(forever).set(timeout=0.01), add_task(after)]),
            on_error=lambda task, exc: reported.append(exc),
        )
        await serve(app)
        assert cancelled.is_set()
        assert [h.state for h in handles] == [TaskState.TIMED_OUT, TaskState.COMPLETED]
        assert ran == ["after"]
        assert isinstance(reported[0], TimeoutError)
        assert any("timed out after 0.01s" in r.getMessage() for r in caplog.records)

    async def test_the_middleware_timeout_is_the_default_and_a_task_can_lift_it(self) -> None:
        """`timeout=` on the middleware applies to every task unless `set(timeout=None)`."""
        handles: list[TaskHandle] = []

        async def slow() -> None:
            await anyio.sleep(0.05)

        app = endpoint(
            lambda: handles.extend([add_task(slow), add_task(slow).set(timeout=None)]),
            timeout=0.001,
        )
        await serve(app)
        assert [h.state for h in handles] == [TaskState.TIMED_OUT, TaskState.COMPLETED]

    async def test_a_sync_task_over_its_timeout_is_reported_and_its_thread_left(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A thread cannot be stopped: the drain moves on; the log says the thread still runs."""
        release = threading.Event()
        handles: list[TaskHandle] = []

        def stuck() -> None:
            release.wait(10)

        async def after() -> None:
            pass

        try:
            app = endpoint(
                lambda: handles.extend([add_task(stuck).set(timeout=0.01), add_task(after)])
            )
            await serve(app)
        finally:
            release.set()
        assert [h.state for h in handles] == [TaskState.TIMED_OUT, TaskState.COMPLETED]
        assert any("thread keeps running" in r.getMessage() for r in caplog.records)


class TestAddingWhileDraining:
    async def test_a_task_can_add_tasks_to_the_same_drain(self) -> None:
        """Tasks added by a task run in the same drain, after those already queued."""
        log: list[str] = []

        async def first() -> None:
            log.append("first")
            add_task(log.append, "added by first")

        def adds() -> None:
            add_task(first)
            add_task(log.append, "second")

        await serve(endpoint(adds))
        assert log == ["first", "second", "added by first"]

    async def test_the_cap_stops_a_task_that_keeps_adding_itself(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """With `max_tasks=5` the sixth `add_task()` raises; the task that tried fails, logged."""
        runs: list[int] = []

        async def again() -> None:
            runs.append(len(runs))
            add_task(again)

        await serve(endpoint(lambda: add_task(again), max_tasks=5))
        assert runs == [0, 1, 2, 3, 4]
        [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert record.exc_info is not None
        assert "max_tasks" in str(record.exc_info[1])

    async def test_add_task_after_the_drain_raises(self) -> None:
        """Code that kept the request's context and calls add_task() later gets an error."""
        from post_response import RequestFinishedError

        kept: list[contextvars.Context] = []
        await serve(endpoint(lambda: kept.append(contextvars.copy_context())))
        with pytest.raises(RequestFinishedError, match="had all run"):
            kept[0].run(add_task, print)


async def test_a_finished_request_is_freed_without_the_garbage_collector() -> None:
    """Once drained, nothing of a request's tasks is kept alive by a reference cycle."""
    import gc
    import weakref

    class Payload:
        pass

    payloads = [Payload()]
    alive = weakref.ref(payloads[0])

    async def task(item: Payload) -> None:
        pass

    gc.disable()
    try:
        await serve(endpoint(lambda: add_task(task, payloads.pop())))
        assert alive() is None
    finally:
        gc.enable()
