"""The MDP paper's MINLP (Sun et al., SEEDS §2), in Pyomo, with the bilinear latency kept.

One Pyomo model of the same problem as solver.milp, but the per-layer latency aᵀ·C·b stays a
product of the input-side and output-side one-hot vectors instead of being linearised:

  x[g,k] ∈ {0,1}  group g keeps candidate width k     Σ_k x = 1  (Σ_k x + r[b] = 1 for a group
                                                                  inner to removable block b)
  r[b]   ∈ {0,1}  removable block b is removed
  u[s,v] ∈ {0,1}  width v of a space made of several groups: Σ_v u = 1,
                  Σ_v v·u = fixed + Σ_(g,m) m·Σ_k w_k·x[g,k]            (as in solver.milp)
  y      ∈ {0,1}  a side of a layer in removable block b that b's removal does not already empty:
                  y_i ≤ a_i, Σ y + r[b] = 1   (so y = a·(1 − r[b]): the layer vanishes with b)

  maximise  Σ V_g(w_k)·x[g,k] + Σ V_b·r[b]                         (solver.objective)
  s.t.      Σ_l a_lᵀ C_l b_l + constant layers + k·overhead elements ≤ raw budget

Sides, costs, overheads and blocks are read exactly as solver.milp's `side()` reads them, so
`evaluate()` of the returned plan equals the model's latency.

Two solvers:

- ``solver="scip"``: SCIP (the pyscipopt wheel) through Pyomo's ``scip_direct``, on the plain
  bilinear constraint, which SCIP solves to global optimality (limits/gap = inp.mip_rel_gap).
- ``solver="mindtpy"``: Pyomo's MindtPy, Outer Approximation, as in the MDP paper (Feasibility
  Pump initialisation, falling back to the relaxed NLP if MindtPy raises in it; MIP master
  HiGHS through ``appsi_highs``; NLP subsolver ``cyipopt``). OA is exact only for a *convex*
  constraint, and aᵀCb is not convex: linearising it at a point cuts off feasible plans (the
  paper's use is a heuristic). MindtPy therefore gets an equivalent convex constraint, equal to
  the latency at every integer point, so its OA cuts are valid and its answer is optimal within
  the gap. Per layer with both widths free:
    * C is double-centred, C = C' + p·1ᵀ + 1·qᵀ − m·11ᵀ. On one-hot a, b with Σa = Σb = s ∈
      {0, 1} (s = 1 − r[b] in a removable block, hence the y masks on both sides there),
      aᵀCb = aᵀC'b + pᵀa + qᵀb − m·s: the row and column parts are linear.
    * C' = Σ_k σ_k·u_k·v_kᵀ (SVD, σ_k ≥ 0), and (uᵀa)(vᵀb) = ½(uᵀa + vᵀb)² − ½(uᵀa)² − ½(vᵀb)²
      where (uᵀa)² = Σ u_i²·a_i on a one-hot (or zero) a. So aᵀC'b = Σ_k ½σ_k(u_kᵀa + v_kᵀb)²
      minus linear terms: a sum of convex squares. (A uniform λ·Σ(a_i² − a_i) shift also
      convexifies, but its cuts were so weak that OA made no progress on ResNet-50 in 120 s.)
  Each layer's squares, expanded into one PSD quadratic form, bound a continuous t_l
  (vᵀQ_l·v ≤ t_l, linear part + Σ t_l ≤ budget): OA cuts each layer separately, MindtPy's
  symbolic derivatives stay small, and its fixed-integer NLP keeps free variables.
  MindtPy checks its time limit only between subproblems (and may solve one more MIP to fix
  its bound), so it is given TIME_SHARE of the time left. Measured on ResNet-50 (bench/
  minlp_probe.py, fake bilinear table, 16 widths per group): at 0.5× the dense latency OA
  proves the optimum in ~15 s (HiGHS MILP ~2 s, SCIP ~11 s); at 0.3× the feasibility pump
  finds a plan 4.6% below the optimum and OA has not closed its 6% gap by 120 s.

NLP subsolver for MindtPy (what works on this Debian 12 machine; see scripts/install_ipopt.sh):
no ``ipopt`` executable is packaged by Debian 12 or on PyPI without a download, but
  apt-get install -y coinor-libipopt-dev pkg-config liblapack-dev libblas-dev libamplsolver-dev
  .venv/bin/python -m pip install cyipopt scipy
builds cyipopt 1.7 against Debian's Ipopt 3.11.9, and Pyomo's cyipopt interface (PyNumero)
additionally needs its ``pynumero_ASL`` library, which ``pyomo build-extensions`` would download;
the script compiles it instead from the source Pyomo ships (pyomo/contrib/pynumero/src/
AmplInterface.cpp) against Debian's libamplsolver into ``.venv/lib/libpynumero_ASL.so``,
which this module points PyNumero at when Pyomo's own search finds none.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from latprune.types import InputError, Plan
from latprune.solver.problem_costs import SolveInput, assert_feasible_budget, evaluate, make_plan

SOLVERS = ("mindtpy", "scip")
TIME_SHARE = 0.8  # of the time left given to MindtPy (it overshoots its limit)
INSTALL_HINT = "install with: pip install 'latprune[minlp]'"
IPOPT_HINT = ("MindtPy needs an NLP subsolver (cyipopt with PyNumero's ASL library): run "
              "scripts/install_ipopt.sh (apt-get install coinor-libipopt-dev pkg-config "
              "liblapack-dev libblas-dev libamplsolver-dev; pip install cyipopt scipy; builds "
              ".venv/lib/libpynumero_ASL.so), or use solver='scip'")


def _import_pyomo():
    try:
        import pyomo.environ as pyo
    except ImportError as e:
        raise InputError(f"the MINLP solver needs Pyomo ({e}); {INSTALL_HINT}") from None
    return pyo


def pynumero_asl_path() -> Path:
    """Where scripts/install_ipopt.sh puts PyNumero's ASL library (inside the venv)."""
    return Path(sys.prefix) / "lib" / "libpynumero_ASL.so"


