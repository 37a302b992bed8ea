"""Baseline: one keep-ratio for every prunable group (no block removal)."""
from __future__ import annotations

import math
import time

from latprune.types import InputError, Plan, Problem
from latprune.solver.problem_costs import SolveInput, evaluate, make_plan


def uniform_widths(problem: Problem, ratio: float) -> dict[int, int]:
    """Width of each prunable group at keep-ratio `ratio`, rounded up to a multiple of the
    step (never below the smallest candidate, never above the group size). A group counted in
    coarser atoms than channels (attention heads, whole groups of a grouped convolution: its
    candidates are not multiples of the step, or it has fewer atoms than the step) keeps
    ceil(ratio · atoms), at least one, snapped up to its candidates: the step rule kept every
    head of a ViT at every ratio."""
    widths = {}
    step = problem.step
    for g in problem.groups:
        if not g.prunable:
            continue
        cands = g.candidate_widths or [g.size]
        if g.size <= step or any(c % step for c in cands[:-1]):
            w = max(1, math.ceil(g.size * ratio - 1e-9))
            widths[g.id] = min((c for c in cands if c >= w), default=g.size)
            continue
        w = math.ceil(g.size * ratio / step) * step
        widths[g.id] = max(min(w, g.size), min(g.size, step))
    return widths


def solve_uniform(inp: SolveInput) -> Plan:
    """Largest uniform ratio (bisection, 1/256 resolution) whose prediction meets the budget.
    Widths are snapped to each group's candidate widths."""
    t0 = time.perf_counter()
    prob = inp.problem

    def snapped(ratio: float) -> dict[int, int]:
        out = {}
        for gid, w in uniform_widths(prob, ratio).items():
            cands = prob.groups[gid].candidate_widths
            out[gid] = min((c for c in cands if c >= w), default=cands[-1])
        return out

    lo, hi = 0.0, 1.0
    if evaluate(inp, snapped(lo), set())[1] > inp.raw_budget:
        raise InputError(f"no uniform ratio meets the budget {inp.budget_ms:.3f} ms")
    for _ in range(8):
        mid = (lo + hi) / 2
        if evaluate(inp, snapped(mid), set())[1] <= inp.raw_budget:
            lo = mid
        else:
            hi = mid
    widths = snapped(lo)
    plan = make_plan(prob, widths, set(), "uniform", inp.objective)
    plan.objective, raw = evaluate(inp, widths, set())
    plan.predicted_ms = inp.scale * raw + inp.offset_ms
    plan.solve_seconds, plan.status = time.perf_counter() - t0, f"ratio={lo:.4f}"
    return plan
