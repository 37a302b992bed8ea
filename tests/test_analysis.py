"""Channel groups, blocks and layer specs found by pruner.analysis on the test builders."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from onnx_builders import (ALL_BUILDERS, GraphBuilder, aliased_weights_cnn, concat_cnn,
                           depthwise_cnn, pad_shortcut_cnn, residual_cnn, unsupported_op_cnn)
from latprune.pruner.analysis import analyse
from latprune.types import Problem


def _groups_of(space) -> list[int]:
    return [g for g, _ in space.terms]


def _layer(prob: Problem, name: str):
    return next(layer for layer in prob.layers if layer.name == name)


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


# ---- residual ---------------------------------------------------------------------------

def test_residual_blocks_and_inner_groups():
    model = residual_cnn()
    an = analyse(model)
    prob = an.problem
    assert len(prob.blocks) == 2
    add_nodes = [n.name for n in model.graph.node if n.op_type == "Add"]
    assert len(add_nodes) == 3
    # The two identity blocks are removable; the stride-2 Add (1x1 conv shortcut) is not.
    assert [b.add_node for b in prob.blocks] == add_nodes[:2]
    for b in prob.blocks:
        ops = sorted(_node(model, n).op_type for n in b.branch_nodes)
        assert ops == ["BatchNormalization", "BatchNormalization", "Conv", "Conv", "Relu"]
    for layer in prob.layers:
        if layer.spec.stride == [2, 2]:
            assert layer.block is None, layer.name
    # Each block's inner group (its first conv's output) is inner to that block only.
    for b in prob.blocks:
        in_block = [layer for layer in prob.layers if layer.block == b.id]
        assert len(in_block) == 2
        first, second = in_block
        (inner,) = _groups_of(first.c_out)
        assert _groups_of(second.c_in) == [inner]
        assert prob.groups[inner].inner_of_block == b.id
        assert prob.groups[inner].prunable
        assert prob.groups[inner].size == 24
        # The block's outer channels are the trunk's: not inner to any block.
        (outer,) = _groups_of(first.c_in)
        assert _groups_of(second.c_out) == [outer]
        assert prob.groups[outer].inner_of_block is None
    inner_groups = [g.id for g in prob.groups if g.inner_of_block is not None]
    assert len(inner_groups) == 2


def test_residual_trunk_group_is_shared_by_the_stem_and_both_blocks():
    prob = analyse(residual_cnn()).problem
    stem = prob.layers[0]
    (trunk,) = _groups_of(stem.c_out)
    writers = [layer.name for layer in prob.layers if trunk in _groups_of(layer.c_out)]
    assert len(writers) == 3  # stem + the last conv of each identity block
    assert prob.groups[trunk].size == 16 and prob.groups[trunk].prunable


def test_residual_stride2_shortcut_ties_both_convs_outputs():
    prob = analyse(residual_cnn()).problem
    s2 = [layer for layer in prob.layers if layer.spec.kernel == [1, 1]]
    assert len(s2) == 1 and s2[0].spec.stride == [2, 2]
    (g,) = _groups_of(s2[0].c_out)
    writers = [layer for layer in prob.layers if _groups_of(layer.c_out) == [g]]
    assert len(writers) == 2  # the 1x1 shortcut and the branch's last 3x3 conv
    gemm = prob.layers[-1]
    assert gemm.spec.op == "Gemm" and _groups_of(gemm.c_in) == [g]


# ---- depthwise --------------------------------------------------------------------------

def test_depthwise_layers():
    prob = analyse(depthwise_cnn()).problem
    dw = [layer for layer in prob.layers if layer.spec.depthwise]
    assert len(dw) == 2
    for layer in dw:
        assert layer.c_in.key() == layer.c_out.key()
        assert layer.dense_c_in == layer.dense_c_out == 48
        assert layer.spec.fixed_groups == 1
        (g,) = _groups_of(layer.c_in)
        assert prob.groups[g].prunable and prob.groups[g].size == 48
        # the expand conv's output, the depthwise and the project conv's input are one group
        assert prob.groups[g].inner_of_block == layer.block
    non_dw = [layer for layer in prob.layers if not layer.spec.depthwise]
    assert all(layer.spec.op == "Gemm" or layer.spec.fixed_groups == 1 for layer in non_dw)
    assert len(prob.blocks) == 2


def test_depthwise_activation_fused_into_spec():
    prob = analyse(depthwise_cnn()).problem
    acts = {layer.name: layer.spec.activation for layer in prob.layers}
    assert "Clip" in acts.values() and "Relu" in acts.values()


# ---- concat / split / slice -------------------------------------------------------------

def test_concat_slice_splits_a_conv_output_into_two_groups():
    model = concat_cnn()
    prob = analyse(model).problem
    conv_b = next(layer for layer in prob.layers
                  if layer.spec.kernel == [1, 1] and layer.dense_c_out == 24)
    assert len(conv_b.c_out.terms) == 2
    sizes = sorted(prob.groups[g].size * m for g, m in conv_b.c_out.terms)
    assert sizes == [8, 16]
    assert conv_b.c_out.fixed == 0
    # The 16 sliced channels are tied (by the Add) to the conv on the Split's first part.
    kept_part = next(g for g, _ in conv_b.c_out.terms if prob.groups[g].size == 16)
    conv_p = next(layer for layer in prob.layers
                  if layer is not conv_b and _groups_of(layer.c_out) == [kept_part])
    # ... whose input is the first Concat operand, i.e. the output of the 16->16 conv.
    conv_a = next(layer for layer in prob.layers if layer.c_out.key() == conv_p.c_in.key()
                  and layer is not conv_p)
    assert conv_a.dense_c_in == 16 and conv_a.dense_c_out == 16
    gemm = prob.layers[-1]
    assert _groups_of(gemm.c_in) == [kept_part]


# ---- pad shortcut -----------------------------------------------------------------------

def test_pad_shortcut_stage3_input_space_has_three_groups():
    prob = analyse(pad_shortcut_cnn()).problem
    stem = prob.layers[0]
    (stage1,) = _groups_of(stem.c_out)
    stage3 = [layer for layer in prob.layers
              if layer.spec.op == "Conv" and layer.spec.input_hw == [4, 4] and layer.dense_c_in == 64]
    assert stage3, "no stage-3 conv found"
    gemm = prob.layers[-1]
    for layer in stage3 + [gemm]:
        sp = layer.c_in
        if layer is not gemm and len(sp.terms) == 1:
            continue  # the block's second conv reads the inner group
        assert sp.fixed == 0
        assert len(sp.terms) == 3, (layer.name, sp)
        assert all(m == 1 for _, m in sp.terms)
        sizes = sorted(prob.groups[g].size for g, _ in sp.terms)
        assert sizes == [16, 16, 32]
        assert sum(sizes) == 64 == layer.dense_c_in
        assert stage1 in _groups_of(sp)
        assert all(prob.groups[g].prunable for g in _groups_of(sp))
        assert all(prob.groups[g].inner_of_block is None for g in _groups_of(sp))
    assert len(prob.blocks) == 3


# ---- aliased weights --------------------------------------------------------------------

def test_aliased_weights_both_convs_are_layers():
    model = aliased_weights_cnn()
    ident = [n for n in model.graph.node if n.op_type == "Identity"]
    assert len(ident) == 2 and ident[0].input[0] == ident[1].input[0]
    aliases = {n.output[0] for n in ident}
    users = [n.name for n in model.graph.node if n.op_type == "Conv" and n.input[1] in aliases]
    assert len(users) == 2
    prob = analyse(model).problem
    names = [layer.name for layer in prob.layers]
    for u in users:
        assert u in names
        layer = _layer(prob, u)
        assert layer.spec.kernel == [3, 3]
        assert layer.dense_c_in == layer.dense_c_out == 16
    a, b = (_layer(prob, u) for u in users)
    assert _groups_of(a.c_out) == _groups_of(b.c_in)
    assert all(prob.groups[g].prunable for g in _groups_of(a.c_out) + _groups_of(b.c_out))


# ---- unsupported op ---------------------------------------------------------------------

def test_unsupported_lrn_fixes_its_channels():
    an = analyse(unsupported_op_cnn())
    prob = an.problem
    assert any("LRN" in note for note in an.notes)
    before, after = prob.layers[0], prob.layers[1]
    assert before.c_out.terms == [] and before.c_out.fixed == 16
    assert after.c_in.terms == [] and after.c_in.fixed == 16
    # The rest stays prunable.
    assert any(prob.groups[g].prunable for g in _groups_of(after.c_out))


def _transpose_model() -> onnx.ModelProto:
    g = GraphBuilder()
    x = g.relu(g.conv("input", 3, 16))
    x = g.node("Transpose", [x], perm=[0, 1, 3, 2])
    x = g.relu(g.conv(x, 16, 16))
    x = g.node("Transpose", [x], perm=[0, 2, 1, 3])  # moves the channel axis
    x = g.node("Transpose", [x], perm=[0, 2, 1, 3])
    x = g.relu(g.conv(x, 16, 8))
    return g.build(g.head(x, 8), "transpose")


def test_transposes_that_move_the_channel_axis_are_followed():
    an = analyse(_transpose_model())
    prob = an.problem
    assert an.notes == []
    assert len(prob.layers) == 4
    # the channels go through a Transpose pair that moves them to axis 2 and back
    assert prob.layers[1].c_out.terms and prob.layers[1].c_out.terms == prob.layers[2].c_in.terms
    assert all(prob.groups[g].prunable for g, _ in prob.layers[1].c_out.terms)


def test_unknown_op_does_not_crash():
    g = GraphBuilder()
    x = g.relu(g.conv("input", 3, 16))
    x = g.node("CumSum", [x, g.init(np.array(1, np.int64), "axis")])  # mixes channels: not understood
    x = g.relu(g.conv(x, 16, 16))
    x = g.relu(g.conv(x, 16, 8))
    an = analyse(g.build(g.head(x, 8), "unknown"))
    prob = an.problem
    assert any("CumSum" in note for note in an.notes)
    assert len(prob.layers) == 4
    # channels that touch the unknown op are not pruned; the rest are
    assert prob.layers[0].c_out.terms == [] and prob.layers[1].c_in.terms == []
    assert prob.layers[1].c_out.terms
    assert all(prob.groups[g].prunable for g, _ in prob.layers[1].c_out.terms)


# ---- every builder ----------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_graph_input_and_output_channels_are_not_prunable(name):
    prob = analyse(ALL_BUILDERS[name]()).problem
    first, last = prob.layers[0], prob.layers[-1]
    assert first.c_in.terms == [] and first.c_in.fixed == 3
    assert last.spec.op == "Gemm"
    assert last.c_out.terms == [] and last.c_out.fixed == 10
    (out_group,) = [g for g in prob.groups if any(m.startswith("gemm_") for m in g.members)]
    assert out_group.size == 10 and not out_group.prunable
    # the graph input carries no prunable channels (no group is made for them)
    assert not [g for g in prob.groups if "input" in g.members]


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_every_conv_and_gemm_gets_a_layer_spec(name):
    model = ALL_BUILDERS[name]()
    an = analyse(model)
    prob = an.problem
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    gemms = [n.name for n in model.graph.node if n.op_type == "Gemm"]
    assert sorted(layer.name for layer in prob.layers) == sorted(convs + gemms)
    shapes = an.shapes
    for layer in prob.layers:
        node = _node(model, layer.name)
        spec = layer.spec
        if node.op_type == "Conv":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            assert spec.op == "Conv"
            assert spec.kernel == list(attrs["kernel_shape"])
            assert spec.stride == list(attrs["strides"])
            assert spec.pads == list(attrs["pads"])
            assert spec.dilation == [1, 1]
            assert spec.input_hw == shapes[node.input[0]][2:]
            assert spec.batch == 1
            assert spec.has_bias == (len(node.input) > 2)
            assert layer.dense_c_in == shapes[node.input[0]][1]
            assert layer.dense_c_out == shapes[node.output[0]][1]
        else:
            assert spec.op == "Gemm" and spec.input_hw == [] and spec.kernel == []
        # the dense widths are consistent with the spaces
        dense = {g.id: g.size for g in prob.groups}
        assert layer.c_in.width(dense) == layer.dense_c_in
        assert layer.c_out.width(dense) == layer.dense_c_out


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_candidate_widths_and_problem_roundtrip(name):
    prob = analyse(ALL_BUILDERS[name](), step=8, max_candidates=3).problem
    for g in prob.groups:
        assert g.candidate_widths == sorted(set(g.candidate_widths))
        assert g.candidate_widths[-1] == g.size
        assert len(g.candidate_widths) <= 3
        if not g.prunable:
            assert g.candidate_widths == [g.size]
    again = Problem.from_json(prob.to_json())
    assert again.to_json() == prob.to_json()


def test_analysis_does_not_modify_the_input_model():
    model = residual_cnn()
    before = model.SerializeToString()
    analyse(model)
    assert model.SerializeToString() == before
