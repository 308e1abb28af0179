"""Every async test runs on asyncio and on trio."""

from __future__ import annotations

import pytest
import trio  # noqa: F401  (fail loudly when trio is missing: half the suite would not run)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)
