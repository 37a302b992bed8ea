"""Operators that move, cut, join or reshape tensors: channels go wherever the data goes.

Transpose moves the channel axis (NCHW <-> NHWC). Reshape, Flatten, Squeeze and Unsqueeze
are read as a regrouping of axes: a channel axis merged with others (a flatten into a Gemm)
repeats each channel once per element; a channel axis split in two (channel shuffle, heads)
gives channels on two axes, and the channels are then tied along all but the largest of them
so that what survives is still a rectangular block. Concat, Split, Slice, Pad and Gather
along a channel axis join, cut or extend the channel list; along other axes they pass it.
"""
from __future__ import annotations

import numpy as np

from latprune.pruner.ops.base import AtomMap, NotUnderstood, OpHandler, ParamAxis, attr, mapped_io


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


class ShapeOf(OpHandler):
    """Shape and Size read no channel values: their outputs carry no channels."""

    op_types = ("Shape", "Size")

    def propagate(self, node, ctx) -> None:
        return


class Transpose(OpHandler):
    op_types = ("Transpose",)

    def propagate(self, node, ctx) -> None:
        m = ctx.map(node.input[0])
        perm = attr(node, "perm")
        perm = list(perm) if perm is not None else list(range(m.rank))[::-1]
        ctx.set_map(node.output[0], m.transposed(perm))


def _segments(s_in: list[int], s_out: list[int]) -> list[tuple[list[int], list[int]]] | None:
    """Split a reshape into runs of input axes and output axes with equal products."""
    segs, i, j = [], 0, 0
    if any(d <= 0 for d in s_in + s_out):
        return None
    while i < len(s_in) or j < len(s_out):
        ins, outs, p_in, p_out = [], [], 1, 1
        if i < len(s_in):
            ins.append(i)
            p_in *= s_in[i]
            i += 1
        if j < len(s_out):
            outs.append(j)
            p_out *= s_out[j]
            j += 1
        while p_in != p_out:
            if p_in < p_out:
                if i >= len(s_in):
                    return None
                ins.append(i)
                p_in *= s_in[i]
                i += 1
            else:
                if j >= len(s_out):
                    return None
                outs.append(j)
                p_out *= s_out[j]
                j += 1
        segs.append((ins, outs))
    return segs


def _free_axis(varying: list[int], s_out: list[int]) -> int:
    """Of the axes a channel axis was split into, the one whose positions stay prunable (the
    channels are tied along the others). A split that keeps the innermost factor on the
    tensor's last axis is a split into heads ((3,) heads, head_dim: attention) or groups of
    channels-last data: the factor before the innermost is free, so whole heads are pruned and
    the head dimension is kept. Otherwise (channel shuffle on NCHW: (2, C/2)) the largest."""
    if varying[-1] == len(s_out) - 1:
        return varying[-2]
    return max(varying, key=lambda o: (s_out[o], o))


def reshape_map(m: AtomMap, s_in: list[int], s_out: list[int], ctx) -> AtomMap:
    """The atom map after reshaping a tensor of shape s_in (map m) to s_out (module doc)."""
    segs = _segments(s_in, s_out)
    if segs is None:
        raise NotUnderstood("reshape between incompatible shapes")
    mapped = set(m.axes)
    # Expand each segment that holds channels to its full extent, then regroup its axes.
    full_in = [s_in[i] if any(a in mapped for a in ins) else 1
               for ins, _ in segs for i in ins]
    ids = np.broadcast_to(m.ids, full_in)
    out_dims: list[int] = []
    for ins, outs in segs:
        if any(a in mapped for a in ins):
            out_dims += [s_out[o] for o in outs]
        else:
            out_dims += [1] * len(outs)
    ids = ids.reshape(out_dims)
    axes = []
    for ins, outs in segs:
        if not any(a in mapped for a in ins):
            continue
        if len(ins) == 1 and len(outs) == 1:  # the same axis, renumbered
            axes.append(outs[0])
            continue
        for o in outs:
            if ids.shape[o] > 1 and np.all(ids == np.take(ids, [0], axis=o)):
                ids = np.take(ids, [0], axis=o)  # no channel varies along it
            elif ids.shape[o] > 1:
                axes.append(o)
        varying = [o for o in outs if o in axes]
        if len(varying) > 1:  # channels split over several axes: keep blocks rectangular
            free = _free_axis(varying, s_out)
            for f in range(ids.shape[free]):
                ctx.tie_all(np.take(ids, f, axis=free))
    return AtomMap(np.ascontiguousarray(ids), tuple(sorted(axes)))


