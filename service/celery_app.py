"""The Celery app of the device farm: broker and result backend are Redis (settings.redis_url).

Queues:
- ``device.<name>``: the jobs of one farm device; only that device's agent consumes it
  (`latprune agent --device NAME`, service.agent).
- ``latprune`` (the default queue): the nightly task, consumed by `latprune beat` (a worker with
  an embedded beat scheduler, one per farm).

Tasks:
- ``latprune.run_job(job_id)``: claim the job (a conditional UPDATE, so duplicate messages are
  harmless: the second one returns "skipped"), run it in a child process with heartbeats
  (service.worker.run_claimed) and return its final state.
- ``latprune.nightly()``: queue one ``reprofile`` job per device that has a table (see
  service.agent.queue_nightly) and re-send the task messages of queued jobs that Redis lost.

The job state lives in the database, not in Celery: messages are acked late, the worker
reserves one message at a time, and a worker that dies mid-job leaves its job "running" with a
stale heartbeat for `recover_stale` to requeue (and the agent to re-send).

Schedule: the nightly task runs at 02:00 in the farm's time zone. Environment:
  LATPRUNE_NIGHTLY_CRON="M H"   minute and hour (crontab fields, e.g. "30 3" or "0 */6"); default "0 2"
  LATPRUNE_TIMEZONE=Area/City   time zone of that schedule; default $TZ, else the host's zone
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from celery import Celery, signals
from celery.schedules import crontab

from latprune.service.settings import Settings

log = logging.getLogger("latprune.service.celery")

DEFAULT_QUEUE = "latprune"
RUN_JOB = "latprune.run_job"
NIGHTLY = "latprune.nightly"
# Redis redelivers an unacked message after this long; jobs may run for hours and the database
# (claim, heartbeats, recover_stale) already handles lost workers, so keep it long.
VISIBILITY_TIMEOUT_S = 12 * 3600

# Set when this worker process begins a warm or cold shutdown: a running job is then handed
# back (state queued) and its message re-sent, instead of holding the shutdown for hours.
shutting_down = threading.Event()


@signals.worker_shutting_down.connect
def _on_shutdown(**_kwargs) -> None:
    shutting_down.set()


def device_queue(name: str) -> str:
    return f"device.{name}"


def nightly_schedule() -> crontab:
    """crontab of LATPRUNE_NIGHTLY_CRON ("M H", default "0 2")."""
    spec = os.environ.get("LATPRUNE_NIGHTLY_CRON", "0 2").split()
    if len(spec) != 2:
        raise ValueError(f'LATPRUNE_NIGHTLY_CRON must be "MINUTE HOUR" (crontab fields), not {spec!r}')
    return crontab(minute=spec[0], hour=spec[1])


def local_zone() -> str | None:
    """IANA name of the schedule's time zone: LATPRUNE_TIMEZONE, $TZ, /etc/timezone or the
    /etc/localtime link; None when unknown (Celery then uses the host's local time)."""
    candidates = [os.environ.get("LATPRUNE_TIMEZONE"), os.environ.get("TZ", "").lstrip(":")]
    try:
        candidates.append(Path("/etc/timezone").read_text().strip())
    except OSError:
        pass
    target = os.path.realpath("/etc/localtime")
    if "zoneinfo/" in target:
        candidates.append(target.split("zoneinfo/", 1)[1])
    for name in filter(None, candidates):
        try:
            ZoneInfo(name)
            return name
        except (ValueError, ZoneInfoNotFoundError):  # e.g. a POSIX TZ string such as "CET-1"
            log.warning("time zone %r unknown; ignored", name)
    return None


def make_celery(settings: Settings) -> Celery:
    """A Celery app bound to `settings` (its tasks use that database and data dir)."""
    app = Celery("latprune", broker=settings.redis_url, backend=settings.redis_url)
    zone = local_zone()
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=DEFAULT_QUEUE,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_expires=7 * 24 * 3600,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        # crontab fields are read in this zone; with no zone known, in the host's local time
        timezone=zone,
        enable_utc=zone is not None,
        beat_schedule={"nightly-reprofile": {"task": NIGHTLY, "schedule": nightly_schedule(),
                                             "options": {"queue": DEFAULT_QUEUE}}},
    )

    @app.task(name=RUN_JOB, ignore_result=False)
    def run_job(job_id: str) -> str:
        from latprune.service.agent import run_job_here

        return run_job_here(settings, job_id, stop=shutting_down)

    @app.task(name=NIGHTLY)
    def nightly() -> dict:
        from latprune.service.agent import queue_nightly

        return queue_nightly(settings)

    return app
