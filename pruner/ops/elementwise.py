"""Element-wise operators: channels pass through unary ops; binary ops with broadcasting tie
the channels of the operands that carry them and slice per-channel constants."""
from __future__ import annotations

import numpy as np

from latprune.pruner.ops.base import AtomMap, NotUnderstood, OpHandler, ParamAxis


class Unary(OpHandler):
    """y = f(x) element by element: channel c of y is channel c of x. Extra outputs (a
    Dropout mask) get the same channels, fixed."""

    op_types = (
        "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish", "Elu",
        "Selu", "Celu", "Softplus", "Softsign", "Gelu", "Erf", "Abs", "Neg", "Exp", "Log", "Sqrt",
        "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Mish", "ThresholdedRelu", "Identity",
        "Dropout", "Cast", "Not", "IsNaN", "IsInf", "Sin", "Cos", "Swish",
    )

    def propagate(self, node, ctx) -> None:
        m = ctx.map(node.input[0])
        out = node.output[0]
        if ctx.rank(out) is not None and ctx.rank(out) != m.rank:
            raise NotUnderstood("changes the rank")
        ctx.set_map(out, m)
        for extra in node.output[1:]:
            if extra:
                ctx.set_map(extra, m)
                ctx.fix(m.ids)


def _aligned_shape(shape: list[int], rank: int) -> list[int]:
    return [1] * (rank - len(shape)) + list(shape)


class Broadcast(OpHandler):
    """Element-wise with numpy broadcasting (Add, Mul, Where, PRelu, ...). Operands that carry
    channels are tied channel by channel (a residual Add makes its two inputs one channel
    set); a constant operand with a channel axis is a per-channel parameter that surgery
    slices; any other operand that varies along the channels (a tensor whose channels the
    analysis does not track) fixes them."""

    op_types = ("Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "Sum", "Mean", "Where", "PRelu",
                "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor",
                "Mod", "BitShift")
    ADDITIVE = ("Add", "Sub", "Sum")

    def propagate(self, node, ctx) -> None:
        out = node.output[0]
        s_out = ctx.shape(out)
        if s_out is None:
            raise NotUnderstood("output shape unknown")
        rank = len(s_out)
        carriers: list[AtomMap] = []
        others: list[tuple[str, list[int]]] = []
        for name in node.input:
            if not name:
                continue
            shape = ctx.shape(name)
            if shape is None and ctx.const(name) is not None:
                shape = list(ctx.const(name).shape)
            if shape is None:
                raise NotUnderstood("operand shape unknown")
            if len(shape) > rank:
                raise NotUnderstood("operand of higher rank than the output")
            m = ctx.map(name)
            if m is None:
                others.append((name, _aligned_shape(shape, rank)))
                continue
            am = m.aligned(rank)
            if any(_aligned_shape(shape, rank)[a] != s_out[a] for a in am.axes):
                raise NotUnderstood("an operand's channels broadcast")
            carriers.append(am)
        common = np.broadcast_shapes(*(c.ids.shape for c in carriers))
        for c in carriers[1:]:
            ctx.tie(carriers[0].ids, c.ids)
        axes = tuple(sorted({a for c in carriers for a in c.axes}))
        out_map = AtomMap(np.broadcast_to(carriers[0].ids, common).copy(), axes)
        for name, shape in others:
            if ctx.const(name) is None and any(shape[a] > 1 for a in axes):
                ctx.fix(out_map.ids)  # channels the analysis does not track
        ctx.set_map(out, out_map)

    def params(self, node, ctx) -> list[ParamAxis]:
        out = node.output[0]
        m, s_out = ctx.map(out), ctx.shape(out)
        if m is None or s_out is None:
            return []
        role = "produce" if node.op_type in self.ADDITIVE else "scale"
        found = []
        for index, name in enumerate(node.input):
            value = ctx.const(name)
            if value is None:
                continue
            offset = len(s_out) - value.ndim
            for a in m.axes:
                pa = a - offset
                if pa >= 0 and value.shape[pa] == s_out[a] and s_out[a] > 1:
                    found.append(ParamAxis(index, pa, out, a, role, "const"))
        return found
