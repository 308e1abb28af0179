"""A raw ASGI app wrapped by PostResponseMiddleware, for tests on real servers.

Run: python -m uvicorn tests.apps.raw_app:app
"""

from __future__ import annotations

import contextvars

import anyio

from post_response import PostResponseMiddleware, add_task
from post_response._types import Message, Receive, Scope, Send

from .control import (
    gated,
    gated_failure,
    options,
    query,
    record,
    sleeper,
    sync_failure,
    with_controls,
)

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")

START: Message = {"type": "http.response.start", "status": 200, "headers": []}
SHAPES: dict[str, list[Message]] = {
    "content-length": [
        {**START, "headers": [(b"content-length", b"11")]},
        {"type": "http.response.body", "body": b"hello world"},
    ],
    "chunked": [
        START,
        {"type": "http.response.body", "body": b"hello", "more_body": True},
        {"type": "http.response.body", "body": b" ", "more_body": True},
        {"type": "http.response.body", "body": b"world", "more_body": True},
        {"type": "http.response.body", "body": b"", "more_body": False},
    ],
    "bare": [{**START, "headers": [(b"content-length", b"0")]}, {"type": "http.response.body"}],
    "head": [
        {**START, "headers": [(b"content-length", b"11")]},
        {"type": "http.response.body", "body": b""},
    ],
    "204": [{**START, "status": 204}, {"type": "http.response.body"}],
}


async def read_context(argument: str) -> None:
    """Record what this task sees: the request's context variable and its own argument."""
    for _ in range(3):
        await anyio.sleep(0)  # let the tasks of other requests interleave
    await record({"context": REQUEST_ID.get("missing"), "argument": argument})


async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    params = query(scope)
    path = scope["path"]
    if path == "/work":
        add_task(gated, params["id"])
    elif path == "/fail":
        add_task(sync_failure if "sync" in params else gated_failure, params["id"])
        add_task(gated, params["id"] + "-after")
    elif path == "/sleep":
        add_task(sleeper, params["id"], float(params["seconds"]))
    elif path == "/context":
        REQUEST_ID.set(params["rid"])
        add_task(read_context, params["rid"])
        REQUEST_ID.set("changed after add_task")
    shape = params.get("shape", "content-length")
    if scope["method"] == "HEAD":
        shape = "head"
    for message in SHAPES[shape]:
        await send(message)


middleware = PostResponseMiddleware(endpoint, **options())
app = with_controls(middleware, middleware)
