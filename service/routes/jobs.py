"""/v1/jobs: submit optimize/profile jobs, follow them, cancel them, download their artifacts."""
from __future__ import annotations

import logging
import math
import re
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from latprune.options import BUDGETS, OptimizeOptions
from latprune.pipeline import check_options
from latprune.service import worker
from latprune.service.db import Artifact, CalibrationFile, Device, Job, ModelFile, new_id, now
from latprune.service.routes.deps import (ApiError, CallerDep, SessionDep, SettingsDep, StorageDep, checked_id,
                                          device_name, error_responses, not_found)
from latprune.service.schemas import ArtifactOut, JobCreate, JobOut, JobState
from latprune.service.storage import ARTIFACT_NAMES
from latprune.types import InputError

log = logging.getLogger("latprune.service.api")

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=error_responses(401, 422))

# Job columns, not pipeline options.
NOT_OPTIONS = {"kind", "model_id", "calibration_id", "device"}


def artifact_out(job_id: str, a: Artifact) -> ArtifactOut:
    return ArtifactOut(name=a.name, size_bytes=a.size_bytes, sha256=a.sha256, media_type=a.media_type,
                       url=f"/v1/jobs/{job_id}/artifacts/{a.name}")


def job_out(job: Job, artifacts: list[Artifact]) -> JobOut:
    return JobOut(id=job.id, kind=job.kind, device=job.device, model_id=job.model_id,
                  calibration_id=job.calibration_id, options=job.options or {}, state=job.state,
                  stage=job.stage, progress=job.progress, message=job.message, error=job.error,
                  attempts=job.attempts, cancel_requested=bool(job.cancel_requested),
                  created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
                  result=job.result or {}, artifacts=[artifact_out(job.id, a) for a in artifacts])


def artifacts_of(session, job_id: str) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)).all())


def owned_job(session, caller, job_id: str) -> Job:
    checked_id(job_id, "job")
    job = session.get(Job, job_id)
    if job is None or job.owner_id != caller.user_id:
        raise not_found("job")
    return job


def check_job_options(body: JobCreate) -> None:
    """The pipeline's own option checks (pipeline.check_options); InputError -> 422."""
    budgets = [b for b in BUDGETS if getattr(body, b) is not None]
    fields = body.model_dump(exclude=NOT_OPTIONS)
    if body.kind == "profile":
        if budgets:
            raise ApiError(422, f"a profile job takes no budget (got {', '.join(budgets)})")
        if body.calibration_id is not None:
            raise ApiError(422, "a profile job takes no calibration file")
        fields.update(speedup=1.0, objective="importance", repair="none", importance="l1")
    opts = OptimizeOptions(**fields)
    if body.calibration_id is not None:
        opts.calib = "<calibration upload>"  # placeholder: the data-driven checks need a source
    try:
        check_options(opts)
    except InputError as exc:
        # The pipeline speaks in CLI flags; the API's fields use underscores.
        message = str(exc).replace("--calib FILE.npz (or --calib noise for the zero-data mode)",
                                   "calibration_id (upload a .npz to /v1/calibration)")
        message = re.sub(r"--([a-z]+(?:-[a-z]+)*)", lambda m: m.group(1).replace("-", "_"), message)
        raise ApiError(422, message) from None


@router.post("", status_code=201, response_model=JobOut, responses=error_responses(404, 413, 429, 503))
def submit_job(body: JobCreate, request: Request, session: SessionDep, caller: CallerDep,
               settings: SettingsDep) -> JobOut:
    """Queue a job. `optimize` needs exactly one of budget_ms, speedup, flops_ratio, params_ratio;
    `profile` takes none. The objective `distortion`, repair and activation/taylor importance need
    calibration inputs (calibration_id)."""
    wait = request.app.state.rate_limiter.check(caller.token_id)
    if wait > 0:
        raise ApiError(429, f"more than {settings.jobs_per_minute} job submissions per minute; retry later",
                       headers={"Retry-After": str(max(1, math.ceil(wait)))})
    check_job_options(body)
    model = session.get(ModelFile, checked_id(body.model_id, "model"))
    if model is None or model.owner_id != caller.user_id:
        raise not_found("model")
    if (model.summary or {}).get("layers", (model.summary or {}).get("conv_layers")) == 0:
        raise ApiError(422, "the model has no layers to prune or profile (no Conv, Gemm or MatMul with "
                            "constant weights)")
    if body.calibration_id is not None:
        cal = session.get(CalibrationFile, checked_id(body.calibration_id, "calibration file"))
        if cal is None or cal.owner_id != caller.user_id:
            raise not_found("calibration file")
    device = body.device or settings.local_device
    dev = session.get(Device, device_name(device))
    if dev is None:
        raise not_found(f"device {device!r}")
    if dev.executor == "inprocess" and settings.executor != "inprocess":
        raise ApiError(409, f"device {device!r} is run by an in-process worker, and this server runs with the "
                            f"{settings.executor} executor; choose a device served by an agent (GET /v1/devices)")
    job = Job(id=new_id("job"), owner_id=caller.user_id, kind=body.kind, device=device, model_id=model.id,
              calibration_id=body.calibration_id, options=body.model_dump(exclude=NOT_OPTIONS),
              state="queued", stage="queued")
    session.add(job)
    try:
        session.commit()
    except IntegrityError:  # its model or calibration file was deleted meanwhile
        session.rollback()
        raise not_found("model or calibration file") from None
    try:
        worker.enqueue(settings, job.id, device)
    except Exception as exc:  # the queue (Redis) is down: do not leave a job nobody will run
        log.exception("could not enqueue job %s", job.id)
        session.execute(update(Job).where(Job.id == job.id, Job.state == "queued").values(
            state="failed", stage="failed", finished_at=now(), error=f"could not be queued: {type(exc).__name__}"))
        session.commit()
        raise ApiError(503, "the job queue is unavailable; try again later") from None
    log.info("job %s (%s on %s) queued by %s", job.id, job.kind, device, caller.user_name)
    return job_out(job, [])


