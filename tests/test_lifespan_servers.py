"""Real servers that serve on after the app's lifespan failed: its requests' tasks still run."""

from __future__ import annotations

import httpx
import pytest

from .servers import run


@pytest.mark.parametrize("server_name", ["uvicorn-h11", "hypercorn-asyncio", "hypercorn-trio"])
def test_tasks_run_on_a_server_that_serves_on_after_a_failed_lifespan(server_name: str) -> None:
    """The server logs the lifespan's error and serves: each request's task runs to its end."""
    with run(server_name, "failing_lifespan:app") as server:
        response = httpx.get(f"{server.url}/work?id=t1", timeout=10)
        assert response.status_code == 200
        server.control("open", id="t1")
        assert server.control("wait", id="t1") == ["t1:start", "t1:end"]
        assert "lifespan" in server.output().lower()  # the server saw it fail
