"""Request and response bodies of the HTTP API (pydantic), so /openapi.json documents each one.

Times are UNIX seconds (float); sizes are bytes; latencies are milliseconds.
"""
from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from latprune.options import OptimizeSettings
from latprune.service.db import JOB_KINDS, JOB_STATES

JobState = Literal[JOB_STATES]  # type: ignore[valid-type]
JobKind = Literal[JOB_KINDS]  # type: ignore[valid-type]

MAX_JSON_DEPTH = 32


def check_plain_json(value: Any, depth: int = 0) -> Any:
    """Reject NaN/infinity and deep nesting inside free-form JSON objects (fingerprints): they
    would be stored, then fail to serialise in every later response."""
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("NaN and infinity are not allowed")
    if isinstance(value, dict):
        for k, v in value.items():
            check_plain_json(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            check_plain_json(v, depth + 1)
    return value


# --- errors ------------------------------------------------------------------------------------

class ErrorBody(BaseModel):
    status: int = Field(description="the HTTP status code")
    message: str = Field(description="one sentence saying what was wrong")
    details: list[Any] | None = Field(None, description="validation errors or table problems, when any")


class ErrorOut(BaseModel):
    error: ErrorBody


# --- uploads -----------------------------------------------------------------------------------

class ModelOut(BaseModel):
    id: str
    name: str = Field(description="display name given at upload (never used as a path)")
    sha256: str
    size_bytes: int
    summary: dict[str, Any] = Field(description="ir_version, opset, producer, inputs, outputs, nodes, ops, "
                                                "parameters, layers, conv_layers, groups, prunable_groups, "
                                                "removable_blocks, notes, prunable")
    created_at: float


class CalibrationOut(BaseModel):
    id: str
    name: str
    sha256: str
    size_bytes: int
    summary: dict[str, Any] = Field(description="samples, arrays {name: {shape, dtype}}, layout")
    created_at: float


# --- devices -----------------------------------------------------------------------------------

class DeviceOut(BaseModel):
    name: str
    backend: str
    executor: str = Field(description="inprocess (the API server's CPU) or celery (a farm agent)")
    queue: str = Field(description="Celery queue of a farm device; empty for in-process devices")
    fingerprint: dict[str, Any]
    has_tensorrt: bool
    last_seen_at: float


class DeviceDetail(DeviceOut):
    tables: list[dict[str, Any]] = Field(
        description="per fingerprint in the device's latency table: fingerprint, signatures, cells, "
                    "calibration_points")


class DeviceRegister(BaseModel):
    """What a device agent reports about itself (agent tokens only)."""
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    backend: str = Field("onnxruntime-cpu", min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.+-]+$")
    fingerprint: dict[str, Any] = Field(default_factory=dict)
    has_tensorrt: bool = False
    # Agents register Celery devices only: an in-process device would run on the API server.
    executor: Literal["celery"] = "celery"

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        from latprune.profiler.backends import BackendUnavailable, canonical_name

        try:
            canonical_name(v)
        except BackendUnavailable as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("fingerprint")
    @classmethod
    def _finite(cls, v: dict[str, Any]) -> dict[str, Any]:
        return check_plain_json(v)


# --- jobs --------------------------------------------------------------------------------------

class JobCreate(OptimizeSettings):
    """A job: `optimize` (exactly one budget) or `profile` (fill the device's latency table with
    the cells of the model; no budget). The optimisation options are latprune.options.
    OptimizeSettings, the same definition the CLI and the pipeline use; the runtime is the
    device's backend."""
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    kind: Literal["optimize", "profile"] = "optimize"
    model_id: str = Field(max_length=64, description="an uploaded model of yours")
    device: str | None = Field(None, max_length=64, description="target device; default: the server's CPU")
    calibration_id: str | None = Field(None, max_length=64, description="an uploaded calibration file of yours")


class ArtifactOut(BaseModel):
    name: str
    size_bytes: int
    sha256: str
    media_type: str
    url: str = Field(description="path of the download, relative to the server")


class JobOut(BaseModel):
    id: str
    kind: str
    device: str
    model_id: str | None
    calibration_id: str | None
    options: dict[str, Any]
    state: str = Field(description="queued | running | succeeded | failed | cancelled")
    stage: str
    progress: float = Field(description="0..1 within the current stage")
    message: str
    error: str
    attempts: int
    cancel_requested: bool
    created_at: float
    started_at: float | None
    finished_at: float | None
    result: dict[str, Any] = Field(description="report summary: dense_ms, budget_ms, predicted_ms, measured_ms, ...")
    artifacts: list[ArtifactOut]


# --- latency tables ----------------------------------------------------------------------------

class TableUploadOut(BaseModel):
    id: int
    source: str = Field(description="upload | nightly")
    cells: int
    drift: dict[str, Any]
    flagged: bool
    created_at: float


class TablesOut(BaseModel):
    summary: list[dict[str, Any]]
    uploads: list[TableUploadOut] = Field(description="the last 50 uploads and re-profiles, newest first")


class MergeOut(BaseModel):
    cells: int = Field(description="cells in the upload")
    cells_added: int | None = None
    cells_combined: int | None = None
    calibration_points: int | None = None
    drift: dict[str, Any]
    flagged: bool = Field(description="the median relative change passed the drift threshold")


# --- health ------------------------------------------------------------------------------------

class HealthOut(BaseModel):
    status: str


class ReadyOut(BaseModel):
    status: str = Field(description="ready | not ready")
    checks: dict[str, str] = Field(description="check name: 'ok' or why it failed")
