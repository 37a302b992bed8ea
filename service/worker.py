"""Workers: claim queued jobs, run each in a child process (service.jobs), keep its heartbeat,
kill it on cancel, and recover jobs whose worker died.

- In-process (default): `WorkerPool` threads inside the API server run the jobs of devices
  whose executor is "inprocess" (the local CPU).
- Celery: `enqueue` sends the job id to the device's queue; `latprune agent` (service.agent)
  runs a Celery worker on that device which calls `run_claimed` the same way.

Claiming is one conditional UPDATE (state queued -> running), so two workers never run the
same job. A running job's heartbeat is refreshed every `heartbeat_s`; a job whose heartbeat is
older than `stale_after_s`, or whose worker process on this host is gone, is requeued (up to
`job_attempts` runs) or failed with the reason.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque

from sqlalchemy import select, update

from latprune.service.db import Device, Job, now, session_scope
from latprune.service.settings import Settings

log = logging.getLogger("latprune.service.worker")
HOST = socket.gethostname()


def worker_id() -> str:
    """host:pid:random — recovery checks the pid of workers on its own host."""
    return f"{HOST}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def claim(settings: Settings, job_id: str, worker: str) -> bool:
    """queued -> running for this worker; False if another worker got it or it was cancelled."""
    with session_scope(settings.db_url) as s:
        t = now()
        res = s.execute(update(Job).where(Job.id == job_id, Job.state == "queued").values(
            state="running", worker=worker, attempts=Job.attempts + 1, started_at=t, heartbeat_at=t,
            stage="starting", progress=0.0, error=""))
        return res.rowcount == 1


def run_claimed(settings: Settings, job_id: str, worker: str, stop: threading.Event | None = None) -> str:
    """Run a claimed job in a child process until it ends. Returns the final state."""
    env = dict(os.environ, LATPRUNE_DATABASE_URL=settings.db_url, LATPRUNE_HOME=str(settings.home),
               LATPRUNE_DATA_DIR=str(settings.data_path))
    # A process group of its own: cancel kills the job and the timing processes it started.
    child = subprocess.Popen([sys.executable, "-m", "latprune.service.jobs", job_id], env=env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True)
    stderr_tail: deque[bytes] = deque(maxlen=40)  # the last lines, for the error message
    reader = threading.Thread(target=lambda: stderr_tail.extend(child.stderr), daemon=True)
    reader.start()
    last_beat = time.monotonic()
    cancelled = lost = False
    # One read of the job row per poll: cancel within a second, without a query stream beside
    # the job's own timings.
    poll_s = min(1.0, settings.heartbeat_s)
    while child.poll() is None and not (cancelled or lost):
        time.sleep(poll_s)
        with session_scope(settings.db_url) as s:
            job = s.get(Job, job_id)
            lost = job is None or job.worker != worker  # recovery requeued it meanwhile
            cancelled = bool(job and job.cancel_requested)
            if not lost and time.monotonic() - last_beat >= settings.heartbeat_s:
                last_beat = time.monotonic()
                job.heartbeat_at = now()
        if stop is not None and stop.is_set():
            break
    if child.poll() is None:
        _kill_group(child)
    child.wait()
    reader.join(timeout=5)
    with session_scope(settings.db_url) as s:
        job = s.get(Job, job_id)
        if job is None:
            return "gone"
        if job.worker != worker:
            return job.state
        if cancelled and job.state == "running":
            job.state, job.stage, job.finished_at = "cancelled", "cancelled", now()
        elif stop is not None and stop.is_set() and job.state == "running":
            # Shutting down: hand the job back rather than lose it.
            job.state, job.stage, job.worker = "queued", "requeued: the worker shut down", ""
            job.attempts = max(job.attempts - 1, 0)
        elif job.state == "running":  # the child died without finishing the job
            tail = b"".join(stderr_tail)[-1500:].decode(errors="replace").strip()
            job.state, job.finished_at = "failed", now()
            job.error = f"the job process exited with code {child.returncode}" + (f": {tail}" if tail else "")
        return job.state


def _kill_group(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _worker_gone(worker: str) -> bool:
    host, _, rest = worker.partition(":")
    pid = rest.partition(":")[0]
    return host == HOST and pid.isdigit() and not _pid_alive(int(pid))


def recover_stale(settings: Settings, own_worker_prefix: str = "") -> list[str]:
    """Requeue (or fail, after job_attempts runs) running jobs whose worker is gone: a dead
    pid on this host, or a heartbeat older than stale_after_s. Returns the requeued job ids."""
    requeued = []
    with session_scope(settings.db_url) as s:
        cutoff = now() - settings.stale_after_s
        for job in s.scalars(select(Job).where(Job.state == "running")).all():
            if own_worker_prefix and job.worker.startswith(own_worker_prefix):
                continue
            if not (_worker_gone(job.worker) or (job.heartbeat_at or 0) < cutoff):
                continue
            if job.cancel_requested:
                job.state, job.stage, job.finished_at = "cancelled", "cancelled", now()
            elif job.attempts >= settings.job_attempts:
                job.state, job.finished_at = "failed", now()
                job.error = (f"its worker ({job.worker}) died during each of {job.attempts} runs; "
                             "not retried again")
            else:
                job.message = f"requeued after its worker ({job.worker or 'unknown'}) died during run {job.attempts}"
                job.state, job.worker = "queued", ""
                job.stage = "queued (retry)"
                requeued.append(job.id)
    return requeued


def local_devices(settings: Settings) -> dict[str, str]:
    """{device name: backend} of this machine's in-process devices: `local_device` on ONNX
    Runtime, and `<local_device>-openvino` where OpenVINO is installed."""
    from latprune.profiler.backends import BackendUnavailable, get_backend

    out = {settings.local_device: "ort-cpu"}
    try:
        get_backend("openvino").check()
        out[f"{settings.local_device}-openvino"] = "openvino"
    except BackendUnavailable:
        pass
    return out


def register_local_device(settings: Settings) -> None:
    """Upsert the Device rows of this machine's CPU backends (local_devices; 1 thread)."""
    from latprune.profiler.backends import get_backend

    with session_scope(settings.db_url) as s:
        for name, backend in local_devices(settings).items():
            dev = s.get(Device, name)
            if dev is None:
                dev = Device(name=name)
                s.add(dev)
            dev.executor, dev.queue, dev.backend = "inprocess", "", backend
            dev.fingerprint, dev.has_tensorrt, dev.last_seen_at = get_backend(backend).fingerprint(), False, now()