@router.get("", response_model=list[JobOut])
def list_jobs(session: SessionDep, caller: CallerDep, state: JobState | None = None,
              limit: Annotated[int, Query(ge=1, le=200)] = 50) -> list[JobOut]:
    """Your jobs, newest first."""
    q = select(Job).where(Job.owner_id == caller.user_id)
    if state is not None:
        q = q.where(Job.state == state)
    jobs = session.scalars(q.order_by(Job.created_at.desc()).limit(limit)).all()
    by_job: dict[str, list[Artifact]] = {j.id: [] for j in jobs}
    if jobs:
        for a in session.scalars(select(Artifact).where(Artifact.job_id.in_(list(by_job)))
                                 .order_by(Artifact.name)).all():
            by_job[a.job_id].append(a)
    return [job_out(j, by_job[j.id]) for j in jobs]


@router.get("/{job_id}", response_model=JobOut, responses=error_responses(404))
def get_job(job_id: str, session: SessionDep, caller: CallerDep) -> JobOut:
    job = owned_job(session, caller, job_id)
    return job_out(job, artifacts_of(session, job.id))


@router.post("/{job_id}/cancel", response_model=JobOut, responses=error_responses(404, 409))
def cancel_job(job_id: str, session: SessionDep, caller: CallerDep) -> JobOut:
    """A queued job is cancelled at once; a running one is stopped by its worker
    (cancel_requested, then state cancelled); a finished one cannot be cancelled (409)."""
    job = owned_job(session, caller, job_id)
    res = session.execute(update(Job).where(Job.id == job.id, Job.state == "queued").values(
        state="cancelled", stage="cancelled", finished_at=now(), cancel_requested=True))
    if res.rowcount != 1:
        res = session.execute(update(Job).where(Job.id == job.id, Job.state == "running").values(
            cancel_requested=True))
    session.commit()
    session.refresh(job)
    if res.rowcount != 1:
        raise ApiError(409, f"the job has already finished ({job.state})")
    return job_out(job, artifacts_of(session, job.id))


@router.get("/{job_id}/artifacts", response_model=list[ArtifactOut], responses=error_responses(404))
def list_artifacts(job_id: str, session: SessionDep, caller: CallerDep) -> list[ArtifactOut]:
    job = owned_job(session, caller, job_id)
    return [artifact_out(job.id, a) for a in artifacts_of(session, job.id)]


@router.get("/{job_id}/artifacts/{name}", response_class=FileResponse, responses={
    200: {"description": "the file", "content": {"application/octet-stream": {}, "application/json": {},
                                                  "text/html": {}, "text/plain": {}}},
    **error_responses(404)})
def download_artifact(job_id: str, name: str, session: SessionDep, caller: CallerDep,
                      storage: StorageDep) -> FileResponse:
    """Download one artifact: pruned.onnx, plan.json, report.json, report.html, model.engine,
    profile.json or log.txt."""
    job = owned_job(session, caller, job_id)
    if name not in ARTIFACT_NAMES:
        raise not_found("artifact")
    row = session.scalar(select(Artifact).where(Artifact.job_id == job.id, Artifact.name == name).limit(1))
    if row is None:
        raise not_found("artifact")
    path = storage.artifact_path(job.id, name)
    if not path.is_file():
        raise not_found("artifact file")
    headers = {"X-Content-Type-Options": "nosniff"}
    if name.endswith(".html"):
        headers["Content-Security-Policy"] = "sandbox"
    return FileResponse(path, media_type=ARTIFACT_NAMES[name], filename=name, headers=headers)
