"""Running one job: the child process that a worker (in-process pool or Celery agent) starts.

`python -m latprune.service.jobs JOB_ID` loads the job, calls the pipeline (optimize, profile
or the nightly re-profile), records stage and progress in the database as it goes, stores the
artifacts and finishes the job as succeeded or failed. It never decides retries: the worker
that started it (service.worker) watches it, keeps its heartbeat, kills it on cancel and
requeues it if the worker itself died.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from latprune.service.db import Artifact, Device, Job, now, session_scope
from latprune.service.settings import Settings, get_settings
from latprune.service.storage import ARTIFACT_NAMES, Storage, file_sha256
from latprune.options import settings_fields
from latprune.types import InputError, LatpruneError

# Options a job may set: latprune.options.OptimizeSettings, passed on under the same names.
OPTION_FIELDS = settings_fields()


class JobProgress:
    """pipeline.Progress that writes stage and progress to the job row (at most 2 writes/s
    for progress; every stage change is written)."""

    def __init__(self, settings: Settings, job_id: str) -> None:
        self.settings, self.job_id = settings, job_id
        self._last = 0.0
        self._stage = ""

    def _write(self, **fields) -> None:
        with session_scope(self.settings.db_url) as s:
            job = s.get(Job, self.job_id)
            for k, v in fields.items():
                setattr(job, k, v)

    def stage(self, name: str) -> None:
        self._stage = name
        self._write(stage=name[:255], progress=0.0)

    def advance(self, done: int, total: int) -> None:
        t = time.monotonic()
        if done >= total or t - self._last >= 0.5:
            self._last = t
            self._write(progress=done / max(total, 1))

    def info(self, message: str) -> None:
        self._write(message=message[:2000])


def _die_with_parent() -> None:
    """Linux: when the worker that started us dies, take our whole process group down (the
    job and the timing processes it started), so a killed server leaves no orphan job running
    beside the retry it will start after a restart, nor a timing process disturbing it.
    The worker starts us as the leader of a new process group (start_new_session)."""
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(os.getpgrp(), signal.SIGKILL))
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() == 1:  # the worker died before prctl took effect
        os.killpg(os.getpgrp(), signal.SIGKILL)


def device_backend_name(device: Device | None) -> str:
    """The backend registry name of a device's runtime (older rows say onnxruntime-cpu)."""
    from latprune.profiler.backends import canonical_name

    return canonical_name(device.backend if device is not None and device.backend else "ort-cpu")


def optimize_options(job: Job, calib_path: Path | None, lut_path: Path, device: Device | None = None):
    """The pipeline's options for a job on its device's backend; the report names the job's
    ids, not the server's files."""
    from latprune.pipeline import OptimizeOptions

    fields = {k: job.options[k] for k in OPTION_FIELDS if job.options.get(k) is not None}
    return OptimizeOptions(lut_path=lut_path, calib=str(calib_path) if calib_path else None,
                           backend=device_backend_name(device),
                           measure_processes=2, model_label=job.model_id, lut_label=f"device {job.device}",
                           calib_label=job.calibration_id, **fields)


def _store_artifacts(settings: Settings, storage: Storage, job_id: str, src: Path) -> list[str]:
    """Move the known artifact files from `src` into the job dir and record them."""
    dst = storage.job_dir(job_id)
    dst.mkdir(parents=True, exist_ok=True)
    names = [n for n in ARTIFACT_NAMES if (src / n).is_file()]
    with session_scope(settings.db_url) as s:
        for old in s.query(Artifact).filter(Artifact.job_id == job_id).all():
            s.delete(old)
        for name in names:
            os.replace(src / name, dst / name)
            s.add(Artifact(job_id=job_id, name=name, size_bytes=(dst / name).stat().st_size,
                           sha256=file_sha256(dst / name), media_type=ARTIFACT_NAMES[name]))
    return names


def _summary(report: dict) -> dict:
    keys = ("dense_ms", "budget_ms", "predicted_ms", "measured_ms", "meets_budget", "speedup",
            "prediction_error", "solver", "wall_seconds", "warnings", "budget", "backend")
    return {k: report[k] for k in keys if k in report}


