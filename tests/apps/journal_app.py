"""A raw ASGI app with the journal on, for the journal and crash tests.

`GET /add?n=N` adds `record(N)`, a task that waits until the gate file exists, then
appends `N <pid> <replays>` to the runs file (`O_APPEND`: whole lines, whatever process
writes them). The journal file, the gate and the runs file come from environment
variables; the middleware's other options from `POST_RESPONSE_OPTIONS` (as in control.py).
`GET /volatile` adds a task that cannot be journaled, opted out with `volatile()`.
`GET /crash` adds `crash()`, which waits for the gate, records itself as task -1, then
takes the process down with `os._exit(3)`. `GET /big?n=N` adds `record(N)` with a 100 KB
argument: with `JOURNAL_FILE_SIZE` set (bytes), no file of the process may grow past it,
as on a full disk (`RLIMIT_FSIZE`), and its entry cannot be written.
"""

from __future__ import annotations

import os
import resource
import signal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import anyio

import post_response
from post_response import PostResponseMiddleware, add_task
from post_response._types import Receive, Scope, Send

from .control import options

JOURNAL = os.environ.get("JOURNAL_FILE", "journal.db")
GATE = Path(os.environ.get("JOURNAL_GATE", "gate"))
RUNS = os.environ.get("JOURNAL_RUNS", "runs.txt")
LEASE = float(os.environ.get("JOURNAL_LEASE", "10"))
MAX_REPLAYS = int(os.environ.get("JOURNAL_MAX_REPLAYS", "5"))
POLL = 0.02  # seconds between two looks at the gate file
if "JOURNAL_FILE_SIZE" in os.environ:  # a full disk: writes past it fail (EFBIG)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = int(os.environ["JOURNAL_FILE_SIZE"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


async def record(n: int, padding: str = "") -> None:
    """Wait for the gate file, then append one line saying who ran task `n`."""
    while not GATE.exists():
        await anyio.sleep(POLL)
    line = f"{n} {os.getpid()} {int(post_response.is_replay())}\n".encode()
    fd = os.open(RUNS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


async def crash() -> None:
    """A task that kills the process running it, each time it runs."""
    await record(-1)
    os._exit(3)


async def inner(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    query = parse_qs(scope.get("query_string", b"").decode())
    if scope["path"] == "/add":
        add_task(record, int(query["n"][0]))
    elif scope["path"] == "/big":
        add_task(record, int(query["n"][0]), "x" * 100_000)
    elif scope["path"] == "/crash":
        add_task(crash)
    elif scope["path"] == "/volatile":
        add_task(post_response.volatile(lambda: None))
    body = str(os.getpid()).encode()
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


settings: dict[str, Any] = {"max_running": 50, **options()}
app = PostResponseMiddleware(
    inner, journal=post_response.Journal(JOURNAL, lease=LEASE, max_replays=MAX_REPLAYS), **settings
)
