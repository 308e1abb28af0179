"""Test controls for WSGI apps on a real server: thread-safe gates and an event log.

The same `/_control/open|wait|events` protocol as control.py, for threaded WSGI servers.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

EVENTS: list[str] = []
WAIT_LIMIT = 30.0
_changed = threading.Condition()
_gates: dict[str, threading.Event] = {}

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def note(event: str) -> None:
    with _changed:
        EVENTS.append(event)
        print(f"event: {event}", flush=True)
        _changed.notify_all()


def _gate(task_id: str) -> threading.Event:
    with _changed:
        return _gates.setdefault(task_id, threading.Event())


def gated(task_id: str) -> None:
    """A sync task: records its start, waits for the test to open its gate, records its end."""
    note(f"{task_id}:start")
    note(f"{task_id}:end" if _gate(task_id).wait(WAIT_LIMIT) else f"{task_id}:gave up")


def failing(task_id: str) -> None:
    note(f"{task_id}:start")
    raise ValueError(f"boom {task_id}")


def query(environ: dict[str, Any]) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}


def with_controls(app: WSGIApp) -> WSGIApp:
    """Serve `/_control/...` here and pass every other request to `app`."""

    def controlled(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if not path.startswith("/_control/"):
            return app(environ, start_response)
        body = json.dumps(_control(path.removeprefix("/_control/"), query(environ))).encode()
        start_response("200 OK", [("content-type", "application/json")])
        return [body]

    return controlled


def _of(task_id: str) -> list[str]:
    return [e for e in EVENTS if e.rpartition(":")[0] == task_id]


def _ended(task_id: str) -> bool:
    return any(e.endswith((":end", ":gave up")) for e in _of(task_id))


def _control(action: str, params: dict[str, str]) -> Any:
    if action == "open":
        _gate(params["id"]).set()
        return "opened"
    if action == "wait":
        with _changed:
            _changed.wait_for(lambda: _ended(params["id"]), WAIT_LIMIT)
            return _of(params["id"])
    if action == "events":
        return EVENTS
    return {"error": f"unknown control {action}"}
