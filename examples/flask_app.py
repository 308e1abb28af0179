"""Flask (WSGI) with post_response: the welcome email goes out after the response.

Run:  python -m waitress --listen=127.0.0.1:8000 examples.flask_app:app
Try:  curl -X POST 'http://127.0.0.1:8000/signup?email=ada@example.com'

Tasks run on the middleware's own event loop thread, so waitress's worker threads are free
as soon as the response is sent.
"""

from __future__ import annotations

import os
import time

from flask import Flask, request

from post_response import add_task
from post_response.wsgi import PostResponseWSGIMiddleware

LOG = os.environ.get("POST_RESPONSE_EXAMPLE_LOG", "log.txt")

app = Flask(__name__)


def send_welcome_email(email: str) -> None:
    time.sleep(0.1)  # stands for a slow mail server
    with open(LOG, "a") as log:
        log.write(f"welcome email sent to {email}\n")


@app.post("/signup")
def signup() -> str:
    add_task(send_welcome_email, request.args["email"])
    return "Welcome! Your email is on its way.\n"


app.wsgi_app = PostResponseWSGIMiddleware(app.wsgi_app, timeout=30)  # type: ignore[method-assign]
