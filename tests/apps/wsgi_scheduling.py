"""A raw WSGI app whose tasks use keys, delays and retries, for tests on real WSGI servers.

Run: python -m waitress --listen=127.0.0.1:8000 tests.apps.wsgi_scheduling:app

The same paths as scheduling_app.py, with sync tasks; `/_control/stats` gives the counters.
"""

from __future__ import annotations

import collections
import json
import threading
from collections.abc import Callable, Iterable
from typing import Any

from post_response import add_task
from post_response.wsgi import PostResponseWSGIMiddleware

from . import wsgi_control
from .control import options
from .wsgi_control import gated, note, query, with_controls

_attempts: collections.Counter[str] = collections.Counter()
_lock = threading.Lock()


def rebuild(cache_id: str, n: int) -> None:
    note(f"{cache_id}:rebuild {n}")
    if n == 0:
        gated(f"{cache_id}-first")


def flaky(task_id: str, fails: int) -> None:
    with _lock:
        _attempts[task_id] += 1
        attempt = _attempts[task_id]
    note(f"{task_id}:attempt {attempt}")
    if attempt <= fails:
        raise ConnectionError(f"attempt {attempt} of {task_id} failed")
    note(f"{task_id}:end")


def endpoint(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    params, path = query(environ), environ["PATH_INFO"]
    task_id = params.get("id", "-")
    if path == "/rebuild":
        add_task(rebuild, task_id, int(params["n"])).set(key=f"cache:{task_id}")
    elif path == "/debounce":
        delay = float(params.get("delay", "0.2"))
        add_task(note, f"{task_id}:ran {params['n']}").set(key=f"index:{task_id}", delay=delay)
    elif path == "/delayed":
        add_task(note, f"{task_id}:ran").set(delay=float(params["delay"]))
    elif path == "/flaky":
        backoff = float(params.get("backoff", "0.05"))
        add_task(flaky, task_id, int(params["fails"])).set(name="flaky", retries=3, backoff=backoff)
    start_response("200 OK", [("content-type", "text/plain")])
    return [b"ok"]


middleware = PostResponseWSGIMiddleware(endpoint, **options())
controlled = with_controls(middleware)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO")
    if path == "/_control/stats":
        body: Any = middleware.stats.snapshot()
    elif path == "/_control/until":  # answers once the event has happened
        event = query(environ)["event"]
        with wsgi_control._changed:
            wsgi_control._changed.wait_for(lambda: event in wsgi_control.EVENTS, 30)
            body = list(wsgi_control.EVENTS)
    else:
        return controlled(environ, start_response)
    start_response("200 OK", [("content-type", "application/json")])
    return [json.dumps(body).encode()]
