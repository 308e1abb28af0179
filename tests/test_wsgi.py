"""`PostResponseWSGIMiddleware` driven in-process: outcome policy, contexts, modes."""

from __future__ import annotations

import contextvars
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import anyio
import httpx
import pytest

from post_response import TaskHandle, TaskState, add_task
from post_response.testing import capture_tasks
from post_response.wsgi import PostResponseWSGIMiddleware

from .apps.hostile_wsgi import BODY
from .servers import ROOT, run

user: contextvars.ContextVar[str] = contextvars.ContextVar("user", default="nobody")
StartResponse = Callable[..., Any]


class Boom(Exception):
    pass


def serve(app: PostResponseWSGIMiddleware, *, read: int | None = None) -> list[bytes]:
    """Call the app as a WSGI server does: iterate the body (only `read` chunks, as when the
    client goes away), then close it; then wait for the tasks."""
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/signup", "wsgi.input": None}
    chunks: list[bytes] = []
    try:
        body = app(environ, lambda status, headers, exc_info=None: lambda data: None)
        try:
            for chunk in body:
                chunks.append(chunk)
                if read is not None and len(chunks) == read:
                    break
        finally:
            body.close()  # type: ignore[attr-defined]
    finally:
        assert app.join(10)
    return chunks


class Unreadable:
    """A response body that raises as soon as the server starts to iterate it."""

    def __iter__(self) -> Iterator[bytes]:
        raise Boom


def view(status: str = "200 OK", *, steps: Iterable[str] = (), **options: Any) -> Any:
    """A WSGI app adding a normal and an `always` task, then answering with `status`."""
    handles: list[TaskHandle] = []

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        handles.append(add_task(lambda: None).set(name="normal"))
        handles.append(add_task(lambda: None).set(name="always", always=True))
        if "raise before" in steps:
            raise Boom
        if "exc_info" in steps:
            try:
                raise Boom
            except Boom as exc:
                start_response(status, [], (Boom, exc, exc.__traceback__))
        else:
            start_response(status, [])
        return Unreadable() if "raise in __iter__" in steps else chunks()

    def chunks() -> Iterator[bytes]:
        yield b"a"
        if "raise while iterating" in steps:
            raise Boom
        yield b"b"

    middleware = PostResponseWSGIMiddleware(app, **options)
    return middleware, handles


RUN, SKIP = TaskState.COMPLETED, TaskState.SKIPPED


@pytest.mark.parametrize(
    ("status", "steps", "read", "options", "expected"),
    [
        ("200 OK", (), None, {}, RUN),
        ("404 Not Found", (), None, {}, RUN),
        ("404 Not Found", (), None, {"policy": "no_error"}, SKIP),
        ("500 Internal Server Error", (), None, {}, SKIP),
        ("200 OK", ("raise before",), None, {}, SKIP),
        ("200 OK", ("raise while iterating",), None, {}, SKIP),
        ("200 OK", ("raise in __iter__",), None, {}, SKIP),
        ("500 Internal Server Error", ("exc_info",), None, {}, SKIP),
        ("200 OK", (), 1, {}, RUN),  # the server stopped reading: the client went away
    ],
    ids=[
        "200",
        "404",
        "404 no_error",
        "500",
        "raised",
        "raised mid-body",
        "raised in __iter__",
        "exc_info",
        "gone",
    ],
)
@pytest.mark.parametrize("detach", [True, False], ids=["detached", "inline"])
def test_the_outcome_policy_is_the_asgi_one(  # noqa: PLR0917
    status: str, steps: tuple[str, ...], read: int | None, options: dict[str, Any],
    expected: TaskState, detach: bool,
) -> None:  # fmt: skip
    """The same policy as for ASGI: what the app answered and how its body went decide."""
    app, handles = view(status, steps=steps, detach=detach, **options)
    if steps and steps[0].startswith("raise"):
        with pytest.raises(Boom):
            serve(app, read=read)
    else:
        serve(app, read=read)
    assert [h.state for h in handles] == [expected, RUN]


def test_each_request_runs_in_its_own_context_and_its_tasks_see_it() -> None:
    """A value a view sets is its request's alone (the server thread is reused), and the
    task sees the value at add_task() time."""
    seen: list[str] = []

    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        seen.append(f"view saw {user.get()}")
        user.set(environ["PATH_INFO"])
        add_task(lambda: seen.append(f"task saw {user.get()}"))
        start_response("200 OK", [])
        return [b"ok"]

    middleware = PostResponseWSGIMiddleware(app)
    serve(middleware)
    serve(middleware)
    assert seen == ["view saw nobody", "task saw /signup"] * 2
    assert user.get() == "nobody"


