"""Distortion-minimising dynamic program (seed 000) over the shared problem, with latency,
FLOPs or parameter budgets.

The DP allocates one choice per *unit* — a prunable group outside removable blocks (its
candidate widths), or a removable block (removed, or one combination of its inner groups'
widths) — to maximise the additive objective (minus distortion, or retained importance)
under a budget that is a sum over units:

    dp[n][s] = max_o  value_n(o) + dp[n−1][s − cost_n(o)]        (s: the budget in S bins)

Time O(units · S · options): linear in the number of layers. Costs are rounded *up* to bins,
so the DP never overspends its own cost model.

Seed 000 assumes a per-layer cost. A bilayer latency C_l(c_in, c_out) couples the two groups a
layer reads and writes, so the DP linearises it around the current assignment W:
C_l ≈ C_l(W) + Σ_units touching l [C_l(W with the unit's choice) − C_l(W)], which is exact for
layers touched by one unit (all layers inside a block unit) and for the layers whose other
side did not move. It re-linearises at the DP's answer and repeats; when the exact (bilayer)
latency of an answer exceeds the budget, the next pass's budget is reduced by the excess. The
best exactly-feasible answer wins. (FLOPs and parameter budgets are bilinear in the same way.)
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import numpy as np

from latprune.types import InputError, Plan
from latprune.solver.problem_costs import SolveInput, assert_feasible_budget, evaluate, make_plan

MAX_BLOCK_OPTIONS = 4096


@dataclass
class Unit:
    """One DP stage: its options as (group widths, removed block or None, value, cost)."""

    groups: list[int]
    block: int | None
    options: list[tuple[dict[int, int], bool, float]]  # (widths, removed, value)


def build_units(inp: SolveInput) -> list[Unit]:
    prob, obj = inp.problem, inp.objective
    removable = set(inp.removable_blocks)
    inner: dict[int, list[int]] = {}
    units: list[Unit] = []
    for g in prob.groups:
        if not g.prunable:
            continue
        if g.inner_of_block in removable:
            inner.setdefault(g.inner_of_block, []).append(g.id)
            continue
        units.append(Unit([g.id], None, [({g.id: w}, False, obj.value(prob, g.id, w))
                                         for w in g.candidate_widths]))
    for b in sorted(removable):
        gids = inner.get(b, [])
        n = math.prod(len(prob.groups[gid].candidate_widths) for gid in gids)
        if n > MAX_BLOCK_OPTIONS:
            raise InputError(f"block {b} has {n} width combinations (limit {MAX_BLOCK_OPTIONS}) for the DP")
        opts = [({gid: 0 for gid in gids}, True, obj.block_values.get(b, 0.0))]
        for combo in itertools.product(*[prob.groups[gid].candidate_widths for gid in gids]):
            widths = dict(zip(gids, combo))
            opts.append((widths, False, sum(obj.value(prob, gid, w) for gid, w in widths.items())))
        units.append(Unit(gids, b, opts))
    return units


class _Costs:
    """Exact per-layer raw cost at a full assignment, and which units touch which layers."""

    def __init__(self, inp: SolveInput, units: list[Unit]) -> None:
        self.inp = inp
        prob = inp.problem
        self.unit_of_group = {gid: i for i, u in enumerate(units) for gid in u.groups}
        self.unit_of_block = {u.block: i for i, u in enumerate(units) if u.block is not None}
        self.layer_units: list[set[int]] = []
        for layer in prob.layers:
            touched = {self.unit_of_group[g] for g, _ in layer.c_in.terms + layer.c_out.terms
                       if g in self.unit_of_group}
            if layer.block in self.unit_of_block:
                touched.add(self.unit_of_block[layer.block])
            self.layer_units.append(touched)
        self.overhead_units = []
        for o in prob.overheads:
            touched = {self.unit_of_group[g] for g, _ in o.space.terms if g in self.unit_of_group}
            if o.block in self.unit_of_block:
                touched.add(self.unit_of_block[o.block])
            self.overhead_units.append(touched)
        # The inverse maps: per unit, the layers and overhead terms whose cost it moves.
        self.unit_layers: list[list[int]] = [[] for _ in units]
        for l, us in enumerate(self.layer_units):
            for u in us:
                self.unit_layers[u].append(l)
        self.unit_overheads: list[list[int]] = [[] for _ in units]
        for k, us in enumerate(self.overhead_units):
            for u in us:
                self.unit_overheads[u].append(k)

    def layer(self, l: int, widths: dict[int, int], removed: set[int]) -> float:
        prob = self.inp.problem
        layer, cost = prob.layers[l], self.inp.costs[l]
        if layer.block is not None and layer.block in removed:
            return 0.0
        i = cost.in_values.index(layer.c_in.width(widths))
        j = i if layer.spec.depthwise else cost.out_values.index(layer.c_out.width(widths))
        return float(cost.ms[i, j])

    def overhead(self, k: int, widths: dict[int, int], removed: set[int]) -> float:
        o = self.inp.problem.overheads[k]
        fixed = o.space.fixed if o.block is None or o.block not in removed else 0
        return self.inp.overhead_coef * (fixed + sum(m * widths[g] for g, m in o.space.terms))


def _assign(base: dict[int, int], removed: set[int], unit: Unit, option) -> tuple[dict[int, int], set[int]]:
    widths = dict(base)
    widths.update(option[0])
    rem = set(removed)
    if unit.block is not None:
        (rem.add if option[1] else rem.discard)(unit.block)
    return widths, rem


def _unit_deltas(inp: SolveInput, units: list[Unit], costs: _Costs, widths: dict[int, int],
                 removed: set[int]) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """Per unit, its options' values and the change in raw latency each option makes to the
    assignment (widths, removed), and that assignment's raw latency."""
    prob = inp.problem
    base_layers = [costs.layer(l, widths, removed) for l in range(len(prob.layers))]
    base_over = [costs.overhead(k, widths, removed) for k in range(len(prob.overheads))]
    vals, cs = [], []
    for u, unit in enumerate(units):
        vals.append(np.array([o[2] for o in unit.options]))
        deltas = []
        for opt in unit.options:
            w2, r2 = _assign(widths, removed, unit, opt)
            d = sum(costs.layer(l, w2, r2) - base_layers[l] for l in costs.unit_layers[u])
            d += sum(costs.overhead(k, w2, r2) - base_over[k] for k in costs.unit_overheads[u])
            deltas.append(d)
        cs.append(np.array(deltas))
    return vals, cs, sum(base_layers) + sum(base_over)


