"""Liveness (/healthz), readiness (/readyz) and Prometheus metrics (/metrics); no token needed."""
from __future__ import annotations

import logging
import os
import tempfile

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import func, select, text

from latprune.service.db import JOB_STATES, Job, engine_for
from latprune.service.schemas import HealthOut, ReadyOut
from latprune.service.settings import Settings

log = logging.getLogger("latprune.service.api")

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut)
def healthz() -> HealthOut:
    """The process answers (touches nothing else)."""
    return HealthOut(status="ok")


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}".rstrip(": ")


def check_database(settings: Settings) -> str:
    try:
        engine, _ = engine_for(settings.db_url)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return "ok"
    except Exception as exc:
        return _short(exc)


def check_data_dir(settings: Settings) -> str:
    try:
        tmp = settings.data_path / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=tmp, prefix="ready-")
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            os.unlink(name)
        return "ok"
    except Exception as exc:
        return _short(exc)


def check_worker(request: Request, settings: Settings) -> tuple[str, str]:
    if settings.executor == "inprocess":
        pool = getattr(request.app.state, "pool", None)
        return "worker", "ok" if pool is not None and pool.alive() else "the in-process worker pool is not running"
    if settings.executor == "celery":
        try:
            import redis  # lazy: only the Celery executor needs it
        except ImportError:
            return "redis", "the redis package is not installed (pip install redis)"
        try:
            client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
            try:
                client.ping()
            finally:
                client.close()
            return "redis", "ok"
        except Exception as exc:
            return "redis", _short(exc)
    return "worker", f"unknown executor {settings.executor!r}"


@router.get("/readyz", response_model=ReadyOut, responses={503: {"model": ReadyOut, "description": "not ready"}})
def readyz(request: Request) -> JSONResponse:
    """Ready to serve: the database answers, the data dir is writable, the jobs' executor runs."""
    settings: Settings = request.app.state.settings
    checks = {"database": check_database(settings), "data_dir": check_data_dir(settings)}
    key, value = check_worker(request, settings)
    checks[key] = value
    ok = all(v == "ok" for v in checks.values())
    if not ok:
        log.warning("not ready: %s", {k: v for k, v in checks.items() if v != "ok"})
    body = ReadyOut(status="ready" if ok else "not ready", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get("/metrics", response_class=Response,
            responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}})
def metrics(request: Request) -> Response:
    """Prometheus metrics: requests, latency, jobs by state, upload bytes."""
    m = request.app.state.metrics
    settings: Settings = request.app.state.settings
    try:
        _, factory = engine_for(settings.db_url)
        with factory() as session:
            counts = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        m.set_job_counts(counts, JOB_STATES)
    except Exception:  # the scrape still answers with the request metrics
        log.exception("could not count jobs for /metrics")
    return Response(m.render(), media_type=m.content_type)
