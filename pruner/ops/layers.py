"""Layers: nodes with a constant weight whose output channels are new (Conv, ConvTranspose,
Gemm, MatMul with a weight). Their input and output widths are the latency table's axes.

Also here: how a layer's weights read as a matrix (out channels × input features) for
least-squares repair (pruner.repair), and the activation ONNX Runtime fuses into a conv
(part of the layer's latency-table key).
"""
from __future__ import annotations

import numpy as np

from latprune.pruner.ops.base import AtomMap, NotUnderstood, OpHandler, ParamAxis, attr
from latprune.types import LayerSpec

# Unary ops that ONNX Runtime fuses into the preceding Conv on the CPU.
FUSABLE_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid"}


def _require_channels_on(ctx, tensor: str, axis: int) -> AtomMap | None:
    m = ctx.map(tensor)
    if m is not None and not set(m.axes) <= {axis}:
        raise NotUnderstood(f"input channels are not on axis {axis}")
    return m


def _const_weight(node, ctx, index: int = 1) -> np.ndarray:
    w = ctx.const(node.input[index]) if len(node.input) > index else None
    if w is None:
        raise NotUnderstood("weights are not an initializer")
    return w


def _const_bias(node, ctx, index: int = 2) -> None:
    if len(node.input) > index and node.input[index] and ctx.const(node.input[index]) is None:
        raise NotUnderstood("bias is not an initializer")


def silu_after(tensor: str, ctx):
    """(Sigmoid, Mul) nodes computing x·sigmoid(x) of `tensor` (SiLU as exported), or None.
    ONNX Runtime runs the pair as one kernel (QuickGelu)."""
    users = ctx.consumers(tensor)
    if len(users) != 2:
        return None
    sig = [u for u in users if u.op_type == "Sigmoid"]
    mul = [u for u in users if u.op_type == "Mul"]
    if sig and mul and sorted(mul[0].input) == sorted([tensor, sig[0].output[0]]):
        return sig[0], mul[0]
    return None


def fused_activation(node, ctx) -> str:
    """The activation run with a conv: after an optional BatchNormalization, a
    single-consumer activation of FUSABLE_ACTIVATIONS (fused into the conv by ONNX Runtime),
    'Silu' for x·sigmoid(x) (one kernel after the conv), else ''."""
    tensor = node.output[0]
    chain = ctx.consumers(tensor)
    if len(chain) == 1 and chain[0].op_type == "BatchNormalization":
        tensor = chain[0].output[0]
        chain = ctx.consumers(tensor)
    if len(chain) == 1 and chain[0].op_type in FUSABLE_ACTIVATIONS:
        return chain[0].op_type
    if silu_after(tensor, ctx) is not None:
        return "Silu"
    return ""


def activation_region(tensor: str, ctx, max_nodes: int = 8):
    """(nodes, exit tensor) of an element-wise subgraph that reads only `tensor` and constants
    and writes one tensor read elsewhere: an activation written out in several nodes (GELU as
    Div, Erf, Add, Mul, Mul; SiLU as Sigmoid, Mul; a layer scale), which ONNX Runtime runs as
    one kernel after the layer. None when there is none."""
    from latprune.pruner.ops.elementwise import Broadcast, Unary

    elementwise = set(Unary.op_types) | set(Broadcast.op_types)
    inside, nodes, names = {tensor}, [], set()
    grown = True
    while grown and len(nodes) < max_nodes:
        grown = False
        for t in list(inside):
            for user in ctx.consumers(t):
                if user.name in names or user.op_type not in elementwise:
                    continue
                if all(not i or i in inside or ctx.const(i) is not None for i in user.input):
                    nodes.append(user)
                    names.add(user.name)
                    inside.update(o for o in user.output if o)
                    grown = True
    exits = [t for t in inside if not ctx.consumers(t) or any(u.name not in names for u in ctx.consumers(t))]
    if not nodes or len(exits) != 1 or exits[0] == tensor:
        return None
    return nodes, exits[0]


