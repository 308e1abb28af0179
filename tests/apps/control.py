"""Test controls for apps served by a real server: gated tasks, an event log, records.

A test drives the server over HTTP on 127.0.0.1. `/_control/...` paths are answered here,
outside `PostResponseMiddleware`; everything else goes to the app under test:

- `/_control/open?id=X` opens the gate that task X waits on;
- `/_control/wait?id=X` answers once task X has ended, with its events;
- `/_control/events` answers with every event so far;
- `/_control/records?at_least=N` answers once N records exist, with all of them.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

import anyio

from post_response._types import AnyASGIApp, ASGIApp, Receive, Scope, Send

EVENTS: list[str] = []
RECORDS: list[Any] = []
WAIT_LIMIT = 30  # seconds a /_control/wait or /records request waits before answering 504

_gates: dict[str, anyio.Event] = {}
_ended: dict[str, anyio.Event] = {}
_changed: list[anyio.Event] = []


def _event(events: dict[str, anyio.Event], task_id: str) -> anyio.Event:
    if task_id not in events:
        events[task_id] = anyio.Event()
    return events[task_id]


async def gated(task_id: str) -> None:
    """A task that records its start, waits for the test to open its gate, and records its end."""
    EVENTS.append(f"{task_id}:start")
    try:
        await _event(_gates, task_id).wait()
    except BaseException:
        EVENTS.append(f"{task_id}:cancelled")
        _event(_ended, task_id).set()
        raise
    EVENTS.append(f"{task_id}:end")
    _event(_ended, task_id).set()


async def gated_failure(task_id: str) -> None:
    """Wait for the gate, then fail (the event log shows it got that far)."""
    await gated(task_id)
    raise ValueError(f"boom {task_id}")


def sync_failure(task_id: str) -> None:
    """A sync task that fails at once."""
    EVENTS.append(f"{task_id}:sync start")
    raise ValueError(f"boom {task_id}")


async def record(item: Any) -> None:
    """Keep `item` for `/_control/records`."""
    RECORDS.append(item)
    while _changed:
        _changed.pop().set()


def query(scope: Scope) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}


def with_controls(app: AnyASGIApp) -> ASGIApp:
    """Serve `/_control/...` here and pass every other request to `app`."""

    async def controlled(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/_control/"):
            await app(scope, receive, send)
            return
        params = query(scope)
        status, body = 200, None
        with anyio.move_on_after(WAIT_LIMIT) as waited:
            body = await _control(scope["path"].removeprefix("/_control/"), params)
        if waited.cancelled_caught:
            status, body = 504, {"error": "timed out waiting"}
        payload = json.dumps(body).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(payload)),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    return controlled


async def _control(action: str, params: dict[str, str]) -> Any:
    if action == "open":
        _event(_gates, params["id"]).set()
        return "opened"
    if action == "wait":
        await _event(_ended, params["id"]).wait()
        return [e for e in EVENTS if e.split(":")[0] == params["id"]]
    if action == "events":
        return EVENTS
    if action == "records":
        while len(RECORDS) < int(params["at_least"]):
            changed = anyio.Event()
            _changed.append(changed)
            await changed.wait()
        return RECORDS
    return {"error": f"unknown control {action}"}
