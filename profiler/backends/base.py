"""The shared backend interface: a Backend loads a model into a Runner; a Runner runs it on
prepared inputs and reports per-run latency in milliseconds."""
from __future__ import annotations

import abc

from latprune.types import LatpruneError


class BackendUnavailable(LatpruneError):
    """The backend's runtime (GPU, TensorRT, torch, ...) is missing here; says what to install."""


class Runner(abc.ABC):
    """A loaded model. `inputs(n)` makes n rotating input sets (so caches do not see the same
    buffer every run); `run_ms(inputs)` runs once to completion and returns its latency (ms):
    wall clock on the CPU, CUDA events on a GPU."""

    @abc.abstractmethod
    def inputs(self, n: int = 1, seed: int = 0) -> list:
        ...

    @abc.abstractmethod
    def run_ms(self, inputs) -> float:
        ...

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class Backend(abc.ABC):
    name: str = "?"

    @abc.abstractmethod
    def check(self) -> None:
        """Raise BackendUnavailable unless the backend can run here."""

    @abc.abstractmethod
    def load(self, model) -> Runner:
        """Compile `model` (ONNX bytes or ModelProto; torch: an nn.Module) into a Runner."""

    @abc.abstractmethod
    def fingerprint(self, batch: int = 1) -> dict:
        """Everything that changes timings (see profiler.fingerprint)."""
