"""Device agents: a Celery worker on a farm device runs that device's jobs (`latprune agent`).

The agent shares the database (LATPRUNE_DATABASE_URL) and the data dir (LATPRUNE_DATA_DIR, a
shared volume: models, artifacts, latency tables) with the API server; the broker
(LATPRUNE_REDIS_URL) only carries job ids. On start it upserts its Device row (executor
"celery", queue ``device.<name>``, this machine's fingerprint), requeues the jobs of dead workers
and re-sends lost task messages, then consumes only its own queue.

Nothing is lost when a message is: job state lives in the database, `claim` makes duplicate
messages harmless, and queued jobs of celery devices whose message disappeared (a Redis restart
without persistence, a worker killed mid-job) are re-sent by `resend_queued` (agent start, the
agent's watchdog, the nightly task).

Celery is imported lazily (only agents, `latprune beat` and servers with celery devices need it).
"""
from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from latprune.service import worker as workers
from latprune.service.db import Device, Job, new_id, now, session_scope
from latprune.service.settings import Settings
from latprune.service.storage import Storage, checked_device
from latprune.types import InputError

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger("latprune.service.agent")

NIGHTLY_OPTIONS = {"max_cells": 200, "threads": 1}
_apps: dict[tuple, "Celery"] = {}
_apps_lock = threading.Lock()


def get_app(settings: Settings) -> "Celery":
    """The Celery app of these settings (one per process and configuration)."""
    key = (settings.redis_url, settings.db_url, str(settings.data_path))
    with _apps_lock:
        if key not in _apps:
            from latprune.service.celery_app import make_celery
            _apps[key] = make_celery(settings)
        return _apps[key]


def send_job(settings: Settings, job_id: str, queue: str) -> None:
    """Send the task that runs `job_id` to a device queue. Raises (kombu OperationalError, ...)
    when the broker cannot be reached within a few seconds; the job stays queued."""
    from latprune.service.celery_app import RUN_JOB

    # ignore_result: the job's state lives in the database; waiting for a result would also
    # subscribe this process to a Redis channel per task.
    get_app(settings).send_task(RUN_JOB, args=[job_id], queue=queue, ignore_result=True, retry=True,
                                retry_policy={"max_retries": 2, "interval_start": 0,
                                              "interval_step": 0.5, "interval_max": 1.0})


def _dispatch(settings: Settings, job_ids: list[str]) -> list[str]:
    """Send the messages of queued jobs on celery devices (others are polled by the API's
    in-process pool). Returns the ids sent."""
    if not job_ids:
        return []
    with session_scope(settings.db_url) as s:
        rows = s.execute(select(Job.id, Device.queue).join(Device, Job.device == Device.name).where(
            Job.id.in_(job_ids), Job.state == "queued", Device.executor == "celery")).all()
    for job_id, queue in rows:
        send_job(settings, job_id, queue)
    return [job_id for job_id, _ in rows]


def _broker_count(settings: Settings, queue: str) -> int:
    """Messages waiting in a queue of the broker (0 when the queue does not exist)."""
    from kombu.exceptions import ChannelError

    with get_app(settings).connection_for_write() as conn:
        conn.ensure_connection(max_retries=2)
        try:
            return int(conn.default_channel.queue_declare(queue=queue, passive=True).message_count)
        except ChannelError:  # Redis drops empty lists: no key, no messages
            return 0


def resend_queued(settings: Settings, older_than_s: float = 60.0, device: str | None = None) -> list[str]:
    """Re-send the task messages of queued jobs of celery devices (or of `device` only) that
    were queued more than `older_than_s` ago, for each device whose broker queue is empty and
    that runs none of its jobs: those jobs wait for a message that was lost. Returns their ids."""
    cutoff = now() - older_than_s
    with session_scope(settings.db_url) as s:
        q = select(Job.device, Job.id).join(Device, Job.device == Device.name).where(
            Job.state == "queued", Device.executor == "celery", Job.created_at < cutoff)
        if device is not None:
            q = q.where(Job.device == device)
        waiting: dict[str, list[str]] = {}
        for dev, job_id in s.execute(q.order_by(Job.created_at)).all():
            waiting.setdefault(dev, []).append(job_id)
        busy = set(s.scalars(select(Job.device).where(Job.state == "running", Job.device.in_(list(waiting)))))
        queues = dict(s.execute(select(Device.name, Device.queue).where(Device.name.in_(list(waiting)))).all())
    sent = []
    for dev, ids in waiting.items():
        if dev in busy or _broker_count(settings, queues[dev]) > 0:
            continue  # messages are flowing; checked again once the queue drains
        for job_id in ids:
            send_job(settings, job_id, queues[dev])
            sent.append(job_id)
    if sent:
        log.warning("re-sent the lost task messages of %d queued job(s): %s", len(sent), ", ".join(sent))
    return sent


