"""Probe: the MINLP solvers (solver.minlp) against the HiGHS MILP on ResNet-50.

The exported torchvision ResNet-50 (bench/out/models/resnet50.onnx; skipped when absent) is
analysed by latprune.pipeline.prepare (L1 importance), its layer costs come from the
deterministic fake latency table of tests/test_solver.py (bilinear in c_in·c_out plus 5% noise),
and the budget is 0.5 × the dense raw latency, blocks removable. Each solver gets the same
time limit (120 s by default):

    python bench/minlp_probe.py [--model PATH] [--time-limit 120] [--max-candidates 16]
                                [--solvers milp,scip,mindtpy] [--out bench/out/minlp_probe.json]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def build_input(model: Path, max_candidates: int, time_limit: float, frac: float, gap: float):
    from test_solver import FAKE_FP, _fill_table  # the solver tests' fake latency table
    from latprune.lut.predict import layer_costs
    from latprune.lut.store import LatencyTable
    from latprune.pipeline import prepare
    from latprune.solver.problem_costs import SolveInput, dense_raw_latency

    _, _, analysis = prepare(model, max_candidates=max_candidates)
    prob = analysis.problem
    table = LatencyTable(":memory:", FAKE_FP)
    try:
        _fill_table(table, prob, 0)
        costs = layer_costs(prob, table)
    finally:
        table.close()
    dense = dense_raw_latency(SolveInput(prob, costs, 1.0))
    inp = SolveInput(prob, costs, frac * dense, time_limit_s=time_limit, mip_rel_gap=gap)
    return inp, dense


def run(inp, solver: str) -> dict:
    from latprune.types import LatpruneError

    t0 = time.perf_counter()
    try:
        if solver == "milp":
            from latprune.solver.milp import solve_milp
            plan = solve_milp(inp)
        else:
            from latprune.solver.minlp import solve_minlp
            plan = solve_minlp(inp, solver)
    except LatpruneError as e:
        return {"solver": solver, "error": str(e), "seconds": time.perf_counter() - t0}
    return {"solver": solver, "method": plan.method, "objective": plan.objective,
            "predicted_ms": plan.predicted_ms, "budget_ms": inp.budget_ms,
            "seconds": plan.solve_seconds, "status": plan.status,
            "gap": None if plan.gap is None or math.isnan(plan.gap) else plan.gap,
            "removed_blocks": plan.removed_blocks}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=HERE / "out" / "models" / "resnet50.onnx")
    ap.add_argument("--time-limit", type=float, default=120.0)
    ap.add_argument("--max-candidates", type=int, default=16)
    ap.add_argument("--budget-frac", type=float, default=0.5)
    ap.add_argument("--gap", type=float, default=1e-3)
    ap.add_argument("--solvers", default="milp,scip,mindtpy")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not args.model.exists():
        print(f"skipped: {args.model} does not exist (bench/e2e.py exports it)")
        return 0
    inp, dense = build_input(args.model, args.max_candidates, args.time_limit,
                             args.budget_frac, args.gap)
    prob = inp.problem
    groups = [g for g in prob.groups if g.prunable]
    info = {"model": args.model.stem, "groups": len(groups), "layers": len(prob.layers),
            "blocks": len(prob.blocks),
            "max_candidates": max(len(g.candidate_widths) for g in groups),
            "dense_raw_ms": dense, "budget_ms": inp.budget_ms, "time_limit_s": args.time_limit,
            "mip_rel_gap": args.gap}
    print(json.dumps(info))
    rows = []
    for solver in args.solvers.split(","):
        row = run(inp, solver)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"problem": info, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
