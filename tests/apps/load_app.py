"""A raw ASGI app for the fault and load test: each request adds three tasks that complete,
raise, exceed their timeout or sleep, chosen from the request number so runs repeat. A few
are hostile: they raise SystemExit, KeyboardInterrupt, CancelledError or GeneratorExit, which
must end them `failed` like any exception, and stop nothing else.

Run: POST_RESPONSE_OPTIONS='{"max_running": 100}' python -m uvicorn tests.apps.load_app:app

At lifespan shutdown (after the middleware drained its tasks) it writes a report to the
file named by `LOAD_REPORT`: the middleware's counters, how many tasks it added of each
kind, and how many times each task's body started.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
from collections.abc import Callable
from urllib.parse import parse_qs

import anyio

from post_response import PostResponseMiddleware, add_task
from post_response._types import Receive, Scope, Send

from .control import options, with_controls

CAPACITY = 1_000_000  # task numbers; a bytearray keeps the run counts small in memory
RUNS = bytearray(CAPACITY)
ADDED = [0]
KINDS: collections.Counter[str] = collections.Counter()  # tasks added, by kind
# What each hostile kind raises: BaseExceptions that are not Exceptions, the task's own.
HOSTILE: dict[str, Callable[[], BaseException]] = {
    "system exit": lambda: SystemExit(3),
    "keyboard interrupt": KeyboardInterrupt,
    "cancelled error": asyncio.CancelledError,
    "generator exit": GeneratorExit,
}
BODY = b"ok"
HEADERS = [(b"content-type", b"text/plain"), (b"content-length", b"2")]


async def task(number: int, kind: str) -> None:
    RUNS[number] += 1
    if kind == "raise":
        raise ValueError(f"task {number} fails on purpose")
    if kind in HOSTILE:
        raise HOSTILE[kind]()
    if kind == "sleep":
        await anyio.sleep((number % 20) / 1000)  # up to 19 ms
    elif kind in ("too slow", "slow"):
        await anyio.sleep(0.5)


def kind_of(number: int, slow: bool) -> str:
    """Which behaviour task `number` has: 51% complete, 1% each hostile kind, 15% raise,
    10% time out, 20% sleep."""
    if slow:
        return "slow"
    bucket = (number * 7919) % 100
    if bucket < 51:
        return "complete"
    if bucket < 55:
        return list(HOSTILE)[bucket - 51]
    if bucket < 70:
        return "raise"
    return "too slow" if bucket < 80 else "sleep"


async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    params = parse_qs(scope["query_string"].decode())
    request = int(params["n"][0])
    slow = "slow" in params
    for k in range(3):
        number = request * 3 + k
        kind = kind_of(number, slow)
        handle = add_task(task, number, kind)
        if kind == "too slow":
            handle.set(timeout=0.01)
        ADDED[0] += 1
        KINDS[kind] += 1
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            write_report()
            await send({"type": "lifespan.shutdown.complete"})
            return


def write_report() -> None:
    report = {
        "stats": middleware.stats.snapshot(),
        "added": ADDED[0],
        "kinds": KINDS,
        "ran": sum(1 for runs in RUNS if runs),
        "ran_twice": sum(1 for runs in RUNS if runs > 1),
    }
    with open(os.environ["LOAD_REPORT"], "w") as out:
        json.dump(report, out)


middleware = PostResponseMiddleware(endpoint, **options())
app = with_controls(middleware, middleware)
