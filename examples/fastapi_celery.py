"""FastAPI + Celery: the same `add_task()` call, the work done by a Celery worker.

Start Redis, a worker and the web app (from the repository root):

    redis-server --daemonize yes --bind 127.0.0.1 --save ''
    python -m celery -A examples.fastapi_celery:celery_app worker --pool=solo --loglevel=INFO
    python -m uvicorn examples.fastapi_celery:app

Try:  curl -X POST 'http://127.0.0.1:8000/signup?email=ada@example.com'

The response comes at once. After it is sent, the middleware enqueues the Celery task
(only if the request succeeded); the worker process sends the email. Swap the decorator
for a plain function and the same call runs it in the web process instead.
"""

from __future__ import annotations

import os

from celery import Celery
from fastapi import FastAPI

from post_response import PostResponseMiddleware, add_task

BROKER = os.environ.get("CELERY_BROKER", "redis://127.0.0.1:6379/0")
LOG = os.environ.get("POST_RESPONSE_EXAMPLE_LOG", "log.txt")

celery_app = Celery("example", broker=BROKER)
celery_app.conf.broker_connection_retry_on_startup = True


@celery_app.task
def send_welcome_email(email: str) -> None:
    """Runs in the Celery worker: durable, retried, on any host that reaches the broker."""
    with open(LOG, "a") as log:
        log.write(f"welcome email sent to {email} by the Celery worker\n")


app = FastAPI()
app.add_middleware(PostResponseMiddleware, policy="no_error")


@app.post("/signup")
async def signup(email: str) -> dict[str, str]:
    add_task(send_welcome_email, email)  # enqueued after the response, not called here
    return {"message": "Welcome! Your email is on its way."}