def kernel_chain(node, ctx, ops: set[str], steps: int = 4) -> list:
    """Nodes after a layer that ONNX Runtime may run in the layer's kernel or right after it
    as the layer's activation: single consumers whose op is in `ops` (BatchNorm, a fused
    activation, the residual Add of an NCHWc conv), and element-wise regions that end in one
    tensor (activation_region: SiLU, GELU), at most `steps` links."""
    chain, tensor = [], node.output[0]
    for _ in range(steps):
        users = ctx.consumers(tensor)
        if len(users) == 1 and users[0].op_type in ops:
            chain.append(users[0])
            tensor = users[0].output[0]
            continue
        region = activation_region(tensor, ctx)
        if region is None:
            break
        chain += region[0]
        tensor = region[1]
    return chain


def _has_bias(node) -> bool:
    return len(node.input) > 2 and bool(node.input[2])


class Conv(OpHandler):
    """Convolution. group 1: new output channels. Depthwise (group = C_in = C_out): output
    channel c is input channel c. Other grouped convs (ResNeXt, RegNet): each group's input
    and output channels become one unit, so whole groups are pruned and channels per group
    stay (`group_channels` in the layer spec)."""

    op_types = ("Conv",)
    is_layer = True

    @staticmethod
    def kind(node, ctx) -> tuple[str, int, int]:
        """('dense' | 'depthwise' | 'grouped', input channels per group, output per group)."""
        w = ctx.const(node.input[1])
        group = int(attr(node, "group", 1))
        c_out = w.shape[0]
        c_in = w.shape[1] * group
        if group == 1:
            return "dense", c_in, c_out
        if group == c_in == c_out and w.shape[1] == 1:
            return "depthwise", 1, 1
        return "grouped", c_in // group, c_out // group

    def propagate(self, node, ctx) -> None:
        m = _require_channels_on(ctx, node.input[0], 1)
        _const_weight(node, ctx)
        _const_bias(node, ctx)
        kind, cin_g, cout_g = self.kind(node, ctx)
        out = node.output[0]
        if kind == "depthwise":
            if ctx.shape(out) is None:
                raise NotUnderstood("output shape unknown")
            ctx.set_map(out, m)
        else:
            made = ctx.new_map(out, 1, node.name)
            if kind == "grouped" and m is None:
                ctx.fix(made.ids)  # fixed inputs: the group count cannot change
            elif kind == "grouped":
                a_in, a_out = m.flat(), made.flat()
                for g in range(len(a_out) // cout_g):
                    ctx.tie_all(np.concatenate([a_in[g * cin_g:(g + 1) * cin_g],
                                                a_out[g * cout_g:(g + 1) * cout_g]]))
        ctx.layer_nodes.append(node)

    def params(self, node, ctx) -> list[ParamAxis]:
        x, out = node.input[0], node.output[0]
        kind, _, _ = self.kind(node, ctx)
        found = [ParamAxis(1, 0, out, 1, "produce", "weight")]
        if kind == "dense":
            found.append(ParamAxis(1, 1, x, 1, "consume", "weight"))
        elif kind == "depthwise":
            found.append(ParamAxis(1, 0, x, 1, "consume", "weight"))
        if _has_bias(node):
            found.append(ParamAxis(2, 0, out, 1, "produce", "bias"))
        return found

    def rewrite(self, node, orig, ctx) -> None:
        kind, _, cout_g = self.kind(orig, ctx)
        if kind == "dense" or ctx.full(orig.output[0]):
            return
        for a in node.attribute:
            if a.name == "group":
                a.i = len(ctx.kept_along(orig.output[0], 1)) // cout_g

    def layer_axes(self, node, ctx) -> tuple[int, int]:
        return 1, 1

    def channel_preserving(self, node, ctx) -> bool:
        return self.kind(node, ctx)[0] == "depthwise"

    def layer_spec(self, node, ctx) -> LayerSpec:
        s_in = ctx.shape(node.input[0]) or [1, 1]
        w = ctx.const(node.input[1])
        k = list(w.shape[2:])
        nd = len(k)
        kind, cin_g, _ = self.kind(node, ctx)
        return LayerSpec(
            op="Conv", kernel=k,
            stride=list(attr(node, "strides", [1] * nd)),
            pads=list(attr(node, "pads", [0] * (2 * nd))),
            dilation=list(attr(node, "dilations", [1] * nd)),
            depthwise=kind == "depthwise", input_hw=list(s_in[2:]), batch=s_in[0],
            activation=fused_activation(node, ctx), has_bias=_has_bias(node),
            group_channels=cin_g if kind == "grouped" else 0,
        )

    # ---- repair: W as (out, C_in/group · k...) rows over im2col patches -----------------------
    def repairable(self, node, ctx) -> bool:
        w = ctx.const(node.input[1])
        return w is not None and self.kind(node, ctx)[0] == "dense" and w.ndim == 4

    def weight_matrix(self, node, w: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        w_mat = w.reshape(w.shape[0], -1).astype(np.float64)
        return w_mat, (b.astype(np.float64) if b is not None else np.zeros(w.shape[0]))

    def from_matrix(self, node, w_mat: np.ndarray, b: np.ndarray, w_shape: tuple) -> tuple[np.ndarray, np.ndarray]:
        return w_mat.reshape(w_shape), b

    def design_rows(self, node, x: np.ndarray, w_shape: tuple) -> np.ndarray:
        return im2col(x, node, tuple(w_shape[2:]))

    def target_rows(self, y: np.ndarray) -> np.ndarray:
        return y.transpose(0, 2, 3, 1).reshape(-1, y.shape[1]) if y.ndim == 4 else y


def _restrict(m: AtomMap, axes: list[int]) -> np.ndarray:
    """m's ids reduced to `axes` (index 0 along its other channel axes)."""
    ids = m.ids
    for x in m.axes:
        if x not in axes:
            ids = np.take(ids, [0], axis=x)
    return ids


def attention_members(node, ctx) -> list | None:
    """For a product of two activations that computes attention scores: the nodes after it up
    to the product of the probabilities with the values (element-wise scaling or masking,
    Softmax, that MatMul); None when it is not one."""
    tensor, members = node.output[0], []
    for _ in range(6):
        users = ctx.consumers(tensor)
        if len(users) != 1:
            return None
        user = users[0]
        members.append(user)
        if user.op_type == "Softmax":
            probs = user.output[0]
            region = activation_region(probs, ctx)  # e.g. Where(IsNaN(p), 0, p) of exported SDPA
            if region is not None:
                members += region[0]
                probs = region[1]
            after = ctx.consumers(probs)
            if len(after) == 1 and after[0].op_type == "MatMul" and after[0].input[0] == probs \
                    and ctx.const(after[0].input[1]) is None:
                return members + [after[0]]
            return None
        if user.op_type not in ("Mul", "Div", "Add", "Sub", "Where", "Cast", "Max", "Min"):
            return None
        tensor = user.output[0]
    return None


def im2col(x: np.ndarray, node, kernel: tuple[int, int]) -> np.ndarray:
    """Patches (N·H_out·W_out, C·kh·kw) of a 2-D conv's input, in the weight's (c, kh, kw) order."""
    pads = list(attr(node, "pads", [0, 0, 0, 0]))
    strides = list(attr(node, "strides", [1, 1]))
    dil = list(attr(node, "dilations", [1, 1]))
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    kh, kw = kernel
    n, c, h, w = xp.shape
    ho = (h - dil[0] * (kh - 1) - 1) // strides[0] + 1
    wo = (w - dil[1] * (kw - 1) - 1) // strides[1] + 1
    cols = np.empty((n, ho, wo, c, kh, kw), dtype=np.float32)
    for i in range(kh):
        for j in range(kw):
            hs, ws = i * dil[0], j * dil[1]
            patch = xp[:, :, hs:hs + strides[0] * (ho - 1) + 1:strides[0], ws:ws + strides[1] * (wo - 1) + 1:strides[1]]
            cols[..., i, j] = patch.transpose(0, 2, 3, 1)
    return cols.reshape(n * ho * wo, c * kh * kw)


class ConvTranspose(OpHandler):
    """Transposed convolution (group 1): weight (C_in, C_out, k...)."""

    op_types = ("ConvTranspose",)
    is_layer = True

    def propagate(self, node, ctx) -> None:
        _require_channels_on(ctx, node.input[0], 1)
        _const_weight(node, ctx)
        _const_bias(node, ctx)
        if int(attr(node, "group", 1)) != 1:
            raise NotUnderstood(f"grouped transposed convolution (group={attr(node, 'group')})")
        ctx.new_map(node.output[0], 1, node.name)
        ctx.layer_nodes.append(node)

    def params(self, node, ctx) -> list[ParamAxis]:
        found = [ParamAxis(1, 1, node.output[0], 1, "produce", "weight"),
                 ParamAxis(1, 0, node.input[0], 1, "consume", "weight")]
        if _has_bias(node):
            found.append(ParamAxis(2, 0, node.output[0], 1, "produce", "bias"))
        return found

    def layer_axes(self, node, ctx) -> tuple[int, int]:
        return 1, 1

    def layer_spec(self, node, ctx) -> LayerSpec:
        s_in = ctx.shape(node.input[0]) or [1, 1]
        k = list(ctx.const(node.input[1]).shape[2:])
        nd = len(k)
        return LayerSpec(
            op="ConvTranspose", kernel=k, stride=list(attr(node, "strides", [1] * nd)),
            pads=list(attr(node, "pads", [0] * (2 * nd))), dilation=list(attr(node, "dilations", [1] * nd)),
            depthwise=False, input_hw=list(s_in[2:]), batch=s_in[0], activation="",
            has_bias=_has_bias(node))


class Gemm(OpHandler):
    """Gemm of a 2-D input (N, K) with a weight: new output features (axis 1)."""

    op_types = ("Gemm",)
    is_layer = True

    def propagate(self, node, ctx) -> None:
        x = node.input[0]
        if ctx.rank(x) != 2:
            raise NotUnderstood("not a matrix product of a 2-D input with a weight initializer")
        _require_channels_on(ctx, x, 1)
        if int(attr(node, "transA", 0)):
            raise NotUnderstood("Gemm with transA")
        if _const_weight(node, ctx).ndim != 2:
            raise NotUnderstood("weight is not a matrix")
        _const_bias(node, ctx)
        ctx.new_map(node.output[0], 1, node.name)
        ctx.layer_nodes.append(node)

    def params(self, node, ctx) -> list[ParamAxis]:
        trans_b = int(attr(node, "transB", 0))
        out_axis, in_axis = (0, 1) if trans_b else (1, 0)
        found = [ParamAxis(1, out_axis, node.output[0], 1, "produce", "weight"),
                 ParamAxis(1, in_axis, node.input[0], 1, "consume", "weight")]
        c = ctx.const(node.input[2]) if _has_bias(node) else None
        n_out = ctx.const(node.input[1]).shape[out_axis]
        if c is not None and c.ndim >= 1 and c.shape[-1] == n_out:
            found.append(ParamAxis(2, c.ndim - 1, node.output[0], 1, "produce", "bias"))
        return found

    def layer_axes(self, node, ctx) -> tuple[int, int]:
        return 1, 1

    def layer_spec(self, node, ctx) -> LayerSpec:
        s_in = ctx.shape(node.input[0]) or [1, 1]
        return LayerSpec("Gemm", [], [], [], [], False, [], s_in[0], activation="", has_bias=_has_bias(node))

    def repairable(self, node, ctx) -> bool:
        b = ctx.const(node.input[2]) if _has_bias(node) else None
        return not int(attr(node, "transA", 0)) and (b is None or b.ndim == 1)

    def weight_matrix(self, node, w, b):
        alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
        w_mat = (w if int(attr(node, "transB", 0)) else w.T).astype(np.float64) * alpha
        return w_mat, (b.astype(np.float64) * beta if b is not None else np.zeros(w_mat.shape[0]))

    def from_matrix(self, node, w_mat, b, w_shape):
        alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
        w = (w_mat if int(attr(node, "transB", 0)) else w_mat.T) / alpha
        return w, b / beta

    def design_rows(self, node, x, w_shape):
        return x.reshape(len(x), -1)

    def target_rows(self, y):
        return y


class MatMul(OpHandler):
    """x @ W with a constant 2-D weight W (K, N): the channels of x's last axis are read and
    N new channels are made on the last axis. A 2-D x is timed as a Gemm; x of higher rank
    (tokens, channels-last maps) as 'MatMul' with the sizes before the channel axis in the
    spec.

    A product of two activations (batched: A (..., M, K) @ B (..., K, N)) ties the channels
    of A's last axis with those of B's axis -2 (a contraction over a head dimension) and the
    broadcast batch axes of both (heads); the output keeps the batch axes' channels, A's M
    axis and B's N axis. When it computes attention scores (its output goes, through
    element-wise ops, into a Softmax whose probabilities another such product reads), the
    attention core (QKᵀ, softmax, AV) is a layer of its own: op 'Attention', whose width is
    that of its query (heads x head_dim), timed in the graph from its kernels."""

    op_types = ("MatMul",)
    is_layer = True

    @staticmethod
    def weighted(node, ctx) -> bool:
        return ctx.const(node.input[0]) is None and ctx.const(node.input[1]) is not None

    def propagate(self, node, ctx) -> None:
        x = node.input[0]
        if ctx.const(x) is None and ctx.const(node.input[1]) is None:
            self._activation_product(node, ctx)
            return
        if ctx.const(x) is not None:
            raise NotUnderstood("a weight times an activation (W @ x)")
        rank = ctx.rank(x)
        if rank is None or rank < 2 or ctx.const(node.input[1]).ndim != 2:
            raise NotUnderstood("not a product of an activation with a 2-D weight")
        _require_channels_on(ctx, x, rank - 1)
        ctx.new_map(node.output[0], rank - 1, node.name)
        ctx.layer_nodes.append(node)

    def _activation_product(self, node, ctx) -> None:
        a_name, b_name = node.input[0], node.input[1]
        s_a, s_b, s_out = ctx.shape(a_name), ctx.shape(b_name), ctx.shape(node.output[0])
        if s_a is None or s_b is None or s_out is None or len(s_a) < 2 or len(s_b) < 2:
            raise NotUnderstood("shape unknown")
        rank = len(s_out)
        a, b = ctx.map(a_name), ctx.map(b_name)
        a = a.aligned(rank) if a is not None else None
        b = b.aligned(rank) if b is not None else None
        k_a, k_b = rank - 1, rank - 2  # contraction axes
        if a is not None and b is not None and k_a in a.axes and k_b in b.axes:
            ids_a = np.moveaxis(np.take(a.ids, [0], axis=rank - 2), k_a, -1)  # (..., 1, K)
            ids_b = np.moveaxis(np.take(b.ids, [0], axis=rank - 1), k_b, -1)
            ctx.tie(ids_a, ids_b)
        elif (a is not None and k_a in a.axes) or (b is not None and k_b in b.axes):
            for m in (a, b):  # channels contracted with untracked values: fixed
                if m is not None:
                    ctx.fix(m.ids)
        batch = set(range(rank - 2))
        parts = []
        for m, keep in ((a, batch | {rank - 2}), (b, batch | {rank - 1})):
            if m is None:
                continue
            contract = k_a if m is a else k_b
            if contract in m.axes and not ctx.tied_along(m, contract):
                kept_axes = tuple(x for x in m.axes if x in keep and x not in batch)
            else:
                kept_axes = tuple(x for x in m.axes if x in keep)
            if kept_axes:
                ids = np.take(m.ids, [0], axis=contract)
                parts.append(AtomMap(ids, kept_axes))
        if not parts:
            return
        parts.sort(key=lambda p: -len(p.axes))  # the output's ids from the side mapping most axes
        for p in parts[1:]:  # shared batch axes (heads): the same channels on both sides
            shared = [x for x in p.axes if x in parts[0].axes and x in batch]
            if shared:
                ctx.tie(_restrict(parts[0], shared), _restrict(p, shared))
        axes = tuple(sorted({x for p in parts for x in p.axes}))
        common = np.broadcast_shapes(*(p.ids.shape for p in parts))
        ctx.set_map(node.output[0], AtomMap(np.broadcast_to(parts[0].ids, common).copy(), axes))
        if attention_members(node, ctx) is not None and ctx.map(a_name) is not None:
            ctx.layer_nodes.append(node)

    def params(self, node, ctx) -> list[ParamAxis]:
        if not self.weighted(node, ctx):
            return []
        rank = ctx.rank(node.input[0])
        return [ParamAxis(1, 1, node.output[0], rank - 1, "produce", "weight"),
                ParamAxis(1, 0, node.input[0], rank - 1, "consume", "weight")]

    def layer_axes(self, node, ctx) -> tuple[int | None, int | None]:
        """(input axis, output axis); None: every channel axis of the query (attention)."""
        if not self.weighted(node, ctx):
            return None, None
        rank = ctx.rank(node.input[0])
        return rank - 1, rank - 1

    def layer_tensors(self, node, ctx) -> tuple[str, str]:
        """The tensors whose channels are the layer's input and output widths: the query for
        both sides of an attention core (its width is the heads it keeps)."""
        if not self.weighted(node, ctx):
            return node.input[0], node.input[0]
        return node.input[0], node.output[0]

    @staticmethod
    def bias_add(node, ctx):
        """(Add node, input index) of a constant per-channel bias added right after, or None."""
        users = ctx.consumers(node.output[0])
        n_out = ctx.const(node.input[1]).shape[1]
        if len(users) == 1 and users[0].op_type == "Add":
            for i, name in enumerate(users[0].input):
                c = ctx.const(name)
                if c is not None and c.ndim == 1 and c.shape[0] == n_out:
                    return users[0], i
        return None

    def layer_spec(self, node, ctx) -> LayerSpec:
        s_in = ctx.shape(node.input[0]) or [1, 1]
        if not self.weighted(node, ctx):  # attention core: tokens of queries and keys, head dim
            s_out = ctx.shape(node.output[0]) or [1, 1, 1]
            return LayerSpec("Attention", [s_in[-1]], [], [], [], False, list(s_out[-2:]), s_in[0],
                             activation="", has_bias=False)
        if len(s_in) == 2:
            return LayerSpec("Gemm", [], [], [], [], False, [], s_in[0], activation="", has_bias=False)
        return LayerSpec("MatMul", [], [], [], [], False, list(s_in[1:-1]), s_in[0], activation="",
                         has_bias=self.bias_add(node, ctx) is not None)

    def layer_members(self, node, ctx) -> list:
        """Nodes whose kernels count towards the layer in-graph, beyond the node: an attention
        core's scaling/masking, Softmax and probabilities @ values."""
        members = attention_members(node, ctx) if not self.weighted(node, ctx) else None
        return members or []

    def repairable(self, node, ctx) -> bool:
        return self.weighted(node, ctx)

    def weight_matrix(self, node, w, b):
        return w.T.astype(np.float64), (b.astype(np.float64) if b is not None else np.zeros(w.shape[1]))

    def from_matrix(self, node, w_mat, b, w_shape):
        return w_mat.T, b

    def design_rows(self, node, x, w_shape):
        return x.reshape(-1, x.shape[-1])

    def target_rows(self, y):
        return y.reshape(-1, y.shape[-1])
