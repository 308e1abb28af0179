"""Every async test runs on asyncio and on trio."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio  # noqa: F401  (fail loudly when trio is missing: half the suite would not run)

from post_response._task import lost

from . import harness

# The README's migration examples and its pytest-django project are suites of their own,
# with the plugin in their conftest.py; tests/test_migrating.py and
# tests/integrations/test_django.py run them in processes of their own.
collect_ignore = ["doc_examples/migrating", "doc_examples/pytest_django"]


@pytest.fixture(autouse=True)
def _forget_lost_tasks() -> None:
    """`wait_for_tasks()` reports the tasks lost since its last call: not other tests' ones
    (the pytest plugin does the same for its users)."""
    lost.clear()


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=[True, False], ids=["detached", "inline"])
def detach(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Run a test with tasks handed to the owner (the default) and run inside the request.

    Apps built with `harness.wrap()` follow it; `usefixtures("detach")` applies it to a module.
    """
    harness.DETACH = bool(request.param)
    yield harness.DETACH
    harness.DETACH = True
