"""Tests written for `BackgroundTasks` keep passing after the move to `add_task()`.

FastAPI's tutorial tests assert on a task's effect right after the request returns. A test
client's event loop may close right after the response (Starlette's `TestClient` used
without `with` runs each request in a loop of its own): the middleware then finishes the
tasks before the loop closes. Where the loop stays up, `requests_wait_for_tasks()` (the
pytest plugin's switch) makes the client return once the tasks have run.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Literal

import anyio
import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from post_response import PostResponseMiddleware, TaskState, add_task
from post_response.testing import (
    TasksLostError,
    requests_wait_for_tasks,
    wait_for_tasks,
    wait_for_tasks_async,
)

LOOPS = 200  # each form is repeated: a race would show up as a failure in some of them
EXAMPLES = Path(__file__).parent / "doc_examples" / "migrating"
Backend = Literal["asyncio", "trio"]
BACKENDS: list[Backend] = ["asyncio", "trio"]


def tutorial(log: list[str]) -> FastAPI:
    """FastAPI's Background Tasks tutorial: a dependency's task, then the endpoint's; an
    async task slower than the request, and a sync one."""
    app = FastAPI()
    app.add_middleware(PostResponseMiddleware)

    async def write_later(message: str) -> None:
        await anyio.sleep(0.002)
        log.append(message)

    def write_in_a_thread(message: str) -> None:
        time.sleep(0.002)
        log.append(message)

    @app.post("/send-notification/{email}")
    async def send_notification(email: str, q: str) -> dict[str, str]:
        add_task(write_in_a_thread, f"found query: {q}")
        add_task(write_later, f"message to {email}")
        return {"message": "Message sent"}

    return app


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_client_without_with_sees_the_tasks_effects_every_time(backend: Backend) -> None:
    """Upstream's shape, `client = TestClient(app)` and no plugin: each request's loop closes
    after the response, and the tasks finish first, 200 times out of 200."""
    log: list[str] = []
    client = TestClient(tutorial(log), backend=backend)
    failures = []
    for n in range(LOOPS):
        log.clear()
        response = client.post(f"/send-notification/{n}@example.com", params={"q": "some-query"})
        assert response.json() == {"message": "Message sent"}
        if log != ["found query: some-query", f"message to {n}@example.com"]:
            failures.append((n, list(log)))
    assert failures == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_requests_wait_for_tasks_with_a_client_in_a_with_block(backend: Backend) -> None:
    """`with TestClient(app)` keeps one loop up; with the switch on, each request returns
    once its tasks have run, 200 times out of 200."""
    log: list[str] = []
    failures = []
    with requests_wait_for_tasks(), TestClient(tutorial(log), backend=backend) as client:
        for n in range(LOOPS):
            log.clear()
            client.post(f"/send-notification/{n}@example.com", params={"q": "q"})
            if log != ["found query: q", f"message to {n}@example.com"]:
                failures.append((n, list(log)))
    assert failures == []


@pytest.mark.anyio
async def test_requests_wait_for_tasks_with_httpx_async_client() -> None:
    """httpx's `ASGITransport` in an async test (asyncio and trio): with the switch on, each
    request returns once its tasks have run, 200 times out of 200."""
    log: list[str] = []
    transport = httpx.ASGITransport(app=tutorial(log))
    failures = []
    with requests_wait_for_tasks():
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for n in range(LOOPS):
                log.clear()
                await client.post(f"/send-notification/{n}@example.com", params={"q": "q"})
                if log != ["found query: q", f"message to {n}@example.com"]:
                    failures.append((n, list(log)))
    assert failures == []


@pytest.mark.anyio
async def test_without_the_switch_the_async_client_returns_before_the_tasks() -> None:
    """The switch is what makes the client wait: without it the request returns first."""
    gate = anyio.Event()
    log: list[str] = []
    app = FastAPI()
    app.add_middleware(PostResponseMiddleware)

    async def gated() -> None:
        await gate.wait()
        log.append("ran")

    @app.get("/")
    async def endpoint() -> None:
        add_task(gated)

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        await client.get("/")
        assert log == []
        gate.set()
        await wait_for_tasks_async()
    assert log == ["ran"]


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_a_task_cancelled_as_the_loop_closes_says_why(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Past `shutdown_timeout`, a task still running as a test client's loop closes is
    logged with the loop closing and the option that would have waited, and
    `wait_for_tasks()` reports it instead of returning as if all went well."""
    release = threading.Event()
    app = FastAPI()
    app.add_middleware(PostResponseMiddleware, shutdown_timeout=0.05)
    handles = []

    async def stuck_async() -> None:
        await anyio.sleep(30)

    def stuck_sync() -> None:
        release.wait(30)

    @app.get("/")
    async def endpoint() -> None:
        handles.append(add_task(stuck_async if kind == "async" else stuck_sync))

    try:
        TestClient(app).get("/")
        with pytest.raises(TasksLostError, match=r"1 tasks did not run to their end: 'tests\."):
            wait_for_tasks()
    finally:
        release.set()
    [handle] = handles
    expected = TaskState.CANCELLED if kind == "async" else TaskState.ABANDONED
    assert handle.state is expected
    [record] = [r for r in caplog.records if r.levelno >= logging.WARNING and "stuck" in r.message]
    assert "the event loop closed without a lifespan shutdown" in record.message
    assert "shutdown_timeout=0.05s passed" in record.message
    assert "post_response.pytest_plugin" in record.message
    wait_for_tasks()  # reported once: the next call starts afresh


@pytest.mark.parametrize("example", ["fastapi_tests.py", "django_tests.py"])
def test_the_readme_migration_examples_pass(example: str, tmp_path: Path) -> None:
    """The README's "Migrating your tests" examples pass as written, with the plugin in
    their conftest.py (each in a process of its own: Django is configured once per process)."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", example],
        cwd=EXAMPLES,
        env={
            **os.environ,
            "PYTHONPATH": str(EXAMPLES.parents[2]),
            "TUTORIAL_LOG": str(tmp_path / "log.txt"),
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    expected = {"fastapi_tests.py": "4 passed", "django_tests.py": "2 passed"}[example]
    assert expected in done.stdout, done.stdout


RUN_ENDS_AT_ONCE = """
import sys, time, anyio
from post_response import PostResponseMiddleware, add_task

def sync_task():
    time.sleep(0.01)
    print("sync task ran")

async def async_task():
    await anyio.sleep(0.01)
    print("async task ran")

async def app(scope, receive, send):
    add_task(sync_task)
    add_task(async_task)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})

async def receive():
    return {"type": "http.request", "body": b""}

async def send(message):
    pass

async def main():
    middleware = PostResponseMiddleware(app)
    await middleware({"type": "http", "method": "GET", "path": "/", "headers": []}, receive, send)

anyio.run(main, backend=sys.argv[1])
print("run over")
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_run_that_ends_right_after_the_request_runs_its_tasks_first(backend: Backend) -> None:
    """`anyio.run()` returning at once after a request (no lifespan, nothing joined): the
    tasks run before the run is over, and the run does end (on trio it once hung)."""
    done = subprocess.run(
        [sys.executable, "-c", RUN_ENDS_AT_ONCE, backend],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["sync task ran", "async task ran", "run over"]
