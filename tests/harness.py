"""A small raw ASGI harness: drive an app with one request and record, in order, what happened.

The app under test, its tasks and the harness all append to the same `log`, so a test
can assert on the order of sends and task steps. It proves ordering inside the process;
"the client already holds the response" is proven on a real server (test_uvicorn.py).
"""

from __future__ import annotations

from typing import Any

import anyio

from post_response import PostResponseMiddleware
from post_response._types import ASGIApp, Message, Scope

DETACH = True  # how `wrap()` builds the middleware; the `detach` fixture switches it


def wrap(app: ASGIApp, **options: Any) -> PostResponseMiddleware:
    """`PostResponseMiddleware(app, **options)`, detached or inline as the test runs."""
    return PostResponseMiddleware(app, **{"detach": DETACH, **options})


class Exchange:
    """One HTTP exchange with an ASGI app, and the ordered log of what happened."""

    def __init__(self, log: list[str] | None = None, *, client_gone: bool = False) -> None:
        self.log: list[str] = [] if log is None else log
        self.sent: list[Message] = []
        self.client_gone = client_gone
        self._received_request = False

    async def receive(self) -> Message:
        if not self._received_request:
            self._received_request = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if not self.client_gone:
            await anyio.sleep_forever()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        more = " more" if message.get("more_body") or message.get("more_trailers") else ""
        self.log.append(f"send {message['type']}{more}")

    async def run(self, app: ASGIApp, scope: Scope | None = None, **scope_items: Any) -> None:
        """Run the exchange; then, if `app` is the middleware, wait until its tasks ended."""
        try:
            await app(
                http_scope(**scope_items) if scope is None else scope, self.receive, self.send
            )
        finally:
            if isinstance(app, PostResponseMiddleware):
                await app.join()

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])


def http_scope(method: str = "GET", path: str = "/", **items: Any) -> Scope:
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "extensions": {},
    }
    scope.update(items)
    return scope
