"""The job workers: a real child process per job, progress in the database, cancel, and the
recovery of jobs whose worker died (requeue, then fail after job_attempts runs)."""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import onnx
import pytest

from latprune.service import worker
from latprune.service.db import Base, engine_for, Artifact, Device, Job, ModelFile, dispose_all, get_or_create_user, session_scope
from latprune.service.settings import Settings
from latprune.service.storage import Storage
from onnx_builders import residual_cnn


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request, tmp_path):
    """Every worker test runs on the default SQLite file and on a real PostgreSQL server."""
    yield from _settings(request, tmp_path)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def heavy_settings(request, tmp_path):
    """As `settings`, for the tests that profile or run whole jobs (30 s or more each): their
    PostgreSQL variant is opt-in (-m slow); the cheaper tests cover PostgreSQL by default."""
    yield from _settings(request, tmp_path)


def _settings(request, tmp_path):
    url = ""
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_url")
        fresh_database(url)
    s = Settings(home=tmp_path, database_url=url, heartbeat_s=0.3, stale_after_s=2.0)
    Storage(s.data_path)
    worker.register_local_device(s)
    yield s
    dispose_all()


def fresh_database(url: str) -> None:
    engine, _ = engine_for(url)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)


def _model_job(settings: Settings, kind: str = "profile", options: dict | None = None) -> str:
    with session_scope(settings.db_url) as s:
        user = get_or_create_user(s, "alice")
        model = ModelFile(owner_id=user.id, name="r", sha256="0" * 64, size_bytes=1, summary={})
        s.add(model)
        s.flush()
        onnx.save(residual_cnn(), str(Storage(settings.data_path).model_path(model.id)))
        job = Job(owner_id=user.id, kind=kind, device=settings.local_device, model_id=model.id,
                  options=options or {})
        s.add(job)
        s.flush()
        return job.id


def _wait(settings: Settings, job_id: str, states: tuple[str, ...], timeout: float = 120) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope(settings.db_url) as s:
            job = s.get(Job, job_id)
            if job.state in states:
                s.expunge(job)
                return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not reach {states} in {timeout} s (state {job.state}, {job.stage})")


def test_profile_job_runs_in_a_child_process(heavy_settings):
    settings = heavy_settings
    job_id = _model_job(settings, "profile")
    assert worker.claim(settings, job_id, worker.worker_id())
    assert not worker.claim(settings, job_id, worker.worker_id()), "a job is claimed once"
    state = worker.run_claimed(settings, job_id, _claimed_by(settings, job_id))
    assert state == "succeeded"
    job = _wait(settings, job_id, ("succeeded",))
    assert job.attempts == 1 and job.progress == 1.0 and job.result["cells_measured"] > 0
    with session_scope(settings.db_url) as s:
        names = {a.name for a in s.query(Artifact).filter(Artifact.job_id == job_id)}
    assert names == {"profile.json"}
    art = Storage(settings.data_path).artifact_path(job_id, "profile.json")
    assert json.loads(art.read_text())["cells_measured"] == job.result["cells_measured"]
    assert Storage(settings.data_path).lut_path(settings.local_device).is_file()


def test_nightly_reprofile_retimes_in_graph_cells_through_the_devices_models(heavy_settings):
    settings = heavy_settings
    """In-graph cells are re-timed inside pruned copies of the model the device profiled; with
    that model gone, the job says so instead of reporting a drift of nothing."""
    from latprune.pipeline import Progress
    from latprune.service.drift import reprofile_device
    from latprune.types import InputError

    job_id = _model_job(settings, "profile")
    assert worker.claim(settings, job_id, "w")
    assert worker.run_claimed(settings, job_id, "w") == "succeeded"
    out = reprofile_device(settings, settings.local_device, {"threads": 1, "max_cells": 50}, Progress())
    assert 0 < out["cells"] <= 50 and out["drift"]["compared"] == out["cells"]
    with session_scope(settings.db_url) as s:
        model_id = s.get(Job, job_id).model_id
    Storage(settings.data_path).model_path(model_id).unlink()
    with pytest.raises(InputError, match="could be re-timed"):
        reprofile_device(settings, settings.local_device, {"threads": 1}, Progress())


def _stage(settings, job_id) -> str:
    with session_scope(settings.db_url) as s:
        return s.get(Job, job_id).stage


def _claimed_by(settings, job_id):
    with session_scope(settings.db_url) as s:
        return s.get(Job, job_id).worker


def _job_processes(settings) -> list[int]:
    """Pids of job and timing processes started for this test's service home (their environment
    carries LATPRUNE_HOME): other latprune processes on the machine (a bench) are not counted."""
    import psutil

    left = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "latprune.profiler.compare" not in cmd and "latprune.service.jobs" not in cmd:
            continue
        try:
            if proc.environ().get("LATPRUNE_HOME") == str(settings.home):
                left.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return left


