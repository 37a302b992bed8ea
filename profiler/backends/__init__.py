"""Backends: compile a model for a device, run it, time it (one interface, Polygraphy-style).

| name         | what                                              | needs            |
|--------------|---------------------------------------------------|------------------|
| ort-cpu      | ONNX Runtime, CPUExecutionProvider (default)      | onnxruntime      |
| ort-cuda     | ONNX Runtime, CUDAExecutionProvider               | onnxruntime-gpu  |
| ort-trt      | ONNX Runtime, TensorrtExecutionProvider           | onnxruntime-gpu, TensorRT |
| trt          | native TensorRT engine, pycuda buffers, CUDA events | tensorrt, pycuda |
| torch        | PyTorch eager (an nn.Module, not ONNX)            | torch            |

Every GPU dependency is imported inside the backend's functions, so this package imports and
the CPU path runs without them; a missing one raises BackendUnavailable with what to install.
"""
from __future__ import annotations

from latprune.profiler.backends.base import Backend, BackendUnavailable, Runner

NAMES = ("ort-cpu", "ort-cuda", "ort-trt", "trt", "torch")


def get_backend(name: str, **options) -> Backend:
    """The backend called `name` (see the table above); options go to its constructor."""
    if name == "ort-cpu":
        from latprune.profiler.backends.onnxrt import OrtBackend
        return OrtBackend("CPUExecutionProvider", **options)
    if name == "ort-cuda":
        from latprune.profiler.backends.onnxrt import OrtBackend
        return OrtBackend("CUDAExecutionProvider", **options)
    if name == "ort-trt":
        from latprune.profiler.backends.onnxrt import OrtBackend
        return OrtBackend("TensorrtExecutionProvider", **options)
    if name == "trt":
        from latprune.profiler.backends.trt import TensorRTBackend
        return TensorRTBackend(**options)
    if name == "torch":
        from latprune.profiler.backends.torch_eager import TorchBackend
        return TorchBackend(**options)
    raise BackendUnavailable(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")


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


__all__ = ["Backend", "BackendUnavailable", "Runner", "get_backend", "available", "NAMES"]
