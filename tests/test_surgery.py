"""apply_plan: zero plans are exact, random plans give valid runnable models, and pruning
matches the original model with the removed channels/branches zeroed out."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import numpy_helper, shape_inference

from conftest import random_inputs, run_model
from onnx_builders import ALL_BUILDERS, aliased_weights_cnn, depthwise_cnn, residual_cnn
from latprune.pruner.analysis import analyse
from latprune.pruner.surgery import apply_plan
from latprune.types import InputError, Plan


def _io_signature(model: onnx.ModelProto):
    inferred = shape_inference.infer_shapes(model)
    def dims(vi):
        return [d.dim_value for d in vi.type.tensor_type.shape.dim]
    return ([(i.name, dims(i)) for i in inferred.graph.input],
            [(o.name, dims(o)) for o in inferred.graph.output])


def _max_diff(a: onnx.ModelProto, b: onnx.ModelProto, seed: int = 0) -> float:
    return max(float(np.max(np.abs(run_model(a, x) - run_model(b, x))))
               for x in random_inputs(3, seed))


def _rel_diff(a: onnx.ModelProto, b: onnx.ModelProto, seed: int = 0) -> float:
    """Max abs difference relative to the output's scale (float32 reassociation noise)."""
    out = []
    for x in random_inputs(3, seed):
        ya, yb = run_model(a, x), run_model(b, x)
        out.append(float(np.max(np.abs(ya - yb))) / max(1.0, float(np.max(np.abs(yb)))))
    return max(out)


def _set_init(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    for i, init in enumerate(model.graph.initializer):
        if init.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(array, name))
            return
    raise KeyError(name)


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


def _node(model, name):
    return next(n for n in model.graph.node if n.name == name)


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_zero_plan_is_exact(name):
    model = ALL_BUILDERS[name]()
    an = analyse(model)
    pruned = apply_plan(an, Plan(kept={}))
    onnx.checker.check_model(pruned, full_check=True)
    assert _io_signature(pruned) == _io_signature(model)
    assert _max_diff(model, pruned) <= 1e-5


def _random_plan(an, rng, chained_ok: bool = True) -> Plan:
    prob = an.problem
    removed = [b.id for b in prob.blocks if rng.random() < 0.4]
    if not chained_ok:  # see test_removing_chained_blocks (a known bug)
        adds = {b.add_node: b.id for b in prob.blocks}
        outs = {n.output[0]: n.name for n in an.model.graph.node}
        for b in prob.blocks:
            prev = adds.get(outs.get(b.skip, ""))
            if b.id in removed and prev in removed:
                removed.remove(b.id)
    kept = {}
    for g in prob.groups:
        if not g.prunable:
            continue
        r = rng.random()
        if r < 0.2:
            continue  # kept whole
        if g.inner_of_block is not None and g.inner_of_block in removed and r < 0.4:
            kept[g.id] = []
            continue
        k = int(rng.integers(1, g.size + 1))
        kept[g.id] = sorted(int(i) for i in rng.choice(g.size, size=k, replace=False))
    return Plan(kept=kept, removed_blocks=removed)


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_random_plans_give_valid_models(name):
    model = ALL_BUILDERS[name]()
    an = analyse(model)
    io = _io_signature(model)
    x = random_inputs(1)[0]
    rng = np.random.default_rng(hash(name) % 2**32)
    for _ in range(8):
        plan = _random_plan(an, rng, chained_ok=False)
        pruned = apply_plan(an, plan)
        onnx.checker.check_model(pruned, full_check=True)
        assert _io_signature(pruned) == io, plan
        y = run_model(pruned, x)
        assert y.shape == (1, 10)
        assert np.all(np.isfinite(y))


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_minimal_plan_shrinks_every_prunable_layer(name):
    """Keep one channel of every prunable group: every conv's weight shrinks accordingly."""
    model = ALL_BUILDERS[name]()
    an = analyse(model)
    prob = an.problem
    plan = Plan(kept={g.id: [g.size - 1] for g in prob.groups if g.prunable})
    pruned = apply_plan(an, plan)
    widths = {g.id: (1 if g.prunable else g.size) for g in prob.groups}
    inits = {i.name: list(i.dims) for i in pruned.graph.initializer}
    for layer in prob.layers:
        node = _node(pruned, layer.name)
        w = inits[node.input[1]]
        c_in, c_out = layer.c_in.width(widths), layer.c_out.width(widths)
        if layer.spec.op == "Gemm":
            assert w == [c_out, c_in]
        elif layer.spec.depthwise:
            assert w[0] == c_out and w[1] == 1
        else:
            assert w[:2] == [c_out, c_in]
    assert run_model(pruned, random_inputs(1)[0]).shape == (1, 10)


