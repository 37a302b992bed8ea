"""pruner.onnx_torch: the torch evaluation of an ONNX graph equals ONNX Runtime and has gradients."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

torch = pytest.importorskip("torch")

from onnx_builders import ALL_BUILDERS, GraphBuilder, misc_ops_cnn  # noqa: E402
from latprune.pruner.analysis import analyse  # noqa: E402
from latprune.pruner.forward import Runner  # noqa: E402
from latprune.pruner.onnx_torch import OnnxTorch  # noqa: E402
from latprune.types import InputError  # noqa: E402


def _close(got, ref, rel=1e-4):
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape
    err = np.abs(got - ref).max() / max(1.0, np.abs(ref).max())
    assert err <= rel, err


def _compare(model, batch=4, seed=0):
    x = np.random.default_rng(seed).standard_normal(
        (batch, *[d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:])
    ).astype(np.float32)
    ref = Runner(model).logits(x)
    net = OnnxTorch(model)
    with torch.no_grad():
        outs, _ = net(torch.from_numpy(x))
    _close(outs[0].numpy(), ref)
    return net, x


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
@pytest.mark.parametrize("normalised", [False, True])
def test_matches_onnxruntime(name, normalised):
    model = ALL_BUILDERS[name]()
    if normalised:
        model = analyse(model).model
    _compare(model)


def test_misc_ops_match_onnxruntime():
    # MaxPool, grouped conv, SE Mul, ConvTranspose, Resize, Reshape to (1, -1), MatMul.
    for model in (misc_ops_cnn(), analyse(misc_ops_cnn()).model):
        _compare(model, batch=1)


def kitchen_sink(opset: int = 18):
    """Many operators in one graph (opset 18 forms: Split num_outputs, ReduceMean axes input)."""
    g = GraphBuilder(seed=3, opset=opset)
    f32 = lambda v: g.init(np.asarray(v, np.float32), "c")  # noqa: E731
    i64 = lambda v: g.init(np.asarray(v, np.int64), "i")  # noqa: E731
    x = g.node("LeakyRelu", [g.conv("input", 3, 8)], alpha=0.1)
    a = g.node("HardSigmoid", [x], alpha=0.3, beta=0.4)
    b = g.node("HardSwish", [x])
    c = g.node("Tanh", [x])
    y = g.node("Div", [g.node("Sub", [g.node("Add", [a, b]), c]), f32(2.0)])
    y = g.node("Pad", [y, i64([0, 0, 1, 2, 0, 0, 2, 1]), f32(0.5)], mode="constant")  # 19x19
    y = g.node("Slice", [y, i64([-1, 1]), i64([-(2**63), 17]), i64([3, 2]), i64([-2, 1])])  # 16x10
    p, q = g.node("Split", [y], n_out=2, axis=1, num_outputs=2)
    p = g.node("AveragePool", [p], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 0, 1])  # 8x5
    q = g.node("MaxPool", [q], kernel_shape=[2, 2], strides=[2, 2])  # 8x5
    z = g.node("Concat", [p, q], axis=1)  # 8 channels
    w = g.init(g.rng.normal(0, 0.3, (8, 4, 3, 3)).astype(np.float32))
    z = g.node("ConvTranspose", [z, w, f32(np.zeros(4))], kernel_shape=[3, 3], strides=[2, 2],
               pads=[1, 1, 1, 1], output_padding=[1, 1])  # 4 x 16x10
    z = g.node("Clip", [z, f32(-1.0), f32(1.5)])
    z = g.node("Resize", [z, "", f32([1, 1, 0.75, 0.8])], mode="linear")  # 12x8
    n = g.node("Resize", [z, "", "", i64([18, 11])], mode="nearest", axes=[2, 3])  # 18x11
    n = g.node("Conv", [n, g.init(g.rng.normal(0, 0.3, (6, 4, 3, 3)).astype(np.float32))],
               kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")  # 9x6
    n = g.node("MaxPool", [n], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)  # 5x3
    n = g.node("Add", [n, g.node("LpPool", [n], kernel_shape=[2, 2], pads=[1, 1, 0, 0], p=3)])
    gm = g.node("Add", [g.node("GlobalMaxPool", [n]), g.node("GlobalLpPool", [n])])
    n = g.node("Mul", [n, g.node("Sigmoid", [gm])])
    r = g.node("ReduceMean", [n, i64([3])], keepdims=1)  # 6 x 5x1
    r = g.node("Squeeze", [r, i64([3])])  # (N, 6, 5)
    r = g.node("Transpose", [r], perm=[0, 2, 1])  # (N, 5, 6)
    r = g.node("Unsqueeze", [r, i64([1])])  # (N, 1, 5, 6)
    shape = g.node("Shape", [r])
    batch = g.node("Unsqueeze", [g.node("Gather", [shape, i64(0)], axis=0), i64([0])])
    minus_one = g.node("Constant", [], value=helper.make_tensor("m1", TensorProto.INT64, [1], [-1]))
    r = g.node("Reshape", [r, g.node("Concat", [batch, minus_one], axis=0)])  # (N, 30)
    r = g.node("Dropout", [r])
    wg = g.init(g.rng.normal(0, 0.3, (10, 30)).astype(np.float32))
    out = g.node("Gemm", [r, wg, f32(np.ones(10))], alpha=0.5, beta=2.0, transB=1)
    out = g.node("Softmax", [g.node("Mul", [out, f32(3.0)])], axis=-1)
    return g.build(out, "kitchen_sink")


def test_kitchen_sink_matches_onnxruntime():
    _compare(kitchen_sink(), batch=3)


def test_gradients_flow():
    model = analyse(ALL_BUILDERS["residual"]()).model
    net = OnnxTorch(model)
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    outs, cap = net(x, capture=[conv.output[0]], taps=[(conv.name, 0)])
    assert set(cap) == {conv.output[0], (conv.name, 0)}
    outs[0].square().sum().backward()
    for name in (conv.input[1], bn.input[1], bn.input[2]):
        grad = net.params[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # Shared weights (Identity of an initializer) are one Parameter.
    aliased = ALL_BUILDERS["aliased"]()
    net = OnnxTorch(aliased)
    ids = [n for n in aliased.graph.node if n.op_type == "Identity"]
    assert net.params[ids[0].output[0]] is net.params[ids[1].output[0]]
    assert len(list(net.parameters())) == len({id(p) for p in net.params.values()})


def test_tap_gradient_is_through_that_node_only():
    # The trunk tensor of a residual block feeds a conv and the skip Add: the tap's gradient
    # excludes the skip path.
    model = analyse(ALL_BUILDERS["residual"]()).model
    an = analyse(ALL_BUILDERS["residual"]())
    block = an.problem.blocks[0]
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and n.input[0] == block.skip)
    net = OnnxTorch(model)
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((2, 3, 16, 16)).astype(np.float32))
    outs, cap = net(x, capture=[block.skip], taps=[(conv.name, 0)])
    g_tap, g_all = torch.autograd.grad(outs[0].sum(), [cap[(conv.name, 0)], cap[block.skip]])
    assert not torch.allclose(g_tap, g_all)


def test_unsupported_op_raises():
    g = GraphBuilder()
    x = g.relu(g.conv("input", 3, 8))
    x = g.node("Det", [g.node("Reshape", [x, g.init(np.array([8, 16, 16], np.int64), "s")])])
    model = g.build(x, "det")
    with pytest.raises(InputError, match="Det"):
        OnnxTorch(model)
