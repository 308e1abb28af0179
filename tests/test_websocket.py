"""WebSocket connections: how they end decides whether their tasks run."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from post_response import PostResponseMiddleware, TaskHandle, TaskState, add_task
from post_response._types import Message, Receive, Scope, Send

pytestmark = pytest.mark.anyio

SCOPE: Scope = {
    "type": "websocket",
    "asgi": {"version": "3.0"},
    "scheme": "ws",
    "path": "/ws",
    "raw_path": b"/ws",
    "root_path": "",
    "query_string": b"",
    "headers": [],
    "subprotocols": [],
}


async def test_a_connection_the_client_closed_runs_its_tasks() -> None:
    """Starlette's usual endpoint, a loop on `receive_text()`, raises `WebSocketDisconnect`
    when the client closes: the client went away, the app did not fail, so the tasks run."""
    received: list[str] = []

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        while True:
            text = await websocket.receive_text()
            add_task(received.append, text)
            await websocket.send_text(text)

    incoming: list[Message] = [{"type": "websocket.connect"}]
    incoming += [{"type": "websocket.receive", "text": text} for text in ("a", "b")]
    incoming.append({"type": "websocket.disconnect", "code": 1000})

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        pass

    app = PostResponseMiddleware(Starlette(routes=[WebSocketRoute("/ws", echo)]))
    with pytest.raises(WebSocketDisconnect):
        await app(dict(SCOPE), receive, send)
    await app.join()
    assert received == ["a", "b"]


async def test_a_connection_whose_client_dropped_mid_message_runs_its_tasks() -> None:
    """A server's `send()` raises `OSError` once the client is gone (ASGI 2.4); Starlette
    turns it into `WebSocketDisconnect`: the client went away, so the tasks run."""
    received: list[str] = []

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        text = await websocket.receive_text()
        add_task(received.append, text)
        await websocket.send_text(text)

    incoming: list[Message] = [
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": "a"},
    ]

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        if message["type"] == "websocket.send":
            raise OSError("the client is gone")

    app = PostResponseMiddleware(Starlette(routes=[WebSocketRoute("/ws", echo)]))
    with pytest.raises(WebSocketDisconnect):
        await app(dict(SCOPE), receive, send)
    await app.join()
    assert received == ["a"]


@pytest.mark.parametrize(
    ("policy", "status", "state"),
    [
        ("no_server_error", 503, TaskState.SKIPPED),
        ("no_error", 403, TaskState.SKIPPED),
        ("no_server_error", 403, TaskState.COMPLETED),
        ("always", 503, TaskState.COMPLETED),
    ],
)
async def test_a_denial_response_is_judged_by_its_status(
    policy: str, status: int, state: TaskState
) -> None:
    """A connection refused with an HTTP response (the denial extension) follows the outcome
    policy, as an HTTP response of that status does."""
    handles: list[TaskHandle] = []

    async def deny(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        handles.append(add_task(print, end=""))
        await send({"type": "websocket.http.response.start", "status": status, "headers": []})
        await send({"type": "websocket.http.response.body", "body": b"no"})

    incoming: list[Message] = [{"type": "websocket.connect"}]

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        pass

    app = PostResponseMiddleware(deny, policy=policy)  # type: ignore[arg-type]
    await app(dict(SCOPE), receive, send)
    await app.join()
    assert [handle.state for handle in handles] == [state]
