"""A one-file Django project served over ASGI and wrapped by PostResponseMiddleware.

Run: python -m uvicorn tests.apps.django_app:app
"""

from __future__ import annotations

import threading
from typing import NoReturn

import django
from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="tests-only",
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    MIDDLEWARE=[],
    INSTALLED_APPS=[],
)
django.setup()

from asgiref.sync import sync_to_async  # noqa: E402
from django.core.asgi import get_asgi_application  # noqa: E402
from django.http import HttpRequest, HttpResponse  # noqa: E402
from django.urls import path  # noqa: E402

from post_response import PostResponseMiddleware, add_task  # noqa: E402

from .control import gated, note, options, record, with_controls  # noqa: E402


async def async_view(request: HttpRequest) -> HttpResponse:
    add_task(gated, request.GET["id"])
    return HttpResponse("hello world")


def sync_view(request: HttpRequest) -> HttpResponse:
    """Django runs a sync view in a worker thread (sync_to_async)."""
    add_task(gated, request.GET["id"])
    return HttpResponse("hello world")


def raise_generator_exit(task_id: str) -> NoReturn:
    note(f"{task_id}:start")
    raise GeneratorExit


def hostile_view(request: HttpRequest) -> HttpResponse:
    """A sync task that raises GeneratorExit in its thread, then a gated one."""
    add_task(raise_generator_exit, request.GET["id"])
    add_task(gated, f"{request.GET['id']}-after")
    return HttpResponse("hello world")


RELEASED: dict[str, threading.Event] = {}


def _released(task_id: str) -> threading.Event:
    return RELEASED.setdefault(task_id, threading.Event())


async def hold(task_id: str) -> None:
    """An async task whose ORM-like call (`sync_to_async`) waits until `release` runs its own;
    it records whether it was released within 10 s."""
    released = await sync_to_async(_released(task_id).wait)(10)
    await record("released" if released else "stuck")
    note(f"{task_id}:end")


async def release(task_id: str) -> None:
    await sync_to_async(_released(task_id).set)()


async def two_tasks_view(request: HttpRequest) -> HttpResponse:
    add_task(hold, request.GET["id"])
    add_task(release, request.GET["id"])
    return HttpResponse("hello world")


urlpatterns = [
    path("work", async_view),
    path("sync-work", sync_view),
    path("generator-exit", hostile_view),
    path("two-tasks", two_tasks_view),
]

app = with_controls(PostResponseMiddleware(get_asgi_application(), **options()))