def recover(settings: Settings, own_worker_prefix: str = "") -> list[str]:
    """recover_stale, then send the messages of the requeued jobs of celery devices."""
    return _dispatch(settings, workers.recover_stale(settings, own_worker_prefix=own_worker_prefix))


def _has_tensorrt() -> bool:
    from latprune.profiler.backends import available

    return available().get("trt") == "ok"


def register_agent_device(settings: Settings, name: str, backend: str | None = None) -> dict[str, Any]:
    """Upsert the Device row of this machine as farm device `name` (executor celery, queue
    device.<name>). backend: None (auto: trt when TensorRT works here, else ort-cpu), or any
    backend name (ort-cpu, openvino, trt, ...; older names onnxruntime-cpu and tensorrt too),
    checked to run here. Returns the row's fields."""
    from latprune.profiler.backends import BackendUnavailable, canonical_name, get_backend

    try:
        name = checked_device(name)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if name == settings.local_device and settings.executor == "inprocess":
        raise InputError(f"{name!r} is the API server's own device (its in-process worker runs it); "
                         "give the agent another name, or run the API with LATPRUNE_EXECUTOR=celery")
    try:
        if backend is None:
            backend = "trt" if _has_tensorrt() else "ort-cpu"
        backend = canonical_name(backend)
        runtime = get_backend(backend)
        runtime.check()
        fingerprint = runtime.fingerprint()
    except BackendUnavailable as exc:
        raise InputError(f"backend {backend!r} is not usable here: {exc}") from None
    trt = backend == "trt"
    with session_scope(settings.db_url) as s:
        dev = s.get(Device, name)
        if dev is not None and dev.executor == "inprocess":
            raise InputError(f"device {name!r} is run in-process by the API server; give the agent another name")
        if dev is None:
            dev = Device(name=name)
            s.add(dev)
        dev.executor, dev.queue, dev.backend = "celery", f"device.{name}", backend
        dev.fingerprint, dev.has_tensorrt, dev.last_seen_at = fingerprint, trt, now()
        s.flush()
        return {"name": dev.name, "executor": dev.executor, "queue": dev.queue, "backend": dev.backend,
                "fingerprint": dev.fingerprint, "has_tensorrt": dev.has_tensorrt, "last_seen_at": dev.last_seen_at}


def run_job_here(settings: Settings, job_id: str, stop: threading.Event | None = None) -> str:
    """The body of the latprune.run_job task: claim, run, return the final state ("skipped"
    when the job was not queued: a duplicate message, a cancelled or finished job)."""
    me = workers.worker_id()
    if not workers.claim(settings, job_id, me):
        return "skipped"
    with session_scope(settings.db_url) as s:
        job = s.get(Job, job_id)
        dev = s.get(Device, job.device)
        if dev is not None:
            dev.last_seen_at = now()
        queue = dev.queue if dev is not None else ""
    state = workers.run_claimed(settings, job_id, me, stop)
    if state == "queued" and stop is not None and stop.is_set() and queue:
        # run_claimed handed the job back because this worker is shutting down: its message
        # is acked when we return, so send a new one for the next agent.
        try:
            send_job(settings, job_id, queue)
        except Exception:  # the agent's next start or the nightly task re-sends it
            log.exception("could not re-send job %s", job_id)
        return "requeued"
    log.info("job %s: %s", job_id, state)
    return state


