"""Layer micro-benchmarks: one conv/gemm (plus the activation ORT fuses into it) at a given
(c_in, c_out), built as a one-layer ONNX model with random weights and timed alone."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from latprune.types import LayerSpec, TimingStats
from latprune.profiler.onnxrt import make_session, random_feed, time_session


def layer_model(spec: LayerSpec, c_in: int, c_out: int, seed: int = 0) -> onnx.ModelProto:
    """A model computing one layer of `spec` with `c_in` input and `c_out` output channels
    (features for Gemm). Depthwise convs use c_in == c_out == groups."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    if spec.op == "Gemm":
        x_shape = [spec.batch, c_in]
        w = rng.standard_normal((c_out, c_in)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, "W"))
        ins = ["x", "W"]
        if spec.has_bias:
            inits.append(numpy_helper.from_array(np.zeros(c_out, np.float32), "B"))
            ins.append("B")
        nodes.append(helper.make_node("Gemm", ins, ["y"], transB=1))
    else:
        groups = c_in if spec.depthwise else spec.fixed_groups
        if spec.depthwise:
            c_out = c_in
        x_shape = [spec.batch, c_in] + list(spec.input_hw)
        if spec.op == "Conv":
            w_shape = [c_out, c_in // groups] + list(spec.kernel)
        else:
            w_shape = [c_in, c_out // groups] + list(spec.kernel)
        inits.append(numpy_helper.from_array(
            (rng.standard_normal(w_shape) * 0.1).astype(np.float32), "W"))
        ins = ["x", "W"]
        if spec.has_bias:
            inits.append(numpy_helper.from_array(np.zeros(c_out, np.float32), "B"))
            ins.append("B")
        out = "y" if not spec.activation else "pre"
        nodes.append(helper.make_node(spec.op, ins, [out], kernel_shape=spec.kernel,
                                      strides=spec.stride, pads=spec.pads,
                                      dilations=spec.dilation, group=groups))
        if spec.activation == "Clip":
            inits += [numpy_helper.from_array(np.array(0, np.float32), "lo"),
                      numpy_helper.from_array(np.array(6, np.float32), "hi")]
            nodes.append(helper.make_node("Clip", [out, "lo", "hi"], ["y"]))
        elif spec.activation:
            nodes.append(helper.make_node(spec.activation, [out], ["y"]))
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def measure_layer(spec: LayerSpec, c_in: int, c_out: int, threads: int = 1) -> TimingStats:
    """Median latency (ms) of one layer at (c_in, c_out)."""
    session = make_session(layer_model(spec, c_in, c_out), threads)
    return time_session(session, random_feed(session), warmup=3, min_runs=15, min_seconds=0.05)
