"""How well the latency table predicts measured latency (issue 3's acceptance figures).

Part 1, whole models: N random channel configurations of each model (every prunable group gets
a random width between 25% and 100% of its channels; "step16": rounded to a multiple of 16,
the solver's default on AVX-512, so mostly between the table's grid points; "step8" or "any":
multiples of 8 or any integer, off the hardware block size too). Each configuration is built
as ONNX and measured end to end (ONNX Runtime, 1 thread). Predictions, from tables profiled
first with `latprune profile`:

  in-graph calibrated  the table of kernels timed inside pruned models (the default), with the
                       pipeline's calibration: scale·(Σ layers + overhead), the overhead from
                       the profile runs, the scale from 3 uniform models (keep-ratio 1.0, 0.75,
                       0.5) measured alongside the configurations
  in-graph sum         the same table, the plain sum of its layers
  isolated calibrated  the table of layers timed alone (--timing isolated); scale·Σ + offset
                       fitted to the same 3 uniform models
  isolated sum         the naive sum of isolated layers

This machine is shared and runs in phases (the same session at 26 ms, then 33 ms, switching
every few hundred ms, and drifting over tens of seconds), so every model is measured in
`--rounds` rounds of one run, interleaved over all of them in a new random order each round;
a configuration's latency is the median of its runs, and the spread of the runs is reported
too.

Part 2, the table for ResNet-50: wall time to profile every layer into a fresh in-graph table
(--passes measurements per cell; --refine adds widths where interpolation bends), cells measured vs the full grid of candidate
widths (multiples of the preferred step: 16 with AVX-512), and interpolation error on held-out
cells: kernels of random pruned models whose (c_in, c_out) the table did not measure, each the
median of --truth-runs measurements; it also reports how far one measurement lies from that median.

    python bench/lut_fidelity.py [--models resnet18,resnet50,mobilenet_v2] [--configs 30]
                                 [--heldout 200] [--widths step16] [--rounds 60]
                                 [--passes 1] [--truth-runs 3] [--refine] [--skip-build | --skip-models]
                                 [--backend ort-cpu|openvino] [--precision P]

With --backend, everything (tables, profiles, measurements) runs on that backend.

Part 3 (--any-width MODELS, issue 15; the other parts are skipped): models pruned by another
tool at whatever widths it leaves. Torch-Pruning prunes each torchvision model (resnet18,
mobilenet_v2, regnet_x_400mf, efficientnet_b0; random weights) with a random ratio per conv
(bench/tp_configs.py; --round-to K for widths on multiples of K). A fresh table per model is
profiled on the dense model (`latprune profile`: its grid plus the fallback cells the device's
blocking rules call for); each configuration is predicted from it (where it lacks a layer
kind, RegNetX's grouped convs with new channels per group, the configuration is profiled
into it first) with the dense model's calibration, and its predicted ratio to dense is
compared with the measured one (the product's own check, profiler.compare: all models
timed in alternating warm bursts in each of --processes fresh processes; a configuration's
measured ratio is the median over the processes of its ratio to that process's dense median:
MobileNetV2's ratio moved by up to 10% from one process to the next). The same cells read without the blocking rules give the lookup before issue 15 as a
baseline in the same run. Writes <out>_anywidth.json.

    python bench/lut_fidelity.py --any-width resnet18,mobilenet_v2,regnet_x_400mf,efficientnet_b0 \
        [--any-width-configs 10] [--processes 7] [--round-to 8] [--input-hw 224]

Prints tables and writes bench/out/lut_fidelity.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from models import exported  # noqa: E402  (bench/models.py)
OUT = HERE / "out"
TIMINGS = ("in-graph", "isolated")
# What "measured" is: the median of a model's runs. (A "fastest burst" truth was dropped when
# tables moved to the median phase and the rounds to single runs: the minimum of 60 single runs
# is an outlier statistic.)
TRUTHS = ("ms",)
UNIFORM = (1.0, 0.75, 0.5)
BACKEND = None  # the backend of this run (main sets it from --backend); None: ONNX Runtime, 1 thread


def backend():
    global BACKEND
    if BACKEND is None:
        from latprune.profiler.backends import get_backend
        BACKEND = get_backend("ort-cpu", threads=1)
    return BACKEND


def random_widths(prob, rng, mode: str) -> dict[int, int]:
    widths = {}
    for g in prob.groups:
        if not g.prunable:
            continue
        w = int(rng.integers(max(1, g.size // 4), g.size + 1))
        if mode.startswith("step"):  # what the solver chooses: multiples of the step
            k = int(mode[4:])
            w = min(g.size, max(k, k * round(w / k)))
        widths[g.id] = w
    return widths


def measure_in_rounds(models: list, rounds: int, runs: int = 1) -> list[dict]:
    """Median and spread (p10-p90 of burst medians, relative) of each model's latency (ms),
    timed in `rounds` bursts of `runs`, interleaved over all models in a new random order each
    round."""
    from latprune.profiler.backends.base import timed_runs
    from latprune.profiler.onnxrt import _timed_runs, make_session, random_feed

    if backend().name == "ort-cpu":  # ONNX Runtime keeps its plain sessions (figures comparable)
        sessions = [make_session(m, 1) for m in models]
        feeds = [random_feed(s) for s in sessions]

        def burst(i):
            return _timed_runs(sessions[i], feeds[i], 1, runs, 0.0)
    else:  # the backend's runners
        sessions = [backend().load(m) for m in models]
        feeds = [r.inputs(1) for r in sessions]

        def burst(i):
            return timed_runs(sessions[i], 1, runs, 0.0, inputs=feeds[i])
    samples: list[list[float]] = [[] for _ in models]
    bursts: list[list[float]] = [[] for _ in models]
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        for i in rng.permutation(len(sessions)):  # no model always first or last in a round
            t = burst(i)
            samples[i] += t
            bursts[i].append(float(np.median(t)))
    out = []
    for smp, b in zip(samples, bursts):
        med = float(np.median(smp))
        out.append({"ms": med,
                    "spread": float((np.percentile(b, 90) - np.percentile(b, 10)) / med)})
    return out


def whole_model_errors(name: str, n_configs: int, lut: Path, mode: str, rounds: int, seed: int = 0,
                       profile_passes: int = 1, refine: bool = False) -> dict:
    from latprune.lut.predict import overhead_elements, predict_raw
    from latprune.lut.store import fit_calibration
    from latprune.pipeline import model_family, open_table, prepare, profile_model
    from latprune.ingraph_profile import first_channels_plan
    from latprune.pruner.surgery import apply_plan
    from latprune.solver.uniform import uniform_widths

    path = exported(name)
    build_s = {}
    for timing in TIMINGS:  # cells missing from the table (none when it was built before)
        t0 = time.perf_counter()
        out = profile_model(path, lut, threads=1, timing=timing, passes=profile_passes if timing == "in-graph" else 1,
                            refine=refine, backend=backend().name, precision=backend().precision)
        build_s[timing] = {"seconds": time.perf_counter() - t0, "cells_measured": out["cells_measured"]}
        print(f"  {name}: {timing} table: {out['cells_measured']} cells measured in {build_s[timing]['seconds']:.0f} s",
              flush=True)
    model, data, analysis = prepare(path, backend=backend())
    prob = analysis.problem
    rng = np.random.default_rng(seed)
    uniform = [{} if r == 1.0 else uniform_widths(prob, r) for r in UNIFORM]
    configs = [random_widths(prob, rng, mode) for _ in range(n_configs)]
    everything = uniform + configs
    models = [data] + [apply_plan(analysis, first_channels_plan(prob, w), check=False).SerializeToString()
                       for w in everything[1:]]
    t0 = time.perf_counter()
    timed = measure_in_rounds(models, rounds)
    print(f"  {name} [{mode}]: {len(models)} models measured in {rounds} interleaved rounds "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    mel = [overhead_elements(prob, w) for w in everything]
    nu = len(uniform)
    rows = [{"widths": {str(k): v for k, v in w.items()}, "measured_ms": t["ms"],
             "spread": t["spread"], "off_grid": 0} for w, t in zip(configs, timed[nu:])]
    result = {"model": name, "widths": mode, "configs": rows, "build": build_s, "predictors": {},
              "profile_passes": profile_passes, "refine": refine,
              "uniform_measured_ms": [t["ms"] for t in timed[:nu]],
              "measurement_spread_median": float(np.median([t["spread"] for t in timed]))}
    family = model_family(model, data)
    for timing in TIMINGS:
        table = open_table(lut, backend(), timing)
        raw = np.array([predict_raw(prob, table, w) for w in everything])
        for row, r in zip(rows, raw[nu:]):
            row[f"{timing}_sum_ms"] = float(r)
        for truth in TRUTHS:
            meas = np.array([t[truth] for t in timed])
            cal = fit_calibration(list(raw[:nu]), list(meas[:nu]), mel[:nu], overhead=table.overhead(family))
            calibrated = np.array([cal.predict(r, m) for r, m in zip(raw, mel)])
            for row, c in zip(rows, calibrated[nu:]):
                row[f"{timing}_calibrated_{truth}"] = float(c)
            result["predictors"][f"{timing} calibrated|{truth}"] = errors(calibrated[nu:], meas[nu:])
            result["predictors"][f"{timing} sum|{truth}"] = errors(raw[nu:], meas[nu:])
            result[f"{timing}_calibration|{truth}"] = {"scale": cal.scale, "offset_ms": cal.offset_ms,
                                                        "ms_per_melement": cal.ms_per_melement}
        table.close()
    grid = _grid_widths(prob)
    for row, w in zip(rows, configs):
        row["off_grid"] = sum(w[g] not in grid[g] for g in w)
    return result


def _grid_widths(prob, points: int = 5) -> dict[int, set[int]]:
    from latprune.lut.predict import group_grid

    return {g.id: set(group_grid(g, points)) for g in prob.groups if g.prunable}


def errors(pred: np.ndarray, meas: np.ndarray) -> dict:
    err = np.abs(pred - meas) / meas
    return {"median_abs_err": float(np.median(err)), "p95_abs_err": float(np.percentile(err, 95)),
            "within_10pct": float(np.mean(err <= 0.10)), "median_signed_err": float(np.median((pred - meas) / meas))}


def table_build(heldout: int, passes: int, truth_runs: int, seed: int = 0, refine: bool = False) -> dict:
    """Profile ResNet-50 into a fresh in-graph table (`passes` measurements per cell);
    interpolation error on held-out cells, each measured `truth_runs` times (median)."""
    from latprune.lut.predict import layer_ms, space_values
    from latprune.pipeline import ensure_profiled, open_table, prepare, Progress
    from latprune.ingraph_profile import config_cells, profile_configs, reference_key

    _, _, analysis = prepare(exported("resnet50"), backend=backend())
    prob = analysis.problem
    step = backend().channel_step()
    suffix = "" if backend().name == "ort-cpu" else f"_{backend().name}"
    path = OUT / f"lut_resnet50_build_{passes}pass{'_refined' if refine else ''}{suffix}.sqlite"  # kept (lut heatmap)
    path.unlink(missing_ok=True)
    table = open_table(path, backend(), "in-graph")
    try:
        t0 = time.perf_counter()
        measured = ensure_profiled(prob, table, backend(), 5, Progress(), analysis, passes=passes, refine=refine)
        phase = table.reference_phase(reference_key(analysis.model))  # the table's scale
        wall = time.perf_counter() - t0
        full = set()
        for layer in prob.layers:
            def step_values(sp):
                return sorted({v for v in range(1, max(space_values(prob, sp)) + 1) if v % step == 0}
                              | set(space_values(prob, sp)))
            ins, outs = step_values(layer.c_in), step_values(layer.c_out)
            sig = layer.spec.signature()
            full |= {(sig, c, c) for c in ins} if layer.spec.depthwise else {(sig, i, o) for i in ins for o in outs}
        rng = np.random.default_rng(seed)
        truth: dict[tuple, list[float]] = {}  # held-out cell -> its measurements
        lookup: dict[tuple, float] = {}
        t1 = time.perf_counter()
        while len(truth) < heldout:
            configs = [random_widths(prob, rng, f"step{step}") for _ in range(8)]
            # each measurement in its own profiling sessions and rounds (a repeat in the same
            # rounds would share their moments)
            for rep in range(truth_runs):
                for timing in profile_configs(analysis, configs, backend(), seed=rep, phase_ms=phase):
                    full_w = {g.id: timing.widths.get(g.id, g.size) for g in prob.groups}
                    for index, ci, co in config_cells(prob, timing.widths):
                        layer = prob.layers[index]
                        key = (layer.spec.signature(), ci, co)
                        if table.has(*key) or index not in timing.layer_ms:
                            continue
                        if key not in truth and len(truth) >= heldout:
                            continue
                        if len(truth.get(key, ())) > rep:  # one value per measurement
                            continue
                        truth.setdefault(key, []).append(timing.layer_ms[index])
                        lookup[key] = layer_ms(table, layer, layer.c_in.width(full_w), layer.c_out.width(full_w))
            heldout_s = time.perf_counter() - t1
    finally:
        table.close()
    look = np.array([lookup[k] for k in truth])
    meas = np.array([np.median(v) for v in truth.values()])
    # repeatability: how far one measurement of a cell falls from the median of its measurements
    repeat = np.array([abs(x - np.median(v)) / np.median(v) for v in truth.values() if len(v) > 1 for x in v])
    err = np.abs(look - meas) / meas
    speed = float(np.median(meas / look))  # the machine's speed then vs while building
    err_adj = np.abs(look * speed - meas) / meas
    return {"wall_s": wall, "passes": passes, "refine": refine, "table": str(path),
            "cells": [{"key": list(k), "measurements": v, "interpolated": lookup[k]} for k, v in truth.items()], "truth_runs": truth_runs, "cells_measured": measured,
            "cells_full_grid": len(full), "layers": len(prob.layers), "heldout": int(len(err)),
            "heldout_seconds": heldout_s,
            "one_measurement_median_abs_dev": float(np.median(repeat)) if len(repeat) else None,
            "one_measurement_p95_abs_dev": float(np.percentile(repeat, 95)) if len(repeat) else None,
            "interp_median_abs_err": float(np.median(err)), "interp_p95_abs_err": float(np.percentile(err, 95)),
            "interp_within_10pct": float(np.mean(err <= 0.1)), "speed_factor": speed,
            "interp_median_abs_err_speed_adjusted": float(np.median(err_adj)),
            "interp_p95_abs_err_speed_adjusted": float(np.percentile(err_adj, 95))}


def _layer_sum(path: Path, table, graph_reorders: bool = True, graph_kernels: bool = True):
    """lut.predict.predict_layers of the ONNX file at `path` (dense widths) and its overhead
    elements, as `latprune predict` computes them (every kernel outside the layers, reorders
    included, counted in the runtime's compiled graph and priced by class; `graph_kernels=False`:
    the reorders alone counted there and the rest priced by the overhead fit;
    `graph_reorders=False`: the reorders modelled from the blocking rules, as the solver sees
    them); None when the table lacks a layer's signature."""
    from latprune.ingraph_profile import layer_names
    from latprune.lut.predict import overhead_elements, predict_layers
    from latprune.pipeline import analyse, load_model

    model = load_model(path)
    analysis = analyse(model, model_name=path.stem)
    prob = analysis.problem
    reorders = backend().layout_reorders(model) if graph_reorders and table.blocking else None
    kernels = (backend().graph_kernels(model, layer_names(analysis.model, prob))
               if graph_reorders and graph_kernels and table.kernel_prices() else None)
    try:
        return predict_layers(prob, table, reorders=reorders, kernels=kernels), overhead_elements(prob)
    except KeyError:
        return None


