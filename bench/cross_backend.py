"""Backends differ, and the tool knows it (issue 13): the same model and budget planned for
ONNX Runtime and for OpenVINO on this CPU, each plan measured on both runtimes.

    python bench/cross_backend.py [--model resnet18] [--budget 0.5] [--precision P]

For each runtime R, `latprune optimize --backend R --speedup 1/budget` gives a plan (its
retained objective from plan.json). Both pruned models are then timed beside the dense model
on ONNX Runtime and on OpenVINO (each side by side in 3 fresh processes): the 2x2 table of
latency ratios to dense. A plan should be at least as fast on its own runtime as the other
runtime's plan. Prints the table; writes bench/out/cross_backend.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from models import exported  # noqa: E402

OUT = HERE / "out"
RUNTIMES = ("ort-cpu", "openvino")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--precision", default=None, help="OpenVINO's precision (default: the runtime's)")
    ap.add_argument("--lut", default=str(OUT / "cross_backend.sqlite"))
    args = ap.parse_args()
    from latprune.profiler.backends import get_backend

    model = exported(args.model)
    work = OUT / "cross_backend" / f"{args.model}_{args.budget:.2f}"
    plans = {}
    for runtime in RUNTIMES:
        out = work / runtime
        cmd = [sys.executable, "-m", "latprune.cli", "optimize", str(model), "--speedup", f"{1 / args.budget:.6f}",
               "--backend", runtime, "--lut", args.lut, "--out", str(out), "-q"]
        if runtime == "openvino" and args.precision:
            cmd += ["--precision", args.precision]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode not in (0, 3):
            print(f"{runtime}: {proc.stderr.strip()}")
            return 1
        plan = json.loads((out / "plan.json").read_text())
        report = json.loads((out / "report.json").read_text())
        plans[runtime] = {"pruned": out / "pruned.onnx", "objective": plan["objective"], "widths": plan["widths"],
                          "removed_blocks": plan["removed_blocks"], "own_measured_ratio":
                          report["measured_ms"] / report["dense_ms"], "step": report["step"],
                          "precision": report["backend"]["precision"]}
    table = {}
    for measured_on in RUNTIMES:
        backend = get_backend(measured_on, threads=1, precision=args.precision if measured_on == "openvino" else None)
        models = {"dense": model, **{f"plan-{r}": plans[r]["pruned"] for r in RUNTIMES}}
        artifacts = {k: backend.build(v, work) if measured_on == "openvino" else v for k, v in models.items()}
        st = backend.measure_side_by_side(artifacts, processes=3)
        table[measured_on] = {r: st[f"plan-{r}"].median_ms / st["dense"].median_ms for r in RUNTIMES}
        table[measured_on]["dense_ms"] = st["dense"].median_ms
    same = sum(plans["ort-cpu"]["widths"].get(g) == w for g, w in plans["openvino"]["widths"].items())
    result = {"model": args.model, "budget": args.budget, "plans": {r: {k: v for k, v in p.items() if k != "pruned"}
                                                                    for r, p in plans.items()},
              "ratio_to_dense": table, "groups_with_equal_width": same,
              "groups": len(plans["openvino"]["widths"])}
    (OUT / "cross_backend.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"{args.model} at {args.budget}x: latency ratio to dense (rows: measured on; columns: planned for)")
    print(f"{'measured on':12s} | {'plan ort-cpu':>12s} | {'plan openvino':>13s} | dense ms")
    for m in RUNTIMES:
        print(f"{m:12s} | {table[m]['ort-cpu']:12.3f} | {table[m]['openvino']:13.3f} | {table[m]['dense_ms']:.2f}")
    for r in RUNTIMES:
        print(f"plan for {r}: objective {plans[r]['objective']:.4f}, step {plans[r]['step']}, "
              f"blocks removed {len(plans[r]['removed_blocks'])}, precision {plans[r]['precision']}")
    print(f"groups with the same width in both plans: {same}/{result['groups']}")
    own_best = all(table[r][r] <= table[r][o] * 1.02 for r in RUNTIMES for o in RUNTIMES if o != r)
    print(f"each plan at least as fast on its own runtime (within 2%): {own_best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
