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

Repaired layers: those whose operator handler reads their weights as a matrix (Conv with
group 1, Gemm, MatMul with a weight; pruner/ops/layers.py), from the first layer whose input
the plan changes. Depthwise and grouped convs are left as they are. A MatMul's bias lives in
the Add after it; its refitted intercept goes there.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from latprune.types import InputError, Plan
from latprune.pruner.analysis import Analysis
from latprune.pruner.forward import Runner
from latprune.pruner.model_io import make_tensor
from latprune.pruner.ops import handler_for
from latprune.pruner.ops.layers import MatMul

MODES = ("none", "bias", "lsq")

# lsq repair reads up to REPAIR_SAMPLES calibration inputs (measured on CIFAR ResNet-56 at a
# 0.5x plan: 256 inputs 68.3% top-1, 1024 inputs 70.8%), as long as the dense activations it
# holds (every repaired layer's output, float32) stay within REPAIR_MEMORY_BYTES.
REPAIR_SAMPLES = 1024
REPAIR_MEMORY_BYTES = 4 << 30


def repair_samples(analysis: Analysis, available: int) -> int:
    """How many of `available` calibration inputs `repair` should read: at most REPAIR_SAMPLES,
    and no more than fit REPAIR_MEMORY_BYTES of dense layer outputs (static shapes; a layer
    whose output shape is unknown counts as nothing)."""
    view = analysis.view()
    nodes = {n.name: n for n in analysis.model.graph.node}
    per_item = 0
    for layer in analysis.problem.layers:
        shape = view.shape(nodes[layer.name].output[0]) if layer.name in nodes else None
        if shape and all(isinstance(d, int) and d > 0 for d in shape):
            per_item += 4 * int(np.prod(shape[1:]))
    fit = REPAIR_MEMORY_BYTES // per_item if per_item else REPAIR_SAMPLES
    return int(max(1, min(available, REPAIR_SAMPLES, fit)))


