"""The FastAPI + Celery example, started with its documented commands against a real Redis."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx

from ..servers import background, run
from ..test_celery import broker  # noqa: F401  (the fixture: Redis, or a skip saying how)

BROKER = "redis://127.0.0.1:6379/12"


def test_the_example_hands_the_email_to_the_celery_worker(broker: str, tmp_path: Path) -> None:  # noqa: F811
    """A signup answers at once; the worker process then writes the welcome email."""
    log = tmp_path / "log.txt"
    environ = {"CELERY_BROKER": BROKER, "POST_RESPONSE_EXAMPLE_LOG": str(log)}
    worker = [sys.executable, "-m", "celery", "-A", "examples.fastapi_celery:celery_app", "worker",
              "--pool=solo", "--loglevel=INFO"]  # fmt: skip
    with (
        background(worker, ready="ready.", env=environ),
        run("uvicorn-h11", "examples.fastapi_celery:app", env=environ) as web,
    ):
        response = httpx.post(f"{web.url}/signup?email=ada@example.com", timeout=10)
        assert response.json() == {"message": "Welcome! Your email is on its way."}
        deadline = time.monotonic() + 30
        while not (log.exists() and log.read_text().endswith("\n")) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert log.read_text() == "welcome email sent to ada@example.com by the Celery worker\n"
