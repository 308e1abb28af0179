"""FastAPI's own tests of its Background Tasks tutorial, unchanged but for the import: they
assert on the tasks' effect right after the request, with each client form."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.doc_examples.migrating.tutorial import LOG, app

client = TestClient(app)  # as upstream: module level, never entered with `with`


def read_log() -> str:
    return Path(LOG).read_text()


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def empty_log() -> None:
    if os.path.exists(LOG):
        os.remove(LOG)


def test_module_level_client() -> None:
    response = client.post("/send-notification/foo@example.com?q=some-query")
    assert response.status_code == 200, response.text
    assert response.json() == {"message": "Message sent"}
    assert "found query: some-query\nmessage to foo@example.com" in read_log()


def test_client_in_a_with_block() -> None:
    with TestClient(app) as client:  # runs the lifespan: the loop stays up
        response = client.post("/send-notification/foo@example.com?q=some-query")
        assert response.status_code == 200, response.text
        assert "found query: some-query\nmessage to foo@example.com" in read_log()


@pytest.mark.anyio
async def test_async_client() -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/send-notification/foo@example.com?q=some-query")
    assert response.status_code == 200, response.text
    assert "found query: some-query\nmessage to foo@example.com" in read_log()
