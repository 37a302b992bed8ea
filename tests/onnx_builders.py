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




# ---- modern CNN and detector blocks (issue 12) ------------------------------------------------

def _silu(g: GraphBuilder, x: str) -> str:
    """x·sigmoid(x), as torch.onnx exports nn.SiLU."""
    return g.node("Mul", [x, g.node("Sigmoid", [x])])


def _cbs(g: GraphBuilder, x: str, c_in: int, c_out: int, k: int = 3, stride: int = 1) -> str:
    """Conv + BN + SiLU (YOLO's Conv module)."""
    return _silu(g, g.bn(g.conv(x, c_in, c_out, k=k, stride=stride, bias=False), c_out))


def _c2f(g: GraphBuilder, x: str, c_in: int, c_out: int, n: int = 2, shortcut: bool = True) -> str:
    """YOLOv8's C2f: cv1 to 2c channels, Split in halves, n bottlenecks on the second half
    (residual when `shortcut`), Concat of all pieces, cv2."""
    c = c_out // 2
    y = _cbs(g, x, c_in, 2 * c, k=1)
    a, b = g.node("Split", [y, g.init(np.array([c, c], np.int64), "sp")], n_out=2, axis=1)
    pieces = [a, b]
    for _ in range(n):
        h = _cbs(g, _cbs(g, pieces[-1], c, c), c, c)
        pieces.append(g.node("Add", [pieces[-1], h]) if shortcut else h)
    return _cbs(g, g.node("Concat", pieces, axis=1), (2 + n) * c, c_out, k=1)


def yolo_like(seed: int = 0, reg_max: int = 4, classes: int = 5) -> onnx.ModelProto:
    """A small YOLOv8-style detector on a 32x32 input: stem, C2f with residual bottlenecks,
    an SPPF (MaxPool chain + Concat), an upsampling neck (Resize + Concat + C2f without
    shortcut) and a two-scale decoupled head whose box branch ends in a DFL decode (Reshape
    to (4, reg_max), Transpose, Softmax, a fixed 1x1 conv with weights 0..reg_max-1) and whose
    class branch ends in a Sigmoid; the outputs are concatenated over scales: (1, 4 + classes, N)."""
    g = GraphBuilder(in_shape=(1, 3, 32, 32), seed=seed)
    x = _cbs(g, "input", 3, 16, stride=2)                     # 16x16
    p3 = _c2f(g, _cbs(g, x, 16, 32, stride=2), 32, 32)        # 8x8
    x = _cbs(g, p3, 32, 64, stride=2)                         # 4x4
    x = _cbs(g, x, 64, 32, k=1)                               # SPPF
    m1 = g.node("MaxPool", [x], kernel_shape=[5, 5], strides=[1, 1], pads=[2, 2, 2, 2])
    m2 = g.node("MaxPool", [m1], kernel_shape=[5, 5], strides=[1, 1], pads=[2, 2, 2, 2])
    p4 = _cbs(g, g.node("Concat", [x, m1, m2], axis=1), 96, 64, k=1)
    up = g.node("Resize", [p4, "", g.init(np.array([1, 1, 2, 2], np.float32), "sc")], mode="nearest")
    n3 = _c2f(g, g.node("Concat", [up, p3], axis=1), 96, 32, n=1, shortcut=False)
    outs = []
    for feat, c, hw in ((n3, 32, 64), (p4, 64, 16)):
        box = g.conv(_cbs(g, _cbs(g, feat, c, 16), 16, 16), 16, 4 * reg_max, k=1)
        cls = g.conv(_cbs(g, _cbs(g, feat, c, 16), 16, 16), 16, classes, k=1)
        cat = g.node("Concat", [box, cls], axis=1)
        outs.append(g.node("Reshape", [cat, g.init(np.array([1, 4 * reg_max + classes, hw], np.int64), "shp")]))
    y = g.node("Concat", outs, axis=2)                        # (1, 4*reg_max + classes, 80)
    box, cls = g.node("Split", [y, g.init(np.array([4 * reg_max, classes], np.int64), "sp")], n_out=2, axis=1)
    d = g.node("Reshape", [box, g.init(np.array([1, 4, reg_max, 80], np.int64), "shp")])
    d = g.node("Softmax", [g.node("Transpose", [d], perm=[0, 2, 1, 3])], axis=1)
    dfl = g.init(np.arange(reg_max, dtype=np.float32).reshape(1, reg_max, 1, 1), "dfl")
    d = g.node("Conv", [d, dfl], kernel_shape=[1, 1])       # expected bin: (1, 1, 4, 80)
    d = g.node("Reshape", [d, g.init(np.array([1, 4, 80], np.int64), "shp")])
    anchors = g.init(g.rng.uniform(0, 32, (1, 4, 80)).astype(np.float32), "anchors")
    d = g.node("Add", [d, anchors])
    out = g.node("Concat", [d, g.node("Sigmoid", [cls])], axis=1)
    return g.build(out, "yolo_like")


