"""Wrapping twice, lifespan pass-through and WebSocket connections."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from post_response import PostResponseMiddleware, TaskState, add_task
from post_response._types import Message, Receive, Scope, Send

from .harness import Exchange

pytestmark = pytest.mark.anyio


async def test_wrapping_twice_runs_each_task_once() -> None:
    """Nested middlewares (say, one per sub-app) share one task list: each task runs once."""
    runs: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        add_task(runs.append, "task")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    await Exchange().run(PostResponseMiddleware(PostResponseMiddleware(app)))
    assert runs == ["task"]


async def test_a_request_made_by_a_task_gets_its_own_tasks() -> None:
    """A task calling the wrapped app in-process starts a new request, whose tasks also run."""
    runs: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/outer":
            add_task(Exchange().run, wrapped, path="/inner")
        add_task(runs.append, scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    wrapped = PostResponseMiddleware(app)
    await Exchange().run(wrapped, path="/outer")
    # The outer request's first task is the inner request, which drains its own task.
    assert runs == ["/inner", "/outer"]


async def run_lifespan(app: Any) -> list[Message]:
    """Drive a lifespan startup and shutdown through `app`; return what it sent."""
    to_app: list[Message] = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return to_app.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    return sent


async def test_lifespan_passes_through_unchanged(detach: bool) -> None:
    """Lifespan messages reach the app and the server exactly as sent."""
    seen: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "lifespan"
        while True:
            message = await receive()
            seen.append(message)
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return

    sent = await run_lifespan(PostResponseMiddleware(app, detach=detach))
    assert seen == [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]


async def rejects_lifespan(scope: Scope, receive: Receive, send: Send) -> None:
    """Like Django's ASGIHandler: an app that raises on any scope but HTTP."""
    if scope["type"] != "http":
        raise ValueError(f"unsupported scope {scope['type']}")
    add_task(print, end="")
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def test_the_middleware_answers_lifespan_for_an_app_without_it() -> None:
    """Detached, it speaks lifespan itself (to drain at shutdown); requests work as before."""
    wrapped = PostResponseMiddleware(rejects_lifespan)
    sent = await run_lifespan(wrapped)
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]
    exchange = Exchange()
    await exchange.run(wrapped)
    assert exchange.status == 200


async def test_inline_an_app_without_lifespan_fails_lifespan_as_unwrapped() -> None:
    """With `detach=False` the middleware leaves lifespan alone: the app's error passes through."""
    with pytest.raises(ValueError, match="unsupported scope lifespan"):
        await run_lifespan(PostResponseMiddleware(rejects_lifespan, detach=False))


class TestWebSocket:
    async def run(self, app: Any, *, client_messages: int = 1) -> list[str]:
        """Drive a WebSocket connection; return the log of sends and task runs."""
        log: list[str] = []
        incoming: list[Message] = [{"type": "websocket.connect"}]
        incoming += [{"type": "websocket.receive", "text": "hi"}] * client_messages
        incoming.append({"type": "websocket.disconnect", "code": 1000})

        async def receive() -> Message:
            return incoming.pop(0)

        async def send(message: Message) -> None:
            log.append(message["type"])

        scope = {"type": "websocket", "path": "/ws", "asgi": {"version": "3.0"}, "headers": []}
        middleware = PostResponseMiddleware(app)
        try:
            await middleware(scope, receive, send)
        finally:
            await middleware.join()
        return log

    async def test_tasks_run_after_the_app_returns(self) -> None:
        """Tasks added during the connection run once the connection's app call returns."""
        log: list[str] = []

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await receive()
            await send({"type": "websocket.accept"})
            while (await receive())["type"] == "websocket.receive":
                add_task(log.append, "task")
                await send({"type": "websocket.send", "text": "ok"})
                await anyio.sleep(0)
                log.append("send")
            log.append("app returns")

        await self.run(app, client_messages=2)
        assert log == ["send", "send", "app returns", "task", "task"]

    async def test_a_connection_whose_app_raised_skips_its_tasks(self) -> None:
        """An app that crashed skips its normal tasks and runs its `always` ones."""
        handles = []

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            handles.append(add_task(print, end=""))
            handles.append(add_task(print, end="").set(always=True))
            raise RuntimeError("crashed")

        with pytest.raises(RuntimeError, match="crashed"):
            await self.run(app)
        assert [h.state for h in handles] == [TaskState.SKIPPED, TaskState.COMPLETED]
