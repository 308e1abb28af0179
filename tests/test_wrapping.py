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


async def test_lifespan_passes_through_unchanged() -> None:
    """Lifespan messages reach the app and the server exactly as sent."""
    to_app: list[Message] = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    seen: list[Message] = []
    sent: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "lifespan"
        while True:
            message = await receive()
            seen.append(message)
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return

    async def receive() -> Message:
        return to_app.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    await PostResponseMiddleware(app)(scope, receive, send)
    assert seen == [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]


async def test_an_app_without_lifespan_support_still_works() -> None:
    """An app that rejects lifespan raises as it would unwrapped, so the server carries on."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise ValueError(f"unsupported scope {scope['type']}")
        add_task(ran.append, "task")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    ran: list[str] = []
    wrapped = PostResponseMiddleware(app)

    async def nothing() -> Message:
        raise AssertionError

    async def discard(message: Message) -> None:
        raise AssertionError

    with pytest.raises(ValueError, match="unsupported scope lifespan"):
        await wrapped({"type": "lifespan", "asgi": {"version": "3.0"}}, nothing, discard)
    await Exchange().run(wrapped)
    assert ran == ["task"]


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
        await PostResponseMiddleware(app)(scope, receive, send)
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
