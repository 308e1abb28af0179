"""Hostile tasks on real servers: no task stops a server, kills a worker or a thread pool,
holds the process past `shutdown_timeout`, or leaves a task unaccounted for.

The apps are tests/apps/hostile_app.py (ASGI) and tests/apps/hostile_wsgi.py (WSGI). Every
server runs as a process on 127.0.0.1 (see servers.py); tasks wait on gates the test opens
over HTTP, and the test reads the server's log from its output.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from .apps.hostile_wsgi import BODY
from .load import hammer
from .servers import ASGI_SERVERS, Connection, Server, exit_code_after, run

THREADS = 40  # post_response's pool of threads for sync tasks
SETTLE_LIMIT = 10.0  # seconds a test polls the counters for a state it expects
ASYNCIO_ONLY = {"cancelled-error", "self-cancel"}  # they use asyncio's own cancellation
# The hostile kinds of hostile_app.py: the function the log names, and the last line of
# the traceback it must show ({id}: the task's id).
BASE_EXCEPTIONS = {
    "system-exit": ("raise_system_exit", "SystemExit: 3"),
    "sys-exit-sync": ("call_sys_exit", "SystemExit: 3"),
    "keyboard-interrupt": ("raise_keyboard_interrupt", "KeyboardInterrupt"),
    "keyboard-interrupt-sync": ("raise_keyboard_interrupt_sync", "KeyboardInterrupt"),
    "odd": ("raise_odd", "tests.apps.hostile_app.Odd: odd {id}"),
}
CANCELLATIONS = {
    "cancelled-error": ("raise_cancelled_error", "CancelledError"),
    "self-cancel": ("cancel_itself", "CancelledError"),
    "generator-exit": ("raise_generator_exit", "GeneratorExit"),
}


def new_id() -> str:
    return uuid.uuid4().hex[:8]


# Talking to a server that a broken task may have brought down: say so, with its exit code.


def _gone(server: Server, doing: str, error: Exception) -> AssertionError:
    try:
        code = server.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        return AssertionError(f"the server did not answer {doing}: {error!r}")
    return AssertionError(f"the server exited with code {code} before {doing}:\n{server.output()}")


def fetch(url: str, timeout: float = 20) -> httpx.Response:
    """GET over plain HTTP: no TLS context to build (~20 ms a request otherwise)."""
    return httpx.get(url, timeout=timeout, verify=False, trust_env=False)


def get(server: Server, path: str) -> httpx.Response:
    try:
        return fetch(f"{server.url}{path}")
    except httpx.TransportError as exc:
        raise _gone(server, f"GET {path}", exc) from None


def call(server: Server, action: str, **params: str) -> Any:
    """A control of the app (`/_control/<action>`), which must answer 200."""
    response = get(server, f"/_control/{action}?{httpx.QueryParams(params)}")
    assert response.status_code == 200, f"/_control/{action} {params}: {response.text}"
    return response.json()


def ended(server: Server, task_id: str) -> list[str]:
    """The events of task `task_id` once it has ended; fails if it does not end."""
    events: list[str] = call(server, "wait", id=task_id)
    assert events, f"{task_id} never started"
    assert events[-1].endswith((":end", ":cancelled")), f"{task_id} never ended: {events}"
    return events


def stats_when(
    server: Server, condition: Callable[[dict[str, int]], bool], limit: float = SETTLE_LIMIT
) -> dict[str, int]:
    """Poll the middleware's counters until `condition` holds (at most `limit` seconds);
    return the last ones read."""
    deadline = time.monotonic() + limit
    while True:
        stats: dict[str, int] = call(server, "stats")
        if condition(stats) or time.monotonic() > deadline:
            return stats


def settled(server: Server) -> dict[str, int]:
    """The counters once no task is queued or running (see `stats_when`)."""
    return stats_when(server, lambda s: s["queued"] == s["running"] == 0)


def lines_about(output: str, request: str) -> list[str]:
    """The log lines about the tasks of `request` (`GET /path`)."""
    return [line for line in output.splitlines() if f" of {request} " in f"{line} "]


def failure_record(output: str, pattern: str) -> str:
    """The log record matching `pattern` (a failure: its line and the traceback after it, up
    to the next event the app printed)."""
    found = re.search(pattern, output)
    assert found is not None, f"no log line matches {pattern!r}:\n{output[-8000:]}"
    return output[found.start() :].split("\nevent: ", 1)[0]


# One server per module and mode, started again when a test left it dead or wedged.


class Pool:
    """A server serving hostile_app.py; `get()` returns it running and healthy."""

    def __init__(self, name: str, middleware: dict[str, Any]) -> None:
        self.name = name
        self.middleware = middleware
        self._stack = contextlib.ExitStack()
        self._server: Server | None = None

    def get(self) -> Server:
        if self._server is not None and not self._healthy(self._server):
            self._server.process.kill()  # a hostile task wedged or killed it
            self._server.process.wait()
            self._stack.close()
            self._server = None
        if self._server is None:
            self._server = self._stack.enter_context(
                run(self.name, "hostile_app:app", middleware=self.middleware)
            )
        return self._server

    @staticmethod
    def _healthy(server: Server) -> bool:
        if server.process.poll() is not None:
            return False
        probe = new_id()
        try:
            fetch(f"{server.url}/quick/{probe}", timeout=5)
            response = fetch(f"{server.url}/_control/wait?id={probe}", timeout=10)
        except httpx.HTTPError:
            return False
        return response.status_code == 200 and f"{probe}:end" in response.json()

    def close(self) -> None:
        self._stack.close()


MODES = [(name, limit) for limit in ({}, {"max_running": 1}) for name in ASGI_SERVERS]


@pytest.fixture(
    scope="module",
    params=MODES,
    ids=[name + ("-max_running=1" if limit else "") for name, limit in MODES],
)
def pool(request: pytest.FixtureRequest) -> Iterator[Pool]:
    name, limit = request.param
    started = Pool(name, {"shutdown_timeout": 2, **limit})
    try:
        yield started
    finally:
        started.close()


def hostile_request(pool: Pool, kind: str) -> tuple[Server, str, str]:
    """Serve a request whose first task is hostile and whose second is `quick`, while a task
    of another request runs (without max_running), then another request: each task but the
    hostile one completes, and the server still serves. Returns the server, the hostile
    task's id, and its request's path."""
    if kind in ASYNCIO_ONLY and pool.name == "hypercorn-trio":
        pytest.skip("asyncio's own cancellation: not on trio")
    server = pool.get()
    limited = "max_running" in pool.middleware  # one task at a time: no other may wait
    task_id, other, following = new_id(), new_id(), new_id()
    if not limited:
        assert get(server, f"/gated/{other}").status_code == 200
        call(server, "until", event=f"{other}:start")
    path = f"/hostile/{kind}/{task_id}"
    assert get(server, path).text == "ok"
    assert ended(server, f"{task_id}-after")[-1] == f"{task_id}-after:end"  # the next task ran
    assert call(server, "states", id=task_id)[:1] == ["failed"]
    if not limited:
        call(server, "open", id=other)
        assert ended(server, other) == [f"{other}:start", f"{other}:end"]
    assert get(server, f"/quick/{following}").text == "ok"
    assert ended(server, following)[-1] == f"{following}:end"
    assert server.process.poll() is None
    return server, task_id, path


def assert_failed_alone(output: str, task: str, path: str, traceback_ends: str) -> None:
    """The task's one log line says it failed, with the traceback; none says otherwise."""
    record = failure_record(output, rf"Task '{task}' of GET {re.escape(path)} failed")
    assert "Traceback (most recent call last):" in record
    assert traceback_ends in record
    lines = lines_about(output, f"GET {path}")
    assert len(lines) == 1, lines
    outcome = lines[0].partition(f" of GET {path} ")[2]  # what follows the names
    assert outcome.startswith("failed"), lines
    assert "abandoned" not in outcome
    assert "cancelled" not in outcome


