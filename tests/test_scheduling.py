"""Keys, single-flight, delays and retries, in process (tests/test_scheduling_servers.py
proves them on real servers)."""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import anyio
import pytest

import post_response
from post_response import (
    ConfigurationError,
    PostResponseMiddleware,
    TaskHandle,
    TaskState,
    add_task,
)
from post_response._batch import BACKOFF_CAP, backoff_delay
from post_response._pressure import pressure
from post_response._threads import THREADS, pool
from post_response._types import Receive, Scope, Send
from post_response.testing import capture_tasks, requests_wait_for_tasks
from post_response.wsgi import PostResponseWSGIMiddleware

from .test_owner import OK, lifespan, request, until

pytestmark = pytest.mark.anyio

Adds = Callable[[], Any]


def app_adding(adds: Adds, handles: list[TaskHandle] | None = None) -> Any:
    """An app whose requests call `adds()` (which adds tasks), then answer 200."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        added = adds()
        if handles is not None and added is not None:
            handles.extend(added if isinstance(added, list) else [added])
        for message in OK:
            await send(message)

    return app


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "post_response" and r.levelno >= level
    ]


async def run_one_task(
    func: Callable[[], Any], detach: bool, **options: Any
) -> tuple[TaskHandle, list[BaseException], PostResponseMiddleware]:
    """One request that adds `func` with `options` set; once its tasks ended: the task's
    handle, what `on_error` was given, and the middleware (for its `stats`)."""
    handles: list[TaskHandle] = []
    errors: list[BaseException] = []
    app = PostResponseMiddleware(
        app_adding(lambda: add_task(func).set(**options), handles),
        detach=detach,
        on_error=lambda task, exc: errors.append(exc),
    )
    with anyio.fail_after(5):
        await request(app)
        await app.join()
    [handle] = handles
    return handle, errors, app


async def test_in_one_request_the_last_task_with_a_key_wins(
    caplog: pytest.LogCaptureFixture, detach: bool
) -> None:
    """Three tasks with one key in a request: the last one runs, with its arguments, at its
    place in the order; the others end `superseded`, logged and counted."""
    log: list[str] = []
    handles: list[TaskHandle] = []

    def adds() -> list[TaskHandle]:
        return [
            add_task(log.append, "rebuild 1").set(key="cache"),
            add_task(log.append, "other"),
            add_task(log.append, "rebuild 2").set(key="cache"),
            add_task(log.append, "last"),
            add_task(log.append, "rebuild 3").set(key="cache"),
        ]

    caplog.set_level(logging.INFO, logger="post_response")
    app = PostResponseMiddleware(app_adding(adds, handles), detach=detach)
    with anyio.fail_after(10):
        await request(app)
        await app.join()
    assert log == ["other", "last", "rebuild 3"]
    assert [h.state.value for h in handles] == [
        "superseded",
        "completed",
        "superseded",
        "completed",
        "completed",
    ]
    assert app.stats.snapshot()["superseded"] == 2
    assert sum("superseded by a newer task with key 'cache'" in m for m in messages(caplog)) == 2


async def test_a_huge_key_is_cut_in_the_line_that_says_its_task_was_superseded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A key built from client input (a request's body) can be a megabyte: the INFO line
    shows its start and its length, not all of it, and the key itself is left whole."""
    key = "user:" + "9" * 999_995
    handles: list[TaskHandle] = []
    ran: list[int] = []

    def adds() -> list[TaskHandle]:
        return [add_task(ran.append, n).set(key=key) for n in range(2)]

    caplog.set_level(logging.INFO, logger="post_response")
    app = PostResponseMiddleware(app_adding(adds, handles))
    with anyio.fail_after(10):
        await request(app)
        await app.join()
    [line] = [m for m in messages(caplog) if "superseded by a newer task" in m]
    assert len(line) < 500, len(line)
    assert line.endswith(f"with key {key[:200]!r}... (1,000,000 characters)")
    assert (ran, handles[0].key) == ([1], key)


async def test_single_flight_across_requests() -> None:
    """While a rebuild with a key runs, a burst of requests asking for it ends in one more
    run, with the newest arguments; never two at once."""
    gate = anyio.Event()
    runs: list[int] = []
    running = peak = 0

    async def rebuild(n: int) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        runs.append(n)
        if n == 0:
            await gate.wait()
        running -= 1

    count = iter(range(1000))
    app = PostResponseMiddleware(
        app_adding(lambda: add_task(rebuild, next(count)).set(key="cache"))
    )
    with anyio.fail_after(10):
        await request(app)
        await until(lambda: runs == [0])
        for _ in range(200):
            await request(app)
        for _ in range(5):
            await anyio.sleep(0)
        assert runs == [0]
        gate.set()
        await app.join()
    assert (runs, peak) == ([0, 200], 1)
    assert app.stats.snapshot()["superseded"] == 199
    assert (app.stats.queued, app.stats.running) == (0, 0)


