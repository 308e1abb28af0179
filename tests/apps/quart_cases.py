"""Quart scenarios for tests on real servers: async views, and sync views run in threads.

Run: python -m uvicorn tests.apps.quart_cases:app   (or: python -m hypercorn ...)
"""

from __future__ import annotations

from quart import Quart, request

from post_response import PostResponseMiddleware, add_task

from .control import gated, options, with_controls
from .threads import running_in

quart = Quart(__name__)


@quart.route("/async")
async def async_view() -> str:
    add_task(gated, request.args["id"])
    return "hello world"


@quart.route("/sync")
def sync_view() -> str:
    """Quart runs a sync view in a worker thread."""
    add_task(gated, request.args["id"])
    return f"hello from the {running_in()}"


quart.asgi_app = PostResponseMiddleware(quart.asgi_app, **options())  # type: ignore[method-assign,assignment]
app = with_controls(quart)
