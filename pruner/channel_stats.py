"""Per-channel statistics read from the ONNX graph and calibration activations: the inputs of
the data-driven importance measures (solver.importance turns them into group scores).

- `bn_scale_scores`: |γ| of the BatchNormalization nodes that write a group's channels
  (network-slimming style); None when the exporter folded every BN into its conv.
- `activation_scores`: how much each channel feeds the layers that read it, from calibration
  inputs run through ONNX Runtime: Σ over consuming layers of E[a_c²]·‖W[:, c]‖², the energy
  the channel contributes to the consumers' outputs (a local, data-aware proxy of the output
  distortion its removal causes).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from latprune.pruner.analysis import Analysis, consumer_slices
from latprune.pruner.forward import Runner


def bn_scale_scores(analysis: Analysis) -> dict[int, list[float]] | None:
    """{group id: Σ |γ| per channel position} over the normalisation scales (BatchNorm γ, or
    LayerNorm γ where there is no BatchNorm) writing prunable groups."""
    inits = analysis.view().inits
    prob = analysis.problem
    scores: dict[int, np.ndarray] = {}
    by_name = {n.name: n for n in analysis.model.graph.node}
    for node_name, axes in analysis.params.items():
        for pa in axes:
            if pa.kind not in ("bn_weight", "ln_weight"):
                continue
            hit = analysis.group_positions(pa.tensor)
            gamma = inits.get(by_name[node_name].input[pa.index])
            if hit is None or gamma is None:
                continue
            values = np.abs(np.moveaxis(gamma, pa.param_axis, 0).reshape(gamma.shape[pa.param_axis], -1)[:, 0])
            for p, (g, q) in enumerate(zip(*hit)):
                if not prob.groups[int(g)].prunable:
                    continue
                arr = scores.setdefault(int(g), np.zeros(prob.groups[int(g)].size))
                arr[int(q)] += float(values[p])
    if not scores:
        return None
    return {gid: [float(v) for v in arr] for gid, arr in scores.items()}


def activation_scores(analysis: Analysis, x: np.ndarray, threads: int = 0) -> dict[int, list[float]]:
    """{group id: Σ_consumers E[a_c²]·‖W[:, c]‖² per channel position} for prunable groups."""
    prob = analysis.problem
    rows = {gid: r for gid, r in consumer_slices(analysis).items() if prob.groups[gid].prunable}
    tensors = sorted({(r.tensor, r.tensor_axis) for rs in rows.values() for r in rs})
    acts = Runner(analysis.model, [t for t, _ in tensors], threads=threads).run(x)
    energy = {}
    for t, axis in tensors:
        a = acts[t].astype(np.float64)
        axes = tuple(i for i in range(a.ndim) if i != axis)
        energy[t] = np.mean(a * a, axis=axes)
    inits = analysis.view().inits
    out: dict[int, np.ndarray] = defaultdict(lambda: None)
    for gid, rs in rows.items():
        s = np.zeros(prob.groups[gid].size)
        for r in rs:
            if r.weight is None:  # a grouped conv reads the channel with its group's filters
                s[r.group_pos] += energy[r.tensor][r.position]
                continue
            w = np.take(inits[r.weight], r.position, axis=r.weight_axis).astype(np.float64)
            s[r.group_pos] += energy[r.tensor][r.position] * float(np.sum(w * w))
        out[gid] = s
    return {gid: [float(v) for v in s] for gid, s in out.items()}
