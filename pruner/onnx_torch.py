"""Evaluate an ONNX graph with torch ops, so that gradients are available.

**Requires torch** (an optional dependency: install the `bench` extra). Import this module
lazily, only where gradients are needed (solver.gradients); the rest of latprune never
imports torch.

`OnnxTorch(model)` is a `torch.nn.Module` that walks the graph in topological order. Float
initializers become `nn.Parameter`s (`.params` maps ONNX name -> Parameter; an Identity of an
initializer, the way torch.onnx exports shared weights, maps to the *same* Parameter);
other initializers and Constant nodes become buffers. Index-like inputs (pads, axes, shapes,
Slice bounds, Resize scales) are read as Python ints/floats at run time, so Shape -> Gather ->
Concat -> Reshape chains that the normaliser did not fold still work.

`forward(x, capture=(), taps=())` returns (graph outputs, captured tensors):
- `capture`: ONNX tensor names; their values are returned by name (live autograd tensors:
  take `torch.autograd.grad` with respect to them, or call `retain_grad()` before backward).
- `taps`: (node name, input index) pairs. That node's input is replaced by a fresh view of
  it, returned under the key (node name, input index). A gradient with respect to a tap is
  the gradient through *that node only* (not through the tensor's other consumers, e.g. the
  skip path of a residual Add), which is what the per-layer perturbations of
  solver.gradients need.

Coverage: the operators pruner.analysis understands plus common shape glue (see `_OPS`).
An operator outside that list raises `InputError` at construction, naming it. Known gaps:
MaxPool's Indices output, Resize with `tf_crop_and_resize` or antialiasing, cubic Resize
other than torch's (a = -0.75, half_pixel/align_corners, 2-D), AveragePool dilations,
non-default domains. Evaluation is in the initializers' dtype (float32 for exported models).
"""
from __future__ import annotations

import math
import re
from typing import Iterable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from latprune.types import InputError


def _to_torch(array: np.ndarray) -> torch.Tensor:
    array = np.asarray(array)
    if array.dtype == np.bool_:
        return torch.from_numpy(array.copy())
    if array.dtype.kind == "U" or array.dtype.kind == "O":
        raise InputError("string tensors are not supported by OnnxTorch")
    return torch.from_numpy(np.array(array, order="C", copy=True))  # keeps 0-d shapes


def _torch_dtype(onnx_type: int) -> torch.dtype:
    np_dtype = helper.tensor_dtype_to_np_dtype(onnx_type)
    return torch.from_numpy(np.zeros(0, dtype=np_dtype)).dtype


def _ints(t) -> list[int]:
    if isinstance(t, torch.Tensor):
        return [int(v) for v in t.detach().reshape(-1).tolist()]
    return [int(v) for v in np.asarray(t).reshape(-1)]


def _floats(t) -> list[float]:
    if isinstance(t, torch.Tensor):
        return [float(v) for v in t.detach().reshape(-1).tolist()]
    return [float(v) for v in np.asarray(t).reshape(-1)]


def _attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        out[a.name] = v
    return out


def _torch_pads(begins: list[int], ends: list[int]) -> list[int]:
    """ONNX (begins, ends) over the trailing dims -> F.pad's last-dim-first pairs."""
    out: list[int] = []
    for b, e in zip(reversed(begins), reversed(ends)):
        out += [int(b), int(e)]
    return out


def _auto_pads(auto_pad: str, in_sizes, kernel, strides, dilations) -> list[int]:
    """Explicit pads (begins then ends) for auto_pad SAME_UPPER / SAME_LOWER / VALID."""
    nd = len(kernel)
    if auto_pad == "VALID":
        return [0] * (2 * nd)
    begins, ends = [], []
    for i in range(nd):
        eff = (kernel[i] - 1) * dilations[i] + 1
        out = math.ceil(in_sizes[i] / strides[i])
        total = max((out - 1) * strides[i] + eff - in_sizes[i], 0)
        small, big = total // 2, total - total // 2
        if auto_pad == "SAME_UPPER":
            begins.append(small)
            ends.append(big)
        else:
            begins.append(big)
            ends.append(small)
    return begins + ends


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


