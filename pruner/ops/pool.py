"""Pooling, reductions and resizing: channels pass when the op leaves their axis alone."""
from __future__ import annotations

from latprune.pruner.ops.base import NotUnderstood, OpHandler, attr, mapped_io


class SpatialPool(OpHandler):
    """Pools over the axes after axis 1 (NCHW); a MaxPool's Indices output is fixed."""

    op_types = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
                "GlobalLpPool", "MaxRoiPool", "DepthToSpace", "SpaceToDepth")

    def propagate(self, node, ctx) -> None:
        m = ctx.map(node.input[0])
        if node.op_type in ("DepthToSpace", "SpaceToDepth", "MaxRoiPool"):
            raise NotUnderstood("moves channels to or from the spatial axes")
        if any(a >= 2 for a in m.axes):
            raise NotUnderstood("channels on a pooled axis")
        ctx.set_map(node.output[0], m)
        for extra in node.output[1:]:
            if extra:
                ctx.set_map(extra, m)
                ctx.fix(m.ids)


def _reduced_axes(node, ctx, rank: int) -> list[int] | None:
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = ctx.ints(node.input[1])
        if axes is None:
            return None
    if axes is None or len(axes) == 0:
        if int(attr(node, "noop_with_empty_axes", 0)):
            return []
        return list(range(rank))
    return sorted(a + rank if a < 0 else a for a in axes)


class Reduce(OpHandler):
    """Reductions. Over other axes the channels pass (their axis index shifts when the
    reduced axes are dropped). Over a channel axis the result carries no channels: the
    statistic of a channel set (a LayerNorm written out as ReduceMean, CBAM's channel max)."""

    op_types = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")

    def propagate(self, node, ctx) -> None:
        m = ctx.map(node.input[0])
        axes = _reduced_axes(node, ctx, m.rank)
        if axes is None:
            raise NotUnderstood("reduction over computed axes")
        if set(axes) & set(m.axes):
            return  # a statistic over the channels: no channels left
        keep = int(attr(node, "keepdims", 1))
        out = m
        if not keep:
            for a in sorted(axes, reverse=True):
                out = out.with_axis_removed(a)
        ctx.set_map(node.output[0], out)


class ArgReduce(OpHandler):
    """ArgMax / ArgMin / TopK: over a channel axis the channel index is the result (class
    labels): fixed; over another axis the channels pass."""

    op_types = ("ArgMax", "ArgMin", "TopK")

    def propagate(self, node, ctx) -> None:
        m = ctx.map(node.input[0])
        axis = int(attr(node, "axis", -1 if node.op_type == "TopK" else 0))
        axis = axis + m.rank if axis < 0 else axis
        if axis in m.axes:
            raise NotUnderstood("selects among the channels")
        out = m
        if node.op_type != "TopK" and not int(attr(node, "keepdims", 1)):
            out = m.with_axis_removed(axis)
        for name in node.output:
            ctx.set_map(name, out)
        if node.op_type == "TopK" and len(node.output) > 1 and node.output[1]:
            ctx.fix(m.ids)


class Resize(OpHandler):
    """Resize / Upsample that leave the channel axes' sizes alone (scales 1 there)."""

    op_types = ("Resize", "Upsample")

    def propagate(self, node, ctx) -> None:
        m, s_in, s_out = mapped_io(node, ctx)
        if any(s_in[a] != s_out[a] for a in m.axes):
            raise NotUnderstood("resizes a channel axis")
        if node.op_type == "Resize" and len(node.input) >= 4 and node.input[3] \
                and ctx.ints(node.input[3]) is None:
            raise NotUnderstood("Resize with non-constant sizes")
        ctx.set_map(node.output[0], m)

    def rewrite(self, node, orig, ctx) -> None:
        sizes = ctx.const_to_rewrite(orig, 3) if node.op_type == "Resize" else None
        if sizes is None:
            return
        for a in ctx.map(orig.output[0]).axes:
            sizes[a] = len(ctx.kept_along(orig.output[0], a))
        ctx.set_input(node, 3, sizes)
