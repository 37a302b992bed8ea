"""ONNX Runtime backends: CPU (default) and the CUDA / TensorRT execution providers."""
from __future__ import annotations

import time

from latprune.profiler.backends.base import Backend, BackendUnavailable, Runner


class OrtRunner(Runner):
    def __init__(self, session) -> None:
        self.session = session

    def inputs(self, n: int = 1, seed: int = 0) -> list:
        from latprune.profiler.onnxrt import random_feed

        return [random_feed(self.session, seed + i) for i in range(n)]

    def run_ms(self, inputs) -> float:
        # session.run copies outputs back to the host, so it returns after the GPU finished.
        t0 = time.perf_counter()
        self.session.run(None, inputs)
        return (time.perf_counter() - t0) * 1e3


class OrtBackend(Backend):
    def __init__(self, provider: str = "CPUExecutionProvider", threads: int = 1, fp16: bool = False) -> None:
        self.provider = provider
        self.threads = threads
        self.fp16 = fp16
        self.name = {"CPUExecutionProvider": "ort-cpu", "CUDAExecutionProvider": "ort-cuda",
                     "TensorrtExecutionProvider": "ort-trt"}.get(provider, provider)

    def check(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailable("onnxruntime is not installed (pip install onnxruntime)") from None
        if self.provider not in ort.get_available_providers():
            raise BackendUnavailable(
                f"{self.provider} is not available in this onnxruntime build "
                f"({', '.join(ort.get_available_providers())}); install onnxruntime-gpu on a CUDA machine")
        if self.provider != "CPUExecutionProvider":
            from latprune.profiler.backends.trt import cuda_device_count
            if cuda_device_count() == 0:
                raise BackendUnavailable(f"{self.provider}: no CUDA device visible")

    def load(self, model) -> OrtRunner:
        self.check()
        if self.provider == "CPUExecutionProvider":
            from latprune.profiler.onnxrt import make_session
            return OrtRunner(make_session(model, self.threads))
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        provider_opts = {}
        if self.provider == "TensorrtExecutionProvider":
            provider_opts = {"trt_fp16_enable": self.fp16, "trt_engine_cache_enable": True,
                             "trt_timing_cache_enable": True}
        data = model if isinstance(model, bytes) else model.SerializeToString()
        session = ort.InferenceSession(data, sess_options=opts,
                                       providers=[(self.provider, provider_opts), "CPUExecutionProvider"])
        return OrtRunner(session)

    def fingerprint(self, batch: int = 1) -> dict:
        from latprune.profiler.fingerprint import cpu_fingerprint, gpu_fingerprint

        if self.provider == "CPUExecutionProvider":
            return cpu_fingerprint(threads=self.threads, batch=batch)
        fp = gpu_fingerprint(batch=batch, precision="float16" if self.fp16 else "float32")
        fp["provider"] = self.provider
        return fp
