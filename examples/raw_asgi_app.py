"""A bare ASGI app: it answers at once and sends its email after the response.

Run: python -m uvicorn examples.raw_asgi_app:app   (from the repository root)
Try: curl -X POST "http://127.0.0.1:8000/signup?email=ada@example.com"

The email is "sent" by appending a line to log.txt (or to the file named by
$POST_RESPONSE_EXAMPLE_LOG).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

import anyio

from post_response import PostResponseMiddleware, add_task

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

LOG = os.environ.get("POST_RESPONSE_EXAMPLE_LOG", "log.txt")


async def send_welcome_email(email: str) -> None:
    async with await anyio.open_file(LOG, "a") as log:
        await log.write(f"welcome email sent to {email}\n")


async def respond(send: Send, status: int, text: str) -> None:
    body = text.encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def signup_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return  # the middleware answers the lifespan protocol for an app that does not
    emails = parse_qs(scope["query_string"].decode()).get("email")
    if scope["method"] != "POST" or scope["path"] != "/signup" or not emails:
        await respond(send, 404, "Try POST /signup?email=...\n")
        return
    add_task(send_welcome_email, emails[0])
    await respond(send, 200, f"Welcome, {emails[0]}! Your email is on its way.\n")


app = PostResponseMiddleware(signup_app)
