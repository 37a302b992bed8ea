"""The device farm for real: a Redis server (tests/servers.py), `latprune agent` worker
subprocesses and `latprune beat`, sharing a SQLite database and data dir with this process.

- a profile job sent with worker.enqueue runs on the agent's device and fills its table;
- the nightly Celery task (run by `latprune beat`) queues a reprofile job that records drift;
- a job survives its agent: SIGTERM hands it back to the queue, SIGKILL leaves it to recovery
  at the next agent's start, which runs it to success;
- lost queue messages are re-sent (resend_queued), nightly never doubles a pending reprofile.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

pytest.importorskip("celery")

from latprune.service import agent as agent_mod  # noqa: E402
from latprune.service import db, worker  # noqa: E402
from latprune.service.settings import Settings  # noqa: E402
from latprune.service.storage import Storage, file_sha256  # noqa: E402

LATPRUNE = Path(sys.executable).parent / "latprune"
DEVICE = "farm-cpu-1"


def _redis_db(url: str, n: int) -> str:
    """The same server, database `n` (keeps this module's queues apart from other tests')."""
    return url.rsplit("/", 1)[0] + f"/{n}"


class Proc:
    """A `latprune ...` subprocess in its own process group, logging to a file."""

    def __init__(self, args: list[str], env: dict, log: Path) -> None:
        self.log = log
        self.fh = open(log, "ab")
        self.proc = subprocess.Popen([str(LATPRUNE), *args], env=env, stdin=subprocess.DEVNULL,
                                     stdout=self.fh, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_log(self, text: str, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if text in self.log.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        pytest.fail(f"{text!r} not in the log of {self.proc.args[1]} (exit {self.proc.poll()}):\n{self.tail()}")

    def signal(self, sig: int, timeout: float = 30) -> int:
        """Send `sig` to the main process only and reap it (a zombie's pid looks alive)."""
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def cleanup(self) -> None:
        """Kill whatever is left of the group (the process, job children, their measurers)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(10)
        finally:
            self.fh.close()


class Farm:
    def __init__(self, home: Path, redis_url: str) -> None:
        self.home = home
        self.settings = Settings(home=home, database_url=f"sqlite:///{home}/db.sqlite", redis_url=redis_url,
                                 executor="celery", heartbeat_s=0.5)
        self.storage = Storage(self.settings.data_path)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LATPRUNE_")}
        self.env.update(LATPRUNE_DATABASE_URL=self.settings.db_url, LATPRUNE_HOME=str(home),
                        LATPRUNE_REDIS_URL=redis_url, LATPRUNE_EXECUTOR="celery", LATPRUNE_HEARTBEAT_S="0.5",
                        PYTHONUNBUFFERED="1")
        self.procs: list[Proc] = []

    def start(self, *args: str, name: str) -> Proc:
        proc = Proc(list(args), self.env, self.home / f"{name}.log")
        self.procs.append(proc)
        return proc

    def start_agent(self) -> Proc:
        agent = self.start("agent", "--device", DEVICE, "--loglevel", "info", name=f"agent-{len(self.procs)}")
        agent.wait_log(f"{DEVICE}@")  # the banner: registered, recovered, now consuming
        return agent

    def job(self, job_id: str) -> db.Job:
        with db.session_scope(self.settings.db_url) as s:
            job = s.get(db.Job, job_id)
            s.expunge(job)
            return job

    def wait_job(self, job_id: str, until, timeout: float, proc: Proc | None = None) -> db.Job:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            job = self.job(job_id)
            if until(job):
                return job
            time.sleep(0.1)
        logs = proc.tail() if proc else "\n".join(p.tail(15) for p in self.procs)
        pytest.fail(f"job {job_id} still {job.state} / {job.stage!r} / {job.error!r} after {timeout} s:\n{logs}")

    def add_model(self, model: onnx.ModelProto) -> tuple[str, str]:
        """A ModelFile row of a user and its file in the data dir; returns (user id, model id)."""
        with db.session_scope(self.settings.db_url) as s:
            user = db.get_or_create_user(s, "farm-tester")
            row = db.ModelFile(id=db.new_id("mdl"), owner_id=user.id, name="m.onnx", sha256="", size_bytes=0)
            path = self.storage.model_path(row.id)
            onnx.save(model, str(path))
            row.sha256, row.size_bytes = file_sha256(path), path.stat().st_size
            s.add(row)
            return user.id, row.id

    def submit(self, kind: str, owner: str | None, model_id: str | None, options: dict) -> str:
        with db.session_scope(self.settings.db_url) as s:
            job = db.Job(id=db.new_id("job"), owner_id=owner, kind=kind, device=DEVICE, model_id=model_id,
                         options=options, state="queued", stage="queued")
            s.add(job)
        worker.enqueue(self.settings, job.id, DEVICE)
        return job.id


@pytest.fixture(scope="module")
def farm(redis_url, tmp_path_factory):
    farm = Farm(tmp_path_factory.mktemp("farm"), _redis_db(redis_url, 3))
    try:
        yield farm
    finally:
        for proc in farm.procs:
            proc.cleanup()
        for app in agent_mod._apps.values():
            app.close()
        agent_mod._apps.clear()
        db.dispose_all()


@pytest.fixture(scope="module")
def farm_model(farm) -> tuple[str, str]:
    from onnx_builders import residual_cnn

    return farm.add_model(residual_cnn(blocks=1, width=8))


@pytest.fixture(scope="module")
def running_agent(farm):
    return farm.start_agent()


def test_profile_job_runs_on_the_agent(farm, farm_model, running_agent):
    from latprune.lut.exchange import summary

    with db.session_scope(farm.settings.db_url) as s:
        dev = s.get(db.Device, DEVICE)
        assert (dev.executor, dev.queue, dev.backend) == ("celery", f"device.{DEVICE}", "ort-cpu")
        assert dev.fingerprint["device"] == "cpu" and not dev.has_tensorrt
    owner, model_id = farm_model
    job_id = farm.submit("profile", owner, model_id, {"threads": 1})
    job = farm.wait_job(job_id, lambda j: j.state not in ("queued", "running"), 60, running_agent)
    assert job.state == "succeeded", (job.error, running_agent.tail())
    assert job.attempts == 1 and job.worker.split(":")[1] == str(running_agent.proc.pid)
    assert job.result["cells_measured"] > 0
    cells = sum(t["cells"] for t in summary(farm.storage.lut_path(DEVICE)))
    assert cells == job.result["cells_total"] > 0
    with db.session_scope(farm.settings.db_url) as s:
        names = [a.name for a in s.query(db.Artifact).filter(db.Artifact.job_id == job_id)]
    assert names == ["profile.json"]
    assert json.loads(farm.storage.artifact_path(job_id, "profile.json").read_text())["cells_measured"] > 0
    # a duplicate message (e.g. re-sent after a suspected loss) is harmless: the claim fails
    from latprune.service.celery_app import RUN_JOB
    res = agent_mod.get_app(farm.settings).send_task(RUN_JOB, args=[job_id], queue=f"device.{DEVICE}")
    assert res.get(timeout=30) == "skipped"
    assert farm.job(job_id).attempts == 1


def test_nightly_task_reprofiles_and_records_drift(farm, farm_model, running_agent):
    from latprune.service.celery_app import DEFAULT_QUEUE, NIGHTLY

    beat = farm.start("beat", "--loglevel", "info", name="beat")
    beat.wait_log("latprune-beat@")
    res = agent_mod.get_app(farm.settings).send_task(NIGHTLY, queue=DEFAULT_QUEUE)
    out = res.get(timeout=30)
    assert len(out["queued"]) == 1 and out["skipped"] == {} and out["unsent"] == []
    job_id = out["queued"][0]
    # a second run while it is pending (queued or running) queues nothing more
    again = agent_mod.queue_nightly(farm.settings)
    if farm.job(job_id).state in ("queued", "running"):
        assert again["queued"] == [] and "already" in again["skipped"][DEVICE]
    else:  # finished in between: a fresh one was queued, as it should
        job_id = again["queued"][0]
    job = farm.wait_job(job_id, lambda j: j.state not in ("queued", "running"), 60, running_agent)
    assert job.state == "succeeded", (job.error, running_agent.tail())
    assert job.kind == "reprofile" and job.owner_id is None
    assert job.options == {"max_cells": 200, "threads": 1}
    with db.session_scope(farm.settings.db_url) as s:
        ups = s.query(db.TableUpload).filter(db.TableUpload.device == DEVICE).all()
        assert [u.source for u in ups] == ["nightly"] * len(ups) and ups
        assert all(u.drift["compared"] > 0 and u.cells == u.drift["compared"] for u in ups)
        assert all("median_abs_change" in u.drift for u in ups)
    assert job.result["drift"]["compared"] > 0
    beat.signal(signal.SIGTERM)


def test_job_survives_its_agent(farm, farm_model, running_agent):
    """SIGTERM: the agent hands the running job back (queued, its run not counted) and the
    message is re-sent. SIGKILL: the next agent's start requeues it (dead pid) and runs it."""
    owner, model_id = farm_model
    job_id = farm.submit("optimize", owner, model_id, {"speedup": 1.3, "threads": 1})

    def started(j):  # the job's child process runs (past the claim)
        return j.state == "running" and j.stage != "starting"

    farm.wait_job(job_id, started, 30, running_agent)
    t0 = time.monotonic()
    assert running_agent.signal(signal.SIGTERM, timeout=30) == 0
    assert time.monotonic() - t0 < 15, "the agent waited for the job instead of handing it back"
    job = farm.job(job_id)
    assert (job.state, job.attempts, job.worker) == ("queued", 0, ""), running_agent.tail()

    second = farm.start_agent()
    job = farm.wait_job(job_id, started, 30, second)
    assert job.attempts == 1
    second.signal(signal.SIGKILL)
    assert farm.job(job_id).state == "running"  # nobody knows yet

    third = farm.start_agent()
    job = farm.wait_job(job_id, lambda j: j.state not in ("queued", "running"), 90, third)
    assert job.state == "succeeded", (job.error, third.tail())
    assert job.attempts == 2 and job.worker.split(":")[1] == str(third.proc.pid)
    assert farm.storage.artifact_path(job_id, "pruned.onnx").is_file()
    assert job.result["meets_budget"] in (True, False)


def test_lost_messages_are_resent_and_nightly_skips_pending(redis_url, tmp_path):
    """No agent: a celery device's queued job whose message vanished (Redis restarted without
    persistence) is sent again; one whose message still waits is not."""
    import redis

    url = _redis_db(redis_url, 4)
    settings = Settings(home=tmp_path, database_url=f"sqlite:///{tmp_path}/db.sqlite", redis_url=url)
    storage = Storage(settings.data_path)
    r = redis.Redis.from_url(url)
    try:
        r.flushdb()
        with db.session_scope(settings.db_url) as s:
            s.add(db.Device(name="idle-dev", executor="celery", queue="device.idle-dev"))
            s.add(db.Device(name="no-table", executor="celery", queue="device.no-table"))
        shutil.copyfile(Path(__file__), storage.lut_path("idle-dev"))  # exists: that is all nightly checks
        out = agent_mod.queue_nightly(settings)
        assert len(out["queued"]) == 1 and out["skipped"] == {"no-table": "no latency table yet"}
        job_id = out["queued"][0]
        again = agent_mod.queue_nightly(settings)
        assert again["queued"] == [] and "already" in again["skipped"]["idle-dev"]
        assert r.llen("device.idle-dev") == 1
        assert agent_mod.resend_queued(settings, older_than_s=0) == []  # its message still waits
        assert agent_mod.resend_queued(settings, older_than_s=3600) == []  # too young to be lost
        r.flushdb()  # the broker lost everything
        assert agent_mod.resend_queued(settings, older_than_s=0) == [job_id]
        msg = json.loads(r.lindex("device.idle-dev", 0))
        assert msg["headers"]["task"] == "latprune.run_job" and msg["headers"]["argsrepr"] == repr([job_id])
    finally:
        r.flushdb()
        r.close()
        for app in agent_mod._apps.values():
            app.close()
        agent_mod._apps.clear()