def test_detached_tasks_run_on_the_task_loop_inline_ones_in_close() -> None:
    """Detached, tasks run in the middleware's own thread; inline, in the server's, in close()."""
    threads: dict[bool, str] = {}

    def app_for(detach: bool) -> PostResponseWSGIMiddleware:
        def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
            add_task(record, detach)
            start_response("200 OK", [])
            return [b"ok"]

        return PostResponseWSGIMiddleware(app, detach=detach)

    async def record(detach: bool) -> None:
        threads[detach] = threading.current_thread().name

    serve(app_for(True))
    serve(app_for(False))
    assert threads == {True: "post_response", False: threading.current_thread().name}


def test_capture_tasks_works_for_wsgi_apps() -> None:
    """`capture_tasks()` records WSGI requests' tasks as it does ASGI ones."""
    app, _ = view()
    with capture_tasks() as tasks:
        serve(app)
    assert [t.name for t in tasks] == ["normal", "always"]
    assert {t.state for t in tasks} == {TaskState.PENDING}
    tasks.run()
    assert {t.state for t in tasks} == {TaskState.COMPLETED}


def test_max_running_counts_tasks_not_requests() -> None:
    """With `max_running=2`, a request's four concurrent tasks run two at a time, as under
    ASGI (the bound is on tasks, across requests, not on requests)."""
    running = peak = 0
    both_in: list[anyio.Event] = []

    async def work() -> None:
        nonlocal running, peak
        if not both_in:
            both_in.append(anyio.Event())
        running += 1
        peak = max(peak, running)
        if running == 2:
            both_in[0].set()
        await both_in[0].wait()  # the first two finish only once two run together
        await anyio.sleep(0)
        running -= 1

    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        for _ in range(4):
            add_task(work)
        start_response("200 OK", [])
        return [b"ok"]

    serve(PostResponseWSGIMiddleware(app, concurrency=4, max_running=2))
    assert peak == 2


