"""Falcon's ASGI app (`falcon.asgi.App`) on a real uvicorn, wrapped by PostResponseMiddleware:
async responders, blocking code in a thread, and a failing task."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest
from falcon.asgi import App, Request, Response

from post_response import PostResponseMiddleware, RequestFinishedError, add_task

from ..harness import Exchange
from ..servers import Connection, Server, run
from .helpers import Example, assert_ran_after_response, check_example, get, new_id, serve_example


@pytest.fixture(scope="module")
def falcon() -> Iterator[Server]:
    with run("uvicorn-h11", "falcon_cases:app") as server:
        yield server


@pytest.mark.parametrize(
    ("path", "body"),
    [("/async", "hello world"), ("/to-thread", "hello from the worker thread")],
    ids=["async", "to-thread"],
)
def test_the_task_runs_after_the_response(falcon: Server, path: str, body: str) -> None:
    """An async responder's task, or one added in a thread it started with
    `asyncio.to_thread`, runs once the client holds the whole response."""
    task_id = new_id()
    response = get(falcon, f"{path}?id={task_id}")
    assert (response.status_code, response.text) == (200, body)
    assert_ran_after_response(falcon, task_id)


def test_falcon_wrap_sync_to_async_loses_the_request_context(falcon: Server) -> None:
    """Falcon's `wrap_sync_to_async` runs code in an executor without the request's context,
    so `add_task()` there raises OutsideRequestError (the README's limitation, pinned)."""
    response = get(falcon, f"/falcon-executor?id={new_id()}")
    assert response.status_code == 500
    assert "OutsideRequestError" in falcon.output()


def test_a_failing_task_does_not_break_the_next_request(falcon: Server) -> None:
    """A task that raises is logged; the request's next task and the next request on the
    same keep-alive connection are served as usual."""
    failing, task_id = new_id(), new_id()
    connection = Connection(falcon)
    try:
        assert connection.request("GET", f"/fail?id={failing}") == (200, b"hello world")
        falcon.control("open", id=failing)
        falcon.control("open", id=f"{failing}-after")
        falcon.control("wait", id=f"{failing}-after")
        assert f"ValueError: boom {failing}" in falcon.output()
        assert connection.request("GET", f"/async?id={task_id}") == (200, b"hello world")
        assert_ran_after_response(falcon, task_id)
    finally:
        connection.close()
    assert falcon.control("stats")["failed"] == 1


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Example]:
    with serve_example("falcon_app", tmp_path_factory.mktemp("falcon")) as served:
        yield served


def test_the_example_works_as_documented(example: Example) -> None:
    """examples/falcon_app.py: its tasks, one added in a thread, write their lines."""
    responses = check_example(
        example,
        [["welcome email sent to ada@example.com"], ["goodbye email sent to ada@example.com"]],
    )
    assert [r.text for r in responses] == [
        "Welcome, ada@example.com! Your email is on its way.\n",
        "Goodbye, ada@example.com.\n",
    ]


class Scheduling:
    """A responder that hands Falcon's `resp.schedule()` a callback calling `add_task()`."""

    def __init__(self) -> None:
        self.errors: list[BaseException] = []

    async def on_get(self, req: Request, resp: Response) -> None:
        async def callback() -> None:
            try:
                add_task(print)
            except RequestFinishedError as exc:
                self.errors.append(exc)

        resp.schedule(callback)
        resp.text = "hello world"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # Falcon schedules on asyncio
async def test_add_task_in_a_schedule_callback_comes_too_late() -> None:
    """Falcon runs `resp.schedule()` callbacks detached, once the app returned: a request
    with no task of its own has ended by then, and `add_task()` there raises (README)."""
    responder = Scheduling()
    app = App()
    app.add_route("/", responder)
    exchange = Exchange()
    await exchange.run(PostResponseMiddleware(app))
    with anyio.fail_after(5):
        while not responder.errors:
            await anyio.sleep(0)  # the callback runs on a later turn of the loop
    assert exchange.status == 200
    assert "after the tasks of GET / had all run" in str(responder.errors[0])