def test_removing_chained_blocks():
    model = depthwise_cnn()
    an = analyse(model)
    assert an.problem.blocks[1].skip == _node(model, an.problem.blocks[0].add_node).output[0]
    inner = {g.id: [] for g in an.problem.groups if g.inner_of_block is not None}
    pruned = apply_plan(an, Plan(kept=inner, removed_blocks=[0, 1]))
    onnx.checker.check_model(pruned, full_check=True)
    # with both branches gone the model is stem -> head
    assert sum(n.op_type == "Conv" for n in pruned.graph.node) == 1
    assert run_model(pruned, random_inputs(1)[0]).shape == (1, 10)


@pytest.mark.parametrize("block", [0, 1])
def test_removing_a_block_equals_zeroing_its_last_bn(block):
    model = residual_cnn()
    an = analyse(model)
    b = an.problem.blocks[block]
    pruned = apply_plan(an, Plan(kept={}, removed_blocks=[b.id]))
    assert b.add_node not in {n.name for n in pruned.graph.node}
    add = _node(model, b.add_node)
    branch_out = next(i for i in add.input if i != b.skip)
    bn = next(n for n in model.graph.node if branch_out in n.output)
    assert bn.op_type == "BatchNormalization"
    ref = copy.deepcopy(model)
    for param in bn.input[1:3]:  # scale and bias
        _set_init(ref, param, np.zeros_like(_init(model, param)))
    assert _max_diff(model, ref) > 1e-3  # the edit matters
    assert _rel_diff(pruned, ref) <= 1e-5


def test_removing_both_blocks_equals_zeroing_both_bns():
    model = residual_cnn()
    an = analyse(model)
    ref = copy.deepcopy(model)
    for b in an.problem.blocks:
        add = _node(model, b.add_node)
        branch_out = next(i for i in add.input if i != b.skip)
        bn = next(n for n in model.graph.node if branch_out in n.output)
        for param in bn.input[1:3]:
            _set_init(ref, param, np.zeros_like(_init(model, param)))
    inner = {g.id: [] for g in an.problem.groups if g.inner_of_block is not None}
    pruned = apply_plan(an, Plan(kept=inner, removed_blocks=[0, 1]))
    assert sum(n.op_type == "Add" for n in pruned.graph.node) == 1
    assert _rel_diff(pruned, ref) <= 1e-5


def _zero_conv_outputs(model, conv_names, channels):
    for name in conv_names:
        node = _node(model, name)
        w = _init(model, node.input[1]).copy()
        w[channels] = 0
        _set_init(model, node.input[1], w)
        if len(node.input) > 2:
            b = _init(model, node.input[2]).copy()
            b[channels] = 0
            _set_init(model, node.input[2], b)


def _zero_conv_inputs(model, conv_name, channels):
    node = _node(model, conv_name)
    w = _init(model, node.input[1]).copy()
    w[:, channels] = 0
    _set_init(model, node.input[1], w)