@pytest.mark.parametrize("detach", [True, False], ids=["detached", "inline"])
def test_tasks_run_when_a_server_never_closes_the_response(
    detach: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that never calls `close()` (PEP 3333 says it must) still gets the tasks
    run, once the response is collected, with a warning that names the request."""
    ran = threading.Event()

    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        add_task(ran.set)
        start_response("200 OK", [])
        return [b"ok"]

    middleware = PostResponseWSGIMiddleware(app, detach=detach)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/signup"}
    assert b"".join(middleware(environ, lambda *args: lambda data: None)) == b"ok"  # dropped
    assert ran.wait(10)
    assert "never called close() on the response of GET /signup" in caplog.text


def raise_generator_exit() -> None:
    raise GeneratorExit


def raise_stop_iteration() -> None:
    raise StopIteration


@pytest.mark.parametrize("task", [raise_generator_exit, raise_stop_iteration])
@pytest.mark.parametrize(
    "options", [{"detach": False}, {"timeout": 5.0}], ids=["inline", "detached with a timeout"]
)
def test_a_sync_task_raising_what_coroutines_treat_apart_fails_alone(
    task: Callable[[], None], options: dict[str, Any]
) -> None:
    """A sync task raising `GeneratorExit` or `StopIteration` fails, and the next one runs.
    (Carried to the coroutine awaiting the thread as an asyncio future's exception, the
    first closed the whole batch and escaped into the server, the second hung it.)"""
    handles: list[TaskHandle] = []

    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        handles.append(add_task(task))
        handles.append(add_task(lambda: None))
        start_response("200 OK", [])
        return [b"ok"]

    serve(PostResponseWSGIMiddleware(app, **options))
    assert [h.state for h in handles] == [TaskState.FAILED, TaskState.COMPLETED]


def run_script(source: str, timeout: float = 60, *options: str) -> subprocess.CompletedProcess[str]:
    """Run `source` in a Python process of its own, which must exit with 0."""
    return subprocess.run(
        [sys.executable, *options, "-c", source],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )


# A process serves a request whose task is still running, then forks, as gunicorn's master
# does with `--preload` if the app served a request while it was imported.
FORK = """
import logging, os, sys, threading
from post_response import add_task
from post_response.wsgi import PostResponseWSGIMiddleware

logging.basicConfig(format="%(process)d %(levelname)s %(message)s", level=logging.INFO)
gate, started = threading.Event(), threading.Event()

def hold(_):
    started.set()
    gate.wait(20)

def app(environ, start_response):
    add_task(hold if environ["PATH_INFO"] == "/hold" else print, "ran in child")
    start_response("200 OK", [])
    return [b"ok"]

middleware = PostResponseWSGIMiddleware(app)

def request(path):
    body = middleware({"REQUEST_METHOD": "GET", "PATH_INFO": path}, lambda *a: None)
    list(body)
    body.close()

request("/hold")
started.wait(20)
child = os.fork()
if child == 0:
    print("child joined", middleware.join(5), flush=True)
    request("/next")
    print("child joined", middleware.join(5), flush=True)
    sys.exit(0)  # through atexit, as a worker does
os.waitpid(child, 0)
gate.set()
print("parent joined", middleware.join(20), flush=True)
"""


# Another thread of the parent is inside add_task() (it holds the lock that guards task
# lists) at the moment of the fork; the child then serves a request that adds a task.
FORK_WITH_THE_LOCK_HELD = """
import os, signal, sys, threading
from post_response import _context, add_task
from post_response.wsgi import PostResponseWSGIMiddleware

def app(environ, start_response):
    add_task(print, "ran in child")
    start_response("200 OK", [])
    return [b"ok"]

middleware = PostResponseWSGIMiddleware(app)
held, release = threading.Event(), threading.Event()

def hold_the_lock():
    with _context._lock:
        held.set()
        release.wait(20)

threading.Thread(target=hold_the_lock).start()
held.wait(20)
child = os.fork()
if child == 0:
    signal.alarm(20)  # a deadlock ends the child, not the test
    body = middleware({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, lambda *a: None)
    list(body)
    body.close()
    print("child joined", middleware.join(5), flush=True)
    sys.exit(0)
_, status = os.waitpid(child, 0)
release.set()
print("child exit status", os.waitstatus_to_exitcode(status), flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
def test_a_child_forked_while_a_task_list_was_locked_serves_requests() -> None:
    result = run_script(FORK_WITH_THE_LOCK_HELD, 60, "-W", "ignore::DeprecationWarning")
    assert sorted(result.stdout.splitlines()) == [
        "child exit status 0",
        "child joined True",
        "ran in child",
    ], result.stdout + result.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
def test_a_forked_child_runs_its_own_tasks_and_none_of_its_parents() -> None:
    """After a fork, the child neither waits for nor reports the parent's running task, and
    starts a task loop of its own without taking the parent's for a dead one."""
    result = run_script(FORK, 60, "-W", "ignore::DeprecationWarning")
    output = result.stdout + result.stderr
    assert sorted(output.splitlines()) == [
        "child joined True",
        "child joined True",
        "parent joined True",
        "ran in child",
    ], output


# The first request's task loop cannot start: every file descriptor is taken (a flood of
# connections), so its event loop gets none. Once some are free, the next request's can.
# What the scripts below share: an app adding one task, and a request to it with no server.
ONE_TASK = """
import atexit, logging, os, resource
from post_response import add_task
from post_response.wsgi import PostResponseWSGIMiddleware

logging.basicConfig(format="%(levelname)s %(message)s", level=logging.INFO)

def app(environ, start_response):
    add_task(print, "task ran")
    start_response("200 OK", [])
    return [b"ok"]

middleware = PostResponseWSGIMiddleware(app)

def request():
    body = middleware({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, lambda *a: None)
    list(body)
    body.close()
"""


NO_DESCRIPTORS = (
    ONE_TASK
    + """

resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
taken = []
try:
    while True:
        taken.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
request()
print("first request closed", flush=True)
for descriptor in taken:
    os.close(descriptor)
request()
print("joined", middleware.join(10), flush=True)
"""
)


@pytest.mark.skipif(sys.platform == "win32", reason="needs the resource module")
def test_a_task_loop_that_cannot_start_fails_its_request_and_the_next_one_starts() -> None:
    """A task loop that cannot start abandons the request's tasks, logged, instead of
    leaving the server's thread waiting for it forever; the next request starts one."""
    result = run_script(NO_DESCRIPTORS, 30)
    output = result.stdout + result.stderr
    assert "RuntimeError: post_response could not start its task loop" in output
    assert "Task 'builtins.print' of GET / abandoned: post_response could not run them" in output
    assert "first request closed\ntask ran\njoined True\n" in result.stdout


# A request ends after the task loop has shut down at exit, as on a server whose threads
# still serve while the interpreter exits (waitress's are daemons). The hook is registered
# before the task loop starts, so it runs after the loop's own (atexit runs them in reverse).
AFTER_SHUTDOWN = (
    ONE_TASK
    + """

@atexit.register
def late():
    request()
    print("joined", middleware.join(5), flush=True)

request()
print("joined", middleware.join(5), flush=True)
"""
)


def test_a_request_ending_after_the_shutdown_at_exit_has_its_tasks_abandoned() -> None:
    """After the task loop shut down at exit, a request's tasks are logged as abandoned
    (no new loop is started for them) and `join()` returns at once."""
    result = run_script(AFTER_SHUTDOWN)
    assert result.stdout == "task ran\njoined True\njoined True\n"
    assert result.stderr == (
        "ERROR Task 'builtins.print' of GET / abandoned: the server had already shut down\n"
    )


def test_a_body_of_one_chunk_keeps_the_content_length_the_server_gives_it() -> None:
    """A body of one chunk without a Content-Length (`[body]`) gets one from waitress, as
    PEP 3333 allows (`len(body) == 1`), through the middleware as without it: not chunked."""
    with run("waitress", "hostile_wsgi:app") as server:
        response = httpx.get(f"{server.url}/unsized/x", timeout=10)
    assert response.content == BODY
    assert response.headers.get("content-length") == str(len(BODY))
    assert "transfer-encoding" not in response.headers
