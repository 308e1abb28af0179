"""A Litestar app that answers at once and sends its emails after the response.

Run: python -m uvicorn examples.litestar_app:app   (from the repository root)
Try: curl -X POST "http://127.0.0.1:8000/signup?email=ada@example.com"
Try: curl -X POST "http://127.0.0.1:8000/unsubscribe?email=ada@example.com"

The emails are "sent" by appending a line to log.txt (or to the file named by
$POST_RESPONSE_EXAMPLE_LOG).
"""

from __future__ import annotations

import os

import anyio
from litestar import Litestar, post

from post_response import PostResponseMiddleware, add_task

LOG = os.environ.get("POST_RESPONSE_EXAMPLE_LOG", "log.txt")


async def send_welcome_email(email: str) -> None:
    """An async task: awaited on the event loop."""
    async with await anyio.open_file(LOG, "a") as log:
        await log.write(f"welcome email sent to {email}\n")


def send_goodbye_email(email: str) -> None:
    """A sync task: run in a worker thread, so it may block."""
    with open(LOG, "a") as log:
        log.write(f"goodbye email sent to {email}\n")


@post("/signup")
async def signup(email: str) -> str:
    add_task(send_welcome_email, email)
    return f"Welcome, {email}! Your email is on its way.\n"


@post("/unsubscribe", sync_to_thread=True)
def unsubscribe(email: str) -> str:
    """A sync handler, run in a worker thread: add_task() works there too."""
    add_task(send_goodbye_email, email)
    return f"Goodbye, {email}.\n"


# Wrap the whole app rather than list the middleware in `Litestar(middleware=[...])`:
# Litestar builds that list into each route separately, out of reach of the lifespan
# (no draining at shutdown) and with one set of counters and limits per route.
app = PostResponseMiddleware(Litestar(route_handlers=[signup, unsubscribe]))
