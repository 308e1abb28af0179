"""Test controls for apps served by a real server: gated tasks, an event log, records.

A test drives the server over HTTP on 127.0.0.1. `/_control/...` paths are answered here,
outside `PostResponseMiddleware`; everything else goes to the app under test:

- `/_control/open?id=X` opens the gate that task X waits on;
- `/_control/wait?id=X` answers once task X has ended (or was cancelled), with its events;
- `/_control/until?event=E` answers once event E has happened;
- `/_control/events` answers with every event so far;
- `/_control/records?at_least=N` answers once N records exist, with all of them;
- `/_control/stats` answers with the middleware's counters.

Every event is also printed (`event: X:end`), so a test can read it from the server's
output after the process has exited. The middleware's options come from the
`POST_RESPONSE_OPTIONS` environment variable (JSON), so one app serves many tests.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qs

import anyio

from post_response import PostResponseMiddleware
from post_response._types import AnyASGIApp, ASGIApp, Receive, Scope, Send

EVENTS: list[str] = []
RECORDS: list[Any] = []
WAIT_LIMIT = 30  # seconds a waiting control request waits before answering 504

_gates: dict[str, anyio.Event] = {}
_waiters: list[anyio.Event] = []


def options() -> dict[str, Any]:
    """The middleware options the test asked for, from `POST_RESPONSE_OPTIONS`."""
    return dict(json.loads(os.environ.get("POST_RESPONSE_OPTIONS", "{}")))


def note(event: str) -> None:
    """Record an event, print it, and wake whoever waits for one."""
    EVENTS.append(event)
    print(f"event: {event}", flush=True)
    _wake()


async def record(item: Any) -> None:
    """Keep `item` for `/_control/records`."""
    RECORDS.append(item)
    _wake()


def _wake() -> None:
    while _waiters:
        _waiters.pop().set()


async def wait_until(condition: Callable[[], bool]) -> None:
    while not condition():
        changed = anyio.Event()
        _waiters.append(changed)
        await changed.wait()


def _gate(task_id: str) -> anyio.Event:
    if task_id not in _gates:
        _gates[task_id] = anyio.Event()
    return _gates[task_id]


async def gated(task_id: str) -> None:
    """A task that records its start, waits for the test to open its gate, and records its end."""
    note(f"{task_id}:start")
    try:
        await _gate(task_id).wait()
    except BaseException:
        note(f"{task_id}:cancelled")
        raise
    note(f"{task_id}:end")


async def gated_failure(task_id: str) -> None:
    """Wait for the gate, then fail (the event log shows it got that far)."""
    await gated(task_id)
    raise ValueError(f"boom {task_id}")


def sync_failure(task_id: str) -> None:
    """A sync task that fails at once."""
    note(f"{task_id}:sync start")
    raise ValueError(f"boom {task_id}")


async def sleeper(task_id: str, seconds: float) -> None:
    """A task that takes `seconds` (work that outlives the response)."""
    note(f"{task_id}:start")
    try:
        await anyio.sleep(seconds)
    except BaseException:
        note(f"{task_id}:cancelled")
        raise
    note(f"{task_id}:end")


def _of(task_id: str) -> list[str]:
    """The events of one task."""
    return [e for e in EVENTS if e.rpartition(":")[0] == task_id]


def _alive() -> dict[str, int]:
    """How many of post_response's per-request objects the garbage collector can see."""
    from post_response._batch import Batch
    from post_response._context import RequestTasks
    from post_response._task import TaskHandle

    gc.collect()
    kinds = (TaskHandle, RequestTasks, Batch)
    counts = dict.fromkeys((kind.__name__ for kind in kinds), 0)
    for obj in gc.get_objects():
        if isinstance(obj, kinds):
            counts[type(obj).__name__] += 1
    return counts


def query(scope: Scope) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}


def with_controls(
    app: AnyASGIApp,
    middleware: PostResponseMiddleware | None = None,
    actions: Mapping[str, Callable[[], Any]] | None = None,
) -> ASGIApp:
    """Serve `/_control/...` here and pass every other request (and lifespan) to `app`.

    `actions` adds controls of the app's own: `/_control/<name>` answers with `action()`.
    """

    async def controlled(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/_control/"):
            await app(scope, receive, send)
            return
        action, params = scope["path"].removeprefix("/_control/"), query(scope)
        status, body = 200, None
        with anyio.move_on_after(WAIT_LIMIT) as waited:
            if actions and action in actions:
                body = actions[action]()
            else:
                body = await _control(action, params, middleware)
        if waited.cancelled_caught:
            status, body = 504, {"error": f"timed out waiting: {action} {params}"}
        payload = json.dumps(body).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(payload)),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    return controlled


async def _control(
    action: str, params: dict[str, str], middleware: PostResponseMiddleware | None
) -> Any:
    if action == "open":
        _gate(params["id"]).set()
        return "opened"
    if action == "wait":
        await wait_until(lambda: any(e.endswith((":end", ":cancelled")) for e in _of(params["id"])))
        return _of(params["id"])
    if action == "until":
        await wait_until(lambda: params["event"] in EVENTS)
        return EVENTS
    if action == "events":
        return EVENTS
    if action == "records":
        await wait_until(lambda: len(RECORDS) >= int(params["at_least"]))
        return RECORDS
    if action == "stats" and middleware is not None:
        return middleware.stats.snapshot()
    if action == "alive":
        return _alive()
    return {"error": f"unknown control {action}"}
