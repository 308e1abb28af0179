"""A Quart app that answers at once and sends its emails after the response.

Run: python -m uvicorn examples.quart_app:app   (from the repository root)
Try: curl -X POST "http://127.0.0.1:8000/signup?email=ada@example.com"
Try: curl -X POST "http://127.0.0.1:8000/unsubscribe?email=ada@example.com"

The emails are "sent" by appending a line to log.txt (or to the file named by
$POST_RESPONSE_EXAMPLE_LOG). `python -m hypercorn examples.quart_app:app` serves it too.
"""

from __future__ import annotations

import os

import anyio
from quart import Quart, request

from post_response import PostResponseMiddleware, add_task

LOG = os.environ.get("POST_RESPONSE_EXAMPLE_LOG", "log.txt")

app = Quart(__name__)


async def send_welcome_email(email: str) -> None:
    """An async task: awaited on the event loop."""
    async with await anyio.open_file(LOG, "a") as log:
        await log.write(f"welcome email sent to {email}\n")


def send_goodbye_email(email: str) -> None:
    """A sync task: run in a worker thread, so it may block."""
    with open(LOG, "a") as log:
        log.write(f"goodbye email sent to {email}\n")


@app.post("/signup")
async def signup() -> str:
    email = request.args["email"]
    add_task(send_welcome_email, email)
    return f"Welcome, {email}! Your email is on its way.\n"


@app.post("/unsubscribe")
def unsubscribe() -> str:
    """A sync view: Quart runs it in a worker thread, and add_task() works there too."""
    email = request.args["email"]
    add_task(send_goodbye_email, email)
    return f"Goodbye, {email}.\n"


# Wrap Quart's ASGI callable, not the Quart object, so `app.run()` and the CLI keep working.
app.asgi_app = PostResponseMiddleware(app.asgi_app)  # type: ignore[method-assign,assignment]