def nlp_subsolver_available() -> tuple[bool, str]:
    """(True, "") when MindtPy can use cyipopt here, else (False, what is missing)."""
    _import_pyomo()
    try:
        import cyipopt  # noqa: F401
    except ImportError as e:
        return False, f"cyipopt is not importable ({e})"
    try:
        import scipy  # noqa: F401  (PyNumero imports it)
    except ImportError as e:
        return False, f"scipy is not importable ({e})"
    from pyomo.contrib.pynumero.asl import AmplInterface

    if not AmplInterface.available():
        local = pynumero_asl_path()
        if not local.exists():
            return False, f"PyNumero's ASL library is missing (looked in Pyomo's paths and {local})"
        AmplInterface.libname = str(local)
    return True, ""


class _Builder:
    """Collects the model: x, r, u, y (binary), the latency as linear + bilinear + convexifying
    terms, and the constant part."""

    def __init__(self, pyo, inp: SolveInput, convexify: bool) -> None:
        self.pyo = pyo
        self.inp = inp
        self.convexify = convexify
        m = self.m = pyo.ConcreteModel(name="latprune_minlp")
        m.v = pyo.VarList(domain=pyo.Binary)
        m.cons = pyo.ConstraintList()
        self.lin: dict[int, float] = {}  # var index -> coefficient (latency, linear part)
        self.quad: dict[tuple[int, int], float] = {}  # (i, j) -> coefficient of v_i·v_j
        # convex form: (c, [(var, coef)], range of Σ coef·v, layer) for each c·(Σ coef·v)²
        self.squares: list[tuple[float, list[tuple[int, float]], tuple[float, float], int]] = []
        self.n_square_layers = 0
        self.constant = 0.0
        self.masks: dict[tuple[int, int], list] = {}

    def var(self) -> int:
        v = self.m.v.add()
        return v.index()

    def __getitem__(self, i: int):
        return self.m.v[i]

    def add_lin(self, i: int | None, c: float) -> None:
        if i is None:
            self.constant += c
        elif c:
            self.lin[i] = self.lin.get(i, 0.0) + c

    def add_quad(self, i: int, j: int, c: float) -> None:
        if c:
            key = (i, j) if i <= j else (j, i)
            self.quad[key] = self.quad.get(key, 0.0) + c

    def latency_expr(self):
        """The linear and bilinear part (the convex form's squares are added per layer)."""
        v = self.m.v
        terms = [c * v[i] for i, c in sorted(self.lin.items())]
        terms += [c * v[i] * v[j] for (i, j), c in sorted(self.quad.items())]
        return self.pyo.quicksum(terms)


