"""FastAPI's "Background Tasks" tutorial, ported to `add_task`.

Run: python -m uvicorn examples.fastapi_app:app   (from the repository root)
Try: curl -X POST "http://127.0.0.1:8000/send-notification/ada@example.com?q=hello"

No `BackgroundTasks` parameter to thread through the endpoint and its dependencies. The
response comes back at once; then the dependency's task appends "found query: hello" to
log.txt (or to the file named by $POST_RESPONSE_EXAMPLE_LOG), and the endpoint's task
appends the notification: tasks run in the order they were added.
"""

from __future__ import annotations

import os
from typing import Annotated

from fastapi import Depends, FastAPI

from post_response import PostResponseMiddleware, add_task

LOG = os.environ.get("POST_RESPONSE_EXAMPLE_LOG", "log.txt")

app = FastAPI()
# Skip the tasks of a request that failed (4xx or 5xx), and give up on a task after 30 s.
# Add it last: each add_middleware() goes outside the others, and this one must see the
# real end of each response.
app.add_middleware(PostResponseMiddleware, policy="no_error", timeout=30)


def write_log(message: str) -> None:
    with open(LOG, mode="a") as log:
        log.write(message)


def write_notification(email: str, message: str = "") -> None:
    write_log(f"notification for {email}: {message}\n")


def get_query(q: str | None = None) -> str | None:
    if q:
        add_task(write_log, f"found query: {q}\n")
    return q


@app.post("/send-notification/{email}")
async def send_notification(
    email: str, q: Annotated[str | None, Depends(get_query)]
) -> dict[str, str]:
    add_task(write_notification, email, message="some notification")
    return {"message": "Notification sent in the background"}
