"""FLOPs and parameter budgets: the same per-layer cost matrices as latency (lut.predict.LayerCost),
computed analytically, so every solver handles them unchanged (scale 1, offset 0)."""
from __future__ import annotations

import numpy as np

from latprune.types import Layer, Problem
from latprune.lut.predict import LayerCost, space_values

KINDS = ("flops", "params")


def layer_count(layer: Layer, c_in: int, c_out: int, kind: str) -> float:
    """MFLOPs (multiply-adds × 2) or millions of parameters of one layer at these widths."""
    spec = layer.spec
    if spec.op == "Attention":  # q kᵀ and p v: 2 · n_q · n_k · width multiply-adds each; no weights
        n_q, n_k = spec.input_hw
        return 0.0 if kind == "params" else 2.0 * 2 * n_q * n_k * c_in * spec.batch / 1e6
    k = int(np.prod(spec.kernel)) if spec.kernel else 1
    if spec.depthwise:
        weights = c_in * k
    elif spec.group_channels:  # groups = c_in / channels per group
        weights = spec.group_channels * c_out * k
    else:
        weights = c_in * c_out * k // max(spec.fixed_groups, 1)
    if kind == "params":
        return (weights + (c_out if spec.has_bias else 0)) / 1e6
    if spec.op == "MatMul":  # applied at every token position
        positions = int(np.prod(spec.input_hw)) if spec.input_hw else 1
    elif spec.op == "Gemm" or not spec.input_hw:
        positions = 1
    elif spec.op == "ConvTranspose":
        positions = int(np.prod([h * s for h, s in zip(spec.input_hw, spec.stride)]))
    else:
        nd = len(spec.input_hw)
        positions = 1
        for d in range(nd):
            eff = spec.dilation[d] * (spec.kernel[d] - 1) + 1
            positions *= (spec.input_hw[d] + spec.pads[d] + spec.pads[d + nd] - eff) // spec.stride[d] + 1
    return 2.0 * weights * positions * spec.batch / 1e6


def analytic_costs(problem: Problem, kind: str) -> list[LayerCost]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    costs = []
    for layer in problem.layers:
        ins = space_values(problem, layer.c_in)
        outs = ins if layer.spec.depthwise else space_values(problem, layer.c_out)
        if layer.spec.depthwise:
            ms = np.diag([layer_count(layer, c, c, kind) for c in ins])
        else:
            ms = np.array([[layer_count(layer, i, o, kind) for o in outs] for i in ins])
        costs.append(LayerCost(ins, outs, ms))
    return costs


def dense_count(problem: Problem, kind: str) -> float:
    return sum(layer_count(layer, layer.dense_c_in, layer.dense_c_out, kind) for layer in problem.layers)
