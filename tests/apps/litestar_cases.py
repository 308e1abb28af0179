"""Litestar scenarios for tests on real servers: async and sync handlers, a failing task.

Run: python -m uvicorn tests.apps.litestar_cases:app   (or `route_level`)

`app` wraps the whole Litestar app, as the README advises; `route_level` lists the
middleware in `Litestar(middleware=[...])` instead, where Litestar builds it into each
route, out of reach of the lifespan.
"""

from __future__ import annotations

from litestar import Litestar, Response, get
from litestar.background_tasks import BackgroundTask

from post_response import PostResponseMiddleware, add_task

from .control import gated, gated_failure, options, sleeper, with_controls
from .threads import running_in


@get("/async")
async def async_handler(id: str) -> str:
    add_task(gated, id)
    return "hello world"


@get("/sync", sync_to_thread=True)
def sync_handler(id: str) -> str:
    add_task(gated, id)
    return f"hello from the {running_in()}"


@get("/sync-on-loop", sync_to_thread=False)
def sync_handler_on_loop(id: str) -> str:
    """A sync handler Litestar calls on the event loop, as it is told to."""
    add_task(gated, id)
    return f"hello from the {running_in()}"


@get("/fail")
async def failing_task(id: str) -> str:
    """The first task fails once its gate opens; the second one must still run."""
    add_task(gated_failure, id)
    add_task(gated, f"{id}-after")
    return "hello world"


@get("/background")
async def with_background_task(id: str) -> Response[str]:
    """Litestar's own background task and ours on one response."""
    add_task(gated, f"{id}-ours")
    return Response("hello world", background=BackgroundTask(gated, f"{id}-litestar"))


@get("/sleep")
async def sleeping_task(id: str, seconds: float) -> str:
    add_task(sleeper, id, seconds)
    return "hello world"


HANDLERS = [
    async_handler,
    sync_handler,
    sync_handler_on_loop,
    failing_task,
    with_background_task,
    sleeping_task,
]
middleware = PostResponseMiddleware(Litestar(route_handlers=HANDLERS), **options())
app = with_controls(middleware, middleware)
# Litestar types the middleware's scope as its own TypedDicts, ours as a MutableMapping.
route_level = with_controls(
    Litestar(route_handlers=HANDLERS, middleware=[PostResponseMiddleware])  # type: ignore[list-item]
)
