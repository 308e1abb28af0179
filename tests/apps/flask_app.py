"""A Flask app under PostResponseWSGIMiddleware, for tests on real WSGI servers.

Run: python -m waitress --listen=127.0.0.1:8000 tests.apps.flask_app:app
"""

from __future__ import annotations

from collections.abc import Iterator

from flask import Flask, Response, request, stream_with_context

from post_response import add_task
from post_response.wsgi import PostResponseWSGIMiddleware

from .wsgi_control import failing, gated, with_controls

flask = Flask(__name__)


@flask.route("/work")
def work() -> str:
    add_task(gated, request.args["id"])
    return "hello world"


@flask.route("/fail")
def fail() -> str:
    add_task(failing, request.args["id"])
    add_task(gated, request.args["id"] + "-after")
    return "hello world"


@flask.route("/stream")
def stream() -> Response:
    """A streamed body whose generator adds the task while the server iterates it."""
    task_id = request.args["id"]

    def chunks() -> Iterator[str]:
        yield "hello"
        add_task(gated, task_id)
        yield " world"

    return Response(stream_with_context(chunks()))


flask.wsgi_app = PostResponseWSGIMiddleware(flask.wsgi_app)  # type: ignore[method-assign]
app = with_controls(flask)