@pytest.mark.parametrize("kind", BASE_EXCEPTIONS)
def test_a_task_raising_a_base_exception_fails_and_the_server_keeps_serving(
    pool: Pool, kind: str
) -> None:
    """SystemExit, sys.exit(), KeyboardInterrupt or another BaseException from a task ends it
    `failed` and logged with its traceback, and stops nothing else: not the server."""
    server, task_id, path = hostile_request(pool, kind)
    function, traceback_ends = BASE_EXCEPTIONS[kind]
    task = re.escape(f"tests.apps.hostile_app.{function}")
    assert_failed_alone(server.output(), task, path, traceback_ends.format(id=task_id))


@pytest.mark.parametrize("kind", CANCELLATIONS)
def test_a_task_cancelling_itself_or_raising_generator_exit_fails_alone(
    pool: Pool, kind: str
) -> None:
    """A task raising CancelledError or GeneratorExit, or cancelling the asyncio task it runs
    in, ends `failed` (never cancelled or abandoned): the worker goes on with the next task."""
    server, task_id, path = hostile_request(pool, kind)
    function, traceback_ends = CANCELLATIONS[kind]
    task = re.escape(f"tests.apps.hostile_app.{function}")
    assert_failed_alone(server.output(), task, path, traceback_ends.format(id=task_id))


