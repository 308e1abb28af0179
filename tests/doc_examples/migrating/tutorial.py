"""FastAPI's Background Tasks tutorial (tutorial002), moved from `BackgroundTasks` to
`add_task()`, with an async task and one slower than the request."""

from __future__ import annotations

import os
from typing import Annotated

import anyio
from fastapi import Depends, FastAPI

from post_response import PostResponseMiddleware, add_task

LOG = os.environ.get("TUTORIAL_LOG", "log.txt")

app = FastAPI()
app.add_middleware(PostResponseMiddleware)


def write_log(message: str) -> None:
    with open(LOG, mode="a") as log:
        log.write(message)


async def write_log_later(message: str) -> None:
    await anyio.sleep(0.01)  # still writing when the response has long been sent
    write_log(message)


def get_query(q: str | None = None) -> str | None:
    if q:
        add_task(write_log, f"found query: {q}\n")
    return q


@app.post("/send-notification/{email}")
async def send_notification(
    email: str, q: Annotated[str | None, Depends(get_query)]
) -> dict[str, str]:
    add_task(write_log_later, f"message to {email}\n")
    return {"message": "Message sent"}
