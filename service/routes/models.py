"""/v1/models: upload (raw .onnx body, streamed), list, get, delete. Scoped to the owner."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy import select

from latprune.service.db import Job, ModelFile
from latprune.service.inspect import inspect_model
from latprune.service.routes.deps import (CallerDep, SessionDep, SettingsDep, StorageDep, checked_id,
                                          error_responses, not_found)
from latprune.service.routes.uploads import RAW_BODY, delete_upload, display_name, store_upload
from latprune.service.schemas import ModelOut

router = APIRouter(prefix="/v1/models", tags=["models"], responses=error_responses(401, 422))

NameQuery = Annotated[str | None, Query(max_length=4096, description="display name (truncated to 255 characters)")]


def model_out(row: ModelFile) -> ModelOut:
    return ModelOut(id=row.id, name=row.name, sha256=row.sha256, size_bytes=row.size_bytes,
                    summary=row.summary or {}, created_at=row.created_at)


def owned_model(session, caller, model_id: str) -> ModelFile:
    checked_id(model_id, "model")
    row = session.get(ModelFile, model_id)
    if row is None or row.owner_id != caller.user_id:
        raise not_found("model")
    return row


@router.post("", status_code=201, response_model=ModelOut, openapi_extra=RAW_BODY,
             responses={200: {"model": ModelOut, "description": "the same file was uploaded before"},
                        **error_responses(400, 413)})
async def upload_model(request: Request, response: Response, session: SessionDep, caller: CallerDep,
                       settings: SettingsDep, storage: StorageDep, name: NameQuery = None) -> ModelOut:
    """Upload an ONNX model: the request body is the file's bytes
    (`curl --data-binary @m.onnx -H 'Content-Type: application/octet-stream'`). It is checked in a
    separate process and summarised; a model you uploaded before is returned as is (200)."""
    timeout = settings.inspect_timeout_s
    row, created = await store_upload(
        request, session, caller, storage, table=ModelFile, prefix="mdl", suffix=".onnx",
        name=display_name(name, "model.onnx"), limit_bytes=settings.max_upload_mb * 2**20,
        inspect=lambda path: inspect_model(path, timeout_s=timeout), final_path=storage.model_path)
    if not created:
        response.status_code = 200
    return model_out(row)


@router.get("", response_model=list[ModelOut])
def list_models(session: SessionDep, caller: CallerDep,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[ModelOut]:
    """Your models, newest first."""
    rows = session.scalars(select(ModelFile).where(ModelFile.owner_id == caller.user_id)
                           .order_by(ModelFile.created_at.desc()).limit(limit)).all()
    return [model_out(r) for r in rows]


@router.get("/{model_id}", response_model=ModelOut, responses=error_responses(404))
def get_model(model_id: str, session: SessionDep, caller: CallerDep) -> ModelOut:
    return model_out(owned_model(session, caller, model_id))


@router.delete("/{model_id}", status_code=204, response_class=Response, responses=error_responses(404, 409))
def delete_model(model_id: str, session: SessionDep, caller: CallerDep, storage: StorageDep) -> Response:
    """Delete a model and its file. Refused (409) while a queued or running job uses it; finished
    jobs keep their artifacts and lose the reference."""
    row = owned_model(session, caller, model_id)
    delete_upload(session, row, Job.model_id, "model", storage.model_path(row.id))
    return Response(status_code=204)