def build_model(inp: SolveInput, convexify: bool = False):
    """The Pyomo model of `inp`: (model, x, r) with x[gid] the indices (in model.v) of group
    gid's one-hot over its candidate widths and r[block] the removal binaries. `convexify`
    writes the latency as the convex function described in the module docstring (equal to
    aᵀCb at every integer point) instead of the plain bilinear form."""
    pyo = _import_pyomo()
    prob = inp.problem
    removable = set(inp.removable_blocks)
    bld = _Builder(pyo, inp, convexify)
    m, V = bld.m, bld

    objective = inp.objective
    obj_terms = []
    r = {b: bld.var() for b in sorted(removable)}
    for b, i in r.items():
        obj_terms.append(objective.block_values.get(b, 0.0) * V[i])
    x: dict[int, list[int]] = {}
    inner_of: dict[int, int] = {}  # id(list of x) of an inner group -> its removable block
    for g in prob.groups:
        if not g.prunable:
            continue
        x[g.id] = [bld.var() for _ in g.candidate_widths]
        obj_terms += [val * V[i] for val, i in zip(objective.group_values[g.id], x[g.id])]
        onehot = pyo.quicksum(V[i] for i in x[g.id])
        if g.inner_of_block in removable:
            m.cons.add(onehot + V[r[g.inner_of_block]] == 1)
            inner_of[id(x[g.id])] = g.inner_of_block
        else:
            m.cons.add(onehot == 1)
    m.obj = pyo.Objective(expr=pyo.quicksum(obj_terms), sense=pyo.maximize)

    def width_terms(space):
        """(fixed part, [(var, width·mult)]) of a space's width; non-prunable groups are fixed."""
        fixed, terms = space.fixed, []
        for gid, mult in space.terms:
            if gid in x:
                terms += [(i, mult * w) for i, w in zip(x[gid], prob.groups[gid].candidate_widths)]
            else:
                fixed += mult * prob.groups[gid].size
        return fixed, terms

    space_vars: dict[str, list[int]] = {}

    def side(space, values) -> list:
        """One-hot variables over `values` of a space; [None] when the width is fixed."""
        if len(values) == 1:
            return [None]
        if len(space.terms) == 1 and space.terms[0][0] in x:
            return x[space.terms[0][0]]
        key = space.key()
        if key not in space_vars:
            u = [bld.var() for _ in values]
            m.cons.add(pyo.quicksum(V[i] for i in u) == 1)
            fixed, terms = width_terms(space)
            m.cons.add(pyo.quicksum(float(v) * V[i] for v, i in zip(values, u))
                       == fixed + pyo.quicksum(float(c) * V[i] for i, c in terms))
            space_vars[key] = u
        return space_vars[key]

    def mask(S: list, b: int) -> list:
        """y = S·(1 − r[b]): y_i ≤ S_i, Σ y + r[b] = 1."""
        key = (id(S), b)
        if key not in bld.masks:
            y = [bld.var() for _ in S]
            for yi, si in zip(y, S):
                m.cons.add(V[yi] <= V[si])
            m.cons.add(pyo.quicksum(V[i] for i in y) + V[r[b]] == 1)
            bld.masks[key] = y
        return bld.masks[key]

    for layer, cost in zip(prob.layers, inp.costs):
        A = side(layer.c_in, cost.in_values)
        B = A if layer.spec.depthwise else side(layer.c_out, cost.out_values)
        C = np.asarray(cost.ms, dtype=float)
        blk = layer.block if layer.block in removable else None
        if blk is not None:
            fixed_a, fixed_b = A[0] is None, B[0] is None
            if fixed_a and fixed_b:  # C00·(1 − r)
                bld.add_lin(None, float(C[0, 0]))
                bld.add_lin(r[blk], -float(C[0, 0]))
                continue

            def masked(S):
                return inner_of.get(id(S)) == blk

            if A is B:
                if not masked(A):
                    A = B = mask(A, blk)
            elif convexify or not (masked(A) or masked(B)):
                # the convex form needs Σa = Σb; the bilinear one only needs one side emptied
                if not fixed_a and not masked(A):
                    A = mask(A, blk)
                if not fixed_b and not masked(B) and (convexify or fixed_a):
                    B = mask(B, blk)
        if A[0] is None and B[0] is None:
            bld.add_lin(None, float(C[0, 0]))
        elif A is B:
            for i, a in enumerate(A):
                bld.add_lin(a, float(C[i, i]))
        elif A[0] is None:
            for j, b in enumerate(B):
                bld.add_lin(b, float(C[0, j]))
        elif B[0] is None:
            for i, a in enumerate(A):
                bld.add_lin(a, float(C[i, 0]))
        elif not convexify:
            for i, a in enumerate(A):
                for j, b in enumerate(B):
                    bld.add_quad(a, b, float(C[i, j]))
        else:
            p, q, mean = C.mean(axis=1), C.mean(axis=0), float(C.mean())
            Cc = C - p[:, None] - q[None, :] + mean
            for i, a in enumerate(A):
                bld.add_lin(a, float(p[i]))
            for j, b in enumerate(B):
                bld.add_lin(b, float(q[j]))
            if blk is None:  # s = 1
                bld.add_lin(None, -mean)
            else:  # s = 1 − r
                bld.add_lin(None, -mean)
                bld.add_lin(r[blk], mean)
            # C' = Σ σ_k·u_k·v_kᵀ and (uᵀa)(vᵀb) = ½(uᵀa + vᵀb)² − ½(uᵀa)² − ½(vᵀb)², where
            # (uᵀa)² = Σ u_i²·a_i on a one-hot (or zero) a: convex squares + linear terms
            U, sig, Vt = np.linalg.svd(Cc, full_matrices=False)
            keep = sig > 1e-13 * max(float(sig[0]), 1e-300)
            bld.n_square_layers += 1
            for k in np.flatnonzero(keep):
                u, w, half = U[:, k], Vt[k, :], 0.5 * float(sig[k])
                form = [(a, float(u[i])) for i, a in enumerate(A)]
                form += [(b, float(w[j])) for j, b in enumerate(B)]
                lo = min(0.0, float(u.min() + w.min()))  # z = u_i + v_j (or 0 if masked)
                hi = max(0.0, float(u.max() + w.max()))
                bld.squares.append((half, form, (lo, hi), bld.n_square_layers - 1))
                for i, a in enumerate(A):
                    bld.add_lin(a, -half * float(u[i]) ** 2)
                for j, b in enumerate(B):
                    bld.add_lin(b, -half * float(w[j]) ** 2)

    coef = inp.overhead_coef
    if coef:
        for o in prob.overheads:  # memory-bound work outside the layers, linear in widths
            fixed, terms = width_terms(o.space)
            bld.add_lin(None, coef * o.space.fixed)
            bld.add_lin(None, coef * (fixed - o.space.fixed))  # non-prunable group terms
            if o.block in removable:  # the fixed part goes with the block: ·(1 − r_b)
                bld.add_lin(r[o.block], -coef * o.space.fixed)
            for i, c in terms:
                bld.add_lin(i, coef * c)
    m.budget_rhs = pyo.Param(initialize=inp.raw_budget - bld.constant, mutable=True)
    if convexify:
        # One epigraph variable per layer: vᵀQ_l·v ≤ t_l with Q_l = Σ_k c_k·q_k·q_kᵀ (PSD, the
        # layer's squares expanded), and linear part + Σ t_l ≤ budget. OA then cuts every
        # layer on its own (one aggregated constraint got one weak cut per iteration and
        # stalled on ResNet-50 at 0.3× budget), the expanded form keeps MindtPy's symbolic
        # derivatives small (squares of long sums made them its bottleneck), and MindtPy's
        # fixed-integer NLP keeps free variables (the NL writer refuses a model with none).
        nl = bld.n_square_layers
        quads: list[dict[tuple[int, int], float]] = [{} for _ in range(nl)]
        ub = [0.0] * nl
        for c, form, (lo, hi), g in bld.squares:
            ub[g] += c * max(lo * lo, hi * hi)
            for i, qi in form:
                for j, qj in form:
                    if i <= j:
                        key = (i, j)
                        quads[g][key] = quads[g].get(key, 0.0) + c * qi * qj * (1 if i == j else 2)

        def layer_rule(_, g):
            return pyo.quicksum(q * m.v[i] * m.v[j] for (i, j), q in sorted(quads[g].items())
                                if q) - m.t[g] <= 0

        m.t = pyo.Var(range(nl), bounds=lambda _, g: (0.0, ub[g]))
        m.layer_latency = pyo.Constraint(range(nl), rule=layer_rule)
        m.latency = pyo.Constraint(
            expr=bld.latency_expr() + pyo.quicksum(m.t[g] for g in range(nl))
            <= m.budget_rhs)
    else:
        m.latency = pyo.Constraint(expr=bld.latency_expr() <= m.budget_rhs)
    return m, x, r, bld.constant


