"""A tiny Celery app for tests/test_servers.py: a real worker subprocess runs it with
``celery -A celery_probe_app worker -Q probe`` (tests/ on PYTHONPATH); the broker and result
backend come from $LATPRUNE_PROBE_REDIS_URL."""
from __future__ import annotations

import os

from celery import Celery

QUEUE = "probe"


def make_app(redis_url: str) -> Celery:
    app = Celery("celery_probe_app", broker=redis_url, backend=redis_url)
    app.conf.update(
        task_default_queue=QUEUE,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        result_expires=300,
    )
    return app


app = make_app(os.environ.get("LATPRUNE_PROBE_REDIS_URL", "redis://127.0.0.1:6379/0"))


@app.task(name="celery_probe_app.add")
def add(x: int, y: int) -> dict:
    """x + y, and the worker's process id (to show a separate process ran it)."""
    return {"sum": x + y, "pid": os.getpid()}
