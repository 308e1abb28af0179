"""`post_response.testing`: capture tasks, run them when the test says, wait for them."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient

from post_response import (
    ConfigurationError,
    OutsideRequestError,
    PostResponseMiddleware,
    TaskState,
    _registry,
    add_task,
)
from post_response.testing import capture_tasks, wait_for_tasks, wait_for_tasks_async

SENT: list[str] = []


def send_welcome_email(to: str, *, subject: str) -> None:
    SENT.append(f"{subject} -> {to}")


async def fail_loudly() -> None:
    raise ValueError("the mail server is down")


app = FastAPI()
app.add_middleware(PostResponseMiddleware)


@app.post("/signup")
async def signup(email: str) -> dict[str, bool]:
    add_task(send_welcome_email, email, subject="Welcome")
    return {"ok": True}


@app.post("/broken")
async def broken() -> dict[str, bool]:
    add_task(fail_loudly)
    return {"ok": True}


@app.post("/error")
async def error() -> dict[str, bool]:
    add_task(send_welcome_email, "nobody", subject="never")
    raise HTTPException(status_code=503)


@pytest.fixture(autouse=True)
def _clear_sent() -> None:
    SENT.clear()


def test_capture_records_tasks_without_running_them_and_runs_them_on_demand() -> None:
    """The test sees each task's function and arguments; nothing runs until `run()`."""
    client = TestClient(app)
    with capture_tasks() as tasks:
        response = client.post("/signup", params={"email": "ada@example.com"})
    assert response.json() == {"ok": True}
    [task] = tasks
    assert (task.func, task.args, task.kwargs) == (
        send_welcome_email,
        ("ada@example.com",),
        {"subject": "Welcome"},
    )
    assert task.name == "tests.test_testing.send_welcome_email"
    assert (task.state, SENT) == (TaskState.PENDING, [])
    tasks.run()
    assert (task.state, SENT) == (TaskState.COMPLETED, ["Welcome -> ada@example.com"])


def test_a_captured_tasks_failure_reaches_the_test() -> None:
    """Running a captured task that raises raises in the test, instead of only logging."""
    with capture_tasks() as tasks:
        TestClient(app).post("/broken")
    with pytest.raises(ValueError, match="the mail server is down"):
        tasks.run()
    assert tasks[0].state is TaskState.FAILED


def test_the_policy_still_applies_while_capturing() -> None:
    """A request that failed (503) adds nothing to the capture: its task is skipped."""
    with capture_tasks() as tasks:
        assert TestClient(app).post("/error").status_code == 503
    assert list(tasks) == []


def test_capture_with_run_runs_at_the_end_of_the_block() -> None:
    """`capture_tasks(run=True)` runs what it captured when the block ends."""
    with capture_tasks(run=True):
        TestClient(app).post("/signup", params={"email": "bo@example.com"})
        assert SENT == []
    assert SENT == ["Welcome -> bo@example.com"]


def test_add_task_outside_a_request_is_captured_instead_of_failing() -> None:
    """Code run without the middleware (a view called directly) can be tested in a capture."""
    with capture_tasks() as tasks:
        add_task(send_welcome_email, "cy@example.com", subject="Hi")
    assert [t.args for t in tasks] == [("cy@example.com",)]
    with pytest.raises(OutsideRequestError):
        add_task(send_welcome_email, "cy@example.com", subject="Hi")


def test_wait_for_tasks_waits_for_detached_tasks() -> None:
    """Tasks run detached as in production; `wait_for_tasks()` returns once they have ended."""
    with TestClient(app) as client:  # runs lifespan, so tasks go to the lifespan's owner
        client.post("/signup", params={"email": "di@example.com"})
        wait_for_tasks()
        assert SENT == ["Welcome -> di@example.com"]


