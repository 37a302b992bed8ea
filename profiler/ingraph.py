"""In-graph kernel timing: a whole model runs under ONNX Runtime's profiler and each kernel's
time is attributed to a layer by name; runs are bracketed by a reference model to undo the
machine's slow phases.

Why: a layer timed alone (profiler/layers.py) pays layout reorders at its input and output
and runs on a cold cache, which a layer inside the model does not; on this AVX-512 CPU the sum
of isolated layers missed whole-model latency by 6-44% (NOTES.md). ONNX Runtime's profiler
reports every kernel of a run with the name of the node it executes (after fusion: the output
of the last node fused into it, plus `_nchwc` for blocked convs). The caller gives the names
that belong to each layer (latprune/ingraph_profile.py builds them from the graph analysis); a
kernel that maps to no layer (pooling, reorders, flatten) is overhead.

Nothing here knows about pruning: it times the models it is given.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx


@dataclass
class ConfigTiming:
    """One model, profiled: ms per layer index (kernel medians), overhead ms of kernels no layer
    claims, and the unprofiled end-to-end median (ms). `widths` is the caller's label of the
    model (the group widths of a pruned copy)."""

    widths: dict[int, int]
    layer_ms: dict[int, float]
    unmapped_ms: float
    end_to_end_ms: float
    unmapped: list[str] = field(default_factory=list)
    phase_ms: float = 0.0  # the reference model's time around this run (profile_bracketed)


def _kernel_name(event_name: str) -> str:
    base = event_name[: -len("_kernel_time")]
    return base[: -len("_nchwc")] if base.endswith("_nchwc") else base


def profile_config(model: onnx.ModelProto | bytes, names: dict[str, int], threads: int = 1,
                   runs: int = 10, warmup: int = 3, widths: dict[int, int] | None = None) -> ConfigTiming:
    """Profile `model` (`runs` timed runs after `warmup`), attribute kernels to layers through
    `names`, and time it unprofiled in a second session (`runs` runs) for the end-to-end median."""
    from latprune.profiler.onnxrt import make_session, random_feed, session_options, time_session

    data = model if isinstance(model, bytes) else model.SerializeToString()
    with tempfile.TemporaryDirectory(prefix="latprune-prof-") as tmp:
        opts = session_options(threads)
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "ort")
        session = make_session(data, threads, opts)
        feed = random_feed(session)
        for _ in range(warmup):
            session.run(None, feed)
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    kernel_us: dict[str, list[float]] = defaultdict(list)
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            kernel_us[ev["name"]].append(float(ev["dur"]))
    layer_ms: dict[int, float] = defaultdict(float)
    unmapped_ms, unmapped = 0.0, []
    for name, durs in kernel_us.items():
        ms = float(np.median(durs[-runs:])) / 1e3  # the timed runs only
        index = names.get(_kernel_name(name))
        if index is None:
            unmapped_ms += ms
            unmapped.append(_kernel_name(name))
        else:
            layer_ms[index] += ms
    plain = make_session(data, threads)
    e2e = time_session(plain, random_feed(plain), warmup=warmup, min_runs=runs, min_seconds=0.0).median_ms
    return ConfigTiming(dict(widths or {}), dict(layer_ms), unmapped_ms, e2e, unmapped)


SLOW_PHASE = 1.08  # a run whose dense bursts are this much slower than the fastest seen is redone
MAX_TRIES = 3


def profile_bracketed(items: Sequence, build: Callable[[object], bytes], reference: bytes,
                      names: dict[str, int], threads: int = 1, runs: int = 10,
                      on_config: Callable[[ConfigTiming, float], None] | None = None) -> list[ConfigTiming]:
    """Profile the model `build(item)` for each item (group widths, for the caller), with times
    at the machine's fast state.

    A shared machine runs in phases: the same session timed 26 ms for seconds, then 32 ms
    (NOTES.md), and the few runs of one model fall inside one phase. So each model is bracketed
    by short bursts of `reference` (its phase); a run whose phase is more than SLOW_PHASE times
    the fastest phase seen is redone (up to MAX_TRIES, keeping the fastest), and times are
    scaled by (fastest phase) / (the run's phase). `on_config(timing, scale)` is called after
    each model with the scale known so far; the returned timings use the final one."""
    from latprune.profiler.onnxrt import make_session, random_feed

    ref = make_session(reference, threads)
    ref_feed = random_feed(ref)
    fastest = _burst_ms(ref, ref_feed, 5)
    timings: list[ConfigTiming] = []
    for item in items:
        model = build(item)
        best = None
        for _ in range(MAX_TRIES):
            before = _burst_ms(ref, ref_feed)
            timing = profile_config(model, names, threads, runs, widths=item)
            timing.phase_ms = float(np.median([before, _burst_ms(ref, ref_feed)]))
            fastest = min(fastest, timing.phase_ms)
            if best is None or timing.phase_ms < best.phase_ms:
                best = timing
            if best.phase_ms <= SLOW_PHASE * fastest:
                break
        timings.append(best)
        if on_config:
            on_config(best, fastest / best.phase_ms)
    for timing in timings:
        scale = fastest / timing.phase_ms
        timing.layer_ms = {i: v * scale for i, v in timing.layer_ms.items()}
        timing.unmapped_ms *= scale
        timing.end_to_end_ms *= scale
    return timings


def _burst_ms(session, feed, runs: int = 3) -> float:
    """Median of `runs` runs (ms) after one warm-up run."""
    from latprune.profiler.onnxrt import _timed_runs

    return float(np.median(_timed_runs(session, feed, 1, runs, 0.0)))
