"""Starlette on a real uvicorn: sync and async endpoints, BaseHTTPMiddleware on either side
of PostResponseMiddleware, and Starlette's own BackgroundTasks next to `add_task`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from post_response import PostResponseMiddleware, add_task
from post_response._types import ASGIApp

from ..harness import Exchange
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


def raising_app(log: list[str]) -> Starlette:
    """A Starlette app whose endpoint adds an `always` task, then raises."""

    async def task() -> None:
        log.append("task")

    async def endpoint(request: Request) -> None:
        add_task(task).set(always=True)
        raise ValueError("boom")

    return Starlette(routes=[Route("/", endpoint)])


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("install", "expected"),
    [
        ("add_middleware", ["task", "send http.response.start", "send http.response.body"]),
        ("wrap", ["send http.response.start", "send http.response.body", "task"]),
    ],
)
async def test_tasks_of_an_endpoint_that_raised_and_starlettes_500(
    install: str, expected: list[str]
) -> None:
    """Starlette's ServerErrorMiddleware sits outside `add_middleware`'s: an `always` task
    of a raising endpoint runs before its 500 is sent; wrapping the app, after (as the
    README says)."""
    log: list[str] = []
    starlette = raising_app(log)
    app: ASGIApp = starlette
    if install == "add_middleware":
        starlette.add_middleware(PostResponseMiddleware, detach=False)
    else:
        app = PostResponseMiddleware(starlette, detach=False)
    with pytest.raises(ValueError, match="boom"):
        await Exchange(log).run(app)  # detach=False: the tasks have run when it returns
    assert log == expected
