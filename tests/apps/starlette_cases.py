"""Starlette scenarios for tests on real servers: sync and async endpoints, Starlette's own
`BackgroundTasks`, and a `BaseHTTPMiddleware` inside or outside PostResponseMiddleware.

Run: python -m uvicorn tests.apps.starlette_cases:app   (also `inside` and `outside`)

Three apps share the endpoints: `app` (PostResponseMiddleware alone), `inside` (a
BaseHTTPMiddleware inside it) and `outside` (a BaseHTTPMiddleware outside it). The
BaseHTTPMiddleware sets an `x-middleware` header, so a test can see that it ran.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from post_response import PostResponseMiddleware, add_task
from post_response._types import ASGIApp

from .control import gated, options, with_controls
from .threads import running_in


async def async_endpoint(request: Request) -> PlainTextResponse:
    add_task(gated, request.query_params["id"])
    return PlainTextResponse("hello world")


def sync_endpoint(request: Request) -> PlainTextResponse:
    """Starlette runs a sync endpoint in a worker thread."""
    add_task(gated, request.query_params["id"])
    return PlainTextResponse(f"hello from the {running_in()}")


async def both_kinds(request: Request) -> PlainTextResponse:
    """Our task and a Starlette background task on the same response."""
    task_id = request.query_params["id"]
    add_task(gated, f"{task_id}-ours")
    return PlainTextResponse(
        "hello world", background=BackgroundTask(gated, f"{task_id}-starlette")
    )


class Header(BaseHTTPMiddleware):
    def __init__(self, app: ASGIApp, where: str) -> None:
        super().__init__(app)
        self.where = where

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = await call_next(request)
        response.headers["x-middleware"] = self.where
        return response


ROUTES = [
    Route("/async", async_endpoint),
    Route("/sync", sync_endpoint),
    Route("/background", both_kinds),
]


def build(middleware: list[Middleware]) -> Starlette:
    return Starlette(routes=ROUTES, middleware=middleware)


ours = Middleware(PostResponseMiddleware, **options())
app = with_controls(build([ours]))
inside = with_controls(build([ours, Middleware(Header, where="inside")]))
outside = with_controls(build([Middleware(Header, where="outside"), ours]))
