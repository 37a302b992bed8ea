"""Every solver on the same problems: torchvision ResNet-50 and ResNet-152 (ONNX, 224×224,
batch 1) at a 0.5× latency budget, retained-importance objective (L1), latency from this
machine's table (profiled on first use, 1 thread, the CPU's preferred channel step),
block removal allowed, the same time limit and relative gap (1e-3) for every exact method.

Reported per method: solve time, objective, predicted latency / budget, and the gap to the
best objective found by an exact method. Exact methods (HiGHS MILP, SCIP on the Pyomo MINLP,
MindtPy OA) should agree within their relative gap; the DP and the baselines are heuristics on
the bilayer problem.

    python bench/solvers.py [--models resnet50,resnet152,PATH.onnx] [--methods ...] [--time-limit 120] [--gap 1e-3]

Prints a table and writes bench/out/solvers.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
OUT = HERE / "out"
METHODS = "milp,minlp-scip,minlp-oa,dp,halp,threshold,uniform"
EXACT = ("milp", "minlp-scip", "minlp-oa")


def _relate(rows: list[dict], name: str) -> None:
    """Gap to the best exact objective and speed relative to MindtPy OA, per model."""
    ok = [r for r in rows if r["model"] == name and "objective" in r]
    best = max((r["objective"] for r in ok if r["method"] in EXACT), default=None)
    oa = next((r for r in ok if r["method"] == "minlp-oa"), None)
    for r in ok:
        r["gap_to_best_exact"] = None if best is None else (best - r["objective"]) / abs(best)
        r["speed_vs_minlp_oa"] = None if oa is None else oa["seconds"] / r["seconds"]


def main() -> int:
    import models as bench_models
    from latprune.lut.predict import layer_costs
    from latprune.pipeline import Progress, ensure_profiled, open_table, prepare, solve
    from latprune.solver.problem_costs import SolveInput, dense_raw_latency

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet50,resnet152")
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--time-limit", type=float, default=120.0)
    ap.add_argument("--gap", type=float, default=1e-3, help="relative gap for the exact methods")
    ap.add_argument("--lut", default=str(OUT / "lut.sqlite"))
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        # a name from bench/models.py, or the path of any ONNX file (e.g. a bench/zoo.py export)
        path = Path(name) if name.endswith(".onnx") else bench_models.exported(name)
        name = path.stem
        _, _, analysis = prepare(path)
        prob = analysis.problem
        table = open_table(Path(args.lut), 1)  # ONNX Runtime, 1 thread
        try:
            n = ensure_profiled(prob, table, 1, 5, Progress(), analysis)
            costs = layer_costs(prob, table)
        finally:
            table.close()
        probe = SolveInput(prob, costs, 1.0)
        budget = args.budget * dense_raw_latency(probe)
        groups = sum(g.prunable for g in prob.groups)
        print(f"{name}: {groups} prunable groups, {len(prob.layers)} layers, {len(prob.blocks)} blocks, "
              f"{n} cells profiled now; budget {budget:.2f} ms (raw layer sum)", flush=True)
        for method in args.methods.split(","):
            inp = SolveInput(prob, costs, budget, allow_block_removal=True, time_limit_s=args.time_limit,
                             mip_rel_gap=args.gap)
            t0 = time.perf_counter()
            try:
                plan = solve(inp, method)
            except Exception as exc:
                rows.append({"model": name, "method": method, "error": f"{type(exc).__name__}: {exc}"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            rows.append({"model": name, "method": method, "seconds": time.perf_counter() - t0,
                         "objective": plan.objective, "predicted_over_budget": plan.predicted_ms / budget,
                         "status": plan.status, "gap": plan.gap, "blocks_removed": len(plan.removed_blocks),
                         "groups": groups, "layers": len(prob.layers), "blocks": len(prob.blocks)})
            print(json.dumps(rows[-1]), flush=True)
        _relate(rows, name)
    OUT.mkdir(exist_ok=True)
    path = OUT / "solvers.json"
    if path.is_file():  # a partial re-run (--models/--methods) replaces only its own rows
        fresh = {(r["model"], r["method"]) for r in rows}
        rows = [r for r in json.loads(path.read_text()) if (r["model"], r["method"]) not in fresh] + rows
        for name in {r["model"] for r in rows}:
            _relate(rows, name)
    path.write_text(json.dumps(rows, indent=1))
    print("\nmodel | method | solve s | objective | gap to best exact | predicted/budget | blocks removed | "
          "× faster than MindtPy OA | status")
    for r in rows:
        if "error" in r:
            print(f"{r['model']} | {r['method']} | error: {r['error'][:80]}")
            continue
        gap = "-" if r["gap_to_best_exact"] is None else f"{100 * r['gap_to_best_exact']:.3f}%"
        speed = "-" if r["speed_vs_minlp_oa"] is None else f"{r['speed_vs_minlp_oa']:.1f}"
        print(f"{r['model']} | {r['method']} | {r['seconds']:.2f} | {r['objective']:.4f} | {gap} | "
              f"{r['predicted_over_budget']:.3f} | {r['blocks_removed']} | {speed} | {r['status']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
