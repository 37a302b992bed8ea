"""Device fingerprint: everything that changes timings. Tables never mix fingerprints."""
from __future__ import annotations

import hashlib
import json
import platform


TIMING_METHOD = "iobinding-minus-call-overhead/2"  # isolated layers (profiler/layers.py)
# kernels inside whole models (profiler/ingraph.py); /2: interleaved rounds scaled to the median
# phase (/1 bracketed bursts scaled to the fastest: its cells are not comparable)
TIMING_IN_GRAPH = "ort-profile-in-graph/2"
TIMINGS = {"in-graph": TIMING_IN_GRAPH, "isolated": TIMING_METHOD}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def preferred_channel_step() -> int:
    """Channel multiple the CPU backend runs fastest at: ONNX Runtime's blocked (NCHWc) conv
    kernels use blocks of 16 channels with AVX-512 and 8 otherwise. Widths off the block size
    ran 20-40% slower in-graph than their layers timed alone (bench/lut_fidelity.py)."""
    return 16 if "avx512f" in cpu_flags() else 8


def cpu_fingerprint(threads: int = 1, batch: int = 1, precision: str = "float32",
                    timing: str = "isolated") -> dict:
    """Fingerprint of ONNX Runtime on this CPU; `timing` ('in-graph' or 'isolated') names how
    its cells are measured, so cells of the two methods live in separate tables."""
    if timing not in TIMINGS:
        raise ValueError(f"timing must be one of {', '.join(TIMINGS)}, not {timing!r}")
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
        # how cells are timed; bumped when the method changes so old cells are not mixed in
        "timing": TIMINGS[timing],
    }


def fingerprint_id(fp: dict) -> str:
    """Short stable id of a fingerprint (first 16 hex digits of its JSON's SHA-256)."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def gpu_fingerprint(batch: int = 1, precision: str = "float32") -> dict:
    """Fingerprint of the first CUDA device, read with nvidia-smi (driver, name, memory)."""
    import shutil
    import subprocess

    fp = {"device": "cuda", "gpu": "unknown", "driver": "unknown", "cuda": "unknown",
          "batch": batch, "precision": precision, "threads": 1}
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            name, driver, mem = [p.strip() for p in out.stdout.strip().splitlines()[0].split(",")]
            fp.update({"gpu": name, "driver": driver, "memory": mem})
        ver = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout
        if "CUDA Version:" in ver:
            fp["cuda"] = ver.split("CUDA Version:")[1].split()[0]
    return fp