async def test_cancel_takes_back_the_requests_tasks_with_a_key() -> None:
    """`post_response.cancel(key)` cancels the request's pending tasks with that key."""
    log: list[str] = []
    counts: list[int] = []

    def adds() -> None:
        add_task(log.append, "a").set(key="mail")
        add_task(log.append, "b").set(key="other")
        counts.append(post_response.cancel("mail"))
        counts.append(post_response.cancel("nothing"))

    app = PostResponseMiddleware(app_adding(adds))
    await request(app)
    await app.join()
    assert (log, counts) == (["b"], [1, 0])


async def test_cancel_with_a_key_that_is_not_a_string_names_the_fix() -> None:
    """`cancel(user_id)` for a task added with `set(key=f"user:{user_id}")` raises, as
    `set(key=42)` does, instead of cancelling nothing without a word."""
    raised: list[BaseException] = []
    handles: list[TaskHandle] = []

    def adds() -> TaskHandle:
        handle = add_task(print, "mail").set(key="user:42")
        try:
            post_response.cancel(42)  # type: ignore[arg-type]
        except ConfigurationError as exc:
            raised.append(exc)
        return handle

    app = PostResponseMiddleware(app_adding(adds, handles))
    await request(app)
    await app.join()
    [exc] = raised
    assert "cancel() takes a task's key, the non-empty string given to `set(key=...)`" in str(exc)
    assert "of type int" in str(exc)
    assert handles[0].state is TaskState.COMPLETED


def test_cancel_outside_a_request_names_the_fix() -> None:
    """`cancel(key)` outside a request raises, as `add_task()` does."""
    with pytest.raises(post_response.OutsideRequestError, match=r"^cancel\(\) was called"):
        post_response.cancel("key")


async def test_retries_run_a_flaky_task_until_it_completes(
    caplog: pytest.LogCaptureFixture, detach: bool
) -> None:
    """A task that fails twice then works completes on its third attempt; each failed
    attempt is logged with its number and the next delay; `on_error` is not called."""
    attempts: list[int] = []

    async def flaky() -> None:
        attempts.append(len(attempts) + 1)
        if len(attempts) < 3:
            raise ConnectionError(f"try {len(attempts)}")

    handle, errors, app = await run_one_task(flaky, detach, retries=3, backoff=0.01)
    assert (handle.state, handle.attempt, attempts, errors) == (
        TaskState.COMPLETED,
        3,
        [1, 2, 3],
        [],
    )
    failed = [m for m in messages(caplog, logging.WARNING) if "retrying in" in m]
    assert len(failed) == 2
    assert "failed (attempt 1 of 4): ConnectionError: try 1; retrying in 0.0" in failed[0]
    assert "failed (attempt 2 of 4): ConnectionError: try 2; retrying in 0.0" in failed[1]
    assert app.stats.snapshot()["completed"] == 1
    assert (app.stats.queued, app.stats.running) == (0, 0)


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_the_last_failed_attempt_fails_the_task_once(
    caplog: pytest.LogCaptureFixture, detach: bool, kind: str
) -> None:
    """After its last retry the task is `failed`, logged with its traceback, and `on_error`
    gets the last exception, once; a middleware default `retries` applies."""
    errors: list[str] = []
    handles: list[TaskHandle] = []

    async def broken() -> None:
        raise ValueError(f"attempt {handles[0].attempt}")

    def broken_sync() -> None:
        raise ValueError(f"attempt {handles[0].attempt}")

    app = PostResponseMiddleware(
        app_adding(lambda: add_task(broken if kind == "async" else broken_sync), handles),
        detach=detach,
        retries=2,
        backoff=0,
        on_error=lambda task, exc: errors.append(str(exc)),
    )
    with anyio.fail_after(10):
        await request(app)
        await app.join()
    [handle] = handles
    assert (handle.state, handle.attempt, errors) == (TaskState.FAILED, 3, ["attempt 3"])
    [final] = [r for r in caplog.records if r.levelno == logging.ERROR]
    name = "broken" if kind == "async" else "broken_sync"
    assert final.getMessage().endswith(f"{name}' of GET / failed after 3 attempts")
    assert final.exc_info is not None
    assert app.stats.snapshot()["failed"] == 1


async def test_retry_on_limits_what_is_retried() -> None:
    """An exception outside `retry_on` fails the task at once; BaseExceptions never retry."""
    handles: list[TaskHandle] = []

    async def wrong() -> None:
        raise KeyError("not retried")

    def exits() -> None:
        raise SystemExit(3)

    def adds() -> list[TaskHandle]:
        return [
            add_task(wrong).set(retries=5, backoff=0, retry_on=(ConnectionError, TimeoutError)),
            add_task(exits).set(retries=5, backoff=0),
        ]

    app = PostResponseMiddleware(app_adding(adds, handles))
    with anyio.fail_after(10):
        await request(app)
        await app.join()
    assert [(h.state, h.attempt) for h in handles] == [(TaskState.FAILED, 1)] * 2


