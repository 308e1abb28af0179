"""A raw ASGI app whose tasks go to Celery, for tests with a real Redis and worker.

Run: CELERY_BROKER=redis://127.0.0.1:6379/13 python -m uvicorn tests.apps.celery_web:app
"""

from __future__ import annotations

from celery import Celery, group

from post_response import PostResponseMiddleware, add_task
from post_response._types import Receive, Scope, Send

from .celery_tasks import BROKER, record, record_plain
from .celery_tasks import app as celery_app
from .control import gated, options, query, with_controls

# A Celery app that knows the workers' tasks only by name, as a web process that does not
# import their code does.
by_name = Celery("web", broker=BROKER)
by_name.conf.task_default_queue = celery_app.conf.task_default_queue


class Unsendable:
    """Not something JSON (even Kombu's, which knows dates and UUIDs) can carry."""


async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    params, path, status = query(scope), scope["path"], 200
    if path == "/signup":  # a gated local task, then the Celery task: enqueued after both
        if "gate" in params:
            add_task(gated, params["gate"])
        # Named by its id, as an app names a task it wants to find in the log: the library
        # never logs the arguments themselves.
        add_task(record, params["id"]).set(name=f"record {params['id']}")
    elif path == "/signature":
        add_task(record.s(params["id"]).set(queue=celery_app.conf.task_default_queue))
    elif path == "/group":
        queue = celery_app.conf.task_default_queue
        add_task(
            group(record.s(f"{params['id']} 1"), record.s(f"{params['id']} 2")).set(queue=queue)
        )
    elif path == "/by_name":
        add_task(by_name.signature("tests.apps.celery_tasks.record_remote", args=(params["id"],)))
    elif path == "/plain":
        add_task(record_plain, params["id"])
    elif path == "/failed":
        add_task(record, params["id"])
        status = 500
    elif path == "/wrong_arguments":
        add_task(record, params["id"], "one argument too many")
    elif path == "/unserializable":
        add_task(record, Unsendable())  # a Celery task: its arguments are not checked statically
    body = b"ok"
    headers = [(b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


middleware = PostResponseMiddleware(endpoint, celery_app=celery_app, **options())
app = with_controls(middleware, middleware)
