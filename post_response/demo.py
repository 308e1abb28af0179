"""See post_response at work: a real uvicorn, a few requests, their tasks after the responses.

    python -m post_response.demo            # prints a timeline and exits
    python -m post_response.demo --serve    # keeps the server up, to try it with curl

The app's endpoint calls `add_task(send_welcome_email, user)`; the task takes about a
second (a slow mail server). The timeline shows each response reaching the client at
once, and each task starting only after its response, then finishing a second later.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

import anyio

from post_response import PostResponseMiddleware, add_task

if TYPE_CHECKING:
    from post_response._types import Receive, Scope, Send

USERS = ("ada", "grace", "linus")
TASK_SECONDS = 1.0
DEADLINE = 15.0  # seconds the whole demo may take before it gives up

_start = time.perf_counter()
_print_lock = threading.Lock()
_finished: list[str] = []
_all_finished = threading.Event()


def timeline(who: str, what: str) -> None:
    """Print one line of the timeline: seconds since the start, who, what happened."""
    with _print_lock:
        print(f"{time.perf_counter() - _start:7.3f}s  {who:<8} {what}", flush=True)


async def send_welcome_email(user: str) -> None:
    """The slow part of a signup, which the user should not wait for."""
    timeline("task", f"send_welcome_email({user!r}) started")
    await anyio.sleep(TASK_SECONDS)  # a slow mail server
    timeline("task", f"send_welcome_email({user!r}) finished")
    _finished.append(user)
    if len(_finished) == len(USERS):
        _all_finished.set()


async def signup(scope: Scope, receive: Receive, send: Send) -> None:
    """`GET /signup?user=ada`: answer at once, send the welcome email afterwards."""
    if scope["type"] != "http":
        return
    user = parse_qs(scope["query_string"].decode()).get("user", ["someone"])[0]
    add_task(send_welcome_email, user)
    body = f"Welcome, {user}! Your email is on its way.\n".encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    timeline("app", "response sent; its task runs once the app returns")


app = PostResponseMiddleware(signup)


def run_timeline() -> int:
    """Serve the app on a free port, send the requests, print what happens when."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    print(f"uvicorn is serving the demo app on http://127.0.0.1:{port}\n")
    try:
        for user in USERS:
            timeline("client", f"GET /signup?user={user}")
            sent = time.perf_counter()
            status, body = _get(port, f"/signup?user={user}")
            took = (time.perf_counter() - sent) * 1000
            timeline("client", f"got {status} after {took:.0f} ms: {body.strip()!r}")
        responded = time.perf_counter() - _start
        if not _all_finished.wait(DEADLINE):
            print("\nThe tasks did not finish in time.", file=sys.stderr)
            return 1
        finished = time.perf_counter() - _start
    finally:
        server.should_exit = True
        thread.join(DEADLINE)
    print(
        f"\nAll {len(USERS)} responses were in the client's hands after {responded:.3f}s;"
        f"\ntheir tasks finished after {finished:.3f}s. Nobody waited for an email."
    )
    return 0


def _get(port: int, path: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def serve(port: int) -> int:
    """Keep the server up until Ctrl+C."""
    import uvicorn

    print(
        f"Try: curl 'http://127.0.0.1:{port}/signup?user=ada'\n"
        "curl returns at once; the task lines appear here after the response. Ctrl+C stops.\n"
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="info", lifespan="off")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m post_response.demo", description=__doc__)
    parser.add_argument("--serve", action="store_true", help="keep the server up for curl")
    parser.add_argument("--port", type=int, default=8000, help="port for --serve (8000)")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("uvicorn") is None:
        print("The demo runs on uvicorn: pip install 'post_response[demo]'", file=sys.stderr)
        return 2
    return serve(args.port) if args.serve else run_timeline()


if __name__ == "__main__":
    sys.exit(main())
