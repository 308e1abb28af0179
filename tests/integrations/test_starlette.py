"""Starlette on a real uvicorn: sync and async endpoints, BaseHTTPMiddleware on either side
of PostResponseMiddleware, and Starlette's own BackgroundTasks next to `add_task`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..servers import Server, run
from .helpers import (
    Example,
    assert_framework_task_then_ours,
    assert_ran_after_response,
    check_example,
    get,
    new_id,
    serve_example,
)

# The apps of tests/apps/starlette_cases.py, by where their BaseHTTPMiddleware sits
# relative to ours; it sets the `x-middleware` header to that name.
WHERE = {"app": None, "inside": "inside", "outside": "outside"}


@pytest.fixture(scope="module", params=list(WHERE))
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def starlette(variant: str) -> Iterator[Server]:
    with run("uvicorn-h11", f"starlette_cases:{variant}") as server:
        yield server


@pytest.mark.parametrize(
    ("path", "body"),
    [("/async", "hello world"), ("/sync", "hello from the worker thread")],
    ids=["async", "sync"],
)
def test_the_task_runs_after_the_response(
    starlette: Server, variant: str, path: str, body: str
) -> None:
    """An async or sync endpoint's task runs once the client holds the whole response."""
    task_id = new_id()
    response = get(starlette, f"{path}?id={task_id}")
    assert (response.status_code, response.text) == (200, body)
    assert response.headers.get("x-middleware") == WHERE[variant]
    assert_ran_after_response(starlette, task_id)


def test_starlette_background_tasks_run_first_then_ours(starlette: Server) -> None:
    """With both on one response, Starlette's background task runs first (inside the
    response, once its body is sent) and ours after it (once the app has returned)."""
    task_id = new_id()
    ours, theirs = f"{task_id}-ours", f"{task_id}-starlette"
    response = get(starlette, f"/background?id={task_id}")
    assert (response.status_code, response.text) == (200, "hello world")
    assert_framework_task_then_ours(starlette, theirs, ours)


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Example]:
    with serve_example("starlette_app", tmp_path_factory.mktemp("starlette")) as served:
        yield served


def test_the_example_works_as_documented(example: Example) -> None:
    """examples/starlette_app.py: its async and sync endpoints' tasks write their lines."""
    responses = check_example(
        example,
        [["welcome email sent to ada@example.com"], ["goodbye email sent to ada@example.com"]],
    )
    assert [r.text for r in responses] == [
        "Welcome, ada@example.com! Your email is on its way.\n",
        "Goodbye, ada@example.com.\n",
    ]
