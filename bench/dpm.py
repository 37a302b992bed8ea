"""Acceptance benchmark of issue 6: fine-tuning the CIFAR ResNet-56 towards the solver's 0.5×
measured-latency plan with one-shot pruning, DPM smooth pruning and DPM with self-rectifying.

1. The plan, once: the trained ResNet-56 (../shared/data) through the torch frontend
   (`optimize_module`: the ONNX path's pipeline on the module's export), budget --speedup 2
   (0.5× of the dense latency measured alongside), distortion objective from 256 CIFAR-10
   training images, MILP, no repair (every method starts from the same full-width weights).
   The torch path's groups and plan are checked against the ONNX path's.
2. For each method and seed, in its own process (torch 1 thread; --parallel runs side by side):
   the same fine-tuning budget (--epochs over a balanced --subset of the training images,
   SGD momentum 0.9, weight decay 5e-4, cosine LR from --lr, batch 128), then the channels are
   cut by ONNX surgery and the pruned model's top-1 is measured on all 10,000 test images with
   ONNX Runtime.
3. Latency: every final model timed side by side with the dense model in fresh processes.

    python bench/dpm.py [--seeds 0,1] [--epochs 2] [--subset 10000] [--parallel 2] [--out dpm]
    python bench/dpm.py --seeds 0 --subset 0 --parallel 3 --out dpm_full   # 2 full epochs
    python bench/dpm.py --methods oneshot,dpm-sr --distill 0.5 --out dpm_distill
    python bench/dpm.py --methods oneshot --distill 0 --plan-from dpm_distill --out dpm_nodistill

Prints a table and writes bench/out/<out>.json (models and plans in bench/out/<out>/). Runs
resume: a finished (method, seed) is not run again.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
OUT = HERE / "out"
WORK = OUT / "dpm"
METHODS = ("oneshot", "dpm", "dpm-sr")


def _module_and_example():
    import torch

    from latprune.finetune import cifar_test
    from latprune.models_cifar import load_cifar_resnet

    torch.set_num_threads(1)
    module = load_cifar_resnet(56)
    x, y = cifar_test()
    return module, torch.from_numpy(x[:1].copy()), x, y


def make_plan(speedup: float, lut: Path) -> dict:
    """The 0.5× plan through the torch frontend; and the ONNX path's plan on the bench's own
    export of the same weights, for the comparison the issue asks for."""
    from models import cifar_train_calibration, export_cifar_resnet

    from latprune.pipeline import OptimizeOptions, optimize
    from latprune.pruner.torch_frontend import optimize_module

    module, example, x, y = _module_and_example()
    calib = cifar_train_calibration(1024)
    opts = OptimizeOptions(speedup=speedup, lut_path=lut, calib=str(calib), repair="none",
                           method="milp", measure_processes=2)
    t0 = time.perf_counter()
    graph, plan, report = optimize_module(module, example, WORK / "plan", opts, output_names=["logits"])
    torch_seconds = time.perf_counter() - t0
    onnx_dense = export_cifar_resnet(56, WORK / "onnx_path" / "resnet56.onnx")
    onnx_report = optimize(onnx_dense, WORK / "onnx_path", opts)
    from latprune.types import Plan
    onnx_plan = Plan.from_json((WORK / "onnx_path" / "plan.json").read_text())
    same = {
        "groups": [(g.size, g.prunable) for g in graph.analysis.problem.groups] ==
                  [(g.size, g.prunable) for g in _analysis_of(onnx_dense, plan_step(report)).problem.groups],
        "widths": plan.widths == onnx_plan.widths,
        "kept": plan.kept == onnx_plan.kept,
        "removed_blocks": sorted(plan.removed_blocks) == sorted(onnx_plan.removed_blocks),
    }
    return {"plan_file": str(WORK / "plan" / "plan.json"), "report": _short(report),
            "onnx_path_report": _short(onnx_report), "torch_vs_onnx_plan_identical": same,
            "plan_seconds": torch_seconds, "top1_no_finetune": _onnx_top1(WORK / "plan" / "pruned.onnx", x, y),
            "top1_dense": _onnx_top1(WORK / "plan" / "dense.onnx", x, y)}


def plan_step(report: dict) -> int:
    return int(report["step"])


def _analysis_of(path: Path, step: int):
    from latprune.pruner.analysis import analyse
    from latprune.pruner.model_io import load_model

    return analyse(load_model(path), step=step)


def _short(report: dict) -> dict:
    keys = ("dense_ms", "budget_ms", "predicted_ms", "measured_ms", "meets_budget", "speedup", "solver",
            "groups", "blocks", "step", "wall_seconds")
    return {k: report.get(k) for k in keys}


def _onnx_top1(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    from models import onnx_top1

    return float(onnx_top1(path, x, y, threads=1))  # percent


def run_one(method: str, seed: int, epochs: float, subset: int, lr: float,
            rate_threshold: float | None = None, length_threshold: float | None = None,
            distill: float = 0.0) -> None:
    """One fine-tuning run (its own process): writes WORK/<method>_s<seed>/{pruned.onnx,result.json}."""
    from latprune.finetune import finetune
    from latprune.pruner.model_io import save_model_atomic
    from latprune.pruner.torch_frontend import analyse_module, export_pruned
    from latprune.types import Plan

    module, example, x, y = _module_and_example()
    plan = Plan.from_json((WORK / "plan" / "plan.json").read_text())
    step = json.loads((WORK / "plan" / "report.json").read_text())["step"]
    graph = analyse_module(module, (example,), step=step, output_names=["logits"])
    out = WORK / f"{method}_s{seed}"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = finetune(module, graph, plan, method, epochs=epochs, lr=lr, batch_size=128, seed=seed, subset=subset or None,
                   rate_threshold=rate_threshold, length_threshold=length_threshold, distill=distill,
                   progress=lambda r: print(method, seed, r, flush=True), log_every=20)
    final = res.pruner.finish() if hasattr(res.pruner, "finish") else res.plan
    save_model_atomic(export_pruned(graph, final), out / "pruned.onnx")
    (out / "plan.json").write_text(final.to_json())
    result = {"method": method, "seed": seed, "top1": _onnx_top1(out / "pruned.onnx", x, y),
              "train_seconds": res.seconds, "wall_seconds": time.perf_counter() - t0,
              "steps": res.total_steps, "decay_steps": res.decay_steps,
              "swaps": len(getattr(res.pruner, "swaps", [])), "history": res.history[-3:]}
    (out / "result.json").write_text(json.dumps(result, indent=1, default=float))


def measure_all(runs: list[dict]) -> None:
    from latprune.profiler.compare import compare_in_subprocesses

    models = {"dense": WORK / "plan" / "dense.onnx"}
    models.update({f"{r['method']}_s{r['seed']}": WORK / f"{r['method']}_s{r['seed']}" / "pruned.onnx" for r in runs})
    timed = compare_in_subprocesses(models, threads=1, processes=3)
    for r in runs:
        st = timed[f"{r['method']}_s{r['seed']}"]
        r.update(measured_ms=st.median_ms, measured_p90_ms=st.p90_ms, dense_ms=timed["dense"].median_ms,
                 latency_ratio=st.median_ms / timed["dense"].median_ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--subset", type=int, default=10000, help="training images (0: all 50,000)")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--speedup", type=float, default=2.0)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--lut", type=Path, default=OUT / "lut.sqlite")
    ap.add_argument("--rate-threshold", type=float, default=None, help="dpm-sr T_rate (default: pruner.dpm's)")
    ap.add_argument("--length-threshold", type=float, default=None, help="dpm-sr T_len (default: pruner.dpm's)")
    ap.add_argument("--out", default="dpm", help="folder under bench/out; a new folder reuses the plan "
                    "of bench/out/dpm when there is one (same plan for every budget)")
    ap.add_argument("--distill", type=float, default=0.0, help="share of the loss distilled from the dense "
                    "model (finetune --distill)")
    ap.add_argument("--plan-from", default="dpm", help="folder under bench/out whose plan a new --out folder "
                    "reuses (a same-plan comparison, e.g. --plan-from dpm_distill --distill 0)")
    ap.add_argument("--run", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    global WORK
    WORK = OUT / args.out
    source = OUT / args.plan_from
    if args.out != args.plan_from and (source / "plan_info.json").is_file() and not (WORK / "plan").exists():
        import shutil
        shutil.copytree(source / "plan", WORK / "plan")
        shutil.copyfile(source / "plan_info.json", WORK / "plan_info.json")
    if args.run:
        run_one(args.run[0], int(args.run[1]), args.epochs, args.subset, args.lr,
                args.rate_threshold, args.length_threshold, args.distill)
        return
    WORK.mkdir(parents=True, exist_ok=True)
    summary_path = OUT / f"{args.out}.json"
    plan_info_path = WORK / "plan_info.json"
    if plan_info_path.is_file():
        plan_info = json.loads(plan_info_path.read_text())
    else:
        print("planning (torch frontend and ONNX path)...", flush=True)
        plan_info = make_plan(args.speedup, args.lut)
        plan_info_path.write_text(json.dumps(plan_info, indent=1, default=float))
    print(json.dumps({k: plan_info[k] for k in ("torch_vs_onnx_plan_identical", "top1_dense",
                                                 "top1_no_finetune")}), flush=True)
    jobs = [(m, int(s)) for s in args.seeds.split(",") for m in args.methods.split(",")]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    running: list[tuple[subprocess.Popen, str, int]] = []

    def reap(limit: int) -> None:
        """Wait until fewer than `limit` runs are going."""
        while len(running) >= limit:
            for item in list(running):
                if item[0].poll() is not None:
                    running.remove(item)
                    print(f"finished {item[1]} seed {item[2]}: exit {item[0].returncode}", flush=True)
            if len(running) >= limit:
                time.sleep(5)

    for method, seed in jobs:
        if (WORK / f"{method}_s{seed}" / "result.json").is_file():
            continue  # resume
        reap(args.parallel)
        cmd = [sys.executable, __file__, "--run", method, str(seed), "--epochs", str(args.epochs),
               "--subset", str(args.subset), "--lr", str(args.lr), "--out", args.out, "--distill", str(args.distill)]
        for flag, value in (("--rate-threshold", args.rate_threshold), ("--length-threshold", args.length_threshold)):
            if value is not None:
                cmd += [flag, str(value)]
        log = open(WORK / f"{method}_s{seed}.log", "w")
        running.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), method, seed))
        print(f"started {method} seed {seed}", flush=True)
    reap(1)
    runs = [json.loads((WORK / f"{m}_s{s}" / "result.json").read_text()) for m, s in jobs
            if (WORK / f"{m}_s{s}" / "result.json").is_file()]
    measure_all(runs)
    by_method = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(r)
    table = []
    for m, rs in by_method.items():
        t = np.array([r["top1"] for r in rs])
        table.append({"method": m, "seeds": [r["seed"] for r in rs], "top1_mean": float(t.mean()),
                      "top1_spread": float(t.max() - t.min()), "top1": t.tolist(),
                      "measured_ms": [r["measured_ms"] for r in rs], "latency_ratio": [r["latency_ratio"] for r in rs],
                      "swaps": [r["swaps"] for r in rs], "train_seconds": [r["train_seconds"] for r in rs]})
    summary = {"plan": plan_info, "runs": runs, "table": table,
               "budget": {"epochs": args.epochs, "subset": args.subset, "lr": args.lr, "batch_size": 128,
                          "distill": args.distill},
               "dpm_sr_thresholds": {"rate": args.rate_threshold, "length": args.length_threshold}}
    summary_path.write_text(json.dumps(summary, indent=1, default=float))
    print(f"\nResNet-56, plan at {1 / args.speedup:.2f}x latency; dense top-1 {plan_info['top1_dense']:.2f}%, "
          f"pruned without fine-tuning {plan_info['top1_no_finetune']:.2f}%")
    print(f"fine-tuning: {args.epochs:g} epochs over {args.subset or 50000} training images, lr {args.lr}, "
          f"distillation share {args.distill:g}")
    print(f"{'method':10} {'top-1 % mean':>12} {'spread':>8} {'per seed':>14} {'ms':>14} {'ratio':>12} {'swaps':>8}")
    for row in table:
        print(f"{row['method']:10} {row['top1_mean']:12.2f} {row['top1_spread']:8.2f} "
              f"{' '.join(f'{v:.2f}' for v in row['top1']):>14} "
              f"{' '.join(f'{v:.3f}' for v in row['measured_ms']):>14} "
              f"{' '.join(f'{v:.3f}' for v in row['latency_ratio']):>12} {str(row['swaps']):>8}")
    print(f"wrote {summary_path}")


if __name__ == "__main__":
    main()
