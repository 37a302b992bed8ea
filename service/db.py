"""Persistence: SQLAlchemy models and sessions (SQLite by default, PostgreSQL by URL).

Rows hold metadata only; file contents (models, calibration data, artifacts, latency tables)
live under the data dir (service.storage), named by row ids, never by user-given names.
Times are UNIX seconds (float).
"""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator

from sqlalchemy import (JSON, BigInteger, Boolean, Float, ForeignKey, Integer, String, Text, create_engine, event,
                        select)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
JOB_KINDS = ("optimize", "profile", "reprofile")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def now() -> float:
    return time.time()


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class User(Base):
    __tablename__ = "users"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("usr"))
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class Token(Base):
    """An API token; only its SHA-256 is stored (tokens are 256-bit random, so no salt is needed)."""
    __tablename__ = "tokens"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("tok"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # first characters, to tell tokens apart in lists
    role: Mapped[str] = mapped_column(String(16), default="user")  # user | agent
    created_at: Mapped[float] = mapped_column(Float, default=now)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class _Upload:
    """Columns of an uploaded file (the file itself lives in the data dir under the row's id)."""
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(String(255))  # for display only
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # service.inspect's
    created_at: Mapped[float] = mapped_column(Float, default=now)


class ModelFile(_Upload, Base):
    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("mdl"))


class CalibrationFile(_Upload, Base):
    __tablename__ = "calibration_files"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("cal"))


class Device(Base):
    """A target device: the local CPU, or a farm device served by `latprune agent`."""
    __tablename__ = "devices"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    executor: Mapped[str] = mapped_column(String(16), default="inprocess")  # inprocess | celery
    queue: Mapped[str] = mapped_column(String(80), default="")
    backend: Mapped[str] = mapped_column(String(32), default="onnxruntime-cpu")
    fingerprint: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    has_tensorrt: Mapped[bool] = mapped_column(Boolean, default=False)
    last_seen_at: Mapped[float] = mapped_column(Float, default=now)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    owner_id: Mapped[str | None] = mapped_column(ForeignKey("users.id"), index=True, nullable=True)
    kind: Mapped[str] = mapped_column(String(16))
    device: Mapped[str] = mapped_column(ForeignKey("devices.name"))
    model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id"), nullable=True)
    calibration_id: Mapped[str | None] = mapped_column(ForeignKey("calibration_files.id"), nullable=True)
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    stage: Mapped[str] = mapped_column(String(255), default="queued")
    progress: Mapped[float] = mapped_column(Float, default=0.0)  # 0..1 within the current stage
    message: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker: Mapped[str] = mapped_column(String(120), default="")
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=now, index=True)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # report summary


class Artifact(Base):
    __tablename__ = "artifacts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    media_type: Mapped[str] = mapped_column(String(80))


class TableUpload(Base):
    """One upload or nightly re-profile of a device's latency table, with its drift report."""
    __tablename__ = "table_uploads"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device: Mapped[str] = mapped_column(ForeignKey("devices.name"), index=True)
    source: Mapped[str] = mapped_column(String(32))  # upload | nightly
    cells: Mapped[int] = mapped_column(Integer, default=0)
    drift: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    flagged: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float, default=now)


_engines: dict[str, tuple[Engine, sessionmaker]] = {}


def engine_for(url: str) -> tuple[Engine, sessionmaker]:
    """The engine and session factory of a database URL (created once per process)."""
    if url not in _engines:
        # pre-ping (one SELECT 1 per checkout) only where connections can go stale: a server
        # Connections: as many as the API's threadpool (anyio's 40) can use at once, so requests
        # never queue for one (the default 5 + 10 made 50 concurrent clients wait).
        kwargs: dict[str, Any] = {"pool_pre_ping": not url.startswith("sqlite"), "pool_size": 20,
                                  "max_overflow": 30, "pool_timeout": 10}
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            @event.listens_for(engine, "connect")
            def _pragmas(conn, _record):  # WAL: the API and job processes write concurrently
                cur = conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.close()
        Base.metadata.create_all(engine)
        _engines[url] = (engine, sessionmaker(engine, expire_on_commit=False))
    return _engines[url]


def dispose_all() -> None:
    """Forget every engine (after fork, or between tests)."""
    for engine, _ in _engines.values():
        engine.dispose()
    _engines.clear()


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    _, factory = engine_for(url)
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def get_or_create_user(session: Session, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        user = User(name=name)
        session.add(user)
        session.flush()
    return user


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)
