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
from latprune.pruner.model_io import initializer_arrays


def _inits(analysis: Analysis) -> dict[str, np.ndarray]:
    inits = initializer_arrays(analysis.model)
    for node in analysis.model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            inits[node.output[0]] = inits[node.input[0]]
    return inits


def bn_scale_scores(analysis: Analysis) -> dict[int, list[float]] | None:
    """{group id: Σ |γ| per channel position} over the BN nodes writing prunable groups."""
    inits = _inits(analysis)
    prob = analysis.problem
    scores: dict[int, np.ndarray] = {}
    for node in analysis.model.graph.node:
        if node.op_type != "BatchNormalization" or node.output[0] not in analysis.atoms:
            continue
        gamma = inits.get(node.input[1])
        if gamma is None:
            continue
        for p, a in enumerate(analysis.atoms[node.output[0]]):
            hit = analysis.group_of_class.get(analysis.uf.find(int(a)))
            if hit is None or not prob.groups[hit[0]].prunable:
                continue
            arr = scores.setdefault(hit[0], np.zeros(prob.groups[hit[0]].size))
            arr[hit[1]] += abs(float(gamma[p]))
    if not scores:
        return None
    return {gid: [float(v) for v in arr] for gid, arr in scores.items()}


def activation_scores(analysis: Analysis, x: np.ndarray, threads: int = 0) -> dict[int, list[float]]:
    """{group id: Σ_consumers E[a_c²]·‖W[:, c]‖² per channel position} for prunable groups."""
    prob = analysis.problem
    rows = {gid: r for gid, r in consumer_slices(analysis).items() if prob.groups[gid].prunable}
    tensors = sorted({r[1] for rs in rows.values() for r in rs})
    acts = Runner(analysis.model, tensors, threads=threads).run(x)
    energy = {}
    for t in tensors:
        a = acts[t].astype(np.float64)
        axes = tuple(i for i in range(a.ndim) if i != 1)
        energy[t] = np.mean(a * a, axis=axes)
    inits = _inits(analysis)
    out: dict[int, np.ndarray] = defaultdict(lambda: None)
    for gid, rs in rows.items():
        s = np.zeros(prob.groups[gid].size)
        for _layer, tensor, p, w_name, axis, pos in rs:
            w = np.take(inits[w_name], p, axis=axis).astype(np.float64)
            s[pos] += energy[tensor][p] * float(np.sum(w * w))
        out[gid] = s
    return {gid: [float(v) for v in s] for gid, s in out.items()}
