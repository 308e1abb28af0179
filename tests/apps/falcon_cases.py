"""Falcon ASGI scenarios for tests on real servers: async responders, blocking code in a
thread, a failing task.

Run: python -m uvicorn tests.apps.falcon_cases:app

`falcon.asgi.App` only takes coroutine responders; blocking code runs in a thread, with
`asyncio.to_thread` (which carries the request's context) or Falcon's
`wrap_sync_to_async` (which does not).
"""

from __future__ import annotations

import asyncio

import falcon.asgi
from falcon.util import wrap_sync_to_async

from post_response import PostResponseMiddleware, add_task

from .control import gated, gated_failure, options, with_controls
from .threads import running_in


def blocking(task_id: str) -> str:
    add_task(gated, task_id)
    return f"hello from the {running_in()}"


class Async:
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        add_task(gated, req.get_param("id", required=True))
        resp.text = "hello world"


class ToThread:
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.text = await asyncio.to_thread(blocking, req.get_param("id", required=True))


class FalconExecutor:
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.text = await wrap_sync_to_async(blocking)(req.get_param("id", required=True))


class Fail:
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        """The first task fails once its gate opens; the second one must still run."""
        task_id = req.get_param("id", required=True)
        add_task(gated_failure, task_id)
        add_task(gated, f"{task_id}-after")
        resp.text = "hello world"


falcon_app = falcon.asgi.App()
falcon_app.add_route("/async", Async())
falcon_app.add_route("/to-thread", ToThread())
falcon_app.add_route("/falcon-executor", FalconExecutor())
falcon_app.add_route("/fail", Fail())
middleware = PostResponseMiddleware(falcon_app, **options())
app = with_controls(middleware, middleware)