_pools: list["WorkerPool"] = []


class NoWorker(Exception):
    """No worker could ever run the job (refused at submission)."""


def enqueue(settings: Settings, job_id: str, device_name: str) -> None:
    """Hand a committed queued job to whoever runs its device."""
    with session_scope(settings.db_url) as s:
        dev = s.get(Device, device_name)
        executor, queue = (dev.executor, dev.queue) if dev else ("inprocess", "")
    if executor == "celery":
        from latprune.service.agent import send_job
        send_job(settings, job_id, queue)
        return
    if settings.executor != "inprocess":
        raise NoWorker(f"device {device_name!r} is run in-process, but this server runs with the "
                       f"{settings.executor} executor: nothing would run the job")
    for pool in _pools:
        pool.wake()


class WorkerPool:
    """`settings.workers` threads that run the queued jobs of in-process devices, oldest first."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.worker = worker_id()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        recover_stale(self.settings)
        for i in range(self.settings.workers):
            t = threading.Thread(target=self._loop, name=f"latprune-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        _pools.append(self)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout)
        if self in _pools:
            _pools.remove(self)

    def wake(self) -> None:
        self._wake.set()

    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def _next_job(self) -> str | None:
        with session_scope(self.settings.db_url) as s:
            local = select(Device.name).where(Device.executor == "inprocess")
            ids = s.scalars(select(Job.id).where(Job.state == "queued", Job.device.in_(local))
                            .order_by(Job.created_at).limit(8)).all()
        for job_id in ids:
            if claim(self.settings, job_id, self.worker):
                return job_id
        return None

    def _loop(self) -> None:
        last_recovery = time.monotonic()
        while not self._stop.is_set():
            try:
                if time.monotonic() - last_recovery > self.settings.stale_after_s / 2:
                    last_recovery = time.monotonic()
                    recover_stale(self.settings, own_worker_prefix=self.worker)
                job_id = self._next_job()
                if job_id is None:
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    continue
                state = run_claimed(self.settings, job_id, self.worker, self._stop)
                log.info("job %s: %s", job_id, state)
            except Exception:  # a database hiccup must not kill the pool
                log.exception("worker loop error")
                self._stop.wait(2.0)
