"""A pytest plugin: in every test, a request's tasks have run when the test client returns.

Put one line in `conftest.py`::

    pytest_plugins = ["post_response.pytest_plugin"]

Then a test that asserts on a task's effect right after `client.post(...)` passes as it did
with Starlette's `BackgroundTasks`, whichever client it uses (Starlette's `TestClient`
with or without `with`, httpx's `ASGITransport`, Django's test client, a WSGI client).
The tasks still run after the response, detached, with the outcome policy, errors and
logs of production: see `post_response.testing.requests_wait_for_tasks()`. A test marked
`@pytest.mark.post_response_detached` is left as in production, where nothing waits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from ._task import lost
from .testing import requests_wait_for_tasks

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["post_response_requests_wait_for_tasks"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "post_response_detached: requests do not wait for their post_response tasks",
    )


@pytest.fixture(autouse=True)
def post_response_requests_wait_for_tasks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each request returns from the app once its tasks have ended (see the module)."""
    lost.clear()  # wait_for_tasks() reports what this test lost, not what earlier ones did
    if request.node.get_closest_marker("post_response_detached") is not None:
        yield
        return
    with requests_wait_for_tasks():
        yield