@contextlib.contextmanager
def _quiet(verbose: bool):
    """Pyomo logs deprecations and MindtPy its (expected) infeasible subproblems: hide them."""
    loggers = [logging.getLogger(name) for name in ("pyomo", "pyomo.contrib.mindtpy")]
    old = [lg.level for lg in loggers]
    if verbose:
        out = contextlib.nullcontext()
    else:
        from pyomo.common.tee import capture_output

        loggers[0].setLevel(logging.ERROR + 5)
        out = capture_output(io.StringIO(), capture_fd=True)  # HiGHS warns on stdout
    try:
        with out:
            yield
    finally:
        for lg, level in zip(loggers, old):  # MindtPy sets its logger's level and keeps it
            lg.setLevel(level)


def _read_plan(m, x, r, prob):
    widths, removed = {}, set()
    for gid, idx in x.items():
        vals = [m.v[i].value for i in idx]
        if any(v is None for v in vals):
            return None
        k = int(np.argmax(vals))
        widths[gid] = prob.groups[gid].candidate_widths[k] if vals[k] > 0.5 else 0
    for b, i in r.items():
        if m.v[i].value is None:
            return None
        if m.v[i].value > 0.5:
            removed.add(b)
    return widths, removed


def _solve_scip(m, inp: SolveInput, time_left: float, verbose: bool):
    try:
        import pyscipopt  # noqa: F401
    except ImportError as e:
        raise InputError(f"solver='scip' needs pyscipopt ({e}); {INSTALL_HINT}") from None
    try:
        from pyomo.contrib.solver.solvers.scip.scip_direct import ScipDirect
    except ImportError as e:
        raise InputError(f"solver='scip' needs Pyomo >= 6.10 (scip_direct: {e}); "
                         f"{INSTALL_HINT}") from None
    from pyomo.contrib.solver.common.results import SolutionStatus, TerminationCondition

    opt = ScipDirect()
    res = opt.solve(m, load_solutions=False, raise_exception_on_nonoptimal_result=False,
                    tee=verbose, time_limit=max(time_left, 0.01), rel_gap=float(inp.mip_rel_gap),
                    solver_options={"randomization/randomseedshift": 0,
                                    "numerics/feastol": 1e-9,
                                    "parallel/maxnthreads": 1})
    if res.solution_status in (SolutionStatus.feasible, SolutionStatus.optimal):
        res.solution_loader.load_vars()
        found = True
    else:
        found = False
    tc = res.termination_condition
    if tc == TerminationCondition.convergenceCriteriaSatisfied:
        status = "Optimal"
    elif tc == TerminationCondition.maxTimeLimit:
        status = "time limit"
    elif tc == TerminationCondition.provenInfeasible:
        status = "infeasible"
    else:
        status = str(tc.name)
    gap = None
    inc, bound = res.incumbent_objective, res.objective_bound
    if found and inc is not None and bound is not None and math.isfinite(bound):
        gap = abs(bound - inc) / max(abs(inc), 1e-10)
    return found, status, gap


