"""The outcome policy: which requests run their tasks; the app's exception passes through once."""

from __future__ import annotations

from typing import Any

import pytest

from post_response import TaskHandle, TaskState, add_task
from post_response._types import Message, Receive, Scope, Send

from .harness import Exchange, wrap

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("detach")]


class Boom(Exception):
    pass


def start(status: int) -> Message:
    return {"type": "http.response.start", "status": status, "headers": []}


BODY: Message = {"type": "http.response.body", "body": b"x"}
CHUNK: Message = {"type": "http.response.body", "body": b"x", "more_body": True}


def app_that(
    *steps: Message | str, policy: Any = "no_server_error"
) -> tuple[Any, list[TaskHandle]]:
    """An app adding a normal and an `always` task, then sending messages or doing steps."""
    handles: list[TaskHandle] = []

    async def noop() -> None:
        pass

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        handles.append(add_task(noop).set(name="normal"))
        handles.append(add_task(noop).set(name="always", always=True))
        for step in steps:
            if step == "raise":
                raise Boom("from the app")
            if step == "receive":
                await receive()
            else:
                assert not isinstance(step, str)
                await send(step)

    return wrap(app, policy=policy), handles


RUN, SKIP = TaskState.COMPLETED, TaskState.SKIPPED

# case -> (steps, does the app raise, does the client go away, state of the normal task)
CASES: dict[str, tuple[tuple[Message | str, ...], bool, bool, TaskState]] = {
    "200": ((start(200), BODY), False, False, RUN),
    "404 returned": ((start(404), BODY), False, False, RUN),
    "500": ((start(500), BODY), False, False, SKIP),
    "503 streamed": ((start(503), CHUNK, BODY), False, False, SKIP),
    "raised before start": (("raise",), True, False, SKIP),
    "raised mid-body": ((start(200), CHUNK, "raise"), True, False, SKIP),
    "raised after completing": ((start(200), BODY, "raise"), True, False, RUN),
    "raised after a 500": ((start(500), BODY, "raise"), True, False, SKIP),
    "client went away mid-body": ((start(200), CHUNK, "receive", "receive"), False, True, RUN),
    "client went away before start": (("receive", "receive"), False, True, RUN),
    # The app raises because the client left (Starlette's ClientDisconnect): the client went
    # away, the app did not fail, as for a WebSocket.
    "raised once the client went away": (
        (start(200), CHUNK, "receive", "receive", "raise"),
        True,
        True,
        RUN,
    ),
    "raised before start, client gone": (("receive", "receive", "raise"), True, True, RUN),
    "raised after a 500, client gone": (
        (start(500), CHUNK, "receive", "receive", "raise"),
        True,
        True,
        SKIP,
    ),
    "returned without a response": ((), False, False, SKIP),
}


@pytest.mark.parametrize("case", CASES)
async def test_default_policy(case: str, caplog: pytest.LogCaptureFixture) -> None:
    """Run unless the app raised before completing or answered 5xx; `always` tasks always run."""
    steps, raises, client_gone, expected = CASES[case]
    app, handles = app_that(*steps)
    exchange = Exchange(client_gone=client_gone)
    if raises:
        with pytest.raises(Boom) as raised:
            await exchange.run(app)
        assert str(raised.value) == "from the app"
        assert raised.value.__cause__ is None
        assert raised.value.__context__ is None  # re-raised as it was, not wrapped or chained
    else:
        await exchange.run(app)
    normal, always = handles
    assert normal.state is expected
    assert always.state is RUN
    skips = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skips) == (expected is SKIP)
    if skips:
        assert "'normal' of GET /" in skips[0].getMessage()


@pytest.mark.parametrize(
    ("policy", "status", "expected"),
    [
        ("no_error", 200, RUN),
        ("no_error", 302, RUN),
        ("no_error", 404, SKIP),
        ("no_error", 500, SKIP),
        ("always", 500, RUN),
        ("always", 404, RUN),
    ],
)
async def test_other_policies(policy: str, status: int, expected: TaskState) -> None:
    """`no_error` also skips on 4xx; `always` runs whatever the status."""
    app, handles = app_that(start(status), BODY, policy=policy)
    await Exchange().run(app)
    assert handles[0].state is expected


async def test_always_policy_runs_after_the_app_raised() -> None:
    """With `policy="always"` even a request whose app raised before responding runs its tasks."""
    app, handles = app_that("raise", policy="always")
    with pytest.raises(Boom):
        await Exchange().run(app)
    assert handles[0].state is RUN


async def test_send_raising_oserror_counts_as_the_client_going_away() -> None:
    """ASGI 2.4 servers raise an OSError from send() once the client left: the tasks still run."""
    app, handles = app_that(start(200), CHUNK, BODY)
    exchange = Exchange()
    real_send = exchange.send

    async def send(message: Message) -> None:
        if message.get("more_body"):
            raise ConnectionResetError("client went away")
        await real_send(message)

    exchange.send = send  # type: ignore[method-assign]
    with pytest.raises(ConnectionResetError):
        await exchange.run(app)
    assert handles[0].state is RUN