def channels_last_block_cnn(seed: int = 0, width: int = 16, blocks: int = 2) -> onnx.ModelProto:
    """ConvNeXt-style: stem conv, then blocks of depthwise 7x7 conv, Transpose to NHWC,
    LayerNormalization over C, MatMul + bias to 4C, exact GELU written out with Erf, MatMul +
    bias back to C, a per-channel layer scale (Mul), Transpose back, residual Add; then a
    channels-first LayerNorm (Transpose pair) and a head."""
    g = GraphBuilder(seed=seed)
    x = g.conv("input", 3, width, k=4, stride=4)  # 5x5 (pads 2)
    c = width
    for _ in range(blocks):
        y = g.conv(x, c, c, k=7, group=c)
        y = g.node("Transpose", [y], perm=[0, 2, 3, 1])
        y = g.node("LayerNormalization", [y, g.init(g.rng.uniform(0.5, 1.5, c).astype(np.float32), "ln"),
                                          g.init(g.rng.normal(0, 0.1, c).astype(np.float32), "ln")], axis=-1)
        y = g.node("Add", [g.node("MatMul", [y, g.init(g.rng.normal(0, 0.3, (c, 4 * c)).astype(np.float32))]),
                           g.init(g.rng.normal(0, 0.1, 4 * c).astype(np.float32), "b")])
        half = g.node("Mul", [y, g.init(np.array(0.5, np.float32), "c")])
        erf = g.node("Erf", [g.node("Div", [y, g.init(np.array(1.4142135, np.float32), "c")])])
        y = g.node("Mul", [half, g.node("Add", [erf, g.init(np.array(1.0, np.float32), "c")])])
        y = g.node("Add", [g.node("MatMul", [y, g.init(g.rng.normal(0, 0.3, (4 * c, c)).astype(np.float32))]),
                           g.init(g.rng.normal(0, 0.1, c).astype(np.float32), "b")])
        y = g.node("Mul", [y, g.init(g.rng.uniform(0.5, 1.5, c).astype(np.float32), "gamma")])
        y = g.node("Transpose", [y], perm=[0, 3, 1, 2])
        x = g.node("Add", [x, y])
    x = g.node("Transpose", [x], perm=[0, 2, 3, 1])
    x = g.node("LayerNormalization", [x, g.init(np.ones(c, np.float32), "ln"), g.init(np.zeros(c, np.float32), "ln")],
               axis=-1)
    x = g.node("Transpose", [x], perm=[0, 3, 1, 2])
    return g.build(g.head(x, c), "channels_last")


def shuffle_cnn(seed: int = 0, width: int = 16) -> onnx.ModelProto:
    """ShuffleNetV2-style units: Split the channels in halves, a 1x1-dw3x3-1x1 branch on the
    second half, Concat, then channel shuffle (Reshape to (2, C/2), Transpose, Reshape back);
    the second unit takes its halves with Slice."""
    g = GraphBuilder(seed=seed)
    x = g.relu(g.bn(g.conv("input", 3, 2 * width), 2 * width))
    c = width
    for unit in range(2):
        if unit == 0:
            a, b = g.node("Split", [x, g.init(np.array([c, c], np.int64), "sp")], n_out=2, axis=1)
        else:
            a = g.node("Slice", [x, g.init(np.array([0], np.int64), "st"), g.init(np.array([c], np.int64), "en"),
                                 g.init(np.array([1], np.int64), "ax")])
            b = g.node("Slice", [x, g.init(np.array([c], np.int64), "st"), g.init(np.array([2 * c], np.int64), "en"),
                                 g.init(np.array([1], np.int64), "ax")])
        y = g.relu(g.bn(g.conv(b, c, c, k=1), c))
        y = g.bn(g.conv(y, c, c, group=c), c)
        y = g.relu(g.bn(g.conv(y, c, c, k=1), c))
        x = g.node("Concat", [a, y], axis=1)
        x = g.node("Reshape", [x, g.init(np.array([1, 2, c, 16, 16], np.int64), "shp")])
        x = g.node("Transpose", [x], perm=[0, 2, 1, 3, 4])
        x = g.node("Reshape", [x, g.init(np.array([1, 2 * c, 16, 16], np.int64), "shp")])
    return g.build(g.head(g.relu(g.conv(x, 2 * c, 24, k=1)), 24), "shuffle")


