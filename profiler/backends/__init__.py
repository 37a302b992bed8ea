"""Backends: the target runtime as one object (profiler/backends/base.py says what it provides).

| name         | what                                                 | needs                       |
|--------------|------------------------------------------------------|-----------------------------|
| ort-cpu      | ONNX Runtime, CPUExecutionProvider (default)         | onnxruntime                 |
| openvino     | OpenVINO on the CPU; artifact: IR (model.xml + .bin) | openvino                    |
| ort-cuda     | ONNX Runtime, CUDAExecutionProvider                  | onnxruntime-gpu, a GPU      |
| ort-trt      | ONNX Runtime, TensorrtExecutionProvider              | onnxruntime-gpu, TensorRT   |
| trt          | native TensorRT engine, pycuda buffers, CUDA events  | tensorrt, pycuda, a GPU     |
| torch        | PyTorch eager (an nn.Module, not ONNX; timing only)  | torch                       |

Aliases: cpu / onnxruntime / onnxruntime-cpu -> ort-cpu, openvino-cpu / ov -> openvino,
tensorrt -> trt. Every runtime is imported inside the backend's functions, so this package
imports and the CPU path runs without them; a missing one raises BackendUnavailable naming
what to install.
"""
from __future__ import annotations

from latprune.profiler.backends.base import Backend, BackendUnavailable, ProfiledModel, Runner

NAMES = ("ort-cpu", "openvino", "ort-cuda", "ort-trt", "trt", "torch")
# Backends the ONNX pipeline (profile, predict, optimize) can target.
PIPELINE_NAMES = ("ort-cpu", "openvino", "ort-cuda", "ort-trt", "trt")
ALIASES = {"cpu": "ort-cpu", "onnxruntime": "ort-cpu", "onnxruntime-cpu": "ort-cpu", "ort": "ort-cpu",
           "openvino-cpu": "openvino", "ov": "openvino", "tensorrt": "trt"}


def canonical_name(name: str) -> str:
    """The registry name of `name` (aliases resolved); BackendUnavailable if unknown."""
    key = ALIASES.get(name, name)
    if key not in NAMES:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {', '.join(PIPELINE_NAMES)}")
    return key


def get_backend(name: str = "ort-cpu", threads: int = 1, precision: str | None = None, **options) -> Backend:
    """The backend called `name` (see the table above)."""
    name = canonical_name(name)
    if name.startswith("ort-"):
        from latprune.profiler.backends.onnxrt import OrtBackend
        provider = {"ort-cpu": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
                    "ort-trt": "TensorrtExecutionProvider"}[name]
        return OrtBackend(provider, threads=threads, precision=precision, **options)
    if name == "openvino":
        from latprune.profiler.backends.openvino import OpenVINOBackend
        return OpenVINOBackend(threads=threads, precision=precision, **options)
    if name == "trt":
        from latprune.profiler.backends.trt import TensorRTBackend
        return TensorRTBackend(threads=threads, precision=precision, **options)
    from latprune.profiler.backends.torch_eager import TorchBackend
    return TorchBackend(**options)


def as_backend(backend) -> Backend:
    """`backend` itself; an int means ONNX Runtime on this CPU with that many threads (the
    callers that predate backends passed threads)."""
    if isinstance(backend, int):
        return get_backend("ort-cpu", threads=backend)
    return backend


def backend_from_spec(spec: dict) -> Backend:
    """Rebuild a backend from `Backend.spec()` (in a measurement subprocess)."""
    return get_backend(spec.get("name", "ort-cpu"), threads=int(spec.get("threads", 1)),
                       precision=spec.get("precision"))


def available() -> dict[str, str]:
    """{name: "ok" or the reason it is unavailable here}."""
    out = {}
    for name in NAMES:
        try:
            get_backend(name).check()
            out[name] = "ok"
        except BackendUnavailable as exc:
            out[name] = str(exc)
    return out


__all__ = ["Backend", "BackendUnavailable", "ProfiledModel", "Runner", "get_backend", "backend_from_spec", "as_backend",
           "available", "canonical_name", "NAMES", "PIPELINE_NAMES"]
