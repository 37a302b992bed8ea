"""What a Problem needs from the table, and predictions from it.

A layer's latency is table.lookup(signature, c_in, c_out) with c_in/c_out the widths of its
input and output spaces. A whole model's *raw* prediction is the sum over its layers; the
*calibrated* prediction is scale·raw + offset, fitted from end-to-end measurements of the
same model family (what runs outside the conv/gemm layers: pooling, adds, copies).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from latprune.types import Layer, LayerSpec, Problem, Space
from latprune.lut.blocking import AxisRule, BlockingRules
from latprune.lut.store import Calibration, LatencyTable


def space_values(problem: Problem, space: Space) -> list[int]:
    """Every width the space can take under the groups' candidate widths (ascending)."""
    values = {space.fixed}
    for gid, mult in space.terms:
        cands = problem.groups[gid].candidate_widths
        values = {v + mult * w for v in values for w in cands}
    return sorted(values)


def _sample(values: list[int], points: int) -> list[int]:
    if len(values) <= points:
        return list(values)
    idx = np.unique(np.round(np.linspace(0, len(values) - 1, points)).astype(int))
    return [values[i] for i in idx]


def group_grid(group, points: int = 5) -> list[int]:
    """The widths of `group` that the table measures (`points` of its candidate widths,
    always the smallest and the dense width)."""
    return _sample(sorted(group.candidate_widths or [group.size]), points)


def single_group(space: Space) -> int | None:
    """The group a space is exactly the width of, or None (fixed, concat, scaled)."""
    if space.fixed == 0 and len(space.terms) == 1 and space.terms[0][1] == 1:
        return space.terms[0][0]
    return None


def coupled_group(layer: Layer) -> tuple[int, int, int, int, int] | None:
    """(group, fixed in, mult in, fixed out, mult out) when one group sets both of a layer's
    widths (a grouped conv pruned by whole groups: c_in = mult_in·w, c_out = mult_out·w), so
    only the cells along that line occur; None otherwise."""
    if len(layer.c_in.terms) == 1 and len(layer.c_out.terms) == 1 \
            and layer.c_in.terms[0][0] == layer.c_out.terms[0][0]:
        (gid, m_in), (_, m_out) = layer.c_in.terms[0], layer.c_out.terms[0]
        return gid, layer.c_in.fixed, m_in, layer.c_out.fixed, m_out
    return None


def _axis_values(problem: Problem, space: Space, points: int, extra: dict[int, list[int]] | None) -> list[int]:
    values = _sample(space_values(problem, space), points)
    gid = single_group(space)
    if extra and gid is not None and extra.get(gid):
        values = sorted(set(values) | set(extra[gid]))
    return values


def layer_grid(problem: Problem, layer: Layer, points: int = 5,
               extra: dict[int, list[int]] | None = None) -> list[tuple[int, int]]:
    """The (c_in, c_out) cells the table measures for `layer`: up to `points` widths per axis
    (always the smallest and the dense width), plus the `extra` widths of the group an axis is
    (refine_widths), a diagonal for depthwise, and the line of widths one group sets for a
    layer whose input and output are that group (coupled_group)."""
    ins = _axis_values(problem, layer.c_in, points, extra)
    if layer.spec.depthwise:
        return [(c, c) for c in ins]
    coupled = coupled_group(layer)
    if coupled is not None:
        gid, f_in, m_in, f_out, m_out = coupled
        widths = sorted(set(group_grid(problem.groups[gid], points)) | set((extra or {}).get(gid, [])))
        return [(f_in + m_in * w, f_out + m_out * w) for w in widths]
    outs = _axis_values(problem, layer.c_out, points, extra)
    return [(i, o) for i in ins for o in outs]


