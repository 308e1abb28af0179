"""Django over ASGI on a real uvicorn: ORM tasks, database connections, settings."""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from asgiref.sync import ThreadSensitiveContext

from .. import postgres
from ..servers import ROOT, Server, run

# asgiref 3.13's `ThreadSensitiveContext(executor=...)`: before it, an async task's
# `sync_to_async` calls go where asgiref's routing sends them.
needs_executor_contexts = pytest.mark.skipif(
    "executor" not in inspect.signature(ThreadSensitiveContext).parameters,
    reason="asgiref < 3.13 cannot be told which thread an async task's ORM calls use",
)


BACKENDS = ["sqlite", "postgresql"]


@contextlib.contextmanager
def example_database(backend: str, directory: Path) -> Iterator[str]:
    """The example's `EXAMPLE_DATABASE`: an SQLite file in `directory`, or a new database
    on the machine's PostgreSQL (tests/postgres.py)."""
    if backend == "sqlite":
        yield str(directory / "db.sqlite3")
        return
    with postgres.new_database() as name:
        yield f"{postgres.SERVER}/{name}"


@pytest.fixture(params=BACKENDS)
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with example_database(request.param, tmp_path) as location:
        yield location


@pytest.fixture(scope="module", params=BACKENDS)
def django(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    with (
        example_database(request.param, tmp_path_factory.mktemp("django")) as location,
        run("uvicorn-h11", "django_orm:app", env={"EXAMPLE_DATABASE": location}) as server,
    ):
        yield server


def postgres_sessions(location: str, state: str | None = None) -> int | None:
    """The connections PostgreSQL has to the example's database (None on SQLite)."""
    if not location.startswith(postgres.SERVER):
        return None
    return postgres.sessions(location.rpartition("/")[2], state)


def sent_emails(server: Server, count: int) -> list[dict[str, str]]:
    """The emails the tasks recorded, once there are `count` of them (10 s at most)."""
    deadline = time.monotonic() + 10
    while True:
        sent: list[dict[str, str]] = httpx.get(f"{server.url}/emails", timeout=10).json()["sent"]
        if len(sent) >= count or time.monotonic() > deadline:
            return sent
        time.sleep(0.02)


def test_sync_and_async_tasks_use_the_orm_and_leave_no_connection_open(django: Server) -> None:
    """A sync view's sync task and an async view's async task write with the ORM after the
    response; afterwards every database connection they (or the requests) opened is closed."""
    for path in ("/signup?email=ada@example.com", "/async-signup?email=bob@example.com"):
        response = httpx.post(f"{django.url}{path}", timeout=10)
        assert (response.status_code, response.text) == (
            200,
            "Welcome! Your email is on its way.\n",
        )
    assert sent_emails(django, 2) == [
        {"to": "ada@example.com", "sent_by": "sync task"},
        {"to": "bob@example.com", "sent_by": "async task"},
    ]
    connections = django.control("connections")
    assert connections["opened"] >= 3  # the two tasks' and the /emails requests'
    assert connections["open"] == 0


def test_async_tasks_close_their_connections_even_when_persistent(database: str) -> None:
    """With persistent connections (`CONN_MAX_AGE=None`), an async task still closes the
    connection it opened: the thread its ORM calls ran in ends with it, so none could be
    reused, and it would stay open until the garbage collector found it. PostgreSQL
    itself has none left (`pg_stat_activity`)."""
    env = {"EXAMPLE_DATABASE": database, "DJANGO_CONN_MAX_AGE": "null"}
    with run("uvicorn-h11", "django_orm:app", env=env) as server:
        for email in ("ada@example.com", "bob@example.com"):
            response = httpx.post(f"{server.url}/async-signup?email={email}", timeout=10)
            assert response.status_code == 200
        deadline = time.monotonic() + 10
        while server.control("stats").get("completed", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.control("connections") == {"opened": 2, "open": 0}
        # A backend leaves pg_stat_activity just after its client closed the connection.
        while postgres_sessions(database) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert postgres_sessions(database) in (None, 0)


def test_a_sync_task_raising_generator_exit_fails_alone() -> None:
    """Under Django (whose connections wrap every task), a sync task raising GeneratorExit
    in its thread ends `failed`, and the request's next task still runs."""
    with run("uvicorn-h11", "django_app:app") as server:
        assert httpx.get(f"{server.url}/generator-exit?id=g1", timeout=10).status_code == 200
        server.control("open", id="g1-after")
        assert server.control("wait", id="g1-after")[-1] == "g1-after:end"
        output = server.output()
    assert "Task 'tests.apps.django_app.raise_generator_exit' of GET /generator-exit failed" in (
        output
    )
    assert "abandoned" not in output


@needs_executor_contexts
def test_concurrent_async_tasks_of_a_request_each_get_a_thread_of_their_own() -> None:
    """With `concurrency=2`, two async tasks of one request run their `sync_to_async` (ORM)
    calls in threads of their own: one blocked in its call does not hold up the other's."""
    with run("uvicorn-h11", "django_app:app", middleware={"concurrency": 2}) as server:
        assert httpx.get(f"{server.url}/two-tasks?id=t1", timeout=10).status_code == 200
        server.control("wait", id="t1")
        assert server.control("records", at_least="1") == ["released"]


def test_a_task_that_leaves_a_transaction_open_spoils_no_later_task(database: str) -> None:
    """A sync and an async task that never leave their `transaction.atomic()` blocks have
    their writes rolled back, each with a warning, and the next sync task, in the same
    worker thread, still uses the database. On PostgreSQL no connection is left idle in the
    transaction (holding its locks)."""
    with run("uvicorn-h11", "django_orm:app", env={"EXAMPLE_DATABASE": database}) as server:
        assert httpx.post(f"{server.url}/open-transaction?email=eve@example.com").status_code == 200
        deadline = time.monotonic() + 10
        while server.control("stats").get("completed", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert httpx.post(f"{server.url}/signup?email=ada@example.com").status_code == 200
        assert sent_emails(server, 1) == [{"to": "ada@example.com", "sent_by": "sync task"}]
        assert postgres_sessions(database, "idle in transaction") in (None, 0)
        output = server.output()
    assert output.count("A task left a transaction open on database 'default': rolled back") == 2
    assert " failed" not in output


def test_settings_give_the_defaults_and_arguments_win(django: Server) -> None:
    """`settings.POST_RESPONSE` sets options (`policy="no_error"` skips a 404's task), and the
    middleware's own arguments override it (`timeout=60` over the settings' 30)."""
    assert django.control("config") == {"timeout": 60.0, "policy": "no_error", "max_tasks": 5}
    assert httpx.get(f"{django.url}/missing", timeout=10).status_code == 404
    skipped = "Task 'examples.django_app.send_welcome_email' of GET /missing skipped"
    deadline = time.monotonic() + 10
    while skipped not in django.output() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert skipped in django.output()


def test_the_example_runs_with_its_documented_command(tmp_path: Path) -> None:
    """`python -m uvicorn examples.django_app:application` serves the example as written."""
    environ = {"EXAMPLE_DATABASE": str(tmp_path / "db.sqlite3")}
    with run("uvicorn-h11", "examples.django_app:application", env=environ) as server:
        assert (
            httpx.post(f"{server.url}/signup?email=cy@example.com", timeout=10).status_code == 200
        )
        assert sent_emails(server, 1) == [{"to": "cy@example.com", "sent_by": "sync task"}]


def run_suite(backend: str, argv: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run a Django test suite in a process of its own (configuring Django is once per
    process); on PostgreSQL in a new database it finds named in `POSTGRES_DATABASE`."""
    with contextlib.ExitStack() as stack:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if backend == "postgresql":
            env["POSTGRES_DATABASE"] = stack.enter_context(postgres.new_database())
        return subprocess.run(
            [sys.executable, *argv],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


@needs_executor_contexts
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_django_test_suite_sees_its_tasks_use_the_test_transaction(backend: str) -> None:
    """In a Django `TestCase`, the tasks of views called by Django's test client (under
    `requests_wait_for_tasks()` or `capture_tasks(run=True)`) use the test's connection:
    on PostgreSQL, a connection of their own would not see the rows the test created.
    Django's test runner runs the suite (tests/apps/django_testcase.py)."""
    done = run_suite(backend, ["-m", "tests.apps.django_testcase"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^Ran [78] tests", done.stderr, re.MULTILINE)  # 7: one skipped on Django 5


@needs_executor_contexts
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pytest_django_suite_sees_its_tasks_use_the_test_transaction(backend: str) -> None:
    """With pytest-django's `django_db` mark or `db` fixture and the pytest plugin, a view's
    tasks see the test's rows, and their writes are rolled back with the test
    (tests/doc_examples/pytest_django/). `--reuse-db`: pytest-django's test database is the
    one just made, on PostgreSQL (SQLite's is in memory)."""
    project = ROOT / "tests" / "doc_examples" / "pytest_django"
    done = run_suite(backend, ["-m", "pytest", "-q", "--reuse-db"], cwd=project)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5 passed" in done.stdout
