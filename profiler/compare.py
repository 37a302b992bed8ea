"""Measure several models (ONNX files, or a backend's artifacts) side by side in fresh processes.

A model's median latency differs between processes by several percent (memory placement,
allocator state; more in a long-lived process that has done other work), and the machine's
load drifts over seconds. So the final check of a pruned model runs in `processes` fresh
Python processes, each timing every model in alternating bursts (the backend's
measure_interleaved); per model the result is the mean over processes of its median.

    python -m latprune.profiler.compare [--threads N] [--backend JSON] NAME=PATH ...   # prints JSON
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from latprune.types import LatpruneError, TimingStats


def compare_in_subprocesses(models: dict[str, Path], threads: int = 1, processes: int = 2,
                            bursts: int = 5, backend=None) -> dict[str, TimingStats]:
    """{name: TimingStats} with the mean median/p90 over `processes` fresh processes; the
    order of the models alternates between processes. `backend`: the runtime (default ONNX
    Runtime on the CPU with `threads`)."""
    names = list(models)
    spec = json.dumps(backend.spec() if backend is not None else {"name": "ort-cpu", "threads": threads})
    per: dict[str, list[TimingStats]] = {k: [] for k in names}
    for i in range(processes):
        order = names if i % 2 == 0 else names[::-1]
        cmd = [sys.executable, "-m", "latprune.profiler.compare", "--threads", str(threads),
               "--bursts", str(bursts), "--backend", spec] + [f"{k}={models[k]}" for k in order]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
            raise LatpruneError(f"measurement process failed: {tail}")
        for k, v in json.loads(proc.stdout).items():
            per[k].append(TimingStats(**v))
    return {k: TimingStats(float(np.mean([s.median_ms for s in v])), float(np.mean([s.p90_ms for s in v])),
                           float(min(s.min_ms for s in v)), int(sum(s.runs for s in v)))
            for k, v in per.items()}


def main(argv: list[str] | None = None) -> int:
    import argparse

    from latprune.profiler.backends import backend_from_spec

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bursts", type=int, default=5)
    ap.add_argument("--backend", default=None, help="the backend's spec (JSON); default ONNX Runtime CPU")
    ap.add_argument("models", nargs="+", help="NAME=PATH")
    args = ap.parse_args(argv)
    models = dict(m.split("=", 1) for m in args.models)
    spec = json.loads(args.backend) if args.backend else {"name": "ort-cpu", "threads": args.threads}
    stats = backend_from_spec(spec).measure_interleaved({k: Path(p) for k, p in models.items()}, args.bursts)
    print(json.dumps({k: v.as_dict() for k, v in stats.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
