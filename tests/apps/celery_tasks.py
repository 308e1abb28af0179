"""A Celery app for the tests: tasks that record what they ran in Redis.

Worker: CELERY_BROKER=redis://127.0.0.1:6379/13 \\
        python -m celery -A tests.apps.celery_tasks worker --pool=solo --concurrency=1
"""

from __future__ import annotations

import os

import redis
from celery import Celery

BROKER = os.environ.get("CELERY_BROKER", "redis://127.0.0.1:6379/13")
# Where the worker notes what it ran (a Redis list, in order); not the broker when a test
# stops the broker.
RECORDS_AT = os.environ.get("CELERY_RECORDS", BROKER)
# A test run's own list and queue (tests/test_celery.py sets them): runs at once stay apart.
RECORDS = os.environ.get("CELERY_RECORDS_KEY", "post_response:records")

app = Celery("tests", broker=BROKER)
app.conf.update(
    broker_connection_retry_on_startup=True,
    task_default_queue=os.environ.get("CELERY_QUEUE", "post_response_tests"),
    worker_hijack_root_logger=False,
)
store = redis.Redis.from_url(RECORDS_AT)


@app.task(name="tests.apps.celery_tasks.record")
def record(item: str) -> None:
    """What a real task would do (send the email...): here, note that it ran."""
    store.rpush(RECORDS, item)


def record_plain(item: str) -> None:
    """A plain function, also registered as a task (routed with `celery_app=app`)."""
    store.rpush(RECORDS, f"plain {item}")


app.task(name="tests.apps.celery_tasks.record_plain")(record_plain)


def record_remote(item: str) -> None:
    """A task that only this app has (not shared with the process's other Celery apps):
    tests/apps/celery_web.py's `by_name` knows it by its name only."""
    store.rpush(RECORDS, f"remote {item}")


app.task(name="tests.apps.celery_tasks.record_remote", shared=False)(record_remote)


def burn_cpu(item: str) -> None:
    """About 50 ms of pure-Python work (for the benchmark)."""
    total = 0
    for i in range(1_300_000):
        total += i * i
    store.rpush(RECORDS, f"burned {item}")


app.task(name="tests.apps.celery_tasks.burn_cpu")(burn_cpu)
