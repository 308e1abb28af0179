"""A raw ASGI app whose tasks use keys, delays and retries, for tests on real servers.

Run: python -m uvicorn tests.apps.scheduling_app:app

- `/rebuild?id=C&n=N` adds `rebuild(C, N)` with key `cache:C`; rebuild 0 waits on gate `C-first`.
- `/debounce?id=D&n=N` adds `note("D:ran N")` with key `index:D` and a delay of `delay` s.
- `/delayed?id=S&delay=X` adds a task noting `S:ran` after `X` seconds.
- `/flaky?id=F&fails=K&backoff=B` adds a task failing its first K attempts, 3 retries.
"""

from __future__ import annotations

import collections

from post_response import PostResponseMiddleware, add_task
from post_response._types import Receive, Scope, Send

from .control import gated, note, options, query, with_controls

_attempts: collections.Counter[str] = collections.Counter()


async def rebuild(cache_id: str, n: int) -> None:
    note(f"{cache_id}:rebuild {n}")
    if n == 0:
        await gated(f"{cache_id}-first")


async def flaky(task_id: str, fails: int) -> None:
    _attempts[task_id] += 1
    note(f"{task_id}:attempt {_attempts[task_id]}")
    if _attempts[task_id] <= fails:
        raise ConnectionError(f"attempt {_attempts[task_id]} of {task_id} failed")
    note(f"{task_id}:end")


async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    params, path = query(scope), scope["path"]
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
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


middleware = PostResponseMiddleware(endpoint, **options())
app = with_controls(middleware, middleware)
