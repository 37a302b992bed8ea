"""Baselines beside the exact solvers (solver.baselines): the global magnitude threshold and
HALP's linear-latency knapsack, on analysed builder problems with fake latency tables."""
from __future__ import annotations

import re

import numpy as np
import pytest

from onnx_builders import ALL_BUILDERS
from test_solver import _problem
from latprune.lut.predict import LayerCost, space_values
from latprune.pruner.analysis import analyse
from latprune.solver.baselines import solve_halp, solve_threshold
from latprune.solver.milp import solve_milp
from latprune.solver.problem_costs import SolveInput, dense_raw_latency, evaluate, min_raw_latency
from latprune.types import InputError

NAMES = sorted(ALL_BUILDERS)

def _monotone_problem(name: str, seed: int = 0):
    """(problem, costs): a noise-free bilinear latency, strictly increasing in both widths, and
    random importances (so that a bigger budget can never force a narrower plan)."""
    prob = analyse(ALL_BUILDERS[name](), step=8, max_candidates=4).problem
    rng = np.random.default_rng(seed)
    for g in prob.groups:
        g.importance = [float(v) for v in rng.uniform(0.1, 2.0, g.size)]
    coef = {}
    costs = []
    for layer in prob.layers:
        a, b, c, d = coef.setdefault(layer.spec.signature(), rng.uniform(0.2, 1.0, 4))
        ins = space_values(prob, layer.c_in)
        outs = ins if layer.spec.depthwise else space_values(prob, layer.c_out)
        f = lambda ci, co: 0.01 * d + 1e-4 * a * ci * co + 1e-3 * (b * ci + c * co)  # noqa: E731
        if layer.spec.depthwise:
            ms = np.diag([f(ch, ch) for ch in ins])
        else:
            ms = np.array([[f(i, o) for o in outs] for i in ins])
        costs.append(LayerCost(ins, outs, ms))
    return prob, costs


@pytest.fixture(scope="module")
def monotone():
    return {name: _monotone_problem(name) for name in NAMES}


def _fractions(n: int = 12) -> list[float]:
    return [float(f) for f in np.linspace(0.0, 1.0, n)]


def _check_widths(prob, plan) -> None:
    assert plan.removed_blocks == []
    for g in prob.groups:
        if not g.prunable:
            assert g.id not in plan.kept
            continue
        w = plan.widths[g.id]
        assert w in g.candidate_widths
        if w < g.size:
            kept = plan.kept[g.id]
            assert len(kept) == w and kept == sorted(set(kept))
            order = np.argsort(-np.asarray(g.importance), kind="stable")[:w]
            assert kept == sorted(int(i) for i in order)  # the most important channels stay


# ---- global threshold ----------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_threshold_respects_budget_and_is_monotone(monotone, name):
    prob, costs = monotone[name]
    scale, offset = 1.3, 0.05
    inp0 = SolveInput(prob, costs, 1.0, scale, offset, allow_block_removal=False)
    lo = scale * min_raw_latency(inp0) + offset
    hi = scale * dense_raw_latency(inp0) + offset
    kept_before = -1
    for frac in _fractions():
        budget = lo + (hi - lo) * frac
        inp = SolveInput(prob, costs, budget * (1 + 1e-12), scale, offset, allow_block_removal=False)
        plan = solve_threshold(inp)
        assert plan.method == "threshold"
        assert re.fullmatch(r"threshold=\S+", plan.status), plan.status
        obj, raw = evaluate(inp, plan.widths, set())
        assert raw <= inp.raw_budget + 1e-12
        assert plan.predicted_ms == pytest.approx(scale * raw + offset, rel=1e-9)
        assert plan.objective == pytest.approx(obj, rel=1e-9)
        _check_widths(prob, plan)
        total = sum(plan.widths.values())
        assert total >= kept_before, (frac, total, kept_before)  # a bigger budget keeps no fewer
        kept_before = total
    # the dense budget keeps every channel
    assert solve_threshold(SolveInput(prob, costs, hi * 1.001, scale, offset, False)).kept == {}


@pytest.mark.parametrize("name", ["residual", "concat", "pad_shortcut"])
def test_threshold_on_a_noisy_table_respects_budget(name):
    """The test_solver fake table (5% noise per cell): the budget still holds."""
    prob, costs = _problem(name)
    inp0 = SolveInput(prob, costs, 1.0, allow_block_removal=False)
    lo, hi = min_raw_latency(inp0), dense_raw_latency(inp0)
    for frac in _fractions(8):
        inp = SolveInput(prob, costs, lo + (hi - lo) * frac, allow_block_removal=False)
        plan = solve_threshold(inp)
        assert evaluate(inp, plan.widths, set())[1] <= inp.raw_budget + 1e-12
        _check_widths(prob, plan)


