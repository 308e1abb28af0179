"""A WSGI app with the journal on, for the journal tests (see journal_app.py).

`GET /add?n=N` adds `record(N)`, a sync task that waits for the gate file, then appends
`N <pid> <replay>` to the runs file. `GET /` adds nothing (a first use, to replay).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import post_response
from post_response import add_task
from post_response.wsgi import PostResponseWSGIMiddleware

JOURNAL = os.environ.get("JOURNAL_FILE", "journal.db")
GATE = Path(os.environ.get("JOURNAL_GATE", "gate"))
RUNS = os.environ.get("JOURNAL_RUNS", "runs.txt")
POLL = 0.02


def record(n: int) -> None:
    """Wait for the gate file, then append one line saying who ran task `n`."""
    while not GATE.exists():
        time.sleep(POLL)
    line = f"{n} {os.getpid()} {int(post_response.is_replay())}\n".encode()
    fd = os.open(RUNS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def inner(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if environ["PATH_INFO"] == "/add":
        add_task(record, int(query["n"][0]))
    body = str(os.getpid()).encode()
    start_response("200 OK", [("content-length", str(len(body)))])
    return [body]


app = PostResponseWSGIMiddleware(inner, journal=JOURNAL, max_running=4, shutdown_timeout=1)
