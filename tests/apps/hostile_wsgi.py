"""Tasks that misbehave under PostResponseWSGIMiddleware, for tests on real WSGI servers.

Run: python -m waitress --listen=127.0.0.1:8000 tests.apps.hostile_wsgi:app

Paths: `/hostile/<kind>/<id>` adds the hostile task `<kind>` (see `HOSTILE`), then
`quick(<id>-after)`; `/quick/<id>` and `/blocked/<id>` add that one task. Each answers 200
with `BODY`, streamed in chunks, so that a response the server does not finish shows;
`/unsized/<id>` adds `quick(<id>)` and answers `[BODY]`, without a Content-Length.
Controls beyond wsgi_control.py's: `/_control/started?id=X` answers once blocked task X has
started; `/_control/states?id=X` with the states of the tasks `/hostile/.../X` added;
`/_control/stats` with the middleware's counters.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NoReturn

from post_response import TaskHandle, add_task
from post_response.wsgi import PostResponseWSGIMiddleware

from . import wsgi_control
from .wsgi_control import WSGIApp, note, query, with_controls

wsgi_control.WAIT_LIMIT = 5.0  # fail fast: every task here is quick unless a test holds it

CHUNKS = [bytes([ord("a") + i]) * 4096 for i in range(16)]
BODY = b"".join(CHUNKS)
THREAD_WAIT = 20.0  # seconds a blocked task holds its thread
START_LIMIT = 10.0  # seconds `/_control/started` waits

HANDLES: dict[str, list[TaskHandle]] = {}
_started: dict[str, threading.Event] = {}
_lock = threading.Lock()


def _started_event(task_id: str) -> threading.Event:
    with _lock:
        return _started.setdefault(task_id, threading.Event())


def quick(task_id: str) -> None:
    note(f"{task_id}:start")
    note(f"{task_id}:end")


def blocked(task_id: str) -> None:
    """Hold a worker thread for `THREAD_WAIT` seconds; nothing opens it early."""
    note(f"{task_id}:start")
    _started_event(task_id).set()
    threading.Event().wait(THREAD_WAIT)
    note(f"{task_id}:end")


def call_sys_exit(task_id: str) -> NoReturn:
    note(f"{task_id}:start")
    sys.exit(3)


async def raise_system_exit(task_id: str) -> NoReturn:
    note(f"{task_id}:start")
    raise SystemExit(3)


def raise_keyboard_interrupt(task_id: str) -> NoReturn:
    note(f"{task_id}:start")
    raise KeyboardInterrupt


HOSTILE: dict[str, Callable[[str], object]] = {
    "sys-exit-sync": call_sys_exit,
    "system-exit": raise_system_exit,
    "keyboard-interrupt-sync": raise_keyboard_interrupt,
}


def endpoint(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    route, *_, task_id = environ.get("PATH_INFO", "").strip("/").split("/")
    if route == "hostile":
        kind = environ["PATH_INFO"].split("/")[2]
        HANDLES[task_id] = [add_task(HOSTILE[kind], task_id), add_task(quick, f"{task_id}-after")]
    elif route == "quick":
        add_task(quick, task_id)
    elif route == "blocked":
        add_task(blocked, task_id)
    elif route == "unsized":  # one chunk, no Content-Length: the server may count it
        add_task(quick, task_id)
        start_response("200 OK", [("content-type", "text/plain")])
        return [BODY]
    headers = [("content-type", "text/plain"), ("content-length", str(len(BODY)))]
    start_response("200 OK", headers)
    return _chunks()


def _chunks() -> Iterator[bytes]:
    yield from CHUNKS


def _control(action: str, params: dict[str, str]) -> Any:
    if action == "started":
        return _started_event(params["id"]).wait(START_LIMIT)
    if action == "states":
        return [handle.state.value for handle in HANDLES.get(params["id"], [])]
    if action == "stats":
        return middleware.stats.snapshot()
    return None


def with_own_controls(app: WSGIApp) -> WSGIApp:
    """Answer this app's own controls; pass everything else to wsgi_control.py's."""

    def controlled(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        action = path.removeprefix("/_control/")
        if path.startswith("/_control/") and action in ("started", "states", "stats"):
            body = json.dumps(_control(action, query(environ))).encode()
            start_response("200 OK", [("content-type", "application/json")])
            return [body]
        return app(environ, start_response)

    return controlled


middleware = PostResponseWSGIMiddleware(
    endpoint, **json.loads(os.environ.get("POST_RESPONSE_OPTIONS", "{}"))
)
app = with_own_controls(with_controls(middleware))
