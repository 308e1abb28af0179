"""Drive ASGI apps in-process, without a server: cost per request, memory per task.

Each measurement runs on a fresh asyncio event loop (`asyncio.run`), with the app's
lifespan started and stopped around it as a server would (asgi-background needs it, and
ours then keeps its tasks in the lifespan's task group). Requests are awaited one after
another, each followed by one turn of the event loop (`asyncio.sleep(0)`), as a server
interleaves its work: detached tasks then run between requests instead of piling up.
Every system pays for that turn, the bare app too.
"""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from .apps import COUNTER, GATE, Work, build, ours_middleware

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from .apps import ASGIApp, Message, Scope

__all__ = ["bytes_per_task", "cost_per_request", "new_scope", "receive", "running", "send"]

LIMIT = 60.0  # seconds any wait for an app may take before the benchmark gives up

ASGI = {"version": "3.0", "spec_version": "2.4"}
# What uvicorn hands an app for `GET / HTTP/1.1` from wrk.
BASE_SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": ASGI,
    "http_version": "1.1",
    "server": ("127.0.0.1", 8000),
    "client": ("127.0.0.1", 50000),
    "scheme": "http",
    "method": "GET",
    "root_path": "",
    "path": "/",
    "raw_path": b"/",
    "query_string": b"",
    "headers": [(b"host", b"127.0.0.1:8000")],
}
REQUEST: Message = {"type": "http.request", "body": b"", "more_body": False}


def new_scope() -> Scope:
    # A fresh dict per request, as servers make: asgi-background writes into it.
    return {**BASE_SCOPE, "state": {}}


async def receive() -> Message:
    return REQUEST


async def send(message: Message) -> None:
    return None


@asynccontextmanager
async def running(app: ASGIApp) -> AsyncIterator[None]:
    """The app's lifespan, started before the block and shut down after it."""
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    outbox: asyncio.Queue[Message] = asyncio.Queue()

    async def lifespan_receive() -> Message:
        return await inbox.get()

    async def lifespan_send(message: Message) -> None:
        outbox.put_nowait(message)

    scope = {"type": "lifespan", "asgi": ASGI, "state": {}}
    task = asyncio.ensure_future(app(scope, lifespan_receive, lifespan_send))
    inbox.put_nowait({"type": "lifespan.startup"})
    await _expect(outbox, task, "lifespan.startup.complete")
    try:
        yield
    finally:
        inbox.put_nowait({"type": "lifespan.shutdown"})
        await _expect(outbox, task, "lifespan.shutdown.complete")
        # asgi-background sends shutdown.complete twice; nothing waits for the second.
        await asyncio.wait_for(task, LIMIT)


async def _expect(outbox: asyncio.Queue[Message], task: asyncio.Future[None], kind: str) -> None:
    getter: asyncio.Future[Any] = asyncio.ensure_future(outbox.get())
    waited: set[asyncio.Future[Any]] = {getter, task}
    done, _ = await asyncio.wait(waited, timeout=LIMIT, return_when="FIRST_COMPLETED")
    if getter not in done:
        getter.cancel()
        if task.done():
            task.result()  # the app's own exception, if it raised
        msg = f"the app did not send {kind}"
        raise RuntimeError(msg)
    message = getter.result()
    if message["type"] != kind:
        msg = f"the app sent {message['type']} instead of {kind}"
        raise RuntimeError(msg)


async def requests(app: ASGIApp, count: int) -> None:
    """`count` GET requests, one after another, each followed by one event-loop turn."""
    for _ in range(count):
        await app(new_scope(), receive, send)
        await asyncio.sleep(0)


async def settle(app: ASGIApp, expected: int) -> None:
    """Wait until `expected` tasks have ticked COUNTER: ours by `middleware.join()`, the
    others (whose tasks run in the app call or in a task group) by polling the count."""
    middleware = ours_middleware(app)
    if middleware is not None:
        await asyncio.wait_for(middleware.join(), LIMIT)
    deadline = time.monotonic() + LIMIT
    while COUNTER.value < expected:
        if time.monotonic() > deadline:
            msg = f"{COUNTER.value} tasks done, {expected} expected"
            raise TimeoutError(msg)
        await asyncio.sleep(0)
    if COUNTER.value != expected:
        msg = f"{COUNTER.value} tasks done, {expected} expected"
        raise RuntimeError(msg)


async def check(app: ASGIApp, work: Work) -> None:
    """One request: the app must answer 200 "ok" and run the request's tasks."""
    sent: list[Message] = []

    async def record(message: Message) -> None:
        sent.append(message)

    expected = COUNTER.value + work.tasks
    await app(new_scope(), receive, record)
    statuses = [m.get("status") for m in sent if m["type"] == "http.response.start"]
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    if statuses != [200] or body != b"ok":
        msg = f"unexpected response: {sent!r}"
        raise RuntimeError(msg)
    await settle(app, expected)


async def _cost(system: str, work: Work, count: int, warmup: int) -> float:
    app = build(system, work)
    async with running(app):
        await check(app, work)
        expected = COUNTER.value + warmup * work.tasks
        await requests(app, warmup)
        await settle(app, expected)
        expected = COUNTER.value + count * work.tasks
        gc.collect()
        start = time.perf_counter()
        await requests(app, count)
        await settle(app, expected)
        elapsed = time.perf_counter() - start
    return elapsed / count * 1e6


def cost_per_request(system: str, work: Work, count: int, warmup: int = 200) -> float:
    """Microseconds per request, the time for its tasks to finish included."""
    COUNTER.value = 0
    return asyncio.run(_cost(system, work, count, warmup))


async def _memory(system: str, count: int) -> float:
    work = Work("gate")
    app = build(system, work)
    pending: set[asyncio.Future[None]] = set()

    async def spawn_requests(number: int) -> None:
        # Each request in its own asyncio task, as a server runs it: systems that run
        # tasks inside the app call keep that request task alive, and that counts.
        for _ in range(number):
            task = asyncio.ensure_future(app(new_scope(), receive, send))
            pending.add(task)
            task.add_done_callback(pending.discard)
            await asyncio.sleep(0)

    async def release(expected: int) -> None:
        GATE.open()
        await asyncio.wait_for(asyncio.gather(*pending), LIMIT)
        await settle(app, expected)

    async with running(app):
        GATE.close()
        GATE.open()  # warm-up with the gate open: every code path has run once
        await spawn_requests(100)
        await release(100)
        GATE.close()
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        await spawn_requests(count)
        for _ in range(3):
            await asyncio.sleep(0)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
        await release(100 + count)
    return held / count


def bytes_per_task(system: str, count: int) -> float:
    """Bytes held per request whose one task is waiting (tracemalloc, after a GC)."""
    COUNTER.value = 0
    tracemalloc.start()
    try:
        return asyncio.run(_memory(system, count))
    finally:
        tracemalloc.stop()
