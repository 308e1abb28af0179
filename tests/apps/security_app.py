"""Apps whose every path adds a failing task, for log-forging tests on real servers.

Any path but `/_control/...` adds a task that fails at once, then a gated task: once the
gated one has ended, the failure has been logged. With `SECURITY_LOGGING=basic` the app
sets up `logging.basicConfig` (in the format a forged line imitates); otherwise it leaves
the server's own logging alone.

Run: python -m uvicorn tests.apps.security_app:app
     python -m waitress --listen=127.0.0.1:8000 tests.apps.security_app:wsgi_app
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

from post_response import PostResponseMiddleware, add_task
from post_response._types import Receive, Scope, Send
from post_response.wsgi import PostResponseWSGIMiddleware

from . import wsgi_control
from .control import gated, query, sync_failure, with_controls

if os.environ.get("SECURITY_LOGGING") == "basic":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")


async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    task_id = query(scope)["id"]
    add_task(sync_failure, task_id)
    add_task(gated, f"{task_id}-after")
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def wsgi_endpoint(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    task_id = wsgi_control.query(environ)["id"]
    add_task(wsgi_control.failing, task_id)
    add_task(wsgi_control.gated, f"{task_id}-after")
    start_response("200 OK", [("content-type", "text/plain"), ("content-length", "2")])
    return [b"ok"]


middleware = PostResponseMiddleware(endpoint)
app = with_controls(middleware, middleware)
wsgi_app = wsgi_control.with_controls(PostResponseWSGIMiddleware(wsgi_endpoint))
