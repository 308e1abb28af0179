"""Nothing is lost silently: every task ends in exactly one final state, and the counts add up."""

from __future__ import annotations

import collections
import contextlib
import logging
import random

import anyio
import pytest

from post_response import TaskHandle, TaskState, add_task
from post_response._task import FINAL_STATES
from post_response._types import Receive, Scope, Send

from .harness import Exchange, wrap

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("detach")]

FINAL = {  # those this test can reach (drops and shutdown: test_owner.py)
    TaskState.COMPLETED,
    TaskState.FAILED,
    TaskState.TIMED_OUT,
    TaskState.SKIPPED,
    TaskState.CANCELLED,
}
OUTCOMES = ["200", "404", "500", "raise before", "raise after"]
STATUS = {"200": 200, "404": 404, "500": 500, "raise after": 200}
KINDS = ["async ok", "sync ok", "async fail", "sync fail", "timeout", "cancel", "always"]


class Boom(Exception):
    pass


async def test_every_task_ends_in_one_final_state_and_counts_add_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """300 concurrent requests with random outcomes and tasks: each task is accounted for once."""
    rng = random.Random(20261129)
    runs: collections.Counter[int] = collections.Counter()
    expected: dict[int, TaskState] = {}
    handles: dict[int, TaskHandle] = {}

    async def async_task(n: int, fail: bool) -> None:
        runs[n] += 1
        await anyio.sleep(0)
        if fail:
            raise ValueError(n)

    def sync_task(n: int, fail: bool) -> None:
        runs[n] += 1
        if fail:
            raise ValueError(n)

    async def slow_task(n: int) -> None:
        runs[n] += 1
        await anyio.sleep_forever()

    def add(kind: str, n: int) -> TaskHandle:
        if kind.startswith("async"):
            return add_task(async_task, n, kind.endswith("fail"))
        if kind.startswith("sync"):
            return add_task(sync_task, n, kind.endswith("fail"))
        if kind == "timeout":
            return add_task(slow_task, n).set(timeout=0.001)
        if kind == "cancel":
            handle = add_task(async_task, n, False)
            handle.cancel()
            return handle
        return add_task(async_task, n, False).set(always=True)

    def expect(kind: str, outcome: str) -> TaskState:
        if kind == "cancel":
            return TaskState.CANCELLED
        if outcome in ("500", "raise before") and kind != "always":
            return TaskState.SKIPPED
        if kind.endswith("fail"):
            return TaskState.FAILED
        return TaskState.TIMED_OUT if kind == "timeout" else TaskState.COMPLETED

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        outcome, kinds = plan[int(scope["path"][1:])]
        for kind in kinds:
            n = len(handles)
            handles[n] = add(kind, n)
            expected[n] = expect(kind, outcome)
        if outcome == "raise before":
            raise Boom
        await send({"type": "http.response.start", "status": STATUS[outcome]})
        await send({"type": "http.response.body", "body": b""})
        if outcome == "raise after":
            raise Boom

    plan = [
        (rng.choice(OUTCOMES), [rng.choice(KINDS) for _ in range(rng.randint(1, 4))])
        for _ in range(300)
    ]
    wrapped = wrap(app, concurrency=2)

    async def request(i: int) -> None:
        with contextlib.suppress(Boom):
            await Exchange().run(wrapped, path=f"/{i}")

    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            for i in range(len(plan)):
                group.start_soon(request, i)

    states = {n: handle.state for n, handle in handles.items()}
    assert set(states.values()) <= FINAL
    assert states == expected
    counts = collections.Counter(states.values())
    assert sum(counts.values()) == len(handles) == sum(len(kinds) for _, kinds in plan)
    assert set(counts) == FINAL  # the random plan reached every final state
    stats = wrapped.stats.snapshot()  # the counters agree with the states
    assert stats == {
        "queued": 0,
        "running": 0,
        "held": 0,
        **{s.value: counts[s] for s in FINAL_STATES},
    }
    assert max(runs.values()) == 1  # nothing ran twice
    ran = {TaskState.COMPLETED, TaskState.FAILED, TaskState.TIMED_OUT}
    assert set(runs) == {n for n, state in states.items() if state in ran}

    # Each task that did not complete is logged exactly once, by name.
    logged = [r for r in caplog.records if hasattr(r, "task_name") and r.levelno >= logging.INFO]
    assert len(logged) == len(handles) - counts[TaskState.COMPLETED]