async def test_the_timeout_applies_per_attempt() -> None:
    """A task over its timeout on its first attempt and quick on its second completes."""
    handles: list[TaskHandle] = []

    async def slow_once() -> None:
        if handles[0].attempt == 1:
            await anyio.sleep_forever()

    app = PostResponseMiddleware(
        app_adding(lambda: add_task(slow_once).set(timeout=0.05, retries=1, backoff=0), handles)
    )
    with anyio.fail_after(10):
        await request(app)
        await app.join()
    assert (handles[0].state, handles[0].attempt) == (TaskState.COMPLETED, 2)


async def test_a_delay_with_a_key_debounces(detach: bool) -> None:
    """Tasks with a key and a delay: one run, with the last one's arguments, once the burst
    is over; the delayed task holds no worker while it waits."""
    log: list[int] = []
    count = iter(range(100))
    app = PostResponseMiddleware(
        app_adding(lambda: add_task(log.append, next(count)).set(key="index", delay=0.05)),
        detach=detach,
    )
    with anyio.fail_after(10):
        for _ in range(5 if detach else 1):
            await request(app)
        if detach:
            await until(lambda: app.stats.queued == 0 and app.stats.snapshot()["superseded"] == 4)
            assert (app.stats.running, log) == (0, [])
        await app.join()
    assert log == ([4] if detach else [0])
    assert app.stats.snapshot()["superseded"] == (4 if detach else 0)


async def test_a_delay_runs_the_task_later() -> None:
    """A delayed task runs after the tasks of requests that came after it."""
    log: list[str] = []

    def adds() -> None:
        add_task(log.append, "delayed").set(delay=0.05)
        add_task(log.append, "at once")

    app = PostResponseMiddleware(app_adding(adds))
    with anyio.fail_after(10):
        await request(app)
        await until(lambda: log == ["at once"])
        await app.join()
    assert log == ["at once", "delayed"]