def grouped_se_cnn(seed: int = 0, width: int = 32, group_width: int = 8) -> onnx.ModelProto:
    """RegNetY / ResNeXt-style bottleneck blocks: 1x1 conv, grouped 3x3 conv (group width 8),
    squeeze-excitation (ReduceMean, 1x1 convs, Sigmoid, Mul), 1x1 conv, residual Add."""
    g = GraphBuilder(seed=seed)
    x = g.relu(g.bn(g.conv("input", 3, 24), 24))
    for _ in range(2):
        y = g.relu(g.bn(g.conv(x, 24, width, k=1), width))
        y = g.relu(g.bn(g.conv(y, width, width, group=width // group_width), width))
        s = g.node("ReduceMean", [y], axes=[2, 3], keepdims=1)
        s = g.node("Sigmoid", [g.conv(g.relu(g.conv(s, width, 8, k=1)), 8, width, k=1)])
        y = g.node("Mul", [y, s])
        y = g.bn(g.conv(y, width, 24, k=1), 24)
        x = g.relu(g.node("Add", [x, y]))
    return g.build(g.head(x, 24), "grouped_se")


MODERN_BUILDERS = {
    "yolo_like": yolo_like,
    "channels_last": channels_last_block_cnn,
    "shuffle": shuffle_cnn,
    "grouped_se": grouped_se_cnn,
}


# ---- transformer blocks (issue 14) -------------------------------------------------------------

def _linear(g: GraphBuilder, x: str, c_in: int, c_out: int) -> str:
    """x @ W + b as torch.onnx exports nn.Linear on (B, N, C)."""
    w = g.init(g.rng.normal(0, c_in ** -0.5, (c_in, c_out)).astype(np.float32))
    return g.node("Add", [g.node("MatMul", [x, w]), g.init(g.rng.normal(0, 0.02, c_out).astype(np.float32), "b")])


def _layernorm(g: GraphBuilder, x: str, c: int) -> str:
    return g.node("LayerNormalization", [x, g.init(g.rng.uniform(0.8, 1.2, c).astype(np.float32), "ln"),
                                         g.init(g.rng.normal(0, 0.05, c).astype(np.float32), "ln")], axis=-1)


def _gelu(g: GraphBuilder, x: str) -> str:
    """Exact GELU as exported: x · 0.5 · (1 + erf(x / √2))."""
    erf = g.node("Erf", [g.node("Div", [x, g.init(np.array(1.4142135, np.float32), "c")])])
    return g.node("Mul", [g.node("Mul", [x, g.node("Add", [erf, g.init(np.array(1.0, np.float32), "c")])]),
                          g.init(np.array(0.5, np.float32), "c")])


def _attention_core(g: GraphBuilder, q: str, k: str, v: str, heads: int, tokens: int, dim: int,
                    mask: str | None = None) -> str:
    """softmax(q kᵀ · d^-½ [+ mask]) v on (B, H, N, d), back to (B, N, D)."""
    d = dim // heads
    kt = g.node("Transpose", [k], perm=[0, 1, 3, 2])
    scores = g.node("Mul", [g.node("MatMul", [q, kt]), g.init(np.array(d ** -0.5, np.float32), "c")])
    if mask is not None:
        scores = g.node("Add", [scores, mask])
    out = g.node("MatMul", [g.node("Softmax", [scores], axis=-1), v])
    out = g.node("Transpose", [out], perm=[0, 2, 1, 3])
    return g.node("Reshape", [out, g.init(np.array([1, tokens, dim], np.int64), "shp")])


def vit_like(seed: int = 0, dim: int = 32, heads: int = 4, depth: int = 2, gather_qkv: bool = False) -> onnx.ModelProto:
    """A timm-style ViT on a 16x16 image: patch conv (4x4) to 16 tokens, a class token
    (Concat) and positional embedding (Add), pre-norm blocks with a fused QKV projection
    (Reshape to (B, N, 3, H, d), Transpose to (3, B, H, N, d), then Split + Squeeze, or Gather
    with `gather_qkv`), attention, projection and a GELU MLP (4x) with residual Adds; final
    LayerNorm, the class token (Gather) and a linear head."""
    g = GraphBuilder(in_shape=(1, 3, 16, 16), seed=seed)
    w = g.init(g.rng.normal(0, 0.3, (dim, 3, 4, 4)).astype(np.float32))
    x = g.node("Conv", ["input", w, g.init(np.zeros(dim, np.float32), "b")], kernel_shape=[4, 4],
               strides=[4, 4], pads=[0, 0, 0, 0])                    # patches: (1, D, 4, 4)
    x = g.node("Transpose", [g.node("Reshape", [x, g.init(np.array([1, dim, 16], np.int64), "shp")])],
               perm=[0, 2, 1])                                      # (1, 16, D)
    cls = g.init(g.rng.normal(0, 0.02, (1, 1, dim)).astype(np.float32), "cls")
    x = g.node("Concat", [cls, x], axis=1)                         # (1, 17, D)
    x = g.node("Add", [x, g.init(g.rng.normal(0, 0.02, (1, 17, dim)).astype(np.float32), "pos")])
    n, d = 17, dim // heads
    for _ in range(depth):
        y = _linear(g, _layernorm(g, x, dim), dim, 3 * dim)
        y = g.node("Reshape", [y, g.init(np.array([1, n, 3, heads, d], np.int64), "shp")])
        y = g.node("Transpose", [y], perm=[2, 0, 3, 1, 4])        # (3, 1, H, N, d)
        if gather_qkv:
            q, k, v = (g.node("Gather", [y, g.init(np.array(i, np.int64), "i")], axis=0) for i in range(3))
        else:
            parts = g.node("Split", [y, g.init(np.array([1, 1, 1], np.int64), "sp")], n_out=3, axis=0)
            q, k, v = (g.node("Squeeze", [p, g.init(np.array([0], np.int64), "ax")]) for p in parts)
        y = _linear(g, _attention_core(g, q, k, v, heads, n, dim), dim, dim)
        x = g.node("Add", [x, y])
        y = _linear(g, _gelu(g, _linear(g, _layernorm(g, x, dim), dim, 4 * dim)), 4 * dim, dim)
        x = g.node("Add", [x, y])
    x = _layernorm(g, x, dim)
    x = g.node("Gather", [x, g.init(np.array(0, np.int64), "i")], axis=1)  # (1, D): the class token
    w = g.init(g.rng.normal(0, 0.3, (10, dim)).astype(np.float32))
    return g.build(g.node("Gemm", [x, w, g.init(np.zeros(10, np.float32), "b")], transB=1), "vit_like")


def bert_like(seed: int = 0, dim: int = 32, heads: int = 4, depth: int = 2, tokens: int = 12,
              vocab: int = 50) -> onnx.ModelProto:
    """A BERT-style encoder: input_ids (1, S) int64 and attention_mask (1, S) float; word
    embeddings (Gather) + positions, LayerNorm; post-norm blocks with separate Q/K/V
    projections (Reshape to (B, S, H, d), Transpose), the mask added to the scores as
    (1 - mask)·-1e4 broadcast over heads and queries, output projection, GELU MLP; returns the
    last hidden state (1, S, D)."""
    g = GraphBuilder(seed=seed)
    g.inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, tokens]),
                helper.make_tensor_value_info("attention_mask", TensorProto.FLOAT, [1, tokens])]
    x = g.node("Gather", [g.init(g.rng.normal(0, 0.5, (vocab, dim)).astype(np.float32), "emb"), "input_ids"], axis=0)
    x = g.node("Add", [x, g.init(g.rng.normal(0, 0.1, (1, tokens, dim)).astype(np.float32), "pos")])
    x = _layernorm(g, x, dim)
    m = g.node("Mul", [g.node("Sub", [g.init(np.array(1.0, np.float32), "c"), "attention_mask"]),
                       g.init(np.array(-1e4, np.float32), "c")])
    m = g.node("Reshape", [m, g.init(np.array([1, 1, 1, tokens], np.int64), "shp")])
    d = dim // heads
    for _ in range(depth):
        def split_heads(t, perm=(0, 2, 1, 3)):
            t = g.node("Reshape", [t, g.init(np.array([1, tokens, heads, d], np.int64), "shp")])
            return g.node("Transpose", [t], perm=list(perm))
        q, k, v = (split_heads(_linear(g, x, dim, dim)) for _ in range(3))
        y = _linear(g, _attention_core(g, q, k, v, heads, tokens, dim, mask=m), dim, dim)
        x = _layernorm(g, g.node("Add", [x, y]), dim)
        y = _linear(g, _gelu(g, _linear(g, x, dim, 4 * dim)), 4 * dim, dim)
        x = _layernorm(g, g.node("Add", [x, y]), dim)
    return g.build(x, "bert_like")


