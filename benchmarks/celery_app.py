"""The Celery side of section (g): a worker that does the CPU-heavy work in its own process.

Worker: python -m celery -A benchmarks.celery_app:app worker --pool=solo
Broker: $BENCH_CELERY_BROKER, by default Redis database 11 on 127.0.0.1.
"""

from __future__ import annotations

import os

from celery import Celery

from .apps import burn_cpu

BROKER = os.environ.get("BENCH_CELERY_BROKER", "redis://127.0.0.1:6379/11")

app = Celery("post_response_bench", broker=BROKER)
app.conf.update(broker_connection_retry_on_startup=True, task_default_queue="post_response_bench")

burn = app.task(name="benchmarks.burn")(burn_cpu)
