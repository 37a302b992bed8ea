"""What the solvers maximise: a value per (group, candidate width) and per removed block.

Both objectives of the seed papers are additive over choices, so every solver (MILP, DP,
MINLP, brute force, baselines) sees the same plain tables:

- **importance** (MDP/HALP): value of group g at width w = cumulative importance of its w best
  channels; removing block b loses the importance it writes outside itself.
- **distortion** (seed 000): value = −D_g(w), the output distortion (MSE of the logits on
  calibration inputs) when only group g is cut to w channels; removing block b alone costs
  −D_b. Maximising the value minimises the summed (additive) distortion.

`orders[g]` ranks the group's channel positions, most valuable first: a plan keeps the first
w of them (the same ranking the distortion curve was measured with).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from latprune.types import Problem


@dataclass
class Objective:
    name: str
    group_values: dict[int, list[float]]  # group id -> value at each candidate width
    block_values: dict[int, float] = field(default_factory=dict)  # block id -> value if removed
    orders: dict[int, list[int]] = field(default_factory=dict)  # group id -> positions, best first

    def value(self, problem: Problem, gid: int, width: int) -> float:
        """Value of group `gid` at `width` (0 when the group is emptied by a block removal)."""
        if width <= 0:
            return 0.0
        cands = problem.groups[gid].candidate_widths
        return self.group_values[gid][cands.index(width)]

    def kept(self, gid: int, size: int, width: int) -> list[int]:
        order = self.orders.get(gid, list(range(size)))
        return sorted(order[:width])


def ranking(scores: list[float]) -> list[int]:
    """Positions by descending score (ties: lower index first)."""
    return [int(i) for i in np.argsort(-np.asarray(scores, dtype=float), kind="stable")]


def importance_objective(problem: Problem) -> Objective:
    """Retained importance from `group.importance` and `block.importance` (solver.importance)."""
    values, orders = {}, {}
    for g in problem.groups:
        if not g.prunable:
            continue
        order = ranking(g.importance)
        cum = np.concatenate([[0.0], np.cumsum(np.asarray(g.importance, dtype=float)[order])])
        values[g.id] = [float(cum[w]) for w in g.candidate_widths]
        orders[g.id] = order
    blocks = {b.id: -float(b.importance) for b in problem.blocks}
    return Objective("importance", values, blocks, orders)


def distortion_objective(problem: Problem, values: dict[int, list[float]], blocks: dict[int, float],
                         orders: dict[int, list[int]]) -> Objective:
    """Minus the additive output distortion: values[g][k] = D_g(candidate k), blocks[b] = D_b
    (pruner.distortion.DistortionCurves, or the Fisher estimate of solver.gradients)."""
    group_values = {gid: [-float(v) for v in vals] for gid, vals in values.items()
                    if problem.groups[gid].prunable}
    return Objective("distortion", group_values, {b: -float(v) for b, v in blocks.items()}, dict(orders))
