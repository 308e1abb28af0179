"""What the framework integration tests share: gated tasks, events, and the examples.

Ordering is proven with gates (see tests/apps/control.py): a gated task cannot end before
the test opens its gate, and the test opens it only once the client holds the whole
response. The examples have no gates; their tests check the effects the tasks leave in the
example's log file.
"""

from __future__ import annotations

import ast
import contextlib
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from ..servers import ROOT, Server, run

LOG_LIMIT = 10.0  # seconds an example's tasks may take to write their lines


def new_id() -> str:
    return uuid.uuid4().hex[:8]


def get(server: Server, path: str) -> httpx.Response:
    """Send a GET and read the whole response."""
    return httpx.get(f"{server.url}{path}", timeout=10)


def events_of(server: Server, prefix: str) -> list[str]:
    """The events so far whose name starts with `prefix` (one request's, say)."""
    return [e for e in server.control("events") if e.startswith(prefix)]


def assert_ran_after_response(server: Server, task_id: str) -> None:
    """The task started after the response and waits on its gate; opened, it runs to its end."""
    server.control("until", event=f"{task_id}:start")
    assert f"{task_id}:end" not in server.control("events")
    server.control("open", id=task_id)
    assert server.control("wait", id=task_id) == [f"{task_id}:start", f"{task_id}:end"]


@dataclass
class Example:
    """An example app served as its docstring says, writing its tasks' lines to `log`."""

    server: Server
    log: Path
    tries: list[tuple[str, str]]  # (method, path) of each documented curl command


RUN = re.compile(r"^Run: python -m uvicorn (\S+)", re.MULTILINE)
TRY = re.compile(r'^Try: curl(?: -X (\w+))? "http://127\.0\.0\.1:8000(/[^"]*)"', re.MULTILINE)


@contextlib.contextmanager
def serve_example(name: str, tmp: Path) -> Iterator[Example]:
    """Serve `examples/<name>.py` with the command its docstring gives, on a real uvicorn."""
    source = (ROOT / "examples" / f"{name}.py").read_text()
    docstring = ast.get_docstring(ast.parse(source)) or ""
    command = RUN.search(docstring)
    assert command is not None, f"examples/{name}.py does not say how to run it"
    tries = [(method or "GET", path) for method, path in TRY.findall(docstring)]
    assert tries, f"examples/{name}.py has no curl command to try it"
    log = tmp / f"{name}.log"
    with run("uvicorn-h11", command[1], env={"POST_RESPONSE_EXAMPLE_LOG": str(log)}) as server:
        yield Example(server, log, tries)


def wait_for_lines(log: Path, count: int) -> list[str]:
    """The log's lines once it has `count` of them (polled, for at most LOG_LIMIT seconds)."""
    deadline = time.monotonic() + LOG_LIMIT
    lines: list[str] = []
    while time.monotonic() < deadline:
        lines = log.read_text().splitlines() if log.exists() else []
        if len(lines) >= count:
            return lines
        time.sleep(0.02)
    raise AssertionError(f"{log} has {lines} after {LOG_LIMIT}s; expected {count} lines")


def check_example(example: Example, expected: list[list[str]]) -> list[httpx.Response]:
    """Try each documented curl command in turn; each must succeed and its tasks must then
    append their lines (`expected[i]` for the i-th command) to the log, in order."""
    assert len(expected) == len(example.tries)
    responses, written = [], []
    for (method, path), lines in zip(example.tries, expected, strict=True):
        response = httpx.request(method, f"{example.server.url}{path}", timeout=10)
        assert response.is_success, (path, response.status_code, response.text)
        responses.append(response)
        written += lines
        assert wait_for_lines(example.log, len(written)) == written
    return responses


def assert_framework_task_then_ours(server: Server, theirs: str, ours: str) -> None:
    """After the response, the framework's own gated background task `theirs` runs; ours
    waits until it has ended (the app has not returned), even with its gate open."""
    server.control("until", event=f"{theirs}:start")
    assert f"{ours}:start" not in server.control("events")
    server.control("open", id=ours)
    server.control("open", id=theirs)
    server.control("wait", id=ours)
    events = [e for e in server.control("events") if e.startswith((f"{theirs}:", f"{ours}:"))]
    assert events == [f"{theirs}:start", f"{theirs}:end", f"{ours}:start", f"{ours}:end"]
