"""Keys, single-flight, debounce, retries and shutdown on real servers (uvicorn on asyncio,
hypercorn on trio), proven with gates and counts, never with timing."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from .servers import Server, exit_code_after, run

SERVERS = ["uvicorn-h11", "hypercorn-trio", "waitress"]
APPS = {"waitress": "wsgi_scheduling:app"}  # the others serve scheduling_app:app
GRACEFUL = {"hypercorn-trio": ["--graceful-timeout", "30"]}
# waitress installs no SIGTERM handler: Python dies at once, without running atexit, where
# the WSGI middleware drains; SIGINT (Ctrl+C) makes it exit through atexit.
STOP = {"waitress": signal.SIGINT}


def new_id() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="module", params=SERVERS)
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    target = APPS.get(request.param, "scheduling_app:app")
    with run(request.param, target, *GRACEFUL.get(request.param, [])) as started:
        yield started


def burst(server: Server, paths: list[str]) -> list[int]:
    """Send the requests 50 at a time, all in flight together; return their statuses.

    50 senders, not one coroutine per request: httpx's pool slows down quadratically with
    the requests queued in it (1,000 took 14 s), and a slow burst outlasted the first
    rebuild's 30 s gate. Not 100 connections either: that is waitress's `connection_limit`."""

    async def send_all() -> list[int]:
        statuses = [0] * len(paths)
        order = iter(range(len(paths)))
        limits = httpx.Limits(max_connections=SENDERS)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as client:

            async def sender() -> None:
                for n in order:
                    statuses[n] = (await client.get(paths[n])).status_code

            await asyncio.gather(*(sender() for _ in range(SENDERS)))
        return statuses

    return asyncio.run(send_all())


SENDERS = 50


def stats_until(server: Server, ready: str, count: int) -> dict[str, int]:
    """The middleware's counters once `ready` has reached `count` (polled: a count, not a
    time, is what the test waits for)."""
    deadline = time.monotonic() + 30
    while True:
        stats: dict[str, int] = server.control("stats")
        if stats[ready] >= count or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


def events_of(server: Server, prefix: str) -> list[str]:
    return [e for e in server.control("events") if e.startswith(prefix)]


def test_a_burst_of_a_thousand_rebuilds_runs_at_most_twice(server: Server) -> None:
    """The first rebuild waits on a gate while 1,000 requests ask for the same cache: when it
    ends, one more rebuild runs, with the newest arguments; the 999 others are superseded."""
    cache = new_id()
    before = server.control("stats")
    assert httpx.get(f"{server.url}/rebuild?id={cache}&n=0", timeout=10).status_code == 200
    server.control("until", event=f"{cache}:rebuild 0")
    statuses = burst(server, [f"/rebuild?id={cache}&n={n}" for n in range(1, 1001)])
    assert statuses == [200] * 1000
    stats = stats_until(server, "superseded", before["superseded"] + 999)
    assert stats["superseded"] - before["superseded"] == 999
    assert events_of(server, f"{cache}:") == [f"{cache}:rebuild 0"]  # the gate is still shut
    server.control("open", id=f"{cache}-first")
    stats = stats_until(server, "completed", before["completed"] + 2)
    assert stats["completed"] - before["completed"] == 2  # 1 + 999 + 1 = all 1,001 ended
    rebuilds = events_of(server, f"{cache}:rebuild")
    assert len(rebuilds) == 2
    assert rebuilds[0] == f"{cache}:rebuild 0"


def test_a_debounced_task_runs_once_per_burst_with_the_last_arguments(server: Server) -> None:
    """Twenty requests with one key and a delay: one run, after the burst, the other
    nineteen superseded; every request's task is accounted for."""
    index = new_id()
    before = server.control("stats")
    statuses = burst(server, [f"/debounce?id={index}&n={n}&delay=0.5" for n in range(20)])
    assert statuses == [200] * 20
    stats = stats_until(server, "completed", before["completed"] + 1)
    ran = events_of(server, f"{index}:ran")
    assert len(ran) == 1
    assert stats["superseded"] - before["superseded"] == 19
    assert stats["completed"] - before["completed"] == 1


def test_a_flaky_task_is_retried_and_each_failure_logged(server: Server) -> None:
    """A task that fails twice completes on its third attempt; the server's log has each
    failed attempt with its number and the next delay, and no failure of the task."""
    task_id = new_id()
    assert httpx.get(f"{server.url}/flaky?id={task_id}&fails=2", timeout=10).status_code == 200
    events = server.control("until", event=f"{task_id}:end")
    assert [e for e in events if e.startswith(task_id)] == [
        f"{task_id}:attempt 1",
        f"{task_id}:attempt 2",
        f"{task_id}:attempt 3",
        f"{task_id}:end",
    ]
    output = server.output()
    prefix = "Task 'flaky' of GET /flaky failed (attempt {} of 4): ConnectionError: attempt {} of"
    assert prefix.format(1, 1) in output
    assert prefix.format(2, 2) in output
    assert f"attempt 3 of {task_id} failed" not in output


