"""Acceptance benchmark of issue 2: latency-budgeted pruning end to end on the CPU.

For each model (torchvision ResNet-18, ResNet-50, MobileNetV2, VGG-11-BN with random weights,
and the trained CIFAR ResNet-56 of ../shared/data) and each budget (0.7× and 0.5× of the
measured dense latency), run the real CLI `latprune optimize --speedup S` (its wall time is
the user's wait), then check the result independently: the pruned model is valid
(onnx.checker full check, ONNX Runtime runs it) and its latency ratio to the dense model,
measured again, is within
the budget ratio with a 3% allowance for timing noise. The recheck times both models side by
side in three fresh processes.

    python bench/e2e.py [--models resnet18,...] [--budgets 0.7,0.5] [--threads 1] [--backend openvino]
                        [--tag NAME] [any latprune optimize flag, e.g. --step 1]

Prints a table and writes bench/out/e2e.json (e2e_<backend>.json). Models are exported to
bench/out/models. With --backend openvino the recheck is OpenVINO's own benchmark_app (latency
hint, the same threads and precision), dense and pruned IR alternating, 3 pairs of 5 s runs.
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


def benchmark_app_ratio(dense: Path, pruned: Path, threads: int, precision: str | None, out: Path,
                        pairs: int = 3, seconds: int = 5) -> dict:
    """Latency ratio pruned/dense measured by OpenVINO's benchmark_app on the IR files, the two
    alternating (dense, pruned, pruned, dense, ...): the median of each run's median latency."""
    import re
    import shutil
    import subprocess

    from latprune.profiler.backends import get_backend

    backend = get_backend("openvino", threads=threads, precision=precision)
    app = shutil.which("benchmark_app") or str(Path(sys.executable).parent / "benchmark_app")
    cfg = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1}
    if precision:
        cfg["INFERENCE_PRECISION_HINT"] = backend.config()["INFERENCE_PRECISION_HINT"]
    (out / "benchmark_app.json").write_text(json.dumps({"CPU": cfg}))
    irs = {"dense": backend.build(dense, out), "pruned": Path(pruned)}
    medians: dict[str, list[float]] = {"dense": [], "pruned": []}
    for i in range(pairs):
        for name in (("dense", "pruned") if i % 2 == 0 else ("pruned", "dense")):
            proc = subprocess.run([app, "-m", str(irs[name]), "-d", "CPU", "-hint", "latency", "-api", "sync",
                                   "-load_config", str(out / "benchmark_app.json"), "-t", str(seconds)],
                                  capture_output=True, text=True)
            m = re.search(r"Median:\s+([0-9.]+)\s+(ms|us)", proc.stdout)
            if proc.returncode != 0 or not m:
                raise RuntimeError(f"benchmark_app failed on {irs[name]}: {proc.stdout[-300:]} {proc.stderr[-300:]}")
            medians[name].append(float(m.group(1)) / (1000.0 if m.group(2) == "us" else 1.0))
    import numpy as np

    d, p = float(np.median(medians["dense"])), float(np.median(medians["pruned"]))
    return {"tool": "benchmark_app", "dense_ms": d, "pruned_ms": p, "ratio": p / d, "runs": medians}


def valid(path: Path) -> bool:
    import onnxruntime as ort

    onnx.checker.check_model(str(path), full_check=True)
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return True


def run_one(name: str, ratio: float, threads: int, lut: Path, extra: list[str], backend: str = "ort-cpu",
            precision: str | None = None, tag: str = "") -> dict:
    folder = ("e2e" if backend == "ort-cpu" else f"e2e_{backend}") + (f"_{tag}" if tag else "")
    return optimize_and_check(name, exported(name), OUT / folder / f"{name}_{ratio:.2f}", ratio, threads,
                              lut, extra, backend, precision)


