"""The optimize pipeline: analyse -> profile -> importance -> solve -> apply -> measure.

Each step lives in its own package; this module only wires them together and writes the
outputs (pruned.onnx, plan.json, report.json) atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from latprune.types import InputError, Plan, Problem
from latprune.lut.predict import (REORDER_CLASSES, calibrated, layer_costs, layer_ms, missing_cells, needs_fallback,
                                  overhead_elements, predict_layers, predict_raw, refine_widths, whole_model_ms)
from latprune.lut.store import LatencyTable, fit_calibration
from latprune.profiler.fingerprint import TIMINGS
from latprune.profiler.profile import profile_cells
from latprune.pruner.analysis import Analysis, analyse, weight_slices
from latprune.pruner.model_io import load_model, save_model_atomic
from latprune.pruner.surgery import apply_plan
from latprune.solver.importance import magnitude_importance
from latprune.solver.objective import Objective
from latprune.solver.problem_costs import SolveInput, min_raw_latency
from latprune.solver.uniform import uniform_widths

from latprune.options import (DISTORTIONS, IMPORTANCES, METHODS, OBJECTIVES, REPAIRS,  # noqa: F401 (re-exported)
                              OptimizeOptions)

FAMILY_KEY = "latprune.family"


def default_lut_path() -> Path:
    home = Path(os.environ.get("LATPRUNE_HOME", Path.home() / ".cache" / "latprune"))
    home.mkdir(parents=True, exist_ok=True)
    return home / "lut.sqlite"


class Progress:
    """Callbacks for long steps; the CLI renders them with rich, the service stores them."""

    def stage(self, name: str) -> None:  # noqa: D401 - a hook
        pass

    def advance(self, done: int, total: int) -> None:
        pass

    def info(self, message: str) -> None:
        pass


def model_family(model: onnx.ModelProto, data: bytes) -> str:
    """Calibration key: the source model's hash (kept in a pruned model's metadata)."""
    for prop in model.metadata_props:
        if prop.key == FAMILY_KEY:
            return prop.value
    return hashlib.sha256(data).hexdigest()[:16]


def check_options(opts: OptimizeOptions) -> None:
    given = [v for v in (opts.budget_ms, opts.speedup, opts.flops_ratio, opts.params_ratio) if v is not None]
    if len(given) != 1:
        raise InputError("give exactly one budget: --budget-ms, --speedup, --flops-ratio or --params-ratio")
    for name, v in (("--flops-ratio", opts.flops_ratio), ("--params-ratio", opts.params_ratio)):
        if v is not None and not 0 < v <= 1:
            raise InputError(f"{name} must be in (0, 1], not {v}")
    if opts.budget_ms is not None and not opts.budget_ms > 0:
        raise InputError(f"--budget-ms must be positive, not {opts.budget_ms}")
    if opts.speedup is not None and not opts.speedup > 0:
        raise InputError(f"--speedup must be positive, not {opts.speedup}")
    if opts.threads < 1:
        raise InputError(f"--threads must be at least 1, not {opts.threads}")
    if opts.method not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}, not {opts.method!r}")
    if opts.remove_blocks not in ("auto", "yes", "no"):
        raise InputError(f"--remove-blocks must be auto, yes or no, not {opts.remove_blocks!r}")
    if opts.step is not None and opts.step < 1:
        raise InputError(f"--step must be at least 1, not {opts.step}")
    for flag, value, allowed in (("--objective", opts.objective, OBJECTIVES),
                                 ("--importance", opts.importance, IMPORTANCES),
                                 ("--distortion", opts.distortion, DISTORTIONS),
                                 ("--repair", opts.repair, REPAIRS)):
        if value not in allowed:
            raise InputError(f"{flag} must be one of {', '.join(allowed)}, not {value!r}")
    if opts.timing not in TIMINGS:
        raise InputError(f"--timing must be one of {', '.join(TIMINGS)}, not {opts.timing!r}")
    if opts.calib_samples < 1:
        raise InputError(f"--calib-samples must be at least 1, not {opts.calib_samples}")
    data_driven = (opts.resolved_objective() == "distortion" or opts.resolved_repair() != "none"
                   or opts.importance in ("activation", "taylor"))
    if opts.recover_steps and not opts.calib:  # asked for explicitly (None: the default)
        raise InputError("--recover-steps distils on the calibration inputs: give --calib FILE.npz")
    if data_driven and not opts.calib:
        raise InputError("the distortion objective, repair and activation/taylor importance need "
                         "calibration inputs: --calib FILE.npz (or --calib noise for the zero-data mode)")


def make_backend(name: str = "ort-cpu", threads: int = 1, precision: str | None = None):
    """The backend called `name`, checked: BackendUnavailable (one line naming the missing
    package or device) when its runtime cannot run here."""
    from latprune.profiler.backends import get_backend

    backend = get_backend(name, threads=threads, precision=precision)
    backend.check()
    return backend


def resolve_step(step: int | None, backend=None) -> int:
    """`step`, or the backend's preferred channel multiple (probed on the device, cached) when
    None; without a backend, ONNX Runtime on this CPU."""
    if step is not None:
        return step
    return (backend or make_backend()).channel_step()


def apply_stream_policy(analysis: Analysis, prune_streams: str = "auto") -> None:
    """Keep LayerNorm-normalised channel groups whole unless pruning them is allowed:
    prune_streams 'yes', or 'auto' in a model without attention layers."""
    attention = any(layer.spec.op == "Attention" for layer in analysis.problem.layers)
    if prune_streams == "no" or (prune_streams == "auto" and attention):
        frozen = analysis.stream_groups()
        analysis.freeze_groups(frozen)
        if frozen:
            analysis.notes.append(f"{len(frozen)} residual-stream group(s) normalised by LayerNorm kept whole "
                                  "(--prune-streams yes to prune them)")


DEFAULT_SEQUENCE_LENGTH = 128


def prepare(model_path: Path, step: int | None = None, max_candidates: int = 16,
            importance: str = "l1", backend=None, prune_streams: str = "auto",
            sequence_length: int | None = None) -> tuple[onnx.ModelProto, bytes, Analysis]:
    """Load, validate and analyse a model; fill importance. Raises InputError on bad input.
    `step` None: the backend's preferred channel multiple. `prune_streams` (auto | yes | no):
    whether LayerNorm-normalised groups may be pruned (auto: not in models with attention).
    `sequence_length`: the size of dynamic input axes other than the batch (default 128 when
    the model has any)."""
    from latprune.pruner.model_io import dynamic_lengths

    step = resolve_step(step, backend)
    model = load_model(model_path)
    data = Path(model_path).read_bytes()
    dynamic = dynamic_lengths(model)
    length = (sequence_length or DEFAULT_SEQUENCE_LENGTH) if dynamic else None
    analysis = analyse(model, step=step, max_candidates=max_candidates, model_name=Path(model_path).stem,
                       length=length)
    if step == 1 and backend is not None:  # any width: the widths where latency steps (issue 15)
        from latprune.lut.predict import plateau_widths
        from latprune.profiler.backends import as_backend

        rules, _ = as_backend(backend).blocking_rules()
        for gid, widths in plateau_widths(analysis.problem, rules, max_candidates).items():
            analysis.problem.groups[gid].candidate_widths = widths
        if rules:
            analysis.notes.append(f"--step 1: candidate widths where latency steps under the probed blocking "
                                  f"({rules.describe()})")
    if dynamic:
        analysis.notes.append(f"dynamic input axes {', '.join(sorted(set(dynamic)))} analysed, profiled and "
                              f"timed at {length} (--sequence-length); the pruned model keeps them dynamic")
    prob = analysis.problem
    apply_stream_policy(analysis, prune_streams)
    if not prob.layers:
        raise InputError(f"{model_path}: the model has no layers to prune (no Conv, Gemm or "
                         "MatMul with constant weights)")
    magnitude_importance(prob, weight_slices(analysis), norm="l1" if importance not in ("l1", "l2") else importance)
    return model, data, analysis


@dataclass
class Scoring:
    """What the solver maximises, and how it was obtained (for the report)."""

    objective: Objective
    info: dict
    calib_x: "object | None" = None  # np.ndarray of calibration inputs, when any
    calib_source: str | None = None  # where calib_x came from (a .npz path or "noise")


def score(analysis: Analysis, opts: OptimizeOptions, progress: Progress) -> Scoring:
    """Calibration inputs, channel ranking and the objective (importance or distortion)."""
    from latprune.solver.importance import apply_scores
    from latprune.solver.objective import distortion_objective, importance_objective

    prob = analysis.problem
    info: dict = {"objective": opts.resolved_objective(), "importance": opts.importance,
                  "repair": opts.resolved_repair(), "warnings": []}
    x = None
    if opts.calib:
        from latprune.calibration import load_calibration
        from latprune.pruner.forward import input_shape
        x = load_calibration(opts.calib, input_shape(analysis.model), opts.calib_samples)
        info["calibration_inputs"] = {"source": opts.calib_label or str(opts.calib), "samples": int(len(x))}
    scores = None
    if opts.importance == "bn":
        from latprune.pruner.channel_stats import bn_scale_scores
        scores = bn_scale_scores(analysis)
        if scores is None:
            info["warnings"].append("no BatchNormalization node writes a prunable group (the exporter "
                                    "folded them into the convs): ranked by L1 magnitude instead")
    elif opts.importance == "activation":
        from latprune.pruner.channel_stats import activation_scores
        progress.stage("activation statistics on the calibration inputs")
        scores = activation_scores(analysis, x)
    elif opts.importance == "taylor":
        progress.stage("first-order Taylor importance (gradients through torch)")
        scores = _taylor_scores(analysis, x)
    if scores:
        apply_scores(prob, scores)
    if opts.resolved_objective() == "importance":
        return Scoring(importance_objective(prob), info, x, opts.calib)
    orders = importance_objective(prob).orders
    t0 = time.perf_counter()
    if opts.distortion == "fisher":
        progress.stage("distortion curves (Gauss–Newton estimate from gradients)")
        values, blocks = _fisher_curves(analysis, x, orders)
    else:
        from latprune.pruner.distortion import measure_distortion
        n = sum(len(g.candidate_widths) - 1 for g in prob.groups if g.prunable) + len(prob.blocks)
        progress.stage(f"distortion curves: {n} pruned variants × {len(x)} calibration inputs")
        curves = measure_distortion(analysis, x, orders, blocks=bool(prob.blocks),
                                    progress=progress.advance, cache_dir=default_lut_path().parent / "distortion")
        values, blocks = curves.values, curves.blocks
    info["distortion"] = {"method": opts.distortion, "seconds": time.perf_counter() - t0}
    return Scoring(distortion_objective(prob, values, blocks, orders), info, x, opts.calib)


def _torch_missing() -> InputError:
    return InputError("this option needs PyTorch (gradients): pip install torch")


def _taylor_scores(analysis: Analysis, x) -> dict:
    try:
        from latprune.solver.gradients import taylor_bn_importance
    except ImportError:
        raise _torch_missing() from None
    return taylor_bn_importance(analysis, x)


def _fisher_curves(analysis: Analysis, x, orders) -> tuple[dict, dict]:
    try:
        from latprune.solver import gradients
    except ImportError:
        raise _torch_missing() from None
    prob = analysis.problem
    widths = {g.id: list(g.candidate_widths) for g in prob.groups if g.prunable}
    values = gradients.fisher_distortion(analysis, x, orders, widths)
    blocks = {}
    if prob.blocks:  # one forward pass per block: cheap next to the curves
        from latprune.pruner.distortion import measure_distortion
        blocks = measure_distortion(analysis, x, {}, blocks=True, groups=False).blocks
    return values, blocks


def open_table(lut_path: Path | None, backend, timing: str = "in-graph") -> LatencyTable:
    """The latency table of `backend` (its fingerprint with the `timing` method) in the SQLite
    file `lut_path` (default: $LATPRUNE_HOME/lut.sqlite)."""
    from latprune.profiler.backends import as_backend

    if timing not in TIMINGS:
        raise InputError(f"--timing must be one of {', '.join(TIMINGS)}, not {timing!r}")
    return LatencyTable(lut_path or default_lut_path(), as_backend(backend).fingerprint(timing=timing))


def ensure_profiled(problem: Problem, table: LatencyTable, backend, points: int,
                    progress: Progress, analysis: Analysis | None = None, family: str | None = None,
                    passes: int = 1, refine: bool = False, fallback: bool | None = None) -> int:
    """Measure the grid cells the table lacks for `problem`: inside whole pruned models when
    the table is an in-graph one (needs `analysis`), and alone for any cell no run reached.
    Then, with `refine`, the cells at the widths lut.predict.refine_widths adds where
    interpolation between grid widths is uncertain. The in-graph runs also record the time
    outside the layers for `family` (table.overhead). Returns the cells measured. `backend`:
    the runtime (an int: ONNX Runtime on this CPU with that many threads).

    `fallback` (issue 15): also measure the cells of widths that run the kernel's fallback
    (lut.predict.fallback_grid), under the device's blocking rules (probed and recorded in the
    table first when it has none). None: when the problem's candidate widths reach them
    (lut.predict.needs_fallback, e.g. --step 1); `latprune profile` asks for them always, so
    that the table predicts models pruned to any width."""
    from latprune.profiler.backends import as_backend

    backend = as_backend(backend)
    if fallback is not False and not table.has_blocking() and (fallback or problem.step % backend.channel_step()):
        progress.stage("probing how the runtime blocks channels (once per device)")
        table.set_blocking(backend.blocking_rules()[0])
    if fallback is None:
        fallback = needs_fallback(problem, table.blocking)
    in_graph = in_graph_table(table, backend)
    runs: list = []

    def fill(todo: list, what: str, extra: dict[int, list[int]] | None = None) -> int:
        n = 0
        if todo and in_graph:
            if analysis is None:
                raise ValueError("an in-graph table is profiled through the model: pass its analysis")
            from latprune.ingraph_profile import profile_in_graph

            progress.stage(f"profiling {len(todo)} {what} inside pruned copies of the model")
            n, done = profile_in_graph(table, analysis, todo, backend, points, progress.advance, passes=passes,
                                       note=progress.info)
            runs.extend(done)
            todo = missing_cells(problem, table, points, extra, fallback)
        if todo:
            progress.stage(f"profiling {len(todo)} {what} one layer at a time")
            n += profile_cells(table, todo, backend, progress.advance)
        return n

    n = fill(missing_cells(problem, table, points, fallback=fallback), "layer cells")
    extra = refine_widths(problem, table, points) if refine else {}
    if extra:
        n += fill(missing_cells(problem, table, points, extra, fallback),
                  f"cells at {sum(map(len, extra.values()))} widths added where interpolation bends", extra)
    for run in runs if family else []:  # every cell is in the table now
        table.add_overhead_point(family, predict_raw(problem, table, run.widths), run.end_to_end_ms,
                                 overhead_elements(problem, run.widths))
        if run.kernels is not None:  # what no kernel holds, beside the priced kernels (whole_model_ms)
            table.add_remainder_point(family, run.kernel_ms, run.end_to_end_ms)
    return n


def solve(inp: SolveInput, method: str) -> Plan:
    if method == "milp":
        from latprune.solver.milp import solve_milp
        return solve_milp(inp)
    if method == "dp":
        from latprune.solver.dp import solve_dp
        return solve_dp(inp)
    if method in ("minlp-oa", "minlp-scip"):
        from latprune.solver.minlp import solve_minlp
        return solve_minlp(inp, solver="mindtpy" if method == "minlp-oa" else "scip")
    if method == "halp":
        from latprune.solver.baselines import solve_halp
        return solve_halp(inp)
    if method == "threshold":
        from latprune.solver.baselines import solve_threshold
        return solve_threshold(inp)
    if method == "uniform":
        from latprune.solver.uniform import solve_uniform
        return solve_uniform(inp)
    from latprune.solver.brute import solve_brute
    return solve_brute(inp)


def _tag(model: onnx.ModelProto, family: str) -> onnx.ModelProto:
    props = {p.key: p for p in model.metadata_props}
    if FAMILY_KEY in props:
        props[FAMILY_KEY].value = family
    else:
        entry = model.metadata_props.add()
        entry.key, entry.value = FAMILY_KEY, family
    return model


class _Measurer:
    """End-to-end measurements through the backend: each ONNX model is built into the
    backend's artifact first (ONNX Runtime: the file itself; OpenVINO: IR; TensorRT: an engine)
    and the artifacts are timed side by side in fresh processes, so what is measured is what
    is delivered. A model with dynamic sequence axes is timed at `length`."""

    def __init__(self, backend, work: Path, length: int | None = None) -> None:
        self.backend, self.work, self.length = backend, work, length
        self.built: dict[Path, Path] = {}

    def artifact(self, onnx_path: Path) -> Path:
        from latprune.pruner.model_io import dynamic_lengths, fix_input_dims

        onnx_path = Path(onnx_path)
        if onnx_path not in self.built:
            folder = Path(tempfile.mkdtemp(dir=self.work, prefix="artifact-"))
            source = onnx_path
            if self.length is not None:
                model = load_model(onnx_path)
                if dynamic_lengths(model):
                    source = folder / onnx_path.name
                    save_model_atomic(fix_input_dims(model, 1, self.length), source)
            self.built[onnx_path] = self.backend.build(source, folder)
        return self.built[onnx_path]

    def forget(self, onnx_path: Path) -> None:
        """`onnx_path` was rewritten: build it again next time."""
        self.built.pop(Path(onnx_path), None)

    def measure(self, models: dict[str, Path], processes: int):
        return self.backend.measure_side_by_side({k: self.artifact(v) for k, v in models.items()}, processes)


@dataclass
class OptimizeResult:
    """What `optimize_model` returns: the plan, the pruned model, the report, and the
    backend's artifact of the pruned model (files in `artifact_dir`, removed by `close`)."""

    plan: Plan
    pruned: onnx.ModelProto
    report: dict
    artifacts: list[Path]
    artifact_dir: Path | None = None

    def close(self) -> None:
        if self.artifact_dir is not None:
            shutil.rmtree(self.artifact_dir, ignore_errors=True)


