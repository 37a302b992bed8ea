"""In-graph profiling of a model's latency table: pruned copies of the model at widths chosen
to cover the table's grid, timed kernel by kernel (profiler/ingraph.py), each kernel's time
stored as its layer's cell.

One profiled run of a model at chosen group widths measures a cell (c_in, c_out) of every
layer at once. `design_configs` picks group widths on the table's grid so that few runs cover
every cell the table lacks (greedy set cover over random candidates). This module wires the
pruner (graph names, surgery), the profiler and the table, as the pipeline does.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Callable

import numpy as np
import onnx

from latprune.lut.predict import group_grid, single_group
from latprune.profiler.ingraph import MIN_SECONDS, ConfigTiming, profile_interleaved
from latprune.types import LayerSpec, Problem

log = logging.getLogger(__name__)

# Ops ONNX Runtime fuses into the conv before them (conv+activation, NCHWc conv+sum+activation).
_FUSABLE = {"Relu", "Clip", "Add", "Sum", "BatchNormalization", "HardSigmoid", "HardSwish",
            "LeakyRelu", "Sigmoid", "Tanh"}


def layer_names(model: onnx.ModelProto, problem: Problem) -> dict[str, int]:
    """Node and tensor names that ONNX Runtime may give a layer's (fused) kernel -> layer index.
    The chain follows single consumers through BatchNorm, activations (SiLU pairs too) and
    residual Adds (pruner.ops.layers.kernel_chain)."""
    from latprune.pruner.model_io import initializer_arrays
    from latprune.pruner.ops import GraphView, handler_for
    from latprune.pruner.ops.layers import kernel_chain

    view = GraphView(model.graph, {}, initializer_arrays(model), {})
    by_name = {n.name: n for n in model.graph.node}
    names: dict[str, int] = {}
    for index, layer in enumerate(problem.layers):
        node = by_name.get(layer.name)
        if node is None:
            continue
        names.setdefault(node.name, index)
        names.setdefault(node.output[0], index)
        handler = handler_for(node)
        members = handler.layer_members(node, view) if hasattr(handler, "layer_members") else []
        for nxt in members + kernel_chain(node, view, _FUSABLE):  # conv -> (BN) -> (Add) -> activation
            names.setdefault(nxt.name, index)
            names.setdefault(nxt.output[0], index)
    return names


def config_cells(problem: Problem, widths: dict[int, int]) -> list[tuple[int, int, int]]:
    """(layer index, c_in, c_out) of every layer at the given group widths (dense elsewhere)."""
    full = {g.id: widths.get(g.id, g.size) for g in problem.groups}
    out = []
    for index, layer in enumerate(problem.layers):
        c_in, c_out = layer.c_in.width(full), layer.c_out.width(full)
        out.append((index, c_in, c_in if layer.spec.depthwise else c_out))
    return out


def design_configs(problem: Problem, needed: set[tuple[str, int, int]], grids: dict[int, list[int]],
                   max_configs: int = 400, candidates: int = 48, seed: int = 0) -> list[dict[int, int]]:
    """Group widths (each from its grid) for runs that together cover the `needed`
    (signature, c_in, c_out) cells: each step keeps the candidate that covers most cells still
    uncovered. Candidates are random, plus some aimed at one uncovered cell (its layer's
    single-group input and output set to the cell's widths), so rare combinations are reached
    too; stops when no candidate covers a new cell."""
    rng = np.random.default_rng(seed)
    sigs = [layer.spec.signature() for layer in problem.layers]
    todo = set(needed)
    configs: list[dict[int, int]] = []
    prunable = [g.id for g in problem.groups if g.prunable and grids.get(g.id)]
    # cell -> group settings that produce it (layers whose input/output spaces are one group each)
    aims: dict[tuple[str, int, int], list[dict[int, int]]] = defaultdict(list)
    for index, layer in enumerate(problem.layers):
        gin = single_group(layer.c_in)
        gout = gin if layer.spec.depthwise else single_group(layer.c_out)
        if gin not in grids or gout not in grids:
            continue
        for ci in grids[gin]:
            for co in ([ci] if layer.spec.depthwise else grids[gout]):
                if gin == gout and ci != co:
                    continue
                aims[(sigs[index], ci, co)].append({gin: ci, gout: co})
    while todo and len(configs) < max_configs:
        pool = []
        for _ in range(candidates):
            pool.append({gid: int(rng.choice(grids[gid])) for gid in prunable})
        aimable = sorted(c for c in todo if c in aims)  # sorted: set order varies with hash seeds
        for j in rng.permutation(len(aimable))[: candidates // 4]:
            options = aims[aimable[j]]
            widths = {gid: int(rng.choice(grids[gid])) for gid in prunable}
            widths.update(options[int(rng.integers(len(options)))])
            pool.append(widths)
        best, best_new = None, set()
        for widths in pool:
            new = {(sigs[i], ci, co) for i, ci, co in config_cells(problem, widths)} & todo
            if len(new) > len(best_new):
                best, best_new = widths, new
        if best is None:
            break
        configs.append(best)
        todo -= best_new
    return configs


def measured_cells(problem: Problem, timings: list[ConfigTiming]) -> set[tuple[str, int, int]]:
    """(signature, c_in, c_out) of every cell some run attributed a kernel time to."""
    sigs = [layer.spec.signature() for layer in problem.layers]
    return {(sigs[i], ci, co) for t in timings for i, ci, co in config_cells(problem, t.widths) if i in t.layer_ms}


def reference_key(model: onnx.ModelProto) -> str:
    """What a table keys the reference phase of in-graph profiles of `model` by (its hash)."""
    import hashlib

    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()[:16]


def first_channels_plan(problem: Problem, widths: dict[int, int]):
    """A plan keeping the first widths[g] channels of each group (which ones does not change
    the latency)."""
    from latprune.types import Plan

    kept = {gid: list(range(w)) for gid, w in widths.items() if w != problem.groups[gid].size}
    return Plan(kept=kept, widths=dict(widths), method="profile")


def profile_configs(analysis, configs: list[dict[int, int]], backend=1,
                    on_config: Callable[[ConfigTiming, float], None] | None = None,
                    min_seconds: float = MIN_SECONDS, seed: int = 0,
                    phase_ms: float | None = None) -> list[ConfigTiming]:
    """Profile pruned copies of the model at each of `configs` (group widths), in interleaved
    rounds beside the dense model (profiler.ingraph.profile_interleaved: times at the machine's
    median speed over the profile, or scaled to `phase_ms` of the dense model)."""
    from latprune.pruner.surgery import apply_plan

    prob = analysis.problem

    def build(widths: dict[int, int]) -> bytes:
        return analysis.static_model(apply_plan(analysis, first_channels_plan(prob, widths), check=False)
                                     ).SerializeToString()

    from latprune.profiler.backends import as_backend

    backend = as_backend(backend)
    return profile_interleaved(configs, build, analysis.static_model().SerializeToString(),
                               layer_names(analysis.model, prob), backend.threads, min_seconds=min_seconds,
                               on_config=on_config, seed=seed, phase_ms=phase_ms, backend=backend)



CLOCK_KEY = "clock/conv3x3-64-28/v1"


def clock_model() -> bytes:
    """The table's clock: one 3x3 conv, 64 -> 64 channels at 28x28 (~0.5 ms on one core),
    the same bytes on every machine and every run (profiler.layers.layer_model, seed 0)."""
    from latprune.profiler.layers import layer_model

    spec = LayerSpec("Conv", [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], False, [28, 28], 1, activation="Relu")
    return layer_model(spec, 64, 64).SerializeToString()


def anchored_phase(table, analysis, backend=1, min_seconds: float = MIN_SECONDS) -> float:
    """The kernel time (ms) the in-graph cells of a model new to `table` are scaled to: its
    dense model's kernel time, timed in interleaved rounds beside the table's clock
    (clock_model), times (the clock's first recorded time / its time in these rounds). Cells
    of different models profiled into one table at different moments then share one speed of
    the machine: without the clock each model was scaled to its own first profile's phase, and
    a model profiled in one of this VM's slow phases read 17% slow against the others
    (RegNetX, issue 15). The first model of a table records the clock."""
    from latprune.profiler.backends import as_backend

    backend = as_backend(backend)
    [clock] = profile_interleaved([None], lambda _: clock_model(), analysis.static_model().SerializeToString(),
                                  {}, backend.threads, min_seconds=min_seconds, backend=backend)
    clock_ms = clock.kernel_ms
    reference_ms = clock.phase_ms  # the dense model's kernel time in the same rounds
    first = table.reference_phase(CLOCK_KEY)
    if first is None:
        table.set_reference_phase(CLOCK_KEY, clock_ms)
        return reference_ms
    return reference_ms * first / clock_ms


# A model new to a table is scaled to the table's own cells (table_anchor) when the cells the
# table held before its profile give at least this share of its runs' layer time, from at
# least TABLE_ANCHOR_LAYERS layers; otherwise to the table's clock (anchored_phase).
TABLE_ANCHOR_SHARE = 0.2
TABLE_ANCHOR_LAYERS = 3


def known_layer_ms(problem: Problem, table, configs: list[dict[int, int]]) -> list[dict[int, float]]:
    """For each of `configs` (group widths): layer index -> the ms `table` gives that layer now,
    for the layers whose cell it measured or interpolates between measured cells (not
    extrapolated, not modelled from the other regime)."""
    sigs = [layer.spec.signature() for layer in problem.layers]
    out = []
    for widths in configs:
        known = {}
        for index, c_in, c_out in config_cells(problem, widths):
            try:
                ms, how = table.lookup_detail(sigs[index], c_in, c_out)
            except KeyError:
                continue
            if how in ("measured", "interpolated") and ms > 0:
                known[index] = ms
        out.append(known)
    return out


def table_anchor(known: list[dict[int, float]], timings: list[ConfigTiming]) -> float | None:
    """The factor that brings `timings` (one per config of `known`, same order) to the scale of
    the table's earlier cells: the median over runs of (the table's ms / the run's ms) summed
    over the layers both have, or None where those layers give under TABLE_ANCHOR_SHARE of
    the runs' layer time (median) or number under TABLE_ANCHOR_LAYERS.

    Why not the clock alone: on this VM the slow phases hit a model's memory-bound kernels
    (grouped and depthwise convs, large activations) much harder than the clock's small 3x3
    conv, whose data stay in cache: a RegNetX configuration anchored on the clock read 35%
    slow against the rest of the table while its runs agreed with the table's cells to 3%
    (issue 15). The model's own runs, set against cells of the same kernels, share the phase
    whatever it slows."""
    ratios, shares, layers = [], [], []
    for table_ms, timing in zip(known, timings):
        common = [i for i in table_ms if timing.layer_ms.get(i, 0) > 0]
        measured = sum(timing.layer_ms[i] for i in common)
        total = sum(timing.layer_ms.values())
        if not common or total <= 0:
            shares.append(0.0)
            layers.append(0)
            continue
        ratios.append(sum(table_ms[i] for i in common) / measured)
        shares.append(measured / total)
        layers.append(len(common))
    if not ratios or np.median(shares) < TABLE_ANCHOR_SHARE or np.median(layers) < TABLE_ANCHOR_LAYERS:
        return None
    return float(np.median(ratios))


def profile_in_graph(table, analysis, cells: list[tuple[LayerSpec, int, int]], backend=1,
                     grid_points: int = 5, progress: Callable[[int, int], None] | None = None,
                     remeasure: bool = False, passes: int = 1,
                     min_seconds: float = MIN_SECONDS,
                     note: Callable[[str], None] | None = None) -> tuple[int, list[ConfigTiming]]:
    """Measure the (spec, c_in, c_out) `cells` the table lacks (all of them with `remeasure`)
    by profiling pruned copies of the model (profile_configs) chosen by design_configs, once
    per pass (each pass its own design, so a cell is measured in `passes` different models
    and moments; a cell's value is the median). Cells are committed after each batch of runs
    (profiler.ingraph.BATCH models: an interrupted profile resumes, losing at most one batch),
    and scaled to one phase of the machine: the first in-graph profile of a model in a table
    records its dense model's kernel time on the table's clock (anchored_phase), or, where
    the table's earlier cells cover enough of its layers, on those cells (table_anchor:
    table.set_reference_phase, keyed by the model's hash), and every profile of it (the first,
    resumed, refined, re-timed) scales its batches to it, so a machine that drifted in between
    does not leave cells of two scales side by side, within a model or across models. Cells no
    run could reach are left out (the caller times them alone). The runs draw each group's widths from its grid
    plus any width the cells ask of it (refined grids: lut.predict.refine_widths). Returns
    (cells stored, the runs). `backend`: the runtime whose profiler times the runs (an int:
    ONNX Runtime on this CPU with that many threads). `note(message)` hears which scale a
    model new to the table was put on.

    On this VM one in-graph measurement of a cell lies 0.5-0.7% (median) and 3.5-3.7% (p95)
    from the median of 3 (bench/lut_fidelity.py); passes average over designs and moments.
    """
    prob = analysis.problem
    needed = {(spec.signature(), ci, co) for spec, ci, co in cells
              if remeasure or not table.has(spec.signature(), ci, co)}
    if not needed:
        return 0, []
    grids = {g.id: set(group_grid(g, grid_points)) for g in prob.groups if g.prunable}
    asked: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for sig, ci, co in needed:
        asked[sig].append((ci, co))
    for layer in prob.layers:  # widths off the grid that a needed cell sets on a group's axis
        for space, axis in ((layer.c_in, 0), (layer.c_out, 1)):
            gid = single_group(space)
            if gid in grids:
                size = prob.groups[gid].size  # any width the group can take (fallback cells are off the step)
                grids[gid] |= {cell[axis] for cell in asked.get(layer.spec.signature(), ()) if 1 <= cell[axis] <= size}
    grids = {gid: sorted(ws) for gid, ws in grids.items()}
    configs = [w for p in range(max(1, passes)) for w in design_configs(prob, needed, grids, seed=p)]
    sigs = [layer.spec.signature() for layer in prob.layers]
    done = 0  # models profiled
    samples: dict[tuple[str, int, int], list[float]] = defaultdict(list)

    def cell_values(timing: ConfigTiming) -> dict[tuple[str, int, int], float]:
        values: dict[tuple[str, int, int], list[float]] = defaultdict(list)
        for index, ci, co in config_cells(prob, timing.widths):
            if index in timing.layer_ms:
                values[(sigs[index], ci, co)].append(timing.layer_ms[index])
        return {k: float(np.median(v)) for k, v in values.items() if k in needed}

    def store(timing: ConfigTiming, scale: float) -> None:
        nonlocal done
        for key, ms in cell_values(timing).items():
            samples[key].append(ms * scale)
            table.put(*key, float(np.median(samples[key])), timing.runs * len(samples[key]))
        done += 1
        if progress:
            progress(done, len(configs))

    reference = reference_key(analysis.model)
    phase_ms = table.reference_phase(reference)
    known = None
    if phase_ms is None:  # a model new to the table: its phase on the table's clock, for now
        known = known_layer_ms(prob, table, configs)  # before this profile adds any cell
        phase_ms = anchored_phase(table, analysis, backend, min_seconds)
        table.set_reference_phase(reference, phase_ms)
    timings = profile_configs(analysis, configs, backend, store, min_seconds, phase_ms=phase_ms)
    factor = table_anchor(known, timings) if known is not None else None
    if factor is not None:  # then on the table's own cells, where they cover enough of it
        from latprune.profiler.ingraph import rescale

        message = (f"a model new to this table: its cells are scaled to the table's earlier cells "
                   f"(x{factor:.3f} of the table clock's scale)")
        log.info(message)
        if note:
            note(message)
        for timing in timings:
            rescale(timing, factor)
        table.set_reference_phase(reference, phase_ms * factor, replace=True)
    final: dict[tuple[str, int, int], list[float]] = defaultdict(list)
    runs: dict[tuple[str, int, int], int] = defaultdict(int)
    for timing in timings:  # the final scale (timings come back rescaled)
        for key, ms in cell_values(timing).items():
            final[key].append(ms)
            runs[key] += timing.runs
    for key, values in final.items():
        table.put(*key, float(np.median(values)), runs[key])
    from latprune.lut.predict import blocked_overhead_elements, layout_boundaries

    for timing in timings:  # what layout reorders cost per element (issue 15)
        melements = layout_boundaries(prob, table, timing.widths)
        if melements > 0:
            table.add_reorder_point(timing.reorder_ms, melements, "layers")
        melements = blocked_overhead_elements(prob, table, timing.widths)
        if melements > 0:
            table.add_reorder_point(timing.overhead_reorder_ms, melements, "overhead")
        if timing.reorder_melements is not None and timing.reorder_count > 0:
            table.add_reorder_point(timing.reorder_ms + timing.overhead_reorder_ms, timing.reorder_melements,
                                    "graph", timing.reorder_count)
        if timing.kernels:  # each kernel outside the layers, by class and size (lut.predict.price_kernels)
            table.add_kernel_points(timing.kernels)
    return len(final), timings
