"""The README's Django testing example, run by tests/test_testing.py in its own process.

Django's test client calls the views without the ASGI app, so no PostResponseMiddleware:
`capture_tasks()` catches their `add_task()` calls all the same.
"""

from __future__ import annotations

import django
from django.conf import settings

settings.configure(
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["testserver"],
    MIDDLEWARE=[],
    INSTALLED_APPS=[],
    SECRET_KEY="tests-only",
)
django.setup()

from django.http import HttpRequest, HttpResponse  # noqa: E402
from django.test import Client  # noqa: E402
from django.urls import path  # noqa: E402

from post_response import add_task  # noqa: E402
from post_response.testing import capture_tasks  # noqa: E402

SENT: list[str] = []


def send_welcome_email(to: str) -> None:
    SENT.append(to)


def signup(request: HttpRequest) -> HttpResponse:
    add_task(send_welcome_email, request.GET["email"])
    return HttpResponse("Welcome!")


urlpatterns = [path("signup", signup)]


# --- the README example starts here ---
def test_signup_sends_a_welcome_email() -> None:
    client = Client()
    with capture_tasks() as tasks:
        response = client.get("/signup", {"email": "ada@example.com"})
    assert response.status_code == 200
    assert [(task.func, task.args) for task in tasks] == [
        (send_welcome_email, ("ada@example.com",))
    ]
    tasks.run()
    assert SENT == ["ada@example.com"]


def test_signup_with_tasks_run_at_the_end_of_the_block() -> None:
    with capture_tasks(run=True):
        Client().get("/signup", {"email": "bo@example.com"})
    assert SENT[-1] == "bo@example.com"
