"""A Django project's own test suite, run by Django's test runner in a process of its own
(tests/integrations/test_django.py): views whose tasks use the ORM, tested with Django's
test client inside `TestCase`, whose transaction the tasks must see into.

Run: python -m tests.apps.django_testcase
(POSTGRES_DATABASE=name: on the machine's PostgreSQL, in that existing, empty database)
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
import unittest

import django
from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="tests-only",
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["testserver"],
    MIDDLEWARE=[],
    INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth"],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
    if "POSTGRES_DATABASE" not in os.environ
    else {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": "postgres",  # where Django connects from to set the test database up
            "USER": "postgres",
            "HOST": "127.0.0.1",
            "TEST": {"NAME": os.environ["POSTGRES_DATABASE"]},
        }
    },
    DEFAULT_AUTO_FIELD="django.db.models.AutoField",
)
django.setup()

from asgiref.sync import sync_to_async  # noqa: E402
from django.contrib.auth.models import User  # noqa: E402
from django.db import connection, transaction  # noqa: E402
from django.http import HttpRequest, HttpResponse  # noqa: E402
from django.test import TestCase, override_settings  # noqa: E402
from django.test.utils import get_runner  # noqa: E402
from django.urls import path  # noqa: E402

from post_response import TaskHandle, TaskState, add_task  # noqa: E402
from post_response.testing import capture_tasks, requests_wait_for_tasks  # noqa: E402
from tests.doc_examples.pytest_django.shop import (  # noqa: E402  (the pytest-django suite's views)
    deactivate,
    leave,
)

# Django 5's `AsyncClient` sends `request_started` with `Signal.asend()`, which runs the
# receivers in a task of its own: the request's task list they set never reaches the view.
ASYNC_CLIENT_SIGNALS = "Django < 6.0: AsyncClient's request_started runs in a task of its own"


class Refused(Exception):
    pass


def join(request: HttpRequest) -> HttpResponse:
    """The README's `transaction.on_commit` example: no task when the transaction rolls back."""
    try:
        with transaction.atomic():
            User.objects.create(username=request.GET["username"])
            transaction.on_commit(functools.partial(add_task, deactivate, request.GET["username"]))
            if "refuse" in request.GET:
                raise Refused
    except Refused:
        return HttpResponse("Refused.", status=400)
    return HttpResponse("Welcome!")


def join_and_leave_open(username: str) -> None:
    """A task that writes in a `transaction.atomic()` block it never leaves."""
    transaction.atomic().__enter__()
    User.objects.create(username=username)


async def join_and_leave_open_async(username: str) -> None:
    await sync_to_async(join_and_leave_open)(username)


def careless(request: HttpRequest) -> HttpResponse:
    add_task(join_and_leave_open, "sync-task")
    add_task(join_and_leave_open_async, "async-task")
    return HttpResponse("Welcome!")


def fail_to_join(username: str) -> None:
    """A task whose write fails (the user exists), after one that went through."""
    User.objects.create(username=f"{username}-first")
    User.objects.create(username=username)


async def fail_to_join_async(username: str) -> None:
    await sync_to_async(fail_to_join)(username)


