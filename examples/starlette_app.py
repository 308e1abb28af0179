"""A Starlette app that answers at once and sends its emails after the response.

Run: python -m uvicorn examples.starlette_app:app   (from the repository root)
Try: curl -X POST "http://127.0.0.1:8000/signup?email=ada@example.com"
Try: curl -X POST "http://127.0.0.1:8000/unsubscribe?email=ada@example.com"

The emails are "sent" by appending a line to log.txt (or to the file named by
$POST_RESPONSE_EXAMPLE_LOG).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from post_response import PostResponseMiddleware, add_task

if TYPE_CHECKING:
    from starlette.requests import Request

LOG = os.environ.get("POST_RESPONSE_EXAMPLE_LOG", "log.txt")


async def send_welcome_email(email: str) -> None:
    """An async task: awaited on the event loop."""
    async with await anyio.open_file(LOG, "a") as log:
        await log.write(f"welcome email sent to {email}\n")


def send_goodbye_email(email: str) -> None:
    """A sync task: run in a worker thread, so it may block."""
    with open(LOG, "a") as log:
        log.write(f"goodbye email sent to {email}\n")


async def signup(request: Request) -> PlainTextResponse:
    email = request.query_params["email"]
    add_task(send_welcome_email, email)
    return PlainTextResponse(f"Welcome, {email}! Your email is on its way.\n")


def unsubscribe(request: Request) -> PlainTextResponse:
    """A sync endpoint: Starlette runs it in a worker thread, and add_task() works there too."""
    email = request.query_params["email"]
    add_task(send_goodbye_email, email)
    return PlainTextResponse(f"Goodbye, {email}.\n")


app = Starlette(
    routes=[
        Route("/signup", signup, methods=["POST"]),
        Route("/unsubscribe", unsubscribe, methods=["POST"]),
    ],
    # Keep it first (outermost) as you add others: it must see the real end of each response.
    middleware=[Middleware(PostResponseMiddleware)],
)
