"""A Django view's tasks under Django's own test client, which calls views without the ASGI
app: with the plugin on, they have run when `client.get()` returns."""

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

SENT: list[str] = []


def send_welcome_email(to: str) -> None:
    SENT.append(to)


def signup(request: HttpRequest) -> HttpResponse:
    add_task(send_welcome_email, request.GET["email"])
    return HttpResponse("Welcome!")


def broken(request: HttpRequest) -> HttpResponse:
    add_task(send_welcome_email, "never@example.com")
    raise RuntimeError("the view failed")


urlpatterns = [path("signup", signup), path("broken", broken)]


def test_the_task_has_run_when_the_client_returns() -> None:
    response = Client().get("/signup", {"email": "ada@example.com"})
    assert response.status_code == 200
    assert SENT == ["ada@example.com"]


def test_a_view_that_raises_has_its_tasks_skipped() -> None:
    client = Client(raise_request_exception=False)
    assert client.get("/broken").status_code == 500
    assert "never@example.com" not in SENT
