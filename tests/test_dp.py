"""The distortion-minimising DP (solver.dp): its knapsack core is exact, its re-linearised
answers respect the budget and stay close to brute force's optimum, it is exact on separable
problems, and it agrees with the MILP and brute force under a distortion objective and under
analytic FLOPs budgets (solver.budgets)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from conftest import assert_plan_well_formed
from onnx_builders import ALL_BUILDERS, GraphBuilder, residual_cnn, vit_like
from test_solver import FAKE_FP, _budget, _fill_table, _problem
from latprune.lut.predict import layer_costs
from latprune.pipeline import apply_stream_policy
from latprune.lut.store import LatencyTable
from latprune.pruner.analysis import analyse
from latprune.solver.brute import solve_brute
from latprune.solver.budgets import analytic_costs, dense_count, layer_count
from latprune.solver.dp import knapsack, separable_upper_bound, solve_dp
from latprune.solver.milp import solve_milp
from latprune.solver.objective import distortion_objective
from latprune.solver.problem_costs import SolveInput, dense_raw_latency, evaluate, min_raw_latency
from latprune.types import InputError

NAMES = sorted(ALL_BUILDERS)


@pytest.fixture(scope="module")
def problems():
    return {name: _problem(name) for name in NAMES}


def _feasible(inp: SolveInput, plan) -> float:
    """Raw latency of the plan by evaluate(); asserts it is within the raw budget."""
    obj, raw = evaluate(inp, plan.widths, set(plan.removed_blocks))
    assert raw <= inp.raw_budget * (1 + 1e-9) + 1e-12, (raw, inp.raw_budget)
    assert plan.objective == pytest.approx(obj, rel=1e-9, abs=1e-12)
    assert plan.predicted_ms == pytest.approx(inp.scale * raw + inp.offset_ms, rel=1e-9)
    assert plan.predicted_ms <= inp.budget_ms * (1 + 1e-9)
    return raw


# ---- knapsack -------------------------------------------------------------------------------

def _brute_knapsack(values, costs, budget):
    best = None
    for combo in itertools.product(*[range(len(v)) for v in values]):
        c = sum(costs[u][o] for u, o in enumerate(combo))
        if c <= budget:
            v = sum(values[u][o] for u, o in enumerate(combo))
            if best is None or v > best:
                best = v
    return best


def test_knapsack_matches_enumeration_on_integer_costs():
    """bins = budget makes every bin one cost unit, so the rounding is exact."""
    rng = np.random.default_rng(1234)
    checked = infeasible = 0
    for _ in range(300):
        n_units = int(rng.integers(1, 5))
        values = [rng.normal(0, 3, int(rng.integers(1, 5))) for _ in range(n_units)]
        costs = [rng.integers(0, 9, len(v)).astype(float) for v in values]
        budget = int(rng.integers(1, 25))
        picks = knapsack(values, costs, float(budget), budget)
        best = _brute_knapsack(values, costs, budget)
        if best is None:
            assert picks is None
            infeasible += 1
            continue
        assert picks is not None and len(picks) == n_units
        assert all(0 <= o < len(v) for o, v in zip(picks, values))
        assert sum(costs[u][o] for u, o in enumerate(picks)) <= budget
        assert sum(values[u][o] for u, o in enumerate(picks)) == pytest.approx(best, abs=1e-9)
        checked += 1
    assert checked > 200 and infeasible > 0


def test_knapsack_with_fractional_costs_never_overspends():
    rng = np.random.default_rng(99)
    for _ in range(100):
        values = [rng.uniform(0, 5, int(rng.integers(1, 5))) for _ in range(int(rng.integers(1, 5)))]
        costs = [rng.uniform(0, 3, len(v)) for v in values]
        budget = float(rng.uniform(0.5, 8))
        picks = knapsack(values, costs, budget, 500)
        best = _brute_knapsack(values, costs, budget)
        if picks is None:
            continue  # rounding up may lose a plan that fits only by a sliver
        assert sum(costs[u][o] for u, o in enumerate(picks)) <= budget + 1e-9
        assert sum(values[u][o] for u, o in enumerate(picks)) <= best + 1e-9


def test_knapsack_returns_none_when_nothing_fits():
    values = [np.array([1.0, 2.0]), np.array([3.0])]
    assert knapsack(values, [np.array([4.0, 5.0]), np.array([1.0])], 3.0, 3) is None  # unit 0 never fits
    assert knapsack(values, [np.array([2.0, 2.0]), np.array([2.0])], 3.0, 3) is None  # together they do not
    assert knapsack(values, [np.array([0.0, 0.0]), np.array([0.0])], -1.0, 10) is None  # negative budget
    assert knapsack(values, [np.array([1.0, 2.0]), np.array([2.0])], 3.0, 3) == [0, 0]
    assert knapsack(values, [np.array([1.0, 1.0]), np.array([2.0])], 3.0, 3) == [1, 0]


def test_knapsack_zero_budget_admits_only_zero_cost_options():
    picks = knapsack([np.array([0.0, 5.0])], [np.array([0.0, 1.0])], 0.0, 2000)
    assert picks == [0]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_knapsack_tiny_positive_budget_does_not_crash():
    picks = knapsack([np.array([0.0, 5.0])], [np.array([0.0, 0.1])], 1e-17, 2000)
    assert picks == [0]


# ---- solve_dp on the analysed builder problems ----------------------------------------------

def test_dp_is_feasible_and_close_to_brute_force(problems):
    gaps = []
    for name in NAMES:
        prob, costs = problems[name]
        for blocks in (True, False):
            rng = np.random.default_rng([NAMES.index(name), int(blocks), 7])
            for _ in range(3 if name == "pad_shortcut" else 5):
                for g in prob.groups:
                    g.importance = [float(v) for v in rng.uniform(0.1, 2.0, g.size)]
                scale, offset = float(rng.uniform(0.5, 2.0)), float(rng.uniform(0.0, 0.1))
                budget = _budget(prob, costs, rng, scale, offset, blocks)
                inp = SolveInput(prob, costs, budget, scale, offset, blocks)
                brute = solve_brute(inp)
                dp = solve_dp(inp)
                assert dp.method == "dp"
                _feasible(inp, dp)
                assert_plan_well_formed(prob, dp, inp.removable_blocks)
                if not blocks:
                    assert dp.removed_blocks == []
                # never better than the optimum
                assert dp.objective <= brute.objective + 1e-9 * abs(brute.objective)
                gaps.append((brute.objective - dp.objective) / abs(brute.objective))
    assert len(gaps) > 40
    assert float(np.mean(gaps)) < 0.05, gaps


def test_dp_generous_budget_keeps_everything(problems):
    prob, costs = problems["residual"]
    dense = dense_raw_latency(SolveInput(prob, costs, 1.0))
    plan = solve_dp(SolveInput(prob, costs, dense * 1.01))
    assert plan.kept == {} and plan.removed_blocks == []


@pytest.mark.parametrize("name,blocks", [("residual", True), ("concat", False), ("depthwise", True)])
def test_dp_rejects_budget_below_minimum(problems, name, blocks):
    prob, costs = problems[name]
    inp = SolveInput(prob, costs, 1.0, 1.5, 0.02, blocks)
    smallest = 1.5 * min_raw_latency(inp) + 0.02
    with pytest.raises(InputError, match="smallest reachable latency"):
        solve_dp(SolveInput(prob, costs, smallest * 0.9, 1.5, 0.02, blocks))
    plan = solve_dp(SolveInput(prob, costs, smallest * (1 + 1e-6), 1.5, 0.02, blocks))
    assert plan.predicted_ms <= smallest * (1 + 1e-6)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_dp_at_exactly_the_smallest_latency(problems):
    prob, costs = problems["unsupported"]
    smallest = min_raw_latency(SolveInput(prob, costs, 1.0, allow_block_removal=False))
    inp = SolveInput(prob, costs, smallest, allow_block_removal=False)
    brute = solve_brute(inp)  # the budget is reachable
    plan = solve_dp(inp)
    _feasible(inp, plan)
    assert plan.objective == pytest.approx(brute.objective, rel=1e-9)


# ---- separable problems: the linearisation is exact ----------------------------------------

def parallel_cnn(widths=(16, 24, 32, 40), seed: int = 0):
    """Parallel branches conv(3→w)-relu-conv(w→10, 1x1) summed into the head: every layer
    reads or writes exactly one prunable group (and no block), so the DP is separable."""
    g = GraphBuilder(seed=seed)
    outs = [g.conv(g.relu(g.conv("input", 3, w)), w, 10, k=1) for w in widths]
    s = outs[0]
    for o in outs[1:]:
        s = g.node("Add", [s, o])
    return g.build(g.node("Flatten", [g.node("GlobalAveragePool", [s])], axis=1), "parallel")


def test_dp_is_exact_on_a_separable_problem():
    prob = analyse(parallel_cnn(), step=8, max_candidates=8).problem
    prunable = [g for g in prob.groups if g.prunable]
    assert len(prunable) == 4 and not prob.blocks
    for layer in prob.layers:  # the premise: one prunable group per layer
        gids = {gid for gid, _ in layer.c_in.terms + layer.c_out.terms if prob.groups[gid].prunable}
        assert len(gids) == 1
    costs = _table_costs(prob, seed=3)
    rng = np.random.default_rng(5)
    for g in prob.groups:
        g.importance = [1.0] * g.size
    inp0 = SolveInput(prob, costs, 1.0)
    lo, hi = min_raw_latency(inp0), dense_raw_latency(inp0)
    # every reachable raw latency; budgets halfway between well-separated levels, so that the
    # DP's rounding of costs up to 1/2000 of the budget cannot matter
    levels = sorted({evaluate(inp0, dict(zip([g.id for g in prunable], c)), set())[1]
                     for c in itertools.product(*[g.candidate_widths for g in prunable])})
    budgets = [(a + b) / 2 for a, b in zip(levels, levels[1:]) if b - a > 0.01 * (hi - lo)]
    assert len(budgets) >= 5
    chosen = [budgets[int(i)] for i in np.unique(np.linspace(0, len(budgets) - 1, 10).astype(int))]
    for trial, budget in enumerate(chosen):
        for g in prob.groups:
            g.importance = [float(v) for v in rng.uniform(0.1, 2.0, g.size)]
        inp = SolveInput(prob, costs, budget)
        brute = solve_brute(inp)
        dp = solve_dp(inp)
        _feasible(inp, dp)
        assert dp.objective == pytest.approx(brute.objective, rel=1e-12), trial


def _table_costs(prob, seed: int):
    """Layer costs of `prob` from a made-up table (test_solver._fill_table)."""
    table = LatencyTable(":memory:", FAKE_FP)
    try:
        _fill_table(table, prob, seed=seed)
        return layer_costs(prob, table)
    finally:
        table.close()


def _vit_problem(seed: int = 0, max_candidates: int = 4, **shape):
    """A ViT (default 2 blocks: heads and MLP widths, 4 removable branches) with the residual
    stream kept, as the pipeline does for attention models: every layer moves with one unit,
    so its MILP is a multiple-choice knapsack."""
    analysis = analyse(vit_like(seed=seed, **shape), step=8, max_candidates=max_candidates)
    apply_stream_policy(analysis)
    return analysis.problem, _table_costs(analysis.problem, seed)


def test_knapsack_bound_holds_and_lets_the_milp_stop_within_its_gap():
    """separable_upper_bound is never below the brute-force optimum, and the MILP stopped at
    its first plan within mip_rel_gap of the bound is within that gap of the optimum; overhead
    terms of a group kept whole after analysis (the stream) are fixed widths (a KeyError once)."""
    prob, costs = _vit_problem()
    assert prob.blocks and sum(g.prunable for g in prob.groups) >= 4
    rng = np.random.default_rng(11)
    for trial in range(8):
        for g in prob.groups:
            g.importance = [float(v) for v in rng.uniform(0.1, 2.0, g.size)]
        blocks = trial % 2 == 0
        # with an overhead cost: its terms include the kept stream group (a constant)
        gap = 1e-3 if trial < 4 else 0.05  # a wide gap: the first plan HiGHS finds may do
        kw = dict(allow_block_removal=blocks, mip_rel_gap=gap, ms_per_melement=200.0 * (trial % 3 == 0))
        probe = SolveInput(prob, costs, 1.0, **kw)
        lo, hi = min_raw_latency(probe), dense_raw_latency(probe)
        inp = SolveInput(prob, costs, lo + (hi - lo) * float(rng.uniform(0.05, 0.95)), **kw)
        brute = solve_brute(inp)
        bound = separable_upper_bound(inp)
        assert bound is not None and bound >= brute.objective - 1e-9, (trial, bound, brute.objective)
        milp = solve_milp(inp)
        _feasible(inp, milp)
        assert milp.objective >= brute.objective - gap * abs(bound) - 1e-9, trial
        assert bound <= brute.objective + gap * abs(bound) + 1e-9, (trial, bound, brute.objective)


def test_milp_stops_at_the_knapsack_bound_on_a_deeper_vit():
    """Six blocks of near-equal importance (the symmetric case where HiGHS proves the last
    0.1% slowly): the MILP stops at a feasible plan within its gap of the DP bound."""
    prob, costs = _vit_problem(max_candidates=16, dim=64, heads=8, depth=6)
    rng = np.random.default_rng(3)
    for g in prob.groups:
        g.importance = [1.0 + 0.01 * float(v) for v in rng.uniform(0, 1, g.size)]
    probe = SolveInput(prob, costs, 1.0)
    lo, hi = min_raw_latency(probe), dense_raw_latency(probe)
    stopped = 0
    for share in (0.3, 0.5, 0.7):
        inp = SolveInput(prob, costs, lo + (hi - lo) * share)
        plan = solve_milp(inp)
        _feasible(inp, plan)
        bound = separable_upper_bound(inp)
        assert plan.objective >= bound * (1 - inp.mip_rel_gap) - 1e-9
        stopped += "knapsack DP bound" in plan.status
    assert stopped >= 1


def test_knapsack_bound_is_none_when_a_layer_couples_two_groups(problems):
    prob, costs = problems["residual"]
    inp = SolveInput(prob, costs, dense_raw_latency(SolveInput(prob, costs, 1.0)) * 0.7)
    assert separable_upper_bound(inp) is None
    assert "knapsack" not in solve_milp(inp).status


# ---- distortion objective: DP, MILP and brute force agree ----------------------------------

def _made_up_distortion(prob, rng):
    """Increasing distortion as a group narrows (0 at full width), a positive cost per block."""
    values, orders = {}, {}
    for g in prob.groups:
        if not g.prunable:
            continue
        a, p = float(rng.uniform(0.1, 3.0)), float(rng.uniform(1.0, 3.0))
        values[g.id] = [a * (1 - w / g.size) ** p for w in g.candidate_widths]
        orders[g.id] = [int(i) for i in rng.permutation(g.size)]
    blocks = {b.id: float(rng.uniform(0.2, 2.0)) for b in prob.blocks}
    return values, blocks, orders


@pytest.mark.parametrize("name", ["residual", "depthwise", "concat", "aliased", "pad_shortcut"])
def test_dp_milp_brute_agree_on_distortion(problems, name):
    prob, costs = problems[name]
    rng = np.random.default_rng([NAMES.index(name), 42])
    gaps = []
    for blocks in (True, False):
        for _ in range(2 if name == "pad_shortcut" else 4):
            values, bvals, orders = _made_up_distortion(prob, rng)
            obj = distortion_objective(prob, values, bvals, orders)
            scale, offset = float(rng.uniform(0.5, 2.0)), float(rng.uniform(0.0, 0.1))
            budget = _budget(prob, costs, rng, scale, offset, blocks)
            inp = SolveInput(prob, costs, budget, scale, offset, blocks, time_limit_s=30,
                             mip_rel_gap=1e-9, objective=obj)
            brute, milp, dp = solve_brute(inp), solve_milp(inp), solve_dp(inp)
            for plan in (brute, milp, dp):
                _feasible(inp, plan)
                assert_plan_well_formed(prob, plan, inp.removable_blocks)
            # the plans keep the distortion ranking's first channels
            for gid, kept in dp.kept.items():
                assert kept == sorted(orders[gid][:dp.widths[gid]])
            assert brute.objective <= 0 and dp.objective <= 0
            assert milp.objective == pytest.approx(brute.objective, rel=1e-6, abs=1e-9)
            assert dp.objective <= brute.objective + 1e-9
            scale_d = sum(max(v) for v in values.values()) + sum(bvals.values())
            gaps.append((brute.objective - dp.objective) / scale_d)
    assert max(gaps) < 0.05 and float(np.mean(gaps)) < 0.01, gaps


# ---- FLOPs and parameter budgets -----------------------------------------------------------

def _flops_model():
    """conv(3→16, 3x3) - conv(16→32, 3x3, stride 2, bias) - conv(32→24, 1x1, no bias) - conv
    (24→24, 3x3, dilation 2, pad 2) - head."""
    g = GraphBuilder(seed=0)
    x = g.relu(g.conv("input", 3, 16))
    x = g.relu(g.conv(x, 16, 32, stride=2))  # 16x16 -> 8x8
    x = g.relu(g.conv(x, 32, 24, k=1, bias=False))
    w = g.init(g.rng.normal(0, 0.3, (24, 24, 3, 3)).astype(np.float32))
    x = g.relu(g.node("Conv", [x, w], kernel_shape=[3, 3], pads=[2, 2, 2, 2], dilations=[2, 2]))
    return g.build(g.head(x, 24), "flops")


def test_analytic_costs_are_textbook_counts():
    prob = analyse(_flops_model(), step=8, max_candidates=4).problem
    convs = [layer for layer in prob.layers if layer.spec.op == "Conv"]
    gemm = next(layer for layer in prob.layers if layer.spec.op == "Gemm")
    # (k, H_out·W_out, has bias) of each conv, by hand
    expect = [(3, 16 * 16, True), (3, 8 * 8, True), (1, 8 * 8, False), (3, 8 * 8, False)]
    flops = analytic_costs(prob, "flops")
    params = analytic_costs(prob, "params")
    idx = {layer.name: i for i, layer in enumerate(prob.layers)}
    for layer, (k, hw, bias) in zip(convs, expect):
        i = idx[layer.name]
        assert layer.spec.has_bias == bias
        fc, pc = flops[i], params[i]
        assert fc.ms.shape == (len(fc.in_values), len(fc.out_values))
        for a, ci in enumerate(fc.in_values):
            for b, co in enumerate(fc.out_values):
                assert fc.ms[a, b] == pytest.approx(2 * ci * co * k * k * hw / 1e6, rel=1e-12)
                assert pc.ms[a, b] == pytest.approx((ci * co * k * k + (co if bias else 0)) / 1e6, rel=1e-12)
    # the stride-2 conv at its dense widths, fully spelled out
    l2 = convs[1]
    assert layer_count(l2, 16, 32, "flops") == pytest.approx(2 * 16 * 32 * 9 * 8 * 8 / 1e6)
    assert layer_count(l2, 16, 32, "params") == pytest.approx((16 * 32 * 9 + 32) / 1e6)
    assert layer_count(gemm, 24, 10, "flops") == pytest.approx(2 * 24 * 10 / 1e6)
    assert layer_count(gemm, 24, 10, "params") == pytest.approx((24 * 10 + 10) / 1e6)
    dense = {g.id: g.size for g in prob.groups}
    for kind in ("flops", "params"):
        by_cells = sum(c.ms[c.in_values.index(layer.c_in.width(dense)),
                            c.out_values.index(layer.c_out.width(dense))]
                       for layer, c in zip(prob.layers, analytic_costs(prob, kind)))
        assert dense_count(prob, kind) == pytest.approx(by_cells, rel=1e-12)
    with pytest.raises(ValueError):
        analytic_costs(prob, "latency")


def test_depthwise_flops_cost_is_diagonal(problems):
    prob = analyse(ALL_BUILDERS["depthwise"](), step=8, max_candidates=3).problem
    costs = analytic_costs(prob, "flops")
    for layer, c in zip(prob.layers, costs):
        if layer.spec.depthwise:
            assert c.in_values == c.out_values
            for a, ch in enumerate(c.in_values):
                hw = int(np.prod(layer.spec.input_hw))
                assert c.ms[a, a] == pytest.approx(2 * ch * 9 * hw / 1e6)


def _plan_count(prob, plan, kind: str) -> float:
    full = {g.id: g.size for g in prob.groups}
    full.update(plan.widths)
    return sum(layer_count(layer, layer.c_in.width(full), layer.c_out.width(full), kind)
               for layer in prob.layers
               if layer.block is None or layer.block not in plan.removed_blocks)


@pytest.mark.parametrize("kind", ["flops", "params"])
@pytest.mark.parametrize("blocks", [True, False])
def test_count_budget_is_met_by_milp_and_dp(kind, blocks):
    prob = analyse(residual_cnn(), step=8, max_candidates=4).problem
    rng = np.random.default_rng(7)
    for g in prob.groups:
        g.importance = [float(v) for v in rng.uniform(0.1, 2.0, g.size)]
    costs = analytic_costs(prob, kind)
    dense_total = dense_count(prob, kind)
    limit = 0.5 * dense_total
    inp = SolveInput(prob, costs, limit, allow_block_removal=blocks)
    assert dense_raw_latency(inp) == pytest.approx(dense_total, rel=1e-12)
    for plan in (solve_milp(inp), solve_dp(inp)):
        counted = _plan_count(prob, plan, kind)
        assert counted <= limit * (1 + 1e-9), (plan.method, counted, limit)
        assert plan.predicted_ms == pytest.approx(counted, rel=1e-9)
        assert counted > 0.2 * dense_total  # it does not throw away more than needed
        if not blocks:
            assert plan.removed_blocks == []
