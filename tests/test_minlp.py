"""The MDP MINLP (solver.minlp), bilinear latency kept, with SCIP and with MindtPy's Outer
Approximation: on the small analysed problems of test_solver it reaches the exact optimum of
the HiGHS MILP and of brute force, honours the budget, and rejects unreachable budgets."""
from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("pyomo")
pytest.importorskip("pyscipopt")

from test_solver import _budget, _problem, random_exact_input  # noqa: E402
from latprune.solver.brute import solve_brute  # noqa: E402
from latprune.solver.milp import solve_milp  # noqa: E402
from latprune.solver.minlp import nlp_subsolver_available, solve_minlp  # noqa: E402
from latprune.solver.problem_costs import SolveInput, evaluate, min_raw_latency  # noqa: E402
from latprune.types import InputError  # noqa: E402

_NLP_OK, _NLP_WHY = nlp_subsolver_available()
SOLVERS = ["scip", pytest.param("mindtpy", marks=pytest.mark.skipif(
    not _NLP_OK, reason=f"no NLP subsolver for MindtPy: {_NLP_WHY} (scripts/install_ipopt.sh)"))]
NAMES = ["residual", "depthwise", "concat", "pad_shortcut"]


@pytest.fixture(scope="module")
def problems():
    return {name: _problem(name) for name in NAMES}


def _randomise(prob, rng, cheap_blocks: bool) -> None:
    """Fresh importances; with `cheap_blocks`, the inner groups of blocks matter little, so
    that removing a whole block is often the best use of the budget."""
    for g in prob.groups:
        lo, hi = (0.001, 0.05) if cheap_blocks and g.inner_of_block is not None else (0.1, 2.0)
        g.importance = [float(v) for v in rng.uniform(lo, hi, g.size)]


def _check_plan(inp, plan, method):
    assert plan.method == method
    obj, raw = evaluate(inp, plan.widths, set(plan.removed_blocks))
    assert raw <= inp.raw_budget + 1e-9
    assert plan.predicted_ms == pytest.approx(inp.scale * raw + inp.offset_ms, rel=1e-9)
    assert plan.objective == pytest.approx(obj, rel=1e-9)
    if not inp.removable_blocks:
        assert plan.removed_blocks == []


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("blocks", [True, False])
def test_minlp_matches_milp_and_brute_force(problems, solver, name, blocks):
    prob, costs = problems[name]
    rng = np.random.default_rng([NAMES.index(name), int(blocks), 7])
    for trial in range(1 if name == "pad_shortcut" else 2):
        _randomise(prob, rng, cheap_blocks=blocks and trial == 0)
        inp = random_exact_input(prob, costs, rng, blocks)
        budget = inp.budget_ms
        brute = solve_brute(inp)
        milp = solve_milp(inp)
        plan = solve_minlp(inp, solver)
        assert plan.objective == pytest.approx(brute.objective, rel=1e-6), (trial, budget)
        assert plan.objective == pytest.approx(milp.objective, rel=1e-6), (trial, budget)
        assert plan.status == "Optimal"
        _check_plan(inp, plan, "minlp-oa" if solver == "mindtpy" else "minlp-scip")


@pytest.mark.parametrize("solver", SOLVERS)
def test_minlp_removes_blocks_and_counts_overheads(problems, solver):
    """Cheap blocks under a tight budget are removed (brute force agrees), with the calibrated
    overhead elements (ms_per_melement) in the latency."""
    prob, costs = problems["residual"]
    rng = np.random.default_rng(11)
    _randomise(prob, rng, cheap_blocks=True)
    base = SolveInput(prob, costs, 1.0, ms_per_melement=40.0)
    lo = min_raw_latency(base)
    dense = evaluate(base, {}, set())[1]
    inp = SolveInput(prob, costs, lo + 0.25 * (dense - lo), ms_per_melement=40.0,
                     time_limit_s=30, mip_rel_gap=1e-9)
    brute = solve_brute(inp)
    assert brute.removed_blocks, "the instance should make removing a block worthwhile"
    plan = solve_minlp(inp, solver)
    assert plan.objective == pytest.approx(brute.objective, rel=1e-6)
    assert plan.removed_blocks == brute.removed_blocks
    _check_plan(inp, plan, "minlp-oa" if solver == "mindtpy" else "minlp-scip")
    for g in prob.groups:
        if g.inner_of_block in plan.removed_blocks:
            assert plan.widths[g.id] == 0


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("blocks", [True, False])
def test_budget_below_minimum_raises(problems, solver, blocks):
    prob, costs = problems["residual"]
    scale, offset = 1.5, 0.02
    smallest = scale * min_raw_latency(SolveInput(prob, costs, 1.0, scale, offset, blocks)) + offset
    with pytest.raises(InputError, match="smallest reachable latency"):
        solve_minlp(SolveInput(prob, costs, smallest * 0.9, scale, offset, blocks), solver)


@pytest.mark.parametrize("solver", SOLVERS)
def test_same_input_same_plan(problems, solver):
    prob, costs = problems["depthwise"]
    rng = np.random.default_rng(5)
    _randomise(prob, rng, cheap_blocks=False)
    budget = _budget(prob, costs, rng, 1.0, 0.0, True)
    inp = SolveInput(prob, costs, budget)
    a, b = solve_minlp(inp, solver), solve_minlp(inp, solver)
    assert (a.kept, a.widths, a.removed_blocks, a.objective) == \
        (b.kept, b.widths, b.removed_blocks, b.objective)


def test_tiny_time_limit_gives_a_feasible_plan_or_a_clear_error(problems):
    prob, costs = problems["pad_shortcut"]
    rng = np.random.default_rng(3)
    _randomise(prob, rng, cheap_blocks=False)
    inp = SolveInput(prob, costs, _budget(prob, costs, rng, 1.0, 0.0, True), time_limit_s=0.05)
    try:
        plan = solve_minlp(inp, "scip")
    except InputError as e:
        assert "time" in str(e)
        return
    assert plan.status in ("Optimal", "time limit")
    _check_plan(inp, plan, "minlp-scip")


def test_unknown_solver_and_missing_dependencies(problems, monkeypatch):
    prob, costs = problems["concat"]
    inp = SolveInput(prob, costs, 1e9)
    with pytest.raises(InputError, match="unknown MINLP solver"):
        solve_minlp(inp, "baron")
    monkeypatch.setitem(sys.modules, "cyipopt", None)  # no NLP subsolver: says what to install
    with pytest.raises(InputError, match="install_ipopt.sh"):
        solve_minlp(inp, "mindtpy")
    monkeypatch.setitem(sys.modules, "pyomo.environ", None)  # import pyomo.environ fails
    with pytest.raises(InputError, match=r"latprune\[minlp\]"):
        solve_minlp(inp, "scip")