def queue_nightly(settings: Settings) -> dict[str, Any]:
    """Queue one reprofile job per device with a latency table, unless one is queued or running
    already, hand each to its device, and re-send lost messages of older queued jobs.
    Returns {"queued": [job ids], "skipped": {device: reason}, "resent": [job ids],
    "unsent": [queued job ids whose message could not be sent yet]}."""
    storage = Storage(settings.data_path)
    queued: list[tuple[str, str]] = []
    skipped: dict[str, str] = {}
    with session_scope(settings.db_url) as s:
        pending = set(s.scalars(select(Job.device).where(Job.kind == "reprofile",
                                                         Job.state.in_(("queued", "running")))))
        for dev in s.scalars(select(Device).order_by(Device.name)).all():
            if dev.name in pending:
                skipped[dev.name] = "a reprofile job is already queued or running"
            elif not storage.lut_path(dev.name).is_file():
                skipped[dev.name] = "no latency table yet"
            else:
                job = Job(id=new_id("job"), owner_id=None, kind="reprofile", device=dev.name,
                          options=dict(NIGHTLY_OPTIONS), state="queued", stage="queued (nightly)")
                s.add(job)
                queued.append((job.id, dev.name))
    unsent = []
    for job_id, dev in queued:
        try:
            workers.enqueue(settings, job_id, dev)
        except Exception as exc:  # Redis away: the job stays queued; resend_queued sends it later
            log.warning("could not send job %s to device %s: %s", job_id, dev, exc)
            unsent.append(job_id)
    try:
        resent = resend_queued(settings, older_than_s=60)
    except Exception:
        log.exception("could not re-send lost task messages")
        resent = []
    return {"queued": [j for j, _ in queued], "skipped": skipped, "resent": resent, "unsent": unsent}


def _watchdog(settings: Settings, device: str, stop: threading.Event) -> None:
    """Every stale_after_s / 2 (1-60 s): mark the device seen, requeue the jobs of dead workers
    (and send them), and re-send this device's queued jobs whose messages were lost."""
    own = f"{workers.HOST}:{os.getpid()}:"
    interval = min(max(settings.stale_after_s / 2, 1.0), 60.0)
    while not stop.wait(interval):
        try:
            with session_scope(settings.db_url) as s:
                dev = s.get(Device, device)
                if dev is not None:
                    dev.last_seen_at = now()
            recover(settings, own_worker_prefix=own)
            resend_queued(settings, older_than_s=max(60.0, settings.stale_after_s), device=device)
        except Exception:  # the database or Redis is away for a moment: try again later
            log.exception("agent watchdog")


def run_agent(settings: Settings, device: str, concurrency: int = 1, loglevel: str = "info",
              backend: str | None = None) -> None:
    """Register this machine as `device` and run a Celery worker on its queue until stopped.
    One job at a time by default (concurrent timings on one machine disturb each other)."""
    fields = register_agent_device(settings, device, backend)
    try:
        sent = recover(settings)
        sent += resend_queued(settings, older_than_s=60)
        sent += resend_queued(settings, older_than_s=0, device=device)  # our own: any age
        if sent:
            log.info("sent %d queued job(s) again", len(sent))
    except Exception as exc:  # Redis not up yet: the watchdog and nightly catch up later
        log.warning("could not re-send queued jobs at start: %s", exc)
    app = get_app(settings)
    stop = threading.Event()
    threading.Thread(target=_watchdog, args=(settings, device, stop), name="latprune-agent-watchdog",
                     daemon=True).start()
    # Jobs run in child processes and the task only watches them, so threads suffice; no fork
    # of a process holding database connections.
    pool = ["--pool=solo", "-c", "1"] if concurrency <= 1 else ["--pool=threads", "-c", str(concurrency)]
    try:
        app.worker_main(["worker", "-Q", fields["queue"], *pool, "--without-gossip", "--without-mingle",
                         "--without-heartbeat", "-n", f"{device}@%h", "--loglevel", loglevel])
    finally:
        stop.set()


def run_beat(settings: Settings, loglevel: str = "info") -> None:
    """The farm's scheduler: celery beat (nightly re-profile, schedule file under settings.home)
    embedded in a worker that consumes the default queue `latprune`, where beat sends it.
    Run exactly one per farm."""
    from latprune.service.celery_app import DEFAULT_QUEUE

    settings.home.mkdir(parents=True, exist_ok=True)
    app = get_app(settings)
    app.worker_main(["worker", "-B", "-s", str(settings.home / "celerybeat-schedule"), "-Q", DEFAULT_QUEUE,
                     "--pool=solo", "--without-gossip", "--without-mingle", "--without-heartbeat",
                     "-n", "latprune-beat@%h", "--loglevel", loglevel])
