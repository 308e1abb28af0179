"""A Starlette app wrapped by PostResponseMiddleware, for tests on real servers.

Run: python -m uvicorn tests.apps.starlette_app:app
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from post_response import PostResponseMiddleware, add_task

from .control import gated, with_controls


async def stream(request: Request) -> StreamingResponse:
    """A streamed response: Starlette sends it inside a task group that watches for disconnect."""
    add_task(gated, request.query_params["id"])

    async def chunks() -> AsyncIterator[bytes]:
        for chunk in (b"hello", b" ", b"world"):
            yield chunk

    return StreamingResponse(chunks())


def sync_endpoint(request: Request) -> PlainTextResponse:
    """A sync endpoint: Starlette runs it in a worker thread."""
    add_task(gated, request.query_params["id"])
    return PlainTextResponse("hello world")


starlette = Starlette(routes=[Route("/work", stream), Route("/sync-work", sync_endpoint)])
starlette.add_middleware(PostResponseMiddleware)
app = with_controls(starlette)
