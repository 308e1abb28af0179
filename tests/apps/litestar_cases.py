"""Litestar scenarios for tests on real servers: async and sync handlers, a failing task.

Run: python -m uvicorn tests.apps.litestar_cases:app
"""

from __future__ import annotations

from litestar import Litestar, get

from post_response import PostResponseMiddleware, add_task

from .control import gated, gated_failure, options, with_controls
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


litestar = Litestar(
    route_handlers=[async_handler, sync_handler, sync_handler_on_loop, failing_task]
)
middleware = PostResponseMiddleware(litestar, **options())
app = with_controls(middleware, middleware)
