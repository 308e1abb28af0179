"""The raw ASGI example on a real uvicorn, end to end."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .helpers import Example, check_example, serve_example


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Example]:
    with serve_example("raw_asgi_app", tmp_path_factory.mktemp("raw")) as served:
        yield served


def test_the_example_works_as_documented(example: Example) -> None:
    """examples/raw_asgi_app.py: the signup answers, then its task writes its line."""
    [response] = check_example(example, [["welcome email sent to ada@example.com"]])
    assert response.text == "Welcome, ada@example.com! Your email is on its way.\n"
    assert response.headers["content-type"] == "text/plain"


def test_the_middleware_answers_lifespan_for_the_bare_app(example: Example) -> None:
    """The bare app ignores lifespan; the middleware speaks it, so uvicorn runs a lifespan
    (and the middleware can drain tasks at shutdown) instead of finding it unsupported."""
    output = example.server.output()
    assert "Application startup complete." in output
    assert "unsupported" not in output
