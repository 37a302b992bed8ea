"""Exact bilayer latency-budgeted width selection as a MILP, solved by HiGHS (highspy).

Variables
  x[g,k] ∈ {0,1}  group g keeps candidate width k      Σ_k x[g,k] = 1   (= 1 − r[b] if g is
                                                                          inner to block b)
  r[b]   ∈ {0,1}  removable block b is removed
  u[s,v] ∈ {0,1}  a space made of several groups (Concat, the CIFAR pad shortcut) has width v:
                  Σ_v u = 1,  Σ_v v·u[s,v] = fixed + Σ_(g,m) m·Σ_k w[g,k]·x[g,k]
  z[l,i,j] ≥ 0    layer l runs with input width i and output width j

A layer's input and output choices are one-hot vectors a (widths of its input space) and b
(of its output space). Its latency Σ_ij C_l[i,j]·a_i·b_j is bilinear; it is linearised exactly
by the "transportation" constraints Σ_j z_ij = a_i, Σ_i z_ij = b_j, which force z = a·bᵀ
whenever a and b are binary, and whose LP relaxation is much tighter than McCormick's.
Layers of removable blocks use Σ_j z_ij ≤ a_i, Σ_i z_ij ≤ b_j, Σ z = 1 − r[b].

maximise  Σ_g Σ_k V_g(w_k)·x[g,k] + Σ_b V_b·r[b] − ε·latency
          (V: solver.objective: retained importance, or minus the output distortion)
s.t.      Σ_l Σ_ij C_l[i,j]·z[l,i,j] + constant layers + k·overhead elements ≤ (budget − offset) / scale
          (overhead elements: fixed + Σ mult·w[g,k]·x[g,k], lut.predict; k from the calibration)
"""
from __future__ import annotations

import time

import numpy as np

from latprune.types import InputError, Plan
from latprune.solver.problem_costs import SolveInput, assert_feasible_budget, evaluate, make_plan
from latprune.solver.dp import separable_upper_bound


class _Model:
    def __init__(self) -> None:
        self.cost: list[float] = []
        self.lower: list[float] = []
        self.upper: list[float] = []
        self.integer: list[bool] = []
        self.rows: list[tuple[float, float, list[int], list[float]]] = []

    def var(self, cost: float = 0.0, lower: float = 0.0, upper: float = 1.0, integer: bool = True) -> int:
        self.cost.append(cost)
        self.lower.append(lower)
        self.upper.append(upper)
        self.integer.append(integer)
        return len(self.cost) - 1

    def row(self, lower: float, upper: float, idx: list[int], val: list[float]) -> None:
        """Add lower ≤ Σ val·x[idx] ≤ upper. Repeated indices are summed: HiGHS requires each
        column at most once per row (duplicates corrupted its memory in 1.15)."""
        merged: dict[int, float] = {}
        for i, v in zip(idx, val):
            merged[i] = merged.get(i, 0.0) + v
        self.rows.append((lower, upper, list(merged), list(merged.values())))


