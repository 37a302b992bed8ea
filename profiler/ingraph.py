"""In-graph kernel timing: a whole model runs under its runtime's profiler and each kernel's
time is attributed to a layer (the backend's `profiled` model: ONNX Runtime's profiler events,
OpenVINO's performance counters; each maps kernels back to ONNX nodes by its own fusion
records, profiler/backends/).

Why: a layer timed alone (profiler/layers.py) pays layout reorders at its input and output
and runs on a cold cache, which a layer inside the model does not; on this AVX-512 CPU the sum
of isolated layers missed whole-model latency by 6-44% (NOTES.md). The caller gives the names
that belong to each layer (latprune/ingraph_profile.py builds them from the graph analysis); a
kernel that maps to no layer (pooling, reorders, flatten) is overhead. Models are profiled
in interleaved rounds beside a reference model, whose time undoes the machine's slow phases.

Nothing here knows about pruning: it times the models it is given.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np


@dataclass
class ConfigTiming:
    """One model, profiled: ms per layer index (kernel medians over `runs` runs), overhead ms
    of kernels no layer claims, and the unprofiled end-to-end median (ms). `widths` is the
    caller's label of the model (the group widths of a pruned copy)."""

    widths: dict[int, int]
    layer_ms: dict[int, float]
    unmapped_ms: float
    end_to_end_ms: float
    unmapped: list[str] = field(default_factory=list)
    unmapped_kernel_ms: dict[str, float] = field(default_factory=dict)  # per unclaimed kernel name
    phase_ms: float = 0.0  # the reference model's kernel time in the same rounds (profile_interleaved)
    reference_ms: float = 0.0  # the reference time all times were scaled to (profile_interleaved)
    runs: int = 0  # profiled runs behind each kernel median
    # layout reorders done for a layer running a plain-layout kernel (ONNX Runtime's NCHWc
    # fallback, issue 15): ms in all, kept out of layer_ms (they depend on the neighbours'
    # regime, not on the layer's cell; lut.predict.layout_boundaries models them)
    reorder_ms: float = 0.0
    # layout reorders done for other operators (a squeeze-excite Mul that runs in plain layout
    # beside blocked convs): ms, kept out of unmapped_ms (lut.predict.blocked_overhead_elements)
    overhead_reorder_ms: float = 0.0
    # all layout reorders in the runtime's compiled graph (both kinds above): how many, and the
    # elements they move (millions); None where the backend cannot say (lut.predict graph fit)
    reorder_count: int = 0
    reorder_melements: float | None = None
    # every kernel no layer claims, reorders included: (class, millions of elements, ms), from
    # the runtime's compiled graph (Backend.graph_kernels); None where the backend cannot say
    kernels: list[tuple[str, float, float]] | None = None

    @property
    def kernel_ms(self) -> float:
        """All kernel time of the run (ms): layers, unclaimed kernels and reorders."""
        return sum(self.layer_ms.values()) + self.unmapped_ms + self.reorder_ms + self.overhead_reorder_ms


# How long each model is profiled: at least MIN_SECONDS of runs, between MIN_RUNS and MAX_RUNS
# rounds. With models interleaved run by run, 40 rounds of ResNet-50 repeat a kernel's median
# within 0.75% (median; p95 3%), where 10 runs in a row repeated within 1.6% (p95 9%) and a
# 5 ms MobileNetV2 within 4% (p95 22%): a burst of one model falls into one of the machine's
# phases, rounds spread it over many (NOTES.md, issue 3).
MIN_SECONDS = 2.0
MIN_RUNS = 20
MAX_RUNS = 100
BATCH = 8  # models open at once (each twice): memory vs how far apart one model's runs lie
# Fewer at once for big models: each session holds the weights (ONNX Runtime's prepacked
# copies come on top, so this is a floor on memory, not a cap).
BATCH_BYTES = 2 << 30


