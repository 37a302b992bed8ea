"""Acceptance benchmark of issue 2: latency-budgeted pruning end to end on the CPU.

For each model (torchvision ResNet-18, ResNet-50, MobileNetV2, VGG-11-BN with random weights,
and the trained CIFAR ResNet-56 of ../shared/data) and each budget (0.7× and 0.5× of the
measured dense latency), run the real CLI `latprune optimize --speedup S` (its wall time is
the user's wait), then check the result independently: the pruned model is valid
(onnx.checker full check, ONNX Runtime runs it) and its latency ratio to the dense model,
measured again, is within
the budget ratio with a 3% allowance for timing noise. The recheck times both models side by
side in three fresh processes.

    python bench/e2e.py [--models resnet18,...] [--budgets 0.7,0.5] [--threads 1]

Prints a table and writes bench/out/e2e.json. Models are exported to bench/out/models.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from models import exported  # noqa: E402  (bench/models.py)
OUT = HERE / "out"
MODELS = ("resnet18", "resnet50", "mobilenet_v2", "vgg11_bn", "cifar_resnet56")
ALLOWANCE = 1.03


def interleaved_ratio(dense: Path, pruned: Path, threads: int, processes: int = 3) -> dict:
    """Latency of both models timed side by side in `processes` fresh processes (alternating
    bursts; see latprune.profiler.compare): independent of the optimize run's own check."""
    from latprune.profiler.compare import compare_in_subprocesses

    st = compare_in_subprocesses({"dense": dense, "pruned": pruned}, threads, processes=processes)
    return {"dense_ms": st["dense"].median_ms, "pruned_ms": st["pruned"].median_ms,
            "ratio": st["pruned"].median_ms / st["dense"].median_ms}


def valid(path: Path) -> bool:
    import onnxruntime as ort

    onnx.checker.check_model(str(path), full_check=True)
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return True


def run_one(name: str, ratio: float, threads: int, lut: Path, extra: list[str]) -> dict:
    return optimize_and_check(name, exported(name), OUT / "e2e" / f"{name}_{ratio:.2f}", ratio, threads,
                              lut, extra)


def optimize_and_check(name: str, model: Path, out: Path, ratio: float, threads: int, lut: Path,
                       extra: list[str]) -> dict:
    """`latprune optimize --speedup 1/ratio` on `model` into `out`, then the independent check:
    valid (full checker, ONNX Runtime loads it) and the latency ratio measured again."""
    cmd = [sys.executable, "-m", "latprune.cli", "optimize", str(model), "--speedup", f"{1 / ratio:.6f}",
           "--out", str(out), "--lut", str(lut), "--threads", str(threads), "--quiet"] + extra
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    row = {"model": name, "budget_ratio": ratio, "exit_code": proc.returncode, "wall_s": wall}
    if proc.returncode not in (0, 3):
        row["error"] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"
        return row
    rep = json.loads((out / "report.json").read_text())
    check = interleaved_ratio(model, out / "pruned.onnx", threads)
    row.update({
        "dense_ms": rep["dense_ms"], "budget_ms": rep["budget_ms"], "predicted_ms": rep["predicted_ms"],
        "measured_ms": rep["measured_ms"], "pred_error": rep["prediction_error"],
        "solve_s": rep["solver"]["seconds"], "rounds": len(rep["rounds"]),
        "blocks_removed": len(rep["blocks"]["removed"]), "cells_measured": rep["lut"]["cells_measured_now"],
        "valid": valid(out / "pruned.onnx"), "check": check,
        "meets": check["ratio"] <= ratio * ALLOWANCE,
    })
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--budgets", default="0.7,0.5")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lut", default=str(OUT / "lut.sqlite"))
    ap.add_argument("--json", default=str(OUT / "e2e.json"))
    args, extra = ap.parse_known_args()
    rows = []
    for name in args.models.split(","):
        for ratio in (float(b) for b in args.budgets.split(",")):
            row = run_one(name, ratio, args.threads, Path(args.lut), extra)
            rows.append(row)
            print(json.dumps(row), flush=True)
            Path(args.json).write_text(json.dumps(rows, indent=1))
    print()
    hdr = ("model", "budget", "dense ms", "budget ms", "pred ms", "meas ms", "pred err", "recheck ratio",
           "solve s", "wall s", "rounds", "valid", "meets")
    print(" | ".join(hdr))
    for r in rows:
        if "error" in r:
            print(f"{r['model']} | {r['budget_ratio']} | error: {r['error']}")
            continue
        print(" | ".join(str(v) for v in (
            r["model"], f"{r['budget_ratio']:.2f}×", f"{r['dense_ms']:.2f}", f"{r['budget_ms']:.2f}",
            f"{r['predicted_ms']:.2f}", f"{r['measured_ms']:.2f}", f"{100 * r['pred_error']:+.1f}%",
            f"{r['check']['ratio']:.3f}", f"{r['solve_s']:.2f}", f"{r['wall_s']:.0f}", r["rounds"],
            r["valid"], r["meets"])))
    ok = all(r.get("valid") and r.get("meets") for r in rows)
    print(f"\nall valid and within budget (+{100 * (ALLOWANCE - 1):.0f}%): {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