def test_a_failing_task_whose_name_and_repr_raise_is_logged_by_a_fallback_name(
    pool: Pool,
) -> None:
    """A callable whose `__qualname__` and `repr()` raise still fails alone, logged as
    `<module.Class object at 0x...>`."""
    server, task_id, path = hostile_request(pool, "nameless")
    task = r"<tests\.apps\.hostile_app\.Nameless object at 0x[0-9a-fA-F]+>"
    assert_failed_alone(server.output(), task, path, f"ValueError: nameless {task_id}")


# WSGI: the middleware's own event loop thread must survive a hostile task.

WSGI_KINDS = {
    "sys-exit-sync": ("call_sys_exit", "SystemExit: 3"),
    "system-exit": ("raise_system_exit", "SystemExit: 3"),
    "keyboard-interrupt-sync": ("raise_keyboard_interrupt", "KeyboardInterrupt"),
}


@pytest.mark.parametrize("kind", WSGI_KINDS)
@pytest.mark.parametrize("server_name", ["waitress", "gunicorn"])
def test_wsgi_answers_in_full_and_runs_tasks_after_a_hostile_task(
    server_name: str, kind: str
) -> None:
    """Under PostResponseWSGIMiddleware, after a task raising SystemExit or KeyboardInterrupt,
    every later response is whole and every later task runs."""
    task_id = new_id()
    path = f"/hostile/{kind}/{task_id}"
    with run(server_name, "hostile_wsgi:app") as server:
        connection = Connection(server)
        try:
            assert connection.request("GET", path) == (200, BODY)
            assert ended(server, f"{task_id}-after")[-1] == f"{task_id}-after:end"
            assert call(server, "states", id=task_id)[:1] == ["failed"]
            for _ in range(3):  # on the same connection, then on new ones
                later = new_id()
                assert connection.request("GET", f"/quick/{later}") == (200, BODY)
                assert ended(server, later)[-1] == f"{later}:end"
        finally:
            connection.close()
        for _ in range(3):
            later = new_id()
            response = get(server, f"/quick/{later}")
            assert (response.status_code, response.content) == (200, BODY)
            assert ended(server, later)[-1] == f"{later}:end"
        assert server.process.poll() is None
        output = server.output()
    function, traceback_ends = WSGI_KINDS[kind]
    task = re.escape(f"tests.apps.hostile_wsgi.{function}")
    assert_failed_alone(output, task, path, traceback_ends)


# Shutdown: `shutdown_timeout` bounds the exit, whatever sync tasks still hold threads.


@pytest.mark.parametrize(
    "server_name", ["uvicorn-h11", "hypercorn-asyncio", "hypercorn-trio", "granian", "gunicorn"]
)
def test_shutdown_timeout_bounds_the_exit_while_a_sync_task_holds_its_thread(
    server_name: str,
) -> None:
    """With a started sync task blocked for 20 s and shutdown_timeout=2, the process exits
    within 10 s of SIGTERM, logging the task as abandoned while running in its thread.

    The WSGI server is gunicorn: waitress's CLI installs no SIGTERM handler, so SIGTERM
    kills it outright and no Python code, ours included, runs (README, Limitations)."""
    task_id = new_id()
    wsgi = server_name == "gunicorn"
    target = "hostile_wsgi:app" if wsgi else "hostile_app:app"
    with run(server_name, target, middleware={"shutdown_timeout": 2}) as server:
        assert get(server, f"/blocked/{task_id}").status_code == 200
        if wsgi:
            assert call(server, "started", id=task_id) is True
        else:
            call(server, "until", event=f"{task_id}:start")
        code = exit_code_after(server, signal.SIGTERM, limit=10)
        output = server.output()
    app = "hostile_wsgi" if wsgi else "hostile_app"
    lines = lines_about(output, f"GET /blocked/{task_id}")
    assert any(
        f"Task 'tests.apps.{app}.blocked'" in line and "abandoned" in line and "thread" in line
        for line in lines
    ), f"exit code {code}, log lines about the task: {lines}"


# Sync tasks past the thread limit: waiting for a thread is being queued, not running.

TIMEOUT = 0.5  # the waiting tasks' timeout, well under how long they wait for a thread


def fill_the_threads(server: Server) -> tuple[list[str], list[str]]:
    """Start `THREADS` blocked sync tasks, then add 5 quick sync ones (with a timeout of
    `TIMEOUT`) that must wait for a thread, and let more than `TIMEOUT` pass; return the ids
    of both."""
    holding = [new_id() for _ in range(THREADS)]
    waiting = [new_id() for _ in range(5)]
    for task_id in holding:
        assert get(server, f"/blocked/{task_id}").text == "ok"
    for task_id in holding:
        call(server, "until", event=f"{task_id}:start")
    for task_id in waiting:
        assert get(server, f"/quick-sync/{task_id}?timeout={TIMEOUT}").text == "ok"
    # An async task with the same timeout, added after them, needs no thread: once it has
    # timed out, the waiting tasks have waited longer than their timeout.
    sentinel = new_id()
    assert get(server, f"/sentinel/{sentinel}?timeout={TIMEOUT}").text == "ok"
    call(server, "until", event=f"{sentinel}:cancelled")
    return holding, waiting