def optimize_and_check(name: str, model: Path, out: Path, ratio: float, threads: int, lut: Path,
                       extra: list[str], backend: str = "ort-cpu", precision: str | None = None) -> dict:
    """`latprune optimize --speedup 1/ratio` on `model` into `out`, then the independent check:
    valid (full checker, ONNX Runtime loads it) and the latency ratio measured again."""
    cmd = [sys.executable, "-m", "latprune.cli", "optimize", str(model), "--speedup", f"{1 / ratio:.6f}",
           "--out", str(out), "--lut", str(lut), "--threads", str(threads), "--quiet", "--backend", backend] \
        + (["--precision", precision] if precision else []) + extra
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    row = {"model": name, "budget_ratio": ratio, "exit_code": proc.returncode, "wall_s": wall}
    if proc.returncode not in (0, 3):
        row["error"] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"
        return row
    rep = json.loads((out / "report.json").read_text())
    if backend == "openvino":
        check = benchmark_app_ratio(model, out / "pruned.xml", threads, precision, out)
    else:
        check = interleaved_ratio(model, out / "pruned.onnx", threads)
    row.update({
        "dense_ms": rep["dense_ms"], "budget_ms": rep["budget_ms"], "predicted_ms": rep["predicted_ms"],
        "measured_ms": rep["measured_ms"], "pred_error": rep["prediction_error"],
        "ratio_error": rep.get("ratio_error"), "precision": (rep.get("backend") or {}).get("precision"),
        "solve_s": rep["solver"]["seconds"], "rounds": len(rep["rounds"]),
        "blocks_removed": len(rep["blocks"]["removed"]), "cells_measured": rep["lut"]["cells_measured_now"],
        "valid": valid(out / "pruned.onnx"), "check": check, "step": rep.get("step"),
        "objective": rep["solver"].get("objective"), "budget_share": rep.get("budget_share"),
        "budget_use_note": rep.get("budget_use_note"),
        "widths": {layer["name"]: [layer["c_in"], layer["c_out"]] for layer in rep["layers"]},
        "meets": check["ratio"] <= ratio * ALLOWANCE,
    })
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--budgets", default="0.7,0.5")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lut", default=str(OUT / "lut.sqlite"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--backend", default="ort-cpu")
    ap.add_argument("--precision", default=None)
    ap.add_argument("--tag", default="", help="names this run's output folder and JSON (e.g. step1 for a run "
                    "with the extra optimize flag --step 1)")
    args, extra = ap.parse_known_args()
    suffix = ("" if args.backend == "ort-cpu" else f"_{args.backend}") + (f"_{args.tag}" if args.tag else "")
    args.json = args.json or str(OUT / f"e2e{suffix}.json")
    rows = []
    for name in args.models.split(","):
        for ratio in (float(b) for b in args.budgets.split(",")):
            row = run_one(name, ratio, args.threads, Path(args.lut), extra, args.backend, args.precision, args.tag)
            rows.append(row)
            print(json.dumps(row), flush=True)
            Path(args.json).write_text(json.dumps(rows, indent=1))
    print()
    hdr = ("model", "budget", "dense ms", "budget ms", "pred ms", "meas ms", "pred err", "recheck ratio",
           "solve s", "wall s", "rounds", "budget used", "valid", "meets")
    print(" | ".join(hdr))
    for r in rows:
        if "error" in r:
            print(f"{r['model']} | {r['budget_ratio']} | error: {r['error']}")
            continue
        print(" | ".join(str(v) for v in (
            r["model"], f"{r['budget_ratio']:.2f}×", f"{r['dense_ms']:.2f}", f"{r['budget_ms']:.2f}",
            f"{r['predicted_ms']:.2f}", f"{r['measured_ms']:.2f}", f"{100 * r['pred_error']:+.1f}%",
            f"{r['check']['ratio']:.3f}", f"{r['solve_s']:.2f}", f"{r['wall_s']:.0f}", r["rounds"],
            f"{100 * r['budget_share']:.0f}%", r["valid"], r["meets"])))
    for r in rows:
        if r.get("budget_use_note"):
            print(f"{r['model']} {r['budget_ratio']:.2f}×: {r['budget_use_note']}")
    ok = all(r.get("valid") and r.get("meets") for r in rows)
    print(f"\nall valid and within budget (+{100 * (ALLOWANCE - 1):.0f}%): {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