class Reshape(OpHandler):
    """Reshape (constant target), Flatten, Squeeze, Unsqueeze."""

    op_types = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")

    def propagate(self, node, ctx) -> None:
        m, s_in, s_out = mapped_io(node, ctx)
        if node.op_type == "Reshape" and ctx.const(node.input[1]) is None:
            raise NotUnderstood("reshape of channels to a computed shape")
        ctx.set_map(node.output[0], reshape_map(m, s_in, s_out, ctx))

    def rewrite(self, node, orig, ctx) -> None:
        target = ctx.const_to_rewrite(orig, 1) if orig.op_type == "Reshape" else None
        if target is None:
            return
        for a in ctx.map(orig.output[0]).axes:
            if target[a] > 0:
                target[a] = len(ctx.kept_along(orig.output[0], a))
        ctx.set_input(node, 1, target)


class Concat(OpHandler):
    """Along a channel axis: the channel lists are joined (a constant or untracked input adds
    fixed channels). Along another axis: the inputs' channels are tied, and constant inputs
    are sliced with them (a class token or a positional table)."""

    op_types = ("Concat",)

    def propagate(self, node, ctx) -> None:
        out = node.output[0]
        rank = ctx.rank(out)
        if rank is None:
            raise NotUnderstood("output shape unknown")
        axis = _norm_axis(int(attr(node, "axis", 0)), rank)
        maps = [ctx.map(i) for i in node.input]
        along = any(m is not None and axis in m.axes for m in maps)
        if not along:
            carriers = [m for m in maps if m is not None]
            axes = tuple(sorted({a for m in carriers for a in m.axes}))
            for m in carriers:
                if m.axes != axes:
                    raise NotUnderstood("inputs carry channels on different axes")
                ctx.tie(carriers[0].ids, m.ids)
            for name, m in zip(node.input, maps):
                if m is None and ctx.const(name) is None:
                    ctx.fix(carriers[0].ids)  # an input whose channels are not tracked
            ctx.set_map(out, carriers[0])
            return
        parts = []
        for name, m in zip(node.input, maps):
            shape = ctx.shape(name)
            if shape is None:
                raise NotUnderstood("an input's shape is unknown")
            if m is None:
                ids = ctx.new_atoms(shape[axis], node.name)
                ctx.fix(ids)
                parts.append(ids)
            elif m.axes == (axis,):
                parts.append(m.flat())
            elif m.axes == ():  # one channel broadcast over the axis
                parts.append(np.full(shape[axis], m.ids.reshape(-1)[0]))
            else:
                raise NotUnderstood("an input carries channels on another axis too")
        ctx.set_map(out, AtomMap.along(np.concatenate(parts), axis, rank))

    def params(self, node, ctx) -> list[ParamAxis]:
        out = node.output[0]
        m = ctx.map(out)
        if m is None:
            return []
        axis = _norm_axis(int(attr(node, "axis", 0)), len(ctx.shape(out)))
        if axis in m.axes:
            return []
        found = []
        for index, name in enumerate(node.input):
            value = ctx.const(name)
            if value is not None:
                found += [ParamAxis(index, a, out, a, "produce", "const") for a in m.axes
                          if value.shape[a] > 1]
        return found