def profile_interleaved(items: Sequence, build: Callable[[object], bytes], reference: bytes,
                        names: dict[str, int], threads: int = 1, min_seconds: float = MIN_SECONDS,
                        min_runs: int = MIN_RUNS, max_runs: int = MAX_RUNS, batch: int | None = None,
                        on_config: Callable[[ConfigTiming, float], None] | None = None,
                        seed: int = 0, phase_ms: float | None = None, backend=None) -> list[ConfigTiming]:
    """Profile the model `build(item)` for each item (group widths, for the caller), with times
    at the machine's median speed over the whole profile.

    A shared machine runs in phases (the same session at 26 ms, then 32 ms; slow drifts over
    tens of seconds too), and a burst of runs of one model falls into one of them. So `batch`
    models (default BATCH, fewer for big models) and `reference` are open at once and run in
    rounds, one run each per round in a new random order, until the batch's median model has
    run `min_seconds` unprofiled (min_runs..max_runs rounds, at least 1): a kernel's median
    then spans the phases of the whole batch. The reference's kernel time in the same rounds
    is the batch's phase; times are scaled by (median phase) / (the batch's phase), or by
    `phase_ms` / (the batch's phase) when given (an earlier profile's scale, so that cells of
    several profiles agree). The median, not the fastest: the minimum over more batches is
    lower, so a long profile would come out faster than a short one (a 5-batch table read 5%
    below 1-batch measurements).
    `on_config(timing, scale)` is called for each model after its batch with the scale known
    so far; the returned timings use the final one."""
    if backend is None:
        from latprune.profiler.backends import get_backend
        backend = get_backend("ort-cpu", threads=threads)
    if batch is None:  # BATCH, fewer where the sessions of BATCH copies would pass BATCH_BYTES
        batch = int(np.clip(BATCH_BYTES // (2 * max(len(reference), 1)) - 1, 1, BATCH))
    batch = max(1, batch)
    rng = np.random.default_rng(seed)
    phases: list[float] = []
    timings: list[ConfigTiming] = []
    for start in range(0, len(items), batch):
        chunk = list(items[start:start + batch])
        with tempfile.TemporaryDirectory(prefix="latprune-prof-") as tmp:
            members = [backend.profiled(reference, os.path.join(tmp, "ref"))]
            members += [backend.profiled(build(item), os.path.join(tmp, f"m{j}")) for j, item in enumerate(chunk)]
            # warm-up; the models' plain run time sizes the rounds
            run_ms = float(np.median([min(m.run(timed=False) for _ in range(3)) for m in members]))
            rounds = max(1, int(np.clip(np.ceil(min_seconds * 1e3 / max(run_ms, 1e-3)), min_runs, max_runs)))
            for _ in range(rounds):
                for j in rng.permutation(len(members)):  # no model always first in a round
                    members[j].run()
            results = [m.finish(names, item) for m, item in zip(members, [None] + chunk)]
            members.clear()  # free this batch's sessions before the next batch opens its own
        ref = results[0]
        phase = ref.kernel_ms
        if not phase > 0:
            raise ValueError("the reference model ran no timed kernel: nothing to scale by")
        phases.append(phase)
        for timing in results[1:]:
            timing.phase_ms = phase
            timings.append(timing)
            if on_config:
                on_config(timing, (phase_ms or float(np.median(phases))) / phase)
    target = phase_ms or (float(np.median(phases)) if phases else 0.0)
    for timing in timings:
        rescale(timing, target / timing.phase_ms)
        timing.reference_ms = target
    return timings


def rescale(timing: ConfigTiming, factor: float) -> None:
    """Multiply the times of `timing` (layers, unclaimed kernels, reorders, end to end and the
    reference they are scaled to) by `factor`: a change of the machine speed they stand for."""
    timing.layer_ms = {i: v * factor for i, v in timing.layer_ms.items()}
    timing.unmapped_ms *= factor
    timing.reorder_ms *= factor
    timing.overhead_reorder_ms *= factor
    timing.end_to_end_ms *= factor
    if timing.kernels is not None:
        timing.kernels = [(cls, mel, ms * factor) for cls, mel, ms in timing.kernels]
    timing.reference_ms *= factor
