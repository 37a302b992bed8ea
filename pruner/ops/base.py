"""What an operator handler is, and the context it works in.

Every tensor that carries prunable channels has an `AtomMap`: one integer *atom* per channel
position, on whichever axes hold channels (axis 1 of NCHW, the last axis of NHWC or of a
(B, N, D) token tensor, two axes after a Reshape splits channels into (groups, channels)). An
atom id is the same object wherever the channel goes; a union-find over atoms ties channels
that must be kept or removed together. A tensor without a map carries no prunable channels:
graph inputs, shape arithmetic, and anything derived only from them.

A handler (one class per family of ONNX ops, registered in pruner/ops/__init__.py) says, for
one node:

- `propagate`: how atoms flow through it (pass, create, rearrange, tie). Raise
  `NotUnderstood(reason)` for a case it does not support: the analyser then fixes every
  channel the node touches (they are not pruned) and lists the reason in the notes.
- `params`: which constant inputs have an axis that follows an activation's channel axis
  (weight rows and columns, biases, BatchNorm/LayerNorm parameters, per-channel constants).
  Surgery slices them, importance reads them, the torch frontend maps them onto a module.
- `rewrite`: any other change surgery makes when channels go (a `group` attribute, Split
  sizes, Slice bounds, Pad amounts, a Reshape target).
- layers only (`is_layer`): the channel axes of its input and output, its `LayerSpec` (the
  latency-table key) and, where least-squares repair applies, how its weights read as a matrix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import onnx
from onnx import helper

if TYPE_CHECKING:  # pragma: no cover
    from latprune.types import LayerSpec


class NotUnderstood(Exception):
    """A handler cannot follow channels through this node; the message says why."""


def attr(node: onnx.NodeProto, name: str, default=None):
    """The value of attribute `name` (strings decoded), or `default`."""
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


@dataclass
class AtomMap:
    """Atom ids of one tensor's channel positions.

    `ids` has the tensor's rank; it has size 1 on every axis not in `axes` and the tensor's
    size on every axis in `axes` (the axes that carry channels, ascending). Broadcasting
    `ids` against the tensor gives each element's atom."""

    ids: np.ndarray
    axes: tuple[int, ...]

    @staticmethod
    def along(ids: np.ndarray, axis: int, rank: int) -> "AtomMap":
        shape = [1] * rank
        shape[axis] = len(ids)
        return AtomMap(np.asarray(ids, np.int64).reshape(shape), (axis,))

    @property
    def rank(self) -> int:
        return self.ids.ndim

    def axis(self) -> int | None:
        """The one channel axis, or None when channels lie on several axes."""
        return self.axes[0] if len(self.axes) == 1 else None

    def flat(self) -> np.ndarray:
        """Atom ids along the single channel axis (1-D)."""
        return self.ids.reshape(-1)

    def aligned(self, rank: int) -> "AtomMap":
        """The map of this tensor broadcast (right-aligned) to a tensor of `rank` dims."""
        extra = rank - self.rank
        if extra < 0:
            raise NotUnderstood("broadcast to a lower rank")
        return AtomMap(self.ids.reshape((1,) * extra + self.ids.shape),
                       tuple(a + extra for a in self.axes))

    def transposed(self, perm: list[int]) -> "AtomMap":
        return AtomMap(self.ids.transpose(perm), tuple(sorted(perm.index(a) for a in self.axes)))

    def squeezed(self) -> "AtomMap":
        """The same map without channel axes of size 1 (one channel there: nothing to cut)."""
        return AtomMap(self.ids, tuple(a for a in self.axes if self.ids.shape[a] > 1))

    def with_axis_removed(self, axis: int) -> "AtomMap":
        """Drop a size-1 axis that carries no channels (a reduction with keepdims=0)."""
        return AtomMap(np.squeeze(self.ids, axis=axis),
                       tuple(a - (a > axis) for a in self.axes if a != axis))


@dataclass(frozen=True)
class ParamAxis:
    """One axis of a constant input that follows a tensor's channel axis: position p along
    `param_axis` of input `index` belongs to position p along `tensor_axis` of `tensor`.

    role: 'produce' (its value makes the channel: layer output rows, biases, BatchNorm and
    LayerNorm scale/shift, additive constants), 'scale' (a multiplicative per-channel
    constant), 'stat' (BatchNorm running statistics) or 'consume' (a layer's weights that
    read an input channel). kind: weight | bias | bn_weight | bn_bias | bn_mean | bn_var |
    ln_weight | ln_bias | const."""

    index: int
    param_axis: int
    tensor: str
    tensor_axis: int
    role: str
    kind: str


class OpHandler:
    """Base class of operator handlers (see the module docstring)."""

    op_types: ClassVar[tuple[str, ...]] = ()
    # A layer: a node with a constant weight whose output channels are new (conv, gemm).
    is_layer: ClassVar[bool] = False
    # Makes channels even when no input carries any (a layer, an embedding lookup).
    creates_channels: ClassVar[bool] = False

    def propagate(self, node: onnx.NodeProto, ctx: "PropagateContext") -> None:
        raise NotUnderstood(f"operator {node.op_type} not understood")

    def params(self, node: onnx.NodeProto, ctx: "GraphView") -> list[ParamAxis]:
        return []

    def rewrite(self, node: onnx.NodeProto, orig: onnx.NodeProto, ctx: "SurgeryContext") -> None:
        """Change `node` (the copy in the pruned model; `orig` is the analysed node) beyond
        slicing its `params`."""

    # ---- layers ----------------------------------------------------------------------------
    def layer_axes(self, node: onnx.NodeProto, ctx: "GraphView") -> tuple[int, int]:
        """Channel axis of the layer's input (node.input[0]) and of its output."""
        raise NotImplementedError

    def layer_spec(self, node: onnx.NodeProto, ctx: "GraphView") -> "LayerSpec":
        raise NotImplementedError

    def channel_preserving(self, node: onnx.NodeProto, ctx: "GraphView") -> bool:
        """True when output channel c is input channel c (depthwise conv): pruning acts on the
        layers after it, not on this one's input."""
        return False


