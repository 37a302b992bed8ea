"""Timing methodology shared by every backend.

1. Warm-up by count *and* time: at least `warmup_runs` runs and `warmup_s` seconds (first
   runs allocate, JIT-select kernels, fault in pages).
2. Timed runs until at least `min_runs` runs and `min_s` seconds (capped at `max_runs`),
   cycling through `rotate` different input sets so that caches never see one buffer only.
3. Median, p90, p99, min and the coefficient of variation (std / mean) of the per-run times.
4. If the CV exceeds `cv_threshold` (trtexec warns above 2.5%; CPU timings under load are
   noisier, so the default is 5%), warn and measure again, up to `retries` times, keeping the
   attempt with the lowest CV. Its `warnings` say what happened.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class TimingPolicy:
    warmup_runs: int = 3
    warmup_s: float = 0.05
    min_runs: int = 15
    min_s: float = 0.1
    max_runs: int = 2000
    rotate: int = 3
    cv_threshold: float = 0.05
    retries: int = 2


@dataclass
class Measurement:
    """Per-run latency statistics in milliseconds."""

    median_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    cv: float
    runs: int
    attempts: int = 1
    warnings: list[str] = field(default_factory=list)


def _stats(samples: list[float]) -> Measurement:
    arr = np.asarray(samples)
    mean = float(arr.mean())
    return Measurement(float(np.median(arr)), float(np.percentile(arr, 90)), float(np.percentile(arr, 99)),
                       float(arr.min()), float(arr.std() / mean) if mean > 0 else 0.0, len(arr))


def time_runner(runner, policy: TimingPolicy | None = None) -> Measurement:
    """Time a backend Runner (profiler.backends.base.Runner) with `policy`."""
    p = policy or TimingPolicy()
    inputs = runner.inputs(max(1, p.rotate))
    best: Measurement | None = None
    warnings: list[str] = []
    for attempt in range(1, p.retries + 2):
        start, n = time.perf_counter(), 0
        while n < p.warmup_runs or time.perf_counter() - start < p.warmup_s:
            runner.run_ms(inputs[n % len(inputs)])
            n += 1
        samples: list[float] = []
        start = time.perf_counter()
        while len(samples) < p.max_runs and (len(samples) < p.min_runs or time.perf_counter() - start < p.min_s):
            samples.append(runner.run_ms(inputs[len(samples) % len(inputs)]))
        m = _stats(samples)
        m.attempts = attempt
        if best is None or m.cv < best.cv:
            best = m
        if m.cv <= p.cv_threshold:
            break
        warnings.append(f"attempt {attempt}: CV {100 * m.cv:.1f}% above {100 * p.cv_threshold:.1f}%")
    assert best is not None
    if best.cv > p.cv_threshold:
        warnings.append(f"kept the steadiest attempt (CV {100 * best.cv:.1f}%)")
    best.warnings = warnings
    return best
