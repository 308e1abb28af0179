"""A Starlette app wrapped by PostResponseMiddleware, for tests on real servers.

Run: python -m uvicorn tests.apps.starlette_app:app
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from post_response import PostResponseMiddleware, add_task

from .control import gated, note, with_controls


async def stream(request: Request) -> StreamingResponse:
    """A streamed response: Starlette sends it inside a task group that watches for disconnect."""
    add_task(gated, request.query_params["id"])

    async def chunks() -> AsyncIterator[bytes]:
        for chunk in (b"hello", b" ", b"world"):
            yield chunk

    return StreamingResponse(chunks())


def file(request: Request) -> FileResponse:
    """A file: sent with `http.response.pathsend` where the server offers it (granian)."""
    task_id = request.query_params["id"]
    offered = "http.response.pathsend" in request.scope.get("extensions", {})
    note(f"{task_id}:pathsend offered={offered}")
    add_task(gated, task_id)
    return FileResponse(FILE)


def sync_endpoint(request: Request) -> PlainTextResponse:
    """A sync endpoint: Starlette runs it in a worker thread."""
    add_task(gated, request.query_params["id"])
    return PlainTextResponse("hello world")


FILE = Path(tempfile.gettempdir()) / "post_response-test-file.txt"
FILE.write_text("hello world")

starlette = Starlette(
    routes=[Route("/work", stream), Route("/sync-work", sync_endpoint), Route("/file", file)]
)
starlette.add_middleware(PostResponseMiddleware)
app = with_controls(starlette)