def any_width_errors(name: str, n_configs: int, input_hw: int = 224, seed: int = 0,
                     round_to: int | None = None, processes: int = 7) -> dict:
    """Issue 15's acceptance: models pruned by Torch-Pruning at arbitrary widths (tp_configs.py),
    predicted from a fresh table profiled on the dense model (`latprune profile dense.onnx`,
    which measures fallback cells under the device's blocking rules), each configuration's
    predicted ratio to dense against the measured one (profiler.compare: 3 fresh processes).
    Where the table lacks a configuration's layer kind (RegNetX's grouped convs with fewer
    channels per group than any dense layer), the configuration is profiled into the table
    first (`latprune profile config.onnx`), as a user would. The same cells are also read
    without the blocking rules (one bilinear surface, the lookup before issue 15)."""
    from dataclasses import replace

    from latprune.lut.blocking import BlockingRules
    from latprune.lut.predict import whole_model_ms
    from latprune.pipeline import load_model, model_family, open_table, profile_model
    from tp_configs import export_tp_configs

    dense, configs = export_tp_configs(name, OUT / "tp", n_configs, seed=seed, input_hw=input_hw, round_to=round_to)
    lut = OUT / f"lut_anywidth_{name}_{input_hw}{'' if backend().name == 'ort-cpu' else '_' + backend().name}.sqlite"
    t0 = time.perf_counter()
    prof = profile_model(dense, lut, threads=1, backend=backend().name, precision=backend().precision)
    build = {"seconds": time.perf_counter() - t0, "cells_measured": prof["cells_measured"]}
    print(f"  {name}: dense table: {prof['cells_measured']} cells in {build['seconds']:.0f} s", flush=True)
    table = open_table(lut, backend(), "in-graph")
    profiled = []
    try:
        for path in configs:
            if _layer_sum(path, table) is None:
                t1 = time.perf_counter()
                table.close()
                out = profile_model(path, lut, threads=1, backend=backend().name, precision=backend().precision)
                table = open_table(lut, backend(), "in-graph")
                profiled.append({"config": path.name, "cells_measured": out["cells_measured"],
                                 "seconds": time.perf_counter() - t1})
                print(f"  {name}: {path.name} profiled ({out['cells_measured']} cells)", flush=True)
        family = model_family(load_model(dense), dense.read_bytes())
        cal = table.calibration(family)
        rules = table.blocking
        no_direct = BlockingRules({kind: {axis: replace(r, direct_below=0) for axis, r in axes.items()}
                                   for kind, axes in rules.rules.items()})
        preds = {}
        graph_speed = table.graph_speed(family)
        for label, use, graph, kernels in (
                ("blocking-aware", rules, True, True),
                ("blocking-aware, overhead fit", rules, True, False),
                ("blocking-aware, modelled reorders", rules, False, False),
                ("blocking-aware, no direct kernel", no_direct, True, True),
                ("bilinear (no rules)", BlockingRules(), False, False)):
            table.blocking, table._class_cache = use, {}
            sums = [_layer_sum(p, table, graph, kernels) for p in [dense] + configs]
            ms = [whole_model_ms(ls, cal, mel, table.remainder(family, ls.kernel_ms), graph_speed)
                  for ls, mel in sums]
            preds[label] = {"ms": ms, "band": [cal.scale * ls.band_ms for ls, _ in sums],
                            "found": [ls.found for ls, _ in sums]}
        table.blocking, table._class_cache = rules, {}
        blocking = rules.describe()
    finally:
        table.close()
    from latprune.profiler.compare import compare_in_subprocesses

    t1 = time.perf_counter()
    models = {"dense": dense, **{p.stem: p for p in configs}}
    per_process = []  # each fresh process's ratios to its own dense median (order alternating)
    for k in range(processes):
        order = dict(list(models.items())[::1 if k % 2 == 0 else -1])
        timed = compare_in_subprocesses(order, 1, processes=1, backend=backend())
        per_process.append([timed[p.stem].median_ms / timed["dense"].median_ms for p in configs])
    print(f"  {name}: {len(configs)} configurations measured beside the dense model in {processes} fresh processes "
          f"({time.perf_counter() - t1:.0f} s)", flush=True)
    per_process = np.array(per_process)
    meas_ratio = np.median(per_process, axis=0)
    result = {"model": name, "input_hw": input_hw, "round_to": round_to, "build": build, "configs_profiled": profiled,
              "config_sha256": [hashlib.sha256(p.read_bytes()).hexdigest() for p in [dense] + configs],
              "blocking": blocking, "measured_ratio": list(meas_ratio),
              "measured_ratio_per_process": per_process.tolist(),
              "measured_spread": list((np.percentile(per_process, 90, axis=0) - np.percentile(per_process, 10, axis=0))
                                      / meas_ratio), "predictors": {}}
    for label, p in preds.items():
        pm = np.array(p["ms"])
        ratio = pm[1:] / pm[0]
        err = ratio / meas_ratio - 1
        band = np.array(p["band"][1:]) / pm[0]
        result["predictors"][label] = {
            "predicted_ratio": list(ratio), "errors": list(err), "median_abs_err": float(np.median(np.abs(err))),
            "p95_abs_err": float(np.percentile(np.abs(err), 95)), "within_10pct": float(np.mean(np.abs(err) <= 0.10)),
            "median_signed_err": float(np.median(err)),
            "in_band": float(np.mean(np.abs(ratio - meas_ratio) <= band)), "found": p["found"]}
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18,resnet50,mobilenet_v2")
    ap.add_argument("--configs", type=int, default=30)
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=60, help="interleaved measurement rounds per model (one run each)")
    ap.add_argument("--lut", default=str(OUT / "lut.sqlite"))
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--skip-models", action="store_true", help="only the ResNet-50 table build")
    ap.add_argument("--refine", action="store_true", help="profile with grid refinement (latprune profile --refine)")
    ap.add_argument("--passes", default="1", help="comma-separated: table builds with this many "
                    "measurements per cell")
    ap.add_argument("--profile-passes", type=int, default=1, help="passes when profiling the models' "
                    "in-graph cells that the table lacks (part 1)")
    ap.add_argument("--truth-runs", type=int, default=3, help="measurements (median) of each held-out cell")
    ap.add_argument("--widths", default="step16", help="comma-separated: stepK (multiples of K; 16 is the "
                    "solver's default on AVX-512) or any (arbitrary integers)")
    ap.add_argument("--out", default=None, help="JSON (default bench/out/lut_fidelity[_BACKEND].json)")
    ap.add_argument("--any-width", default=None, help="comma-separated torchvision models (tp_configs.TP_MODELS) "
                    "pruned by Torch-Pruning at arbitrary widths: the issue-15 figures (skips the other parts)")
    ap.add_argument("--any-width-configs", type=int, default=10)
    ap.add_argument("--input-hw", type=int, default=224)
    ap.add_argument("--processes", type=int, default=7, help="--any-width: fresh measuring processes")
    ap.add_argument("--pooled-truth", default=None, help="--any-width: comma-separated globs of earlier any-width "
                    "JSONs; each model's predictions are also scored against the median measured ratios of the quiet "
                    "runs among them and this one (same configurations, per-process spread under 7%%)")
    ap.add_argument("--round-to", type=int, default=None, help="--any-width: Torch-Pruning rounds widths to "
                    "multiples of this (the on-step check); default arbitrary widths")
    ap.add_argument("--backend", default="ort-cpu")
    ap.add_argument("--precision", default=None)
    args = ap.parse_args()
    global BACKEND
    from latprune.profiler.backends import get_backend
    BACKEND = get_backend(args.backend, threads=1, precision=args.precision)
    BACKEND.check()
    suffix = "" if BACKEND.name == "ort-cpu" else f"_{BACKEND.name}"
    args.out = args.out or str(OUT / f"lut_fidelity{suffix}.json")
    if args.any_width:
        return any_width_main(args)
    result = {"whole_model": [], "table_build": []}
    for mode in args.widths.split(",") if not args.skip_models else []:
        for name in args.models.split(","):
            result["whole_model"].append(whole_model_errors(name, args.configs, Path(args.lut), mode, args.rounds,
                                                            profile_passes=args.profile_passes, refine=args.refine))
            Path(args.out).write_text(json.dumps(result, indent=1))
    for passes in [] if args.skip_build else [int(p) for p in args.passes.split(",")]:
        result["table_build"].append(table_build(args.heldout, passes, args.truth_runs, refine=args.refine))
        Path(args.out).write_text(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("\nmodel | widths | predictor | measured as | median |err| | p95 |err| | within ±10% | median signed err")
    for r in result["whole_model"]:
        for key, s in r["predictors"].items():
            pred, truth = key.split("|")
            print(f"{r['model']} | {r['widths']} | {pred} | median | "
                  f"{100 * s['median_abs_err']:.1f}% | {100 * s['p95_abs_err']:.1f}% | "
                  f"{100 * s['within_10pct']:.0f}% | {100 * s['median_signed_err']:+.1f}%")
        print(f"{r['model']} | measurement spread (p10-p90 of bursts, median over models): "
              f"{100 * r['measurement_spread_median']:.1f}%")
    for b in result["table_build"]:
        print(f"\nResNet-50 in-graph table, {b['passes']} pass(es): {b['cells_measured']} cells measured of "
              f"{b['cells_full_grid']} in the full grid "
              f"({b['layers']} layers) in {b['wall_s']:.0f} s; interpolation on {b['heldout']} held-out cells "
              f"(each the median of {b['truth_runs']} measurements): "
              f"median {100 * b['interp_median_abs_err']:.1f}%, p95 {100 * b['interp_p95_abs_err']:.1f}%, "
              f"within ±10% {100 * b['interp_within_10pct']:.0f}% (machine speed then/while building "
              f"{b['speed_factor']:.3f}; adjusted for it: median {100 * b['interp_median_abs_err_speed_adjusted']:.1f}%, "
              f"p95 {100 * b['interp_p95_abs_err_speed_adjusted']:.1f}%)")
        if b.get("one_measurement_median_abs_dev") is not None:
            print(f"one in-graph measurement of a cell vs the median of its {b['truth_runs']}: median "
                  f"{100 * b['one_measurement_median_abs_dev']:.1f}%, p95 {100 * b['one_measurement_p95_abs_dev']:.1f}%")
    return 0


QUIET_SPREAD = 0.07  # a run whose configurations' ratios spread (p90 - p10 over processes, median) under this is quiet


def pooled_truth(run: dict, files: list[str], quiet_spread: float = QUIET_SPREAD) -> tuple[np.ndarray, list[str]] | None:
    """(the median over quiet runs of each configuration's measured ratio to dense, the runs
    used) for `run` (one model's any-width result), pooling it with the same model's results
    in `files` (earlier any-width JSONs): on this VM a run's measured ratios spread up to 35%
    over processes in a noisy hour while quiet runs agree to ~1-2%, so the error of one
    table is best read against the truth of the quiet runs. A run joins when its median
    spread is under `quiet_spread` and its configurations are the same models (the ONNX
    files' SHA-256 where both runs recorded them; runs before the hashes were recorded match
    by model, resolution, rounding and count: tp_configs.py seeds the pruning). None without
    a quiet run."""
    def same(other: dict) -> bool:
        keys = ("model", "input_hw", "round_to")
        if any(other.get(k) != run.get(k) for k in keys) or len(other["measured_ratio"]) != len(run["measured_ratio"]):
            return False
        return not (other.get("config_sha256") and run.get("config_sha256")) or other["config_sha256"] == run["config_sha256"]

    runs = [("this run", run)] + [(f, r) for f in files for r in json.loads(Path(f).read_text()).get("any_width", [])
                                  if same(r)]
    quiet = [(label, r) for label, r in runs if np.median(r["measured_spread"]) <= quiet_spread]
    if not quiet:
        return None
    return np.median([r["measured_ratio"] for _, r in quiet], axis=0), [label for label, _ in quiet]


def _error_stats(predicted: list[float], truth: np.ndarray) -> dict:
    err = np.array(predicted) / truth - 1
    return {"errors": list(err), "median_abs_err": float(np.median(np.abs(err))),
            "p95_abs_err": float(np.percentile(np.abs(err), 95)),
            "within_10pct": float(np.mean(np.abs(err) <= 0.10)), "median_signed_err": float(np.median(err))}


def any_width_main(args) -> int:
    import glob

    out = Path(args.out.replace(".json", "_anywidth.json"))
    result = {"any_width": []}
    earlier = sorted({f for pattern in (args.pooled_truth or "").split(",") if pattern for f in glob.glob(pattern)}
                     - {str(out)})
    for name in args.any_width.split(","):
        run = any_width_errors(name, args.any_width_configs, args.input_hw,
                               round_to=args.round_to, processes=args.processes)
        pooled = pooled_truth(run, earlier) if earlier else None
        if pooled is not None:
            truth, used = pooled
            run["pooled_truth"] = {"measured_ratio": list(truth), "runs": used,
                                   "predictors": {label: _error_stats(p["predicted_ratio"], truth)
                                                  for label, p in run["predictors"].items()}}
        result["any_width"].append(run)
        out.write_text(json.dumps(result, indent=1))
    print("\nmodel | predictor | configs | median |err| of ratio to dense | p95 | within ±10% | median signed "
          "| measured in band | measured ratio range")
    for r in result["any_width"]:
        for label, s in r["predictors"].items():
            print(f"{r['model']}{'/r%d' % r['round_to'] if r.get('round_to') else ''} | {label} | {len(r['measured_ratio'])} | {100 * s['median_abs_err']:.1f}% | "
                  f"{100 * s['p95_abs_err']:.1f}% | {100 * s['within_10pct']:.0f}% | {100 * s['median_signed_err']:+.1f}% | "
                  f"{100 * s['in_band']:.0f}% | {min(r['measured_ratio']):.2f}-{max(r['measured_ratio']):.2f}")
        print(f"{r['model']}{' (widths multiples of %d)' % r['round_to'] if r.get('round_to') else ''}: "
              f"table {r['build']['cells_measured']} cells in {r['build']['seconds']:.0f} s; "
              f"{len(r['configs_profiled'])} configs profiled first; measured spread over processes "
              f"{100 * np.median(r['measured_spread']):.1f}% (median); rules: {r['blocking']}")
    pooled = [r for r in result["any_width"] if r.get("pooled_truth")]
    if pooled:
        print("\nthe same predictions against the pooled truth of the quiet runs (--pooled-truth; median "
              f"spread <= {100 * QUIET_SPREAD:.0f}%)\nmodel | predictor | quiet runs | median |err| | p95 | "
              "within ±10% | median signed | this run's truth vs pooled")
        for r in pooled:
            pt = r["pooled_truth"]
            own = float(np.median(np.array(r["measured_ratio"]) / np.array(pt["measured_ratio"]) - 1))
            for label, s in pt["predictors"].items():
                print(f"{r['model']} | {label} | {len(pt['runs'])} | {100 * s['median_abs_err']:.1f}% | "
                      f"{100 * s['p95_abs_err']:.1f}% | {100 * s['within_10pct']:.0f}% | "
                      f"{100 * s['median_signed_err']:+.1f}% | {100 * own:+.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
