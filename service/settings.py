"""Service settings, read from environment variables prefixed LATPRUNE_ (pydantic-settings).

Defaults are the embedded ones: SQLite and artifacts under $LATPRUNE_HOME, an in-process worker,
ONNX Runtime on the local CPU.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _home() -> Path:
    return Path(os.environ.get("LATPRUNE_HOME", Path.home() / ".cache" / "latprune"))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LATPRUNE_", extra="ignore")

    home: Path = Field(default_factory=_home, description="root of the default database and data dir")
    database_url: str = Field("", description="SQLAlchemy URL; empty: sqlite:///HOME/service.sqlite")
    data_dir: Path | None = Field(None, description="uploads, artifacts and latency tables; default HOME/data")
    # Execution: 'inprocess' runs jobs in child processes of the API server; 'celery' sends them
    # to the queue of the job's device (latprune agent --device NAME consumes it).
    executor: str = "inprocess"
    workers: int = Field(1, ge=1, description="in-process jobs at once; >1 makes concurrent timings noisy")
    redis_url: str = "redis://127.0.0.1:6379/0"
    local_device: str = Field("cpu-local", description="default device of jobs; with the in-process "
                              "executor, the name of this machine's CPU")
    max_upload_mb: int = Field(1024, ge=1, description="largest model or calibration upload, MB")
    max_body_kb: int = Field(256, ge=1, description="largest JSON request body, KiB (uploads excepted)")
    max_table_upload_mb: int = Field(64, ge=1, description="largest latency-table upload, MB")
    jobs_per_minute: int = Field(30, ge=1, description="job submissions per token per minute")
    job_attempts: int = Field(3, ge=1, description="runs of a job whose worker died before it is failed")
    heartbeat_s: float = Field(5.0, gt=0, description="running jobs touch their heartbeat this often")
    stale_after_s: float = Field(30.0, gt=0, description="a running job silent this long has lost its worker")
    drift_threshold: float = Field(0.10, gt=0, description="median relative change that flags a table's drift")
    inspect_timeout_s: float = 120.0

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'service.sqlite'}"

    @property
    def data_path(self) -> Path:
        return self.data_dir or (self.home / "data")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