async def test_shutdown_runs_delayed_tasks_at_once_and_abandons_pending_retries(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At shutdown a delayed task runs at once instead of being lost; a task waiting for
    its next attempt is abandoned, logged with its attempt count."""
    log: list[str] = []
    handles: list[TaskHandle] = []

    async def failing() -> None:
        raise ConnectionError("down")

    def adds() -> list[TaskHandle]:
        return [
            add_task(log.append, "delayed").set(delay=600),
            add_task(failing).set(retries=3, backoff=600),
        ]

    app = PostResponseMiddleware(app_adding(adds, handles))
    with anyio.fail_after(10):
        async with lifespan(app):
            await request(app)
            await until(lambda: handles[1].attempt == 1 and handles[1].state is TaskState.PENDING)
    assert log == ["delayed"]
    assert [h.state for h in handles] == [TaskState.COMPLETED, TaskState.ABANDONED]
    assert any(
        "failing' of GET / abandoned: the server shut down while it waited for its next "
        "attempt, after 1 failed" in m
        for m in messages(caplog, logging.ERROR)
    )


def test_backoff_doubles_with_jitter_and_a_cap() -> None:
    """Each retry waits between half and all of `backoff * 2**(n-1)`, at most the cap."""
    for retry, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (30, BACKOFF_CAP)]:
        waits = [backoff_delay(0.5, retry) for _ in range(50)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits)
    assert backoff_delay(0, 1) == 0


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"key": ""}, "A task key must be a non-empty string"),
        ({"key": 3}, "A task key must be a non-empty string, got a value of type int"),
        ({"delay": -1}, r"set\(delay=...\) must be a number of seconds, 0 or more; got -1"),
        ({"delay": "5"}, r"set\(delay=...\) must be a number of seconds"),
        ({"retries": 1.5}, r"set\(retries=...\) must be a whole number of retries"),
        ({"retries": True}, r"set\(retries=...\) must be a whole number of retries"),
        ({"backoff": float("nan")}, r"set\(backoff=...\) must be a number of seconds"),
        ({"retry_on": BaseException}, r"set\(retry_on=...\) must be an exception class"),
        ({"retry_on": (ValueError, 3)}, r"set\(retry_on=...\) must be an exception class"),
        (
            {"delay": 10**400},
            r"set\(delay=...\) must be a number of seconds, .*; got an int of 1329 bits",
        ),
        ({"backoff": 10**400}, r"set\(backoff=...\) must be a number of seconds"),
        ({"timeout": 10**400}, r"set\(timeout=...\) must be a number of seconds above 0"),
        (
            {"delay": -(10**5000)},
            r"set\(delay=...\) must be a number .*; got a negative int of 16610 bits",
        ),
        ({"retries": -(10**5000)}, r"set\(retries=...\) must be a whole number of retries"),
        ({"retries": 10**5000}, r"set\(retries=...\) must be a whole .*; got an int of 16610 bits"),
        (
            {"retries": sys.maxsize + 1},
            r"set\(retries=...\) must be a whole number of retries, 0 to",
        ),
    ],
)
async def test_invalid_task_options_name_the_fix(options: dict[str, Any], error: str) -> None:
    """Each scheduling option is checked when it is set."""
    raised: list[BaseException] = []

    async def noop() -> None:
        pass

    def adds() -> None:
        try:
            add_task(noop).set(**options)
        except ConfigurationError as exc:
            raised.append(exc)

    app = PostResponseMiddleware(app_adding(adds))
    await request(app)
    await app.join()
    [exc] = raised
    assert isinstance(exc, ValueError)
    with pytest.raises(ConfigurationError, match=error):
        raise exc


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"retries": -1}, r"PostResponseMiddleware\(retries=...\) must be a whole number"),
        ({"backoff": "1"}, r"PostResponseMiddleware\(backoff=...\) must be a number of seconds"),
        ({"timeout": 10**400}, r"PostResponseMiddleware\(timeout=...\) must be a number"),
        ({"shutdown_timeout": 10**400}, r"PostResponseMiddleware\(shutdown_timeout=...\) must"),
    ],
)
def test_invalid_middleware_defaults_name_the_fix(options: dict[str, Any], error: str) -> None:
    """`retries` and `backoff` as middleware defaults are checked like the other options."""
    with pytest.raises(ConfigurationError, match=error):
        PostResponseMiddleware(app_adding(lambda: None), **options)


def wsgi_request(app: PostResponseWSGIMiddleware) -> None:
    """One request, served as a WSGI server does (the body read and closed)."""
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "wsgi.input": None}
    body = app(environ, lambda status, headers, exc_info=None: lambda data: None)
    for _ in body:
        pass
    body.close()  # type: ignore[attr-defined]


def wsgi_app(adds: Adds) -> Any:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        adds()
        start_response("200 OK", [])
        return [b"ok"]

    return app


@pytest.mark.parametrize("wsgi_detach", [True, False], ids=["detached", "inline"])
def test_wsgi_keys_delays_and_retries(wsgi_detach: bool) -> None:
    """Under WSGI, a key keeps the last call, a delayed task runs, a flaky one is retried."""
    log: list[str] = []
    attempts: list[int] = []

    def flaky() -> None:
        attempts.append(len(attempts) + 1)
        if len(attempts) < 3:
            raise ConnectionError("not yet")
        log.append("flaky")

    def adds() -> None:
        add_task(log.append, "old").set(key="k")
        add_task(log.append, "new").set(key="k", delay=0.05)
        add_task(flaky).set(retries=2, backoff=0.01)

    app = PostResponseWSGIMiddleware(wsgi_app(adds), detach=wsgi_detach)
    wsgi_request(app)
    assert app.join(10)
    assert sorted(log) == ["flaky", "new"]
    assert attempts == [1, 2, 3]
    assert app.stats.snapshot()["superseded"] == 1


def test_wsgi_single_flight_across_requests() -> None:
    """Under WSGI, while a sync rebuild runs, fifty more requests for it end in one more run."""
    started, gate = threading.Event(), threading.Event()
    runs: list[int] = []
    count = iter(range(100))

    def rebuild(n: int) -> None:
        runs.append(n)
        if n == 0:
            started.set()
            gate.wait(10)

    app = PostResponseWSGIMiddleware(
        wsgi_app(lambda: add_task(rebuild, next(count)).set(key="cache"))
    )
    for _ in range(51):
        wsgi_request(app)
    # The first rebuild's thread may not have begun when the others are superseded.
    assert started.wait(10)
    deadline = time.monotonic() + 10
    while app.stats.snapshot()["superseded"] < 49 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runs == [0]
    gate.set()
    assert app.join(10)
    assert runs == [0, 50]


async def test_capture_tasks_records_the_options_and_leaves_out_superseded_tasks() -> None:
    """`capture_tasks()` sees the options on the handles; a replaced task is not captured."""

    async def rebuild(n: int) -> None:
        pass

    def adds() -> None:
        add_task(rebuild, 1).set(key="cache")
        add_task(rebuild, 2).set(key="cache", delay=5, retries=3, backoff=1, retry_on=OSError)

    app = PostResponseMiddleware(app_adding(adds))
    with capture_tasks() as tasks:
        await request(app)
    [task] = tasks
    assert (task.args, task.key, task.delay, task.retries, task.backoff, task.retry_on) == (
        (2,),
        "cache",
        5.0,
        3,
        1.0,
        OSError,
    )
    await tasks.arun()  # at once, once: no delay or retries in tests
    assert task.state is TaskState.COMPLETED


def test_celery_tasks_refuse_retries_and_take_a_key_and_a_delay_before_the_enqueue() -> None:
    """Celery retries its own tasks: `retries=` on one is refused, naming the fix; a key and
    a delay apply before the enqueue (one enqueue for two requests)."""
    from celery import Celery

    celery_app = Celery("scheduling", broker="memory://")
    celery_app.conf.task_always_eager = True  # apply_async runs it here: an enqueue seen
    sent: list[int] = []

    def send_plain(n: int) -> None:
        sent.append(n)

    send = celery_app.task(name="tests.scheduling.send")(send_plain)

    refused: list[Exception] = []
    count = iter(range(10))

    def adds() -> None:
        n = next(count)
        handle = add_task(send, -1)
        try:
            handle.set(retries=2)
        except ConfigurationError as exc:
            refused.append(exc)
        handle.cancel()
        add_task(send, n).set(key="send", delay=0.05)

    app = PostResponseWSGIMiddleware(wsgi_app(adds))
    wsgi_request(app)
    wsgi_request(app)
    assert app.join(10)
    assert len(refused) == 2
    assert "Celery), which retries tasks itself" in str(refused[0])
    assert "autoretry_for" in str(refused[0])
    assert sent == [1]


async def test_a_task_cancelled_while_it_waits_frees_its_key() -> None:
    """`cancel(key)` takes back a delayed task of the request; the key is free after it, and
    the next request's task with the key runs."""
    log: list[str] = []
    count = iter(range(10))

    def adds() -> None:
        n = next(count)
        add_task(log.append, f"run {n}").set(key="k", delay=0.01)
        if n == 0:
            post_response.cancel("k")

    app = PostResponseMiddleware(app_adding(adds))
    with anyio.fail_after(10):
        await request(app)
        await app.join()
        await request(app)
        await app.join()
    assert log == ["run 1"]


async def test_requests_that_wait_for_their_tasks_wait_for_delayed_ones() -> None:
    """Under `requests_wait_for_tasks()` (the pytest plugin), a request returns once its
    delayed and retried tasks have ended too."""
    log: list[str] = []
    attempts: list[int] = []

    async def flaky() -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("once")
        log.append("flaky")

    def adds() -> None:
        add_task(log.append, "delayed").set(delay=0.02)
        add_task(flaky).set(retries=1, backoff=0.01)

    app = PostResponseMiddleware(app_adding(adds))
    with anyio.fail_after(10), requests_wait_for_tasks():
        await request(app)
    assert sorted(log) == ["delayed", "flaky"]


async def test_a_task_cancelled_while_held_is_let_go_at_once() -> None:
    """A task cancelled with its handle while it waits (for its delay, its busy key or its
    next attempt) is let go of then, not once that wait is over: `join()` does not wait
    for it, and the key it kept through a backoff is free for the next task with it."""
    gate = anyio.Event()
    log: list[str] = []
    handles: list[TaskHandle] = []
    count = iter(range(10))

    async def flaky(n: int) -> None:
        log.append(f"flaky {n}")
        if n == 0:
            raise ConnectionError("down")

    async def busy() -> None:
        await gate.wait()

    def adds() -> list[TaskHandle]:
        n = next(count)
        if n == 0:
            return [
                add_task(log.append, "delayed").set(delay=600),
                add_task(flaky, n).set(key="flaky", retries=1, backoff=600),
            ]
        if n == 1:
            return [add_task(busy).set(key="busy")]
        if n == 2:
            return [add_task(log.append, "waits for busy").set(key="busy")]
        return [add_task(flaky, n).set(key="flaky")]

    app = PostResponseMiddleware(app_adding(adds, handles))
    with anyio.fail_after(5):
        await request(app)
        await until(lambda: log == ["flaky 0"] and handles[1].state is TaskState.PENDING)
        await request(app)
        await until(lambda: handles[2].state is TaskState.RUNNING)
        await request(app)
        for _ in range(5):
            await anyio.sleep(0)
        assert [h.cancel() for h in (handles[0], handles[1], handles[3])] == [True] * 3
        gate.set()
        await app.join()
        await request(app)  # the key "flaky" is free: its task runs now, not after the backoff
        await app.join()
    assert log == ["flaky 0", "flaky 3"]
    assert [h.state for h in handles] == [
        TaskState.CANCELLED,
        TaskState.CANCELLED,
        TaskState.COMPLETED,
        TaskState.CANCELLED,
        TaskState.COMPLETED,
    ]
    assert (app.stats.queued, app.stats.running) == (0, 0)


async def test_a_held_task_cancelled_from_a_thread_is_let_go() -> None:
    """A sync task, in its worker thread, cancels its request's delayed task: the owner,
    on the event loop, lets go of it, and `join()` returns."""
    cancelled: list[bool] = []
    handles: list[TaskHandle] = []

    def adds() -> list[TaskHandle]:
        delayed = add_task(print, "delayed").set(delay=600)
        add_task(lambda: cancelled.append(delayed.cancel()))
        return [delayed]

    app = PostResponseMiddleware(app_adding(adds, handles))
    with anyio.fail_after(5):
        await request(app)
        await app.join()
    assert cancelled == [True]
    assert handles[0].state is TaskState.CANCELLED


async def test_a_debounce_keeps_only_its_last_task_while_it_waits() -> None:
    """A burst of requests debouncing one key with a long delay: each task replaced ends
    `superseded` and is freed then, with its arguments, not kept until its delay would
    have been over (memory would grow with the request rate times the delay)."""

    class Payload:
        pass

    alive: list[weakref.ref[Payload]] = []

    def adds() -> None:
        payload = Payload()
        alive.append(weakref.ref(payload))
        add_task(print, payload).set(key="index", delay=600)

    app = PostResponseMiddleware(app_adding(adds))
    with anyio.fail_after(10):
        for _ in range(1000):
            await request(app)
        for _ in range(5):
            await anyio.sleep(0)
        gc.collect()
        kept = sum(ref() is not None for ref in alive)
        assert alive[-1]() is not None  # the one waiting
        assert kept < 100
        assert app.stats.snapshot()["superseded"] == 999


async def test_shutdown_waits_for_a_delayed_task_it_started_when_its_delay_ends() -> None:
    """At shutdown a delayed task runs at once; should its delay end while it still runs,
    the shutdown goes on waiting for it (the timer had kept it, and let go of it then)."""
    started, gate, stopped = anyio.Event(), anyio.Event(), anyio.Event()
    handles: list[TaskHandle] = []

    async def slow() -> None:
        started.set()
        await gate.wait()

    app = PostResponseMiddleware(app_adding(lambda: add_task(slow).set(delay=0.2), handles))

    async def serve() -> None:
        async with lifespan(app):
            await request(app)
            await until(lambda: app.stats.queued == 0)  # held for its delay
        stopped.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(serve)
            await started.wait()  # at once, at the shutdown
            await anyio.sleep(0.4)  # its delay is over: the timer's time for it comes
            assert not stopped.is_set()
            assert handles[0].state is TaskState.RUNNING
            gate.set()
    assert handles[0].state is TaskState.COMPLETED


async def test_a_waiting_tasks_key_and_delay_cannot_change() -> None:
    """Once the owner holds a task (here through its backoff, keeping its key), `set()`
    refuses a new key or delay with `TaskStartedError`: the owner would free the new key,
    not the one it holds, and every later task with that one would wait for ever."""
    log: list[int] = []
    handles: list[TaskHandle] = []
    count = iter(range(10))

    async def flaky(n: int) -> None:
        log.append(n)
        if n == 0 and log.count(0) == 1:
            raise ConnectionError("once")

    app = PostResponseMiddleware(
        app_adding(
            lambda: add_task(flaky, next(count)).set(key="k", retries=1, backoff=0.01), handles
        )
    )
    with anyio.fail_after(5):
        await request(app)
        await until(lambda: log == [0] and handles[0].state is TaskState.PENDING)
        for options in ({"key": "other"}, {"delay": 1.0}):
            with pytest.raises(post_response.TaskStartedError, match="waits for its delay"):
                handles[0].set(**options)
        handles[0].set(name="still allowed")
        await app.join()
        await request(app)
        await app.join()
    assert log == [0, 0, 1]
    assert [h.state for h in handles] == [TaskState.COMPLETED] * 2


async def test_a_delayed_task_dropped_when_due_is_let_go() -> None:
    """A delayed task whose time comes while `max_queued` tasks already wait is dropped
    (logged, counted), and the owner lets go of it: `join()` returns, and its key is free."""
    gate = anyio.Event()
    log: list[str] = []
    handles: list[TaskHandle] = []
    count = iter(range(10))

    async def slow() -> None:
        await gate.wait()

    def adds() -> TaskHandle:
        n = next(count)
        if n == 0:
            return add_task(log.append, "delayed").set(key="k", delay=0.05)
        if n == 1:
            return add_task(slow)
        return add_task(log.append, f"task {n}").set(key="k")

    app = PostResponseMiddleware(app_adding(adds, handles), max_running=1, max_queued=1)
    with anyio.fail_after(5):
        await request(app)
        await until(lambda: app.stats.queued == 0)  # held for its delay
        await request(app)
        await until(lambda: handles[1].state is TaskState.RUNNING)
        await request(app)  # waits for `slow`: max_queued is reached
        await until(lambda: handles[0].state is not TaskState.PENDING)
        gate.set()
        await app.join()
        await request(app)
        await app.join()
    assert [h.state for h in handles] == [TaskState.DROPPED] + [TaskState.COMPLETED] * 3
    assert log == ["task 2", "task 3"]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_retry_abandoned_as_the_loop_closes_says_why(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The event loop closes without a lifespan shutdown while a task waits for its next
    attempt: it is abandoned at once, logged as such, not as if `shutdown_timeout` had
    passed first (that is said of the tasks still running once it has)."""
    handles: list[TaskHandle] = []

    async def failing() -> None:
        raise ConnectionError("down")

    app = PostResponseMiddleware(
        app_adding(lambda: add_task(failing).set(retries=3, backoff=600), handles)
    )

    async def main() -> None:
        with anyio.fail_after(5):
            await request(app)
            await until(lambda: handles[0].attempt == 1 and handles[0].state is TaskState.PENDING)

    anyio.run(main, backend=backend)
    assert handles[0].state is TaskState.ABANDONED
    [line] = [m for m in messages(caplog, logging.ERROR) if "abandoned" in m]
    assert line.endswith(
        "abandoned: the event loop closed without a lifespan shutdown while it waited for "
        "its next attempt, after 1 failed"
    )


async def test_an_exception_whose_str_raises_is_still_retried(
    caplog: pytest.LogCaptureFixture, detach: bool
) -> None:
    """The line saying an attempt failed names the exception by its class when its `str()`
    raises: the task is retried, then fails once, and nothing reaches the server (it had
    stayed `running` for ever, counted so, and inline the error escaped the request)."""

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no str")

    async def failing() -> None:
        raise Unprintable

    handle, errors, app = await run_one_task(failing, detach, retries=1, backoff=0)
    assert (handle.state, handle.attempt, len(errors)) == (TaskState.FAILED, 2, 1)
    assert any(
        "failed (attempt 1 of 2): Unprintable (its str() raised); retrying in" in m
        for m in messages(caplog, logging.WARNING)
    )
    assert (app.stats.running, app.stats.snapshot()["failed"]) == (0, 1)


async def test_a_retry_on_whose_check_raises_fails_the_task_once(
    caplog: pytest.LogCaptureFixture, detach: bool
) -> None:
    """A `retry_on` class whose `__instancecheck__` raises ends the task `failed`, not
    retried, logged with both errors (it stayed `running` for ever, never reported)."""

    class Picky(type):
        def __instancecheck__(cls, instance: object) -> bool:
            raise RuntimeError("cannot tell")

    class Transient(Exception, metaclass=Picky):
        pass

    async def failing() -> None:
        raise ValueError("refused")

    handle, errors, app = await run_one_task(failing, detach, retries=3, retry_on=Transient)
    assert (handle.state, handle.attempt) == (TaskState.FAILED, 1)
    assert [type(error) for error in errors] == [ValueError]
    assert any(
        "not retried: its retry_on raised RuntimeError: cannot tell" in m
        for m in messages(caplog, logging.ERROR)
    )
    assert (app.stats.running, app.stats.snapshot()["failed"]) == (0, 1)


async def test_tasks_waiting_for_a_delay_a_key_or_a_retry_are_bounded_by_max_queued(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A flood of requests that each delay a task under a key of its own (taken from the
    client: `key=f"user:{id}"`) holds at most `max_queued` of them, seen in `stats.held`;
    the others are dropped, logged and counted (they were held without bound, and counted
    nowhere). A task replacing one that waits for its key takes its place; a failing task
    is then not retried but fails at once. At shutdown the held ones run; the counters add up."""
    pressure.reset()
    log: list[str] = []
    errors: list[BaseException] = []
    handles: list[TaskHandle] = []
    count = iter(range(100))

    async def failing() -> None:
        raise ConnectionError("down")

    def adds() -> TaskHandle:
        n = next(count)
        if n < 30:
            return add_task(log.append, f"user {n}").set(key=f"user:{n}", delay=600)
        if n == 30:
            return add_task(log.append, "user 0 again").set(key="user:0", delay=600)
        return add_task(failing).set(retries=3, backoff=600)

    app = PostResponseMiddleware(
        app_adding(adds, handles), max_queued=10, on_error=lambda task, exc: errors.append(exc)
    )
    with anyio.fail_after(10):
        async with lifespan(app):
            for _ in range(32):
                await request(app)
                await until(lambda: app.stats.queued == 0 and app.stats.running == 0)
            held = app.stats.snapshot().get("held")
    assert sorted(log) == sorted([f"user {n}" for n in range(1, 10)] + ["user 0 again"])
    assert [h.state for h in handles] == (
        [TaskState.SUPERSEDED]
        + [TaskState.COMPLETED] * 9
        + [TaskState.DROPPED] * 20
        + [TaskState.COMPLETED, TaskState.FAILED]
    )
    assert (handles[-1].attempt, len(errors), held) == (1, 1, 10)
    text = messages(caplog)
    dropped = "dropped: max_queued=10 tasks already wait for a delay, a key or a retry"
    assert sum(dropped in m for m in text) == 20
    assert sum("failed (attempt 1 of 4): not retried, max_queued=10" in m for m in text) == 1
    assert sum("a key or a retry reached half of max_queued=10" in m for m in text) == 1
    stats = app.stats.snapshot()
    assert (stats["held"], stats["queued"], stats["running"]) == (0, 0, 0)
    assert (stats["completed"], stats["dropped"], stats["superseded"], stats["failed"]) == (
        10,
        20,
        1,
        1,
    )


@pytest.mark.parametrize("wait", ["delay", "backoff"])
async def test_inline_a_task_cancelled_while_it_waits_does_not_run(wait: str) -> None:
    """With `detach=False` a task's delay and backoff are slept in the request; cancelled
    then (here by a task of the same request, run alongside), it ends `cancelled`, counted
    once, and is not run: it ran once its wait was over, counted `cancelled` and then
    `completed` too, although `cancel()` had returned True."""
    calls: list[str] = []
    cancelled: list[bool] = []
    failed = anyio.Event()
    handles: list[TaskHandle] = []

    async def waiting() -> None:
        calls.append("waiting")
        if wait == "backoff" and len(calls) == 1:
            failed.set()
            raise ConnectionError("once")

    async def canceller() -> None:
        if wait == "backoff":
            await failed.wait()
        cancelled.append(handles[0].cancel())

    def adds() -> list[TaskHandle]:
        options: dict[str, Any] = (
            {"delay": 0.5} if wait == "delay" else {"retries": 1, "backoff": 0.5}
        )
        return [add_task(waiting).set(**options), add_task(canceller)]

    app = PostResponseMiddleware(app_adding(adds, handles), detach=False, concurrency=2)
    with anyio.fail_after(10):
        await request(app)
    assert cancelled == [True]
    assert calls == ([] if wait == "delay" else ["waiting"])
    assert [h.state for h in handles] == [TaskState.CANCELLED, TaskState.COMPLETED]
    stats = app.stats.snapshot()
    assert (stats["cancelled"], stats["completed"], stats["running"]) == (1, 1, 0)


@pytest.mark.parametrize("ends", ["raises", "times out"])
async def test_an_attempt_failing_during_the_shutdown_ends_abandoned_once(
    caplog: pytest.LogCaptureFixture, ends: str
) -> None:
    """A task with retries whose attempt fails (or times out) while the shutdown drains is
    not retried but abandoned, as one waiting for its next attempt is: one state, counted
    once, `on_error` not called. It was counted `abandoned`, then ended `failed` (or
    `timed_out`) as well, logged and reported twice."""
    gate = anyio.Event()
    errors: list[BaseException] = []
    handles: list[TaskHandle] = []

    async def flaky() -> None:
        with anyio.CancelScope(shield=True):  # past its timeout only once the gate opens
            await gate.wait()  # opened once the shutdown has begun
        if ends == "raises":
            raise ConnectionError("down")
        await anyio.sleep_forever()

    async def open_the_gate() -> None:
        gate.set()

    def adds() -> list[TaskHandle]:
        timeout = 0.01 if ends == "times out" else None
        return [
            add_task(flaky).set(retries=3, backoff=600, timeout=timeout),
            add_task(open_the_gate).set(delay=600),  # runs at once when the shutdown begins
        ]

    app = PostResponseMiddleware(
        app_adding(adds, handles), on_error=lambda task, exc: errors.append(exc), concurrency=2
    )
    with anyio.fail_after(10):
        async with lifespan(app):
            await request(app)
            await until(lambda: handles[0].state is TaskState.RUNNING)
    assert [h.state for h in handles] == [TaskState.ABANDONED, TaskState.COMPLETED]
    assert errors == []
    stats = app.stats.snapshot()
    assert (stats["abandoned"], stats["failed"], stats["timed_out"]) == (1, 0, 0)
    assert stats["completed"] == 1
    [line] = [m for m in messages(caplog, logging.ERROR) if "flaky" in m]
    assert "abandoned: the server shut down while it waited for its next attempt" in line


@pytest.mark.parametrize("options", [{}, {"key": "k"}], ids=["plain", "keyed"])
async def test_a_sync_task_cancelled_while_it_waits_for_a_thread_does_not_run(
    options: dict[str, Any],
) -> None:
    """All worker threads are busy, so a sync task waits for one (pending, queued);
    `cancel()` then returns True, and the task must not run once a thread is free: it ran,
    ended `completed`, and was counted `cancelled` and `completed` both."""
    gate = threading.Event()
    ran: list[str] = []
    handles: list[TaskHandle] = []

    def adds() -> list[TaskHandle]:
        holding = [add_task(gate.wait, 10) for _ in range(THREADS)]
        return [*holding, add_task(ran.append, "waiting").set(**options)]

    app = PostResponseMiddleware(app_adding(adds, handles), concurrency=THREADS + 1)
    try:
        with anyio.fail_after(10):
            await request(app)
            await until(lambda: app.stats.running == THREADS and app.stats.queued == 1)
            assert handles[-1].cancel()
    finally:
        gate.set()
    with anyio.fail_after(10):
        await app.join()
        await until(lambda: pool.busy() == 0)  # the threads are parked: the job was not run
    assert (ran, handles[-1].state) == ([], TaskState.CANCELLED)
    stats = app.stats.snapshot()
    assert (stats["cancelled"], stats["completed"], stats["running"]) == (1, THREADS, 0)


async def test_a_sync_task_that_waited_for_a_thread_still_times_out() -> None:
    """A sync task with a timeout that had to wait for a worker thread times out once it
    runs past it: on asyncio its deadline was set from a loop callback with
    `anyio.current_time()`, which raised there (logged by asyncio), so it had none."""
    gate, stuck = threading.Event(), threading.Event()
    handles: list[TaskHandle] = []

    def adds() -> list[TaskHandle]:
        holding = [add_task(gate.wait, 10) for _ in range(THREADS)]
        return [*holding, add_task(stuck.wait, 10).set(timeout=0.05)]

    app = PostResponseMiddleware(app_adding(adds, handles), concurrency=THREADS + 1)
    try:
        with anyio.fail_after(10):
            await request(app)
            await until(lambda: app.stats.running == THREADS and app.stats.queued == 1)
            gate.set()
            await until(lambda: handles[-1].state not in (TaskState.PENDING, TaskState.RUNNING))
    finally:
        gate.set()
        stuck.set()
    assert handles[-1].state is TaskState.TIMED_OUT
    assert app.stats.snapshot()["timed_out"] == 1