def test_threshold_is_never_better_than_milp(monotone):
    prob, costs = monotone["residual"]
    inp0 = SolveInput(prob, costs, 1.0, allow_block_removal=False)
    lo, hi = min_raw_latency(inp0), dense_raw_latency(inp0)
    for frac in (0.2, 0.5, 0.8):
        inp = SolveInput(prob, costs, lo + (hi - lo) * frac, allow_block_removal=False, mip_rel_gap=1e-9)
        assert solve_threshold(inp).objective <= solve_milp(inp).objective + 1e-9


# ---- HALP ----------------------------------------------------------------------------------

def _input_reversed(prob, costs):
    """Costs where a narrower *input* is slower (the cost matrix flipped along the input axis):
    HALP's linear model, which holds inputs at their dense width, then under-predicts."""
    out = []
    for layer, c in zip(prob.layers, costs):
        if layer.spec.depthwise or len(c.in_values) == 1:
            out.append(c)
        else:
            out.append(LayerCost(c.in_values, c.out_values, c.ms[::-1, :].copy()))
    return out


def _check_halp(prob, inp, plan) -> bool:
    """Plan invariants; returns whether the bilayer prediction exceeds the budget (never:
    solve_halp raises instead)."""
    assert plan.method == "halp"
    _check_widths(prob, plan)
    obj, raw = evaluate(inp, plan.widths, set())
    assert plan.predicted_ms == pytest.approx(inp.scale * raw + inp.offset_ms, rel=1e-9)
    assert plan.objective == pytest.approx(obj, rel=1e-9)
    assert plan.status == "Optimal (linear latency model)", plan.status
    return raw > inp.raw_budget + 1e-12


@pytest.mark.parametrize("name", NAMES)
def test_halp_widths_are_candidates_and_status_is_consistent(monotone, name):
    prob, costs = monotone[name]
    inp0 = SolveInput(prob, costs, 1.0, 1.2, 0.03, allow_block_removal=False)
    lo = 1.2 * min_raw_latency(inp0) + 0.03
    hi = 1.2 * dense_raw_latency(inp0) + 0.03
    for frac in _fractions(8):
        inp = SolveInput(prob, costs, lo + (hi - lo) * frac, 1.2, 0.03, allow_block_removal=False)
        try:
            plan = solve_halp(inp)
        except InputError:
            continue  # the linear model may not reach budgets near the bilayer minimum
        # with latencies that grow with both widths, the linear model never under-predicts
        assert not _check_halp(prob, inp, plan)


def test_halp_generous_budget_keeps_everything(monotone):
    prob, costs = monotone["concat"]
    dense = dense_raw_latency(SolveInput(prob, costs, 1.0))
    plan = solve_halp(SolveInput(prob, costs, dense * 1.01))
    assert plan.kept == {} and plan.removed_blocks == []
    assert "exceeds" not in plan.status


# ---- impossible budgets --------------------------------------------------------------------

@pytest.mark.parametrize("solver", [solve_threshold, solve_halp])
@pytest.mark.parametrize("name", ["residual", "depthwise", "pad_shortcut"])
def test_impossible_budget_raises_input_error(monotone, solver, name):
    prob, costs = monotone[name]
    smallest = min_raw_latency(SolveInput(prob, costs, 1.0, allow_block_removal=False))
    for budget in (smallest * 0.9, 1e-9):
        with pytest.raises(InputError, match="budget"):
            solver(SolveInput(prob, costs, budget, allow_block_removal=False))


def test_halp_never_returns_a_plan_over_the_bilayer_budget(monotone):
    """Where the linear model under-predicts (narrower inputs are slower), HALP either finds a
    plan the bilayer prediction accepts or says it cannot."""
    prob, base = monotone["residual"]
    costs = _input_reversed(prob, base)
    inp0 = SolveInput(prob, costs, 1.0, allow_block_removal=False)
    lo, hi = min_raw_latency(inp0), dense_raw_latency(inp0)
    solved = 0
    for frac in _fractions(16):
        inp = SolveInput(prob, costs, lo + (hi - lo) * frac, allow_block_removal=False)
        try:
            plan = solve_halp(inp)
        except InputError as exc:
            assert "found no plan within the budget" in str(exc)
            continue
        assert not _check_halp(prob, inp, plan)
        solved += 1
    assert solved
