"""Litestar on a real uvicorn, the app wrapped by PostResponseMiddleware: async handlers,
sync handlers in a thread or on the loop, and a failing task."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from ..servers import STOP_LIMIT, Connection, Server, exit_code_after, run
from .helpers import (
    Example,
    assert_framework_task_then_ours,
    assert_ran_after_response,
    check_example,
    get,
    new_id,
    serve_example,
)


@pytest.fixture(scope="module")
def litestar() -> Iterator[Server]:
    with run("uvicorn-h11", "litestar_cases:app") as server:
        yield server


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/async", "hello world"),
        ("/sync", "hello from the worker thread"),
        ("/sync-on-loop", "hello from the event loop thread"),
    ],
    ids=["async", "sync", "sync-on-loop"],
)
def test_the_task_runs_after_the_response(litestar: Server, path: str, body: str) -> None:
    """An async handler's task, or a sync handler's (`sync_to_thread` True or False), runs
    once the client holds the whole response."""
    task_id = new_id()
    response = get(litestar, f"{path}?id={task_id}")
    assert (response.status_code, response.text) == (200, body)
    assert_ran_after_response(litestar, task_id)


def test_litestar_background_task_runs_first_then_ours(litestar: Server) -> None:
    """With both on one response, Litestar's background task runs first (inside the
    response, once its body is sent) and ours after it (once the app has returned)."""
    task_id = new_id()
    response = get(litestar, f"/background?id={task_id}")
    assert (response.status_code, response.text) == (200, "hello world")
    assert_framework_task_then_ours(litestar, f"{task_id}-litestar", f"{task_id}-ours")


def test_a_failing_task_does_not_break_the_next_request(litestar: Server) -> None:
    """A task that raises is logged; the request's next task and the next request on the
    same keep-alive connection are served as usual."""
    failing, task_id = new_id(), new_id()
    connection = Connection(litestar)
    try:
        assert connection.request("GET", f"/fail?id={failing}") == (200, b"hello world")
        litestar.control("open", id=failing)
        litestar.control("open", id=f"{failing}-after")
        litestar.control("wait", id=f"{failing}-after")
        assert f"ValueError: boom {failing}" in litestar.output()
        assert connection.request("GET", f"/async?id={task_id}") == (200, b"hello world")
        assert_ran_after_response(litestar, task_id)
    finally:
        connection.close()
    assert litestar.control("stats")["failed"] == 1


@pytest.mark.parametrize(
    ("target", "last_event"),
    [("app", "end"), ("route_level", "end")],
    ids=["wrapped", "route-level"],
)
def test_tasks_are_drained_at_shutdown_with_or_without_lifespan(
    target: str, last_event: str
) -> None:
    """Wrapping the Litestar app, the middleware sees the lifespan: at SIGINT, uvicorn's
    shutdown waits for a running task. Listed in `Litestar(middleware=[...])`, it never
    sees the lifespan; the task still finishes, as the event loop closes."""
    with run("uvicorn-h11", f"litestar_cases:{target}") as server:
        task_id = new_id()
        assert get(server, f"/sleep?id={task_id}&seconds=3").status_code == 200
        server.control("until", event=f"{task_id}:start")
        assert exit_code_after(server, signal.SIGINT, limit=STOP_LIMIT) == 0
        output = server.output()
    shutting_down = output.index("Shutting down")
    assert output.index(f"event: {task_id}:{last_event}") > shutting_down


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Example]:
    with serve_example("litestar_app", tmp_path_factory.mktemp("litestar")) as served:
        yield served


def test_the_example_works_as_documented(example: Example) -> None:
    """examples/litestar_app.py: its async and sync handlers' tasks write their lines."""
    responses = check_example(
        example,
        [["welcome email sent to ada@example.com"], ["goodbye email sent to ada@example.com"]],
    )
    assert [(r.status_code, r.text) for r in responses] == [
        (201, "Welcome, ada@example.com! Your email is on its way.\n"),
        (201, "Goodbye, ada@example.com.\n"),
    ]