def repairable_layers(analysis: Analysis, plan: Plan, pruned: onnx.ModelProto) -> list[str]:
    """Names of the layers `repair` refits: layers whose handler can read their weights as a
    matrix (Conv with group 1 and a 2-D kernel, Gemm, MatMul with a weight), present in the
    pruned model with constant weights, after (in graph order) the first node the plan
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
    layers = {layer.name for layer in prob.layers}
    view = analysis.view()
    originals = {n.name: n for n in analysis.model.graph.node}
    names = []
    for node in pruned.graph.node:
        if node.name not in layers or order.get(node.name, -1) < first or node.input[1] not in inits:
            continue
        handler = handler_for(originals[node.name])
        if getattr(handler, "repairable", None) and handler.repairable(originals[node.name], view):
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
    originals = {n.name: n for n in analysis.model.graph.node}
    view = analysis.view()
    mask = analysis.keep_mask(plan.kept)
    outputs = [nodes[n].output[0] for n in names]
    dense = Runner(analysis.model, outputs, threads=threads).run(x)
    for done, name in enumerate(names):
        node, orig = nodes[name], originals[name]
        handler = handler_for(orig)
        bias_site = _bias_site(orig, node, model, view)
        b_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias_site is not None:
            b_name = bias_site[0].input[bias_site[1]]
        arrays = _arrays(model, [node.input[1], b_name])
        w0 = arrays[node.input[1]]
        w_mat, b0 = handler.weight_matrix(orig, w0, arrays.get(b_name))
        out = node.output[0]
        out_axis = handler.layer_axes(orig, view)[1]
        k_out = analysis.kept_along(out, out_axis, mask)
        y_dense = np.take(dense[out], k_out, axis=out_axis)
        need = [node.input[0]] + ([out] if mode == "bias" else [])
        got = Runner(model, need, threads=threads).run(x)
        if mode == "bias":
            diff = handler.target_rows(y_dense).astype(np.float64) - handler.target_rows(got[out]).astype(np.float64)
            w_new, b_new = w_mat, b0 + diff.mean(axis=0)
        else:
            fit = _least_squares(got[node.input[0]], y_dense, w_mat, b0, orig, handler, w0.shape, ridge, chunk)
            if fit is None:  # the fit did not generalise to held-out items: keep the surgery's weights
                continue
            w_new, b_new = fit
        w_out, b_out = handler.from_matrix(orig, w_new, b_new, w0.shape)
        _write_layer(model, node, w_out, b_out, b_name, bias_site)
        if progress:
            progress(done + 1, len(names))
    _drop_unused(model)
    return model


def _bias_site(orig, node, model, view):
    """For a MatMul layer: (Add node in the pruned model, input index) of its bias, or None."""
    if handler_for(orig).__class__ is not MatMul:
        return None
    site = MatMul.bias_add(orig, view)
    if site is None:
        return None
    add = next((n for n in model.graph.node if n.name == site[0].name), None)
    return None if add is None else (add, site[1])


# Every CHECK_EVERY-th calibration item is held out of a first fit: the refit is kept only when
# it beats the surgery's weights on those items. With few rows per feature (late layers of a
# detector on 5x5 maps, a handful of images) a fit can follow the calibration images and do worse
# on others than the weights it started from; the check catches that without a threshold.
CHECK_EVERY = 4


def _least_squares(x_in: np.ndarray, y_dense: np.ndarray, w_mat: np.ndarray, b0: np.ndarray,
                   node: onnx.NodeProto, handler, w_shape: tuple, ridge: float,
                   chunk: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Ridge-anchored least squares for (W, b): rows = positions, features = patches + 1.
    None when the fit on the other items does worse than (W0, b0) on the held-out items."""
    n_feat = w_mat.shape[1] + 1
    held = np.arange(len(x_in)) % CHECK_EVERY == CHECK_EVERY - 1 if len(x_in) >= CHECK_EVERY else None
    normal = {part: (np.zeros((n_feat, n_feat)), np.zeros((n_feat, w_mat.shape[0])), [0.0])
              for part in (False, True)}
    for s in range(0, len(x_in), chunk):
        a_all = handler.design_rows(node, x_in[s:s + chunk], w_shape)
        y_all = handler.target_rows(y_dense[s:s + chunk])
        per_item = len(a_all) // len(x_in[s:s + chunk])
        item_of_row = s + np.arange(len(a_all)) // per_item
        for part in (False, True):
            rows = (held[item_of_row] == part) if held is not None else np.full(len(a_all), not part)
            if not rows.any():
                continue
            a = np.concatenate([a_all[rows].astype(np.float64), np.ones((int(rows.sum()), 1))], axis=1)
            y = y_all[rows].astype(np.float64)
            ata, aty, yty = normal[part]
            ata += a.T @ a
            aty += a.T @ y
            yty[0] += float(np.sum(y * y))
    w0 = np.concatenate([w_mat, b0[:, None]], axis=1).T  # (features, out)

    def solve(ata, aty):
        lam = ridge * float(np.mean(np.diag(ata))) + 1e-12
        return np.linalg.solve(ata + lam * np.eye(n_feat), aty + lam * w0)

    fit_ata, fit_aty, _ = normal[False]
    if held is not None and held.any():
        c_ata, c_aty, c_yty = normal[True]

        def sse(w):  # squared error on the held-out rows, from their normal equations
            return float(np.sum(w * (c_ata @ w)) - 2 * np.sum(w * c_aty) + c_yty[0])
        if sse(solve(fit_ata, fit_aty)) >= sse(w0):
            return None
        fit_ata, fit_aty = fit_ata + c_ata, fit_aty + c_aty
    sol = solve(fit_ata, fit_aty)
    return sol[:-1].T, sol[-1]


def _write_layer(model: onnx.ModelProto, node: onnx.NodeProto, w: np.ndarray, b: np.ndarray,
                 b_name: str | None, bias_site) -> None:
    w_name, new_b = f"{node.name}__repaired_W", f"{node.name}__repaired_B"
    model.graph.initializer.append(make_tensor(w_name, w.astype(np.float32)))
    node.input[1] = w_name
    if node.op_type == "MatMul":
        if bias_site is not None:
            model.graph.initializer.append(make_tensor(new_b, b.astype(np.float32)))
            bias_site[0].input[bias_site[1]] = new_b
        return  # without a bias Add, the fitted intercept (~0 for unbiased layers) is dropped
    model.graph.initializer.append(make_tensor(new_b, b.astype(np.float32)))
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
