"""Load, validate and normalise ONNX models; save them atomically.

Every failure on user input raises `InputError` with one clear sentence, so the CLI can print
it and exit 2 and the service can answer 4xx.
"""
from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from latprune.types import InputError

MAX_MODEL_BYTES = 2 * 1024**3 - 1  # protobuf's hard limit; larger models need external data


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and validate an ONNX file; raise InputError on anything unusable."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    size = p.stat().st_size
    if size == 0:
        raise InputError(f"{p}: file is empty, not an ONNX model")
    if size > MAX_MODEL_BYTES:
        raise InputError(f"{p}: {size} bytes is over the 2 GiB protobuf limit")
    data = p.read_bytes()
    return model_from_bytes(data, name=str(p))


def model_from_bytes(data: bytes, name: str = "model") -> onnx.ModelProto:
    """Parse bytes as an ONNX model and validate it (see load_model)."""
    try:
        model = onnx.ModelProto()
        model.ParseFromString(data)
    except Exception as exc:  # protobuf DecodeError and friends
        raise InputError(f"{name}: not an ONNX model (protobuf parse failed: {exc})") from None
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise InputError(f"{name}: not an ONNX model (no graph or an empty graph)")
    for init in model.graph.initializer:
        if init.data_location == TensorProto.EXTERNAL or init.external_data:
            raise InputError(
                f"{name}: initializer '{init.name}' uses external data; external data is "
                "refused (save the model as a single file)"
            )
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.t.data_location == TensorProto.EXTERNAL:
                    raise InputError(f"{name}: Constant '{node.name}' uses external data; refused")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{name}: invalid ONNX model: {first}") from None
    return model