def optimize(model_path: Path, out_dir: Path, opts: OptimizeOptions,
             progress: Progress | None = None) -> dict:
    """Run the whole pipeline (optimize_model) and write its result into out_dir
    (write_result). Returns the report. Nothing is written to out_dir unless the run succeeds."""
    result = optimize_model(model_path, opts, progress)
    try:
        write_result(result, out_dir)
    finally:
        result.close()
    return result.report


def optimize_model(model_path: Path, opts: OptimizeOptions, progress: Progress | None = None) -> OptimizeResult:
    """Analyse, profile, score, solve, prune and measure `model_path` on the options' backend."""
    progress = progress or Progress()
    wall0 = time.perf_counter()
    check_options(opts)
    backend = make_backend(opts.backend, opts.threads, opts.precision)
    if opts.step is None:
        progress.stage(f"probing the channel multiple {backend.name} runs fastest at")
    opts = opts.replace(step=resolve_step(opts.step, backend))
    progress.stage("analysing the model")
    model, data, analysis = prepare(model_path, opts.step, opts.max_candidates, opts.importance, backend,
                                    opts.prune_streams, opts.sequence_length)
    prob = analysis.problem
    if not any(g.prunable for g in prob.groups):
        raise InputError(f"{model_path}: no prunable channel groups (see the analysis notes)")
    family = model_family(model, data)
    scoring = score(analysis, opts, progress)
    keep = Path(tempfile.mkdtemp(prefix="latprune-artifact-"))
    work = Path(tempfile.mkdtemp(prefix="latprune-"))
    try:
        measurer = _Measurer(backend, work, analysis.length)
        if opts.flops_ratio is not None or opts.params_ratio is not None:
            plan, pruned, report = _optimize_counts(model_path, opts, analysis, scoring, family, progress, wall0,
                                                     measurer)
        else:
            plan, pruned, report = _optimize_latency(model_path, opts, analysis, scoring, family, progress, wall0,
                                                      measurer, backend)
        if opts.resolved_recover_steps():
            pruned, report["recovery"] = _recovered(analysis, pruned, scoring, opts, progress)
            if "skipped" in report["recovery"]:
                report["warnings"].append(report["recovery"]["skipped"])
        save_model_atomic(pruned, work / "final.onnx")
        artifact = measurer.artifact(work / "final.onnx")
        # an ONNX artifact (ONNX Runtime) is pruned.onnx itself (timed at the sequence length)
        artifacts = _keep_artifact(artifact, keep) if artifact.suffix != ".onnx" else []
        report["backend"] = {"name": backend.name, "precision": backend.fingerprint(timing=opts.timing).get("precision"),
                             "artifacts": ["pruned.onnx"] + [p.name for p in artifacts]}
        return OptimizeResult(plan, pruned, report, artifacts, keep)
    except BaseException:
        shutil.rmtree(keep, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _keep_artifact(artifact: Path, keep: Path) -> list[Path]:
    """Copy the artifact (and its sibling files of the same stem, e.g. an IR's .bin) into
    `keep`, named pruned.<suffix>."""
    out = []
    for f in sorted(artifact.parent.glob(artifact.stem + ".*")):
        dst = keep / ("pruned" + f.suffix)
        shutil.copyfile(f, dst)
        out.append(dst)
    return out


def _optimize_latency(model_path, opts, analysis, scoring, family, progress, wall0, measurer, backend):
    prob = analysis.problem
    work = measurer.work
    table = open_table(opts.lut_path, backend, opts.timing)
    try:
        n_measured = ensure_profiled(prob, table, backend, opts.grid_points, progress, analysis, family)
        progress.stage("measuring the dense model")
        dense = measurer.measure({"dense": Path(model_path)}, processes=1)["dense"]
        budget = opts.budget_ms if opts.budget_ms is not None else dense.median_ms / opts.speedup
        costs = layer_costs(prob, table)
        progress.stage("calibrating the latency model (uniform 1.0, 0.75, 0.5 side by side)")
        points = _calibration_points(model_path, analysis, table, measurer)
        for raw, ms, mel in points:
            table.add_calibration(family, raw, ms, mel)
        cal = fit_calibration(*zip(*points), overhead=table.overhead(family))
        rounds = []
        target = budget
        # The distortion objective prices a block's removal (D_b), so 'auto' lets the solver
        # weigh it from the start; the magnitude prior cannot, so it removes blocks only when
        # narrowing alone cannot meet the target.
        allow_blocks = opts.remove_blocks == "yes" or (
            opts.remove_blocks == "auto" and scoring.objective.name == "distortion")
        best: tuple | None = None
        seen_plans: set[tuple] = set()
        stop_reason = ""  # why the rounds stopped, read when the best plan uses < BUDGET_USE
        for rnd in range(1, opts.rounds + 1):
            if opts.remove_blocks == "auto" and prob.blocks and not allow_blocks:
                probe = _solve_input(prob, costs, target, cal, False, opts, scoring)
                if probe.scale * min_raw_latency(probe) + probe.offset_ms > target:
                    allow_blocks = True
                    progress.info("the target cannot be met by narrowing channels alone; "
                                  "removing whole residual blocks is allowed")
            progress.stage(f"solving ({opts.method}), round {rnd}, target {target:.3f} ms")
            inp = _solve_input(prob, costs, target, cal, allow_blocks, opts, scoring)
            try:
                plan = solve(inp, opts.method)
            except InputError as exc:
                if rnd == 1:
                    raise
                progress.info(f"stopping: {exc}")  # keep the best plan of the earlier rounds
                stop_reason = f"round {rnd}'s solve failed ({exc})"
                break
            progress.stage(f"applying the plan and measuring (round {rnd})")
            # Rounds time the unrepaired surgery: repair refits weights only (same graph, same
            # latency), so it runs once, on the best round's plan, after the rounds.
            pruned = _tag(apply_plan(analysis, plan), family)
            # Pruned and dense are timed side by side in fresh processes: a --speedup budget is
            # checked as a ratio to the dense latency measured alongside (see profiler.compare).
            save_model_atomic(pruned, work / "pruned.onnx")
            measurer.forget(work / "pruned.onnx")
            timed = measurer.measure({"dense": Path(model_path), "pruned": work / "pruned.onnx"},
                                     processes=opts.measure_processes)
            measured, dense = timed["pruned"], timed["dense"]
            if opts.speedup is not None:
                budget = dense.median_ms / opts.speedup
            raw = predict_raw(prob, table, plan.widths, plan.removed_blocks)
            mel = overhead_elements(prob, plan.widths, plan.removed_blocks)
            rounds.append({"round": rnd, "target_ms": target, "predicted_ms": plan.predicted_ms,
                           "dense_ms": dense.median_ms, "budget_ms": budget,
                           "measured_ms": measured.median_ms, "p90_ms": measured.p90_ms,
                           "solve_seconds": plan.solve_seconds, "status": plan.status,
                           "blocks_allowed": allow_blocks})
            table.add_calibration(family, raw, measured.median_ms, mel)
            this = (plan, pruned, measured.median_ms, measured.p90_ms, dense, budget)
            key = (tuple(sorted(plan.widths.items())), tuple(sorted(plan.removed_blocks)))
            best = better_round(best, this)
            if round_is_final(measured.median_ms, budget, rnd == opts.rounds, key in seen_plans):
                stop_reason = ("the solver repeated a plan already measured: the table's next wider "
                               "plan is predicted over the budget" if key in seen_plans and rnd < opts.rounds
                               else f"the {opts.rounds} re-solve rounds (--rounds) ran out")
                break
            if measured.median_ms <= budget:
                progress.info(f"measured {measured.median_ms:.3f} ms uses "
                              f"{measured.median_ms / budget:.0%} of the budget {budget:.3f} ms; "
                              "loosening and re-solving")
            else:
                progress.info(f"measured {measured.median_ms:.3f} ms > budget {budget:.3f} ms; "
                              "tightening and re-solving")
            seen_plans.add(key)
            points.append((raw, measured.median_ms, mel))
            cal = fit_calibration(*zip(*points), overhead=table.overhead(family))
            target = target * budget / measured.median_ms * 0.99
        assert best is not None
        plan, pruned, measured_ms, p90_ms, dense, budget = best
        if scoring.info["repair"] != "none":
            pruned = _tag(_repaired(analysis, plan, scoring, progress, opts.resolved_recover_steps() > 0), family)
        report = _report(model_path, prob, table, plan, dense, budget, measured_ms, p90_ms,
                         cal, rounds, opts, n_measured, analysis, wall0)
        note = budget_use_note(rounds, measured_ms, budget, stop_reason)
        if note:  # not a warning: `warnings` means the budget was missed (exit code 3)
            report["budget_use_note"] = note
        _add_scoring(report, scoring)
        return plan, pruned, report
    finally:
        table.close()


def better_round(best: tuple | None, this: tuple) -> tuple:
    """The better of two measured rounds (plan, pruned, measured ms, p90 ms, dense, budget ms):
    a round that meets its budget beats one that misses; of two that meet, the higher
    objective (a round that uses more of its budget keeps more); of two misses, the one
    nearest its budget."""
    if best is None:
        return this
    best_meets, meets = best[2] <= best[5], this[2] <= this[5]
    if meets != best_meets:
        return this if meets else best
    if meets:
        return this if this[0].objective > best[0].objective else best
    return this if this[2] / this[5] < best[2] / best[5] else best


def budget_use_note(rounds: list[dict], measured_ms: float, budget_ms: float, stop_reason: str) -> str:
    """Why a plan that meets its budget uses less than BUDGET_USE of it ('' when it uses
    enough or misses): the looser rounds missed the budget, the solver repeated a plan (the
    candidate widths are too coarse for a plan in between), or the rounds ran out."""
    if measured_ms > budget_ms or measured_ms >= BUDGET_USE * budget_ms:
        return ""
    looser_missed = [r["round"] for r in rounds if r["measured_ms"] > r["budget_ms"]]
    why = (f"round(s) {', '.join(map(str, looser_missed))} re-solved for more of the budget and missed it"
           if looser_missed else stop_reason or "no looser plan was found")
    return (f"the plan uses {measured_ms / budget_ms:.0%} of the budget {budget_ms:.3f} ms "
            f"(under {BUDGET_USE:.0%}): {why}")


def round_is_final(measured_ms: float, budget_ms: float, last_round: bool, repeated_plan: bool) -> bool:
    """Whether the re-solve rounds stop after this measurement: at the last round; when the
    plan meets its budget and uses at least BUDGET_USE of it; or when it meets it and the
    solver gave a plan already measured (loosening the target further changes nothing).
    A plan that uses less of its budget throws accuracy away: the next round loosens."""
    if last_round:
        return True
    if measured_ms > budget_ms:
        return False
    return measured_ms >= BUDGET_USE * budget_ms or repeated_plan


def _solve_input(prob, costs, target, cal, allow_blocks, opts, scoring) -> SolveInput:
    inp = SolveInput(prob, costs, target, cal.scale, cal.offset_ms, allow_blocks, opts.time_limit_s,
                     ms_per_melement=cal.ms_per_melement, objective=scoring.objective)
    if inp.offset_ms < 0:
        # An in-graph table's overhead constant is negative when the profiler's per-kernel cost
        # outweighs the dispatch cost (lut.store.fit_overhead). It is fitted on whole models; at
        # the smallest widths, with blocks removed, it must not predict ~0 ms and let an
        # impossible budget look feasible: it may take at most half of the smallest layer sum.
        inp.offset_ms = max(inp.offset_ms, -0.5 * inp.scale * min_raw_latency(inp))
    return inp


def _repaired(analysis: Analysis, plan: Plan, scoring: Scoring, progress: Progress,
              recovering: bool = False) -> onnx.ModelProto:
    """apply_plan, then the repair the options ask for (pruner.repair). `recovering`: recovery
    follows, so repair leaves out the inputs recovery holds out (its check stays fair)."""
    pruned = apply_plan(analysis, plan)
    mode = scoring.info["repair"]
    if mode == "none":
        return pruned
    from latprune.pruner.recover import RECOVER_SAMPLES
    from latprune.pruner.repair import REPAIR_SAMPLES, repair
    # recovering: the very inputs _recovered will read, less its held-out ones
    x = _wider_calibration(analysis, scoring, RECOVER_SAMPLES if recovering else REPAIR_SAMPLES)
    x = repair_inputs(analysis, x, recovering) if len(x) > len(scoring.calib_x) or recovering else x
    scoring.info["calibration_inputs"]["repair_samples"] = int(len(x))
    progress.stage(f"repairing the pruned layers ({mode}) from {len(x)} calibration inputs")
    return repair(analysis, plan, pruned, x, mode=mode, progress=progress.advance)


def repair_inputs(analysis: Analysis, x, recovering: bool = False):
    """The calibration inputs lsq repair fits on, of the wide set `x` (up to REPAIR_SAMPLES or
    RECOVER_SAMPLES of the file): without recovery's held-out inputs when recovery follows
    (pruner.recover.holdout_split of the same x), and no more than pruner.repair.repair_samples
    lets the dense activations hold."""
    from latprune.pruner.recover import holdout_split
    from latprune.pruner.repair import repair_samples

    if recovering and len(x) >= 2:
        x = x[np.sort(holdout_split(len(x))[1])]
    return x[:repair_samples(analysis, len(x))]


def _wider_calibration(analysis: Analysis, scoring: Scoring, samples: int):
    """Up to `samples` inputs of the calibration file, spread over it, when it holds more than
    the curves used (--calib-samples); otherwise the curves' own inputs. Repair and recovery
    gain from more inputs (the curves only rank cuts), so they read more of the file."""
    from latprune.calibration import NOISE, load_calibration
    from latprune.pruner.forward import input_shape

    source = scoring.calib_source
    if source is None or source == NOISE or len(scoring.calib_x) >= samples:
        return scoring.calib_x
    x = load_calibration(source, input_shape(analysis.model), samples)
    return x if len(x) > len(scoring.calib_x) else scoring.calib_x


def _recovered(analysis: Analysis, pruned: onnx.ModelProto, scoring: Scoring, opts: OptimizeOptions,
               progress: Progress) -> tuple[onnx.ModelProto, dict]:
    """The final pruned model after --recover-steps of label-free distillation from the dense model on
    the calibration inputs (pruner.recover; same graph, so the measured latency stands), and
    what the recovery did. It reads up to RECOVER_SAMPLES inputs of the calibration file.
    By default (--recover-steps not given) a model recovery cannot run (an operator the torch
    runner lacks) keeps its repaired weights with a warning; asked for explicitly, it fails."""
    from latprune.pruner.recover import RECOVER_SAMPLES, recover

    steps = opts.resolved_recover_steps()
    x = _wider_calibration(analysis, scoring, RECOVER_SAMPLES)
    progress.stage(f"label-free recovery: up to {steps} distillation steps on {len(x)} calibration inputs "
                   f"(at most {opts.recover_seconds:.0f} s; --recover-steps 0 turns it off)")
    try:
        model, rec = recover(analysis.model, pruned, x, steps, progress=progress.advance,
                             max_seconds=opts.recover_seconds)
    except Exception as exc:  # noqa: BLE001 (the default must not fail a run the repair finished)
        if opts.recover_steps is not None:
            raise
        note = f"label-free recovery skipped ({type(exc).__name__}: {exc}); the repaired weights are kept"
        progress.info(note)
        return pruned, {"skipped": note}
    progress.info(f"held-out distance to the dense outputs {rec.holdout_loss_before:.4f} -> "
                  f"{rec.holdout_loss_after:.4f} (step {rec.best_step} of {rec.steps} kept, {rec.seconds:.0f} s)")
    return model, rec.as_dict()


def _add_scoring(report: dict, scoring: Scoring) -> None:
    info = dict(scoring.info)
    report["warnings"] = info.pop("warnings") + report["warnings"]
    report["scoring"] = info


def _optimize_counts(model_path, opts, analysis, scoring, family, progress, wall0, measurer):
    """FLOPs or parameter budget: one solve over analytic costs, then apply, repair, measure."""
    from latprune.solver.budgets import analytic_costs, dense_count

    prob = analysis.problem
    kind, ratio = ("flops", opts.flops_ratio) if opts.flops_ratio is not None else ("params", opts.params_ratio)
    costs = analytic_costs(prob, kind)
    dense_total = dense_count(prob, kind)
    limit = ratio * dense_total
    allow = opts.remove_blocks == "yes" or (opts.remove_blocks == "auto" and scoring.objective.name == "distortion")
    if opts.remove_blocks == "auto" and prob.blocks and not allow:
        probe = SolveInput(prob, costs, limit, objective=scoring.objective, allow_block_removal=False)
        allow = min_raw_latency(probe) > limit
    inp = SolveInput(prob, costs, limit, allow_block_removal=allow, time_limit_s=opts.time_limit_s,
                     objective=scoring.objective)
    progress.stage(f"solving ({opts.method}) for {ratio:g}× the dense {kind}")
    plan = solve(inp, opts.method)
    pruned = _tag(_repaired(analysis, plan, scoring, progress, opts.resolved_recover_steps() > 0), family)
    save_model_atomic(pruned, measurer.work / "pruned.onnx")
    progress.stage("measuring pruned and dense side by side")
    timed = measurer.measure({"dense": Path(model_path), "pruned": measurer.work / "pruned.onnx"},
                             processes=opts.measure_processes)
    achieved = plan.predicted_ms  # scale 1, offset 0: the count itself
    unit = "MFLOPs" if kind == "flops" else "M parameters"
    report = {
        "model": opts.model_label or str(model_path), "dense_ms": timed["dense"].median_ms, "budget_ms": None,
        "predicted_ms": None, "measured_ms": timed["pruned"].median_ms,
        "measured_p90_ms": timed["pruned"].p90_ms, "meets_budget": achieved <= limit * (1 + 1e-9),
        "speedup": timed["dense"].median_ms / timed["pruned"].median_ms,
        "budget": {"kind": kind, "unit": unit, "ratio": ratio, "dense": dense_total, "limit": limit,
                   "achieved": achieved},
        "solver": {"method": plan.method, "seconds": plan.solve_seconds, "status": plan.status,
                   "gap": plan.gap, "objective": plan.objective},
        "threads": opts.threads, "step": opts.step,
        "blocks": {"removable": len(prob.blocks), "removed": plan.removed_blocks, "removal_allowed": allow},
        "widths": {str(k): v for k, v in plan.widths.items()},
        "notes": analysis.notes, "wall_seconds": time.perf_counter() - wall0, "warnings": [],
    }
    _add_scoring(report, scoring)
    return plan, pruned, report


CALIBRATION_RATIOS = (1.0, 0.75, 0.5)
# A plan measured under this share of its budget is re-solved with a looser target (issue 16).
BUDGET_USE = 0.9


def _calibration_points(model_path: Path, analysis: Analysis, table: LatencyTable,
                        measurer: _Measurer, on_model: Callable[[Path, float], None] | None = None,
                        ) -> list[tuple[float, float, float]]:
    """(layer sum ms, measured ms, overhead Melements) of the model at uniform keep-ratios
    1.0, 0.75 and 0.5, timed side by side in a fresh process. `on_model(path, measured ms)`
    hears each model while its file exists."""
    prob = analysis.problem
    work = measurer.work
    paths, widths_of = {}, {}
    for ratio in CALIBRATION_RATIOS:
        name = f"r{ratio}"
        if ratio == 1.0:
            paths[name], widths_of[name] = Path(model_path), {}
            continue
        widths_of[name] = uniform_widths(prob, ratio)
        save_model_atomic(apply_plan(analysis, _uniform_plan(prob, widths_of[name]), check=False),
                          work / f"{name}.onnx")
        paths[name] = work / f"{name}.onnx"
    timed = measurer.measure(paths, processes=1)
    for k, path in paths.items() if on_model else ():
        on_model(path, timed[k].median_ms)
    return [(predict_raw(prob, table, widths_of[k]), timed[k].median_ms, overhead_elements(prob, widths_of[k]))
            for k in paths]


def _uniform_plan(prob: Problem, widths: dict[int, int]) -> Plan:
    from latprune.solver.problem_costs import make_plan
    return make_plan(prob, widths, set(), "uniform")


def _report(model_path, prob, table, plan, dense, budget, measured_ms, p90_ms, cal,
            rounds, opts, n_measured, analysis, wall0) -> dict:
    full = {g.id: g.size for g in prob.groups}
    full.update(plan.widths)
    dense_w = {g.id: g.size for g in prob.groups}
    layers = []
    for layer in prob.layers:
        removed = layer.block is not None and layer.block in plan.removed_blocks
        ci, co = layer.c_in.width(full), layer.c_out.width(full)
        layers.append({
            "name": layer.name, "op": layer.spec.op, "block": layer.block, "removed": removed,
            "dense_c_in": layer.dense_c_in, "dense_c_out": layer.dense_c_out,
            "c_in": 0 if removed else ci, "c_out": 0 if removed else co,
            "dense_ms": layer_ms(table, layer, layer.c_in.width(dense_w), layer.c_out.width(dense_w)),
            "predicted_ms": 0.0 if removed else layer_ms(table, layer, ci, co),
        })
    meets = measured_ms <= budget
    dense_pred = cal.predict(predict_raw(prob, table), overhead_elements(prob))
    return {
        "model": opts.model_label or str(model_path),
        "device": table.fingerprint,
        "dense_ms": dense.median_ms,
        "dense_p90_ms": dense.p90_ms,
        "budget_ms": budget,
        "predicted_ms": plan.predicted_ms,
        "measured_ms": measured_ms,
        "measured_p90_ms": p90_ms,
        "meets_budget": meets,
        # the share of the budget the measured latency uses (re-solved upward below BUDGET_USE)
        "budget_share": measured_ms / budget,
        "speedup": dense.median_ms / measured_ms,
        "prediction_error": (plan.predicted_ms - measured_ms) / measured_ms,
        # The same prediction as a share of the dense model's, against the measured share (dense
        # timed alongside): free of the machine's speed drifting between calibration and check.
        "dense_predicted_ms": dense_pred,
        "ratio_error": (plan.predicted_ms / dense_pred) / (measured_ms / dense.median_ms) - 1 if dense_pred > 0 else None,
        "solver": {"method": plan.method, "seconds": plan.solve_seconds, "status": plan.status,
                   "gap": plan.gap, "objective": plan.objective},
        "rounds": rounds,
        "calibration": {"scale": cal.scale, "ms_per_melement": cal.ms_per_melement,
                        "offset_ms": cal.offset_ms, "points": cal.points},
        "threads": opts.threads,
        "step": opts.step,
        "groups": {"total": len(prob.groups), "prunable": sum(g.prunable for g in prob.groups),
                   "pruned": sum(1 for g in prob.groups if g.prunable and plan.widths.get(g.id, g.size) < g.size)},
        "blocks": {"removable": len(prob.blocks), "removed": plan.removed_blocks,
                   "removal_allowed": any(r["blocks_allowed"] for r in rounds)},
        "lut": {"path": opts.lut_label or str(table.path), "cells_measured_now": n_measured},
        "layers": layers,
        "notes": analysis.notes,
        "wall_seconds": time.perf_counter() - wall0,
        "warnings": [] if meets else [
            f"measured {measured_ms:.3f} ms misses the budget {budget:.3f} ms after "
            f"{len(rounds)} rounds; this is the fastest plan found"],
    }


def write_result(result: OptimizeResult, out_dir: Path) -> None:
    """Write pruned.onnx, plan.json, report.json, report.html and the backend's artifact
    (OpenVINO: pruned.xml + pruned.bin; TensorRT: pruned.engine) into out_dir; every file is
    written in a hidden folder first, so a failure leaves nothing half-written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".partial-"))
    try:
        save_model_atomic(result.pruned, tmp / "pruned.onnx")
        (tmp / "plan.json").write_text(result.plan.to_json())
        (tmp / "report.json").write_text(json.dumps(result.report, indent=1))
        from latprune.report_html import render_report_html
        (tmp / "report.html").write_text(render_report_html(result.report, json.loads(result.plan.to_json())),
                                         encoding="utf-8")
        names = ["pruned.onnx", "plan.json", "report.json", "report.html"]
        for artifact in result.artifacts:
            shutil.copyfile(artifact, tmp / artifact.name)
            names.append(artifact.name)
        for name in names:
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def predict_model(model_path: Path, lut_path: Path | None, threads: int = 1, timing: str = "in-graph",
                  backend: str = "ort-cpu", precision: str | None = None,
                  sequence_length: int | None = None, like: Path | None = None) -> dict:
    """Predicted latency (ms) of any model whose layer signatures the table covers, with a band
    and how each layer's value was found (lut.predict.predict_layers). `like`: the model whose
    calibration applies (the dense model another tool pruned this one from); default: the
    model's own family."""
    from latprune.pruner.model_io import dynamic_lengths

    model = load_model(model_path)
    data = Path(model_path).read_bytes()
    runtime = make_backend(backend, threads, precision)
    length = (sequence_length or DEFAULT_SEQUENCE_LENGTH) if dynamic_lengths(model) else None
    analysis = analyse(model, model_name=Path(model_path).stem, length=length)
    prob = analysis.problem
    table = open_table(lut_path, runtime, timing)
    try:
        missing = [layer.name for layer in prob.layers if not table.cells(layer.spec.signature())]
        if missing:
            raise InputError(
                f"the table lacks {len(missing)} of {len(prob.layers)} layers (e.g. {missing[0]}); "
                f"run: latprune profile {model_path} --lut {table.path} --timing {timing} --backend {runtime.name}")
        if not table.has_blocking():  # off-grid widths need the device's blocking rules
            table.set_blocking(runtime.blocking_rules()[0])
        static = analysis.static_model(model)
        kernels = _graph_kernels(runtime, table, analysis, static)
        if kernels is not None:  # the same compiled graph's reorders: no second session
            moved = [mel for cls, mel in kernels if cls in REORDER_CLASSES]
            reorders = (len(moved), sum(moved))
        else:
            reorders = runtime.layout_reorders(static) if table.blocking else None
        layers = predict_layers(prob, table, reorders=reorders, kernels=kernels)
        family = model_family(model, data)
        if like is not None:
            family = model_family(load_model(like), Path(like).read_bytes())
        calib = table.calibration(family)
        mel = overhead_elements(prob)
        predicted = whole_model_ms(layers, calib, mel, table.remainder(family, layers.kernel_ms),
                                   table.graph_speed(family))
        scale = calib.scale if calib is not None else 1.0
        return {"predicted_ms": predicted, "layer_sum_ms": layers.raw_ms, "overhead_melements": mel,
                "calibrated": calib is not None, "layers": len(prob.layers),
                "band_ms": [predicted - scale * layers.band_ms, predicted + scale * layers.band_ms],
                "cells": layers.found, "interpolated_layers": layers.interpolated,
                "extrapolated_layers": layers.outside, "blocking": table.blocking.describe(),
                "layout_reorders": {"ms": layers.reorder_ms, "from": layers.reorders_from,
                                    **({} if reorders is None else {"count": reorders[0], "melements": reorders[1]})},
                "outside_kernels": None if layers.outside_ms is None else {
                    "ms": layers.outside_ms, "count": sum(c not in REORDER_CLASSES for c, _ in kernels),
                    "unpriced_classes": layers.unpriced}}
    finally:
        table.close()


def _graph_kernels(runtime, table: LatencyTable, analysis: Analysis, static: onnx.ModelProto):
    """The compiled graph's kernels outside the layers (Backend.graph_kernels), or None where
    the table cannot price them (no in-graph kernel times) or the runtime cannot say."""
    if not table.kernel_prices():
        return None
    from latprune.ingraph_profile import layer_names

    return runtime.graph_kernels(static, layer_names(analysis.model, analysis.problem))


def in_graph_table(table: LatencyTable, runtime) -> bool:
    """Whether `table` holds cells timed in the graph by `runtime`'s profiler."""
    return table.fingerprint.get("timing") == runtime.timing_labels.get("in-graph")


def _profile_remainder(table: LatencyTable, analysis: Analysis, runtime, family: str) -> None:
    """Profile the uniform calibration models (CALIBRATION_RATIOS) in-graph beside the dense
    model, on the table's clock, and record their kernels and end to end: the time outside
    the kernels shrinks with the model (MobileNetV2: −0.12 ms at 0.5x, +0.01 ms dense), which
    design configurations near dense cannot show (LatencyTable.remainder)."""
    from latprune.ingraph_profile import profile_configs, reference_key

    prob = analysis.problem
    configs = [{} if ratio == 1.0 else uniform_widths(prob, ratio) for ratio in CALIBRATION_RATIOS]
    for timing in profile_configs(analysis, configs, runtime,
                                  phase_ms=table.reference_phase(reference_key(analysis.model))):
        if timing.kernels is not None:
            table.add_kernel_points(timing.kernels)
            table.add_remainder_point(family, timing.kernel_ms, timing.end_to_end_ms)


def graph_base_ms(path: Path, table: LatencyTable, runtime, family: str) -> float | None:
    """The model at `path` predicted in the compiled graph's terms at the table's machine speed
    (layer cells + every kernel outside them priced by class + the family's remainder: what
    whole_model_ms scales), or None where the graph's kernels cannot be priced."""
    model = load_model(path)
    analysis = analyse(model, model_name=Path(path).stem)
    kernels = _graph_kernels(runtime, table, analysis, analysis.static_model(model))
    if kernels is None:
        return None
    try:
        layers = predict_layers(analysis.problem, table, kernels=kernels)
    except KeyError:
        return None
    if layers.outside_ms is None:
        return None
    return layers.kernel_ms + (table.remainder(family, layers.kernel_ms) or 0.0)


def profile_model(model_path: Path, lut_path: Path | None, threads: int = 1, points: int = 5,
                  progress: Progress | None = None, timing: str = "in-graph", passes: int = 1,
                  refine: bool = False, backend: str = "ort-cpu", precision: str | None = None,
                  step: int | None = None, sequence_length: int | None = None) -> dict:
    """Fill the table with the cells this model needs (with `refine`, also where interpolation
    bends: see ensure_profiled), and record its calibration points."""
    progress = progress or Progress()
    runtime = make_backend(backend, threads, precision)
    model, data, analysis = prepare(model_path, step, backend=runtime, sequence_length=sequence_length)
    prob = analysis.problem
    table = open_table(lut_path, runtime, timing)
    try:
        family = model_family(model, data)
        if passes < 1:
            raise InputError(f"--passes must be at least 1, not {passes}")
        n = ensure_profiled(prob, table, runtime, points, progress, analysis, family, passes, refine,
                            fallback=True)
        if in_graph_table(table, runtime) and any(g.prunable for g in prob.groups):
            progress.stage("profiling the calibration models in-graph (the time outside the kernels by size)")
            _profile_remainder(table, analysis, runtime, family)
        progress.stage("measuring end to end for calibration")
        if any(g.prunable for g in prob.groups):
            work = Path(tempfile.mkdtemp(prefix="latprune-"))
            try:
                def graph_point(path: Path, measured_ms: float) -> None:
                    base = graph_base_ms(path, table, runtime, family)
                    if base is not None:  # the same model in the compiled graph's terms (whole_model_ms)
                        table.add_graph_calibration(family, base, measured_ms)

                points = _calibration_points(model_path, analysis, table, _Measurer(runtime, work, analysis.length),
                                             graph_point)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        else:
            points = [(predict_raw(prob, table), runtime.measure(analysis.static_model(model).SerializeToString()).median_ms,
                       overhead_elements(prob))]
        for raw, ms, mel in points:
            table.add_calibration(family, raw, ms, mel)
        return {"cells_measured": n, "cells_total": table.count(), "lut": str(table.path)}
    finally:
        table.close()