def test_pool_runs_queued_jobs_and_cancel_kills_a_running_one(heavy_settings):
    settings = heavy_settings
    pool = worker.WorkerPool(settings)
    pool.start()
    try:
        # optimize is long enough (profiling, calibration runs, several measurements) to cancel
        job_id = _model_job(settings, "optimize", {"speedup": 1.3})
        pool.wake()
        _wait(settings, job_id, ("running",), timeout=30)
        deadline = time.monotonic() + 90
        while "measuring" not in _stage(settings, job_id):  # timing processes are running now
            assert time.monotonic() < deadline, _stage(settings, job_id)
            time.sleep(0.1)
        time.sleep(0.3)
        with session_scope(settings.db_url) as s:
            s.get(Job, job_id).cancel_requested = True
        job = _wait(settings, job_id, ("cancelled", "succeeded", "failed"), timeout=30)
        assert job.state == "cancelled", (job.state, job.error)
        time.sleep(0.5)
        assert _job_processes(settings) == [], "cancel left the job's processes running"
        assert not list(Path(tempfile.gettempdir()).glob(f"latprune-*/{job_id}*"))
        assert pool.alive()
        # the pool keeps going: the next job runs to the end
        job2 = _model_job(settings, "profile")
        pool.wake()
        assert _wait(settings, job2, ("succeeded", "failed")).state == "succeeded"
    finally:
        pool.stop()


def test_a_failing_job_records_a_clear_error(settings):
    job_id = _model_job(settings, "optimize", {"budget_ms": 1e-6})  # impossible budget
    assert worker.claim(settings, job_id, "w")
    assert worker.run_claimed(settings, job_id, "w") == "failed"
    job = _wait(settings, job_id, ("failed",))
    assert "budget" in job.error and "internal error" not in job.error
    assert str(settings.home) not in job.error


def test_errors_for_users_carry_no_server_paths(settings):
    from latprune.service.jobs import _scrub

    data = settings.data_path.resolve()
    text = (f"{data}/calibration/cal_0123456789abcdef0123.npz: bad shape; {data}/jobs/job_0123456789abcdef0123/.work/x "
            f"and /usr/lib/python3/site-packages/onnx/checker.py")
    out = _scrub(settings, text)
    assert "cal_0123456789abcdef0123: bad shape" in out and "job job_0123456789abcdef0123" in out
    assert str(data) not in out and "/usr" not in out and out.endswith("and checker.py"), out


def _orphan(settings, job_id, worker_name: str, heartbeat_age: float = 0.0, attempts: int = 1):
    with session_scope(settings.db_url) as s:
        job = s.get(Job, job_id)
        job.state, job.worker, job.attempts = "running", worker_name, attempts
        job.heartbeat_at = time.time() - heartbeat_age


def test_recovery_requeues_jobs_of_dead_workers_then_gives_up(settings):
    job_id = _model_job(settings)
    # A worker pid on this host that no longer exists: recovered at once.
    dead = f"{worker.HOST}:{_dead_pid()}:abc"
    _orphan(settings, job_id, dead)
    assert worker.recover_stale(settings) == [job_id]
    job = _wait(settings, job_id, ("queued",))
    assert "died" in job.message and job.worker == ""
    # A live worker elsewhere with a fresh heartbeat is left alone; a stale one is recovered.
    _orphan(settings, job_id, "otherhost:1:x", heartbeat_age=0.5)
    assert worker.recover_stale(settings) == []
    _orphan(settings, job_id, "otherhost:1:x", heartbeat_age=10.0)
    assert worker.recover_stale(settings) == [job_id]
    # After job_attempts runs it is failed with the reason, never silently dropped.
    _orphan(settings, job_id, dead, attempts=settings.job_attempts)
    assert worker.recover_stale(settings) == []
    job = _wait(settings, job_id, ("failed",))
    assert f"{settings.job_attempts} runs" in job.error


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_local_device_is_registered(settings):
    with session_scope(settings.db_url) as s:
        dev = s.get(Device, settings.local_device)
        assert dev.executor == "inprocess" and dev.fingerprint["device"] == "cpu"


def test_jobs_run_on_their_devices_backend(tmp_path):
    """A job's options name its device's backend (older rows say onnxruntime-cpu / tensorrt);
    the pipeline then builds, measures and returns that backend's artifact (tests/test_openvino.py)."""
    from latprune.service.db import Device as DeviceRow, Job as JobRow
    from latprune.service.jobs import device_backend_name, optimize_options

    assert device_backend_name(DeviceRow(name="a", backend="onnxruntime-cpu")) == "ort-cpu"
    assert device_backend_name(DeviceRow(name="b", backend="tensorrt")) == "trt"
    assert device_backend_name(DeviceRow(name="c", backend="openvino")) == "openvino"
    assert device_backend_name(None) == "ort-cpu"
    job = JobRow(id="job_x", kind="optimize", device="c", model_id="mdl_x",
                 options={"speedup": 2.0, "precision": "f32", "threads": 1})
    opts = optimize_options(job, None, tmp_path / "lut.sqlite", DeviceRow(name="c", backend="openvino"))
    assert opts.backend == "openvino" and opts.precision == "f32" and opts.speedup == 2.0
