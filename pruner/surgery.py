"""Apply a Plan to the analysed ONNX model: remove blocks, slice constants, rewire.

What changes is decided by the operator handlers (pruner/ops): every constant input they list
in `params` is sliced along its channel axes to the positions that survive, and their
`rewrite` adjusts attributes and shape inputs (a grouped conv's `group`, Split sizes, Slice
bounds, Pad amounts, a Reshape target). Each parameter that changes becomes a new
initializer owned by its node, so weights shared between nodes (torch.onnx aliases them
through Identity) are sliced independently and correctly; initializers and nodes left unused
are dropped at the end.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import shape_inference

from latprune.pruner.analysis import Analysis
from latprune.pruner.model_io import initializer_arrays, make_tensor
from latprune.pruner.ops import SurgeryContext, handler_for
from latprune.types import InputError, Plan


def keep_mask(analysis: Analysis, plan: Plan) -> np.ndarray:
    """Per atom: whether its channel survives `plan`."""
    return analysis.keep_mask(plan.kept)


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
    mask = keep_mask(analysis, plan)
    view = analysis.view()
    inits = view.inits

    _remove_blocks(graph, analysis, plan.removed_blocks)

    kept_cache: dict[tuple[str, int], np.ndarray] = {}

    def kept_along(tensor: str, axis: int) -> np.ndarray:
        key = (tensor, axis)
        if key not in kept_cache:
            kept_cache[key] = analysis.kept_along(tensor, axis, mask)
        return kept_cache[key]

    new_inits: list[onnx.TensorProto] = []

    def set_input(node: onnx.NodeProto, idx: int, array: np.ndarray) -> None:
        name = f"{node.input[idx] or 'input' + str(idx)}__{node.name}__pruned"
        new_inits.append(make_tensor(name, array))
        node.input[idx] = name

    sctx = SurgeryContext(analysis.model.graph, analysis.shapes, inits, analysis.maps, kept_along, set_input)
    sctx.opset = analysis.opset
    originals = {n.name: n for n in analysis.model.graph.node}
    for node in graph.node:
        orig = originals.get(node.name)
        handler = handler_for(orig) if orig is not None else None
        if handler is None:
            continue
        by_input: dict[int, list] = {}
        for pa in analysis.params.get(node.name, []):
            by_input.setdefault(pa.index, []).append(pa)
        for index, axes in by_input.items():
            value = inits.get(orig.input[index])
            if value is None:
                continue
            changed, done = False, set()
            for pa in axes:
                if pa.param_axis in done:
                    continue
                done.add(pa.param_axis)
                kept = kept_along(pa.tensor, pa.tensor_axis)
                if len(kept) != value.shape[pa.param_axis]:
                    value = np.take(value, kept, axis=pa.param_axis)
                    changed = True
            if changed:
                set_input(node, index, value)
        if any(t in analysis.maps for t in list(orig.input) + list(orig.output) if t):
            handler.rewrite(node, orig, sctx)

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


__all__ = ["apply_plan", "validate_plan", "keep_mask", "initializer_arrays"]
