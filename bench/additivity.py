"""Additivity of output distortion (seed 000's premise for the DP): over random multi-group
configurations, the sum of single-group distortions vs the measured joint distortion.

Models: the trained CIFAR ResNet-56 (calibration: 256 CIFAR-10 training images) and
torchvision ResNet-18 with random weights (no pretrained weights may be downloaded;
calibration: the 20 real ImageNet images of ../shared/data/foolbox-samples).
Channel ranking: L1 magnitude. Also reports the Gauss–Newton (Fisher) estimate of the curves
against the measured ones (Spearman over all (group, width) entries).

    python bench/additivity.py [--configs 30] [--models cifar_resnet56,resnet18]

Prints a table and writes bench/out/additivity.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
OUT = HERE / "out"


def main() -> int:
    import models as bench_models
    from latprune.calibration import load_calibration
    from latprune.pipeline import prepare
    from latprune.pruner.distortion import additivity_check, measure_distortion
    from latprune.pruner.forward import input_shape
    from latprune.solver.gradients import fisher_distortion
    from latprune.solver.objective import importance_objective

    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", type=int, default=30)
    ap.add_argument("--models", default="cifar_resnet56,resnet18")
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        path = bench_models.exported(name)
        if name.startswith("cifar"):
            calib, samples, step = bench_models.cifar_train_calibration(1024), 256, 8
        else:
            calib, samples, step = bench_models.imagenet_samples_calibration(), 20, 16
        _, _, analysis = prepare(path, step=step)
        x = load_calibration(calib, input_shape(analysis.model), samples)
        orders = importance_objective(analysis.problem).orders
        t0 = time.perf_counter()
        curves = measure_distortion(analysis, x, orders, blocks=False, cache_dir=OUT / "distortion")
        t_curves = time.perf_counter() - t0
        t0 = time.perf_counter()
        widths = {g: list(w) for g, w in curves.widths.items()}
        fisher = fisher_distortion(analysis, x, orders, widths)
        t_fisher = time.perf_counter() - t0
        meas = np.concatenate([curves.values[g] for g in sorted(curves.values)])
        est = np.concatenate([fisher[g] for g in sorted(curves.values)])
        mask = meas > 0
        rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
        fisher_rho = float(np.corrcoef(rank(meas[mask]), rank(est[mask]))[0, 1])
        check = additivity_check(analysis, x, curves, orders, configs=args.configs)
        row = {"model": name, "samples": len(x), "configs": args.configs, "pearson": check["pearson"],
               "spearman": check["spearman"], "median_joint_over_sum": check["median_ratio"],
               "curve_entries": int(mask.sum()), "forward_curves_s": t_curves,
               "fisher_curves_s": t_fisher, "fisher_vs_forward_spearman": fisher_rho,
               "pairs": check["pairs"]}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "pairs"}), flush=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "additivity.json").write_text(json.dumps(rows, indent=1))
    print("\nmodel | configs | Pearson | Spearman | median joint/sum | forward curves s | "
          "Fisher curves s | Fisher vs forward Spearman")
    for r in rows:
        print(f"{r['model']} | {r['configs']} | {r['pearson']:.3f} | {r['spearman']:.3f} | "
              f"{r['median_joint_over_sum']:.2f} | {r['forward_curves_s']:.0f} | {r['fisher_curves_s']:.0f} | "
              f"{r['fisher_vs_forward_spearman']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
