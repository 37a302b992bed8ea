"""/v1/devices/{name}/tables: a device's latency table (summary, drift history, export) and
uploads of measured cells from its agent (lut.exchange JSON, merged with drift detection)."""
from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from latprune.lut import exchange
from latprune.service.db import TableUpload
from latprune.service.routes.deps import (AgentDep, ApiError, CallerDep, SessionDep, SettingsDep, StorageDep,
                                          error_responses)
from latprune.service.routes.devices import existing_device, table_summary
from latprune.service.routes.uploads import content_length
from latprune.service.schemas import MergeOut, TablesOut, TableUploadOut
from latprune.types import InputError

log = logging.getLogger("latprune.service.api")

router = APIRouter(prefix="/v1/devices", tags=["tables"], responses=error_responses(401, 404))

MAX_PROBLEMS = 50
EXCHANGE_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["format", "version", "tables"],
    "properties": {"format": {"type": "string", "enum": [exchange.FORMAT]},
                   "version": {"type": "integer", "enum": [exchange.VERSION]},
                   "tables": {"type": "array", "items": {"type": "object"}}}}}}}}


@router.get("/{name}/tables", response_model=TablesOut)
def get_tables(name: str, session: SessionDep, caller: CallerDep, storage: StorageDep) -> TablesOut:
    """The device's table summary (per fingerprint) and its last 50 uploads with their drift."""
    device = existing_device(session, name)
    rows = session.scalars(select(TableUpload).where(TableUpload.device == device.name)
                           .order_by(TableUpload.created_at.desc(), TableUpload.id.desc()).limit(50)).all()
    uploads = [TableUploadOut(id=r.id, source=r.source, cells=r.cells, drift=r.drift or {}, flagged=bool(r.flagged),
                              created_at=r.created_at) for r in rows]
    return TablesOut(summary=table_summary(storage, device.name), uploads=uploads)


@router.get("/{name}/tables/export", responses={200: {"description": "the lut.exchange JSON object",
                                                      "content": {"application/json": {}}}})
def export_table(name: str, session: SessionDep, caller: CallerDep, storage: StorageDep) -> JSONResponse:
    """The device's whole latency table as a lut.exchange JSON download."""
    device = existing_device(session, name)
    path = storage.lut_path(device.name)
    data: dict[str, Any] = {"format": exchange.FORMAT, "version": exchange.VERSION, "tables": []}
    if path.is_file():
        try:
            data = exchange.export_tables(path)
        except InputError as exc:
            raise ApiError(409, f"the device's table cannot be read: {exc}") from None
    return JSONResponse(data, headers={"Content-Disposition": f'attachment; filename="{device.name}.lut.json"'})


def _reject_constant(token: str) -> float:
    raise ValueError(f"{token} is not allowed")


def _bounded_int(token: str) -> int:
    if len(token.lstrip("-")) > 18:  # beyond any width, run count or timestamp; float() would overflow
        raise ValueError(f"integer {token[:30]}... is out of range")
    return int(token)


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise ValueError(f"{token} overflows")
    return value


async def read_json_body(request: Request, limit_bytes: int) -> tuple[Any, int]:
    """The request body parsed as strict JSON (no NaN/infinity), read with a byte limit;
    and its size in bytes."""
    length = content_length(request)
    too_large = f"the table is larger than the limit of {limit_bytes // 2**20} MB"
    if length is not None and length > limit_bytes:
        raise ApiError(413, too_large)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit_bytes:
                raise ApiError(413, too_large)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected during the upload") from None
    body = b"".join(chunks)
    del chunks
    try:
        data = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float,
                          parse_int=_bounded_int)
        # json accepts lone surrogates ("\ud800"), which could be stored but never sent back
        json.dumps(data, ensure_ascii=False).encode("utf-8")
        return data, size
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeErrors are ValueErrors
        raise ApiError(400, f"the body is not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None


@router.post("/{name}/tables", response_model=MergeOut, openapi_extra=EXCHANGE_BODY,
             responses=error_responses(400, 403, 413))
async def upload_table(name: str, request: Request, session: SessionDep, caller: AgentDep,
                       settings: SettingsDep) -> MergeOut:
    """Merge measured cells (a lut.exchange JSON object) into the device's table (agent tokens
    only); answers with the drift against the cells the table held before."""
    device = await run_in_threadpool(existing_device, session, name)
    data, size = await read_json_body(request, settings.max_table_upload_mb * 2**20)
    problems = exchange.validate_object(data)
    if problems:
        raise ApiError(400, f"invalid table: {problems[0]} ({len(problems)} problem(s))",
                       details=problems[:MAX_PROBLEMS])
    from latprune.service.drift import merge_upload

    try:
        result = await run_in_threadpool(merge_upload, settings, device.name, data)
    except InputError as exc:
        raise ApiError(400, str(exc)) from None
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.upload_bytes.labels(kind="table").inc(size)
    log.info("table upload for %s by %s: %s cells", device.name, caller.user_name, result.get("cells"))
    return MergeOut(**{k: v for k, v in result.items() if k in MergeOut.model_fields})
