"""The operator-handler analyser on modern CNN and detector blocks built with the ONNX builders
(no timm or ultralytics): a C2f/SPPF/DFL detector, a channels-last LayerNorm block, a channel
shuffle unit and a grouped conv + squeeze-excitation block. For each: the groups found, a
keep-everything plan that changes no output, random plans (with blocks removed) that give
valid models with the same inputs and outputs, and the handlers' own contracts."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_builders import MODERN_BUILDERS, GraphBuilder, channels_last_block_cnn, grouped_se_cnn, shuffle_cnn, yolo_like
from latprune.pruner.analysis import analyse, consumer_slices, weight_slices
from latprune.pruner.ops import HANDLERS, AtomMap, OpHandler, handler_for, register
from latprune.pruner.ops.shape import _segments
from latprune.pruner.surgery import apply_plan
from latprune.types import Plan


def _input(model: onnx.ModelProto, seed: int = 0, batch: int = 1) -> np.ndarray:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(seed).normal(size=[batch] + dims[1:]).astype(np.float32)


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def _io(model: onnx.ModelProto):
    def dims(v):
        return [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
    return ([(i.name, dims(i)) for i in model.graph.input], [o.name for o in model.graph.output])


def _random_plan(an, rng) -> Plan:
    prob = an.problem
    removed = [b.id for b in prob.blocks if rng.random() < 0.4]
    kept = {}
    for g in prob.groups:
        if not g.prunable:
            continue
        if g.inner_of_block in removed and rng.random() < 0.5:
            kept[g.id] = []
            continue
        kept[g.id] = sorted(rng.choice(g.size, size=int(rng.integers(1, g.size + 1)), replace=False).tolist())
    return Plan(kept=kept, removed_blocks=removed)


@pytest.mark.parametrize("name", sorted(MODERN_BUILDERS))
def test_keep_everything_plan_changes_no_output(name):
    model = MODERN_BUILDERS[name]()
    an = analyse(model)
    same = apply_plan(an, Plan(kept={}))
    x = _input(model)
    for got, want in zip(_run(same, x), _run(model, x)):
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))


@pytest.mark.parametrize("name", sorted(MODERN_BUILDERS))
def test_random_plans_give_valid_models_with_the_same_interface(name):
    model = MODERN_BUILDERS[name]()
    an = analyse(model)
    assert an.notes == [] or name == "yolo_like"
    assert any(g.prunable for g in an.problem.groups)
    rng = np.random.default_rng(7)
    x = _input(model)
    want = _run(model, x)
    for _ in range(4):
        pruned = apply_plan(an, _random_plan(an, rng))  # runs the full checker
        assert _io(pruned) == _io(model)
        assert [o.shape for o in _run(pruned, x)] == [w.shape for w in want]


def test_detector_groups_blocks_and_fixed_decode():
    an = analyse(yolo_like())
    prob = an.problem
    # every conv is a layer; the C2f bottlenecks with shortcut are removable blocks
    assert len(prob.layers) == sum(n.op_type == "Conv" for n in an.model.graph.node)
    assert len(prob.blocks) == 2
    assert all(any(g.inner_of_block == b.id for g in prob.groups) for b in prob.blocks)
    # the DFL bins (Softmax over them) and the class scores are the decode's: never pruned
    assert any("Softmax" in n and "distribution" in n for n in an.notes)
    nodes = {n.name: n for n in an.model.graph.node}
    head_out = [layer for layer in prob.layers if layer.dense_c_out in (16, 5) and
                nodes[layer.name].input[1].startswith("w") and layer.spec.kernel == [1, 1]
                and not layer.c_out.terms and layer.dense_c_in == 16]
    assert len(head_out) == 4  # box (4·reg_max) and class convs of both scales are fixed
    dfl = [layer for layer in prob.layers if layer.dense_c_out == 1]
    assert dfl and not dfl[0].c_in.terms
    # the SPPF concat reads the same channels three times (a group appears with mult 3)
    assert any(m == 3 for layer in prob.layers for _, m in layer.c_in.terms)
    # backbone, neck and head widths are all prunable
    assert sum(g.prunable for g in prob.groups) >= 20


def test_detector_block_removal_keeps_outputs_valid():
    model = yolo_like()
    an = analyse(model)
    removed = [b.id for b in an.problem.blocks]
    inner = [g.id for g in an.problem.groups if g.inner_of_block is not None]
    pruned = apply_plan(an, Plan(kept={gid: [] for gid in inner}, removed_blocks=removed))
    x = _input(model)
    assert [o.shape for o in _run(pruned, x)] == [o.shape for o in _run(model, x)]
    assert sum(n.op_type == "Conv" for n in pruned.graph.node) == \
        sum(n.op_type == "Conv" for n in model.graph.node) - 4


def test_channels_last_layernorm_and_matmul_layers():
    an = analyse(channels_last_block_cnn())
    prob = an.problem
    mm = [layer for layer in prob.layers if layer.spec.op == "MatMul"]
    assert len(mm) == 4
    assert mm[0].spec.input_hw == [5, 5] and mm[0].spec.has_bias  # tokens, bias Add after it
    # the residual stream (16) runs through both LayerNorms and both blocks' convs and MatMuls
    stream = mm[0].c_in.terms[0][0]
    assert prob.groups[stream].size == 16 and prob.groups[stream].prunable
    assert mm[1].c_out.terms == [(stream, 1)]
    # the MLP hidden width (64) is inner to each block
    hidden = [g for g in prob.groups if g.size == 64]
    assert len(hidden) == 2 and all(g.inner_of_block is not None for g in hidden)
    # LayerNorm γ/β and the layer scale are sliced with the stream
    kinds = {pa.kind for axes in an.params.values() for pa in axes}
    assert {"ln_weight", "ln_bias", "const"} <= kinds
    pruned = apply_plan(an, Plan(kept={stream: list(range(0, 16, 2))}))
    ln = [i for i in pruned.graph.initializer if "ln" in i.name and i.dims == [8]]
    assert len(ln) >= 4


def test_channel_shuffle_ties_the_columns_it_interleaves():
    model = shuffle_cnn()
    an = analyse(model)
    prob = an.problem
    assert an.notes == []
    reshape = [n for n in an.model.graph.node if n.op_type == "Reshape"][0]
    m = an.maps[reshape.output[0]]
    assert m.axes == (1, 2) and m.ids.shape[1:3] == (2, 16)
    # rows are tied column by column: each column is one channel
    groups = an.atom_group[m.ids[0, :, :, 0, 0]]
    positions = an.atom_pos[m.ids[0, :, :, 0, 0]]
    assert (groups[0] == groups[1]).all() and (positions[0] == positions[1]).all()
    # pruning keeps the shuffle valid: Reshape targets follow the kept count
    g = int(groups[0, 0])
    pruned = apply_plan(an, Plan(kept={g: list(range(prob.groups[g].size // 2))}))
    x = _input(model)
    assert _run(pruned, x)[0].shape == _run(model, x)[0].shape


def test_grouped_conv_prunes_whole_groups():
    model = grouped_se_cnn()
    an = analyse(model)
    prob = an.problem
    grouped = [layer for layer in prob.layers if layer.spec.group_channels]
    assert len(grouped) == 2
    for layer in grouped:
        (gid, m_in), = layer.c_in.terms
        assert layer.c_out.terms == [(gid, m_in)] and m_in == 8
        assert prob.groups[gid].size == 4  # 32 channels in groups of 8
    gid = grouped[0].c_in.terms[0][0]
    pruned = apply_plan(an, Plan(kept={gid: [0, 3]}))
    conv = next(n for n in pruned.graph.node if n.name == grouped[0].name)
    assert next(a.i for a in conv.attribute if a.name == "group") == 2
    # the SE conv that reads the grouped output is sliced to the 16 kept channels
    x = _input(model)
    assert _run(pruned, x)[0].shape == (1, 10)
    # channels of one conv group are ranked together: magnitude sees every row of the group
    slices = weight_slices(an)
    assert len(slices[gid]) == 4 * 8 * 3  # 32 channels x (1x1 conv, grouped conv, SE excitation conv)
    rows = consumer_slices(an)[gid]
    assert any(r.weight is None for r in rows)  # the grouped conv reads whole groups


def test_dynamic_batch_survives_normalisation_and_surgery():
    model = yolo_like()
    for v in list(model.graph.input) + list(model.graph.output):
        v.type.tensor_type.shape.dim[0].dim_param = "batch"
    for node in model.graph.node:  # Reshape targets with the batch: -1 / 0
        if node.op_type == "Reshape":
            init = next(i for i in model.graph.initializer if i.name == node.input[1])
            arr = onnx.numpy_helper.to_array(init).copy()
            arr[0] = 0
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.checker.check_model(model, full_check=True)
    an = analyse(model)
    pruned = apply_plan(an, _random_plan(an, np.random.default_rng(3)))
    assert pruned.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x = _input(model, batch=3)
    assert [o.shape[0] for o in _run(pruned, x)] == [3] * len(model.graph.output)


def test_reshape_segments():
    assert _segments([1, 64, 80, 80], [1, 64, 6400]) == [([0], [0]), ([1], [1]), ([2, 3], [2])]
    assert _segments([1, 32, 1, 1], [1, 32]) == [([0], [0]), ([1], [1]), ([2], []), ([3], [])]
    assert _segments([1, 32, 8, 8], [1, 2, 16, 8, 8])[1] == ([1], [1, 2])
    assert _segments([2, 3], [5]) is None


def test_softmax_over_channels_fixes_them_and_over_other_axes_passes():
    g = GraphBuilder(in_shape=(1, 3, 8, 8))
    x = g.relu(g.conv("input", 3, 16))
    s = g.node("Softmax", [g.conv(x, 16, 16)], axis=1)   # categories: fixed
    t = g.node("Softmax", [g.conv(x, 16, 16)], axis=3)   # along W: channels pass
    y = g.conv(g.node("Add", [s, g.conv(t, 16, 16)]), 16, 8)
    an = analyse(g.build(g.head(y, 8)))
    assert len(an.notes) == 1 and "distribution" in an.notes[0]
    by_name = {layer.name: layer for layer in an.problem.layers}
    convs = [n for n in an.model.graph.node if n.op_type == "Conv"]
    assert by_name[convs[3].name].c_in.terms  # the conv after the axis-3 softmax reads a group


def test_registry_one_handler_per_op_and_registration():
    assert handler_for(onnx.helper.make_node("Conv", ["x", "w"], ["y"])).is_layer
    assert handler_for(onnx.helper.make_node("Foo", ["x"], ["y"], domain="custom")) is None
    assert len({type(h) for h in HANDLERS.values()}) >= 15

    class Passthrough(OpHandler):  # a user's op: channels pass unchanged
        op_types = ("CumSum",)

        def propagate(self, node, ctx):
            ctx.set_map(node.output[0], ctx.map(node.input[0]))

    g = GraphBuilder(in_shape=(1, 3, 8, 8))
    x = g.relu(g.conv("input", 3, 16))
    x = g.node("CumSum", [x, g.init(np.array(3, np.int64), "ax")])  # along W
    model = g.build(g.head(g.conv(x, 16, 8), 8))
    assert any("CumSum" in n for n in analyse(model).notes)
    try:
        register(Passthrough)
        an = analyse(model)
        assert an.notes == [] and an.problem.layers[0].c_out.terms
    finally:
        del HANDLERS["CumSum"]


def test_atom_map_helpers():
    m = AtomMap.along(np.arange(4), 1, 4)
    assert m.ids.shape == (1, 4, 1, 1) and m.axis() == 1
    t = m.transposed([0, 2, 3, 1])
    assert t.axes == (3,) and t.ids.shape == (1, 1, 1, 4)
    assert m.aligned(5).axes == (2,)


def test_activations_written_out_run_with_their_layer():
    """GELU (Div, Erf, Add, Mul, Mul) after a MatMul + bias, and SiLU (Sigmoid, Mul) after a
    conv, are timed with the layer in-graph: layer_names gives their nodes and tensors to the
    layer, and they are not counted again as overhead elements."""
    from latprune.ingraph_profile import layer_names
    from latprune.pruner.ops import GraphView
    from latprune.pruner.ops.layers import activation_region

    an = analyse(channels_last_block_cnn(blocks=1))
    names = layer_names(an.model, an.problem)
    fc1 = next(i for i, layer in enumerate(an.problem.layers) if layer.spec.op == "MatMul")
    erf = next(n for n in an.model.graph.node if n.op_type == "Erf")
    assert names[erf.name] == fc1
    view = GraphView(an.model.graph, an.shapes, an.view().inits, an.maps)
    bias_add = next(n for n in an.model.graph.node if n.op_type == "Add"
                    and an.model.graph.node[list(an.model.graph.node).index(n) - 1].op_type == "MatMul")
    nodes, exit_tensor = activation_region(bias_add.output[0], view)
    assert sorted(n.op_type for n in nodes) == ["Add", "Div", "Erf", "Mul", "Mul"]
    assert names[exit_tensor] == fc1
    # a residual Add reads a tensor from outside: no region
    yolo = analyse(yolo_like())
    ynames = layer_names(yolo.model, yolo.problem)
    sig = next(n for n in yolo.model.graph.node if n.op_type == "Sigmoid")
    assert sig.name in ynames


def test_gemm_only_mlp_is_a_model_to_prune():
    g = GraphBuilder(in_shape=(1, 16))
    w1 = g.init(g.rng.normal(0, 0.3, (32, 16)).astype(np.float32))
    h = g.relu(g.node("Gemm", ["input", w1, g.init(np.zeros(32, np.float32), "b")], transB=1))
    w2 = g.init(g.rng.normal(0, 0.3, (10, 32)).astype(np.float32))
    out = g.node("Gemm", [h, w2, g.init(np.zeros(10, np.float32), "b")], transB=1)
    an = analyse(g.build(out, "mlp"))
    (hidden,) = [g for g in an.problem.groups if g.prunable]
    assert hidden.size == 32 and [layer.spec.op for layer in an.problem.layers] == ["Gemm", "Gemm"]
