"""PyTorch eager on the CPU or a CUDA device (an nn.Module, not an ONNX file)."""
from __future__ import annotations

import time

from latprune.profiler.backends.base import Backend, BackendUnavailable, Runner


def _torch():
    try:
        import torch
    except ImportError:
        raise BackendUnavailable("torch is not installed (pip install torch)") from None
    return torch


class TorchRunner(Runner):
    def __init__(self, module, example_shapes, device: str) -> None:
        self.module, self.shapes, self.device = module, example_shapes, device

    def inputs(self, n: int = 1, seed: int = 0) -> list:
        torch = _torch()
        gen = torch.Generator().manual_seed(seed)
        return [[torch.randn(s, generator=gen).to(self.device) for s in self.shapes] for _ in range(n)]

    def run_ms(self, inputs) -> float:
        torch = _torch()
        with torch.inference_mode():
            if self.device.startswith("cuda"):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                self.module(*inputs)
                end.record()
                torch.cuda.synchronize()
                return float(start.elapsed_time(end))
            t0 = time.perf_counter()
            self.module(*inputs)
            return (time.perf_counter() - t0) * 1e3


class TorchBackend(Backend):
    name = "torch"
    timing_labels = {"in-graph": "torch-eager/1", "isolated": "torch-eager/1"}

    def __init__(self, device: str = "cpu", threads: int = 1, example_shapes=((1, 3, 224, 224),)) -> None:
        super().__init__(threads, None)
        self.device, self.shapes = device, [tuple(s) for s in example_shapes]

    def check(self) -> None:
        torch = _torch()
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable("torch: no CUDA device visible")

    def load(self, model) -> TorchRunner:
        self.check()
        torch = _torch()
        if not isinstance(model, torch.nn.Module):
            raise BackendUnavailable("the torch backend times an nn.Module, not an ONNX model")
        if self.device == "cpu":
            torch.set_num_threads(self.threads)
        return TorchRunner(model.eval().to(self.device), self.shapes, self.device)

    def fingerprint(self, batch: int = 1, timing: str = "in-graph") -> dict:
        from latprune.profiler.fingerprint import cpu_fingerprint, gpu_fingerprint

        torch = _torch()
        fp = gpu_fingerprint(batch=batch) if self.device.startswith("cuda") else cpu_fingerprint(self.threads, batch)
        fp.update({"runtime": f"torch {torch.__version__}", "provider": f"torch-eager-{self.device}",
                   "timing": self.timing_labels[timing]})
        return fp