def run(job_id: str, settings: Settings | None = None) -> int:
    """Execute one claimed job. Returns the process exit code (0: finished, succeeded or failed
    for a reason the user can act on; 1: an internal error, also recorded)."""
    settings = settings or get_settings()
    storage = Storage(settings.data_path)
    progress = JobProgress(settings, job_id)
    with session_scope(settings.db_url) as s:
        job = s.get(Job, job_id)
        if job is None or job.state != "running":
            print(f"job {job_id} is not running (state {job and job.state}); nothing to do", file=sys.stderr)
            return 0
        device = s.get(Device, job.device)
        s.expunge_all()
    work = storage.job_dir(job_id) / ".work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # The pipeline's temporary files (and its timing processes') go inside the job's dir, so a
    # killed job leaves nothing in /tmp; its retry starts by clearing the dir.
    (work / "tmp").mkdir()
    os.environ["TMPDIR"] = str(work / "tmp")
    tempfile.tempdir = None
    try:
        result = _execute(settings, storage, job, device, work, progress)
        names = _store_artifacts(settings, storage, job_id, work)
        _finish(settings, job_id, "succeeded", result=result, stage=f"done: {', '.join(names)}")
        return 0
    except LatpruneError as exc:
        _finish(settings, job_id, "failed", error=_scrub(settings, " ".join(str(exc).split()))[:4000])
        return 0
    except Exception as exc:  # the user gets one scrubbed line; the operator the traceback
        log_dir = settings.home / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / f"{job_id}.log").write_text(traceback.format_exc())
        _finish(settings, job_id, "failed", error=_scrub(
            settings, f"internal error: {type(exc).__name__}: {exc} (traceback in the server's "
                      f"logs/{job_id}.log)")[:4000])
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _execute(settings: Settings, storage: Storage, job: Job, device: Device, work: Path,
             progress: JobProgress) -> dict:
    from latprune import pipeline

    lut_path = storage.lut_path(job.device)
    if job.kind == "reprofile":
        from latprune.service.drift import reprofile_device
        return reprofile_device(settings, job.device, job.options, progress)
    if job.model_id is None or not storage.model_path(job.model_id).is_file():
        raise InputError("the job's model was deleted")
    model_path = storage.model_path(job.model_id)
    if job.kind == "profile":
        threads = int(job.options.get("threads") or 1)
        result = pipeline.profile_model(model_path, lut_path, threads=threads, progress=progress,
                                        timing=job.options.get("timing") or "in-graph",
                                        backend=device_backend_name(device),
                                        precision=job.options.get("precision"), step=job.options.get("step"))
        result["lut"] = f"device {job.device}"
        (work / "profile.json").write_text(json.dumps(result, indent=1))
        return result
    calib = storage.calibration_path(job.calibration_id) if job.calibration_id else None
    report = pipeline.optimize(model_path, work, optimize_options(job, calib, lut_path, device), progress)
    return _summary(report)


def _scrub(settings: Settings, text: str) -> str:
    """Server paths out of a message for the user: stored files by their ids, other absolute
    paths by their last component."""
    import re

    data = re.escape(str(settings.data_path.resolve()))
    text = re.sub(data + r"/(?:models|calibration)/(\w+)\.\w+", r"\1", text)
    text = re.sub(data + r"/jobs/(\w+)(?:/\.work)?", r"job \1", text)
    return re.sub(r"(?<![\w.])/(?:[\w.+-]+/)+([\w.+-]+)", r"\1", text)


def _finish(settings: Settings, job_id: str, state: str, result: dict | None = None, error: str = "",
            stage: str | None = None) -> None:
    with session_scope(settings.db_url) as s:
        job = s.get(Job, job_id)
        job.state = state
        job.finished_at = now()
        job.error = error
        job.progress = 1.0 if state == "succeeded" else job.progress
        job.stage = stage or state
        if result is not None:
            job.result = result


if __name__ == "__main__":
    _die_with_parent()
    sys.exit(run(sys.argv[1]))
