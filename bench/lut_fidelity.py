"""How well the latency table predicts measured latency (issue 3's acceptance figures).

Part 1, whole models: for N random channel configurations of each model (every prunable group
gets a random width between 25% and 100% of its channels; "step8": rounded to a multiple of 8,
as the solver chooses, mostly off the profiled grid; "step16": multiples of 16, the solver's
default on AVX-512; "any": any integer, off the hardware block size too), build the pruned ONNX, measure it end to end (ONNX Runtime, 1 thread), and
compare with (a) the calibrated prediction latprune uses and (b) the naive sum of isolated
layer latencies. Reports median and 95th-percentile absolute error and the share within ±10%
(nn-Meter's measure).

Part 2, the table for ResNet-50: wall time to profile every layer into a fresh table, cells
measured vs the full grid of candidate widths (multiples of the preferred step: 16 with
AVX-512), and interpolation error on held-out cells of that grid measured afterwards.

    python bench/lut_fidelity.py [--models resnet18,resnet50,mobilenet_v2] [--configs 30] [--heldout 200]

Prints tables and writes bench/out/lut_fidelity.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from models import exported  # noqa: E402  (bench/models.py)
OUT = HERE / "out"


_PROFILED: set[str] = set()


def whole_model_errors(name: str, n_configs: int, lut: Path, widths_mode: str, seed: int = 0) -> dict:
    from latprune.lut.predict import calibrated, predict_raw
    from latprune.pipeline import open_table, prepare, profile_model, model_family
    from latprune.profiler.onnxrt import measure_model
    from latprune.pruner.surgery import apply_plan
    from latprune.solver.problem_costs import make_plan

    path = exported(name)
    if name not in _PROFILED:  # cells and calibration points once per model
        profile_model(path, lut, threads=1)
        _PROFILED.add(name)
    model, data, analysis = prepare(path)
    prob = analysis.problem
    table = open_table(lut, 1)
    calib = table.calibration(model_family(model, data))
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_configs):
        widths = {}
        for g in prob.groups:
            if not g.prunable:
                continue
            w = int(rng.integers(max(1, g.size // 4), g.size + 1))
            if widths_mode.startswith("step"):  # what the solver chooses: multiples of the step
                k = int(widths_mode[4:])
                w = min(g.size, max(k, k * round(w / k)))
            widths[g.id] = w
        pruned = apply_plan(analysis, make_plan(prob, widths, set(), "random"), check=False)
        measured = measure_model(pruned, threads=1).median_ms
        raw = predict_raw(prob, table, widths)
        rows.append({"measured_ms": measured, "predicted_ms": calibrated(raw, calib), "naive_ms": raw,
                     "off_grid": sum(w % 8 != 0 for w in widths.values()), "groups": len(widths)})
        print(f"  {name} [{widths_mode}] config {i + 1}/{n_configs}: measured {measured:.2f} predicted {rows[-1]['predicted_ms']:.2f} "
              f"naive {raw:.2f}", flush=True)
    table.close()
    return {"model": name, "widths": widths_mode, "configs": rows, **summarise(rows)}


def summarise(rows: list[dict]) -> dict:
    meas = np.array([r["measured_ms"] for r in rows])
    out = {}
    for key in ("predicted_ms", "naive_ms"):
        err = np.abs(np.array([r[key] for r in rows]) - meas) / meas
        out[key.replace("_ms", "")] = {"median_abs_err": float(np.median(err)), "p95_abs_err": float(np.percentile(err, 95)),
                                       "within_10pct": float(np.mean(err <= 0.10))}
    return out


def table_build(heldout: int, seed: int = 0) -> dict:
    """Profile ResNet-50 into a fresh table; interpolation error on held-out cells."""
    from latprune.lut.predict import required_cells, space_values
    from latprune.pipeline import open_table, prepare
    from latprune.profiler.fingerprint import preferred_channel_step
    from latprune.profiler.layers import measure_layer
    from latprune.profiler.profile import profile_cells

    _, _, analysis = prepare(exported("resnet50"))
    prob = analysis.problem
    with tempfile.TemporaryDirectory() as tmp:
        table = open_table(Path(tmp) / "lut.sqlite", 1)
        cells = required_cells(prob)
        t0 = time.perf_counter()
        measured = profile_cells(table, cells, threads=1)
        wall = time.perf_counter() - t0
        full = 0
        candidates = []
        for layer in prob.layers:
            step = preferred_channel_step()
            step_values = lambda sp: sorted({v for v in range(1, max(space_values(prob, sp)) + 1)  # noqa: E731
                                             if v % step == 0} | set(space_values(prob, sp)))
            ins, outs = step_values(layer.c_in), step_values(layer.c_out)
            full += len(ins) if layer.spec.depthwise else len(ins) * len(outs)
            candidates.append((layer, ins, outs))
        rng = np.random.default_rng(seed)
        errs, seen = [], set()
        while len(errs) < heldout:
            layer, ins, outs = candidates[int(rng.integers(len(candidates)))]
            ci = int(rng.choice(ins))
            co = ci if layer.spec.depthwise else int(rng.choice(outs))
            sig = layer.spec.signature()
            if (sig, ci, co) in seen or table.has(sig, ci, co):
                continue
            seen.add((sig, ci, co))
            truth = measure_layer(layer.spec, ci, co, threads=1).median_ms
            errs.append(abs(table.lookup(sig, ci, co) - truth) / truth)
        table.close()
    errs_a = np.array(errs)
    return {"wall_s": wall, "cells_measured": measured, "cells_full_grid": full, "layers": len(prob.layers),
            "heldout": heldout, "interp_median_abs_err": float(np.median(errs_a)),
            "interp_p95_abs_err": float(np.percentile(errs_a, 95)), "interp_within_10pct": float(np.mean(errs_a <= 0.1))}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18,resnet50,mobilenet_v2")
    ap.add_argument("--configs", type=int, default=30)
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--lut", default=str(OUT / "lut.sqlite"))
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--widths", default="step16,step8,any", help="stepK: multiples of K (the "
                    "solver's choices; 16 by default on AVX-512); any: arbitrary integers")
    args = ap.parse_args()
    result = {"whole_model": [], "table_build": None}
    for mode in args.widths.split(","):
        for name in args.models.split(","):
            result["whole_model"].append(whole_model_errors(name, args.configs, Path(args.lut), mode))
    if not args.skip_build:
        result["table_build"] = table_build(args.heldout)
    (OUT / "lut_fidelity.json").write_text(json.dumps(result, indent=1))
    print("\nmodel | widths | predictor | median |err| | p95 |err| | within ±10%")
    for r in result["whole_model"]:
        for key in ("predicted", "naive"):
            s = r[key]
            print(f"{r['model']} | {r['widths']} | {key} | {100 * s['median_abs_err']:.1f}% | {100 * s['p95_abs_err']:.1f}% | "
                  f"{100 * s['within_10pct']:.0f}%")
    if result["table_build"]:
        b = result["table_build"]
        print(f"\nResNet-50 table: {b['cells_measured']} cells measured of {b['cells_full_grid']} in the full grid "
              f"({b['layers']} layers) in {b['wall_s']:.0f} s; interpolation on {b['heldout']} held-out cells: "
              f"median {100 * b['interp_median_abs_err']:.1f}%, p95 {100 * b['interp_p95_abs_err']:.1f}%, "
              f"within ±10% {100 * b['interp_within_10pct']:.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
