"""Apply a Plan to the analysed ONNX model: remove blocks, slice initializers, rewire.

Each parameter that changes becomes a new initializer owned by its node, so weights shared
between nodes (torch.onnx aliases them through Identity) are sliced independently and
correctly; initializers and nodes left unused are dropped at the end.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import shape_inference

from latprune.types import InputError, Plan
from latprune.pruner.analysis import Analysis, _attr, BINARY_ELEMENTWISE
from latprune.pruner.model_io import initializer_arrays, make_tensor


def kept_classes(analysis: Analysis, plan: Plan) -> set[int]:
    """Class roots that survive `plan` (every class of a group absent from plan.kept)."""
    keep: set[int] = set()
    for gid, roots in analysis.class_of_group.items():
        idx = plan.kept.get(gid)
        if idx is None or not analysis.problem.groups[gid].prunable:
            keep.update(roots)
        else:
            keep.update(roots[i] for i in idx)
    return keep


def validate_plan(analysis: Analysis, plan: Plan) -> None:
    prob = analysis.problem
    for gid, idx in plan.kept.items():
        if gid < 0 or gid >= len(prob.groups):
            raise InputError(f"plan names group {gid}, which does not exist")
        g = prob.groups[gid]
        if not g.prunable and len(idx) != g.size:
            raise InputError(f"plan prunes group {gid}, which is not prunable")
        if len(set(idx)) != len(idx) or any(i < 0 or i >= g.size for i in idx):
            raise InputError(f"plan for group {gid} has invalid channel indices")
        if not idx and g.inner_of_block not in plan.removed_blocks:
            raise InputError(f"plan empties group {gid}")
    for b in plan.removed_blocks:
        if b < 0 or b >= len(prob.blocks):
            raise InputError(f"plan removes block {b}, which does not exist")


def apply_plan(analysis: Analysis, plan: Plan, check: bool = True) -> onnx.ModelProto:
    """Return a new model with `plan` applied. It has the same inputs and outputs."""
    validate_plan(analysis, plan)
    model = copy.deepcopy(analysis.model)
    graph = model.graph
    keep = kept_classes(analysis, plan)
    inits = initializer_arrays(model)
    # Resolve Identity-aliased initializers (shared weights) to their arrays.
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            inits[node.output[0]] = inits[node.input[0]]

    _remove_blocks(graph, analysis, plan.removed_blocks)

    kept_cache: dict[str, np.ndarray] = {}

    def kept(t: str) -> np.ndarray | None:
        if t not in analysis.atoms:
            return None
        if t not in kept_cache:
            kept_cache[t] = analysis.kept_positions(t, keep)
        return kept_cache[t]

    def full(t: str) -> bool:
        k = kept(t)
        return k is None or len(k) == len(analysis.atoms[t])

    new_inits: list[onnx.TensorProto] = []

    def set_input(node: onnx.NodeProto, idx: int, array: np.ndarray) -> None:
        name = f"{node.input[idx]}__{node.name}__pruned"
        new_inits.append(make_tensor(name, array))
        node.input[idx] = name

    for node in graph.node:
        op = node.op_type
        ins = list(node.input)
        out = node.output[0] if node.output else ""
        if op in ("Conv", "ConvTranspose") and ins[1] in inits:
            w = inits[ins[1]]
            k_in, k_out = kept(ins[0]), kept(out)
            if full(ins[0]) and full(out):
                continue
            group = int(_attr(node, "group", 1))
            if op == "Conv" and group > 1:  # depthwise: in == out
                w = w[k_out]
                for a in node.attribute:
                    if a.name == "group":
                        a.i = len(k_out)
            elif op == "Conv":
                w = w[k_out][:, k_in]
            else:
                w = w[k_in][:, k_out]
            set_input(node, 1, w)
            if len(ins) > 2 and ins[2]:
                set_input(node, 2, inits[ins[2]][k_out])
        elif op in ("Gemm", "MatMul") and len(ins) > 1 and ins[1] in inits:
            if full(ins[0]) and full(out):
                continue
            w = inits[ins[1]]
            k_in, k_out = kept(ins[0]), kept(out)
            trans_b = op == "Gemm" and int(_attr(node, "transB", 0))
            w = w[k_out][:, k_in] if trans_b else w[k_in][:, k_out]
            set_input(node, 1, w)
            if op == "Gemm" and len(ins) > 2 and ins[2] and not full(out):
                c = inits[ins[2]]
                if c.ndim >= 1 and c.shape[-1] == len(analysis.atoms[out]):
                    set_input(node, 2, c[..., k_out])
        elif op in ("BatchNormalization", "InstanceNormalization"):
            if full(out):
                continue
            for i in range(1, len(ins)):
                if ins[i] in inits and inits[ins[i]].ndim == 1:
                    set_input(node, i, inits[ins[i]][kept(out)])
        elif op in BINARY_ELEMENTWISE or op == "PRelu":
            if full(out) or out not in analysis.atoms:
                continue
            r_out = len(analysis.shapes[out])
            c_out = len(analysis.atoms[out])
            for i, name in enumerate(ins):
                if name in inits:
                    arr = inits[name]
                    cdim = 1 - (r_out - arr.ndim)
                    if cdim >= 0 and arr.shape[cdim] == c_out:
                        set_input(node, i, np.take(arr, kept(out), axis=cdim))
        elif op == "Split":
            axis = int(_attr(node, "axis", 0))
            if axis < 0:
                axis += len(analysis.shapes[ins[0]])
            if axis != 1 or full(ins[0]):
                continue
            sizes = np.array([len(kept(o)) for o in node.output], dtype=np.int64)
            if len(ins) > 1 and ins[1]:
                set_input(node, 1, sizes)
            else:
                new_inits.append(make_tensor(f"{node.name}__split", sizes))
                node.input.append(f"{node.name}__split")
                for a in list(node.attribute):
                    if a.name in ("num_outputs", "split"):
                        node.attribute.remove(a)
        elif op == "Slice":
            if full(ins[0]):
                continue
            _rewrite_slice(node, inits, analysis, kept, set_input)
        elif op == "Pad":
            if full(out):
                continue
            _rewrite_pad(node, inits, analysis, kept, keep, set_input)
        elif op == "Reshape" and ins[1] in inits and not full(ins[0]):
            shape = inits[ins[1]].copy()
            if len(shape) == 2:
                shape[1] = -1
                set_input(node, 1, shape)
        elif op == "Resize" and len(ins) > 3 and ins[3] in inits and not full(out):
            sizes = inits[ins[3]].copy()
            sizes[1] = len(kept(out))
            set_input(node, 3, sizes)

    graph.initializer.extend(new_inits)
    _drop_unused(graph)
    del graph.value_info[:]
    if check:
        model = shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        onnx.checker.check_model(model, full_check=True)
    return model


def _remove_blocks(graph, analysis: Analysis, removed: list[int]) -> None:
    """Bypass each removed block: consumers of its Add read the skip tensor instead. A skip
    that is itself the output of an Add removed earlier (chained blocks, as in MobileNetV2)
    is resolved through it."""
    bypass: dict[str, str] = {}

    def resolve(name: str) -> str:
        while name in bypass:
            name = bypass[name]
        return name

    graph_outputs = {o.name for o in graph.output}
    for bid in removed:
        block = analysis.problem.blocks[bid]
        add = next(n for n in graph.node if n.name == block.add_node)
        out, skip = add.output[0], resolve(block.skip)
        if out in graph_outputs:
            add.op_type = "Identity"
            del add.input[:]
            add.input.append(skip)
            continue
        bypass[out] = skip
        for n in graph.node:
            for i, name in enumerate(n.input):
                if name == out:
                    n.input[i] = skip
        graph.node.remove(add)


def _rewrite_slice(node, inits, analysis, kept, set_input):
    ins = list(node.input)
    r = len(analysis.shapes[ins[0]])
    starts = inits[ins[1]].copy()
    ends = inits[ins[2]].copy()
    axes = inits[ins[3]].copy() if len(ins) > 3 and ins[3] else np.arange(len(starts))
    axes = np.array([a + r if a < 0 else a for a in axes])
    if 1 not in axes:
        return
    k = int(np.where(axes == 1)[0][0])
    c = len(analysis.atoms[ins[0]])
    s, e = int(starts[k]), int(ends[k])
    s = max(0, min(c, s + c if s < 0 else s))
    e = max(0, min(c, e + c if e < 0 else e))
    kin = kept(ins[0])
    starts[k] = int(np.sum(kin < s))
    ends[k] = int(np.sum(kin < e))
    set_input(node, 1, starts)
    set_input(node, 2, ends)


def _rewrite_pad(node, inits, analysis, kept, keep, set_input):
    ins = list(node.input)
    x, out = ins[0], node.output[0]
    r = len(analysis.shapes[x])
    c_in = len(analysis.atoms[x])
    pads_src = "input" if len(ins) > 1 and ins[1] else "attr"
    pads = list(inits[ins[1]]) if pads_src == "input" else list(_attr(node, "pads"))
    axes = None
    if len(ins) > 3 and ins[3]:
        axes = [a + r if a < 0 else a for a in inits[ins[3]]]
        full_p = [0] * (2 * r)
        for i, a in enumerate(axes):
            full_p[a], full_p[a + r] = pads[i], pads[i + len(axes)]
        pads = full_p
    before = int(pads[1])
    kout = kept(out)
    new_before = int(np.sum(kout < before))
    new_after = int(np.sum(kout >= before + c_in))
    pads[1], pads[1 + r] = new_before, new_after
    if axes is not None:
        pads = [pads[a] for a in axes] + [pads[a + r] for a in axes]
    if pads_src == "input":
        set_input(node, 1, np.array(pads, dtype=np.int64))
    else:
        for a in node.attribute:
            if a.name == "pads":
                del a.ints[:]
                a.ints.extend(int(p) for p in pads)


def _drop_unused(graph) -> None:
    """Remove nodes whose outputs nobody uses and initializers nobody reads."""
    needed = {o.name for o in graph.output}
    keep_nodes = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            keep_nodes.append(node)
            needed.update(i for i in node.input if i)
    keep_nodes.reverse()
    del graph.node[:]
    graph.node.extend(keep_nodes)
    used_inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(used_inits)
