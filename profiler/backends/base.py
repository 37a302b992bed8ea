"""The target runtime as one object (Polygraphy-style: a loader that builds, a runner that runs).

A `Backend` is chosen once (`--backend` on the CLI, the device record in the service) and every
step of the pipeline goes through it:

- `fingerprint(timing)`: what keys its latency tables (device, runtime and version, precision,
  threads, batch, how cells are timed); tables of different fingerprints never mix;
- `channel_step()`: its preferred channel multiple, measured by a short probe on the device
  (profiler/probe.py) and cached per fingerprint;
- `build(onnx_path, out_dir)`: the deployable artifact (ONNX Runtime: the ONNX file itself;
  OpenVINO: IR model.xml + model.bin; TensorRT: a serialized engine). End-to-end measurements
  load the artifact, so the file returned is the one that was measured;
- `load(model)` -> `Runner` and `measure_side_by_side(...)`: end-to-end timing, pruned and dense
  alternating in fresh processes (profiler/compare.py);
- `profiled(model, prefix)` -> `ProfiledModel`: per-layer in-graph timing with the runtime's
  own profiler, each kernel mapped back to ONNX nodes by the runtime's own fusion records;
- `time_layer(spec, c_in, c_out)`: a layer timed alone (the fallback for cells no in-graph run
  reaches).

Runtimes are imported lazily: a backend whose runtime (or GPU) is missing raises
`BackendUnavailable` with one line naming the package or the device.
"""
from __future__ import annotations

import abc
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from latprune.types import LatpruneError, TimingStats

if TYPE_CHECKING:  # pragma: no cover
    from latprune.profiler.ingraph import ConfigTiming
    from latprune.types import LayerSpec


class BackendUnavailable(LatpruneError):
    """The backend's runtime (GPU, TensorRT, OpenVINO, torch, ...) is missing here; says what
    to install."""


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


class ProfiledModel(abc.ABC):
    """One model open for in-graph profiling: `run()` does one profiled and one plain run and
    returns the plain run's ms; `finish(names, widths)` gives per-layer kernel medians over the
    timed runs, each kernel attributed to a layer through `names` (ONNX node and tensor name ->
    layer index, latprune.ingraph_profile.layer_names) by the runtime's own fusion records."""

    runs: int = 0

    @abc.abstractmethod
    def run(self, timed: bool = True) -> float:
        ...

    @abc.abstractmethod
    def finish(self, names: dict[str, int], widths: dict[int, int] | None) -> "ConfigTiming":
        ...


class PairedProfiled(ProfiledModel):
    """In-graph profiling with the model compiled twice: a profiled copy whose per-kernel times
    each run records, and a plain copy whose run time is the latency (profiling adds overhead).
    Subclasses set `plain` (a Runner) and `plain_feed`, and give `_kernel_times` (one profiled
    run: kernel name -> ms) and `_layer_of` (kernel name -> layer index, from the runtime's
    fusion records)."""

    def _start(self) -> None:
        self.kernel_samples: dict[str, list[float]] = {}
        self.plain_ms: list[float] = []
        self.runs = 0

    @abc.abstractmethod
    def _kernel_times(self) -> dict[str, float]:
        ...

    @abc.abstractmethod
    def _layer_of(self, kernel: str, names: dict[str, int]) -> int | None:
        ...

    def run(self, timed: bool = True) -> float:
        kernels = self._kernel_times()
        if timed:
            for name, ms in kernels.items():
                self.kernel_samples.setdefault(name, []).append(ms)
        ms = self.plain.run_ms(self.plain_feed)
        if timed:
            self.plain_ms.append(ms)
            self.runs += 1
        return ms

    def finish(self, names: dict[str, int], widths: dict[int, int] | None) -> "ConfigTiming":
        from latprune.profiler.backends.onnxrt import attribute_kernels

        if self.runs < 1:
            raise ValueError("no timed run to take kernel times from")
        kernel_ms = {k: float(np.median(v)) for k, v in self.kernel_samples.items()}
        return attribute_kernels(kernel_ms, lambda k: self._layer_of(k, names), widths,
                                 float(np.median(self.plain_ms)), self.runs)


def timing_stats(samples: list[float]) -> TimingStats:
    arr = np.asarray(samples)
    return TimingStats(float(np.median(arr)), float(np.percentile(arr, 90)), float(arr.min()), len(arr))


def timed_runs(runner: Runner, warmup: int = 3, min_runs: int = 10, min_seconds: float = 0.2,
               max_runs: int = 1000, inputs=None) -> list[float]:
    """Per-run latencies (ms) of `runner` after `warmup` untimed runs, until min_runs and
    min_seconds, rotating over 4 input sets."""
    inputs = inputs if inputs is not None else runner.inputs(4)
    for i in range(warmup):
        runner.run_ms(inputs[i % len(inputs)])
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_runs and (len(samples) < min_runs or time.perf_counter() - start < min_seconds):
        samples.append(runner.run_ms(inputs[len(samples) % len(inputs)]))
    return samples


