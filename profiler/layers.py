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
    elif spec.op == "Attention":  # softmax(q kᵀ / √d) v with c_in / head_dim heads
        d = spec.kernel[0]
        heads = max(1, c_in // d)
        n_q, n_k = spec.input_hw
        x_shape = [spec.batch, heads, n_q, d]
        inits.append(numpy_helper.from_array(rng.standard_normal((spec.batch, heads, d, n_k)).astype(np.float32), "K"))
        inits.append(numpy_helper.from_array(rng.standard_normal((spec.batch, heads, n_k, d)).astype(np.float32), "V"))
        inits.append(numpy_helper.from_array(np.array(d ** -0.5, np.float32), "S"))
        nodes += [helper.make_node("MatMul", ["x", "K"], ["qk"]), helper.make_node("Mul", ["qk", "S"], ["s"]),
                  helper.make_node("Softmax", ["s"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "V"], ["y"])]
    elif spec.op == "MatMul":  # a weight along the last axis of (batch, tokens..., c_in)
        x_shape = [spec.batch] + list(spec.input_hw) + [c_in]
        inits.append(numpy_helper.from_array(rng.standard_normal((c_in, c_out)).astype(np.float32), "W"))
        out = "y" if not spec.has_bias else "pre"
        nodes.append(helper.make_node("MatMul", ["x", "W"], [out]))
        if spec.has_bias:
            inits.append(numpy_helper.from_array(np.zeros(c_out, np.float32), "B"))
            nodes.append(helper.make_node("Add", [out, "B"], ["y"]))
    else:
        if spec.depthwise:
            groups = c_in
        elif spec.group_channels:
            groups = max(1, c_in // spec.group_channels)
        else:
            groups = spec.fixed_groups
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
        elif spec.activation == "Silu":  # x·sigmoid(x), as exporters write SiLU
            nodes.append(helper.make_node("Sigmoid", [out], ["sig"]))
            nodes.append(helper.make_node("Mul", [out, "sig"], ["y"]))
        elif spec.activation:
            nodes.append(helper.make_node(spec.activation, [out], ["y"]))
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


class _BoundRunner:
    """Runs a session through IO binding with preallocated input and output buffers, so a
    timing holds the layer's work and ONNX Runtime's dispatch, not the Python-side output
    allocation and copy (which a layer inside a whole model never pays)."""

    def __init__(self, session, feed: dict) -> None:
        import onnxruntime as ort

        self.session = session
        self.binding = session.io_binding()
        self._keep = []
        for name, value in feed.items():
            ov = ort.OrtValue.ortvalue_from_numpy(value)
            self._keep.append(ov)
            self.binding.bind_ortvalue_input(name, ov)
        for out, arr in zip(session.get_outputs(), session.run(None, feed)):
            ov = ort.OrtValue.ortvalue_from_shape_and_type(list(arr.shape), arr.dtype)
            self._keep.append(ov)
            self.binding.bind_ortvalue_output(out.name, ov)

    def run(self, _outputs=None, _feed=None) -> None:
        """Same call shape as InferenceSession.run, so onnxrt.time_session can drive it."""
        self.session.run_with_iobinding(self.binding)


_CALL_OVERHEAD_MS: dict[int, float] = {}


def call_overhead_ms(threads: int = 1) -> float:
    """Median time (ms) of one bound run of a trivial one-element model: ONNX Runtime's fixed
    per-run cost, subtracted from every layer cell (a layer inside a model does not pay it)."""
    if threads not in _CALL_OVERHEAD_MS:
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "noop",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        session = make_session(model, threads)
        runner = _BoundRunner(session, random_feed(session))
        _CALL_OVERHEAD_MS[threads] = time_session(runner, None, warmup=20, min_runs=200, min_seconds=0.05).median_ms
    return _CALL_OVERHEAD_MS[threads]


def measure_layer(spec: LayerSpec, c_in: int, c_out: int, threads: int = 1) -> TimingStats:
    """Latency (ms) of one layer at (c_in, c_out): median of bound runs minus the per-run
    overhead (call_overhead_ms), floored at 10% of the raw median."""
    session = make_session(layer_model(spec, c_in, c_out), threads)
    runner = _BoundRunner(session, random_feed(session))
    st = time_session(runner, None, warmup=3, min_runs=15, min_seconds=0.05)
    overhead = call_overhead_ms(threads)
    net = lambda v: max(v - overhead, 0.1 * v)  # noqa: E731
    return TimingStats(net(st.median_ms), net(st.p90_ms), net(st.min_ms), st.runs)
