"""Post-training (no fine-tuning) top-1 of the CIFAR ResNet-56 pruned by latprune at 0.7× and
0.5× of its measured dense latency, next to uniform pruning (one keep-ratio for every prunable
channel group, widths rounded to whole channels) at the same measured latency.

Uniform's ratio is found by bisection on latency measured in this process, alternating with
the latprune model so both see the same machine state. Accuracy: all 10,000 images of
../shared/data/cifar10-test.npz (JPEG-decoded: the dense model scores 83.2% there).

    python bench/accuracy_resnet56.py [--budgets 0.7,0.5] [--limit N]

Prints a table and writes bench/out/accuracy_resnet56.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
OUT = HERE / "out"


def main() -> int:
    import models as bench_models
    from latprune.pipeline import prepare
    from latprune.profiler.onnxrt import measure_interleaved
    from latprune.pruner.surgery import apply_plan
    from latprune.solver.problem_costs import make_plan

    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="0.7,0.5")
    ap.add_argument("--limit", type=int, default=None, help="test images (default all 10,000)")
    ap.add_argument("--lut", default=str(OUT / "lut.sqlite"))
    args = ap.parse_args()

    dense_path = bench_models.exported("cifar_resnet56")
    x, y = bench_models.cifar_test_arrays(args.limit)
    _, _, analysis = prepare(dense_path)
    prob = analysis.problem

    def uniform_model(ratio: float) -> onnx.ModelProto:
        widths = {g.id: max(1, int(round(g.size * ratio))) for g in prob.groups if g.prunable}
        return apply_plan(analysis, make_plan(prob, widths, set(), "uniform"))

    def latency(model_bytes: bytes, ref: bytes) -> float:
        """Latency of `model_bytes` relative to `ref`, timed in alternating bursts."""
        st = measure_interleaved({"model": model_bytes, "ref": ref}, threads=1, bursts=5,
                                 min_runs=20, min_seconds=0.3)
        return st["model"].median_ms / st["ref"].median_ms

    dense_bytes = dense_path.read_bytes()
    rows = [{"model": "dense", "top1": bench_models.onnx_top1(dense_path, x, y), "latency_ratio": 1.0}]
    for budget in (float(b) for b in args.budgets.split(",")):
        out = OUT / "accuracy" / f"resnet56_{budget:.2f}"
        cmd = [sys.executable, "-m", "latprune.cli", "optimize", str(dense_path), "--speedup",
               f"{1 / budget:.6f}", "--out", str(out), "--lut", args.lut, "--quiet"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode not in (0, 3):
            print(proc.stderr)
            return 1
        report = json.loads((out / "report.json").read_text())
        pruned_bytes = (out / "pruned.onnx").read_bytes()
        target = latency(pruned_bytes, dense_bytes)
        lo, hi = 0.05, 1.0  # bisection: largest ratio whose latency ≤ the latprune model's
        for _ in range(7):
            mid = (lo + hi) / 2
            if latency(uniform_model(mid).SerializeToString(), dense_bytes) <= target:
                lo = mid
            else:
                hi = mid
        uni = uniform_model(lo)
        uni_path = out / "uniform.onnx"
        onnx.save(uni, uni_path)
        rows.append({"model": f"latprune milp {budget}×", "top1": bench_models.onnx_top1(out / "pruned.onnx", x, y),
                     "latency_ratio": target, "blocks_removed": len(report["blocks"]["removed"]),
                     "widths": json.loads((out / "plan.json").read_text())["widths"]})
        rows.append({"model": f"uniform ratio {lo:.3f}", "top1": bench_models.onnx_top1(uni_path, x, y),
                     "latency_ratio": latency(uni.SerializeToString(), dense_bytes)})
        print(json.dumps(rows[-2:]), flush=True)
    (OUT / "accuracy_resnet56.json").write_text(json.dumps(rows, indent=1))
    print("\nmodel | top-1 % | latency / dense (measured here)")
    for r in rows:
        print(f"{r['model']} | {r['top1']:.2f} | {r['latency_ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
