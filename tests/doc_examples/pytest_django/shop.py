"""Views whose tasks use the ORM."""

from __future__ import annotations

from asgiref.sync import sync_to_async
from django.contrib.auth.models import User
from django.http import HttpRequest, HttpResponse
from django.urls import path

from post_response import add_task


def deactivate(username: str) -> None:
    User.objects.filter(username=username).update(is_active=False)


async def deactivate_async(username: str) -> None:
    await sync_to_async(deactivate)(username)


def leave(request: HttpRequest) -> HttpResponse:
    add_task(deactivate, request.GET["username"])
    add_task(deactivate_async, request.GET["username"].upper())
    return HttpResponse("Goodbye!")


def create(username: str) -> None:
    User.objects.create(username=username)


def join(request: HttpRequest) -> HttpResponse:
    add_task(create, request.GET["username"])
    return HttpResponse("Welcome!")


urlpatterns = [path("leave", leave), path("join", join)]
