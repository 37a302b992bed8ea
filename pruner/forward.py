"""Batched forward passes through ONNX Runtime on calibration inputs, for importance,
distortion curves and repair (not for timing: see profiler/)."""
from __future__ import annotations

import numpy as np
import onnx

from latprune.types import InputError


def with_batch_dim(model: onnx.ModelProto, extra_outputs: list[str] = ()) -> onnx.ModelProto:
    """Copy of `model` whose inputs/outputs have a symbolic batch dim 'N' and which also
    outputs the tensors `extra_outputs` (intermediate value_info is cleared)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {i.name for i in graph.initializer}
    for value in list(graph.input) + list(graph.output):
        if value.name in inits:
            continue
        shape = value.type.tensor_type.shape
        if len(shape.dim):
            shape.dim[0].ClearField("dim_value")
            shape.dim[0].dim_param = "N"
    del graph.value_info[:]
    have = {o.name for o in graph.output}
    for name in extra_outputs:
        if name not in have:
            graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
            have.add(name)
    return out


def input_shape(model: onnx.ModelProto) -> list[int]:
    """Shape of the model's single data input (initializers excluded); 0 for symbolic dims."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise InputError(f"calibration needs a model with one input, this one has {len(inputs)}")
    return [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]


def compared_outputs(model: onnx.ModelProto) -> list[str]:
    """The outputs distortion is measured on: every float output whose shape is fixed apart
    from the batch (a detector's boxes and scores, all heads of a multi-output model), or the
    first output when none is (e.g. detections after NMS, whose count varies)."""
    fixed = []
    for out in model.graph.output:
        tt = out.type.tensor_type
        if tt.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                                onnx.TensorProto.BFLOAT16) or not tt.HasField("shape"):
            continue
        dims = list(tt.shape.dim)[1:]
        if all(d.HasField("dim_value") for d in dims):
            fixed.append(out.name)
    return fixed or [model.graph.output[0].name]


class Runner:
    """An ONNX Runtime session over `model` returning its compared outputs (compared_outputs)
    and `extra_outputs`. Runs in batches; falls back to one item per call when the graph
    hard-codes batch 1."""

    def __init__(self, model: onnx.ModelProto, extra_outputs: list[str] = (), threads: int = 0,
                 batch: int = 64) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.outputs = compared_outputs(model)
        self.names = self.outputs + [n for n in extra_outputs if n not in self.outputs]
        data = with_batch_dim(model, self.names[1:]).SerializeToString()
        self.session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.batch = batch

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """{output name: array over all rows of x}."""
        import onnxruntime as ort

        chunks: dict[str, list[np.ndarray]] = {n: [] for n in self.names}
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # a batched try that fails is expected with a fixed batch
        for start in range(0, len(x), self.batch):
            xb = np.ascontiguousarray(x[start:start + self.batch], dtype=np.float32)
            try:
                outs = self.session.run(self.names, {self.input: xb}, quiet if self.batch > 1 else None)
                if self.batch > 1 and any(o.ndim == 0 or o.shape[0] != len(xb) for o in outs):
                    raise ValueError("outputs do not follow the batch")
            except Exception:
                if self.batch == 1:
                    raise
                self.batch = 1  # a Reshape with a hard-coded batch of 1: go item by item
                return self.run(x)
            for n, o in zip(self.names, outs):
                chunks[n].append(o)
        return {n: np.concatenate(c) for n, c in chunks.items()}

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The compared outputs of every item of x, flattened and joined: (items, features)."""
        got = self.run(x)
        if len(self.outputs) == 1:
            return got[self.outputs[0]]
        return np.concatenate([got[n].reshape(len(got[n]), -1) for n in self.outputs], axis=1)