@pytest.mark.parametrize("build,n_producers,seed", [(residual_cnn, 2, 1), (depthwise_cnn, 3, 2)])
def test_pruning_trunk_equals_zeroed_producers(build, n_producers, seed):
    """Pruning the group feeding the classifier == zeroing those channels in every conv that
    writes them (the residual trunk: stem and each block's last conv)."""
    model = build()
    an = analyse(model)
    prob = an.problem
    gemm = prob.layers[-1]
    (gid,) = [g for g, _ in gemm.c_in.terms]
    producers = [layer.name for layer in prob.layers if [g for g, _ in layer.c_out.terms] == [gid]]
    assert len(producers) == n_producers
    rng = np.random.default_rng(seed)
    size = prob.groups[gid].size
    keep = sorted(int(i) for i in rng.choice(size, size=size // 2, replace=False))
    drop = [i for i in range(size) if i not in keep]
    # group position == channel position here (the group is created by those convs)
    pruned = apply_plan(an, Plan(kept={gid: keep}))
    ref = copy.deepcopy(model)
    _zero_conv_outputs(ref, producers, drop)
    assert _max_diff(model, ref) > 1e-4
    assert _rel_diff(pruned, ref) <= 1e-5


def test_pruning_inner_group_equals_zeroed_consumer_columns():
    """Removing input channels of the block's second conv == zeroing those weight columns."""
    model = residual_cnn()
    an = analyse(model)
    prob = an.problem
    block_layers = [layer for layer in prob.layers if layer.block == 0]
    first, second = block_layers
    (gid,) = [g for g, _ in first.c_out.terms]
    keep = [0, 3, 5, 6, 10, 17, 23]
    drop = [i for i in range(prob.groups[gid].size) if i not in keep]
    pruned = apply_plan(an, Plan(kept={gid: keep}))
    ref = copy.deepcopy(model)
    _zero_conv_inputs(ref, second.name, drop)
    assert _max_diff(model, ref) > 1e-4
    assert _rel_diff(pruned, ref) <= 1e-5


def test_pruning_depthwise_inner_group_equals_zeroed_project_columns():
    model = depthwise_cnn()
    an = analyse(model)
    prob = an.problem
    dw = next(layer for layer in prob.layers if layer.spec.depthwise and layer.block == 1)
    (gid,) = [g for g, _ in dw.c_in.terms]
    project = next(layer for layer in prob.layers
                   if layer.block == 1 and [g for g, _ in layer.c_in.terms] == [gid]
                   and not layer.spec.depthwise)
    keep = list(range(0, 48, 3))
    drop = [i for i in range(48) if i not in keep]
    pruned = apply_plan(an, Plan(kept={gid: keep}))
    ref = copy.deepcopy(model)
    _zero_conv_inputs(ref, project.name, drop)
    assert _rel_diff(pruned, ref) <= 1e-5


def test_aliased_weights_are_sliced_per_user():
    """Pruning the channels between the two weight-sharing convs must equal the original
    with only the second conv's input columns zeroed (the first conv keeps its weight)."""
    model = aliased_weights_cnn()
    an = analyse(model)
    prob = an.problem
    ident_out = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"}
    users = [layer for layer in prob.layers
             if _node(model, layer.name).input[1] in ident_out]
    first, second = users
    (gid,) = [g for g, _ in first.c_out.terms]
    keep = [2, 5, 7, 11, 12]
    drop = [i for i in range(16) if i not in keep]
    pruned = apply_plan(an, Plan(kept={gid: keep}))
    ref = copy.deepcopy(model)
    node = _node(ref, second.name)
    w = _init(ref, ident_out[node.input[1]]).copy()
    w[:, drop] = 0
    ref.graph.initializer.append(numpy_helper.from_array(w, "second_weight_copy"))
    node.input[1] = "second_weight_copy"
    # the first conv's output channel `drop` is unused once the second conv's columns are 0
    assert _rel_diff(pruned, ref) <= 1e-5
    # the shared weight itself is untouched in the analysed model
    shared = next(iter(ident_out.values()))
    assert np.array_equal(_init(an.model, shared), _init(model, shared))


# ---- invalid plans ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def residual_analysis():
    return analyse(residual_cnn())


def _bad_plans(an):
    prob = an.problem
    trunk = next(g for g in prob.groups if g.prunable and g.inner_of_block is None)
    inner = next(g for g in prob.groups if g.inner_of_block is not None)
    fixed = next(g for g in prob.groups if not g.prunable)
    return {
        "unknown group": Plan(kept={len(prob.groups) + 5: [0]}),
        "negative group": Plan(kept={-1: [0]}),
        "index out of range": Plan(kept={trunk.id: [0, trunk.size]}),
        "negative index": Plan(kept={trunk.id: [-1, 2]}),
        "duplicate index": Plan(kept={trunk.id: [1, 1, 2]}),
        "empties a group": Plan(kept={trunk.id: []}),
        "empties an inner group of a kept block": Plan(kept={inner.id: []}),
        "prunes a fixed group": Plan(kept={fixed.id: [0]}),
        "unknown block": Plan(kept={}, removed_blocks=[len(prob.blocks)]),
    }


@pytest.mark.parametrize("case", list(_bad_plans(analyse(residual_cnn()))))
def test_invalid_plans_raise_input_error(residual_analysis, case):
    plan = _bad_plans(residual_analysis)[case]
    with pytest.raises(InputError):
        apply_plan(residual_analysis, plan)


def test_emptying_inner_group_of_removed_block_is_allowed(residual_analysis):
    inner = next(g for g in residual_analysis.problem.groups if g.inner_of_block is not None)
    pruned = apply_plan(residual_analysis, Plan(kept={inner.id: []},
                                                removed_blocks=[inner.inner_of_block]))
    assert run_model(pruned, random_inputs(1)[0]).shape == (1, 10)


def test_symbolic_batch_survives_analysis_and_surgery():
    """A model exported with a dynamic batch keeps it: the pruned model runs at any batch."""
    model = residual_cnn()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    del model.graph.value_info[:]
    out = model.graph.output[0].type.tensor_type
    if out.HasField("shape") and len(out.shape.dim):
        out.shape.dim[0].dim_param = "N"
    an = analyse(model)
    kept = {g.id: list(range(max(1, g.size // 2))) for g in an.problem.groups if g.prunable}
    pruned = apply_plan(an, Plan(kept=kept))
    assert pruned.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    x = np.random.default_rng(0).normal(size=(4, 3, 16, 16)).astype(np.float32)
    assert run_model(pruned, x).shape == (4, 10)
