"""FastAPI scenarios for tests on real servers: endpoints, dependencies, yield dependencies.

Run: python -m uvicorn tests.apps.fastapi_cases:app

A recorder inside PostResponseMiddleware notes `<id>-response:complete` once the last
body message of a request with `?id=<id>` has gone to the server, so a test can place
dependency code relative to the response. Tasks that only need to say that they ran
(`step`) note `<name>:ran`; `gated` tasks wait for the test (see control.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Annotated

from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException

from post_response import PostResponseMiddleware, add_task
from post_response._types import ASGIApp, Message, Receive, Scope, Send

from .control import gated, note, options, query, with_controls
from .threads import running_in


async def step(name: str) -> None:
    note(f"{name}:ran")


class ResponseRecorder:
    """Notes when the last body message of a request has been handed to the server."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task_id = query(scope).get("id") if scope["type"] == "http" else None

        async def recording_send(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                note(f"{task_id}-response:complete")

        await self.app(scope, receive, recording_send if task_id else send)


def sync_dependency(id: str) -> str:
    """FastAPI runs a sync dependency in a worker thread."""
    add_task(step, f"{id}-sync-dependency")
    return id


async def async_dependency(id: str) -> str:
    add_task(step, f"{id}-async-dependency")
    return id


def sync_yield_dependency(id: str) -> Iterator[str]:
    """Entered and exited in worker threads."""
    add_task(step, f"{id}-sync-yield-enter")
    yield id
    add_task(step, f"{id}-sync-yield-exit")


async def async_yield_dependency(id: str) -> AsyncIterator[str]:
    """Its exit phase waits on the gate `<id>-exit`, then adds a task."""
    add_task(step, f"{id}-async-yield-enter")
    yield id
    await gated(f"{id}-exit")
    add_task(step, f"{id}-async-yield-exit")


async def function_scoped_dependency(id: str) -> AsyncIterator[str]:
    yield id
    note(f"{id}-function-exit:ran")
    add_task(step, f"{id}-function-exit-task")


async def noting_yield_dependency(id: str) -> AsyncIterator[str]:
    yield id
    note(f"{id}-exit:ran")


fastapi = FastAPI()


@fastapi.get("/async")
async def async_endpoint(id: str) -> str:
    add_task(gated, id)
    return "hello world"


@fastapi.get("/sync")
def sync_endpoint(id: str) -> str:
    """FastAPI runs a sync endpoint in a worker thread."""
    add_task(gated, id)
    return f"hello from the {running_in()}"


@fastapi.get("/dependencies")
async def with_dependencies(
    id: str,
    _sync: Annotated[str, Depends(sync_dependency)],
    _async: Annotated[str, Depends(async_dependency)],
    _sync_yield: Annotated[str, Depends(sync_yield_dependency)],
    _async_yield: Annotated[str, Depends(async_yield_dependency)],
) -> str:
    add_task(step, f"{id}-endpoint")
    return "hello world"


@fastapi.get("/function-scope")
async def with_function_scope(
    id: str, _dependency: Annotated[str, Depends(function_scoped_dependency, scope="function")]
) -> str:
    add_task(step, f"{id}-endpoint")
    return "hello world"


@fastapi.get("/background")
async def with_background_tasks(
    id: str,
    background: BackgroundTasks,
    _dependency: Annotated[str, Depends(noting_yield_dependency)],
) -> str:
    """FastAPI's own BackgroundTasks and ours on one response, with a yield dependency."""
    background.add_task(gated, f"{id}-fastapi")
    add_task(gated, f"{id}-ours")
    return "hello world"


@fastapi.get("/missing")
async def missing(id: str) -> str:
    """A 404 with two tasks: one plain, one marked to run whatever the outcome."""
    add_task(step, f"{id}-plain")
    add_task(step, f"{id}-always").set(always=True)
    raise HTTPException(status_code=404, detail="no such thing")


fastapi.add_middleware(ResponseRecorder)
fastapi.add_middleware(PostResponseMiddleware, **options())  # added last: outermost
app = with_controls(fastapi)