def _solve_mindtpy(m, inp: SolveInput, time_left: float, init_strategy: str, verbose: bool):
    ok, why = nlp_subsolver_available()
    if not ok:
        raise InputError(f"solver='mindtpy': {why}. {IPOPT_HINT}")
    pyo = _import_pyomo()
    from pyomo.opt import TerminationCondition as tc

    gap = float(inp.mip_rel_gap)
    t0 = time.perf_counter()

    def left() -> float:
        return time_left - (time.perf_counter() - t0)

    def run(init: str):
        for v in m.v.values():
            v.set_value(None)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # MindtPy's 0/0 gap before a bound
            return pyo.SolverFactory("mindtpy").solve(
                m, strategy="OA", init_strategy=init,
                mip_solver="appsi_highs", nlp_solver="cyipopt",
                nlp_solver_args={"options": {"print_level": 0, "tol": 1e-10}},
                # MindtPy checks its limit between subproblems and may solve one more MIP to
                # fix its bound after it: keep a margin for that overshoot
                time_limit=max(1, int(TIME_SHARE * left())),
                iteration_limit=100000, stalling_limit=100000,
                relative_bound_tolerance=gap, absolute_bound_tolerance=1e-10,
                mip_solver_mipgap=max(gap, 1e-9),
                constraint_tolerance=1e-10, zero_tolerance=1e-10, variable_tolerance=1e-9,
                threads=1, tee=verbose,
                logging_level=logging.INFO if verbose else logging.CRITICAL)

    def outcome(res):
        cond = res.solver.termination_condition
        found = all(v.value is not None for v in m.v.values())
        if cond == tc.optimal:
            status = "Optimal"
        elif cond == tc.maxTimeLimit:
            status = "time limit"
        elif cond == tc.infeasible:
            status, found = "infeasible", False
        else:
            status = str(cond)
        return res, found, status

    # MindtPy raises on some subproblem outcomes, or ends without a plan (its feasibility
    # pump can stop on a nearly feasible point, then fail with "Multiple active objectives"):
    # start again from the relaxed NLP with the time left
    try:
        res, found, status = outcome(run(init_strategy))
        failure = None
    except (ValueError, RuntimeError) as e:
        res, found, status, failure = None, False, "error", e
    if not found and status != "infeasible" and init_strategy != "rNLP" and left() >= 2:
        try:
            res, found, status = outcome(run("rNLP"))
            failure = None
        except (ValueError, RuntimeError) as e:
            failure = e
    if failure is not None:
        raise InputError(f"MindtPy failed: {failure}") from None
    lb, ub = res.problem.lower_bound, res.problem.upper_bound
    g = None
    if found and lb is not None and ub is not None and math.isfinite(lb) and math.isfinite(ub):
        g = abs(ub - lb) / max(abs(lb), 1e-10)  # maximisation: lb = incumbent, ub = bound
    return found, status, g


