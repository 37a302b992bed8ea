"""Exhaustive search over every width combination: the reference for tiny problems."""
from __future__ import annotations

import itertools
import time

from latprune.types import InputError, Plan
from latprune.solver.problem_costs import SolveInput, assert_feasible_budget, evaluate, make_plan

MAX_COMBINATIONS = 2_000_000


def solve_brute(inp: SolveInput) -> Plan:
    """Best plan by enumeration (refuses problems over MAX_COMBINATIONS combinations)."""
    assert_feasible_budget(inp)
    t0 = time.perf_counter()
    prob = inp.problem
    groups = [g for g in prob.groups if g.prunable]
    blocks = list(inp.removable_blocks)
    n = 2 ** len(blocks)
    for g in groups:
        n *= len(g.candidate_widths)
    if n > MAX_COMBINATIONS:
        raise InputError(f"brute force would try {n} combinations (limit {MAX_COMBINATIONS})")
    best = None
    limit = inp.raw_budget + 1e-9
    for removed_bits in itertools.product((0, 1), repeat=len(blocks)):
        removed = {b for b, bit in zip(blocks, removed_bits) if bit}
        for combo in itertools.product(*[g.candidate_widths for g in groups]):
            widths = dict(zip((g.id for g in groups), combo))
            obj, raw = evaluate(inp, widths, removed)
            if raw <= limit and (best is None or (obj, -raw) > (best[0], -best[1])):
                best = (obj, raw, widths, removed)
    if best is None:
        raise InputError(f"no plan meets the budget {inp.budget_ms:.3f} ms")
    obj, raw, widths, removed = best
    plan = make_plan(prob, widths, removed, "brute", inp.objective)
    plan.objective, plan.predicted_ms = obj, inp.scale * raw + inp.offset_ms
    plan.solve_seconds, plan.status = time.perf_counter() - t0, "Optimal"
    return plan
