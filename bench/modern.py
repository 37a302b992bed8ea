"""Acceptance benchmark of issue 12: modern CNNs and detectors (bench/zoo.py exports).

For each model:

1. **coverage**: layers found, prunable groups of all groups, removable blocks, analysis notes,
   and the share of the dense model's kernel time (ONNX Runtime's profiler, 1 thread) spent in
   layers that have a prunable width ("prunable layers"), and in any kernel whose output
   channels are prunable (layers plus the element-wise work on pruned tensors: LayerNorm,
   GELU, residual adds), out of all kernels;
2. **identity**: a keep-everything plan gives the original outputs (max |diff| relative to the
   largest output, on real images), and random plans (widths and removed blocks) pass the full
   checker, keep inputs and outputs, and run;
3. **budgets**: the real CLI `latprune optimize --speedup S` at 0.7x and 0.5x of the measured
   dense latency (one latency table per run of the bench, shared by the models), then the
   pruned model checked independently: valid, same inputs/outputs, and its latency ratio to
   the dense model measured again side by side in three fresh processes;
4. **detector accuracy proxy** (``--proxy``): at 0.7x, the output distortion on held-out real
   images of the distortion+repair plan (calibration images, Fisher distortion curves, lsq
   repair) against a uniform plan at the same budget (and uniform + repair).

    python bench/modern.py [--models yolov8s,...] [--budgets 0.7,0.5] [--skip-budgets] [--proxy]

Prints a table and writes bench/out/modern.json (merged with earlier runs). Needs the bench
extras (torch 2.14.1, torchvision, timm, ultralytics) for the exports.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import zoo  # noqa: E402  (bench/zoo.py)
from e2e import optimize_and_check  # noqa: E402

OUT = HERE / "out"
MODELS = ("yolov8s", "ssdlite320_net", "ssdlite320", "convnext_tiny", "regnety_016", "resnext50_32x4d")
TRANSFORMERS = ("deit_small", "vit_base", "mobilevit_s", "bert_base")


def exported(name: str) -> Path:
    path = OUT / "zoo" / f"{name}.onnx"
    if not path.exists():
        zoo.export(name, path)
    return path


def _run(model: onnx.ModelProto, x) -> list[np.ndarray]:
    """Outputs for every item of x (an image batch, or {input name: batch}), one item a run."""
    import onnxruntime as ort

    feeds = x if isinstance(x, dict) else {"input": x}
    n = len(next(iter(feeds.values())))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [np.concatenate([sess.run(None, {k: v[i:i + 1] for k, v in feeds.items()})[j] for i in range(n)])
            for j in range(len(sess.get_outputs()))]


def _io(model: onnx.ModelProto):
    def dims(v):
        return [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
    return [(i.name, dims(i)) for i in model.graph.input], [(o.name, dims(o)) for o in model.graph.output]


def coverage(name: str, runs: int = 5) -> dict:
    """Analysis counts and the dense kernel-time shares (module doc, item 1)."""
    from latprune.ingraph_profile import layer_names
    from latprune.profiler.backends.onnxrt import OrtProfiled as _Profiled
    from latprune.pruner.analysis import analyse

    from latprune.pipeline import apply_stream_policy

    model = onnx.load(str(exported(name)))
    t0 = time.perf_counter()
    an = analyse(model, step=16)
    apply_stream_policy(an, "auto")  # as optimize does: transformers keep their residual stream
    analyse_s = time.perf_counter() - t0
    prob = an.problem
    heads = {t[0] for layer in prob.layers if layer.spec.op == "Attention" for t in layer.c_in.terms}
    names = layer_names(an.model, prob)
    prunable_layers = {i for i, layer in enumerate(prob.layers)
                       if any(prob.groups[g].prunable for g, _ in layer.c_in.terms + layer.c_out.terms)}
    # kernel name (node or output tensor) -> does the node write prunable channels?
    writes_prunable = {}
    for node in an.model.graph.node:
        hit = any(an.group_positions(o) is not None and
                  any(prob.groups[int(g)].prunable for g in np.unique(an.group_positions(o)[0]))
                  for o in node.output if o)
        for key in [node.name] + list(node.output):
            writes_prunable[key] = hit
    with tempfile.TemporaryDirectory() as tmp:
        prof = _Profiled(an.model.SerializeToString(), 1, os.path.join(tmp, "p"))
        for _ in range(2):
            prof.run(timed=False)
        for _ in range(runs):
            prof.run()
        timing = prof.finish(names, {})
    total = sum(timing.layer_ms.values()) + timing.unmapped_ms
    in_prunable_layers = sum(v for i, v in timing.layer_ms.items() if i in prunable_layers)
    # element-wise work on pruned tensors (LayerNorm, GELU, layer scale, residual adds, SE
    # multiplies): unclaimed kernels named after a node (or its output) that writes prunable channels
    elementwise = sum(ms for kernel, ms in timing.unmapped_kernel_ms.items() if writes_prunable.get(kernel))
    top = sorted(timing.unmapped_kernel_ms.items(), key=lambda kv: -kv[1])[:8]
    return {"model": name, "layers": len(prob.layers), "groups": len(prob.groups),
            "prunable_groups": sum(g.prunable for g in prob.groups), "blocks": len(prob.blocks),
            "attention_layers": sum(layer.spec.op == "Attention" for layer in prob.layers),
            "head_groups": len(heads), "heads": sum(prob.groups[g].size for g in heads),
            "notes": an.notes, "analyse_s": analyse_s, "dense_kernel_ms": total,
            "dense_end_to_end_ms": timing.end_to_end_ms,
            "share_prunable_layers": in_prunable_layers / total if total else 0.0,
            "share_layers": sum(timing.layer_ms.values()) / total if total else 0.0,
            "share_width_dependent": (in_prunable_layers + elementwise) / total if total else 0.0,
            "largest_other_kernels": [(k, round(v, 3)) for k, v in top]}


def identity(name: str, plans: int = 3) -> dict:
    """Keep-everything plan vs the original on real images; random plans valid (item 2)."""
    from latprune.pruner.analysis import analyse
    from latprune.pruner.surgery import apply_plan
    from latprune.types import Plan

    model = onnx.load(str(exported(name)))
    an = analyse(model, step=16)
    from latprune.pipeline import apply_stream_policy
    apply_stream_policy(an, "auto")
    x = zoo.model_feeds(name, 2)
    want = _run(model, x)
    same = apply_plan(an, Plan(kept={}))
    worst = 0.0
    for g, w in zip(_run(same, x), want):
        if w.dtype.kind == "f" and w.size:
            worst = max(worst, float(np.abs(g - w).max()) / max(1.0, float(np.abs(w).max())))
        elif not np.array_equal(g, w):
            worst = float("inf")
    rng = np.random.default_rng(0)
    ok = 0
    for _ in range(plans):
        prob = an.problem
        removed = [b.id for b in prob.blocks if rng.random() < 0.3]
        kept = {g.id: sorted(rng.choice(g.size, size=int(rng.integers(max(1, g.size // 4), g.size + 1)),
                                        replace=False).tolist())
                for g in prob.groups if g.prunable}
        pruned = apply_plan(an, Plan(kept=kept, removed_blocks=removed))  # full checker
        outs = _run(pruned, {k: v[:1] for k, v in x.items()})
        ok += _io(pruned) == _io(model) and [o.shape for o in outs] == [w[:1].shape for w in want]
    return {"zero_plan_max_rel_diff": worst, "random_plans_valid": f"{ok}/{plans}"}


def budget(name: str, ratio: float, lut: Path, threads: int, extra: list[str]) -> dict:
    """`latprune optimize --speedup 1/ratio` and the independent check (item 3)."""
    model = exported(name)
    row = optimize_and_check(name, model, OUT / "modern" / f"{name}_{ratio:.2f}", ratio, threads, lut, extra)
    if "check" in row:
        pruned = onnx.load(str(OUT / "modern" / f"{name}_{ratio:.2f}" / "pruned.onnx"))
        row["same_io"] = _io(pruned) == _io(onnx.load(str(model)))
    return row


def accuracy_proxy(name: str, lut: Path, threads: int, ratio: float = 0.7, calib: int = 8,
                   held_out: int = 10) -> dict:
    """Output distortion on held-out real images: distortion+repair vs uniform (item 4)."""
    model = exported(name)
    work = OUT / "modern" / f"{name}_proxy"
    work.mkdir(parents=True, exist_ok=True)
    np.savez(work / "calib.npz", x=zoo.model_inputs(name, calib, offset=0))
    x_eval = zoo.model_inputs(name, held_out, offset=calib)
    want = _run(onnx.load(str(model)), x_eval)
    scale = float(np.mean([np.var(w) for w in want if w.dtype.kind == "f"]))
    rows = {}
    variants = {
        "distortion+repair": ["--calib", str(work / "calib.npz"), "--distortion", "fisher"],
        "distortion": ["--calib", str(work / "calib.npz"), "--distortion", "fisher", "--repair", "none"],
        "uniform": ["--method", "uniform", "--objective", "importance"],
        "uniform+repair": ["--method", "uniform", "--objective", "importance", "--calib",
                           str(work / "calib.npz"), "--repair", "lsq"],
    }
    for label, args in variants.items():
        out = work / label.replace("+", "_")
        cmd = [sys.executable, "-m", "latprune.cli", "optimize", str(model), "--speedup", f"{1 / ratio:.6f}",
               "--out", str(out), "--lut", str(lut), "--threads", str(threads), "--quiet"] + args
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode not in (0, 3):
            rows[label] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"}
            continue
        rep = json.loads((out / "report.json").read_text())
        got = _run(onnx.load(str(out / "pruned.onnx")), x_eval)
        mse = float(np.mean([np.mean((g - w) ** 2) for g, w in zip(got, want) if w.dtype.kind == "f"]))
        rows[label] = {"relative_mse": mse / scale, "measured_ratio": rep["measured_ms"] / rep["dense_ms"],
                       "wall_s": time.perf_counter() - t0}
        # per part, each relative to its own variance: YOLO's (1, 4 + classes, N) boxes and class
        # scores; SSD's box regressions and class logits
        parts = ({"boxes": want[0][:, :4], "classes": want[0][:, 4:]} if name == "yolov8s"
                 else {f"output {k}": w for k, w in enumerate(want)})
        mine = ({"boxes": got[0][:, :4], "classes": got[0][:, 4:]} if name == "yolov8s"
                else {f"output {k}": g for k, g in enumerate(got)})
        rows[label]["relative_mse_by_part"] = {k: float(np.mean((mine[k] - w) ** 2) / max(np.var(w), 1e-30))
                                               for k, w in parts.items()}
    return {"model": name, "budget_ratio": ratio, "calibration_images": calib, "held_out_images": held_out,
            "variants": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--budgets", default="0.7,0.5")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lut", type=Path, default=OUT / "modern" / "lut.sqlite")
    ap.add_argument("--skip-coverage", action="store_true")
    ap.add_argument("--skip-budgets", action="store_true")
    ap.add_argument("--proxy", action="store_true", help="the detector accuracy proxy (yolov8s)")
    ap.add_argument("--extra", default="", help="extra optimize arguments")
    args = ap.parse_args()
    (OUT / "modern").mkdir(parents=True, exist_ok=True)
    path = OUT / "modern.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    models = [m for m in args.models.split(",") if m]

    def save():
        path.write_text(json.dumps(results, indent=1, default=str))

    for name in models:
        if not args.skip_coverage:
            row = coverage(name)
            row.update(identity(name))
            results.setdefault("coverage", {})[name] = row
            save()
            print(f"{name:16s} layers {row['layers']:4d}  groups {row['prunable_groups']:3d}/{row['groups']:3d}  "
                  f"blocks {row['blocks']:3d}  heads {row['heads']:3d} in {row['head_groups']:2d} groups  "
                  f"notes {len(row['notes']):2d}  prunable layers "
                  f"{row['share_prunable_layers']:.1%}  width-dependent {row['share_width_dependent']:.1%}  "
                  f"dense {row['dense_end_to_end_ms']:.1f} ms  zero-plan diff {row['zero_plan_max_rel_diff']:.1e}  "
                  f"random plans {row['random_plans_valid']}", flush=True)
        if not args.skip_budgets:
            for ratio in [float(r) for r in args.budgets.split(",") if r]:
                row = budget(name, ratio, args.lut, args.threads, args.extra.split())
                results.setdefault("budgets", {})[f"{name}@{ratio}"] = row
                save()
                if "check" in row:
                    print(f"{name:16s} {ratio:.2f}x  dense {row['dense_ms']:.2f}  budget {row['budget_ms']:.2f}  "
                          f"pred {row['predicted_ms']:.2f}  meas {row['measured_ms']:.2f} ({row['pred_error']:+.1%})  "
                          f"recheck {row['check']['ratio']:.3f}x  meets {row['meets']}  valid/same io {row['same_io']}  "
                          f"{row['wall_s']:.0f} s", flush=True)
                else:
                    print(f"{name:16s} {ratio:.2f}x  failed: {row.get('error')}", flush=True)
        if args.proxy and name in ("yolov8s", "ssdlite320_net"):
            row = accuracy_proxy(name, args.lut, args.threads)
            results.setdefault("proxy", {})[name] = row
            save()
            for label, v in row["variants"].items():
                print(f"{name:16s} 0.70x  {label:18s} {v}", flush=True)
    budgets = [r for r in results.get("budgets", {}).values() if "pred_error" in r]
    if budgets:
        errs = [abs(r["pred_error"]) for r in budgets]
        print(f"prediction error of the final plans: median {np.median(errs):.1%} over {len(errs)}; "
              f"within budget {sum(r['meets'] for r in budgets)}/{len(budgets)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