def solve_minlp(inp: SolveInput, solver: str = "mindtpy", init_strategy: str = "FP",
                verbose: bool = False) -> Plan:
    """Solve the width-selection MINLP with the bilinear latency kept (module docstring).
    `solver`: "mindtpy" (Outer Approximation, as the MDP paper) or "scip" (global). The plan is
    optimal within `inp.mip_rel_gap`, or the best one found when `inp.time_limit_s` runs out
    (plan.status "time limit", plan.gap how far from the bound when known)."""
    if solver not in SOLVERS:
        raise InputError(f"unknown MINLP solver {solver!r} (choose from {', '.join(SOLVERS)})")
    assert_feasible_budget(inp)
    t0 = time.perf_counter()
    prob = inp.problem
    m, x, r, _ = build_model(inp, convexify=(solver == "mindtpy"))
    tol = 1e-10 * max(1.0, abs(inp.raw_budget))
    for attempt in range(3):
        time_left = float(inp.time_limit_s) - (time.perf_counter() - t0)
        for v in m.v.values():
            v.set_value(None)
        with _quiet(verbose):
            if solver == "scip":
                found, status, gap = _solve_scip(m, inp, time_left, verbose)
            else:
                found, status, gap = _solve_mindtpy(m, inp, time_left, init_strategy, verbose)
        sol = _read_plan(m, x, r, prob) if found else None
        if sol is None:
            if status == "infeasible":
                raise InputError(f"no plan meets the budget {inp.budget_ms:.3f} ms "
                                 f"(MINLP {solver}: infeasible)")
            raise InputError(f"the MINLP solver ({solver}) found no plan within "
                             f"{inp.time_limit_s:g} s ({status}); raise the time limit")
        widths, removed = sol
        obj, raw = evaluate(inp, widths, removed)
        excess = raw - inp.raw_budget
        if excess <= tol or time.perf_counter() - t0 >= inp.time_limit_s:
            break
        # the solver's feasibility tolerance let the plan exceed the budget: tighten, re-solve
        m.budget_rhs.set_value(float(m.budget_rhs.value) - 2 * excess)
    if excess > tol:
        raise InputError(f"the MINLP solver ({solver}) returned a plan over the budget by "
                         f"{inp.scale * excess:.3g} ms")
    method = "minlp-oa" if solver == "mindtpy" else "minlp-scip"
    plan = make_plan(prob, widths, removed, method, inp.objective)
    plan.objective = obj
    plan.predicted_ms = inp.scale * raw + inp.offset_ms
    plan.solve_seconds = time.perf_counter() - t0
    plan.status = status
    plan.gap = float(gap) if gap is not None and math.isfinite(gap) else 0.0  # as solver.milp
    return plan
