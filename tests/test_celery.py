"""Handing tasks to Celery after the response, with a real Redis broker and a real worker.

Needs Redis on 127.0.0.1:6379 (`.ci/run` starts one). Without it the tests are skipped with
a message saying how to run them, except under CI (`CI=true`), where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from .load import hammer
from .servers import Process, Server, background, free_port, require_service, run

DB = 13  # a database of the machine's Redis for these tests
# This run's own queue and list of records: two runs at once on one machine (two Pythons,
# a test run beside another) neither take each other's tasks nor wipe each other's records.
RUN = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
QUEUE, RECORDS = f"post_response_tests:{RUN}", f"post_response:records:{RUN}"
NAMES = {"CELERY_QUEUE": QUEUE, "CELERY_RECORDS_KEY": RECORDS}


def redis_url(port: int = 6379, db: int = DB) -> str:
    return f"redis://127.0.0.1:{port}/{db}"


@pytest.fixture(scope="module")
def broker() -> Iterator[str]:
    """The machine's Redis (database 13, emptied), or a skip that says how to get one."""
    require_service(
        6379,
        "the Celery tests need Redis on 127.0.0.1:6379: start one with "
        "`redis-server --daemonize yes --bind 127.0.0.1 --save ''` (CI does)",
    )
    store = redis.Redis.from_url(redis_url())
    # Also Kombu's note of the queue's exchange bindings: nothing of the run is left behind.
    keys = (QUEUE, RECORDS, f"_kombu.binding.{QUEUE}", f"_kombu.binding_permanent.{QUEUE}")
    store.delete(*keys)
    yield redis_url()
    store.delete(*keys)


def worker(url: str, records: str | None = None) -> contextlib.AbstractContextManager[Process]:
    return background(
        [sys.executable, "-m", "celery", "-A", "tests.apps.celery_tasks", "worker",
         "--pool=solo", "--concurrency=1", "--without-mingle", "--without-gossip",
         "--without-heartbeat", "--loglevel=INFO"],
        ready="ready.",
        env={"CELERY_BROKER": url, "CELERY_RECORDS": records or url, **NAMES},
    )  # fmt: skip


@pytest.fixture(scope="module")
def celery_worker(broker: str) -> Iterator[Process]:
    with worker(broker) as started:
        yield started


@pytest.fixture(scope="module")
def web(broker: str, celery_worker: Process) -> Iterator[Server]:
    with run("uvicorn-h11", "celery_web:app", env={"CELERY_BROKER": broker, **NAMES}) as server:
        yield server


def new_id() -> str:
    return uuid.uuid4().hex[:8]


def records_once(url: str, item: str, limit: float = 20) -> list[str]:
    """What the worker has run, once `item` is among it: the worker runs tasks in the order
    they were enqueued, so all that was enqueued before `item` has run too."""
    store = redis.Redis.from_url(url)
    deadline = time.monotonic() + limit
    while True:
        done = [
            r.decode() if isinstance(r, bytes) else str(r) for r in store.lrange(RECORDS, 0, -1)
        ]
        if item in done:
            return done
        if time.monotonic() > deadline:
            raise AssertionError(f"{item!r} never ran; ran: {done[-20:]}")
        time.sleep(0.02)


def test_a_task_is_enqueued_after_the_response_and_runs_on_the_worker(
    web: Server, broker: str
) -> None:
    """The Celery task comes after a gated task of the same request: the client has the
    response while the gate is shut, so nothing was enqueued yet; once open, the worker runs it."""
    task_id, gate = new_id(), new_id()
    assert httpx.get(f"{web.url}/signup?id={task_id}&gate={gate}", timeout=10).text == "ok"
    web.control("until", event=f"{gate}:start")
    store = redis.Redis.from_url(broker)
    assert task_id.encode() not in store.lrange(RECORDS, 0, -1)
    assert store.llen(QUEUE) == 0  # not even enqueued
    web.control("open", id=gate)
    assert task_id in records_once(broker, task_id)


def test_a_failed_request_enqueues_nothing(web: Server, broker: str) -> None:
    """A 500's task never reaches the broker; a later successful request's task does."""
    failed, later = new_id(), new_id()
    assert httpx.get(f"{web.url}/failed?id={failed}", timeout=10).status_code == 500
    assert httpx.get(f"{web.url}/signup?id={later}", timeout=10).status_code == 200
    assert failed not in records_once(broker, later)
    assert "skipped: the response status was 500" in web.output()


def test_signatures_and_plain_functions_registered_as_tasks_are_enqueued(
    web: Server, broker: str
) -> None:
    """`add_task(task.s(...))` and, with `celery_app=`, a plain registered function go to Celery."""
    signature, plain = new_id(), new_id()
    httpx.get(f"{web.url}/signature?id={signature}", timeout=10)
    httpx.get(f"{web.url}/plain?id={plain}", timeout=10)
    done = records_once(broker, f"plain {plain}")
    assert signature in done


def test_a_group_is_enqueued(web: Server, broker: str) -> None:
    """`add_task(group(...))`: Celery's canvas primitives take their own arguments, not
    those of the task behind their name (`celery.group`), and are enqueued as they are."""
    group_id = new_id()
    assert httpx.get(f"{web.url}/group?id={group_id}", timeout=10).status_code == 200
    assert {f"{group_id} 1", f"{group_id} 2"} <= set(records_once(broker, f"{group_id} 2"))


