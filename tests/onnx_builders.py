"""Small ONNX CNNs built with onnx.helper for the tests (no torch, no downloads)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class GraphBuilder:
    """Append nodes one call at a time; every weight is a random initializer."""

    def __init__(self, in_shape=(1, 3, 16, 16), seed: int = 0, opset: int = 17):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.opset = opset
        self.inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(in_shape))]
        self.n = 0

    def _name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def init(self, array: np.ndarray, prefix: str = "w") -> str:
        name = self._name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name=name))
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str] | str:
        outs = [self._name(op.lower() + "_") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self._name(op), **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x: str, c_in: int, c_out: int, k: int = 3, stride: int = 1, group: int = 1,
             bias: bool = True, weight: str | None = None) -> str:
        w = weight or self.init(self.rng.normal(0, 0.3, (c_out, c_in // group, k, k)).astype(np.float32))
        ins = [x, w]
        if bias:
            ins.append(self.init(self.rng.normal(0, 0.1, c_out).astype(np.float32), "b"))
        return self.node("Conv", ins, kernel_shape=[k, k], strides=[stride, stride],
                         pads=[k // 2] * 4, group=group)

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        params = [r.uniform(0.5, 1.5, c), r.normal(0, 0.1, c), r.normal(0, 0.1, c), r.uniform(0.5, 1.5, c)]
        return self.node("BatchNormalization", [x] + [self.init(p.astype(np.float32), "bn") for p in params])

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])

    def head(self, x: str, c: int, classes: int = 10) -> str:
        p = self.node("GlobalAveragePool", [x])
        f = self.node("Flatten", [p], axis=1)
        w = self.init(self.rng.normal(0, 0.3, (classes, c)).astype(np.float32))
        b = self.init(np.zeros(classes, np.float32), "b")
        return self.node("Gemm", [f, w, b], transB=1)

    def build(self, output: str, name: str = "test") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, self.inputs,
                                  [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
                                  self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 8
        model = onnx.shape_inference.infer_shapes(model)
        onnx.checker.check_model(model, full_check=True)
        return model


def residual_cnn(seed: int = 0, blocks: int = 2, width: int = 16) -> onnx.ModelProto:
    """stem conv -> `blocks` identity residual blocks (conv-bn-relu-conv-bn + add + relu) ->
    a stride-2 block with a 1x1 conv shortcut -> head."""
    g = GraphBuilder(seed=seed)
    x = g.relu(g.bn(g.conv("input", 3, width), width))
    for _ in range(blocks):
        y = g.relu(g.bn(g.conv(x, width, 24), 24))
        y = g.bn(g.conv(y, 24, width), width)
        x = g.relu(g.node("Add", [x, y]))
    y = g.relu(g.conv(x, width, 32, stride=2))
    y = g.conv(y, 32, 32)
    s = g.conv(x, width, 32, k=1, stride=2)
    x = g.relu(g.node("Add", [s, y]))
    return g.build(g.head(x, 32), "residual")


def depthwise_cnn(seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2-like: expand 1x1, depthwise 3x3, project 1x1, with an inverted residual."""
    g = GraphBuilder(seed=seed)
    x = g.relu(g.conv("input", 3, 16))
    for _ in range(2):
        y = g.node("Clip", [g.conv(x, 16, 48, k=1)], min=0.0, max=6.0) if g.opset < 11 else \
            g.node("Clip", [g.conv(x, 16, 48, k=1), g.init(np.array(0, np.float32), "c"),
                            g.init(np.array(6, np.float32), "c")])
        y = g.relu(g.conv(y, 48, 48, group=48))
        y = g.conv(y, 48, 16, k=1)
        x = g.node("Add", [x, y])
    return g.build(g.head(x, 16), "depthwise")


def concat_cnn(seed: int = 0) -> onnx.ModelProto:
    """Two branches concatenated on channels, then Split, a per-channel Mul and a Slice."""
    g = GraphBuilder(seed=seed)
    x = g.relu(g.conv("input", 3, 16))
    a = g.relu(g.conv(x, 16, 16))
    b = g.relu(g.conv(x, 16, 24, k=1))
    c = g.node("Concat", [a, b], axis=1)  # 40 channels
    c = g.node("Mul", [c, g.init(g.rng.uniform(0.5, 1.5, (1, 40, 1, 1)).astype(np.float32), "s")])
    p, q = g.node("Split", [c, g.init(np.array([16, 24], np.int64), "sp")], n_out=2, axis=1)
    p = g.conv(p, 16, 16)
    sl = g.node("Slice", [q, g.init(np.array([8], np.int64), "st"), g.init(np.array([24], np.int64), "en"),
                          g.init(np.array([1], np.int64), "ax")])  # channels 8..24 of q
    y = g.node("Add", [p, sl])
    return g.build(g.head(g.relu(y), 16), "concat")


