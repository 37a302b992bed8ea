"""The channel multiple a backend runs fastest at, measured by a short probe on the device.

Runtimes block channels (ONNX Runtime's NCHWc convs use blocks of 16 channels with AVX-512,
8 with AVX2; GPUs tile by 32 or 64): a width off the block runs the cost of the next block or
worse. The probe times a 3x3 convolution (14x14 input, c_in = c_out = w) at every multiple
of 4 from 32 to 128 channels, in 3 interleaved rounds, and compares the cost per
multiply-add (t / w²) of the widths half a block off against the block's multiples: the step
is the largest block b of 64, 32, 16, 8 whose half-block widths cost at least
`THRESHOLD` more; 8 when none does (no blocking seen: 8 keeps the solve small). About 5 s on
a CPU; cached per device fingerprint in $LATPRUNE_HOME/probe.json.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

WIDTHS = tuple(range(32, 129, 4))
BLOCKS = (64, 32, 16, 8)
THRESHOLD = 1.08
DEFAULT_STEP = 8


def _cache_path() -> Path:
    home = Path(os.environ.get("LATPRUNE_HOME", Path.home() / ".cache" / "latprune"))
    return home / "probe.json"


def step_from_timings(ms: dict[int, float], blocks=BLOCKS, threshold: float = THRESHOLD) -> tuple[int, dict]:
    """(step, {block: cost ratio of half-block widths to multiples}) from conv timings per
    width (module doc)."""
    per_mac = {w: t / (w * w) for w, t in ms.items() if t > 0}
    ratios = {}
    for b in blocks:
        half = b // 2
        r = [per_mac[w] / ((per_mac[w - half] + per_mac[w + half]) / 2) for w in per_mac
             if w % b == half and w - half in per_mac and w + half in per_mac]
        if r:
            ratios[b] = float(np.median(r))
    for b in blocks:
        if ratios.get(b, 0.0) >= threshold:
            return b, ratios
    return DEFAULT_STEP, ratios


def probe_timings(backend, widths=WIDTHS, rounds: int = 3) -> dict[int, float]:
    """Median ms of the probe conv at each width, over `rounds` interleaved rounds."""
    from latprune.profiler.backends.base import timed_runs
    from latprune.profiler.layers import layer_model
    from latprune.types import LayerSpec

    spec = LayerSpec("Conv", [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], False, [14, 14], 1, activation="Relu")
    runners = {w: backend.load(layer_model(spec, w, w).SerializeToString()) for w in widths}
    feeds = {w: r.inputs(2) for w, r in runners.items()}
    samples: dict[int, list[float]] = {w: [] for w in widths}
    try:
        for _ in range(rounds):
            for w in widths:
                samples[w].append(float(np.median(timed_runs(runners[w], 2, 10, 0.02, inputs=feeds[w]))))
    finally:
        for r in runners.values():
            r.close()
    return {w: float(np.median(v)) for w, v in samples.items()}


def channel_step(backend) -> int:
    """The backend's preferred channel multiple (module doc), probed once per device."""
    from latprune.profiler.fingerprint import fingerprint_id

    fp = {k: v for k, v in backend.fingerprint(timing="isolated").items() if k != "timing"}
    key = fingerprint_id(fp)
    path = _cache_path()
    try:
        cache = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        cache = {}
    if key in cache and isinstance(cache[key].get("step"), int):
        return cache[key]["step"]
    t0 = time.perf_counter()
    step, ratios = step_from_timings(probe_timings(backend))
    cache[key] = {"step": step, "ratios": {str(b): r for b, r in ratios.items()}, "fingerprint": fp,
                  "seconds": time.perf_counter() - t0}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: probe again next time
    return step