def knapsack(values: list[np.ndarray], costs: list[np.ndarray], budget: float, bins: int) -> list[int] | None:
    """Maximise Σ values[u][o_u] s.t. Σ costs[u][o_u] ≤ budget (costs ≥ 0, rounded up to
    budget/bins). Returns the chosen option per unit, or None when nothing fits."""
    found = _knapsack(values, costs, budget, bins, round_up=True)
    return None if found is None else found[0]


def _knapsack(values: list[np.ndarray], costs: list[np.ndarray], budget: float, bins: int,
              round_up: bool) -> tuple[list[int], float] | None:
    """The knapsack DP: (option per unit, best value), or None when nothing fits. Costs rounded
    up to bins never overspend `budget`; rounded down, every plan within `budget` stays
    feasible, so the value is an upper bound on the exact optimum (a relaxation)."""
    if budget < 0:
        return None
    if budget <= 1e-300:  # nothing to spend: only zero-cost options fit
        bins, delta = 0, 1.0
    else:
        delta = budget / bins

    def to_bins(cost) -> np.ndarray:
        """Costs in whole bins, rounded up (or down); beyond the budget clipped to bins + 1."""
        c = np.minimum(np.asarray(cost, dtype=float) / delta, bins + 2)
        whole = np.ceil(c - 1e-9) if round_up else np.maximum(np.floor(c - 1e-9), 0)
        whole = np.where(c - 1e-9 > bins, bins + 1, whole)  # beyond the budget either way
        return np.where(c <= 0, 0, whole).astype(np.int64)

    dp = np.zeros(bins + 1)  # best value with total cost ≤ s bins
    choice = np.zeros((len(values), bins + 1), dtype=np.int32)
    neg = -np.inf
    for u, (val, cost) in enumerate(zip(values, costs)):
        icost = to_bins(cost)
        new = np.full(bins + 1, neg)
        arg = np.zeros(bins + 1, dtype=np.int32)
        for o, (v, c) in enumerate(zip(val, icost)):
            if c > bins:
                continue
            cand = np.full(bins + 1, neg)
            cand[c:] = dp[:bins + 1 - c] + v
            better = cand > new
            new[better] = cand[better]
            arg[better] = o
        dp = new
        choice[u] = arg
    if not np.isfinite(dp[bins]):
        return None
    picks = [0] * len(values)
    s = bins
    for u in range(len(values) - 1, -1, -1):
        o = int(choice[u, s])
        picks[u] = o
        s -= int(to_bins(costs[u])[o])
    return picks, float(dp[bins])


