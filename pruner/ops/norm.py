"""Normalisations and distributions over an axis.

BatchNormalization / InstanceNormalization act per channel on axis 1 (their parameters are
sliced). LayerNormalization normalises over its last axes; channels on those axes keep their
identity (γ and β are sliced) although the statistics then run over fewer channels, which is
what pruning a LayerNorm-ed width means. Softmax-like ops over a channel axis make the
channels categories (class scores, DFL bins): those are never pruned.
"""
from __future__ import annotations

from latprune.pruner.ops.base import NotUnderstood, OpHandler, ParamAxis, attr


class BatchNorm(OpHandler):
    op_types = ("BatchNormalization", "InstanceNormalization")
    KINDS = {"BatchNormalization": {1: ("produce", "bn_weight"), 2: ("produce", "bn_bias"),
                                    3: ("stat", "bn_mean"), 4: ("stat", "bn_var")},
             "InstanceNormalization": {1: ("produce", "bn_weight"), 2: ("produce", "bn_bias")}}

    def propagate(self, node, ctx) -> None:
        m = ctx.map(node.input[0])
        if not set(m.axes) <= {1}:
            raise NotUnderstood("channels are not on axis 1")
        ctx.set_map(node.output[0], m)
        for extra in node.output[1:]:  # training-mode running statistics
            if extra:
                raise NotUnderstood("training-mode BatchNormalization")

    def params(self, node, ctx) -> list[ParamAxis]:
        found = []
        for index, (role, kind) in self.KINDS[node.op_type].items():
            if index < len(node.input) and ctx.const(node.input[index]) is not None \
                    and ctx.const(node.input[index]).ndim == 1:
                found.append(ParamAxis(index, 0, node.output[0], 1, role, kind))
        return found


class LayerNorm(OpHandler):
    """LayerNormalization(axis): normalised axes axis..rank-1; scale/bias cover those axes."""

    op_types = ("LayerNormalization", "SimplifiedLayerNormalization")

    def propagate(self, node, ctx) -> None:
        m = ctx.map(node.input[0])
        ctx.set_map(node.output[0], m)

    def params(self, node, ctx) -> list[ParamAxis]:
        out = node.output[0]
        m, s_out = ctx.map(out), ctx.shape(out)
        if m is None or s_out is None:
            return []
        axis = int(attr(node, "axis", -1))
        axis = axis + len(s_out) if axis < 0 else axis
        found = []
        for index, kind in ((1, "ln_weight"), (2, "ln_bias")):
            value = ctx.const(node.input[index]) if index < len(node.input) else None
            if value is None:
                continue
            offset = len(s_out) - value.ndim
            for a in m.axes:
                pa = a - offset
                if a >= axis and pa >= 0 and value.shape[pa] == s_out[a] and s_out[a] > 1:
                    found.append(ParamAxis(index, pa, out, a, "produce", kind))
        return found


class OverAxis(OpHandler):
    """Ops that treat one axis as a distribution or normalise along it. Over a channel axis:
    Softmax-like ops fix the channels; LpNormalization keeps them (like LayerNorm)."""

    op_types = ("Softmax", "LogSoftmax", "Hardmax", "LpNormalization")

    def propagate(self, node, ctx) -> None:
        m = ctx.map(node.input[0])
        rank = m.rank
        default = -1 if node.op_type == "LpNormalization" or ctx.opset >= 13 else 1
        axis = int(attr(node, "axis", default))
        axis = axis + rank if axis < 0 else axis
        # before opset 13 Softmax flattens axis..rank-1 into one distribution
        over = {axis} if node.op_type == "LpNormalization" or ctx.opset >= 13 else set(range(axis, rank))
        if node.op_type != "LpNormalization" and over & set(m.axes):
            raise NotUnderstood("a distribution over the channels (class scores or bins)")
        ctx.set_map(node.output[0], m)
