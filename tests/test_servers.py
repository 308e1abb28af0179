"""The server matrix: uvicorn (h11, httptools), hypercorn (asyncio, trio), daphne, granian.

Each server runs as a real process on 127.0.0.1 (see servers.py); tasks wait on gates
that the test opens over HTTP only once the client holds the response.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator

import httpx
import pytest

from .servers import ASGI_SERVERS, Connection, Server, exit_code_after, run

WITH_LIFESPAN = [
    "uvicorn-h11",
    "uvicorn-httptools",
    "hypercorn-asyncio",
    "hypercorn-trio",
    "granian",
]
# hypercorn cancels lingering request coroutines after --graceful-timeout (3 s by default);
# the tasks run detached, but give the tests' own requests room to finish.
GRACEFUL = {
    "hypercorn-asyncio": ["--graceful-timeout", "30"],
    "hypercorn-trio": ["--graceful-timeout", "30"],
}


def new_id() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="module", params=ASGI_SERVERS)
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    with run(request.param, "raw_app:app") as started:
        yield started


class TestMatrix:
    """What must hold on every server."""

    def test_the_client_holds_the_response_before_the_task_ends(self, server: Server) -> None:
        """The whole response arrives while the task waits on its gate; then the task ends."""
        task_id = new_id()
        response = httpx.get(f"{server.url}/work?id={task_id}&shape=chunked", timeout=10)
        assert (response.status_code, response.text) == (200, "hello world")
        assert f"{task_id}:end" not in server.control("events")
        server.control("open", id=task_id)
        assert server.control("wait", id=task_id) == [f"{task_id}:start", f"{task_id}:end"]

    def test_keep_alive_serves_the_next_request_while_a_task_runs(self, server: Server) -> None:
        """A second request on the same connection is answered while the first one's task runs."""
        first, second = new_id(), new_id()
        connection = Connection(server)
        try:
            assert connection.request("GET", f"/work?id={first}") == (200, b"hello world")
            server.control("until", event=f"{first}:start")
            assert connection.request("GET", f"/work?id={second}") == (200, b"hello world")
            assert f"{first}:end" not in server.control("events")  # still running
        finally:
            connection.close()
            for task_id in (first, second):
                server.control("open", id=task_id)
        assert server.control("wait", id=first)[-1] == f"{first}:end"

    @pytest.mark.parametrize("kind", ["async", "sync"])
    def test_a_failing_task_keeps_the_connection_and_reaches_the_log(
        self, server: Server, kind: str
    ) -> None:
        """The next request on the same connection is answered, and the server's output (its
        default logging) has the failure with the task's name, the request and the traceback."""
        task_id = new_id()
        connection = Connection(server)
        try:
            query = f"id={task_id}" + ("&sync=1" if kind == "sync" else "")
            assert connection.request("GET", f"/fail?{query}") == (200, b"hello world")
            if kind == "async":
                server.control("open", id=task_id)
            server.control("open", id=f"{task_id}-after")
            # The failed task is over and the next one ran: uvicorn would have closed the
            # connection by now had the exception escaped the app.
            assert server.control("wait", id=f"{task_id}-after")[-1] == f"{task_id}-after:end"
            assert connection.request("GET", "/work?id=-&shape=bare") == (200, b"")
        finally:
            connection.close()
            server.control("open", id="-")
        task = "tests.apps.control." + ("sync_failure" if kind == "sync" else "gated_failure")
        output = server.output()
        assert f"Task '{task}' of GET /fail failed" in output
        assert "Traceback (most recent call last):" in output
        assert f"ValueError: boom {task_id}" in output


def sigterm_while_a_task_runs(
    server_name: str, seconds: float, shutdown_timeout: float
) -> tuple[str, str]:
    """Start a task of `seconds`, send SIGTERM once it runs, wait for the process to exit by
    itself; return the task's id and the server's output."""
    task_id = new_id()
    options = {"shutdown_timeout": shutdown_timeout}
    graceful = GRACEFUL.get(server_name, [])
    with run(server_name, "raw_app:app", *graceful, middleware=options) as server:
        response = httpx.get(f"{server.url}/sleep?id={task_id}&seconds={seconds}", timeout=10)
        assert response.status_code == 200
        server.control("until", event=f"{task_id}:start")
        exit_code_after(server, signal.SIGTERM, limit=shutdown_timeout + 15)
        return task_id, server.output()