def mobilevit_like(seed: int = 0, c: int = 16, dim: int = 24, heads: int = 2) -> onnx.ModelProto:
    """A MobileViT-style hybrid block on a 16x16 map: conv 3x3, conv 1x1 to the transformer
    width, unfold 2x2 patches to (B·4, 64 tokens, dim) with Reshape/Transpose, one pre-norm
    transformer layer (fused QKV with Gather), fold back, conv 1x1, Concat with the block's
    input, fuse conv 3x3, then a classifier head."""
    g = GraphBuilder(seed=seed)
    x = g.relu(g.bn(g.conv("input", 3, c), c))
    y = g.conv(g.relu(g.conv(x, c, c)), c, dim, k=1)               # (1, dim, 16, 16)
    # unfold: (1, dim, 8, 2, 8, 2) -> (1, 2, 2, 8, 8, dim) -> (4, 64, dim)
    y = g.node("Reshape", [y, g.init(np.array([1, dim, 8, 2, 8, 2], np.int64), "shp")])
    y = g.node("Transpose", [y], perm=[0, 3, 5, 2, 4, 1])
    y = g.node("Reshape", [y, g.init(np.array([4, 64, dim], np.int64), "shp")])
    n, d = 64, dim // heads
    t = _linear(g, _layernorm(g, y, dim), dim, 3 * dim)
    t = g.node("Reshape", [t, g.init(np.array([4, n, 3, heads, d], np.int64), "shp")])
    t = g.node("Transpose", [t], perm=[2, 0, 3, 1, 4])
    q, k, v = (g.node("Gather", [t, g.init(np.array(i, np.int64), "i")], axis=0) for i in range(3))
    kt = g.node("Transpose", [k], perm=[0, 1, 3, 2])
    a = g.node("Softmax", [g.node("Mul", [g.node("MatMul", [q, kt]), g.init(np.array(d ** -0.5, np.float32), "c")])],
               axis=-1)
    o = g.node("Transpose", [g.node("MatMul", [a, v])], perm=[0, 2, 1, 3])
    o = _linear(g, g.node("Reshape", [o, g.init(np.array([4, n, dim], np.int64), "shp")]), dim, dim)
    y = g.node("Add", [y, o])
    y = g.node("Add", [y, _linear(g, _gelu(g, _linear(g, _layernorm(g, y, dim), dim, 2 * dim)), 2 * dim, dim)])
    # fold back: (4, 64, dim) -> (1, 2, 2, 8, 8, dim) -> (1, dim, 8, 2, 8, 2) -> (1, dim, 16, 16)
    y = g.node("Reshape", [y, g.init(np.array([1, 2, 2, 8, 8, dim], np.int64), "shp")])
    y = g.node("Transpose", [y], perm=[0, 5, 3, 1, 4, 2])
    y = g.node("Reshape", [y, g.init(np.array([1, dim, 16, 16], np.int64), "shp")])
    y = g.relu(g.bn(g.conv(y, dim, c, k=1), c))
    x = g.relu(g.conv(g.node("Concat", [x, y], axis=1), 2 * c, c))
    return g.build(g.head(x, c), "mobilevit_like")


TRANSFORMER_BUILDERS = {
    "vit_like": vit_like,
    "vit_gather": lambda seed=0: vit_like(seed, gather_qkv=True),
    "bert_like": bert_like,
    "mobilevit_like": mobilevit_like,
}