@pytest.mark.parametrize("server_name", ["uvicorn-h11", "hypercorn-trio", "granian"])
def test_sync_tasks_waiting_for_a_thread_are_queued_and_their_timeout_starts_with_them(
    server_name: str,
) -> None:
    """With all 40 threads held, 5 more sync tasks count as queued, not running; once threads
    free up they run, their timeout counted from their start, and complete."""
    with run(server_name, "hostile_app:app") as server:
        holding, waiting = fill_the_threads(server)
        try:
            # Each task is counted somewhere: 40 holding threads, 5 waiting, the sentinel ended.
            stats = stats_when(server, lambda s: sum(s.values()) == THREADS + 5 + 1)
            counts = (stats["running"], stats["queued"], stats["timed_out"])
            assert counts == (THREADS, 5, 1), str(stats)
        finally:
            for task_id in holding:  # the threads are free again, and the server can stop
                call(server, "open", id=task_id)
        for task_id in waiting + holding:
            assert ended(server, task_id)[-1] == f"{task_id}:end"
        stats = settled(server)
        output = server.output()
    assert stats["completed"] == THREADS + 5, str(stats)
    assert stats["timed_out"] == 1, str(stats)  # the sentinel only
    for task_id in waiting:
        lines = lines_about(output, f"GET /quick-sync/{task_id}")
        assert not [line for line in lines if "timed out" in line], lines


@pytest.mark.parametrize("server_name", ["uvicorn-h11", "hypercorn-trio"])
def test_sync_tasks_still_waiting_for_a_thread_at_shutdown_are_abandoned(
    server_name: str,
) -> None:
    """At SIGTERM (shutdown_timeout=1), sync tasks that never got a thread end `abandoned`,
    logged as such (not timed out), and the process exits within 10 s."""
    with run(server_name, "hostile_app:app", middleware={"shutdown_timeout": 1}) as server:
        _, waiting = fill_the_threads(server)
        exit_code_after(server, signal.SIGTERM, limit=10)
        output = server.output()
    for task_id in waiting:
        assert f"event: {task_id}:start" not in output  # it never ran
        lines = lines_about(output, f"GET /quick-sync/{task_id}")
        assert len(lines) == 1, lines
        assert "abandoned" in lines[0], lines
        assert "thread" in lines[0], lines
        assert "timed out" not in lines[0], lines


# add_task() racing the end of its request's tasks.

ADDER_RUNS = 300


def test_a_thread_adding_tasks_while_the_request_finishes_leaves_no_task_pending() -> None:
    """A task's thread calls add_task() until it raises RequestFinishedError: every task it
    added ends in a final state and is counted, in each of 300 runs."""
    runs: list[dict[str, Any]] = []
    with run("uvicorn-h11", "hostile_app:app", middleware={"max_tasks": 10_000}) as server:
        for number in range(ADDER_RUNS):
            assert get(server, f"/adder/{number}").text == "ok"
            runs.append(call(server, "adder", id=str(number)))
        stats = settled(server)
    assert not [r for r in runs if "error" in r], runs
    stuck = [r for r in runs if set(r["states"]) - {"completed"}]
    assert not stuck, f"{len(stuck)} of {ADDER_RUNS} runs left tasks not completed: {stuck[:5]}"
    added = sum(r["added"] for r in runs)
    assert stats["completed"] == added + ADDER_RUNS, f"{added} added: {stats}"  # and spawners


# max_queued bounds tasks that wait, not tasks that are about to start.

QUICK_REQUESTS = 2000
CONNECTIONS = 50  # more than max_queued: more tasks than that may be handed over at once


def test_max_queued_counts_only_tasks_that_wait() -> None:
    """With max_queued=20 and no max_running, 2,000 requests over 50 connections each add a
    quick task: none has to wait, so none is dropped, and all complete."""
    paths = (f"/count/{n}" for n in range(QUICK_REQUESTS))
    with run("uvicorn-h11", "hostile_app:app", middleware={"max_queued": 20}) as server:
        statuses = asyncio.run(hammer(server.port, paths, CONNECTIONS))
        assert statuses == {200: QUICK_REQUESTS}
        stats = stats_when(
            server, lambda s: s["completed"] + s["dropped"] == QUICK_REQUESTS and not s["running"]
        )
    assert (stats["dropped"], stats["completed"]) == (0, QUICK_REQUESTS), str(stats)
