"""Channel importance from weight magnitudes (data-free; the default).

Each channel of a group is produced by one or more layers (a conv's output channel, tied by
residual adds to other convs' output channels). Its score is the *sum*, over those producing
layers, of the channel's weight-slice norm divided by the sum of that layer's channel norms.
So every producing layer is worth 1 in total (a data-free prior: cutting half of a layer's
channels costs 0.5 wherever the layer is; within a layer the smaller-norm channels go first),
and a residual channel written by nine blocks counts nine times a channel private to one
block (HALP's group importance is a sum too).
The solver maximises the sum of kept scores (MDP/HALP style retained importance).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from latprune.types import Problem


def magnitude_importance(problem: Problem, slices: dict[int, list[tuple[str, int, np.ndarray]]],
                         norm: str = "l1") -> None:
    """Fill `group.importance` for every group. `slices[gid]` lists (layer key, channel
    position in the group, that channel's weight slice) for every producing layer."""
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be l1 or l2, not {norm!r}")
    block_of = {layer.name: layer.block for layer in problem.layers if layer.block is not None}
    for b in problem.blocks:
        b.importance = 0.0
    for g in problem.groups:
        rows = slices.get(g.id, [])
        if not rows:
            g.importance = [1.0] * g.size
            continue
        by_layer: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for key, pos, w in rows:
            w = np.asarray(w, dtype=np.float64).ravel()
            val = np.abs(w).sum() / max(w.size, 1) if norm == "l1" else np.sqrt((w * w).mean())
            by_layer[key].append((pos, float(val)))
        total = np.zeros(g.size)
        count = np.zeros(g.size)
        for entries in by_layer.values():
            layer_sum = sum(v for _, v in entries) or 1.0
            for pos, v in entries:
                total[pos] += v / layer_sum
                count[pos] += 1
        score = np.where(count > 0, total, 1.0)
        g.importance = [float(s) for s in score]
        # A removable block's value: the scores its layers add to groups outside the block
        # (e.g. its last conv writing the residual channels). Removing the block loses them.
        for key, entries in by_layer.items():
            b = block_of.get(key)
            if b is not None and g.inner_of_block != b:
                problem.blocks[b].importance += 1.0  # the layer's whole share of the group


def apply_scores(problem: Problem, scores: dict[int, list[float]]) -> None:
    """Replace the within-group ranking with data-driven `scores` (one per channel position),
    rescaled so each group keeps its magnitude-importance total: the retained-importance
    objective keeps the data-free prior's weights between groups, the new scores decide which
    channels go first within a group. Groups without scores keep their magnitude scores."""
    for g in problem.groups:
        s = scores.get(g.id)
        if s is None or not g.prunable:
            continue
        s = np.maximum(np.asarray(s, dtype=np.float64), 0.0)
        total = float(np.sum(g.importance)) or float(g.size)
        g.importance = [float(v) for v in (s / s.sum() * total if s.sum() > 0 else np.full(g.size, total / g.size))]
