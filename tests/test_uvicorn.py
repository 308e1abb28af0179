"""On a real uvicorn on 127.0.0.1: the client holds the response before its tasks run.

Each gated task waits for the test to open its gate. The test opens it only after the
client has read the whole response, so if the response waited for the task (or the task
ran inside `send()`), the request would hang and the test would fail.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import anyio
import httpx
import pytest

from .servers import Server, uvicorn


def new_id() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def raw() -> Iterator[Server]:
    with uvicorn("raw_app:app") as server:
        yield server


def assert_ran_after_response(server: Server, task_id: str) -> None:
    """Open the task's gate and check that it then ran to its end, not cancelled."""
    assert f"{task_id}:end" not in server.control("events")  # its gate is still closed
    server.control("open", id=task_id)
    assert server.control("wait", id=task_id) == [f"{task_id}:start", f"{task_id}:end"]


@pytest.mark.parametrize(
    ("method", "shape", "body"),
    [
        ("GET", "content-length", b"hello world"),
        ("GET", "chunked", b"hello world"),
        ("GET", "bare", b""),
        ("GET", "204", b""),
        ("HEAD", "content-length", b""),
    ],
)
def test_the_client_holds_the_response_before_the_task_ends(
    raw: Server, method: str, shape: str, body: bytes
) -> None:
    """Content-Length, chunked, bare, 204 and HEAD responses arrive whole while the task waits."""
    task_id = new_id()
    response = httpx.request(method, f"{raw.url}/work?id={task_id}&shape={shape}", timeout=10)
    assert response.status_code == (204 if shape == "204" else 200)
    assert response.content == body
    if shape == "chunked":
        assert response.headers["transfer-encoding"] == "chunked"
    assert_ran_after_response(raw, task_id)


@pytest.mark.anyio
async def test_500_concurrent_requests_each_task_sees_its_own_request(raw: Server) -> None:
    """Every task reads its own request's context variable and arguments; none twice, none lost."""
    before = len(raw.control("records", at_least="0"))
    limits = httpx.Limits(max_connections=500)
    async with httpx.AsyncClient(base_url=raw.url, limits=limits, timeout=60) as client:

        async def request(rid: str) -> None:
            response = await client.get("/context", params={"rid": rid})
            assert response.status_code == 200

        ids = [f"{new_id()}-{n}" for n in range(500)]
        async with anyio.create_task_group() as group:
            for rid in ids:
                group.start_soon(request, rid)
    records = raw.control("records", at_least=str(before + 500))[before:]
    assert sorted(r["argument"] for r in records) == sorted(ids)
    assert all(r["context"] == r["argument"] for r in records)


@pytest.fixture(scope="module", params=["starlette_app:app", "django_app:app", "quart_app:app"])
def framework(request: pytest.FixtureRequest) -> Iterator[Server]:
    with uvicorn(request.param) as server:
        yield server


@pytest.mark.parametrize("path", ["/work", "/sync-work"])
def test_frameworks_that_cancel_work_on_disconnect_do_not_cancel_tasks(
    framework: Server, path: str
) -> None:
    """Starlette (streaming), Django and Quart cancel work inside send(); tasks run after it."""
    task_id = new_id()
    response = httpx.get(f"{framework.url}{path}?id={task_id}", timeout=10)
    assert (response.status_code, response.text) == (200, "hello world")
    assert_ran_after_response(framework, task_id)
