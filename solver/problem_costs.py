"""The solver's view of a problem: per-group choices, per-layer cost matrices, budget."""
from __future__ import annotations

from dataclasses import dataclass, field


from latprune.types import Plan, Problem
from latprune.solver.objective import Objective, importance_objective


@dataclass
class SolveInput:
    """Everything a solver needs, as plain arrays.

    costs[l] is layer l's latency matrix (ms) over in_values × out_values (see
    lut.predict.LayerCost). The constraint is
        scale·Σ layer ms + ms_per_melement·(overhead elements / 1e6) + offset ≤ budget_ms,
    handled as "raw" ≤ raw_budget where raw = Σ layer ms + overhead_coef·elements.
    """

    problem: Problem
    costs: list  # list[LayerCost]
    budget_ms: float
    scale: float = 1.0
    offset_ms: float = 0.0
    allow_block_removal: bool = True
    time_limit_s: float = 60.0
    removable_blocks: list[int] = field(default_factory=list)
    mip_rel_gap: float = 1e-3  # exact solvers stop within this relative gap of the optimum
    ms_per_melement: float = 0.0  # calibrated cost of overhead elements (lut.store.Calibration)
    objective: Objective | None = None  # None: retained importance (solver.objective)

    def __post_init__(self) -> None:
        if self.objective is None:
            self.objective = importance_objective(self.problem)
        if self.allow_block_removal and not self.removable_blocks:
            self.removable_blocks = [b.id for b in self.problem.blocks]
        if not self.allow_block_removal:
            self.removable_blocks = []

    @property
    def overhead_coef(self) -> float:
        """Raw ms per overhead element (ms_per_melement / scale / 1e6)."""
        return self.ms_per_melement / self.scale / 1e6

    @property
    def raw_budget(self) -> float:
        """Budget on the raw sum of layer latencies."""
        return (self.budget_ms - self.offset_ms) / self.scale


def evaluate(inp: SolveInput, widths: dict[int, int], removed: set[int]) -> tuple[float, float]:
    """(objective, raw latency ms) of a width assignment, straight from the cost matrices."""
    prob = inp.problem
    full = {g.id: widths.get(g.id, g.size) for g in prob.groups}
    for g in prob.groups:
        if g.inner_of_block is not None and g.inner_of_block in removed:
            full[g.id] = 0
    raw = 0.0
    for layer, cost in zip(prob.layers, inp.costs):
        if layer.block is not None and layer.block in removed:
            continue
        ci, co = layer.c_in.width(full), layer.c_out.width(full)
        i = cost.in_values.index(ci)
        j = i if layer.spec.depthwise else cost.out_values.index(co)
        raw += float(cost.ms[i, j])
    if inp.ms_per_melement:
        # Mirrors the MILP: group terms count at the group's width (0 for a removed block's
        # inner groups), fixed elements only while their block is kept.
        elements = sum((o.space.fixed if o.block is None or o.block not in removed else 0)
                       + sum(m * full[g] for g, m in o.space.terms) for o in prob.overheads)
        raw += inp.overhead_coef * elements
    objective = inp.objective
    obj = sum(objective.value(prob, g.id, full[g.id]) for g in prob.groups if g.prunable)
    obj += sum(objective.block_values.get(b, 0.0) for b in removed)
    return obj, raw


def make_plan(problem: Problem, widths: dict[int, int], removed: set[int], method: str,
              objective: Objective | None = None) -> Plan:
    """Keep the first `widths[g]` channels of every prunable group in the objective's ranking
    (default: by `group.importance`)."""
    objective = objective or importance_objective(problem)
    kept: dict[int, list[int]] = {}
    out_widths: dict[int, int] = {}
    for g in problem.groups:
        if not g.prunable:
            continue
        w = widths.get(g.id, g.size)
        if g.inner_of_block is not None and g.inner_of_block in removed:
            w = 0
        out_widths[g.id] = w
        if w != g.size:
            kept[g.id] = objective.kept(g.id, g.size, w)
    return Plan(kept=kept, removed_blocks=sorted(removed), widths=out_widths, method=method)


def min_raw_latency(inp: SolveInput) -> float:
    """Raw latency with every group at its smallest width and every removable block removed
    (the smallest reachable latency when latency grows with width)."""
    widths = {g.id: g.candidate_widths[0] for g in inp.problem.groups if g.prunable}
    return evaluate(inp, widths, set(inp.removable_blocks))[1]


def dense_raw_latency(inp: SolveInput) -> float:
    return evaluate(inp, {}, set())[1]


def assert_feasible_budget(inp: SolveInput) -> None:
    from latprune.types import InputError

    smallest = inp.scale * min_raw_latency(inp) + inp.offset_ms
    if inp.budget_ms < smallest:
        raise InputError(
            f"budget {inp.budget_ms:.3f} ms is below the smallest reachable latency "
            f"{smallest:.3f} ms (every group at its minimum width"
            f"{', every removable block removed' if inp.removable_blocks else ''})")

