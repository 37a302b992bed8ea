"""Baselines beside the exact solvers: HALP's latency-saliency knapsack and a global
magnitude threshold (uniform keep-ratio lives in solver.uniform)."""
from __future__ import annotations

import time

import numpy as np

from latprune.types import InputError, Plan
from latprune.solver.dp import _Costs, Unit, knapsack
from latprune.solver.problem_costs import SolveInput, evaluate, make_plan


def solve_halp(inp: SolveInput, bins: int = 2000, steps: int = 10) -> Plan:
    """HALP (Shen et al., NeurIPS 2022): a 0/1 knapsack over each group's widths (channels kept
    in importance order) with HALP's *linear* latency model: a group's cost is what the layers
    writing it cost at that output width with their input widths held fixed. HALP prunes
    progressively, reading the table at the current input widths; so does this: `steps`
    knapsacks with targets falling linearly from the dense latency to the budget, each with
    inputs held at the previous answer's widths and no group widened again (HALP never
    regrows channels; without that the linearisation oscillates), then up to `steps` more at
    the budget until the answer settles. The best answer whose bilayer prediction meets the budget wins; if none
    does, InputError. No blocks are removed."""
    t0 = time.perf_counter()
    prob = inp.problem
    units = [Unit([g.id], None, [({g.id: w}, False, inp.objective.value(prob, g.id, w))
                                 for w in g.candidate_widths])
             for g in prob.groups if g.prunable]
    costs = _Costs(inp, units)
    current = {g.id: g.size for g in prob.groups}
    dense_raw = evaluate(inp, {}, set())[1]
    best, smallest, seen = None, None, set()
    for k in range(1, 2 * steps + 1):
        target = inp.raw_budget + (dense_raw - inp.raw_budget) * max(steps - k, 0) / steps
        picks = _halp_knapsack(inp, units, costs, current, target, bins)
        if picks is None:
            if k <= steps:
                continue
            break
        widths = {unit.groups[0]: unit.options[o][0][unit.groups[0]] for unit, o in zip(units, picks)}
        obj, raw = evaluate(inp, widths, set())
        smallest = raw if smallest is None else min(smallest, raw)
        if raw <= inp.raw_budget + 1e-12 and (best is None or obj > best[0]):
            best = (obj, raw, widths)
        key = tuple(sorted(widths.items()))
        if k > steps and key in seen:
            break
        seen.add(key)
        current = {**{g.id: g.size for g in prob.groups}, **widths}
    if best is None:
        reached = ("" if smallest is None else
                   f" (the smallest of its plans predicts {inp.scale * smallest + inp.offset_ms:.3f} ms)")
        raise InputError(f"HALP's linear latency model found no plan within the budget "
                         f"{inp.budget_ms:.3f} ms{reached}")
    obj, raw, widths = best
    plan = make_plan(prob, widths, set(), "halp", inp.objective)
    plan.objective = obj
    plan.predicted_ms = inp.scale * raw + inp.offset_ms
    plan.solve_seconds = time.perf_counter() - t0
    plan.status = "Optimal (linear latency model)"
    return plan


def _halp_knapsack(inp: SolveInput, units: list[Unit], costs: _Costs, current: dict[int, int],
                   target: float, bins: int) -> list[int] | None:
    """One knapsack of HALP's linear model (raw latency ≤ target) with inputs held at `current`."""
    prob = inp.problem
    base = sum(costs.layer(l, current, set()) for l in range(len(prob.layers)))
    base += sum(costs.overhead(k, current, set()) for k in range(len(prob.overheads)))
    vals, cs = [], []
    for u, unit in enumerate(units):
        gid = unit.groups[0]
        writers = [l for l, layer in enumerate(prob.layers) if any(g == gid for g, _ in layer.c_out.terms)]
        deltas = []
        for widths, _, _ in unit.options:
            full = {**current, **widths}
            d = 0.0
            for l in writers:
                layer, cost = prob.layers[l], inp.costs[l]
                if layer.spec.depthwise:  # a depthwise layer's input is its output's group
                    i = j = cost.in_values.index(layer.c_in.width(full))
                else:
                    i = cost.in_values.index(layer.c_in.width(current))
                    j = cost.out_values.index(layer.c_out.width(full))
                d += float(cost.ms[i, j]) - costs.layer(l, current, set())
            d += sum(costs.overhead(k, full, set()) - costs.overhead(k, current, set())
                     for k in costs.unit_overheads[u])
            deltas.append(d)
        # HALP only ever removes channels: widths above the current one are not offered.
        vals.append(np.array([o[2] if o[0][gid] <= current[gid] else -np.inf for o in unit.options]))
        cs.append(np.array(deltas))
    shift = sum(float(c.min()) for c in cs)
    return knapsack(vals, [c - c.min() for c in cs], target - base - shift, bins)


def solve_threshold(inp: SolveInput) -> Plan:
    """Global magnitude threshold: keep every channel whose score (`group.importance`, the
    per-layer-normalised magnitudes of solver.importance) is at least t, in every group; widths
    round up to candidates. t is the smallest threshold whose prediction meets the budget."""
    t0 = time.perf_counter()
    prob = inp.problem
    groups = [g for g in prob.groups if g.prunable]

    def widths_at(t: float) -> dict[int, int]:
        out = {}
        for g in groups:
            n = int(np.sum(np.asarray(g.importance) >= t))
            out[g.id] = min((c for c in g.candidate_widths if c >= n), default=g.size)
        return out

    scores = np.unique(np.concatenate([np.asarray(g.importance, dtype=float) for g in groups]))
    scores = np.append(scores, np.inf)
    lo, hi = 0, len(scores) - 1  # the last (infinite) threshold keeps the smallest widths
    smallest = evaluate(inp, widths_at(scores[hi]), set())[1]
    if smallest > inp.raw_budget:
        raise InputError(f"no global threshold meets the budget {inp.budget_ms:.3f} ms (every group "
                         f"at its smallest width predicts {inp.scale * smallest + inp.offset_ms:.3f} ms)")
    while lo < hi:  # smallest index whose widths fit (latency falls as t rises)
        mid = (lo + hi) // 2
        if evaluate(inp, widths_at(scores[mid]), set())[1] <= inp.raw_budget:
            hi = mid
        else:
            lo = mid + 1
    widths = widths_at(scores[lo])
    plan = make_plan(prob, widths, set(), "threshold", inp.objective)
    plan.objective, raw = evaluate(inp, widths, set())
    plan.predicted_ms = inp.scale * raw + inp.offset_ms
    plan.solve_seconds = time.perf_counter() - t0
    plan.status = f"threshold={scores[lo]:.6g}"
    return plan
