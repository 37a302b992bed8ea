"""Post-training accuracy of the CIFAR ResNet-56 pruned to measured CPU latency budgets, for
each objective × solver and the baselines, without and with repair (issue 4).

For every budget (0.7×, 0.5×, 0.35× of the dense latency measured alongside) and every
configuration, `latprune.pipeline.optimize` runs with repair off (it profiles, solves, measures
and re-solves until the measured latency meets the budget); the final plan is then repaired
with `bias` and `lsq` (repair changes no shape, so no latency) and every variant's top-1 is
measured on all 10,000 images of ../shared/data/cifar10-test.npz. Calibration: CIFAR-10
*training* images (bench.models.cifar_train_calibration): 256 for the curves, and as optimize
does, up to 1024 for repair and recovery. Finally every budget's lsq-repaired
models are re-timed side by side with the dense model in 3 fresh processes.

    python bench/accuracy.py [--budgets 0.7,0.5,0.35] [--configs ...] [--limit N]

Prints a table and writes bench/out/accuracy.json (resumes from it when interrupted).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
OUT = HERE / "out"

# (label, objective, method, repairs measured[, distortion curves]). A repair "lsq+recover"
# is lsq followed by --recover-steps of label-free distillation (pruner.recover): what
# `optimize --calib` does by default.
CONFIGS = [
    ("fisher-distortion+dp", "distortion", "dp", ("none", "lsq"), "fisher"),
    ("distortion+dp", "distortion", "dp", ("none", "bias", "lsq")),
    ("distortion+milp", "distortion", "milp", ("none", "lsq", "lsq+recover")),
    ("importance+milp", "importance", "milp", ("none", "lsq")),
    ("importance+dp", "importance", "dp", ("none", "lsq")),
    ("uniform", "importance", "uniform", ("none", "lsq")),
    ("global threshold", "importance", "threshold", ("none", "lsq")),
    ("halp knapsack", "importance", "halp", ("none", "lsq")),
    # Not through optimize: one keep-ratio for every group, widths rounded to whole channels,
    # the largest ratio whose latency measured here (beside the dense model) meets the budget.
    ("uniform (measured)", "importance", "uniform-measured", ("none", "lsq")),
]


def uniform_measured(analysis, dense_path: Path, budget: float, run_dir: Path) -> dict:
    """Bisection on measured latency (alternating bursts with the dense model, in-process) for
    the largest uniform keep-ratio within `budget`; writes plan.json; returns a report-like dict."""
    from latprune.profiler.onnxrt import measure_interleaved
    from latprune.pruner.surgery import apply_plan
    from latprune.solver.problem_costs import make_plan

    prob = analysis.problem
    dense_bytes = dense_path.read_bytes()

    def plan_at(ratio: float):
        widths = {g.id: max(1, int(round(g.size * ratio))) for g in prob.groups if g.prunable}
        return make_plan(prob, widths, set(), "uniform-measured")

    def ratio_of(plan) -> float:
        st = measure_interleaved({"m": apply_plan(analysis, plan, check=False).SerializeToString(),
                                  "d": dense_bytes}, threads=1, bursts=5, min_runs=20, min_seconds=0.3)
        return st["m"].median_ms / st["d"].median_ms

    lo, hi, lo_ratio = 0.05, 1.0, None
    for _ in range(8):
        mid = (lo + hi) / 2
        r = ratio_of(plan_at(mid))
        if r <= budget:
            lo, lo_ratio = mid, r
        else:
            hi = mid
    plan = plan_at(lo)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "plan.json").write_text(plan.to_json())
    measured = lo_ratio if lo_ratio is not None else ratio_of(plan)
    return {"measured_ms": measured, "dense_ms": 1.0, "meets_budget": measured <= budget,
            "rounds": [], "blocks": {"removed": []}, "solver": {"seconds": 0.0}, "keep_ratio": lo}


def main() -> int:
    import models as bench_models
    from latprune.calibration import load_calibration
    from latprune.pipeline import OptimizeOptions, optimize, prepare
    from latprune.profiler.compare import compare_in_subprocesses
    from latprune.pruner.forward import input_shape
    from latprune.pruner.repair import repair
    from latprune.pruner.surgery import apply_plan
    from latprune.types import Plan

    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="0.7,0.5,0.35")
    ap.add_argument("--configs", default=",".join(c[0] for c in CONFIGS[1:]),
                    help="comma-separated labels; 'fisher-distortion+dp' is opt-in")
    ap.add_argument("--limit", type=int, default=None, help="test images (default all 10,000)")
    ap.add_argument("--lut", default=str(OUT / "lut.sqlite"))
    ap.add_argument("--step", type=int, default=8)
    from latprune.options import OptimizeSettings
    from latprune.pruner.recover import DEFAULT_STEPS
    ap.add_argument("--recover-steps", type=int, default=DEFAULT_STEPS, help="steps of the lsq+recover rows "
                    "(1024 calibration inputs, blended; optimize's default with --calib)")
    ap.add_argument("--recover-seconds", type=float, default=OptimizeSettings.model_fields["recover_seconds"].default,
                    help="time cap of the lsq+recover rows (optimize's default)")
    args = ap.parse_args()

    dense_path = bench_models.exported("cifar_resnet56")
    calib = bench_models.cifar_train_calibration(1024)
    x_test, y_test = bench_models.cifar_test_arrays(args.limit)
    _, _, analysis = prepare(dense_path, step=args.step)
    from latprune.pruner.recover import RECOVER_SAMPLES
    from latprune.pipeline import repair_inputs
    # as optimize: repair and recovery read up to 1024 inputs of the file (the curves 256)
    x_rec = load_calibration(calib, input_shape(analysis.model), RECOVER_SAMPLES)
    x_rep = repair_inputs(analysis, x_rec)
    out_json = OUT / "accuracy.json"
    state = json.loads(out_json.read_text()) if out_json.is_file() else {"rows": []}
    done = {(r["budget"], r["config"], r["repair"]) for r in state["rows"]}
    if not any(r["config"] == "dense" for r in state["rows"]):
        state["rows"].append({"budget": 1.0, "config": "dense", "repair": "none",
                              "top1": bench_models.onnx_top1(dense_path, x_test, y_test), "latency_ratio": 1.0})
    wanted = [c for c in CONFIGS if c[0] in args.configs.split(",")]
    for budget in (float(b) for b in args.budgets.split(",")):
        finals: dict[str, Path] = {}
        for label, objective, method, repairs, *kind in wanted:
            if all((budget, label, r) in done for r in repairs):
                finals[label] = OUT / "accuracy" / f"{budget:.2f}_{label.replace(' ', '_')}" / "lsq.onnx"
                continue
            run_dir = OUT / "accuracy" / f"{budget:.2f}_{label.replace(' ', '_')}"
            state["rows"] = [r for r in state["rows"]  # a re-run replaces an earlier failure
                             if not (r["budget"] == budget and r["config"] == label and "error" in r)]
            opts = OptimizeOptions(speedup=1 / budget, lut_path=Path(args.lut), method=method, step=args.step,
                                   objective=objective, calib=str(calib), calib_samples=256, repair="none",
                                   distortion=kind[0] if kind else "forward")
            t0 = time.perf_counter()
            try:
                if method == "uniform-measured":
                    report = uniform_measured(analysis, dense_path, budget, run_dir)
                else:
                    report = optimize(dense_path, run_dir, opts)
            except Exception as exc:  # a method that cannot meet the budget: record and go on
                print(f"{budget} {label}: {exc}", flush=True)
                state["rows"].append({"budget": budget, "config": label, "repair": "none", "error": str(exc)})
                continue
            wall = time.perf_counter() - t0
            plan = Plan.from_json((run_dir / "plan.json").read_text())
            pruned = apply_plan(analysis, plan)
            for mode in repairs:
                t1 = time.perf_counter()
                extra = {}
                if mode == "lsq+recover":
                    from latprune.pruner.recover import recover

                    # as optimize --recover-steps: repair leaves out the inputs recovery holds out
                    x_fit = repair_inputs(analysis, x_rec, recovering=True)
                    model, rec = recover(analysis.model, repair(analysis, plan, pruned, x_fit, mode="lsq"), x_rec,
                                         args.recover_steps, max_seconds=args.recover_seconds)
                    extra = {"recovery": rec.as_dict()}
                else:
                    model = repair(analysis, plan, pruned, x_rep, mode=mode)
                repair_s = time.perf_counter() - t1
                path = run_dir / f"{mode}.onnx"
                onnx.save(model, path)
                row = {"budget": budget, "config": label, "repair": mode,
                       "top1": bench_models.onnx_top1(path, x_test, y_test),
                       "latency_ratio": report["measured_ms"] / report["dense_ms"],
                       "meets_budget": report["meets_budget"], "rounds": len(report["rounds"]),
                       "blocks_removed": len(report["blocks"]["removed"]),
                       "budget_share": report["measured_ms"] / (report["dense_ms"] * budget),
                       "solve_s": report["solver"]["seconds"], "optimize_wall_s": wall, "repair_s": repair_s, **extra}
                state["rows"].append(row)
                print(json.dumps(row), flush=True)
            finals[label] = run_dir / "lsq.onnx"
            out_json.write_text(json.dumps(state, indent=1))
        # Independent recheck: every lsq model of this budget beside the dense one, fresh processes.
        present = {k: v for k, v in finals.items() if v.is_file()}
        if present:
            timed = compare_in_subprocesses({"dense": dense_path, **present}, threads=1, processes=3)
            for label in present:
                for row in state["rows"]:
                    if row["budget"] == budget and row["config"] == label and "top1" in row:
                        row["recheck_ratio"] = timed[label].median_ms / timed["dense"].median_ms
        out_json.write_text(json.dumps(state, indent=1))

    print("\nbudget | configuration | repair | top-1 % | latency/dense (run) | budget used | recheck | blocks removed")
    for r in state["rows"]:
        if "top1" not in r:
            print(f"{r['budget']} | {r['config']} | - | error: {r.get('error', '')[:60]}")
            continue
        print(f"{r['budget']} | {r['config']} | {r['repair']} | {r['top1']:.2f} | {r['latency_ratio']:.3f} | "
              f"{100 * r.get('budget_share', float('nan')):.0f}% | {r.get('recheck_ratio', float('nan')):.3f} | "
              f"{r.get('blocks_removed', 0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