class OnnxTorch(torch.nn.Module):
    """A torch Module evaluating `model` (see the module docstring). Requires torch."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
        self.params: dict[str, torch.nn.Parameter] = {}
        self._buffer_names: dict[str, str] = {}
        used: set[str] = set()

        def attr_name(prefix: str, onnx_name: str) -> str:
            base = prefix + re.sub(r"\W", "_", onnx_name)
            name, k = base, 1
            while name in used or hasattr(self, name):
                k += 1
                name = f"{base}_{k}"
            used.add(name)
            return name

        init_names = set()
        for init in graph.initializer:
            init_names.add(init.name)
            arr = numpy_helper.to_array(init)
            tensor = _to_torch(arr)
            if tensor.is_floating_point():
                p = torch.nn.Parameter(tensor)
                self.register_parameter(attr_name("p_", init.name), p)
                self.params[init.name] = p
            else:
                key = attr_name("b_", init.name)
                self.register_buffer(key, tensor, persistent=False)
                self._buffer_names[init.name] = key
        self.inputs = [i.name for i in graph.input if i.name not in init_names]
        self.outputs = [o.name for o in graph.output]
        self.nodes: list[tuple[onnx.NodeProto, dict, str]] = []
        unsupported = []
        for idx, node in enumerate(graph.node):
            op = node.op_type
            name = node.name or f"{op}_{idx}"
            if node.domain not in ("", "ai.onnx") or op not in _OPS:
                unsupported.append(f"{op}" + (f" (domain {node.domain})" if node.domain else ""))
                continue
            attrs = _attrs(node)
            if op == "Constant":  # evaluated once, kept as a buffer
                key = attr_name("c_", node.output[0])
                self.register_buffer(key, _constant_value(attrs), persistent=False)
                self._buffer_names[node.output[0]] = key
                continue
            if op == "Identity" and node.input[0] in self.params:
                self.params[node.output[0]] = self.params[node.input[0]]  # shared weight
                continue
            if op == "Identity" and node.input[0] in self._buffer_names:
                self._buffer_names[node.output[0]] = self._buffer_names[node.input[0]]
                continue
            self.nodes.append((node, attrs, name))
        if unsupported:
            ops = sorted(set(unsupported))
            raise InputError(f"OnnxTorch does not support the operator(s) {', '.join(ops)}")
        # Last use of each tensor, so intermediate values are freed as soon as possible.
        self._last_use: dict[str, int] = {}
        for i, (node, _, _) in enumerate(self.nodes):
            for t in node.input:
                if t:
                    self._last_use[t] = i

    # ------------------------------------------------------------------------------------
    def constant(self, name: str) -> torch.Tensor | None:
        if name in self.params:
            return self.params[name]
        key = self._buffer_names.get(name)
        return getattr(self, key) if key is not None else None

    def forward(self, x, capture: Iterable[str] = (), taps: Iterable[tuple[str, int]] = ()):
        """(list of graph outputs, {captured name or tap key: tensor}); see the module doc.
        `x`: one tensor/array for a one-input model, a sequence in graph-input order, or a
        dict by input name."""
        if isinstance(x, dict):
            feeds = dict(x)
        elif isinstance(x, (list, tuple)):
            feeds = dict(zip(self.inputs, x))
        else:
            feeds = {self.inputs[0]: x}
        env: dict[str, torch.Tensor] = {}
        ref = next(iter(self.params.values()), None)
        for name, value in feeds.items():
            if not isinstance(value, torch.Tensor):
                value = torch.as_tensor(np.asarray(value))
            if ref is not None and value.is_floating_point():
                value = value.to(dtype=ref.dtype, device=ref.device)
            env[name] = value
        capture = list(capture)
        keep = set(capture) | set(self.outputs)
        tap_set: dict[str, list[int]] = {}
        for node_name, idx in taps:
            tap_set.setdefault(node_name, []).append(int(idx))
        captured: dict = {}

        def get(name: str):
            if not name:
                return None
            if name in env:
                return env[name]
            c = self.constant(name)
            if c is None:
                raise InputError(f"OnnxTorch: tensor '{name}' is used before it is computed")
            return c

        for i, (node, attrs, name) in enumerate(self.nodes):
            ins = [get(t) for t in node.input]
            for idx in tap_set.get(name, ()):
                t = ins[idx]
                v = t.view_as(t) if t.requires_grad else t.detach().requires_grad_()
                ins[idx] = v
                captured[(name, idx)] = v
            try:
                outs = _OPS[node.op_type](self, node, ins, attrs)
            except InputError:
                raise
            except Exception as exc:
                raise InputError(f"OnnxTorch: {node.op_type} node '{name}' failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
            if isinstance(outs, torch.Tensor):
                outs = [outs]
            for o, v in zip(node.output, outs):
                if o:
                    env[o] = v
            for t in node.input:
                if t and self._last_use.get(t) == i and t not in keep and t in env:
                    del env[t]
        for name in capture:
            captured[name] = get(name)
        return [get(o) for o in self.outputs], captured


# ---- operators ------------------------------------------------------------------------------

def _constant_value(attrs: dict) -> torch.Tensor:
    if "value" in attrs:
        return _to_torch(numpy_helper.to_array(attrs["value"]))
    if "value_float" in attrs:
        return torch.tensor(attrs["value_float"], dtype=torch.float32)
    if "value_floats" in attrs:
        return torch.tensor(list(attrs["value_floats"]), dtype=torch.float32)
    if "value_int" in attrs:
        return torch.tensor(attrs["value_int"], dtype=torch.int64)
    if "value_ints" in attrs:
        return torch.tensor(list(attrs["value_ints"]), dtype=torch.int64)
    raise InputError(f"Constant with attributes {sorted(attrs)} is not supported")


def _spatial_conv_args(x, w_shape, a, transpose=False):
    nd = len(w_shape) - 2
    kernel = list(a.get("kernel_shape", w_shape[2:]))
    strides = list(a.get("strides", [1] * nd))
    dil = list(a.get("dilations", [1] * nd))
    auto = a.get("auto_pad", "NOTSET")
    if auto not in ("NOTSET", "") and not transpose:
        pads = _auto_pads(auto, list(x.shape[2:]), kernel, strides, dil)
    else:
        pads = list(a.get("pads", [0] * (2 * nd)))
    return nd, kernel, strides, dil, pads, auto


def _conv(m, node, ins, a):
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    nd, _, strides, dil, pads, _ = _spatial_conv_args(x, w.shape, a)
    begins, ends = pads[:nd], pads[nd:]
    if begins != ends:
        x = F.pad(x, _torch_pads(begins, ends))
        begins = [0] * nd
    return _CONV[nd](x, w, b, strides, begins, dil, int(a.get("group", 1)))



def _split_pads(totals: list[int], auto: str) -> tuple[list[int], list[int]]:
    """Split each axis's total padding into (begins, ends): SAME_UPPER puts the odd one at the end."""
    if auto == "SAME_UPPER":
        return [t // 2 for t in totals], [t - t // 2 for t in totals]
    return [t - t // 2 for t in totals], [t // 2 for t in totals]

def _conv_transpose(m, node, ins, a):
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    nd, kernel, strides, dil, pads, auto = _spatial_conv_args(x, w.shape, a, transpose=True)
    group = int(a.get("group", 1))
    out_pad = list(a.get("output_padding", [0] * nd))
    in_sizes = list(x.shape[2:])
    full = [strides[i] * (in_sizes[i] - 1) + (kernel[i] - 1) * dil[i] + 1 for i in range(nd)]
    if "output_shape" in a:
        target = list(a["output_shape"])[-nd:]
        begins, ends = _split_pads([full[i] + out_pad[i] - target[i] for i in range(nd)], auto)
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = _split_pads([max(full[i] + out_pad[i] - in_sizes[i] * strides[i], 0)
                                    for i in range(nd)], auto)
    elif auto == "VALID":
        begins, ends = [0] * nd, [0] * nd
    else:
        begins, ends = pads[:nd], pads[nd:]
    y = _CONV_T[nd](x, w, None, strides, 0, 0, group, dil)
    # Crop the pads (negative F.pad) and append output_padding (zeros before the bias).
    y = F.pad(y, _torch_pads([-p for p in begins], [out_pad[i] - ends[i] for i in range(nd)]))
    if b is not None:
        y = y + b.reshape([1, -1] + [1] * nd)
    return y


def _batchnorm(m, node, ins, a):
    x, scale, bias, mean, var = ins[:5]
    # Inference mode with the running statistics, written out so that every input
    # (running statistics included) is differentiable.
    shape = [1, -1] + [1] * (x.dim() - 2)
    s = scale / torch.sqrt(var + float(a.get("epsilon", 1e-5)))
    y = x * s.reshape(shape) + (bias - mean * s).reshape(shape)
    return [y] + [None] * (len(node.output) - 1)


def _instancenorm(m, node, ins, a):
    return F.instance_norm(ins[0], weight=ins[1], bias=ins[2], eps=float(a.get("epsilon", 1e-5)))


def _layernorm(m, node, ins, a):
    """LayerNormalization over axes axis..rank-1 (scale and bias broadcast over them)."""
    x = ins[0]
    axis = int(a.get("axis", -1))
    axis = axis + x.dim() if axis < 0 else axis
    shape = list(x.shape[axis:])
    weight = ins[1].expand(shape) if len(ins) > 1 and ins[1] is not None else None
    bias = ins[2].expand(shape) if len(ins) > 2 and ins[2] is not None else None
    return F.layer_norm(x, shape, weight, bias, eps=float(a.get("epsilon", 1e-5)))


def _lrn(m, node, ins, a):
    x = ins[0]
    size = int(a["size"])
    alpha, beta, bias = float(a.get("alpha", 1e-4)), float(a.get("beta", 0.75)), float(a.get("bias", 1.0))
    n, c = x.shape[:2]
    sq = (x * x).reshape(n, c, -1).transpose(1, 2)  # (N, M, C)
    front, back = (size - 1) // 2, size - 1 - (size - 1) // 2
    sq = F.pad(sq, (front, back)).unfold(-1, size, 1).sum(-1)  # (N, M, C)
    sq = sq.transpose(1, 2).reshape(x.shape)
    return x / (bias + alpha / size * sq) ** beta


def _clip(m, node, ins, a):
    x = ins[0]
    if m.opset < 11:
        lo, hi = a.get("min"), a.get("max")
        return x if lo is None and hi is None else torch.clamp(x, lo, hi)
    lo = ins[1] if len(ins) > 1 else None
    hi = ins[2] if len(ins) > 2 else None
    if lo is None and hi is None:
        return x
    return torch.clamp(x, lo, hi)


def _div(m, node, ins, a):
    x, y = ins
    if not x.is_floating_point() and not y.is_floating_point():
        return torch.div(x, y, rounding_mode="trunc")
    return x / y


def _variadic(fn):
    def op(m, node, ins, a):
        out = ins[0]
        for t in ins[1:]:
            out = fn(out, t)
        return out
    return op


def _mean(m, node, ins, a):
    out = ins[0]
    for t in ins[1:]:
        out = out + t
    return out / len(ins)


def _pad(m, node, ins, a):
    x = ins[0]
    mode = a.get("mode", "constant")
    r = x.dim()
    if m.opset < 11:
        pads = list(a["pads"])
        value = float(a.get("value", 0.0))
    else:
        pads = _ints(ins[1])
        value = ins[2] if len(ins) > 2 and ins[2] is not None else 0.0
        if isinstance(value, torch.Tensor):
            value = float(value.detach().reshape(-1)[0]) if value.numel() else 0.0
        if len(ins) > 3 and ins[3] is not None:
            axes = [v + r if v < 0 else v for v in _ints(ins[3])]
            full = [0] * (2 * r)
            for i, ax in enumerate(axes):
                full[ax], full[ax + r] = pads[i], pads[i + len(axes)]
            pads = full
    begins, ends = pads[:r], pads[r:]
    if mode == "constant":
        return F.pad(x, _torch_pads(begins, ends), value=value)
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if torch_mode is None:
        raise InputError(f"Pad mode {mode} is not supported")
    if any(begins[:2]) or any(ends[:2]):
        raise InputError(f"Pad mode {mode} on the batch or channel axis is not supported")
    return F.pad(x, _torch_pads(begins[2:], ends[2:]), mode=torch_mode)


def _slice(m, node, ins, a):
    x = ins[0]
    if m.opset < 10:
        starts, ends = list(a["starts"]), list(a["ends"])
        axes = list(a.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(ins[1]), _ints(ins[2])
        axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
        steps = _ints(ins[4]) if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    r = x.dim()
    index: list = [slice(None)] * r
    flips = []
    for s, e, ax, st in zip(starts, ends, axes, steps):
        ax = ax + r if ax < 0 else ax
        n = x.shape[ax]
        start, stop, step = slice(s, e, st).indices(n)  # numpy (= ONNX) clamping rules
        if st > 0:
            index[ax] = slice(start, stop, step)
        else:
            flips.append((ax, list(range(start, stop, step))))
    y = x[tuple(index)]
    for ax, idx in flips:
        y = torch.index_select(y, ax, torch.tensor(idx, dtype=torch.long, device=y.device))
    return y


def _concat(m, node, ins, a):
    return torch.cat([t for t in ins if t is not None], dim=int(a["axis"]))


def _split(m, node, ins, a):
    x = ins[0]
    axis = int(a.get("axis", 0))
    dim = x.shape[axis]
    if len(ins) > 1 and ins[1] is not None:
        sizes = _ints(ins[1])
    elif "split" in a:
        sizes = list(a["split"])
    else:
        num = int(a.get("num_outputs", len(node.output)))
        chunk = -(-dim // num)
        sizes = [chunk] * (num - 1) + [dim - chunk * (num - 1)]
    return list(torch.split(x, sizes, dim=axis))


def _pool_args(x, a):
    nd = x.dim() - 2
    kernel = list(a["kernel_shape"])
    strides = list(a.get("strides", [1] * nd))
    dil = list(a.get("dilations", [1] * nd))
    auto = a.get("auto_pad", "NOTSET")
    if auto not in ("NOTSET", ""):
        pads = _auto_pads(auto, list(x.shape[2:]), kernel, strides, dil)
    else:
        pads = list(a.get("pads", [0] * (2 * nd)))
    return nd, kernel, strides, dil, pads, bool(a.get("ceil_mode", 0))


def _maxpool(m, node, ins, a):
    if len(node.output) > 1 and node.output[1]:
        raise InputError("MaxPool with an Indices output is not supported")
    x = ins[0]
    nd, kernel, strides, dil, pads, ceil = _pool_args(x, a)
    begins, ends = pads[:nd], pads[nd:]
    if begins == ends and all(p <= k // 2 for p, k in zip(begins, kernel)):
        return _MAXPOOL[nd](x, kernel, strides, begins, dil, ceil_mode=ceil)
    x = F.pad(x, _torch_pads(begins, ends), value=float("-inf"))
    return _MAXPOOL[nd](x, kernel, strides, 0, dil, ceil_mode=ceil)


def _sum_pool(x, kernel, strides, ceil):
    nd = x.dim() - 2
    if nd == 1:
        y = F.avg_pool2d(x.unsqueeze(-1), kernel + [1], strides + [1], 0, ceil, True, 1)
        return y.squeeze(-1)
    fn = F.avg_pool2d if nd == 2 else F.avg_pool3d
    return fn(x, kernel, strides, 0, ceil, True, 1)


def _avgpool(m, node, ins, a):
    x = ins[0]
    nd, kernel, strides, dil, pads, ceil = _pool_args(x, a)
    if any(d != 1 for d in dil):
        raise InputError("AveragePool with dilations is not supported")
    begins, ends = pads[:nd], pads[nd:]
    tp = _torch_pads(begins, ends)
    total = _sum_pool(F.pad(x, tp), kernel, strides, ceil)
    ones = torch.ones([1, 1] + list(x.shape[2:]), dtype=x.dtype, device=x.device)
    mask = F.pad(ones, tp, value=1.0 if int(a.get("count_include_pad", 0)) else 0.0)
    count = _sum_pool(mask, kernel, strides, ceil)
    return total / count.clamp_min(1.0)


def _lppool(m, node, ins, a):
    x = ins[0]
    nd, kernel, strides, dil, pads, ceil = _pool_args(x, a)
    if any(d != 1 for d in dil):
        raise InputError("LpPool with dilations is not supported")
    p = float(a.get("p", 2))
    total = _sum_pool(F.pad(x.abs() ** p, _torch_pads(pads[:nd], pads[nd:])), kernel, strides, ceil)
    return total ** (1.0 / p)


def _global_lp(m, node, ins, a):
    x = ins[0]
    p = float(a.get("p", 2))
    return (x.abs() ** p).sum(dim=tuple(range(2, x.dim())), keepdim=True) ** (1.0 / p)


def _global_avg(m, node, ins, a):
    x = ins[0]
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


def _global_max(m, node, ins, a):
    x = ins[0]
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


def _flatten(m, node, ins, a):
    x = ins[0]
    axis = int(a.get("axis", 1))
    if axis < 0:
        axis += x.dim()
    lead = int(np.prod(x.shape[:axis])) if axis > 0 else 1
    return x.reshape(lead, -1)


def _reshape(m, node, ins, a):
    x = ins[0]
    shape = _ints(ins[1])
    if not int(a.get("allowzero", 0)):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _gemm(m, node, ins, a):
    A, B = ins[0], ins[1]
    if int(a.get("transA", 0)):
        A = A.transpose(0, 1)
    if int(a.get("transB", 0)):
        B = B.transpose(0, 1)
    y = A @ B
    alpha = float(a.get("alpha", 1.0))
    if alpha != 1.0:
        y = alpha * y
    if len(ins) > 2 and ins[2] is not None:
        beta = float(a.get("beta", 1.0))
        y = y + (ins[2] if beta == 1.0 else beta * ins[2])
    return y


def _coord(mode, x_out, scale, in_size, out_size):
    """ONNX Resize: the input coordinate of each output index (float64 numpy)."""
    if mode == "half_pixel":
        return (x_out + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (x_out + 0.5) / scale - 0.5 if out_size > 1 else np.zeros_like(x_out)
    if mode == "align_corners":
        return x_out * (in_size - 1) / (out_size - 1) if out_size > 1 else np.zeros_like(x_out)
    if mode == "asymmetric":
        return x_out / scale
    if mode == "tf_half_pixel_for_nn":
        return (x_out + 0.5) / scale
    if mode == "half_pixel_symmetric":
        adjustment = out_size / (scale * in_size)
        center = in_size / 2
        offset = center * (1 - adjustment)
        return offset + (x_out + 0.5) / scale - 0.5
    raise InputError(f"Resize coordinate_transformation_mode {mode} is not supported")


def _resize(m, node, ins, a):
    x = ins[0]
    r = x.dim()
    op = node.op_type
    scales = sizes = None
    if op == "Upsample":
        scales = list(a["scales"]) if "scales" in a else _floats(ins[1])
        default_coord, legacy = "asymmetric", True
    elif m.opset < 11:
        scales = _floats(ins[1])
        default_coord, legacy = "asymmetric", True
    else:
        if len(ins) > 2 and ins[2] is not None and ins[2].numel():
            scales = _floats(ins[2])
        if len(ins) > 3 and ins[3] is not None and ins[3].numel():
            sizes = _ints(ins[3])
        default_coord, legacy = "half_pixel", False
    mode = a.get("mode", "nearest")
    coord = a.get("coordinate_transformation_mode", default_coord)
    nearest_mode = "floor" if legacy else a.get("nearest_mode", "round_prefer_floor")
    if int(a.get("antialias", 0)):
        raise InputError("Resize with antialias is not supported")
    if a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise InputError("Resize keep_aspect_ratio_policy other than stretch is not supported")
    axes = [v + r if v < 0 else v for v in a.get("axes", range(r))]
    in_sizes = list(x.shape)
    out_sizes = list(in_sizes)
    dim_scales = [1.0] * r
    for i, ax in enumerate(axes):
        if sizes is not None:
            out_sizes[ax] = sizes[i]
            dim_scales[ax] = sizes[i] / in_sizes[ax]
        else:
            dim_scales[ax] = scales[i]
            out_sizes[ax] = int(math.floor(in_sizes[ax] * scales[i]))
    todo = [d for d in range(r) if out_sizes[d] != in_sizes[d] or dim_scales[d] != 1.0]
    if mode == "cubic":
        spatial = todo and min(todo) >= 2 and r == 4
        if not spatial or coord not in ("half_pixel", "align_corners", "pytorch_half_pixel") or \
                float(a.get("cubic_coeff_a", -0.75)) != -0.75 or int(a.get("exclude_outside", 0)):
            raise InputError("Resize cubic is only supported as torch's bicubic (2-D, a=-0.75)")
        if sizes is not None:
            return F.interpolate(x, size=out_sizes[2:], mode="bicubic",
                                 align_corners=coord == "align_corners")
        return F.interpolate(x, scale_factor=dim_scales[2:], mode="bicubic",
                             align_corners=coord == "align_corners")
    if mode not in ("nearest", "linear", "bilinear", "trilinear"):
        raise InputError(f"Resize mode {mode} is not supported")
    for d in todo:
        n_in, n_out = in_sizes[d], out_sizes[d]
        src = _coord(coord, np.arange(n_out, dtype=np.float64), dim_scales[d], n_in, n_out)
        if mode == "nearest":
            if nearest_mode == "round_prefer_floor":
                idx = np.ceil(src - 0.5)
            elif nearest_mode == "round_prefer_ceil":
                idx = np.floor(src + 0.5)
            elif nearest_mode == "floor":
                idx = np.floor(src)
            elif nearest_mode == "ceil":
                idx = np.ceil(src)
            else:
                raise InputError(f"Resize nearest_mode {nearest_mode} is not supported")
            idx = np.clip(idx, 0, n_in - 1).astype(np.int64)
            x = torch.index_select(x, d, torch.from_numpy(idx).to(x.device))
        else:
            src = np.clip(src, 0, n_in - 1)
            lo = np.floor(src).astype(np.int64)
            hi = np.minimum(lo + 1, n_in - 1)
            frac = torch.from_numpy(src - lo).to(dtype=x.dtype, device=x.device)
            shape = [1] * r
            shape[d] = n_out
            frac = frac.reshape(shape)
            x_lo = torch.index_select(x, d, torch.from_numpy(lo).to(x.device))
            x_hi = torch.index_select(x, d, torch.from_numpy(hi).to(x.device))
            x = x_lo + (x_hi - x_lo) * frac
    return x


def _reduce(fn):
    def op(m, node, ins, a):
        x = ins[0]
        keep = bool(int(a.get("keepdims", 1)))
        if "axes" in a:
            axes = list(a["axes"])
        elif len(ins) > 1 and ins[1] is not None:
            axes = _ints(ins[1])
        else:
            axes = []
        if not axes:
            if int(a.get("noop_with_empty_axes", 0)):
                return x
            axes = list(range(x.dim()))
        axes = sorted(v + x.dim() if v < 0 else v for v in axes)
        return fn(x, axes, keep)
    return op


def _reduce_max(x, axes, keep):
    return x.amax(dim=tuple(axes), keepdim=keep)


def _reduce_min(x, axes, keep):
    return x.amin(dim=tuple(axes), keepdim=keep)


def _reduce_prod(x, axes, keep):
    for ax in sorted(axes, reverse=True):
        x = x.prod(dim=ax, keepdim=keep)
    return x


def _transpose(m, node, ins, a):
    x = ins[0]
    perm = list(a.get("perm", reversed(range(x.dim()))))
    return x.permute(perm)


def _squeeze(m, node, ins, a):
    x = ins[0]
    if "axes" in a:
        axes = list(a["axes"])
    elif len(ins) > 1 and ins[1] is not None:
        axes = _ints(ins[1])
    else:
        return x.reshape([s for s in x.shape if s != 1])
    axes = {v + x.dim() if v < 0 else v for v in axes}
    return x.reshape([s for i, s in enumerate(x.shape) if i not in axes])


def _unsqueeze(m, node, ins, a):
    x = ins[0]
    axes = list(a["axes"]) if "axes" in a else _ints(ins[1])
    r = x.dim() + len(axes)
    for ax in sorted(v + r if v < 0 else v for v in axes):
        x = x.unsqueeze(ax)
    return x


def _softmax(fn):
    def op(m, node, ins, a):
        x = ins[0]
        if m.opset >= 13:
            return fn(x, dim=int(a.get("axis", -1)))
        axis = int(a.get("axis", 1))
        if axis < 0:
            axis += x.dim()
        shape = x.shape
        lead = int(np.prod(shape[:axis])) if axis > 0 else 1
        return fn(x.reshape(lead, -1), dim=1).reshape(shape)
    return op


def _dropout(m, node, ins, a):
    x = ins[0]
    outs = [x]
    if len(node.output) > 1:
        outs.append(torch.ones_like(x, dtype=torch.bool))
    return outs


def _shape(m, node, ins, a):
    shape = list(ins[0].shape)
    start = int(a.get("start", 0))
    end = a.get("end")
    shape = shape[start:] if end is None else shape[start:int(end)]
    return torch.tensor(shape, dtype=torch.int64)


def _gather(m, node, ins, a):
    data, idx = ins[0], ins[1]
    axis = int(a.get("axis", 0))
    if axis < 0:
        axis += data.dim()
    idx = idx.to(torch.long)
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = torch.index_select(data, axis, idx.reshape(-1))
    return out.reshape(list(data.shape[:axis]) + list(idx.shape) + list(data.shape[axis + 1:]))


def _cast(m, node, ins, a):
    return ins[0].to(_torch_dtype(int(a["to"])))


def _constant_of_shape(m, node, ins, a):
    shape = _ints(ins[0])
    value = _to_torch(numpy_helper.to_array(a["value"])) if "value" in a else torch.zeros(1)
    return torch.full(shape, value.reshape(-1)[0].item(), dtype=value.dtype)


def _expand(m, node, ins, a):
    x = ins[0]
    shape = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(ins[1])))
    return x.expand(shape)


def _tile(m, node, ins, a):
    return ins[0].repeat(_ints(ins[1]))


def _range(m, node, ins, a):
    start, limit, delta = (t.reshape(-1)[0].item() for t in ins[:3])
    return torch.arange(start, limit, delta, dtype=ins[0].dtype)


def _prelu(m, node, ins, a):
    x, slope = ins
    return torch.where(x >= 0, x, slope * x)


def _selu(m, node, ins, a):
    alpha = float(a.get("alpha", 1.67326319217681884765625))
    gamma = float(a.get("gamma", 1.05070102214813232421875))
    x = ins[0]
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


def _gelu(m, node, ins, a):
    return F.gelu(ins[0], approximate=a.get("approximate", "none"))


def _unary(fn):
    return lambda m, node, ins, a: fn(ins[0])


def _binary(fn):
    return lambda m, node, ins, a: fn(ins[0], ins[1])


_OPS = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "BatchNormalization": _batchnorm,
    "InstanceNormalization": _instancenorm,
    "LayerNormalization": _layernorm,
    "LRN": _lrn,
    "Relu": _unary(torch.relu),
    "LeakyRelu": lambda m, n, ins, a: F.leaky_relu(ins[0], float(a.get("alpha", 0.01))),
    "Clip": _clip,
    "Sigmoid": _unary(torch.sigmoid),
    "HardSigmoid": lambda m, n, ins, a: torch.clamp(
        float(a.get("alpha", 0.2)) * ins[0] + float(a.get("beta", 0.5)), 0.0, 1.0),
    "HardSwish": _unary(F.hardswish),
    "Tanh": _unary(torch.tanh),
    "Elu": lambda m, n, ins, a: F.elu(ins[0], float(a.get("alpha", 1.0))),
    "Celu": lambda m, n, ins, a: F.celu(ins[0], float(a.get("alpha", 1.0))),
    "Selu": _selu,
    "Softplus": _unary(F.softplus),
    "Softsign": _unary(F.softsign),
    "Mish": _unary(F.mish),
    "Gelu": _gelu,
    "ThresholdedRelu": lambda m, n, ins, a: torch.where(
        ins[0] > float(a.get("alpha", 1.0)), ins[0], torch.zeros_like(ins[0])),
    "PRelu": _prelu,
    "Erf": _unary(torch.erf),
    "Abs": _unary(torch.abs),
    "Neg": _unary(torch.neg),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Sqrt": _unary(torch.sqrt),
    "Reciprocal": _unary(torch.reciprocal),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Round": _unary(torch.round),
    "Sign": _unary(torch.sign),
    "Not": _unary(torch.logical_not),
    "Identity": _unary(lambda x: x),
    "Dropout": _dropout,
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _div,
    "Pow": _binary(torch.pow),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "Mean": _mean,
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "Greater": _binary(torch.gt),
    "Where": lambda m, n, ins, a: torch.where(ins[0], ins[1], ins[2]),
    "Pad": _pad,
    "Slice": _slice,
    "Concat": _concat,
    "Split": _split,
    "MaxPool": _maxpool,
    "AveragePool": _avgpool,
    "GlobalAveragePool": _global_avg,
    "GlobalMaxPool": _global_max,
    "LpPool": _lppool,
    "GlobalLpPool": _global_lp,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Gemm": _gemm,
    "MatMul": _binary(torch.matmul),
    "Resize": _resize,
    "Upsample": _resize,
    "ReduceMean": _reduce(lambda x, axes, keep: x.mean(dim=tuple(axes), keepdim=keep)),
    "ReduceSum": _reduce(lambda x, axes, keep: x.sum(dim=tuple(axes), keepdim=keep)),
    "ReduceMax": _reduce(_reduce_max),
    "ReduceMin": _reduce(_reduce_min),
    "ReduceProd": _reduce(_reduce_prod),
    "Transpose": _transpose,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Softmax": _softmax(F.softmax),
    "LogSoftmax": _softmax(F.log_softmax),
    "Constant": None,  # handled at construction
    "Shape": _shape,
    "Size": lambda m, n, ins, a: torch.tensor(ins[0].numel(), dtype=torch.int64),
    "Gather": _gather,
    "Cast": _cast,
    "ConstantOfShape": _constant_of_shape,
    "Expand": _expand,
    "Tile": _tile,
    "Range": _range,
}

__all__ = ["OnnxTorch"]
