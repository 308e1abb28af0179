"""pytest-django's settings for the suite, and the one line the README asks for.

POSTGRES_DATABASE=name: on the machine's PostgreSQL, in that existing, empty database
(run with `--reuse-db`); else SQLite in memory.
"""

from __future__ import annotations

import os

import pytest
from django.conf import settings

pytest_plugins = ["post_response.pytest_plugin"]

POSTGRESQL = {
    "ENGINE": "django.db.backends.postgresql",
    "NAME": "postgres",  # where pytest-django connects from to set the test database up
    "USER": "postgres",
    "HOST": "127.0.0.1",
    "TEST": {"NAME": os.environ.get("POSTGRES_DATABASE")},
}
SQLITE = {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}


def pytest_configure(config: pytest.Config) -> None:
    settings.configure(
        SECRET_KEY="tests-only",
        ROOT_URLCONF="shop",
        ALLOWED_HOSTS=["testserver"],
        MIDDLEWARE=[],
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth"],
        DATABASES={"default": POSTGRESQL if "POSTGRES_DATABASE" in os.environ else SQLITE},
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
    )
