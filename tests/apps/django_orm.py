"""The Django example (examples/django_app.py) with test controls: which database
connections were opened, and which are still open.

Run: EXAMPLE_DATABASE=/tmp/t.sqlite3 python -m uvicorn tests.apps.django_orm:app
(DJANGO_CONN_MAX_AGE=null for persistent connections)
"""

from __future__ import annotations

import json
import os
from typing import Any

from asgiref.sync import sync_to_async
from django.db import connections as databases
from django.db import transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.signals import connection_created
from django.http import HttpRequest, HttpResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from examples import django_app
from post_response import add_task

from .control import with_controls

if "DJANGO_CONN_MAX_AGE" in os.environ:  # e.g. `null`: persistent connections
    databases.settings["default"]["CONN_MAX_AGE"] = json.loads(os.environ["DJANGO_CONN_MAX_AGE"])

# Django's connections are per thread: keep each one to look at it from here later.
OPENED: list[BaseDatabaseWrapper] = []


def _opened(sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    OPENED.append(connection)


connection_created.connect(_opened)


def leave_a_transaction_open(to: str) -> None:
    """A sync task that writes in a `transaction.atomic()` block it never leaves."""
    transaction.atomic().__enter__()
    django_app.SentEmail.objects.create(to=to, sent_by="open transaction")


async def leave_a_transaction_open_async(to: str) -> None:
    await sync_to_async(leave_a_transaction_open)(to)


@csrf_exempt
def open_transaction(request: HttpRequest) -> HttpResponse:
    add_task(leave_a_transaction_open, request.GET["email"])
    add_task(leave_a_transaction_open_async, request.GET["email"])
    return HttpResponse("Welcome!\n")


django_app.urlpatterns.append(path("open-transaction", open_transaction))


def connections() -> dict[str, int]:
    """How many connections were opened so far, and how many of them are open now."""
    return {"opened": len(OPENED), "open": sum(c.connection is not None for c in OPENED)}


def config() -> dict[str, Any]:
    """The options the middleware ended up with (settings.POST_RESPONSE, then arguments)."""
    options = django_app.application.config
    return {"timeout": options.timeout, "policy": options.policy, "max_tasks": options.max_tasks}


app = with_controls(
    django_app.application,
    django_app.application,
    actions={"connections": connections, "config": config},
)