def separable_upper_bound(inp: SolveInput, bins: tuple[int, ...] = (20000, 100000), max_work: float = 5e7,
                          rel_gap: float | None = None) -> float | None:
    """An upper bound on the best objective of `inp` when its latency is separable (every layer
    and overhead term moves with at most one unit: a group, or a removable block with its inner
    groups), so the MILP is a multiple-choice knapsack: the knapsack DP with costs rounded
    *down* to budget/bins is a relaxation of it. The resolution grows through `bins` until the
    bound lies within `rel_gap` (default inp.mip_rel_gap) of the feasible DP (costs rounded up)
    at the same resolution: near-equal options tight against the budget need fine bins. None
    for bilayer-coupled problems (a layer between two pruned groups) or when the DP would cost
    more than `max_work` cell updates.

    HiGHS closes the last few 0.1% of a knapsack's gap slowly (its LP bound is weak there and
    near-identical blocks are symmetric: ViT-B/16 at 0.5x took 40 s for a plan found in 0.4 s);
    this bound proves the gap of a plan in milliseconds (solver.milp)."""
    try:
        units = build_units(inp)
    except InputError:
        return None
    n_options = sum(len(u.options) for u in units)
    if n_options * bins[0] > max_work:
        return None
    costs = _Costs(inp, units)
    if any(len(us) > 1 for us in costs.layer_units + costs.overhead_units):
        return None
    # exact deltas from the dense model: no other unit moves a unit's layers
    vals, cs, base_total = _unit_deltas(inp, units, costs, {g.id: g.size for g in inp.problem.groups}, set())
    cap = inp.raw_budget - base_total - sum(float(c.min()) for c in cs)
    cs = [c - c.min() for c in cs]
    gap = inp.mip_rel_gap if rel_gap is None else rel_gap
    bound = None
    for n in bins:
        if n * n_options > max_work:
            break
        upper = _knapsack(vals, cs, cap, n, round_up=False)
        if upper is None:
            return None
        bound = upper[1] if bound is None else min(bound, upper[1])
        lower = _knapsack(vals, cs, cap, n, round_up=True)
        if lower is not None and bound - lower[1] <= gap * abs(bound):
            break
    return bound


START_RATIOS = (1.0, 0.75, 0.5, 0.25, 0.0)


def solve_dp(inp: SolveInput, bins: int = 2000, passes: int = 6, method: str = "dp") -> Plan:
    """Best plan of the re-linearised DP (see the module docstring), started from uniform
    assignments at START_RATIOS of each group's candidate widths (dense first)."""
    assert_feasible_budget(inp)
    t0 = time.perf_counter()
    prob = inp.problem
    units = build_units(inp)
    costs = _Costs(inp, units)
    best: tuple | None = None
    for ratio in START_RATIOS:
        widths = {g.id: g.size for g in prob.groups}
        for g in prob.groups:
            if g.prunable:
                widths[g.id] = g.candidate_widths[int(round(ratio * (len(g.candidate_widths) - 1)))]
        best = _descend(inp, units, costs, widths, bins, passes, best)
    if best is None:
        raise InputError(f"the DP found no plan within the budget {inp.budget_ms:.3f} "
                         f"after {passes} linearisations")
    obj, raw, widths, removed = best
    widths = {g: w for g, w in widths.items() if prob.groups[g].prunable}
    plan = make_plan(prob, widths, removed, method, inp.objective)
    plan.objective = obj
    plan.predicted_ms = inp.scale * raw + inp.offset_ms
    plan.solve_seconds = time.perf_counter() - t0
    plan.status = "Feasible (linearised DP)"
    return plan


def _descend(inp: SolveInput, units: list[Unit], costs: _Costs, widths: dict[int, int], bins: int,
             passes: int, best: tuple | None) -> tuple | None:
    """Re-linearise and re-solve from `widths` up to `passes` times; returns the best
    exactly-feasible (objective, raw, widths, removed) seen, starting from `best`."""
    prob = inp.problem
    removed: set[int] = set()
    cut = 0.0  # budget reduction after an answer that overspent the exact budget
    seen: set[tuple] = set()
    for _ in range(passes):
        vals, cs, base_total = _unit_deltas(inp, units, costs, widths, removed)
        shift = sum(float(c.min()) for c in cs)
        cap = inp.raw_budget - cut - base_total - shift
        picks = knapsack(vals, [c - c.min() for c in cs], cap, bins)
        if picks is None:
            cut *= 0.5
            if cut == 0:
                break
            continue
        new_w = {g.id: g.size for g in prob.groups}
        new_r: set[int] = set()
        for unit, o in zip(units, picks):
            new_w, new_r = _assign(new_w, new_r, unit, unit.options[o])
        obj, raw = evaluate(inp, {g: w for g, w in new_w.items() if prob.groups[g].prunable}, new_r)
        if raw <= inp.raw_budget + 1e-12:
            if best is None or obj > best[0] + 1e-12:
                best = (obj, raw, dict(new_w), set(new_r))
        else:
            cut += raw - inp.raw_budget
        key = (tuple(sorted(new_w.items())), tuple(sorted(new_r)))
        if key in seen and raw <= inp.raw_budget:
            break
        seen.add(key)
        widths, removed = new_w, new_r
    return best