class GraphView:
    """Read access to a normalised model during analysis and after it: static shapes,
    constant values, atom maps and node attributes."""

    def __init__(self, graph: onnx.GraphProto, shapes: dict[str, list[int] | None],
                 inits: dict[str, np.ndarray], maps: dict[str, AtomMap]) -> None:
        self.graph = graph
        self.shapes = shapes
        self.inits = inits
        self.maps = maps
        self.opset = 17  # the default domain's opset (the analyser sets the model's)
        self._consumers: dict[str, list[onnx.NodeProto]] | None = None

    def shape(self, name: str) -> list[int] | None:
        return self.shapes.get(name)

    def rank(self, name: str) -> int | None:
        s = self.shapes.get(name)
        return None if s is None else len(s)

    def const(self, name: str) -> np.ndarray | None:
        return self.inits.get(name) if name else None

    def ints(self, name: str) -> list[int] | None:
        value = self.const(name)
        return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]

    def map(self, name: str) -> AtomMap | None:
        return self.maps.get(name) if name else None

    def consumers(self, name: str) -> list[onnx.NodeProto]:
        if self._consumers is None:
            self._consumers = {}
            for n in self.graph.node:
                for i in n.input:
                    self._consumers.setdefault(i, []).append(n)
        return self._consumers.get(name, [])


class PropagateContext(GraphView):
    """What `OpHandler.propagate` may do: read the graph and create, set, tie and fix atoms."""

    def __init__(self, graph, shapes, inits, maps, uf, origin: list[str], fixed: set[int]) -> None:
        super().__init__(graph, shapes, inits, maps)
        self.uf = uf
        self._origin = origin
        self._fixed = fixed
        self.layer_nodes: list[onnx.NodeProto] = []

    def new_atoms(self, n: int, creator: str) -> np.ndarray:
        ids = self.uf.new(n)
        self._origin.extend([creator] * n)
        return ids

    def new_map(self, tensor: str, axis: int, creator: str) -> AtomMap:
        """Fresh atoms along `axis` of `tensor` (its static shape gives their number)."""
        shape = self.shape(tensor)
        if shape is None:
            raise NotUnderstood("output shape unknown")
        m = AtomMap.along(self.new_atoms(shape[axis], creator), axis, len(shape)).squeezed()
        self.maps[tensor] = m
        return m

    def set_map(self, tensor: str, m: AtomMap | None) -> None:
        if tensor and m is not None:
            self.maps[tensor] = m.squeezed()

    def tie(self, a: np.ndarray, b: np.ndarray) -> None:
        """Atoms a[i] and b[i] (same shape, or broadcastable) become one channel."""
        a, b = np.broadcast_arrays(np.asarray(a), np.asarray(b))
        for x, y in zip(a.reshape(-1), b.reshape(-1)):
            self.uf.union(int(x), int(y))

    def tie_all(self, ids: np.ndarray) -> None:
        flat = np.asarray(ids).reshape(-1)
        for y in flat[1:]:
            self.uf.union(int(flat[0]), int(y))

    def fix(self, ids: np.ndarray) -> None:
        """These atoms' channels may not be pruned."""
        self._fixed.update(int(a) for a in np.asarray(ids).reshape(-1))

    def tied_along(self, m: AtomMap, axis: int) -> bool:
        """Whether every slice of `m` along `axis` already holds the same channels."""
        roots = np.vectorize(self.uf.find, otypes=[np.int64])(m.ids)
        first = np.take(roots, [0], axis=axis)
        return bool(np.all(roots == first))


def mapped_io(node: onnx.NodeProto, ctx: "GraphView") -> tuple[AtomMap, list[int], list[int]]:
    """The channels of node.input[0] and the static shapes of its first input and output."""
    s_in, s_out = ctx.shape(node.input[0]), ctx.shape(node.output[0])
    if s_in is None or s_out is None:
        raise NotUnderstood("shape unknown")
    return ctx.map(node.input[0]), s_in, s_out


class SurgeryContext(GraphView):
    """What `OpHandler.rewrite` may do: read the analysed graph (shapes, maps, constants of
    the original model), ask which channel positions survive, and replace constant inputs."""

    def __init__(self, graph, shapes, inits, maps, kept_along, set_input) -> None:
        super().__init__(graph, shapes, inits, maps)
        self.kept_along = kept_along  # (tensor, axis) -> kept positions along that axis
        self.set_input = set_input  # (node, input index, array) -> None

    def const_to_rewrite(self, orig: onnx.NodeProto, index: int) -> np.ndarray | None:
        """A copy of constant input `index` of `orig` when channels of its output go, else None."""
        if len(orig.input) <= index or self.full(orig.output[0]):
            return None
        value = self.const(orig.input[index])
        return None if value is None else value.copy()

    def full(self, tensor: str) -> bool:
        """True when no channel of `tensor` is removed."""
        m = self.map(tensor)
        return m is None or all(len(self.kept_along(tensor, a)) == m.ids.shape[a] for a in m.axes)
