"""A one-file Django project over ASGI: tasks that use the ORM after the response.

Run:  python -m uvicorn examples.django_app:application
      (EXAMPLE_DATABASE=postgresql://user@host:port/name for PostgreSQL, with psycopg)
Try:  curl -X POST 'http://127.0.0.1:8000/signup?email=ada@example.com'
      curl 'http://127.0.0.1:8000/emails'

The signup views answer at once; the welcome email is "sent" (recorded with the ORM)
after the response. Options come from `settings.POST_RESPONSE`; arguments given to the
middleware win over them. Tasks close their database connections as requests do.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import django
from django.conf import settings

DATABASE = os.environ.get("EXAMPLE_DATABASE", str(Path(tempfile.gettempdir()) / "example.sqlite3"))


def database(location: str) -> dict[str, object]:
    """Django's settings for an SQLite file, or for a `postgresql://` URL."""
    url = urlsplit(location)
    if url.scheme != "postgresql":
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": location}
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": url.path.lstrip("/"),
        "USER": url.username or "",
        "HOST": url.hostname or "",
        "PORT": url.port or "",
    }


settings.configure(
    DEBUG=False,
    SECRET_KEY="example-only",  # noqa: S106
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    INSTALLED_APPS=["examples.django_app"],
    MIDDLEWARE=[],
    DATABASES={"default": database(DATABASE)},
    DEFAULT_AUTO_FIELD="django.db.models.AutoField",
    POST_RESPONSE={"timeout": 30, "policy": "no_error", "max_tasks": 5},
)
django.setup()

from django.core.asgi import get_asgi_application  # noqa: E402
from django.db import connection, models  # noqa: E402
from django.http import HttpRequest, HttpResponse, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402

from post_response import PostResponseMiddleware, add_task  # noqa: E402


class SentEmail(models.Model):
    to = models.CharField(max_length=200)
    sent_by = models.CharField(max_length=20)

    class Meta:
        app_label = "django_app"


def send_welcome_email(to: str) -> None:
    """A sync task: Django's ORM as usual (it runs in a worker thread)."""
    SentEmail.objects.create(to=to, sent_by="sync task")


async def send_welcome_email_async(to: str) -> None:
    """An async task: Django's async ORM."""
    await SentEmail.objects.acreate(to=to, sent_by="async task")


@csrf_exempt
def signup(request: HttpRequest) -> HttpResponse:
    add_task(send_welcome_email, request.GET["email"])
    return HttpResponse("Welcome! Your email is on its way.\n")


@csrf_exempt
async def async_signup(request: HttpRequest) -> HttpResponse:
    add_task(send_welcome_email_async, request.GET["email"])
    return HttpResponse("Welcome! Your email is on its way.\n")


def emails(request: HttpRequest) -> JsonResponse:
    sent = SentEmail.objects.order_by("id").values("to", "sent_by")
    return JsonResponse({"sent": list(sent)})


def missing(request: HttpRequest) -> HttpResponse:
    """A 404 whose task the `no_error` policy (from settings) skips."""
    add_task(send_welcome_email, "nobody@example.com")
    return HttpResponse("no such page\n", status=404)


urlpatterns = [
    path("signup", signup),
    path("async-signup", async_signup),
    path("emails", emails),
    path("missing", missing),
]


def create_table() -> None:
    """A one-file project has no migrations: create the table directly."""
    if SentEmail._meta.db_table not in connection.introspection.table_names():
        with connection.schema_editor() as editor:
            editor.create_model(SentEmail)
    connection.close()  # opened at import time, in this thread: not a request's


create_table()
application = PostResponseMiddleware(get_asgi_application(), timeout=60)