def test_wait_for_tasks_names_what_is_still_running() -> None:
    """Past its timeout, `wait_for_tasks()` raises and names the tasks not done."""
    release = threading.Event()
    stuck = FastAPI()
    stuck.add_middleware(PostResponseMiddleware)

    @stuck.get("/")
    async def endpoint() -> None:
        add_task(release.wait, 10)

    with TestClient(stuck) as client:
        client.get("/")
        try:
            with pytest.raises(TimeoutError, match=r"1 tasks still not done .*: '.*wait' of GET /"):
                wait_for_tasks(timeout=0.05)
        finally:
            release.set()
        wait_for_tasks()


@pytest.mark.anyio
async def test_async_tests_capture_and_wait_too() -> None:
    """With httpx's ASGI transport: `await tasks.arun()` and `await wait_for_tasks_async()`."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        with capture_tasks() as tasks:
            await client.post("/signup", params={"email": "ed@example.com"})
        await tasks.arun()
        assert SENT == ["Welcome -> ed@example.com"]
        await client.post("/signup", params={"email": "fy@example.com"})
        await wait_for_tasks_async()
    assert SENT == ["Welcome -> ed@example.com", "Welcome -> fy@example.com"]


def test_the_django_example_of_the_readme_passes() -> None:
    """The README's Django example (Django's own test client) passes as written.

    It runs in a process of its own: configuring Django is once per process.
    """
    example = Path(__file__).parent / "doc_examples" / "django_tests.py"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(example)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout


def test_capture_tasks_refuses_a_run_flag_that_is_not_a_bool() -> None:
    """`capture_tasks(run="no")` would run the tasks: it is refused, naming the option."""
    with pytest.raises(ConfigurationError, match=r"capture_tasks\(run=\.\.\.\)"):  # noqa: SIM117
        with capture_tasks(run="no"):  # type: ignore[arg-type]
            pass


@pytest.mark.parametrize("timeout", ["5", -1, True, float("nan")])
def test_wait_for_tasks_refuses_a_timeout_that_is_not_seconds(timeout: object) -> None:
    """A timeout that is not a number of seconds is refused, even with nothing to wait for."""
    with pytest.raises(ConfigurationError, match=r"wait_for_tasks\(timeout=\.\.\.\)"):
        wait_for_tasks(timeout)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [float("inf"), 1e12])
def test_wait_for_tasks_takes_a_timeout_too_long_for_the_platform_as_no_limit(
    timeout: float,
) -> None:
    """`wait_for_tasks(math.inf)` waits for the tasks, as `None` does, without overflowing."""
    slow = FastAPI()
    slow.add_middleware(PostResponseMiddleware)

    def until_waited_for() -> None:
        """End once `wait_for_tasks()` waits (a gate: it is then blocked on its condition)."""
        deadline = threading.Event()
        for _ in range(1000):
            if _registry.waiters:
                return
            deadline.wait(0.01)

    @slow.get("/")
    async def endpoint() -> None:
        add_task(until_waited_for)

    with TestClient(slow) as client:
        client.get("/")
        wait_for_tasks(timeout)
        assert _registry.waiters == 0


@pytest.mark.anyio
async def test_running_captured_tasks_in_an_async_test_names_the_fix() -> None:
    """`run()` and `capture_tasks(run=True)` start an event loop: inside one, on asyncio and
    trio alike, they are refused when called (before the block), naming `await tasks.arun()`."""
    block_ran = False
    with capture_tasks() as tasks:
        add_task(send_welcome_email, "gu@example.com", subject="Hi")
    with pytest.raises(RuntimeError, match=r"await tasks\.arun\(\)"):
        tasks.run()
    with pytest.raises(RuntimeError, match=r"await tasks\.arun\(\)"):  # noqa: SIM117
        with capture_tasks(run=True):
            block_ran = True
    assert not block_ran
    await tasks.arun()
    assert SENT == ["Hi -> gu@example.com"]


@pytest.mark.anyio
async def test_wait_for_tasks_on_an_event_loop_names_the_async_one() -> None:
    """Blocking the loop would keep its tasks from running until the timeout: refused at once,
    naming `await wait_for_tasks_async()`."""
    with pytest.raises(RuntimeError, match=r"await wait_for_tasks_async\(\)"):
        wait_for_tasks()
    await wait_for_tasks_async()
