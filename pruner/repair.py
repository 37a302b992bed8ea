"""Post-pruning repair without training: correct the layers after a cut from calibration
activations, so the pruned model's layer outputs match the dense model's.

Layers are repaired one at a time in graph order, each from the inputs it sees in the
*already repaired* pruned model (so errors upstream are compensated downstream):

- `bias`: add to the layer's bias the mean, per output channel, of (dense output − pruned
  output) over the calibration items and positions: the removed channels' mean contribution
  (and any mean drift from upstream).
- `lsq`: least-squares reconstruction: refit the layer's weights over its kept input channels
  and its bias so that its output matches the dense layer's output at the kept output
  channels, min ‖A·W − Y‖² + λ‖W − W₀‖² with A the im2col patches of the pruned input
  (plus a ones column), solved by the normal equations accumulated in chunks. λ is
  `ridge` × the mean diagonal of AᵀA, anchoring W to the surgery's weights.

Repaired layers: Conv with group = 1 and Gemm (with a constant weight), from the first layer
whose input the plan changes. Depthwise/grouped convs and MatMul are left as they are.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from latprune.types import InputError, Plan
from latprune.pruner.analysis import Analysis, _attr
from latprune.pruner.forward import Runner
from latprune.pruner.model_io import make_tensor
from latprune.pruner.surgery import kept_classes

MODES = ("none", "bias", "lsq")


def _im2col(x: np.ndarray, node: onnx.NodeProto, kernel: tuple[int, int]) -> np.ndarray:
    """Patches (N·H_out·W_out, C·kh·kw) of a 2-D conv's input, in the weight's (c, kh, kw) order."""
    pads = list(_attr(node, "pads", [0, 0, 0, 0]))
    strides = list(_attr(node, "strides", [1, 1]))
    dil = list(_attr(node, "dilations", [1, 1]))
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    kh, kw = kernel
    n, c, h, w = xp.shape
    ho = (h - dil[0] * (kh - 1) - 1) // strides[0] + 1
    wo = (w - dil[1] * (kw - 1) - 1) // strides[1] + 1
    cols = np.empty((n, ho, wo, c, kh, kw), dtype=np.float32)
    for i in range(kh):
        for j in range(kw):
            hs, ws = i * dil[0], j * dil[1]
            patch = xp[:, :, hs:hs + strides[0] * (ho - 1) + 1:strides[0], ws:ws + strides[1] * (wo - 1) + 1:strides[1]]
            cols[..., i, j] = patch.transpose(0, 2, 3, 1)
    return cols.reshape(n * ho * wo, c * kh * kw)


def _targets_as_rows(y: np.ndarray) -> np.ndarray:
    """(N, C, H, W) or (N, C) outputs as (N·H·W, C) rows."""
    if y.ndim == 2:
        return y
    return y.transpose(0, 2, 3, 1).reshape(-1, y.shape[1])


def repairable_layers(analysis: Analysis, plan: Plan, pruned: onnx.ModelProto) -> list[str]:
    """Names of the layers `repair` refits: Conv (group 1, 2-D) and Gemm nodes with constant
    weights present in the pruned model, after (in graph order) the first node the plan
    changes: a layer whose input channels shrink, or a node of a removed block."""
    order = {n.name: i for i, n in enumerate(analysis.model.graph.node)}
    prob = analysis.problem
    widths = {g.id: g.size for g in prob.groups}
    widths.update(plan.widths or {gid: len(idx) for gid, idx in plan.kept.items()})
    changed = [order[layer.name] for layer in prob.layers
               if layer.c_in.width(widths) != layer.dense_c_in and layer.name in order]
    for b in plan.removed_blocks:
        block = prob.blocks[b]
        changed += [order[n] for n in block.branch_nodes + [block.add_node] if n in order]
    if not changed:
        return []
    first = min(changed)
    inits = {i.name for i in pruned.graph.initializer}
    layers = {layer.name: layer for layer in prob.layers}
    names = []
    for node in pruned.graph.node:
        layer = layers.get(node.name)
        if layer is None or order.get(node.name, -1) < first or node.input[1] not in inits:
            continue
        if node.op_type == "Gemm" or (node.op_type == "Conv" and int(_attr(node, "group", 1)) == 1
                                      and len(layer.spec.kernel) == 2):
            names.append(node.name)
    return names


def repair(analysis: Analysis, plan: Plan, pruned: onnx.ModelProto, x: np.ndarray, mode: str = "lsq",
           ridge: float = 1e-3, chunk: int = 64, threads: int = 0,
           progress: Callable[[int, int], None] | None = None) -> onnx.ModelProto:
    """Return a copy of `pruned` (= apply_plan(analysis, plan)) with its layers repaired from the
    calibration inputs `x` (see the module docstring). mode: none, bias or lsq."""
    if mode not in MODES:
        raise InputError(f"repair must be one of {', '.join(MODES)}, not {mode!r}")
    model = onnx.ModelProto()
    model.CopyFrom(pruned)
    if mode == "none":
        return model
    names = repairable_layers(analysis, plan, model)
    nodes = {n.name: n for n in model.graph.node}
    keep = kept_classes(analysis, plan)
    outputs = [nodes[n].output[0] for n in names]
    dense = Runner(analysis.model, outputs, threads=threads).run(x)
    for done, name in enumerate(names):
        node = nodes[name]
        inits = _arrays(model, node.input[1:3])
        w0 = inits[node.input[1]].astype(np.float64)
        b_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        out = node.output[0]
        k_out = analysis.kept_positions(out, keep) if out in analysis.atoms else np.arange(w0.shape[0])
        y_dense = dense[out][:, k_out]
        if node.op_type == "Gemm":
            trans_b = int(_attr(node, "transB", 0))
            alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
            if int(_attr(node, "transA", 0)) or (b_name and inits[b_name].ndim != 1):
                continue
            w_mat = (w0 if trans_b else w0.T) * alpha  # (out, in)
            b0 = inits[b_name].astype(np.float64) * beta if b_name else np.zeros(w_mat.shape[0])
        else:
            w_mat = w0.reshape(w0.shape[0], -1)
            b0 = inits[b_name].astype(np.float64) if b_name else np.zeros(w0.shape[0])
        need = [node.input[0]] + ([out] if mode == "bias" else [])
        got = Runner(model, need, threads=threads).run(x)
        if mode == "bias":
            diff = _targets_as_rows(y_dense).astype(np.float64) - _targets_as_rows(got[out]).astype(np.float64)
            w_new, b_new = w_mat, b0 + diff.mean(axis=0)
        else:
            w_new, b_new = _least_squares(got[node.input[0]], y_dense, w_mat, b0, node,
                                          tuple(w0.shape[2:]) if node.op_type == "Conv" else None, ridge, chunk)
        _write_layer(model, node, w_new, b_new, w0.shape, b_name)
        if progress:
            progress(done + 1, len(names))
    _drop_unused(model)
    return model


def _least_squares(x_in: np.ndarray, y_dense: np.ndarray, w_mat: np.ndarray, b0: np.ndarray,
                   node: onnx.NodeProto, kernel: tuple[int, int] | None, ridge: float,
                   chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Ridge-anchored least squares for (W, b): rows = positions, features = patches + 1."""
    n_feat = w_mat.shape[1] + 1
    ata = np.zeros((n_feat, n_feat))
    aty = np.zeros((n_feat, w_mat.shape[0]))
    for s in range(0, len(x_in), chunk):
        xb = x_in[s:s + chunk]
        a = _im2col(xb, node, kernel) if kernel else xb.reshape(len(xb), -1)
        a = np.concatenate([a.astype(np.float64), np.ones((len(a), 1))], axis=1)
        y = _targets_as_rows(y_dense[s:s + chunk]).astype(np.float64)
        ata += a.T @ a
        aty += a.T @ y
    lam = ridge * float(np.mean(np.diag(ata))) + 1e-12
    w0 = np.concatenate([w_mat, b0[:, None]], axis=1).T  # (features, out)
    sol = np.linalg.solve(ata + lam * np.eye(n_feat), aty + lam * w0)
    return sol[:-1].T, sol[-1]


