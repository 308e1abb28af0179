"""A one-file Django project over WSGI under PostResponseWSGIMiddleware, for tests.

Run: python -m waitress --listen=127.0.0.1:8000 tests.apps.django_wsgi:app
"""

from __future__ import annotations

import django
from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="tests-only",
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    MIDDLEWARE=["django.middleware.common.CommonMiddleware"],  # sets Content-Length
    INSTALLED_APPS=[],
)
django.setup()

from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpRequest, HttpResponse  # noqa: E402
from django.urls import path  # noqa: E402

from post_response import add_task  # noqa: E402
from post_response.wsgi import PostResponseWSGIMiddleware  # noqa: E402

from .wsgi_control import gated, with_controls  # noqa: E402


def work(request: HttpRequest) -> HttpResponse:
    add_task(gated, request.GET["id"])
    return HttpResponse("hello world")


urlpatterns = [path("work", work)]

app = with_controls(PostResponseWSGIMiddleware(get_wsgi_application()))
