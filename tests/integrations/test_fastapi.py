"""FastAPI 0.165 on a real uvicorn: endpoints, dependencies of every kind, the exit phase
of yield dependencies, middleware options, and the "Background Tasks" tutorial example."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from post_response import OutsideRequestError, PostResponseMiddleware, add_task

from ..servers import Server, run
from .helpers import (
    Example,
    assert_framework_task_then_ours,
    assert_ran_after_response,
    check_example,
    events_of,
    get,
    new_id,
    serve_example,
)


@pytest.fixture(scope="module")
def fastapi() -> Iterator[Server]:
    """tests/apps/fastapi_cases.py, installed with `add_middleware(..., policy="no_error")`."""
    with run("uvicorn-h11", "fastapi_cases:app", middleware={"policy": "no_error"}) as server:
        yield server


@pytest.mark.parametrize(
    ("path", "body"),
    [("/async", "hello world"), ("/sync", "hello from the worker thread")],
    ids=["async", "sync"],
)
def test_the_task_runs_after_the_response(fastapi: Server, path: str, body: str) -> None:
    """An async or sync endpoint's task runs once the client holds the whole response."""
    task_id = new_id()
    response = get(fastapi, f"{path}?id={task_id}")
    assert (response.status_code, response.json()) == (200, body)
    assert_ran_after_response(fastapi, task_id)


def test_dependencies_add_tasks_and_yield_exit_code_runs_after_the_response(
    fastapi: Server,
) -> None:
    """Sync, async and yield dependencies add tasks; a yield dependency's exit code runs
    after the response is sent but before any task, so the tasks it adds run too, last."""
    rid = new_id()
    response = get(fastapi, f"/dependencies?id={rid}")  # its exit code waits on a gate
    assert (response.status_code, response.json()) == (200, "hello world")
    fastapi.control("until", event=f"{rid}-exit:start")
    assert events_of(fastapi, rid) == [f"{rid}-response:complete", f"{rid}-exit:start"]
    fastapi.control("open", id=f"{rid}-exit")
    fastapi.control("until", event=f"{rid}-sync-yield-exit:ran")
    assert events_of(fastapi, rid) == [
        f"{rid}-response:complete",
        f"{rid}-exit:start",
        f"{rid}-exit:end",
        # the tasks, in the order they were added: the dependencies in the order FastAPI
        # solved them, the endpoint, then the exit code (LIFO: the async one exits first)
        f"{rid}-sync-dependency:ran",
        f"{rid}-async-dependency:ran",
        f"{rid}-sync-yield-enter:ran",
        f"{rid}-async-yield-enter:ran",
        f"{rid}-endpoint:ran",
        f"{rid}-async-yield-exit:ran",
        f"{rid}-sync-yield-exit:ran",
    ]


def test_function_scoped_yield_exit_code_runs_before_the_response(fastapi: Server) -> None:
    """`Depends(..., scope="function")` exits before the response is sent; a task it adds
    still runs, after the response and after the endpoint's task."""
    rid = new_id()
    response = get(fastapi, f"/function-scope?id={rid}")
    assert (response.status_code, response.json()) == (200, "hello world")
    fastapi.control("until", event=f"{rid}-function-exit-task:ran")
    assert events_of(fastapi, rid) == [
        f"{rid}-function-exit:ran",
        f"{rid}-response:complete",
        f"{rid}-endpoint:ran",
        f"{rid}-function-exit-task:ran",
    ]


def test_fastapi_background_tasks_run_first_then_yield_exit_code_then_ours(
    fastapi: Server,
) -> None:
    """On one response, FastAPI's BackgroundTasks run first (inside the response, once its
    body is sent), then the yield dependency's exit code, then our tasks."""
    rid = new_id()
    ours, theirs = f"{rid}-ours", f"{rid}-fastapi"
    response = get(fastapi, f"/background?id={rid}")
    assert (response.status_code, response.json()) == (200, "hello world")
    assert_framework_task_then_ours(fastapi, theirs, ours)
    assert events_of(fastapi, rid) == [
        f"{rid}-response:complete",
        f"{theirs}:start",
        f"{theirs}:end",
        f"{rid}-exit:ran",
        f"{ours}:start",
        f"{ours}:end",
    ]


def test_add_middleware_options_take_effect(fastapi: Server) -> None:
    """`policy="no_error"` given to `add_middleware` skips a 404's task; the task marked
    `always`, added after it, runs (so the skipped one would have run first)."""
    rid = new_id()
    response = get(fastapi, f"/missing?id={rid}")
    assert (response.status_code, response.json()) == (404, {"detail": "no such thing"})
    fastapi.control("until", event=f"{rid}-always:ran")
    assert events_of(fastapi, rid) == [f"{rid}-response:complete", f"{rid}-always:ran"]


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Example]:
    with serve_example("fastapi_app", tmp_path_factory.mktemp("fastapi")) as served:
        yield served


def test_the_tutorial_example_writes_both_lines_in_order(example: Example) -> None:
    """examples/fastapi_app.py: the dependency's task, then the endpoint's, write to the log."""
    [response] = check_example(
        example,
        [["found query: hello", "notification for ada@example.com: some notification"]],
    )
    assert response.json() == {"message": "Notification sent in the background"}


def app_with_a_500_handler(reported: list[str]) -> FastAPI:
    """An endpoint that raises, and an `Exception` handler that adds an `always` task."""
    app = FastAPI()

    @app.exception_handler(Exception)
    async def report(request: Request, exc: Exception) -> JSONResponse:
        add_task(reported.append, str(exc)).set(always=True)
        return JSONResponse({"error": "sorry"}, status_code=500)

    @app.get("/")
    async def endpoint() -> None:
        raise ValueError("boom")

    return app


def test_a_500_handler_under_add_middleware_is_told_to_wrap_the_app() -> None:
    """Starlette runs `Exception` handlers in ServerErrorMiddleware, outside what
    `add_middleware` adds: `add_task()` there raises, and the message says to wrap the app."""
    app = app_with_a_500_handler([])
    app.add_middleware(PostResponseMiddleware, detach=False)
    with pytest.raises(OutsideRequestError, match=r"ServerErrorMiddleware.*`app = Post"):
        TestClient(app).get("/")


def test_a_500_handler_adds_tasks_when_the_app_is_wrapped() -> None:
    """Wrapped, the app's `Exception` handler adds tasks like any endpoint."""
    reported: list[str] = []
    app = PostResponseMiddleware(app_with_a_500_handler(reported), detach=False)
    response = TestClient(app, raise_server_exceptions=False).get("/")
    assert (response.status_code, response.json()) == (500, {"error": "sorry"})
    assert reported == ["boom"]
