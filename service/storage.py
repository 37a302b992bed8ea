"""Files of the service under the data dir. Every path is built from row ids that the service
generated (checked against a strict pattern), never from user-given names, so no name can
traverse out of the data dir.

    DATA/models/<model id>.onnx
    DATA/calibration/<calibration id>.npz
    DATA/jobs/<job id>/<artifact name>      (pruned.onnx, plan.json, report.json, report.html, ...)
    DATA/luts/<device name>.sqlite          (one latency table file per device)
    DATA/tmp/                               (uploads in flight)
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import AsyncIterator

_ID = re.compile(r"^[a-z]{3}_[0-9a-f]{20}$")
DEVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ARTIFACT_NAMES = {
    "pruned.onnx": "application/octet-stream",
    "plan.json": "application/json",
    "report.json": "application/json",
    "report.html": "text/html",
    "pruned.xml": "application/xml",  # OpenVINO IR (with pruned.bin)
    "pruned.bin": "application/octet-stream",
    "pruned.engine": "application/octet-stream",  # TensorRT engine
    "model.engine": "application/octet-stream",  # jobs of earlier versions
    "profile.json": "application/json",
    "log.txt": "text/plain",
}


class UploadTooLarge(Exception):
    def __init__(self, limit_bytes: int) -> None:
        super().__init__(f"upload larger than the limit of {limit_bytes // 2**20} MB")
        self.limit_bytes = limit_bytes


def _checked_id(value: str) -> str:
    if not _ID.match(value):
        raise ValueError(f"not a service id: {value!r}")
    return value


def checked_device(name: str) -> str:
    if not DEVICE_NAME.match(name) or name in (".", ".."):
        raise ValueError(f"device names are 1-64 of A-Z a-z 0-9 _ . - (not starting with . _ -), not {name!r}")
    return name


class Storage:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        for sub in ("models", "calibration", "jobs", "luts", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def model_path(self, model_id: str) -> Path:
        return self.root / "models" / f"{_checked_id(model_id)}.onnx"

    def calibration_path(self, cal_id: str) -> Path:
        return self.root / "calibration" / f"{_checked_id(cal_id)}.npz"

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / _checked_id(job_id)

    def artifact_path(self, job_id: str, name: str) -> Path:
        if name not in ARTIFACT_NAMES:
            raise ValueError(f"unknown artifact {name!r}")
        return self.job_dir(job_id) / name

    def lut_path(self, device: str) -> Path:
        return self.root / "luts" / f"{checked_device(device)}.sqlite"

    def sweep_tmp(self, max_age_s: float = 3600.0) -> int:
        """Remove uploads in flight older than max_age_s (left by a crashed server; younger
        ones may belong to another API process sharing the data dir). Returns the count."""
        import time

        n = 0
        for path in (self.root / "tmp").iterdir():
            try:
                if path.is_file() and time.time() - path.stat().st_mtime > max_age_s:
                    path.unlink()
                    n += 1
            except OSError:
                pass
        return n

    def temp_file(self, suffix: str) -> Path:
        fd, name = tempfile.mkstemp(dir=self.root / "tmp", suffix=suffix)
        os.close(fd)
        return Path(name)

    async def receive(self, chunks: AsyncIterator[bytes], suffix: str, limit_bytes: int) -> tuple[Path, int, str]:
        """Stream chunks into a temp file, never holding more than one chunk in memory.
        Returns (temp path, size in bytes, sha256 hex). Raises UploadTooLarge past the limit
        (the partial file is removed)."""
        path = self.temp_file(suffix)
        digest = hashlib.sha256()
        size = 0
        try:
            with open(path, "wb") as fh:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit_bytes:
                        raise UploadTooLarge(limit_bytes)
                    digest.update(chunk)
                    fh.write(chunk)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path, size, digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
