"""GPU acceptance of issue 13, in one short run (scripts/gpu_check.sh calls it).

On a machine with an NVIDIA GPU: which GPU backends work, then ResNet-50 (torchvision, random
weights; or --model FILE) pruned to 0.5x of its TensorRT FP16 latency with `latprune optimize
--backend trt --precision fp16`, the engine artifact checked (it exists, it loads, and its
latency ratio to the dense engine, measured again side by side in fresh processes, is within the
budget), and a small table-fidelity check: predicted vs measured latency ratio of 5 random
uniform-ish configurations on the same table.

    python bench/gpu_check.py [--model resnet50.onnx] [--out bench/out/gpu]

Prints a table and writes OUT/gpu_check.json. Exits 0 when every check passed.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _export_resnet50(path: Path) -> Path:
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"])
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "gpu")
    ap.add_argument("--speedup", type=float, default=2.0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from latprune.profiler.backends import available, get_backend

    rows: dict = {"backends": available()}
    print("backends:", json.dumps(rows["backends"], indent=1))
    if rows["backends"].get("trt") != "ok":
        print("TensorRT is not usable here: nothing else to check")
        (args.out / "gpu_check.json").write_text(json.dumps(rows, indent=1))
        return 1
    model = args.model or _export_resnet50(args.out / "resnet50.onnx")
    lut = args.out / "lut.sqlite"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "latprune.cli", "optimize", str(model), "--speedup",
                           str(args.speedup), "--backend", "trt", "--precision", "fp16", "--lut", str(lut),
                           "--out", str(args.out / "opt"), "-q"], capture_output=True, text=True)
    rows["optimize"] = {"exit_code": proc.returncode, "wall_s": time.perf_counter() - t0,
                        "stderr": proc.stderr.strip().splitlines()[-3:]}
    ok = proc.returncode == 0
    if proc.returncode in (0, 3):
        rep = json.loads((args.out / "opt" / "report.json").read_text())
        engine = args.out / "opt" / "pruned.engine"
        backend = get_backend("trt", precision="fp16")
        dense_engine = backend.build(model, args.out)
        st = backend.measure_side_by_side({"dense": dense_engine, "pruned": engine}, processes=3)
        ratio = st["pruned"].median_ms / st["dense"].median_ms
        rows["optimize"].update({k: rep.get(k) for k in ("dense_ms", "budget_ms", "predicted_ms", "measured_ms",
                                                         "prediction_error", "ratio_error")})
        rows["engine"] = {"exists": engine.is_file(), "bytes": engine.stat().st_size if engine.is_file() else 0,
                          "recheck_ratio": ratio, "within_budget": ratio <= 1 / args.speedup * 1.03}
        ok = ok and rows["engine"]["within_budget"]
        # table fidelity on the same table: random widths, predicted vs measured ratio to dense
        from latprune.pipeline import open_table, prepare
        from latprune.lut.predict import overhead_elements, predict_raw
        from latprune.pruner.surgery import apply_plan
        from latprune.pruner.model_io import save_model_atomic
        from latprune.solver.problem_costs import make_plan

        _, _, analysis = prepare(model, rep["step"], backend=backend)
        prob = analysis.problem
        table = open_table(lut, backend, "in-graph")
        cal = rep["calibration"]
        predict = lambda w: cal["scale"] * predict_raw(prob, table, w) + cal["ms_per_melement"] * \
            overhead_elements(prob, w) + cal["offset_ms"]  # noqa: E731
        rng = np.random.default_rng(0)
        errors = []
        for k in range(5):
            widths = {g.id: int(rng.choice(g.candidate_widths)) for g in prob.groups if g.prunable}
            path = args.out / f"cfg{k}.onnx"
            save_model_atomic(apply_plan(analysis, make_plan(prob, widths, set(), "fidelity"), check=False), path)
            eng = backend.build(path, args.out)
            st = backend.measure_side_by_side({"dense": dense_engine, "cfg": eng}, processes=1)
            measured = st["cfg"].median_ms / st["dense"].median_ms
            predicted = predict(widths) / predict({})
            errors.append(predicted / measured - 1)
        table.close()
        rows["fidelity"] = {"ratio_errors": errors, "median_abs": float(np.median(np.abs(errors)))}
    print(json.dumps(rows, indent=1, default=str))
    (args.out / "gpu_check.json").write_text(json.dumps(rows, indent=1, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
