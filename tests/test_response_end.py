"""Which message ends a response: tasks start only after it, and only it counts as complete."""

from __future__ import annotations

from typing import Any

import pytest

from post_response import add_task
from post_response._types import Message, Receive, Scope, Send

from .harness import Exchange, wrap

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("detach")]

START = {"type": "http.response.start", "status": 200, "headers": []}
FINAL_BODY = {"type": "http.response.body", "body": b"", "more_body": False}

# name -> (scope items, the messages of a complete response: the last one ends it)
SHAPES: dict[str, tuple[dict[str, Any], list[Message]]] = {
    "content-length": (
        {},
        [
            {**START, "headers": [(b"content-length", b"5")]},
            {"type": "http.response.body", "body": b"hello"},
        ],
    ),
    "chunked": (
        {},
        [
            START,
            {"type": "http.response.body", "body": b"a", "more_body": True},
            {"type": "http.response.body", "body": b"b", "more_body": True},
            {"type": "http.response.body", "body": b"c", "more_body": True},
            FINAL_BODY,
        ],
    ),
    "bare body": ({}, [START, {"type": "http.response.body"}]),
    "204": ({}, [{**START, "status": 204}, FINAL_BODY]),
    "HEAD": (
        {"method": "HEAD"},
        [{**START, "headers": [(b"content-length", b"5")]}, FINAL_BODY],
    ),
    "pathsend": (
        {"extensions": {"http.response.pathsend": {}}},
        [START, {"type": "http.response.pathsend", "path": "/etc/hostname"}],
    ),
    "zerocopysend": (
        {"extensions": {"http.response.zerocopysend": {}}},
        [
            START,
            {"type": "http.response.zerocopysend", "file": 3, "more_body": True},
            {"type": "http.response.zerocopysend", "file": 3, "more_body": False},
        ],
    ),
    "trailers": (
        {"extensions": {"http.response.trailers": {}}},
        [
            {**START, "trailers": True},
            {"type": "http.response.body", "body": b"x", "more_body": True},
            {"type": "http.response.body", "body": b"y"},
            {"type": "http.response.trailers", "headers": [], "more_trailers": True},
            {"type": "http.response.trailers", "headers": [(b"x-sum", b"1")]},
        ],
    ),
    "early hints, debug and push": (
        {"extensions": {"http.response.early_hint": {}, "http.response.push": {}}},
        [
            {"type": "http.response.early_hint", "links": [b"</s.css>; rel=preload"]},
            {"type": "http.response.debug", "info": {}},
            START,
            {"type": "http.response.body", "body": b"a", "more_body": True},
            {"type": "http.response.push", "path": "/s.css", "headers": []},
            FINAL_BODY,
        ],
    ),
}


class Boom(Exception):
    pass


def app_sending(log: list[str], messages: list[Message], *, then_raise: bool = False) -> Any:
    async def record(name: str) -> None:
        log.append(f"task {name}")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        add_task(record, "a")
        add_task(record, "b")
        for message in messages:
            await send(message)
        log.append("app returns")
        if then_raise:
            raise Boom

    return wrap(app)


@pytest.mark.parametrize("shape", SHAPES)
async def test_tasks_start_after_the_final_message_and_the_app(shape: str) -> None:
    """Every shape: the tasks run in order once the final message is sent and the app returned."""
    scope_items, messages = SHAPES[shape]
    exchange = Exchange()
    await exchange.run(app_sending(exchange.log, messages), **scope_items)
    sends = [f"send {m['type']}{' more' if _more(m) else ''}" for m in messages]
    assert exchange.log == [*sends, "app returns", "task a", "task b"]


@pytest.mark.parametrize("shape", SHAPES)
async def test_the_final_message_completes_the_response(shape: str) -> None:
    """The app raising right after the final message still runs the tasks: it was complete."""
    scope_items, messages = SHAPES[shape]
    exchange = Exchange()
    with pytest.raises(Boom):
        await exchange.run(app_sending(exchange.log, messages, then_raise=True), **scope_items)
    assert exchange.log[-2:] == ["task a", "task b"]


@pytest.mark.parametrize("shape", SHAPES)
async def test_no_earlier_message_completes_the_response(
    shape: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The app raising before the final message skips the tasks, whatever it sent before."""
    scope_items, messages = SHAPES[shape]
    for cut in range(len(messages)):
        exchange = Exchange()
        app = app_sending(exchange.log, messages[:cut], then_raise=True)
        with pytest.raises(Boom):
            await exchange.run(app, **scope_items)
        assert not [line for line in exchange.log if line.startswith("task")], messages[:cut]
    skipped = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 2 * len(messages)


def _more(message: Message) -> bool:
    return bool(message.get("more_body") or message.get("more_trailers"))
