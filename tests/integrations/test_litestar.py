"""Litestar on a real uvicorn, the app wrapped by PostResponseMiddleware: async handlers,
sync handlers in a thread or on the loop, and a failing task."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..servers import Connection, Server, run
from .helpers import Example, assert_ran_after_response, check_example, get, new_id, serve_example


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
