"""A small ResNet-style demo CNN (3×64×64 input, 4 residual blocks), built with onnx.helper,
so that `./run.sh` shows the whole pipeline without any download."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build_demo_model(path: str | Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def param(shape, scale):
        name = f"p{len(inits)}"
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def conv(x, c_in, c_out, stride=1, relu=True):
        out = f"t{len(nodes)}"
        nodes.append(helper.make_node("Conv", [x, param((c_out, c_in, 3, 3), (2 / (9 * c_in)) ** 0.5),
                                               param((c_out,), 0.01)], [out],
                                      kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[stride, stride]))
        if relu:
            nodes.append(helper.make_node("Relu", [out], [out + "r"]))
            out += "r"
        return out

    x = conv("input", 3, 32, stride=2)
    for c_in, c_out, stride in ((32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1)):
        if c_in == c_out and stride == 1:
            y = conv(conv(x, c_in, c_out), c_out, c_out, relu=False)
            nodes.append(helper.make_node("Add", [x, y], [f"a{len(nodes)}"]))
            x = nodes[-1].output[0]
            nodes.append(helper.make_node("Relu", [x], [x + "r"]))
            x += "r"
        else:
            x = conv(x, c_in, c_out, stride)
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], axis=1))
    nodes.append(helper.make_node("Gemm", ["flat", param((10, 128), 0.1), param((10,), 0.01)], ["logits"], transB=1))
    graph = helper.make_graph(nodes, "demo", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 64, 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path
