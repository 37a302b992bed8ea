"""Device fingerprint: everything that changes timings. Tables never mix fingerprints."""
from __future__ import annotations

import hashlib
import json
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_fingerprint(threads: int = 1, batch: int = 1, precision: str = "float32") -> dict:
    """Fingerprint of ONNX Runtime on this CPU."""
    import onnxruntime as ort

    return {
        "device": "cpu",
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "runtime": f"onnxruntime {ort.__version__}",
        "provider": "CPUExecutionProvider",
        "threads": threads,
        "batch": batch,
        "precision": precision,
    }


def fingerprint_id(fp: dict) -> str:
    """Short stable id of a fingerprint (first 16 hex digits of its JSON's SHA-256)."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
