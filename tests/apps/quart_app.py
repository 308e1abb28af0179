"""A Quart app wrapped by PostResponseMiddleware, for tests on real servers.

Run: python -m uvicorn tests.apps.quart_app:app
"""

from __future__ import annotations

from quart import Quart, request

from post_response import PostResponseMiddleware, add_task

from .control import gated, with_controls

quart = Quart(__name__)


@quart.route("/work")
async def work() -> str:
    add_task(gated, request.args["id"])
    return "hello world"


@quart.route("/sync-work")
def sync_work() -> str:
    """Quart runs a sync view in a worker thread."""
    add_task(gated, request.args["id"])
    return "hello world"


quart.asgi_app = PostResponseMiddleware(quart.asgi_app)  # type: ignore[method-assign,assignment]
app = with_controls(quart)
