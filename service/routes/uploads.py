"""Streaming uploads of raw files (models, calibration data), shared by both routes.

The body is streamed chunk by chunk into DATA/tmp (Storage.receive), never buffered in memory;
a Content-Length over the limit is refused before reading anything. The file is inspected
(in a child process for models), then moved to its final name DATA/<kind>/<id>.<ext>.
"""
from __future__ import annotations

import logging
import os
import unicodedata
from pathlib import Path
from typing import Callable

from fastapi import Request
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from latprune.service.db import CalibrationFile, Job, ModelFile, new_id
from latprune.service.routes.deps import ApiError, Caller
from latprune.service.storage import Storage, UploadTooLarge
from latprune.types import InputError

log = logging.getLogger("latprune.service.api")

UploadRow = ModelFile | CalibrationFile
NAME_MAX = 255
RAW_BODY = {"requestBody": {"required": True, "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


def display_name(raw: str | None, default: str) -> str:
    """A name for display only: printable characters, whitespace collapsed, at most 255."""
    if not raw:
        return default
    text = raw[: 4 * NAME_MAX].encode("utf-8", "replace").decode("utf-8")
    text = "".join(" " if ch.isspace() else ch for ch in text
                   if ch.isspace() or (ch.isprintable() and unicodedata.category(ch) not in ("Cs", "Co")))
    text = " ".join(text.split())[:NAME_MAX].strip()
    return text or default


def content_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    if not value.isdigit() or len(value) > 20:
        raise ApiError(400, "invalid Content-Length header")
    return int(value)


async def receive_body(request: Request, storage: Storage, suffix: str, limit_bytes: int) -> tuple[Path, int, str]:
    """Stream the request body into a temp file; 413 past the limit (nothing is left behind)."""
    length = content_length(request)
    too_large = f"the upload is larger than the limit of {limit_bytes // 2**20} MB"
    if length is not None and length > limit_bytes:
        raise ApiError(413, too_large)
    try:
        tmp, size, sha = await storage.receive(request.stream(), suffix, limit_bytes)
    except UploadTooLarge:
        raise ApiError(413, too_large) from None
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected during the upload") from None
    if size == 0:
        tmp.unlink(missing_ok=True)
        raise ApiError(400, "empty body: send the file's bytes as the request body "
                            "(curl --data-binary @FILE -H 'Content-Type: application/octet-stream')")
    return tmp, size, sha


async def store_upload(request: Request, session: Session, caller: Caller, storage: Storage, *,
                       table: type[UploadRow], prefix: str, suffix: str, name: str,
                       limit_bytes: int, inspect: Callable[[Path], dict],
                       final_path: Callable[[str], Path]) -> tuple[UploadRow, bool]:
    """Receive, deduplicate (same owner and sha256), inspect and record an upload.
    Returns (row, created)."""
    tmp, size, sha = await receive_body(request, storage, suffix, limit_bytes)
    try:
        def existing() -> UploadRow | None:
            return session.scalar(select(table).where(table.owner_id == caller.user_id, table.sha256 == sha)
                                  .order_by(table.created_at).limit(1))

        row = await run_in_threadpool(existing)
        if row is not None and final_path(row.id).is_file():
            return row, False
        try:
            summary = await run_in_threadpool(inspect, tmp)
        except InputError as exc:
            raise ApiError(400, str(exc) or "the file was rejected") from None
        row_id = new_id(prefix)
        dest = final_path(row_id)
        os.replace(tmp, dest)
        row = table(id=row_id, owner_id=caller.user_id, name=name, sha256=sha, size_bytes=size,
                    summary=summary)

        def commit() -> None:
            session.add(row)
            session.commit()

        try:
            await run_in_threadpool(commit)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            metrics.upload_bytes.labels(kind={"mdl": "model", "cal": "calibration"}.get(prefix, prefix)).inc(size)
        log.info("upload %s by %s: %d bytes", row_id, caller.user_name, size)
        return row, True
    finally:
        tmp.unlink(missing_ok=True)


def delete_upload(session: Session, row: UploadRow, ref_column, what: str, path: Path) -> None:
    """Delete an uploaded file's row and file. Refused (409) while a queued or running job
    uses it; finished jobs keep their artifacts and lose the reference. A job submitted for it
    at the same moment makes the foreign key refuse the delete: also a 409, never a 500."""
    from sqlalchemy import update
    from sqlalchemy.exc import IntegrityError

    active = Job.state.in_(("queued", "running"))
    busy = session.scalar(select(Job).where(ref_column == row.id, active).limit(1))
    if busy is not None:
        raise ApiError(409, f"the {what} is used by job {busy.id} ({busy.state}); cancel it first")
    session.execute(update(Job).where(ref_column == row.id, ~active).values({ref_column.key: None}))
    session.delete(row)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise ApiError(409, f"the {what} is used by a job submitted meanwhile; cancel it first") from None
    path.unlink(missing_ok=True)
