"""WSGI on real threaded servers (waitress, gunicorn gthread): Flask and Django over WSGI."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ..servers import Connection, Server, run

APPS = [
    ("waitress", "flask_app:app"),
    ("gunicorn", "flask_app:app"),
    ("waitress", "django_wsgi:app"),
]


def new_id() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="module", params=APPS, ids=["-".join(a) for a in APPS])
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    name, target = request.param
    with run(name, target) as started:
        yield started


def test_the_client_holds_the_response_before_the_task_ends(server: Server) -> None:
    """The whole response arrives while the task waits on its gate; then the task ends."""
    task_id = new_id()
    response = httpx.get(f"{server.url}/work?id={task_id}", timeout=10)
    assert (response.status_code, response.text) == (200, "hello world")
    assert f"{task_id}:end" not in server.control("events")
    server.control("open", id=task_id)
    assert server.control("wait", id=task_id) == [f"{task_id}:start", f"{task_id}:end"]


def test_keep_alive_serves_the_next_request_while_a_task_runs(server: Server) -> None:
    """Detached, a task does not hold the server's worker: the connection is served again."""
    first, second = new_id(), new_id()
    connection = Connection(server)
    try:
        assert connection.request("GET", f"/work?id={first}") == (200, b"hello world")
        assert connection.request("GET", f"/work?id={second}") == (200, b"hello world")
        assert f"{first}:end" not in server.control("events")
    finally:
        connection.close()
        for task_id in (first, second):
            server.control("open", id=task_id)
    assert server.control("wait", id=first)[-1] == f"{first}:end"


@pytest.mark.parametrize("target", ["flask_app:app"])
def test_flask_failures_are_isolated_and_streamed_bodies_can_add_tasks(target: str) -> None:
    """A failing task is logged with its traceback and the next one runs; a generator the
    server iterates after the view returned can still call add_task()."""
    task_id, streamed = new_id(), new_id()
    with run("waitress", target) as server:
        assert httpx.get(f"{server.url}/fail?id={task_id}", timeout=10).text == "hello world"
        server.control("open", id=f"{task_id}-after")
        assert server.control("wait", id=f"{task_id}-after")[-1] == f"{task_id}-after:end"
        assert httpx.get(f"{server.url}/stream?id={streamed}", timeout=10).text == "hello world"
        server.control("open", id=streamed)
        assert server.control("wait", id=streamed)[-1] == f"{streamed}:end"
        output = server.output()
    assert "Task 'tests.apps.wsgi_control.failing' of GET /fail failed" in output
    assert f"ValueError: boom {task_id}" in output


def test_the_flask_example_runs_with_its_documented_command(tmp_path: Path) -> None:
    """`python -m waitress ... examples.flask_app:app` serves the example as written."""
    log = tmp_path / "log.txt"
    with run(
        "waitress", "examples.flask_app:app", env={"POST_RESPONSE_EXAMPLE_LOG": str(log)}
    ) as server:
        response = httpx.post(f"{server.url}/signup?email=ada@example.com", timeout=10)
        assert response.text == "Welcome! Your email is on its way.\n"
        deadline = time.monotonic() + 10
        while not (log.exists() and log.read_text().endswith("\n")) and time.monotonic() < deadline:
            time.sleep(0.02)
    assert log.read_text() == "welcome email sent to ada@example.com\n"
