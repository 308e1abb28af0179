"""With pytest-django's `django_db` mark or `db` fixture, a view's tasks run on the test's
database connection: they see its rows, and their writes are rolled back with it."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.test import Client

from post_response.testing import capture_tasks


def active() -> list[str]:
    return sorted(User.objects.filter(is_active=True).values_list("username", flat=True))


@pytest.mark.django_db
def test_tasks_see_the_rows_of_the_test(client: Client) -> None:
    User.objects.create(username="ada")
    User.objects.create(username="ADA")
    assert client.get("/leave", {"username": "ada"}).status_code == 200
    assert active() == []  # the sync task and the async task both ran on them


def test_captured_tasks_too(db: None, client: Client) -> None:
    User.objects.create(username="ada")
    User.objects.create(username="ADA")
    with capture_tasks(run=True):
        client.get("/leave", {"username": "ada"})
    assert active() == []


@pytest.mark.django_db
def test_a_task_writes_in_the_test_transaction(client: Client) -> None:
    client.get("/join", {"username": "bo"})
    assert active() == ["bo"]


@pytest.mark.django_db
def test_which_rolled_its_writes_back() -> None:
    assert active() == []


@pytest.mark.django_db(transaction=True)
def test_a_transactional_test(client: Client) -> None:
    client.get("/join", {"username": "cy"})
    assert active() == ["cy"]