def fail_a_query() -> None:
    """A task whose raw query fails (on PostgreSQL, that aborts the transaction)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM no_such_table")


def failing(request: HttpRequest) -> HttpResponse:
    add_task(fail_to_join, "ada")
    add_task(fail_to_join_async, "ADA")
    add_task(fail_a_query)
    return HttpResponse("Welcome!")


IN_A_BLOCK = threading.Event()
QUICK: list[TaskHandle] = []


def join_in_a_block(username: str) -> None:
    """Writes in an atomic block it leaves once the quick task has ended (10 s at most)."""
    with transaction.atomic():
        User.objects.create(username=username)
        IN_A_BLOCK.set()
        deadline = time.monotonic() + 10
        while QUICK[0].state is not TaskState.COMPLETED and time.monotonic() < deadline:
            time.sleep(0.01)


def quick() -> None:
    """Ends while `join_in_a_block` is in its atomic block (10 s at most)."""
    IN_A_BLOCK.wait(10)


def two_at_once(request: HttpRequest) -> HttpResponse:
    add_task(join_in_a_block, "in-a-block")
    QUICK[:] = [add_task(quick)]
    return HttpResponse("Welcome!")


urlpatterns = [
    path("leave", leave),
    path("join", join),
    path("careless", careless),
    path("two-at-once", two_at_once),
    path("failing", failing),
]


class TasksInATestCase(TestCase):
    """Tasks of views called by Django's test client, in a `TestCase`'s transaction."""

    def setUp(self) -> None:
        User.objects.create(username="ada")
        User.objects.create(username="ADA")

    def assert_deactivated(self) -> None:
        active = User.objects.filter(is_active=True).values_list("username", flat=True)
        assert list(active) == []

    def test_requests_wait_for_tasks_runs_them_in_the_test_transaction(self) -> None:
        """Under `requests_wait_for_tasks()`, a sync and an async task see and change the
        rows the test created in its transaction."""
        with requests_wait_for_tasks():
            assert self.client.get("/leave", {"username": "ada"}).status_code == 200
        self.assert_deactivated()

    def test_captured_tasks_run_in_the_test_transaction(self) -> None:
        """`tasks.run()` runs captured ORM tasks in the test's transaction too."""
        with capture_tasks(run=True):
            self.client.get("/leave", {"username": "ada"})
        self.assert_deactivated()

    def test_tasks_added_on_commit_are_added_only_if_it_commits(self) -> None:
        """`transaction.on_commit(partial(add_task, ...))` adds no task when the view's
        transaction rolls back; in a `TestCase`, `capture_tasks()` around Django's
        `captureOnCommitCallbacks(execute=True)` catches those it adds."""
        with capture_tasks() as tasks, self.captureOnCommitCallbacks(execute=True):
            assert self.client.get("/join", {"username": "bo"}).status_code == 200
            assert self.client.get("/join", {"username": "cy", "refuse": "1"}).status_code == 400
        assert [(task.func, task.args) for task in tasks] == [(deactivate, ("bo",))]
        tasks.run()
        assert not User.objects.get(username="bo").is_active

    def test_a_task_that_leaves_a_transaction_open_leaves_the_test_s_intact(self) -> None:
        """A task's atomic block left open on the test's connection is rolled back (as in
        production): the test's transaction stays as it was, and its rollback, at the end,
        still undoes the test's rows."""
        depth = len(connection.atomic_blocks)
        with self.assertLogs("post_response", "WARNING") as logs, requests_wait_for_tasks():
            assert self.client.get("/careless").status_code == 200
        assert len(connection.atomic_blocks) == depth
        assert sorted(User.objects.values_list("username", flat=True)) == ["ADA", "ada"]
        left_open = "A task left a transaction open on database 'default': rolled back"
        assert [record.getMessage() for record in logs.records] == [left_open] * 2

    def test_a_task_whose_query_fails_leaves_the_test_transaction_usable(self) -> None:
        """A task that fails on a query (logged) undoes its own writes only, as a failed
        request in production: the test goes on querying in its transaction, which
        neither Django's rollback flag nor PostgreSQL's aborted state spoils."""
        with self.assertLogs("post_response", "ERROR") as logs, requests_wait_for_tasks():
            assert self.client.get("/failing").status_code == 200
        assert len(logs.records) == 3  # each task failed
        assert sorted(User.objects.values_list("username", flat=True)) == ["ADA", "ada"]
        User.objects.create(username="bo")

    @override_settings(POST_RESPONSE={"concurrency": 2})
    def test_a_task_ending_leaves_the_atomic_block_of_one_still_running(self) -> None:
        """With `concurrency=2`, a task that ends while another is inside its atomic block
        (on the same, shared, connection) leaves that block alone: it is not one left open."""
        with self.assertNoLogs("post_response", "WARNING"), requests_wait_for_tasks():
            assert self.client.get("/two-at-once").status_code == 200
        assert User.objects.filter(username="in-a-block").exists()

    @unittest.skipIf(django.VERSION < (6, 0), ASYNC_CLIENT_SIGNALS)
    async def test_async_client_under_requests_wait_for_tasks(self) -> None:
        """Django's `AsyncClient` in an async test, as `Client` in a sync one."""
        with requests_wait_for_tasks():
            await self.async_client.get("/leave", {"username": "ada"})
        await sync_to_async(self.assert_deactivated)()

    async def test_async_client_and_arun(self) -> None:
        """`capture_tasks()` around `AsyncClient`, and `await tasks.arun()`."""
        with capture_tasks() as tasks:
            await self.async_client.get("/leave", {"username": "ada"})
        await tasks.arun()
        await sync_to_async(self.assert_deactivated)()


if __name__ == "__main__":
    runner = get_runner(settings)(verbosity=2, keepdb=True)  # the caller drops the database
    sys.exit(bool(runner.run_tests([f"{__name__}.TasksInATestCase"])))
