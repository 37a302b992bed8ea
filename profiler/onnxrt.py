"""ONNX Runtime on the CPU: build sessions and time whole models.

Methodology: random inputs of the model's shape (symbolic dims set to 1), `warmup` untimed
runs, then timed runs until both `min_runs` and `min_seconds` are reached (capped at
`max_runs`); the median and p90 of per-run wall time (time.perf_counter) are reported in ms.
Threads default to 1 because single-threaded timings repeat within 1-2% on a shared machine.
"""
from __future__ import annotations

import time

import numpy as np
import onnx

from latprune.types import TimingStats

_NP_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8, "tensor(bool)": np.bool_,
}


def session_options(threads: int = 1):
    """CPU session options: `threads` intra-op threads, sequential, full graph optimisation,
    no spinning with one thread."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads == 1:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def make_session(model: onnx.ModelProto | bytes, threads: int = 1, opts=None):
    """An ONNX Runtime CPU session with `threads` intra-op threads and full graph optimisation
    (or the given session options)."""
    import onnxruntime as ort

    opts = opts or session_options(threads)
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])


def random_feed(session, seed: int = 0, batch: int = 1) -> dict[str, np.ndarray]:
    """Random inputs matching the session's inputs; symbolic dimensions become `batch`."""
    rng = np.random.default_rng(seed)
    feed = {}
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else batch for d in inp.shape]
        dtype = _NP_TYPES.get(inp.type, np.float32)
        if np.issubdtype(dtype, np.floating):
            feed[inp.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feed[inp.name] = np.zeros(shape, dtype=dtype)
    return feed


def time_session(session, feed, warmup: int = 3, min_runs: int = 10, min_seconds: float = 0.2,
                 max_runs: int = 1000) -> TimingStats:
    """Time `session.run` on `feed`; see the module docstring for the method."""
    return _stats(_timed_runs(session, feed, warmup, min_runs, min_seconds, max_runs))


def _timed_runs(session, feed, warmup: int, min_runs: int, min_seconds: float, max_runs: int = 1000) -> list[float]:
    """Per-run wall times (ms) after `warmup` untimed runs, until min_runs and min_seconds."""
    for _ in range(warmup):
        session.run(None, feed)
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_runs and (len(samples) < min_runs or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        session.run(None, feed)
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def _stats(samples: list[float]) -> TimingStats:
    arr = np.asarray(samples)
    return TimingStats(float(np.median(arr)), float(np.percentile(arr, 90)), float(arr.min()), len(arr))


def measure_model(model: onnx.ModelProto | bytes, threads: int = 1, warmup: int = 5,
                  min_runs: int = 20, min_seconds: float = 1.0) -> TimingStats:
    """Median/p90 end-to-end latency (ms) of a whole model on the CPU."""
    session = make_session(model, threads)
    return time_session(session, random_feed(session), warmup, min_runs, min_seconds)


def measure_interleaved(models: dict[str, onnx.ModelProto | bytes | object], threads: int = 1,
                        bursts: int = 5, min_runs: int = 10, min_seconds: float = 0.2) -> dict[str, TimingStats]:
    """Time several models in alternating bursts within this process, so that slow drifts of
    the machine (other load, frequency changes) hit them alike; ratios of the returned medians
    are far steadier than ratios of separate measurements. Values may be ModelProto, bytes or
    an existing session. Each burst is warmed up; the median is over all timed runs."""
    sessions = {k: v if hasattr(v, "run") else make_session(v, threads) for k, v in models.items()}
    feeds = {k: random_feed(s) for k, s in sessions.items()}
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(bursts):
        for k, s in sessions.items():
            samples[k] += _timed_runs(s, feeds[k], 2, min_runs, min_seconds)
    return {k: _stats(v) for k, v in samples.items()}