def _split_sizes(node, ctx, total: int) -> list[int] | None:
    if len(node.input) > 1 and node.input[1]:
        return ctx.ints(node.input[1])
    sizes = attr(node, "split")
    if sizes is not None:
        return list(sizes)
    n = len(node.output)
    chunk = -(-total // n)
    return [min(chunk, total - k * chunk) for k in range(n)]


class Split(OpHandler):
    op_types = ("Split",)

    def propagate(self, node, ctx) -> None:
        m = ctx.map(node.input[0])
        axis = _norm_axis(int(attr(node, "axis", 0)), m.rank)
        if axis not in m.axes:
            for o in node.output:
                ctx.set_map(o, m)
            return
        sizes = _split_sizes(node, ctx, m.ids.shape[axis])
        if sizes is None:
            raise NotUnderstood("Split with computed sizes along the channels")
        start = 0
        for o, size in zip(node.output, sizes):
            ctx.set_map(o, AtomMap(np.take(m.ids, range(start, start + size), axis=axis), m.axes))
            start += size

    def rewrite(self, node, orig, ctx) -> None:
        m = ctx.map(orig.input[0])
        axis = _norm_axis(int(attr(orig, "axis", 0)), m.rank)
        if axis not in m.axes or ctx.full(orig.input[0]):
            return
        sizes = np.array([len(ctx.kept_along(o, axis)) for o in orig.output], dtype=np.int64)
        if len(orig.input) > 1 and orig.input[1]:
            ctx.set_input(node, 1, sizes)
            return
        for a in list(node.attribute):
            if a.name in ("num_outputs", "split"):
                node.attribute.remove(a)
        node.input.append("")
        ctx.set_input(node, len(node.input) - 1, sizes)


def _slice_args(node, ctx, rank: int):
    starts, ends = ctx.ints(node.input[1]), ctx.ints(node.input[2])
    if starts is None or ends is None:
        return None
    axes = ctx.ints(node.input[3]) if len(node.input) > 3 and node.input[3] else list(range(len(starts)))
    steps = ctx.ints(node.input[4]) if len(node.input) > 4 and node.input[4] else [1] * len(starts)
    if axes is None or steps is None:
        return None
    return starts, ends, [_norm_axis(a, rank) for a in axes], steps


def _clamp(v: int, n: int) -> int:
    return max(0, min(n, v + n if v < 0 else v))


class Slice(OpHandler):
    """Slice with constant bounds; step 1 along a channel axis."""

    op_types = ("Slice",)

    def propagate(self, node, ctx) -> None:
        m = ctx.map(node.input[0])
        args = _slice_args(node, ctx, m.rank)
        if args is None:
            raise NotUnderstood("Slice with non-constant bounds")
        ids = m.ids
        for s, e, a, st in zip(*args):
            if a not in m.axes:
                continue
            if st != 1:
                raise NotUnderstood("strided Slice on the channel axis")
            n = ids.shape[a]
            ids = np.take(ids, range(_clamp(s, n), max(_clamp(s, n), _clamp(e, n))), axis=a)
        ctx.set_map(node.output[0], AtomMap(ids, m.axes))

    def rewrite(self, node, orig, ctx) -> None:
        x = orig.input[0]
        if ctx.full(x):
            return
        m = ctx.map(x)
        starts, ends, axes, _ = _slice_args(orig, ctx, m.rank)
        starts, ends = np.array(starts, np.int64), np.array(ends, np.int64)
        changed = False
        for k, a in enumerate(axes):
            if a not in m.axes:
                continue
            n = m.ids.shape[a]
            kept = ctx.kept_along(x, a)
            starts[k] = int(np.sum(kept < _clamp(int(starts[k]), n)))
            ends[k] = int(np.sum(kept < _clamp(int(ends[k]), n)))
            changed = True
        if changed:
            ctx.set_input(node, 1, starts)
            ctx.set_input(node, 2, ends)


def _pads(node, ctx, rank: int) -> list[int] | None:
    pads = ctx.ints(node.input[1]) if len(node.input) > 1 and node.input[1] else attr(node, "pads")
    if pads is None:
        return None
    pads = list(pads)
    if len(node.input) > 3 and node.input[3]:
        axes = ctx.ints(node.input[3])
        if axes is None:
            return None
        full = [0] * (2 * rank)
        for i, a in enumerate(axes):
            a = _norm_axis(a, rank)
            full[a], full[a + rank] = pads[i], pads[i + len(axes)]
        pads = full
    return pads


class Pad(OpHandler):
    """Zero padding along a channel axis adds new channels (the CIFAR ResNets' option-A
    shortcut); padding along other axes passes the channels."""

    op_types = ("Pad",)

    def propagate(self, node, ctx) -> None:
        m = ctx.map(node.input[0])
        pads = _pads(node, ctx, m.rank)
        if pads is None:
            raise NotUnderstood("Pad with non-constant pads")
        out = m
        for a in m.axes:
            before, after = pads[a], pads[a + m.rank]
            if before == 0 and after == 0:
                continue
            if attr(node, "mode", "constant") != "constant" or before < 0 or after < 0:
                raise NotUnderstood("non-constant or negative Pad on the channel axis")
            if len(m.axes) > 1:
                raise NotUnderstood("Pad of channels that lie on several axes")
            out = AtomMap.along(np.concatenate([ctx.new_atoms(before, node.name), m.flat(),
                                                ctx.new_atoms(after, node.name)]), a, m.rank)
        ctx.set_map(node.output[0], out)

    def rewrite(self, node, orig, ctx) -> None:
        x, out = orig.input[0], orig.output[0]
        if ctx.full(out):
            return
        m = ctx.map(x)
        rank = m.rank
        pads = _pads(orig, ctx, rank)
        for a in m.axes:
            kept = ctx.kept_along(out, a)
            before = pads[a]
            pads[a] = int(np.sum(kept < before))
            pads[a + rank] = int(np.sum(kept >= before + m.ids.shape[a]))
        if len(orig.input) > 3 and orig.input[3]:
            axes = [_norm_axis(a, rank) for a in ctx.ints(orig.input[3])]
            pads = [pads[a] for a in axes] + [pads[a + rank] for a in axes]
        if len(orig.input) > 1 and orig.input[1]:
            ctx.set_input(node, 1, np.array(pads, dtype=np.int64))
        else:
            for a in node.attribute:
                if a.name == "pads":
                    del a.ints[:]
                    a.ints.extend(int(p) for p in pads)


class Gather(OpHandler):
    """Gather along an axis without channels passes them; along a channel axis only a scalar
    index into positions that all hold the same channels (tied: e.g. q/k/v of a fused
    projection whose heads are tied) is followed. An embedding lookup (a constant (V, D) table
    gathered along axis 0 by computed indices: BERT's word embeddings) makes D new channels,
    and the table's columns follow them."""

    op_types = ("Gather",)
    creates_channels = True

    @staticmethod
    def _embedding(node, ctx) -> bool:
        table = ctx.const(node.input[0])
        return (table is not None and table.ndim == 2 and ctx.const(node.input[1]) is None
                and int(attr(node, "axis", 0)) == 0)

    def propagate(self, node, ctx) -> None:
        if self._embedding(node, ctx):
            rank = ctx.rank(node.output[0])
            if rank is None:
                raise NotUnderstood("output shape unknown")
            ctx.new_map(node.output[0], rank - 1, node.name)
            return
        m = ctx.map(node.input[0])
        if m is None:
            return  # indices with channels, constant data: nothing to follow
        index = ctx.const(node.input[1])
        axis = _norm_axis(int(attr(node, "axis", 0)), m.rank)
        if index is None:
            raise NotUnderstood("Gather with computed indices")
        if axis in m.axes:
            if index.ndim != 0 or not ctx.tied_along(m, axis):
                raise NotUnderstood("selects channels")
            ids = np.take(m.ids, int(index), axis=axis)
            ctx.set_map(node.output[0], AtomMap(ids, tuple(a - (a > axis) for a in m.axes if a != axis)))
            return
        shape = list(m.ids.shape[:axis]) + [1] * index.ndim + list(m.ids.shape[axis + 1:])
        axes = tuple(a if a < axis else a - 1 + index.ndim for a in m.axes)
        ctx.set_map(node.output[0], AtomMap(m.ids.reshape(shape), axes))

    def params(self, node, ctx) -> list[ParamAxis]:
        if not self._embedding(node, ctx) or ctx.map(node.output[0]) is None:
            return []
        return [ParamAxis(0, 1, node.output[0], ctx.rank(node.output[0]) - 1, "produce", "weight")]


class Expand(OpHandler):
    """Broadcast to a larger shape; channel axes keep their size."""

    op_types = ("Expand", "Tile")

    def propagate(self, node, ctx) -> None:
        m, _, s_out = mapped_io(node, ctx)
        am = m.aligned(len(s_out))
        if any(s_out[a] != am.ids.shape[a] for a in am.axes):
            raise NotUnderstood("repeats a channel axis")
        ctx.set_map(node.output[0], am)

    def rewrite(self, node, orig, ctx) -> None:
        target = ctx.const_to_rewrite(orig, 1) if orig.op_type == "Expand" else None
        if target is None:
            return
        offset = len(ctx.shape(orig.output[0])) - len(target)
        for a in ctx.map(orig.output[0]).axes:
            if a - offset >= 0:
                target[a - offset] = 1  # broadcasts to whatever width is left
        ctx.set_input(node, 1, target)
