"""The lifespan path: an app whose lifespan fails, and the server that carries on without it."""

from __future__ import annotations

import anyio
import pytest

from post_response import PostResponseMiddleware, TaskHandle, TaskState, add_task
from post_response._types import Message, Receive, Scope, Send

from .harness import Exchange

pytestmark = pytest.mark.anyio


class StartupError(Exception):
    """What an app's startup raises (its database is down, say)."""


def failing_at_startup(handles: list[TaskHandle]) -> object:
    """An app whose lifespan startup raises; its requests add one task and answer 200."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await receive()
            raise StartupError
        handles.append(add_task(lambda: None))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


async def start_lifespan(app: PostResponseMiddleware) -> None:
    """Send `lifespan.startup` to `app`, as a server does, and run its lifespan call."""
    startup: list[Message] = [{"type": "lifespan.startup"}]

    async def receive() -> Message:
        if startup:
            return startup.pop()
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async def send(message: Message) -> None:
        pass

    await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)


async def test_an_exception_of_the_apps_lifespan_passes_through_unchanged() -> None:
    """The server sees the app's own exception, not one wrapped in an exception group."""
    app = PostResponseMiddleware(failing_at_startup([]))  # type: ignore[arg-type]
    with pytest.raises(StartupError):
        await start_lifespan(app)


async def test_tasks_run_when_the_server_serves_on_after_a_failed_lifespan() -> None:
    """uvicorn (`lifespan="auto"`) and hypercorn log a lifespan that raised and serve on:
    the requests' tasks still run, rather than being abandoned as after a shutdown."""
    handles: list[TaskHandle] = []
    app = PostResponseMiddleware(failing_at_startup(handles))  # type: ignore[arg-type]
    with pytest.raises(Exception):  # noqa: B017, PT011  (the test above says which)
        await start_lifespan(app)
    with anyio.fail_after(5):
        await Exchange().run(app)
    assert [handle.state for handle in handles] == [TaskState.COMPLETED]
