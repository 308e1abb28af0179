"""Quart on real servers (uvicorn, and hypercorn, Quart's own): async views, and sync views
that Quart runs in worker threads."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..servers import Server, run
from .helpers import Example, assert_ran_after_response, check_example, get, new_id, serve_example


@pytest.fixture(scope="module", params=["uvicorn-h11", "hypercorn-asyncio"])
def quart(request: pytest.FixtureRequest) -> Iterator[Server]:
    with run(request.param, "quart_cases:app") as server:
        yield server


@pytest.mark.parametrize(
    ("path", "body"),
    [("/async", "hello world"), ("/sync", "hello from the worker thread")],
    ids=["async", "sync"],
)
def test_the_task_runs_after_the_response(quart: Server, path: str, body: str) -> None:
    """An async view's task, or a sync view's (added in a worker thread), runs once the
    client holds the whole response."""
    task_id = new_id()
    response = get(quart, f"{path}?id={task_id}")
    assert (response.status_code, response.text) == (200, body)
    assert_ran_after_response(quart, task_id)


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Example]:
    with serve_example("quart_app", tmp_path_factory.mktemp("quart")) as served:
        yield served


def test_the_example_works_as_documented(example: Example) -> None:
    """examples/quart_app.py: its async and sync views' tasks write their lines."""
    responses = check_example(
        example,
        [["welcome email sent to ada@example.com"], ["goodbye email sent to ada@example.com"]],
    )
    assert [r.text for r in responses] == [
        "Welcome, ada@example.com! Your email is on its way.\n",
        "Goodbye, ada@example.com.\n",
    ]