def normalise(model: onnx.ModelProto, keep_parameters: bool = False) -> onnx.ModelProto:
    """Return a copy with constant subgraphs and shape computations folded into initializers
    (onnxslim: constant folding and dead-node elimination only, see `fold_constants`), Constant
    nodes turned into initializers, unique node names and initializers removed from the graph
    inputs (old exporters list them there). Node names, initializer names and symbolic (e.g.
    batch) input dimensions are kept. `keep_parameters`: no dead-node elimination, which
    removes x + 0 and x · 1 (a freshly initialised bias or scale): a module being trained (the
    torch frontend) needs every parameter in the graph."""
    model = fold_constants(_resolve_weight_aliases(model), keep_parameters)
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    keep_nodes = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    for idx, node in enumerate(graph.node):
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = copy.deepcopy(node.attribute[0].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            inits.add(tensor.name)
            continue
        if node.op_type in FOLDABLE and node.domain in ("", "ai.onnx") and all(
                (not i or i in inits) for i in node.input):
            folded = _fold(node, graph, opset)
            if folded is not None:
                graph.initializer.extend(folded)
                inits.update(t.name for t in folded)
                continue
        keep_nodes.append(node)
    del graph.node[:]
    graph.node.extend(keep_nodes)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept_inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    seen: set[str] = set()
    for idx, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{idx}"
        seen.add(node.name)
    real_inputs = [i for i in graph.input if i.name not in inits]
    del graph.input[:]
    graph.input.extend(real_inputs)
    return model


def _resolve_weight_aliases(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where nodes that read Identity(initializer) (torch.onnx's shared weights) read
    the initializer itself, so a shared weight stays one tensor with its own name (constant
    folding would copy it once per alias under the alias's name)."""
    model = copy.deepcopy(model)
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input and n.input[0] in inits and n.output[0] not in outputs}
    if not alias:
        return model
    for node in graph.node:
        for i, name in enumerate(node.input):
            while name in alias:
                name = alias[name]
            node.input[i] = name
    keep = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    del graph.node[:]
    graph.node.extend(keep)
    return model


# onnxslim passes that change what the user's graph computes or names (fusions such as
# Conv+BatchNorm, merging equal initializers or identical nodes) are left to the runtime.
_SLIM_SKIP = ["graph_fusion", "weight_tying", "subexpression_elimination"]


def fold_constants(model: onnx.ModelProto, keep_parameters: bool = False) -> onnx.ModelProto:
    """A copy of `model` with shape computations (Shape -> Gather -> Div chains that give
    Split sizes, Reshape targets, Resize scales) and other constant subgraphs folded, by
    onnxslim's constant folding and dead-node elimination. A symbolic batch dimension
    survives (Reshape targets get -1 for it). Where onnxslim is not installed or fails on a
    model, the copy is returned unfolded (the small-constant folder below still runs)."""
    try:
        import onnxslim
    except ImportError:  # pragma: no cover - a declared dependency
        return copy.deepcopy(model)
    import contextlib
    import io
    import logging

    original = copy.deepcopy(model)
    logging.getLogger("onnxslim").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            skip = _SLIM_SKIP + (["dead_node_elimination"] if keep_parameters else [])
            slim = onnxslim.slim(copy.deepcopy(model), skip_optimizations=skip)
    except Exception:
        return original
    if not isinstance(slim, onnx.ModelProto) or len(slim.graph.output) != len(original.graph.output) \
            or [o.name for o in slim.graph.output] != [o.name for o in original.graph.output]:
        return original
    # onnxslim writes inferred shapes into value_info; analysis infers its own.
    del slim.graph.value_info[:]
    for value, before in zip(list(slim.graph.input), [i for i in original.graph.input]):
        if value.name == before.name:
            value.CopyFrom(before)
    for value, before in zip(slim.graph.output, original.graph.output):
        value.CopyFrom(before)
    return slim


# Small shape/index computations that exporters emit around Pad, Reshape and Slice.
FOLDABLE = {
    "Constant", "ConstantOfShape", "Concat", "Reshape", "Transpose", "Cast", "Slice", "Squeeze",
    "Unsqueeze", "Gather", "Range", "Add", "Sub", "Mul", "Div", "Neg", "Shape", "Identity",
    "Expand", "Tile", "Flatten", "Equal", "Where", "Not", "ReduceProd", "Abs",
}
_FOLD_MAX_ELEMENTS = 1 << 16


def _fold(node: onnx.NodeProto, graph: onnx.GraphProto, opset: int) -> list[TensorProto] | None:
    """Evaluate a node whose inputs are all initializers (small ones only); None if not worth
    it or if evaluation fails. Identity of a weight is kept: it marks shared weights."""
    from onnx.reference import ReferenceEvaluator

    inits = {i.name: i for i in graph.initializer}
    arrays = {}
    for name in node.input:
        if name:
            t = inits[name]
            if int(np.prod(t.dims)) > _FOLD_MAX_ELEMENTS:
                return None
            arrays[name] = numpy_helper.to_array(t)
    if node.op_type == "Identity":
        return None
    try:
        g = helper.make_graph(
            [node], "fold",
            [helper.make_tensor_value_info(n, inits[n].data_type, list(inits[n].dims)) for n in arrays],
            [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in node.output])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        outs = ReferenceEvaluator(m).run(None, arrays)
    except Exception:
        return None
    result = []
    for name, value in zip(node.output, outs):
        value = np.asarray(value)
        if value.size > _FOLD_MAX_ELEMENTS:
            return None
        result.append(numpy_helper.from_array(value, name=name))
    return result


def dynamic_lengths(model: onnx.ModelProto) -> list[str]:
    """Names of the symbolic input dims other than the batch (dim 0): sequence axes."""
    out = []
    for inp in model.graph.input:
        for i, dim in enumerate(inp.type.tensor_type.shape.dim):
            if i > 0 and not dim.HasField("dim_value"):
                out.append(dim.dim_param or f"{inp.name}[{i}]")
    return out


def fix_input_dims(model: onnx.ModelProto, batch: int = 1, length: int | None = None) -> onnx.ModelProto:
    """Copy of `model` whose symbolic input dims are concrete: dim 0 `batch`, the others
    `length` (a dynamic sequence axis; `batch` when None)."""
    model = copy.deepcopy(model)
    for inp in model.graph.input:
        for i, dim in enumerate(inp.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value"):
                dim.dim_value = batch if i == 0 or length is None else length
    return model


def with_static_shapes(model: onnx.ModelProto, batch: int = 1, length: int | None = None) -> onnx.ModelProto:
    """Copy of `model` with symbolic input dims set (fix_input_dims) and shapes inferred."""
    model = fix_input_dims(model, batch, length)
    del model.graph.value_info[:]
    try:
        return shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:
        raise InputError(f"shape inference failed: {str(exc).splitlines()[0]}") from None


def tensor_shapes(model: onnx.ModelProto) -> dict[str, list[int] | None]:
    """Static shape of every tensor in a shape-inferred model (None when unknown)."""
    shapes: dict[str, list[int] | None] = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            shapes[vi.name] = None
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        shapes[vi.name] = None if any(d <= 0 for d in dims) else dims
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def initializer_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers as numpy arrays, keyed by name."""
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def save_model_atomic(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write `model` so that a reader never sees a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".onnx")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(model.SerializeToString())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_tensor(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name=name)


__all__ = [
    "load_model",
    "model_from_bytes",
    "normalise",
    "fold_constants",
    "with_static_shapes",
    "tensor_shapes",
    "initializer_arrays",
    "save_model_atomic",
    "make_tensor",
    "helper",
]