def test_a_task_failing_every_attempt_fails_once_with_its_traceback(server: Server) -> None:
    """After its fourth attempt the task is failed: one ERROR with the traceback."""
    task_id = new_id()
    before = server.control("stats")
    assert httpx.get(f"{server.url}/flaky?id={task_id}&fails=99", timeout=10).status_code == 200
    server.control("until", event=f"{task_id}:attempt 4")
    stats = stats_until(server, "failed", before["failed"] + 1)
    assert stats["failed"] - before["failed"] == 1
    output = server.output()
    assert output.count("Task 'flaky' of GET /flaky failed after 4 attempts") == 1
    assert f"ConnectionError: attempt 4 of {task_id} failed" in output


@pytest.mark.parametrize("server_name", SERVERS)
def test_sigterm_runs_delayed_tasks_and_abandons_those_waiting_to_retry(server_name: str) -> None:
    """SIGTERM (waitress: SIGINT) while one task waits for its 600 s delay and another for
    its next attempt: the delayed task runs at once, the other is abandoned with its attempt
    count, and the process exits by itself well within shutdown_timeout."""
    delayed, flaky = new_id(), new_id()
    graceful = GRACEFUL.get(server_name, [])
    options = {"shutdown_timeout": 30}
    target = APPS.get(server_name, "scheduling_app:app")
    with run(server_name, target, *graceful, middleware=options) as server:
        assert httpx.get(f"{server.url}/delayed?id={delayed}&delay=600").status_code == 200
        url = f"{server.url}/flaky?id={flaky}&fails=99&backoff=600"
        assert httpx.get(url).status_code == 200
        server.control("until", event=f"{flaky}:attempt 1")
        assert events_of(server, f"{delayed}:") == []
        exit_code_after(server, STOP.get(server_name, signal.SIGTERM), limit=20)
        output = server.output()
    assert f"event: {delayed}:ran" in output, output
    assert (
        "Task 'flaky' of GET /flaky abandoned: the server shut down while it waited for its "
        "next attempt, after 1 failed"
    ) in output
    assert f"event: {flaky}:attempt 2" not in output


@pytest.mark.parametrize("server_name", SERVERS)
def test_a_flood_of_keys_of_its_own_with_a_long_delay_is_bounded(server_name: str) -> None:
    """Sixty requests, each debouncing a key of its own (taken from the client) with a 600 s
    delay, under `max_queued=20`: twenty wait, counted as `held`; forty are dropped, logged
    and counted; a failing task is then not retried. At SIGTERM (waitress: SIGINT) the
    twenty run at once."""
    flood, flaky = new_id(), new_id()
    options = {"max_queued": 20, "shutdown_timeout": 30}
    target = APPS.get(server_name, "scheduling_app:app")
    with run(server_name, target, *GRACEFUL.get(server_name, []), middleware=options) as server:
        paths = [f"/debounce?id={flood}-{n}&n={n}&delay=600" for n in range(60)]
        assert burst(server, paths) == [200] * 60
        stats = stats_until(server, "dropped", 40)
        assert (stats["held"], stats["dropped"], stats["queued"]) == (20, 40, 0)
        assert httpx.get(f"{server.url}/flaky?id={flaky}&fails=99").status_code == 200
        stats = stats_until(server, "failed", 1)
        assert (stats["failed"], stats["held"]) == (1, 20)
        exit_code_after(server, STOP.get(server_name, signal.SIGTERM), limit=20)
        output = server.output()
    assert output.count("dropped: max_queued=20 tasks already wait for a delay, a key") == 40
    assert "failed (attempt 1 of 4): not retried, max_queued=20 tasks already wait" in output
    assert f"event: {flaky}:attempt 2" not in output
    assert output.count(f"event: {flood}-") == 20


@pytest.mark.parametrize("server_name", SERVERS)
def test_at_sigterm_delayed_sync_tasks_run_though_no_task_ran_before(server_name: str) -> None:
    """A server whose only tasks are sync and delayed, so none has needed a worker thread
    yet: at SIGTERM (waitress: SIGINT) they run at once. Under WSGI they run at interpreter
    exit, where Python 3.12+ starts no new thread: each failed with `RuntimeError: can't
    create new thread at interpreter shutdown`, and the pool, counting threads that had not
    started, left the others waiting for one until the exit gave up on them."""
    delayed, index = new_id(), new_id()
    target = APPS.get(server_name, "scheduling_app:app")
    graceful = GRACEFUL.get(server_name, [])
    with run(server_name, target, *graceful, middleware={"shutdown_timeout": 30}) as server:
        paths = [f"/delayed?id={delayed}-{n}&delay=600" for n in range(50)]
        paths.append(f"/debounce?id={index}&n=0&delay=600")
        assert burst(server, paths) == [200] * 51
        assert stats_until(server, "held", 51)["held"] == 51
        exit_code_after(server, STOP.get(server_name, signal.SIGTERM), limit=20)
        output = server.output()
    assert output.count(f"event: {delayed}-") == 50, output
    assert f"event: {index}:ran 0" in output
    assert "can't create new thread" not in output