def pad_shortcut_cnn(seed: int = 0) -> onnx.ModelProto:
    """CIFAR ResNet option-A shortcut: x[:, :, ::2, ::2] then zero-pad channels by c/4 each side."""
    g = GraphBuilder(seed=seed)
    x = g.relu(g.bn(g.conv("input", 3, 16, bias=False), 16))
    y = g.relu(g.bn(g.conv(x, 16, 16, bias=False), 16))
    y = g.bn(g.conv(y, 16, 16, bias=False), 16)
    x = g.relu(g.node("Add", [x, y]))
    for c_in, c_out in ((16, 32), (32, 64)):
        y = g.relu(g.bn(g.conv(x, c_in, c_out, stride=2, bias=False), c_out))
        y = g.bn(g.conv(y, c_out, c_out, bias=False), c_out)
        s = g.node("Slice", [x, g.init(np.array([0, 0], np.int64), "st"),
                             g.init(np.array([2**31 - 1] * 2, np.int64), "en"),
                             g.init(np.array([2, 3], np.int64), "ax"), g.init(np.array([2, 2], np.int64), "sp")])
        q = c_out // 4
        s = g.node("Pad", [s, g.init(np.array([0, q, 0, 0, 0, q, 0, 0], np.int64), "pd")], mode="constant")
        x = g.relu(g.node("Add", [s, y]))
        y = g.relu(g.bn(g.conv(x, c_out, c_out, bias=False), c_out))
        y = g.bn(g.conv(y, c_out, c_out, bias=False), c_out)
        x = g.relu(g.node("Add", [x, y]))
    return g.build(g.head(x, 64), "pad_shortcut")


def aliased_weights_cnn(seed: int = 0) -> onnx.ModelProto:
    """Two convs share one weight through Identity nodes, as torch.onnx exports shared modules."""
    g = GraphBuilder(seed=seed)
    x = g.relu(g.conv("input", 3, 16))
    w = g.init(g.rng.normal(0, 0.3, (16, 16, 3, 3)).astype(np.float32))
    w1 = g.node("Identity", [w])
    w2 = g.node("Identity", [w])
    y = g.relu(g.conv(x, 16, 16, weight=w1, bias=False))
    y = g.relu(g.conv(y, 16, 16, weight=w2, bias=False))
    y = g.relu(g.conv(y, 16, 24))
    return g.build(g.head(y, 24), "aliased")


def unsupported_op_cnn(seed: int = 0) -> onnx.ModelProto:
    """A LRN (not understood) in the middle: its channels must become non-prunable."""
    g = GraphBuilder(seed=seed)
    x = g.relu(g.conv("input", 3, 16))
    x = g.node("LRN", [x], size=3)
    x = g.relu(g.conv(x, 16, 24))
    x = g.relu(g.conv(x, 24, 16))
    return g.build(g.head(x, 16), "unsupported")


ALL_BUILDERS = {
    "residual": residual_cnn,
    "depthwise": depthwise_cnn,
    "concat": concat_cnn,
    "pad_shortcut": pad_shortcut_cnn,
    "aliased": aliased_weights_cnn,
    "unsupported": unsupported_op_cnn,
}


def misc_ops_cnn(seed: int = 0) -> onnx.ModelProto:
    """MaxPool, a grouped conv (group=2), a squeeze-excitation Mul broadcast over (N,C,1,1),
    ConvTranspose, Resize by scales, then Reshape to (N, C·H·W) into MatMul + Add."""
    g = GraphBuilder(seed=seed)
    x = g.relu(g.bn(g.conv("input", 3, 16), 16))
    x = g.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])  # 8x8
    x = g.relu(g.conv(x, 16, 16, group=2))  # grouped: not prunable
    x = g.relu(g.conv(x, 16, 24))
    s = g.node("GlobalAveragePool", [x])
    s = g.node("Sigmoid", [g.conv(g.relu(g.conv(s, 24, 8, k=1)), 8, 24, k=1)])
    x = g.node("Mul", [x, s])
    w = g.init(g.rng.normal(0, 0.3, (24, 16, 2, 2)).astype(np.float32))  # (C_in, C_out, k, k)
    x = g.relu(g.node("ConvTranspose", [x, w, g.init(np.zeros(16, np.float32), "b")],
                      kernel_shape=[2, 2], strides=[2, 2]))  # 16x16
    x = g.node("Resize", [x, "", g.init(np.array([1, 1, 0.5, 0.5], np.float32), "sc")], mode="nearest")  # 8x8
    x = g.relu(g.conv(x, 16, 8, stride=2))  # 4x4
    x = g.node("Reshape", [x, g.init(np.array([1, -1], np.int64), "shape")])  # (1, 128)
    w2 = g.init(g.rng.normal(0, 0.3, (128, 10)).astype(np.float32))
    y = g.node("Add", [g.node("MatMul", [x, w2]), g.init(np.zeros(10, np.float32), "b")])
    return g.build(y, "misc_ops")


