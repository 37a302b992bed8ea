"""/v1/calibration: upload calibration inputs (raw .npz body, streamed), list, get, delete."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy import select

from latprune.service.db import CalibrationFile, Job
from latprune.service.inspect import DEFAULT_CALIBRATION_BYTES, inspect_calibration_isolated
from latprune.service.routes.deps import (CallerDep, SessionDep, SettingsDep, StorageDep, checked_id,
                                          error_responses, not_found)
from latprune.service.routes.uploads import RAW_BODY, delete_upload, display_name, store_upload
from latprune.service.schemas import CalibrationOut

router = APIRouter(prefix="/v1/calibration", tags=["calibration"], responses=error_responses(401, 422))

NameQuery = Annotated[str | None, Query(max_length=4096, description="display name (truncated to 255 characters)")]


def calibration_out(row: CalibrationFile) -> CalibrationOut:
    return CalibrationOut(id=row.id, name=row.name, sha256=row.sha256, size_bytes=row.size_bytes,
                          summary=row.summary or {}, created_at=row.created_at)


def owned_calibration(session, caller, cal_id: str) -> CalibrationFile:
    checked_id(cal_id, "calibration file")
    row = session.get(CalibrationFile, cal_id)
    if row is None or row.owner_id != caller.user_id:
        raise not_found("calibration file")
    return row


@router.post("", status_code=201, response_model=CalibrationOut, openapi_extra=RAW_BODY,
             responses={200: {"model": CalibrationOut, "description": "the same file was uploaded before"},
                        **error_responses(400, 413)})
async def upload_calibration(request: Request, response: Response, session: SessionDep, caller: CallerDep,
                             settings: SettingsDep, storage: StorageDep,
                             name: NameQuery = None) -> CalibrationOut:
    """Upload calibration inputs: a numpy .npz whose array `x` (or its only array) is float32
    (N, C, H, W) or uint8 images (N, H, W, C); the request body is the file's bytes."""
    limit = settings.max_upload_mb * 2**20
    # Uncompressed, an archive may hold at most 4x the upload limit (and 2 GiB): no zip bombs.
    unpacked = min(4 * limit, DEFAULT_CALIBRATION_BYTES)
    timeout = settings.inspect_timeout_s
    row, created = await store_upload(
        request, session, caller, storage, table=CalibrationFile, prefix="cal", suffix=".npz",
        name=display_name(name, "calibration.npz"), limit_bytes=limit,
        inspect=lambda path: inspect_calibration_isolated(path, unpacked, timeout),
        final_path=storage.calibration_path)
    if not created:
        response.status_code = 200
    return calibration_out(row)


@router.get("", response_model=list[CalibrationOut])
def list_calibration(session: SessionDep, caller: CallerDep,
                     limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[CalibrationOut]:
    """Your calibration files, newest first."""
    rows = session.scalars(select(CalibrationFile).where(CalibrationFile.owner_id == caller.user_id)
                           .order_by(CalibrationFile.created_at.desc()).limit(limit)).all()
    return [calibration_out(r) for r in rows]


@router.get("/{cal_id}", response_model=CalibrationOut, responses=error_responses(404))
def get_calibration(cal_id: str, session: SessionDep, caller: CallerDep) -> CalibrationOut:
    return calibration_out(owned_calibration(session, caller, cal_id))


@router.delete("/{cal_id}", status_code=204, response_class=Response, responses=error_responses(404, 409))
def delete_calibration(cal_id: str, session: SessionDep, caller: CallerDep, storage: StorageDep) -> Response:
    """Delete a calibration file. Refused (409) while a queued or running job uses it."""
    row = owned_calibration(session, caller, cal_id)
    delete_upload(session, row, Job.calibration_id, "calibration file", storage.calibration_path(row.id))
    return Response(status_code=204)