@pytest.mark.parametrize("server_name", WITH_LIFESPAN)
def test_sigterm_waits_for_a_running_task_then_exits(server_name: str) -> None:
    """On SIGTERM the server's lifespan shutdown waits for the task; the process exits by itself."""
    task_id, output = sigterm_while_a_task_runs(server_name, seconds=2, shutdown_timeout=30)
    assert f"event: {task_id}:end" in output, output
    assert "cancelled" not in output
    assert "abandoned" not in output


@pytest.mark.parametrize("server_name", WITH_LIFESPAN)
def test_sigterm_cancels_a_task_longer_than_shutdown_timeout(server_name: str) -> None:
    """Past `shutdown_timeout` the task is cancelled, the log names it, and the process exits."""
    task_id, output = sigterm_while_a_task_runs(server_name, seconds=600, shutdown_timeout=1)
    assert f"event: {task_id}:cancelled" in output, output
    assert "shutdown_timeout=1.0s reached; cancelling 1 running tasks" in output
    assert "Task 'tests.apps.control.sleeper' of GET /sleep cancelled while running" in output


@pytest.mark.parametrize(
    ("detach", "statuses"), [(True, [200] * 6), (False, [200] * 3 + [503] * 3)]
)
def test_detached_tasks_do_not_count_against_limit_concurrency(
    detach: bool, statuses: list[int]
) -> None:
    """`uvicorn --limit-concurrency 3`: with detached tasks, six requests whose tasks still run
    all get 200; inline, the requests linger with their tasks and the fourth gets 503."""
    ids = [new_id() for _ in range(6)]
    options = {"detach": detach}
    with run(
        "uvicorn-h11", "raw_app:app", "--limit-concurrency", "3", middleware=options
    ) as server:
        got = [httpx.get(f"{server.url}/work?id={i}", timeout=10).status_code for i in ids]
        if detach:
            for task_id in ids:
                server.control("open", id=task_id)
            assert [server.control("wait", id=i)[-1] for i in ids] == [f"{i}:end" for i in ids]
        else:
            server.process.kill()  # its three requests wait on gates nobody can open now
    assert got == statuses


def test_daphne_lets_a_task_run_past_its_application_close_timeout() -> None:
    """daphne cancels an application 10 s after its response; a detached 13 s task finishes."""
    task_id = new_id()
    with run("daphne", "raw_app:app") as server:
        assert (
            httpx.get(f"{server.url}/sleep?id={task_id}&seconds=13", timeout=10).status_code == 200
        )
        assert server.control("wait", id=task_id) == [f"{task_id}:start", f"{task_id}:end"]


def test_daphne_logs_the_tasks_it_abandons_at_sigterm() -> None:
    """daphne has no lifespan and stops at once on SIGTERM: the task still running is not lost
    silently, it is logged as abandoned when the process exits."""
    task_id = new_id()
    with run("daphne", "raw_app:app") as server:
        assert (
            httpx.get(f"{server.url}/sleep?id={task_id}&seconds=600", timeout=10).status_code == 200
        )
        server.control("until", event=f"{task_id}:start")
        exit_code_after(server, signal.SIGTERM, limit=15)
        output = server.output()
    assert (
        "Task 'tests.apps.control.sleeper' of GET /sleep abandoned: "
        "the process exited while it was running"
    ) in output


def test_granian_pathsend_file_response_runs_its_tasks() -> None:
    """A Starlette FileResponse under granian ends with `http.response.pathsend`; tasks run."""
    task_id = new_id()
    with run("granian", "starlette_app:app") as server:
        response = httpx.get(f"{server.url}/file?id={task_id}", timeout=10)
        assert (response.status_code, response.text) == (200, "hello world")
        assert f"{task_id}:pathsend offered=True" in server.control("events")
        server.control("open", id=task_id)
        assert server.control("wait", id=task_id)[-2:] == [f"{task_id}:start", f"{task_id}:end"]