def solve_milp(inp: SolveInput, epsilon: float = 1e-6, verbose: bool = False) -> Plan:
    """Solve the width-selection MILP. The plan is optimal within `inp.mip_rel_gap` (relative
    objective gap; 1e-3 by default, since importance scores carry no more precision), or the
    best one found when `inp.time_limit_s` runs out (plan.status says which, plan.gap how far)."""
    import highspy

    assert_feasible_budget(inp)
    prob = inp.problem
    removable = set(inp.removable_blocks)
    t0 = time.perf_counter()
    m = _Model()
    inf = highspy.kHighsInf

    objective = inp.objective
    r = {b: m.var(cost=objective.block_values.get(b, 0.0)) for b in sorted(removable)}
    x: dict[int, list[int]] = {}
    for g in prob.groups:
        if not g.prunable:
            continue
        x[g.id] = [m.var(cost=v) for v in objective.group_values[g.id]]
        inner = g.inner_of_block if g.inner_of_block in removable else None
        if inner is None:
            m.row(1, 1, x[g.id], [1.0] * len(x[g.id]))
        else:  # Σ x + r = 1
            m.row(1, 1, x[g.id] + [r[inner]], [1.0] * (len(x[g.id]) + 1))

    space_vars: dict[str, list[int]] = {}

    def side(space, values) -> list[int | None]:
        """One-hot variables over `values` of a space; [None] when the width is fixed."""
        if len(values) == 1:
            return [None]
        if len(space.terms) == 1:
            gid, mult = space.terms[0]
            return list(x[gid])
        key = space.key()
        if key not in space_vars:
            u = [m.var() for _ in values]
            m.row(1, 1, u, [1.0] * len(u))
            idx, val = list(u), [float(v) for v in values]
            for gid, mult in space.terms:
                for var, w in zip(x[gid], prob.groups[gid].candidate_widths):
                    idx.append(var)
                    val.append(-float(mult * w))
            m.row(space.fixed, space.fixed, idx, val)
            space_vars[key] = u
        return space_vars[key]

    lat_idx: list[int] = []
    lat_val: list[float] = []
    constant_ms = 0.0
    for layer, cost in zip(prob.layers, inp.costs):
        A = side(layer.c_in, cost.in_values)
        B = A if layer.spec.depthwise else side(layer.c_out, cost.out_values)
        C = cost.ms
        in_block = layer.block in removable
        if not in_block:
            if len(A) == 1 and len(B) == 1:
                constant_ms += float(C[0, 0])
                continue
            if A is B:
                lat_idx += A
                lat_val += [float(C[i, i]) for i in range(len(A))]
                continue
            if len(A) == 1:
                lat_idx += B
                lat_val += [float(v) for v in C[0, :]]
                continue
            if len(B) == 1:
                lat_idx += A
                lat_val += [float(v) for v in C[:, 0]]
                continue
        if A is B:
            z = [m.var(integer=False) for _ in A]
            for zi, ai in zip(z, A):
                if ai is not None:
                    m.row(-inf, 0, [zi, ai], [1.0, -1.0])
            lat_idx += z
            lat_val += [float(C[i, i]) for i in range(len(A))]
            zs = z
        else:
            z = [[m.var(integer=False) for _ in B] for _ in A]
            eq = not in_block
            for i, ai in enumerate(A):
                if ai is not None:
                    m.row(0 if eq else -inf, 0, z[i] + [ai], [1.0] * len(B) + [-1.0])
            for j, bj in enumerate(B):
                if bj is not None:
                    col = [z[i][j] for i in range(len(A))]
                    m.row(0 if eq else -inf, 0, col + [bj], [1.0] * len(A) + [-1.0])
            for i in range(len(A)):
                lat_idx += z[i]
                lat_val += [float(v) for v in C[i, :]]
            zs = [v for row in z for v in row]
        if in_block:  # Σ z + r = 1 (outside blocks the equality marginals force Σ z = 1)
            m.row(1.0, 1.0, zs + [r[layer.block]], [1.0] * len(zs) + [1.0])

    coef = inp.overhead_coef
    if coef:
        for o in prob.overheads:  # memory-bound work outside the layers, linear in widths
            constant_ms += coef * o.space.fixed
            if o.block in removable:  # the fixed part goes with the block: ·(1 − r_b)
                lat_idx.append(r[o.block])
                lat_val.append(-coef * o.space.fixed)
            for gid, mult in o.space.terms:
                for var, w in zip(x[gid], prob.groups[gid].candidate_widths):
                    lat_idx.append(var)
                    lat_val.append(coef * mult * w)
    limit = inp.raw_budget - constant_ms
    m.row(-inf, limit, lat_idx, lat_val)
    for i, v in zip(lat_idx, lat_val):  # tie-break towards lower latency
        m.cost[i] -= epsilon * v

    h = _new_highs(verbose)
    h.setOptionValue("output_flag", verbose)
    h.setOptionValue("time_limit", float(inp.time_limit_s))
    h.setOptionValue("mip_rel_gap", float(inp.mip_rel_gap))
    h.setOptionValue("random_seed", 0)
    h.setOptionValue("threads", 1)
    lp = highspy.HighsLp()
    n = len(m.cost)
    lp.num_col_ = n
    lp.num_row_ = len(m.rows)
    lp.col_cost_ = np.asarray(m.cost)
    lp.col_lower_ = np.asarray(m.lower)
    lp.col_upper_ = np.asarray(m.upper)
    lp.row_lower_ = np.asarray([row[0] for row in m.rows], dtype=float)
    lp.row_upper_ = np.asarray([row[1] for row in m.rows], dtype=float)
    lp.sense_ = highspy.ObjSense.kMaximize
    starts, index, value = [0], [], []
    for row in m.rows:
        index += row[2]
        value += row[3]
        starts.append(len(index))
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.start_ = np.asarray(starts, dtype=np.int32)
    lp.a_matrix_.index_ = np.asarray(index, dtype=np.int32)
    lp.a_matrix_.value_ = np.asarray(value, dtype=float)
    lp.a_matrix_.num_col_ = n
    lp.a_matrix_.num_row_ = len(m.rows)
    lp.integrality_ = [highspy.HighsVarType.kInteger if f else highspy.HighsVarType.kContinuous
                       for f in m.integer]
    h.passModel(lp)
    # A separable problem (a knapsack: ViTs with their residual stream kept, most depthwise
    # stacks) has a DP bound that proves the gap at once: stop at the first plan within
    # mip_rel_gap of it instead of letting branch and bound close the last 0.1% by enumeration.
    bound = separable_upper_bound(inp)
    if bound is not None:
        h.setOptionValue("objective_target", bound - inp.mip_rel_gap * abs(bound))
    h.run()
    status = h.modelStatusToString(h.getModelStatus())
    info = h.getInfo()
    if info.primal_solution_status != 2:  # kSolutionStatusFeasible
        raise InputError(f"no plan meets the budget {inp.budget_ms:.3f} ms (HiGHS: {status})")
    sol = np.asarray(h.getSolution().col_value)
    widths = {}
    for gid, vars_ in x.items():
        vals = sol[vars_]
        k = int(np.argmax(vals))
        widths[gid] = prob.groups[gid].candidate_widths[k] if vals[k] > 0.5 else 0
    removed = {b for b, v in r.items() if sol[v] > 0.5}
    plan = make_plan(prob, widths, removed, "milp", objective)
    obj, raw = evaluate(inp, widths, removed)
    plan.objective = obj
    plan.predicted_ms = inp.scale * raw + inp.offset_ms
    plan.solve_seconds = time.perf_counter() - t0
    plan.status = status
    plan.gap = float(info.mip_gap) if np.isfinite(info.mip_gap) else 0.0
    if bound is not None and h.getModelStatus() == highspy.HighsModelStatus.kObjectiveTarget:
        plan.status = "Optimal (within the gap of the knapsack DP bound)"
        plan.gap = max(0.0, (bound - obj) / abs(bound)) if bound else 0.0
    return plan


def _new_highs(verbose: bool = False):
    """A highspy.Highs instance. highspy 1.16 prints a banner on stdout (file descriptor 1,
    from C) when one is made, which would corrupt `--json` output: it goes to /dev/null."""
    import os
    import sys

    import highspy

    if verbose:
        return highspy.Highs()
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            return highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