class Backend(abc.ABC):
    """A runtime on a device (module docstring). Subclasses set `name` and the timing labels."""

    name: str = "?"
    # Fingerprint `timing` values: how in-graph and isolated cells are timed on this backend;
    # a new method gets a new label so old cells are never mixed in.
    timing_labels: dict[str, str] = {}
    artifact_suffix: str = ".onnx"

    def __init__(self, threads: int = 1, precision: str | None = None) -> None:
        self.threads = threads
        self.precision = precision

    # ---- identity ------------------------------------------------------------------------------
    @abc.abstractmethod
    def check(self) -> None:
        """Raise BackendUnavailable unless the backend can run here."""

    @abc.abstractmethod
    def fingerprint(self, batch: int = 1, timing: str = "in-graph") -> dict:
        """Everything that changes timings (see profiler.fingerprint)."""

    def spec(self) -> dict:
        """What rebuilds this backend in another process (profiler.compare)."""
        return {"name": self.name, "threads": self.threads, "precision": self.precision}

    def channel_step(self) -> int:
        """The channel multiple this backend runs fastest at, probed on the device (cached)."""
        from latprune.profiler.probe import channel_step

        return channel_step(self)

    def blocking_rules(self, progress=None):
        """How this backend blocks channels per layer kind (lut/blocking.py), probed on the
        device once (cached): (BlockingRules, what the probe found)."""
        from latprune.profiler.probe import blocking_rules

        return blocking_rules(self, progress)

    def layout_reorders(self, model) -> tuple[int, float] | None:
        """(count, millions of elements) of the layout reorders this runtime adds to `model`
        (ONNX, static shapes) around its blocked kernels, read from its compiled graph; None
        where the runtime does not say (lut.predict then models them from the blocking rules)."""
        return None

    def graph_kernels(self, model, names: dict[str, int]) -> list[tuple[str, float]] | None:
        """(class, millions of elements) of each kernel of the compiled `model` that no layer
        claims (`names`: ONNX node and tensor name -> layer index), its layout reorders
        included; None where the runtime does not say (lut.predict then prices the time outside
        the layers by the overhead fit)."""
        return None

    # ---- build, run, measure -------------------------------------------------------------------
    @abc.abstractmethod
    def load(self, model) -> Runner:
        """Compile `model` (ONNX bytes, ModelProto, or a path to an ONNX file or to an artifact
        of this backend) into a Runner."""

    def build(self, onnx_path: Path, out_dir: Path) -> Path:
        """The deployable artifact for the ONNX file `onnx_path`, written into `out_dir` (named
        after it, with `artifact_suffix`). Default: the ONNX file itself."""
        return Path(onnx_path)

    def measure(self, model, warmup: int = 5, min_runs: int = 20, min_seconds: float = 1.0) -> TimingStats:
        """Median/p90 end-to-end latency (ms) of `model` in this process."""
        runner = self.load(model)
        try:
            return timing_stats(timed_runs(runner, warmup, min_runs, min_seconds))
        finally:
            runner.close()

    def measure_interleaved(self, models: dict[str, object], bursts: int = 5, min_runs: int = 10,
                            min_seconds: float = 0.2) -> dict[str, TimingStats]:
        """Several models timed in alternating bursts within this process (slow drifts of the
        machine hit them alike); each burst warmed up, the median over all timed runs."""
        runners = {k: self.load(v) for k, v in models.items()}
        feeds = {k: r.inputs(4) for k, r in runners.items()}
        samples: dict[str, list[float]] = {k: [] for k in runners}
        try:
            for _ in range(bursts):
                for k, r in runners.items():
                    samples[k] += timed_runs(r, 2, min_runs, min_seconds, inputs=feeds[k])
        finally:
            for r in runners.values():
                r.close()
        return {k: timing_stats(v) for k, v in samples.items()}

    def measure_side_by_side(self, models: dict[str, Path], processes: int = 2,
                             bursts: int = 5) -> dict[str, TimingStats]:
        """Models (artifacts or ONNX files) timed side by side in `processes` fresh processes."""
        from latprune.profiler.compare import compare_in_subprocesses

        return compare_in_subprocesses(models, self.threads, processes, bursts, backend=self)

    # ---- layer timing --------------------------------------------------------------------------
    def profiled(self, data: bytes, prefix: str) -> ProfiledModel:
        raise BackendUnavailable(f"{self.name}: no in-graph profiler; use --timing isolated")

    def time_layer(self, spec: "LayerSpec", c_in: int, c_out: int) -> TimingStats:
        """One layer at (c_in, c_out) timed alone (profiler.layers.layer_model)."""
        from latprune.profiler.layers import layer_model

        runner = self.load(layer_model(spec, c_in, c_out))
        try:
            return timing_stats(timed_runs(runner, 3, 15, 0.05))
        finally:
            runner.close()

    def describe(self) -> str:
        return json.dumps(self.spec(), sort_keys=True)
