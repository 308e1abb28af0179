"""An app whose lifespan startup raises, as one whose database is down at startup does.

uvicorn (`--lifespan auto`, its default) and hypercorn log the error and serve on.
"""

from __future__ import annotations

from post_response import PostResponseMiddleware, add_task
from post_response._types import Receive, Scope, Send

from .control import gated, query, with_controls


class StartupError(Exception):
    """The startup's failure."""


async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await receive()
        raise StartupError("the database is down")
    add_task(gated, query(scope)["id"])
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


middleware = PostResponseMiddleware(endpoint)
app = with_controls(middleware, middleware)