def _write_layer(model: onnx.ModelProto, node: onnx.NodeProto, w_mat: np.ndarray, b: np.ndarray,
                 w_shape: tuple, b_name: str | None) -> None:
    if node.op_type == "Gemm":
        trans_b = int(_attr(node, "transB", 0))
        alpha = float(_attr(node, "alpha", 1.0))
        beta = float(_attr(node, "beta", 1.0))
        w = (w_mat if trans_b else w_mat.T) / alpha
        b = b / beta if b_name else b
    else:
        w = w_mat.reshape(w_shape)
    w_name, new_b = f"{node.name}__repaired_W", f"{node.name}__repaired_B"
    model.graph.initializer.append(make_tensor(w_name, w.astype(np.float32)))
    model.graph.initializer.append(make_tensor(new_b, b.astype(np.float32)))
    node.input[1] = w_name
    if len(node.input) > 2:
        node.input[2] = new_b
    else:
        node.input.append(new_b)
    if node.op_type == "Gemm" and not b_name:
        for a in node.attribute:
            if a.name == "beta":
                a.f = 1.0


def _arrays(model: onnx.ModelProto, names) -> dict[str, np.ndarray]:
    """The named initializers as arrays (only those: converting all of them per layer is slow)."""
    wanted = {n for n in names if n}
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name in wanted}


def _drop_unused(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {g.name for g in model.graph.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
