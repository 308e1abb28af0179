"""A Falcon ASGI app that answers at once and sends its emails after the response.

Run: python -m uvicorn examples.falcon_app:app   (from the repository root)
Try: curl -X POST "http://127.0.0.1:8000/signup?email=ada@example.com"
Try: curl -X POST "http://127.0.0.1:8000/unsubscribe?email=ada@example.com"

The emails are "sent" by appending a line to log.txt (or to the file named by
$POST_RESPONSE_EXAMPLE_LOG).
"""

from __future__ import annotations

import asyncio
import os

import anyio
import falcon.asgi

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


def remove_subscriber(email: str) -> None:
    """Blocking code (a database call, say) that queues a task of its own."""
    add_task(send_goodbye_email, email)


class Signup:
    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        email = req.get_param("email", required=True)
        add_task(send_welcome_email, email)
        resp.text = f"Welcome, {email}! Your email is on its way.\n"


class Unsubscribe:
    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        email = req.get_param("email", required=True)
        # asyncio.to_thread carries the request's context into the thread, so add_task()
        # works there; falcon.util.wrap_sync_to_async does not (OutsideRequestError).
        await asyncio.to_thread(remove_subscriber, email)
        resp.text = f"Goodbye, {email}.\n"


falcon_app = falcon.asgi.App()
falcon_app.add_route("/signup", Signup())
falcon_app.add_route("/unsubscribe", Unsubscribe())
# Falcon's own middleware is not ASGI middleware: wrap the ASGI app itself.
app = PostResponseMiddleware(falcon_app)