def required_cells(problem: Problem, points: int = 5, extra: dict[int, list[int]] | None = None,
                   rules: BlockingRules | None = None) -> list[tuple[LayerSpec, int, int]]:
    """The (spec, c_in, c_out) grid the table must hold for this problem (layer_grid of every
    layer, each cell once), plus with `rules` the fallback cells (fallback_grid)."""
    cells: dict[tuple[str, int, int], tuple[LayerSpec, int, int]] = {}
    for layer in problem.layers:
        grid = layer_grid(problem, layer, points, extra)
        if rules:
            grid = grid + fallback_grid(problem, layer, rules)
        for ci, co in grid:
            cells[(layer.spec.signature(), ci, co)] = (layer.spec, ci, co)
    return list(cells.values())


FALLBACK_POINTS = 3  # widths per axis of a layer's fallback cells


def _fallback_width(width: int, rule: AxisRule) -> int | None:
    """A width next to `width` that runs the fallback kernel (itself if it already does);
    None where neither does (a width the direct kernel runs, or 1)."""
    for w in (width, width - 1):
        if w >= 1 and not rule.aligned(w):
            return w
    return None


def fallback_grid(problem: Problem, layer: Layer, rules: BlockingRules,
                  points: int = FALLBACK_POINTS) -> list[tuple[int, int]]:
    """Cells of `layer` in the fallback regime of `rules` (lut/blocking.py) that a table must
    hold to predict widths off the kernel's alignment: for each axis that is one group's
    width and has an alignment, `points` of its widths moved one channel off it, against
    `points` widths of the other axis (a depthwise layer: its diagonal); and where the input
    axis is one prunable group and the rule has a direct kernel, cells of it (a quarter, half
    and one under its bound: the probe's line from one small layer is no substitute for the
    layer's own, MobileNetV2 read +10% on a probe whose 1x1 line sat 20% high). Empty where
    every width runs the fast kernel, or the layer's widths are fixed or set by several
    groups."""
    rin, rout = rules.axes(layer.spec)
    cells: set[tuple[int, int]] = set()
    ins = _sample(space_values(problem, layer.c_in), points)
    if layer.spec.depthwise:
        if rin.align > 1 and single_group(layer.c_in) is not None:
            cells |= {(w, w) for w in (_fallback_width(v, rin) for v in ins) if w}
        return sorted(cells)
    if coupled_group(layer) is not None or rules.groups(layer.spec, layer.dense_c_in) > 1:
        return []  # grouped: a width one channel off is no longer whole groups
    outs = _sample(space_values(problem, layer.c_out), points)
    if rin.align > 1 and single_group(layer.c_in) is not None and len(ins) > 1:
        cells |= {(w, co) for w in (_fallback_width(v, rin) for v in ins) if w for co in outs}
    if rout.align > 1 and single_group(layer.c_out) is not None and len(outs) > 1:
        cells |= {(ci, w) for w in (_fallback_width(v, rout) for v in outs) if w for ci in ins}
    gid = single_group(layer.c_in)
    if rin.direct_below > 1 and gid is not None and problem.groups[gid].prunable:
        size = problem.groups[gid].size  # any width under the block can be reached by pruning
        direct = sorted({w for w in (max(1, rin.direct_below // 4), rin.direct_below // 2, rin.direct_below - 1)
                         if 1 <= w < size})
        cells |= {(w, co) for w in direct for co in outs}
    return sorted(cells)


def plateau_widths(problem: Problem, rules: BlockingRules, max_candidates: int = 16) -> dict[int, list[int]]:
    """Candidate widths where latency steps (`--step 1`, issue 15): for each prunable group the
    widths that are the widest of their cost plateau for every layer axis the group sets
    alone (aligned and a multiple of the pad block under `rules`: a narrower width costs as
    much, or runs a fallback kernel), plus its full size; at most `max_candidates`, evenly
    spread, always the smallest and the full size. Axes with no blocking leave every width.
    An axis several groups set together (a Concat, a zero-padded residual stream) is aligned
    when each group's share of it is: each share (0 fixed channels) is held to the rule, so no
    combination of candidates lands the sum off the block."""
    axes: dict[int, list[tuple[int, int, AxisRule]]] = {}
    for layer in problem.layers:
        rin, rout = rules.axes(layer.spec)
        for space, rule in ((layer.c_in, rin), (layer.c_out, rout)):
            if not space.terms or (rule.align <= 1 and rule.block <= 1 and not rule.direct_below):
                continue
            for gid, mult in space.terms:
                axes.setdefault(gid, []).append((space.fixed if len(space.terms) == 1 else 0, mult, rule))
    out = {}
    for g in problem.groups:
        if not g.prunable or len(g.candidate_widths) <= 1:
            continue
        need = axes.get(g.id, [])
        widths = [w for w in range(1, g.size)  # aligned and unpadded (a direct width is its own top)
                  if all(r.aligned(f + m * w) and r.pad(f + m * w) == f + m * w for f, m, r in need)] + [g.size]
        out[g.id] = _sample(widths, max_candidates)
    return out


def needs_fallback(problem: Problem, rules: BlockingRules) -> bool:
    """Whether some group may take a width (below its full size) that runs a fallback or a
    direct kernel under `rules`: then a plan can reach those cells and the table must hold
    them."""
    if not rules:
        return False
    for layer in problem.layers:
        rin, rout = rules.axes(layer.spec)
        for space, rule in ((layer.c_in, rin), (layer.c_out, rout)):
            if (rule.align > 1 or rule.direct_below) and space.terms:
                values = space_values(problem, space)
                if any(not rule.aligned(v) or rule.is_direct(v) for v in values[:-1]):
                    return True
    return False


# Refinement: where leave-one-out linear interpolation misses the measured grid cells at a
# group's grid width by more than REFINE_ERROR (relative, median over a layer's lines there;
# cells under REFINE_MIN_MS are ignored), the intervals on both sides get their midpoint. The
# held-out target is 3%; one in-graph measurement lies 0.5-0.7% (median) from the median of 3
# (bench/lut_fidelity.py). On a ResNet-50 table the 22 of 200 held-out cells next to a width
# flagged at 5% had 10.4% p95 interpolation error, the rest 8.0%; at 3%: 58 cells, 10.5% vs
# 5.2%, but twice the cells (+429 to 497). At 5% it added 279 cells to ResNet-50's 497 and did
# not change the held-out or whole-model errors, so profiling refines only on request
# (`latprune profile --refine`; NOTES.md).
REFINE_ERROR = 0.05
REFINE_MIN_MS = 0.02


def refine_widths(problem: Problem, table: LatencyTable, points: int = 5,
                  threshold: float = REFINE_ERROR) -> dict[int, list[int]]:
    """Group widths to add to the grid where interpolation is uncertain.

    For every layer and axis that is one group's width, and every line of the table along that
    axis (the other axis at one of its grid widths), each interior grid width is predicted
    from its two neighbours alone. Where the median miss over a layer signature's lines through
    a group's grid width is above `threshold`, the latency bends there, and the candidate
    widths nearest the midpoints of the two intervals around it are added (the median over
    the rows: one noisy cell must not refine a group). Only the base grid is checked, so once
    those cells are measured repeated calls add nothing. Returns {group id: added widths};
    empty where the table is smooth or lacks the grid cells."""
    misses: dict[tuple[str, int, int, int, int, int], list[float]] = {}
    for layer in problem.layers:
        sig = layer.spec.signature()
        cells = {(ci, co): ms for ci, row in table.cells(sig).items() for co, ms in row}
        if not cells:
            continue
        ins = _sample(space_values(problem, layer.c_in), points)
        if layer.spec.depthwise:
            lines = [(layer.c_in, 0, [(c, c) for c in ins])]
        else:
            outs = _sample(space_values(problem, layer.c_out), points)
            lines = [(layer.c_out, 1, [(ci, co) for co in outs]) for ci in ins]
            lines += [(layer.c_in, 0, [(ci, co) for ci in ins]) for co in outs]
        for space, axis, line in lines:
            gid = single_group(space)
            if gid is None:
                continue
            for a, b, c in zip(line, line[1:], line[2:]):
                if not all(x in cells for x in (a, b, c)) or cells[b] < REFINE_MIN_MS:
                    continue
                xa, xb, xc = a[axis], b[axis], c[axis]
                guess = cells[a] + (cells[c] - cells[a]) * (xb - xa) / (xc - xa)
                misses.setdefault((sig, axis, gid, xa, xb, xc), []).append(abs(guess - cells[b]) / cells[b])
    extra: dict[int, set[int]] = {}
    for (_, _, gid, xa, xb, xc), errs in misses.items():
        if float(np.median(errs)) <= threshold:
            continue
        cands = sorted(problem.groups[gid].candidate_widths or [])
        for lo, hi in ((xa, xb), (xb, xc)):
            inside = [w for w in cands if lo < w < hi]
            if inside:
                extra.setdefault(gid, set()).add(min(inside, key=lambda w: abs(w - (lo + hi) / 2)))
    return {gid: sorted(ws) for gid, ws in extra.items()}


def missing_cells(problem: Problem, table: LatencyTable, points: int = 5,
                  extra: dict[int, list[int]] | None = None, fallback: bool = False):
    """The required cells (with `fallback`, the fallback cells of the table's blocking rules
    too) that the table lacks."""
    rules = table.blocking if fallback else None
    return [c for c in required_cells(problem, points, extra, rules) if not table.has(c[0].signature(), c[1], c[2])]


def coverage(problem: Problem, table: LatencyTable, points: int = 5) -> dict:
    """How much of `problem`'s grid the table holds: per layer the grid cells measured, and
    whether the layer can be predicted at all (any cell of its signature)."""
    layers = []
    for layer in problem.layers:
        sig = layer.spec.signature()
        grid = layer_grid(problem, layer, points)
        have = sum(table.has(sig, ci, co) for ci, co in grid)
        layers.append({"layer": layer.name, "op": layer.spec.op, "kernel": layer.spec.kernel,
                       "depthwise": layer.spec.depthwise, "grid_cells": len(grid), "measured": have,
                       "predictable": bool(table.cells(sig))})
    grid_total = sum(r["grid_cells"] for r in layers)
    measured = sum(r["measured"] for r in layers)
    return {"layers": layers, "grid_cells": grid_total, "measured": measured,
            "share": measured / grid_total if grid_total else 1.0,
            "unpredictable_layers": sum(not r["predictable"] for r in layers)}


@dataclass
class LayerCost:
    """Latency (ms) of one layer over its input widths × output widths."""

    in_values: list[int]
    out_values: list[int]
    ms: np.ndarray  # shape (len(in_values), len(out_values)); depthwise: diagonal meaningful


def layer_costs(problem: Problem, table: LatencyTable) -> list[LayerCost]:
    costs = []
    for layer in problem.layers:
        sig = layer.spec.signature()
        ins = space_values(problem, layer.c_in)
        outs = space_values(problem, layer.c_out)
        if layer.spec.depthwise:
            outs = ins
            ms = np.diag([table.lookup(sig, c, c) for c in ins])
        else:
            ms = np.array([[table.lookup(sig, i, o) for o in outs] for i in ins])
        costs.append(LayerCost(ins, outs, ms))
    return costs


def layer_ms(table: LatencyTable, layer: Layer, c_in: int, c_out: int) -> float:
    if layer.spec.depthwise:
        return table.lookup(layer.spec.signature(), c_in, c_in)
    return table.lookup(layer.spec.signature(), c_in, c_out)


def predict_raw(problem: Problem, table: LatencyTable, widths: dict[int, int] | None = None,
                removed_blocks: list[int] | tuple = ()) -> float:
    """Sum of layer latencies (ms) at the given group widths (dense when omitted), plus the
    layout reorders between blocked and fallback layers (layout_boundaries; none where every
    layer runs its blocked kernel, as at multiples of the step)."""
    return predict_layers(problem, table, widths, removed_blocks).raw_ms


def _out_hw(spec: LayerSpec) -> list[int]:
    hw = []
    for i, size in enumerate(spec.input_hw):
        k, s = spec.kernel[i], spec.stride[i]
        d = spec.dilation[i] if spec.dilation else 1
        pads = spec.pads[i] + spec.pads[i + len(spec.input_hw)] if spec.pads else 0
        hw.append(max(1, (size + pads - d * (k - 1) - 1) // s + 1))
    return hw


def layout_boundaries(problem: Problem, table: LatencyTable, widths: dict[int, int] | None = None,
                      removed_blocks: list[int] | tuple = ()) -> float:
    """Millions of elements that layout reorders move between blocked and fallback convs at
    the given widths (issue 15): a conv running its fallback (plain-layout) kernel reads its
    input through a reorder when a conv writing that input runs blocked, and writes its
    output through one when a conv reading it runs blocked (neighbours: convs sharing a
    channel group of the tensor); a conv running the direct kernel reads its input through
    one from a blocked producer and writes blocked. 0 without blocking rules or fallback
    convs."""
    if not table.blocking:
        return 0.0
    full = {g.id: (widths or {}).get(g.id, g.size) for g in problem.groups}
    regime: dict[int, str] = {}  # direct convs read their (narrow) input plain and write blocked
    producers: dict[int, list[int]] = {}
    consumers: dict[int, list[int]] = {}
    for i, layer in enumerate(problem.layers):
        if layer.spec.op != "Conv" or (layer.block is not None and layer.block in removed_blocks):
            continue
        ci, co = layer.c_in.width(full), layer.c_out.width(full)
        # an axis that never changes is left out (as store._regime does)
        regime[i] = table.blocking.regime(layer.spec, ci, ci if layer.spec.depthwise else co,
                                          not layer.c_in.terms, not layer.c_out.terms)
        for gid, _ in layer.c_out.terms:
            producers.setdefault(gid, []).append(i)
        for gid, _ in layer.c_in.terms:
            consumers.setdefault(gid, []).append(i)
    elements = 0.0
    for i, kernel in regime.items():
        if kernel == "fast":
            continue
        layer = problem.layers[i]  # reads plain (fallback or direct): a reorder after a blocked producer
        if any(regime[j] != "fallback" for gid, _ in layer.c_in.terms for j in producers.get(gid, ()) if j != i):
            elements += layer.c_in.width(full) * math.prod(layer.spec.input_hw)
        if kernel == "fallback" and any(regime[j] == "fast" for gid, _ in layer.c_out.terms
                                        for j in consumers.get(gid, ()) if j != i):
            elements += layer.c_out.width(full) * math.prod(_out_hw(layer.spec))
    return elements / 1e6


def blocked_overhead_elements(problem: Problem, table: LatencyTable, widths: dict[int, int] | None = None,
                              removed_blocks: list[int] | tuple = ()) -> float:
    """Millions of elements written outside the layers (overhead_elements) in channel groups
    whose width the convs' input rule aligns, i.e. tensors the runtime keeps in its blocked
    layout: an operator that runs only in plain layout next to them (a squeeze-excite Mul
    beside ONNX Runtime's NCHWc convs) reads and writes them through reorders, which an
    unaligned (already plain) tensor does not need. 0 without blocking rules."""
    if not table.blocking:
        return 0.0
    rule = table.blocking.rules.get("conv", {}).get("in")
    if rule is None or rule.align <= 1:
        return 0.0
    full = {g.id: (widths or {}).get(g.id, g.size) for g in problem.groups}
    total = sum(mult * full[gid] for o in problem.overheads
                if o.block is None or o.block not in removed_blocks
                for gid, mult in o.space.terms
                if full[gid] % rule.align == 0 and not rule.is_direct(full[gid]))
    return total / 1e6


def reorder_ms(problem: Problem, table: LatencyTable, widths: dict[int, int] | None = None,
               removed_blocks: list[int] | tuple = ()) -> float:
    """The layout reorders' ms at the given widths: the table's measured costs per element
    (table.reorder_cost) times layout_boundaries (reorders for fallback convs) and times
    blocked_overhead_elements (reorders for other operators)."""
    if not table.blocking:
        return 0.0
    total = 0.0
    for kind, count in (("layers", layout_boundaries), ("overhead", blocked_overhead_elements)):
        cost = table.reorder_cost(kind)
        if cost:
            total += cost * count(problem, table, widths, removed_blocks)
    return total


# Relative uncertainty of one layer's value by how the table found it (predict_layers' band,
# summed over layers: errors of neighbouring cells go together): a measured cell repeats
# within 3.5% (p95 of one in-graph measurement against the median of 3, bench/lut_fidelity.py),
# an interpolated one within the held-out interpolation error's p95 (~5-8%); outside the
# measured widths and across regimes (a probed penalty, not a cell of the layer) much less
# is known.
UNCERTAINTY = {"measured": 0.035, "interpolated": 0.07, "extrapolated": 0.15, "modelled": 0.30}


@dataclass
class LayerSum:
    """A model's layer latencies from the table: their sum (ms), the band (± ms, before
    calibration) and how each layer's value was found (lookup_detail)."""

    raw_ms: float
    band_ms: float
    found: dict[str, int]
    interpolated: list[str]
    outside: list[str]  # "name (c_in x c_out, how)" of extrapolated or modelled layers
    reorder_ms: float = 0.0  # the layout reorders' part of raw_ms
    reorders_from: str = "modelled"  # "graph": counted in the runtime's compiled graph
    # ms of the compiled graph's other kernels outside the layers, each priced by its class
    # (price_kernels; not in raw_ms), or None where the overhead fit prices that time instead
    outside_ms: float | None = None
    unpriced: list[str] = field(default_factory=list)  # kernel classes no in-graph run timed

    @property
    def kernel_ms(self) -> float:
        """Every kernel of the run: layers, reorders and the priced kernels outside them (ms;
        what LatencyTable.remainder takes)."""
        return self.raw_ms + (self.outside_ms or 0.0)


def whole_model_ms(layers: LayerSum, calibration: "Calibration | None", melements: float,
                   remainder_ms: float | None, graph_speed: tuple[float, float, float] | None = None) -> float:
    """Whole-model prediction (ms) from predict_layers' sum. With the graph's kernels priced
    (layers.outside_ms), the base is every kernel (layers, reorders, the priced kernels
    outside them) plus the time outside all kernels (LatencyTable.remainder), and the
    prediction max(scale · base + offset, floor · base) with `graph_speed`
    (LatencyTable.graph_speed: fitted on the same terms), else the calibration's scale times
    the base. Without them: the calibration's overhead fit over the overhead elements
    (calibrated)."""
    if layers.outside_ms is None:
        return calibrated(layers.raw_ms, calibration, melements)
    base = layers.kernel_ms + (remainder_ms or 0.0)
    if graph_speed is not None:
        scale, offset, floor = graph_speed
        return max(scale * base + offset, floor * base)
    return (calibration.scale if calibration is not None else 1.0) * base


def graph_reorder_ms(table: LatencyTable, reorders: tuple[int, float]) -> float | None:
    """ms of the layout reorders a runtime's compiled graph holds, (count, millions of
    elements) from Backend.layout_reorders, priced by the table's fit over its in-graph runs
    (LatencyTable.reorder_fit); None when the table has no such fit."""
    fit = table.reorder_fit()
    if fit is None:
        return None
    return fit[0] * reorders[0] + fit[1] * reorders[1]


REORDER_CLASSES = ("ReorderInput", "ReorderOutput")


def price_kernels(table: LatencyTable, kernels: list[tuple[str, float]]) -> tuple[float, float, list[str]] | None:
    """(reorders' ms, other kernels' ms, classes no run timed) of the kernels outside the layers
    of a compiled graph (Backend.graph_kernels: class, millions of elements), each priced by
    its class's curve over the table's in-graph runs (LatencyTable.kernel_prices); a class the
    runs never timed takes the same operator's price in the other layout, else counts 0 and is
    named. None when the table has no kernel prices (tables profiled before them)."""
    prices = table.kernel_prices()
    if not prices:
        return None
    reorder = other = 0.0
    unpriced: list[str] = []
    for cls, mel in kernels:
        price = prices.get(cls)
        if price is None:
            op = cls.split("/")[0]
            price = next((p for c, p in prices.items() if c.split("/")[0] == op), None)
        if price is None:
            unpriced.append(cls)
            continue
        ms = price.price(mel)
        if cls in REORDER_CLASSES:
            reorder += ms
        else:
            other += ms
    return reorder, other, sorted(set(unpriced))


def predict_layers(problem: Problem, table: LatencyTable, widths: dict[int, int] | None = None,
                   removed_blocks: list[int] | tuple = (), reorders: tuple[int, float] | None = None,
                   kernels: list[tuple[str, float]] | None = None) -> LayerSum:
    """The layer sum at `widths` (dense when omitted; layers of `removed_blocks` left out) plus
    the layout reorders, with its uncertainty (UNCERTAINTY). The reorders: with `kernels` (the
    compiled graph's kernels outside the layers, Backend.graph_kernels of the model at exactly
    these widths) and a table that prices them (price_kernels), each reorder by its class and
    size, and the other kernels outside the layers go to `outside_ms`; else with `reorders`
    (count, millions of elements: Backend.layout_reorders), priced by graph_reorder_ms;
    otherwise modelled from the blocking rules (reorder_ms). Raises KeyError for a layer whose
    signature the table lacks."""
    full = {g.id: (widths or {}).get(g.id, g.size) for g in problem.groups}
    priced = price_kernels(table, kernels) if kernels is not None else None
    ms = priced[0] if priced is not None else graph_reorder_ms(table, reorders) if reorders is not None else None
    source, how = ("graph", "interpolated") if ms is not None else ("modelled", "modelled")
    if ms is None:
        ms = reorder_ms(problem, table, widths, removed_blocks)
    out = LayerSum(ms, UNCERTAINTY[how] * ms, {h: 0 for h in UNCERTAINTY}, [], [], ms, source)
    if priced is not None:
        out.outside_ms, out.unpriced = priced[1], priced[2]
        out.band_ms += UNCERTAINTY["interpolated"] * priced[1]
    for layer in problem.layers:
        if layer.block is not None and layer.block in removed_blocks:
            continue
        ci, co = layer.c_in.width(full), layer.c_out.width(full)
        ms, how = table.lookup_detail(layer.spec.signature(), ci, ci if layer.spec.depthwise else co)
        out.raw_ms += ms
        out.band_ms += UNCERTAINTY[how] * ms
        out.found[how] += 1
        if how in ("extrapolated", "modelled"):
            out.outside.append(f"{layer.name} ({ci}x{co}, {how})")
        elif how == "interpolated":
            out.interpolated.append(layer.name)
    return out


def overhead_elements(problem: Problem, widths: dict[int, int] | None = None,
                      removed_blocks: list[int] | tuple = ()) -> float:
    """Millions of elements written outside conv/gemm layers at the given group widths."""
    widths = widths or {}
    full = {g.id: widths.get(g.id, g.size) for g in problem.groups}
    total = sum(o.space.width(full) for o in problem.overheads
                if o.block is None or o.block not in removed_blocks)
    return total / 1e6


def calibrated(raw_ms: float, calibration: "Calibration | None", melements: float = 0.0) -> float:
    """Whole-model prediction (ms) from the layer sum and the overhead elements (millions)."""
    if calibration is None:
        return raw_ms
    return calibration.predict(raw_ms, melements)