def test_a_signature_of_a_task_known_only_to_the_workers_is_enqueued(
    web: Server, broker: str
) -> None:
    """`add_task(app.signature("name", args=...))` for a task the web process does not
    define: Celery sends it by name, and the worker runs it."""
    task_id = new_id()
    assert httpx.get(f"{web.url}/by_name?id={task_id}", timeout=10).status_code == 200
    assert f"remote {task_id}" in records_once(broker, f"remote {task_id}")


def fails_in_the_request(web: Server, path: str, error: str) -> None:
    """`GET path` answers 500, and the server's output has the `error` (a regex) it raised."""
    assert httpx.get(f"{web.url}{path}", timeout=10).status_code == 500
    assert re.search(error, web.output())


def test_unserializable_arguments_are_an_error_in_the_request(web: Server) -> None:
    """An object JSON cannot carry fails `add_task()` in the request, saying why."""
    fails_in_the_request(
        web,
        "/unserializable",
        r"UnserializableArgumentsError: The arguments of Celery task "
        r"'tests.apps.celery_tasks.record' cannot be encoded with its 'json' serializer: "
        r"argument 1 is of type Unsendable\.",
    )


def test_arguments_the_task_does_not_take_are_an_error_in_the_request(web: Server) -> None:
    """Celery's own check of a task's arguments (`typing`) is made by `add_task()`: after
    the response it would lose the task."""
    fails_in_the_request(
        web,
        f"/wrong_arguments?id={new_id()}",
        r"InvalidTaskError: Celery task 'tests.apps.celery_tasks.record' cannot be called with "
        r"tests\.apps\.celery_tasks\.record\(str, str\): .*takes 1 positional argument but 2 "
        r"were given\.",
    )


def test_enqueueing_10000_tasks(web: Server, broker: str) -> None:
    """10,000 requests each enqueue one task; the worker runs every one of them, once."""
    prefix = new_id()
    started = time.perf_counter()
    paths = (f"/signup?id={prefix}-{n}" for n in range(10_000))
    assert asyncio.run(hammer(web.port, paths, connections=50)) == {200: 10_000}
    answered = time.perf_counter() - started
    drained(web)  # all enqueued (in no particular order: batches run side by side)
    httpx.get(f"{web.url}/signup?id={prefix}-after", timeout=10)
    done = records_once(broker, f"{prefix}-after", limit=120)
    ran = [r for r in done if r.startswith(prefix) and not r.endswith("-after")]
    assert sorted(ran) == sorted(f"{prefix}-{n}" for n in range(10_000))
    print(f"\n10,000 requests answered in {answered:.1f}s; all run on the worker.")


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A Redis of this test's own, persisting to disk so that it can be stopped and restarted."""
    port = free_port()
    yield port, tmp_path
    subprocess.run(
        ["redis-cli", "-p", str(port), "shutdown", "nosave"], check=False, capture_output=True
    )


def redis_server(port: int, directory: Path) -> contextlib.AbstractContextManager[Process]:
    return background(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
         "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
        ready="Ready to accept connections",
    )  # fmt: skip


def test_stopping_redis_during_a_burst_loses_nothing_the_logs_do_not_name(
    own_redis: tuple[int, Path], broker: str
) -> None:
    """Redis stops in the middle of 200 requests, then comes back: every task either ran on
    the worker or is named in the web server's log (by the name the app gave it: the log
    shows the types of its arguments, never their values)."""
    port, directory = own_redis
    url, prefix = redis_url(port, 0), new_id()
    ids = [f"{prefix}-{n}" for n in range(200)]
    # The records outlive the broker.
    environ = {"CELERY_BROKER": url, "CELERY_RECORDS": broker, **NAMES}
    with (
        redis_server(port, directory) as first_redis,
        worker(url, records=broker),
        run("uvicorn-h11", "celery_web:app", env=environ) as web,
    ):
        for n, task_id in enumerate(ids):
            if n == 60:
                # Once the worker has run what was enqueued so far: a message it had taken
                # but not run when its broker went away is Redis's to redeliver (after its
                # visibility timeout, an hour), not this library's to lose or log.
                records_once(broker, ids[n - 1], limit=60)
                first_redis.process.terminate()  # SIGTERM: Redis saves its append-only file
                first_redis.process.wait(timeout=15)
            assert httpx.get(f"{web.url}/signup?id={task_id}", timeout=30).status_code == 200
        drained(web)  # every enqueue has succeeded or given up
        with redis_server(port, directory):
            sentinel = f"{prefix}-after"
            assert httpx.get(f"{web.url}/signup?id={sentinel}", timeout=30).status_code == 200
            done = records_once(broker, sentinel, limit=120)
            output = web.output()
    lost = set(re.findall(rf"Task 'record ({prefix}-\d+)' of GET /signup failed", output))
    assert "Could not enqueue Celery task tests.apps.celery_tasks.record(str) after" in output
    ran = [r for r in done if r.startswith(prefix) and r != sentinel]
    assert lost, "Redis was down for most of the burst: some enqueues must have failed"
    assert set(ran) | lost == set(ids)
    assert not set(ran) & lost
    assert len(ran) == len(set(ran))  # none ran twice


def drained(server: Server, limit: float = 60) -> None:
    """Wait until the web server has no task queued or running."""
    deadline = time.monotonic() + limit
    while True:
        stats = server.control("stats")
        if stats["queued"] == stats["running"] == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"tasks still pending: {stats}")
        time.sleep(0.05)
