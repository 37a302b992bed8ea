"""Graph analysis: channel groups, removable blocks and layer specs of an ONNX model.

Method. Every channel of every tensor that carries prunable channels is an *atom*
(pruner/ops/base.py: `AtomMap`, on whichever axes hold the channels). Each node's operator
handler (pruner/ops/, one registry) says how atoms flow through it: pass (ReLU, BatchNorm,
pooling, depthwise conv, Transpose), create (conv/gemm outputs, the zeros a channel-axis Pad
inserts), rearrange (Concat, Split, Slice, Reshape) or tie (a residual Add unites the atoms
of its inputs; a grouped conv unites each group's inputs and outputs). A union-find over atoms
yields *classes*: channels that must be kept or removed together. Classes with the same
origin (the same producing nodes, the same counts in the same layer inputs/outputs) form one
*channel group*, whose width the solver chooses.

Anything not understood fixes the atoms it touches (not pruned) and is listed in `notes`; it
never raises. Graph inputs carry no prunable channels and graph outputs are fixed: pruning
never changes the model's interface.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import onnx

from latprune.pruner.model_io import initializer_arrays, normalise, tensor_shapes, with_static_shapes
from latprune.pruner.ops import (AtomMap, GraphView, NotUnderstood, ParamAxis, PropagateContext,
                                 attr, handler_for)
from latprune.types import Block, ChannelGroup, Layer, Overhead, Problem, Space

LAYER_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
# Operators that move no data in ONNX Runtime (views, shape arithmetic).
FREE_OPS = {"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Shape", "Size", "Dropout"}
# Ops ONNX Runtime fuses into the conv before them (BatchNorm, then an activation).
_FUSED_AFTER_CONV = {"BatchNormalization"}


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


class ConsumerRow(NamedTuple):
    """A layer input position reading a channel of a group: position `position` along axis
    `tensor_axis` of `tensor` (node.input[0] of `layer`), read by slice `position` along
    `weight_axis` of `weight` (None for a grouped conv, whose weights read it per group);
    `group_pos` is the channel's position in its group."""

    layer: str
    tensor: str
    tensor_axis: int
    position: int
    weight: str | None
    weight_axis: int | None
    group_pos: int


@dataclass
class Analysis:
    """The result of `analyse`: the Problem plus what surgery, importance and repair need."""

    model: onnx.ModelProto  # normalised copy (constants folded into initializers)
    problem: Problem
    maps: dict[str, AtomMap]  # tensor name -> its channels' atoms
    atom_group: np.ndarray  # atom -> group id
    atom_pos: np.ndarray  # atom -> channel position within its group
    shapes: dict[str, list[int] | None]
    params: dict[str, list[ParamAxis]]  # node name -> constant inputs that follow channels
    notes: list[str] = field(default_factory=list)
    opset: int = 17
    length: int | None = None  # size given to dynamic input axes other than the batch

    def static_model(self, model: onnx.ModelProto | None = None) -> onnx.ModelProto:
        """`model` (default the analysed one) with dynamic sequence axes fixed to `length`:
        what is timed (the table is keyed by that length)."""
        from latprune.pruner.model_io import fix_input_dims

        model = self.model if model is None else model
        return model if self.length is None else fix_input_dims(model, 1, self.length)

    def view(self) -> GraphView:
        """Read access to the analysed graph (shapes, constants, maps) for the handlers."""
        inits = initializer_arrays(self.model)
        for node in self.model.graph.node:
            if node.op_type == "Identity" and node.input[0] in inits:
                inits[node.output[0]] = inits[node.input[0]]
        view = GraphView(self.model.graph, self.shapes, inits, self.maps)
        view.opset = self.opset
        return view

    def channel_axis(self, tensor: str) -> int | None:
        """The single axis holding `tensor`'s channels, or None."""
        m = self.maps.get(tensor)
        return None if m is None else m.axis()

    def group_positions(self, tensor: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(group id, position in the group) of each position along `tensor`'s channel axis,
        or None when its channels are not on one axis."""
        m = self.maps.get(tensor)
        if m is None or m.axis() is None:
            return None
        ids = m.flat()
        return self.atom_group[ids], self.atom_pos[ids]

    def keep_mask(self, kept: dict[int, list[int]]) -> np.ndarray:
        """Per atom: does its channel survive when group g keeps positions kept[g] (groups
        absent from `kept` and non-prunable groups are kept whole)."""
        keep = np.ones(len(self.atom_group), dtype=bool)
        prunable = {g.id for g in self.problem.groups if g.prunable}
        for gid, idx in kept.items():
            if gid not in prunable:
                continue
            sel = self.atom_group == gid
            keep[sel] = np.isin(self.atom_pos[sel], np.asarray(idx, dtype=np.int64))
        return keep

    def kept_along(self, tensor: str, axis: int, mask: np.ndarray) -> np.ndarray:
        """Positions along `axis` of `tensor` whose channels survive (`mask` from keep_mask)."""
        m = self.maps.get(tensor)
        shape = self.shapes.get(tensor)
        if m is None or axis not in m.axes:
            return np.arange(shape[axis] if shape else 0)
        alive = mask[m.ids]
        others = tuple(a for a in range(alive.ndim) if a != axis)
        return np.nonzero(alive.any(axis=others) if others else alive)[0]

    def stream_groups(self) -> set[int]:
        """Prunable groups whose channels a LayerNormalization normalises (the residual stream
        of transformer blocks, ConvNeXt's stages)."""
        by_name = {n.name: n for n in self.model.graph.node}
        out: set[int] = set()
        for name, axes in self.params.items():
            if by_name[name].op_type != "LayerNormalization":
                continue
            for pa in axes:
                m = self.maps.get(pa.tensor)
                if m is not None:
                    out |= {int(g) for g in np.unique(self.atom_group[m.ids.reshape(-1)])}
        return {g for g in out if self.problem.groups[g].prunable}

    def freeze_groups(self, gids) -> None:
        """Make these groups non-prunable (kept whole): a user's choice after analysis. Their
        terms in layer and overhead spaces become fixed widths, as analysis writes the spaces
        of groups that were never prunable (the solvers read only prunable groups' terms)."""
        frozen = set(gids)
        for gid in frozen:
            g = self.problem.groups[gid]
            g.prunable, g.candidate_widths = False, [g.size]
        spaces = [sp for layer in self.problem.layers for sp in (layer.c_in, layer.c_out)]
        for sp in spaces + [o.space for o in self.problem.overheads]:
            kept = [(g, m) for g, m in sp.terms if g in frozen]
            if kept:
                sp.fixed += sum(m * self.problem.groups[g].size for g, m in kept)
                sp.terms = [(g, m) for g, m in sp.terms if g not in frozen]

    @property
    def source_rows(self) -> dict[int, list[tuple[str, str, int, int, int]]]:
        """Per group: (layer node, weight name, weight axis, channel index in the layer output,
        channel position in the group) for every layer output channel of the group."""
        rows: dict[int, list] = defaultdict(list)
        layer_names = {layer.name for layer in self.problem.layers}
        for node in self.model.graph.node:
            if node.name not in layer_names:
                continue
            for pa in self.params.get(node.name, []):
                if pa.role != "produce" or pa.kind != "weight":
                    continue
                hit = self.group_positions(pa.tensor)
                if hit is None:
                    continue
                for p, (g, q) in enumerate(zip(*hit)):
                    rows[int(g)].append((node.name, node.input[pa.index], pa.param_axis, p, int(q)))
        return dict(rows)


def _candidates(size: int, step: int, max_candidates: int, unit: int = 1) -> list[int]:
    """Candidate widths: multiples of `step` up to `size`, plus `size`; at most
    `max_candidates`, evenly spread, always including the smallest and `size`. A group whose
    channels come `unit` at a time (whole conv groups) counts units: its candidates are the
    counts whose channel width unit·k is a multiple of `step`."""
    step = max(1, step // math.gcd(step, max(unit, 1)))
    if size <= step:
        return [size]
    widths = list(range(step, size, step)) + [size]
    if len(widths) > max_candidates:
        idx = np.unique(np.round(np.linspace(0, len(widths) - 1, max_candidates)).astype(int))
        widths = [widths[i] for i in idx]
    return widths


def analyse(model: onnx.ModelProto, step: int = 8, max_candidates: int = 16,
            model_name: str = "model", keep_parameters: bool = False, length: int | None = None) -> Analysis:
    """Find channel groups, removable blocks and layer specs of `model` (validated ONNX).
    `keep_parameters`: normalise without removing x + 0 / x · 1 (pruner.model_io.normalise).
    `length`: the size of dynamic input axes other than the batch (a sequence length; the
    layer specs, hence the latency table, are for it); the analysed model keeps them dynamic."""
    model = normalise(model, keep_parameters)
    static = with_static_shapes(model, 1, length)
    shapes = tensor_shapes(static)
    graph = model.graph
    inits = initializer_arrays(model)
    # Identity nodes on initializers (torch.onnx's shared weights): resolve to the array.
    alias: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            alias[node.output[0]] = node.input[0]
    for out, src in alias.items():
        while src in alias:
            src = alias[src]
        inits[out] = inits[src]
        shapes[out] = list(inits[src].shape)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)

    uf = _UnionFind()
    origin: list[str] = []
    fixed: set[int] = set()
    maps: dict[str, AtomMap] = {}
    notes: list[str] = []
    ctx = PropagateContext(graph, shapes, inits, maps, uf, origin, fixed)
    ctx.opset = opset

    def fix_node(node: onnx.NodeProto, why: str) -> None:
        for t in list(node.input) + list(node.output):
            if t in maps:
                ctx.fix(maps[t].ids)
        for t in node.output:
            maps.pop(t, None)  # untracked from here: whatever reads it treats it as fixed
        notes.append(f"{node.name} ({node.op_type}): {why}; its channels are not pruned")

    for node in graph.node:
        if node.op_type == "Identity" and node.input and node.input[0] in inits:
            continue
        handler = handler_for(node)
        if not any(i in maps for i in node.input if i) and not (
                handler is not None and (handler.is_layer or handler.creates_channels)):
            continue  # no channels involved: constants, shape arithmetic, ...
        if handler is None:
            fix_node(node, f"operator {node.op_type}{'' if node.domain in ('', 'ai.onnx') else ' (' + node.domain + ')'} not understood")
            continue
        try:
            handler.propagate(node, ctx)
        except NotUnderstood as exc:
            fix_node(node, str(exc))
        except Exception as exc:  # defensive: analysis never crashes the run
            fix_node(node, f"analysis error {type(exc).__name__}: {exc}")

    for o in graph.output:
        if o.name in maps:
            ctx.fix(maps[o.name].ids)
    view = GraphView(graph, shapes, inits, maps)
    view.opset = opset
    layer_nodes = ctx.layer_nodes
    layer_axes = {n.name: handler_for(n).layer_axes(n, view) for n in layer_nodes}
    layer_io_tensors = {n.name: _layer_tensors(n, view) for n in layer_nodes}

    # ---- classes -> groups ------------------------------------------------------------
    n_atoms = len(uf.parent)
    roots = np.array([uf.find(a) for a in range(n_atoms)], dtype=np.int64)
    layer_io: list[str] = []
    for node in layer_nodes:
        layer_io += list(layer_io_tensors[node.name])
    class_tensor_counts: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for t in dict.fromkeys(layer_io):
        if t in maps:
            for r, c in zip(*np.unique(roots[maps[t].ids.reshape(-1)], return_counts=True)):
                class_tensor_counts[int(r)][t] += int(c)
    class_origins: dict[int, set[str]] = defaultdict(set)
    for a in range(n_atoms):
        class_origins[int(roots[a])].add(origin[a])
    fixed_roots = {int(roots[a]) for a in fixed}
    first_pos: dict[int, tuple[int, int]] = {}
    for order, m in enumerate(maps.values()):  # channel order: first tensor (topological)
        for p, r in enumerate(roots[m.ids.reshape(-1)]):
            first_pos.setdefault(int(r), (order, p))
    for a in range(n_atoms):  # atoms no tensor kept (a node failed after making them)
        first_pos.setdefault(int(roots[a]), (len(maps), a))
    signature_to_group: dict[tuple, int] = {}
    class_of_group: dict[int, list[int]] = defaultdict(list)
    for r in sorted(first_pos, key=lambda r: first_pos[r]):
        sig = (r in fixed_roots, tuple(sorted(class_origins[r])),
               tuple(sorted(class_tensor_counts[r].items())))
        gid = signature_to_group.setdefault(sig, len(signature_to_group))
        class_of_group[gid].append(r)
    sig_of_group = {g: s for s, g in signature_to_group.items()}
    root_group = {r: (g, i) for g, rs in class_of_group.items() for i, r in enumerate(rs)}
    atom_group = np.array([root_group[int(r)][0] for r in roots], dtype=np.int64)
    atom_pos = np.array([root_group[int(r)][1] for r in roots], dtype=np.int64)

    groups: list[ChannelGroup] = []
    for gid in range(len(signature_to_group)):
        size = len(class_of_group[gid])
        counts = dict(sig_of_group[gid][2])
        unit = math.gcd(*counts.values()) if counts else 1
        prunable = not sig_of_group[gid][0] and size > 1
        groups.append(ChannelGroup(gid, size, prunable,
                                   _candidates(size, step, max_candidates, unit) if prunable else [size],
                                   members=list(counts)[:4]))

    # ---- layers -------------------------------------------------------------------------
    def space(t: str, axis: int | None) -> tuple[Space, int]:
        """The width of tensor t's channel `axis` as a Space (axis None: every channel axis of an
        attention query, heads x head_dim)."""
        m = maps.get(t)
        shape = shapes.get(t) or []
        if axis is None:
            if m is None:
                c = int(np.prod(shape)) // max(1, shape[0] * shape[-2]) if len(shape) >= 3 else (shape or [1])[-1]
                return Space(fixed=c), c
            ids = m.ids.reshape(-1)
        elif m is None or not set(m.axes) <= {axis}:
            c = shape[axis] if len(shape) > axis else 1
            return Space(fixed=c), c
        else:
            ids = np.broadcast_to(m.ids, [shape[a] if a == axis else 1 for a in range(len(shape))]).reshape(-1)
        sp = Space()
        for g, n in zip(*np.unique(atom_group[ids], return_counts=True)):
            g, n = int(g), int(n)
            if groups[g].prunable:
                sp.terms.append((g, n // groups[g].size))
            else:
                sp.fixed += n
        return sp, len(ids)

    layers: list[Layer] = []
    for node in layer_nodes:
        spec = handler_for(node).layer_spec(node, view)
        in_axis, out_axis = layer_axes[node.name]
        t_in, t_out = layer_io_tensors[node.name]
        cin, dense_in = space(t_in, in_axis)
        cout, dense_out = space(t_out, out_axis)
        layers.append(Layer(node.name, spec, cin, cout, dense_in, dense_out))

    blocks = _find_blocks(graph, shapes, inits)
    node_block = {n: b.id for b in blocks for n in b.branch_nodes}
    for layer in layers:
        layer.block = node_block.get(layer.name)
    # A group is inner to a block when every layer that reads or writes it lies in that block
    # and every node that creates its channels is in the block's branch.
    for g in groups:
        if not g.prunable:
            continue
        owners = {layer.block for layer in layers
                  if any(t[0] == g.id for t in layer.c_in.terms + layer.c_out.terms)}
        origins = set(sig_of_group[g.id][1])
        if len(owners) == 1 and None not in owners:
            b = blocks[owners.pop()]
            if origins <= set(b.branch_nodes):
                g.inner_of_block = b.id

    # A removed block takes its Add with it, so the Add's output counts towards the block.
    overhead_block = dict(node_block, **{b.add_node: b.id for b in blocks})
    overheads = _overheads(graph, shapes, maps, layer_nodes, overhead_block, space, view)
    params: dict[str, list[ParamAxis]] = {}
    for node in graph.node:
        handler = handler_for(node)
        if handler is None or not any(t in maps for t in list(node.input) + list(node.output)):
            continue
        try:
            found = [pa for pa in handler.params(node, view) if pa.tensor in maps]
        except Exception as exc:  # defensive, as in propagation
            notes.append(f"{node.name} ({node.op_type}): parameters not read ({type(exc).__name__}: {exc})")
            continue
        if found:
            params[node.name] = found
    problem = Problem(model_name, groups, layers, blocks, step, overheads)
    return Analysis(model, problem, maps, atom_group, atom_pos, shapes, params, notes, opset, length)


def _layer_tensors(node, view) -> tuple[str, str]:
    """The tensors whose channels are a layer's input and output widths."""
    handler = handler_for(node)
    if hasattr(handler, "layer_tensors"):
        return handler.layer_tensors(node, view)
    return node.input[0], node.output[0]


def _overheads(graph, shapes, maps, layer_nodes, node_block, space, view) -> list[Overhead]:
    """Elements written by non-layer operators, per block, as linear functions of widths.
    BatchNorm right after a conv and the activation after it are fused by ONNX Runtime, so
    they are not counted."""
    from latprune.pruner.ops.layers import FUSABLE_ACTIVATIONS, activation_region

    layer_names = {n.name for n in layer_nodes}
    consumers: dict[str, list] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    fused: set[str] = set()
    for node in layer_nodes:
        tensor = node.output[0]
        chain = consumers.get(tensor, [])
        if len(chain) == 1 and chain[0].op_type in _FUSED_AFTER_CONV:
            fused.add(chain[0].name)
            tensor = chain[0].output[0]
            chain = consumers.get(tensor, [])
        if node.op_type == "Conv" and len(chain) == 1 and chain[0].op_type in FUSABLE_ACTIVATIONS:
            fused.add(chain[0].name)
            continue
        if node.op_type == "MatMul" and len(chain) == 1 and chain[0].op_type == "Add" \
                and any(view.const(i) is not None for i in chain[0].input):
            fused.add(chain[0].name)  # the bias: ONNX Runtime runs MatMul + Add as one Gemm
            tensor = chain[0].output[0]
        # an activation written out in several nodes (SiLU, GELU) runs next to the layer and
        # is timed with it in-graph (latprune.ingraph_profile.layer_names)
        region = activation_region(tensor, view)
        if region is not None:
            fused.update(n.name for n in region[0])
    per_block: dict[int | None, Space] = {}
    for node in graph.node:
        if node.name in layer_names or node.name in fused or node.op_type in FREE_OPS:
            continue
        for t in node.output:
            shp = shapes.get(t)
            if not t or not shp:
                continue
            total = per_block.setdefault(node_block.get(node.name), Space())
            m = maps.get(t)
            if m is not None and m.axis() is not None:
                per_channel = int(np.prod(shp)) // max(shp[m.axis()], 1)
                sp, _ = space(t, m.axis())
                total.fixed += sp.fixed * per_channel
                for g, mult in sp.terms:
                    total.terms.append((g, mult * per_channel))
            else:
                total.fixed += int(np.prod(shp))
    out = []
    for b, sp in per_block.items():
        merged: dict[int, int] = defaultdict(int)
        for g, m in sp.terms:
            merged[g] += m
        out.append(Overhead(b, Space(sp.fixed, sorted(merged.items()))))
    return out


def _find_blocks(graph, shapes, inits) -> list[Block]:
    """Residual Adds whose one input is a branch computed only from the other input."""
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    outputs = {o.name for o in graph.output}
    blocks: list[Block] = []
    for add in graph.node:
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        a, b = add.input
        if shapes.get(a) is None or shapes.get(a) != shapes.get(b):
            continue
        for skip, branch_out in ((a, b), (b, a)):
            nodes = _branch(branch_out, skip, producer, inits)
            if not nodes:
                continue
            names = {n.name for n in nodes}
            internal = {o for n in nodes for o in n.output}
            ok = branch_out not in outputs and all(
                all(c.name in names or (t == branch_out and c is add) for c in consumers[t])
                for t in internal if t not in outputs
            ) and not (internal & outputs)
            if ok:
                blocks.append(Block(len(blocks), add.name, skip, [n.name for n in nodes]))
                break
    return blocks


def _branch(tensor, skip, producer, inits):
    """Nodes that compute `tensor` from `skip` and constants alone, or None."""
    seen: dict[str, onnx.NodeProto] = {}
    stack = [tensor]
    reached_skip = False
    while stack:
        t = stack.pop()
        if t == skip:
            reached_skip = True
            continue
        if t in inits or not t:
            continue
        n = producer.get(t)
        if n is None:
            return None  # reaches a graph input other than skip
        if n.name in seen:
            continue
        seen[n.name] = n
        if len(seen) > 64:
            return None
        stack.extend(n.input)
    if not reached_skip or not seen:
        return None
    return list(seen.values())


def _arrays(analysis: Analysis) -> dict[str, np.ndarray]:
    inits = initializer_arrays(analysis.model)
    for node in analysis.model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            inits[node.output[0]] = inits[node.input[0]]
    return inits


def weight_slices(analysis: Analysis) -> dict[int, list[tuple[str, int, np.ndarray]]]:
    """Per group: (layer node name, channel position, weight slice) for every layer output
    channel that produces a channel of the group: the numpy input of solver.importance."""
    inits = _arrays(analysis)
    out: dict[int, list[tuple[str, int, np.ndarray]]] = defaultdict(list)
    for gid, rows in analysis.source_rows.items():
        for node_name, w_name, axis, p, pos in rows:
            out[gid].append((node_name, pos, np.take(inits[w_name], p, axis=axis)))
    return dict(out)


def consumer_slices(analysis: Analysis) -> dict[int, list[ConsumerRow]]:
    """Per group: where its channels are *read* by a layer (ConsumerRow). Pruning channel c of
    a group is exactly zeroing every listed input position with group position c (nothing else
    reads it). A Flatten into a Gemm lists one row per feature (channel × spatial position).
    Channel-preserving (depthwise) layers are listed too."""
    view = analysis.view()
    out: dict[int, list[ConsumerRow]] = defaultdict(list)
    by_name = {n.name: n for n in analysis.model.graph.node}
    for layer in analysis.problem.layers:
        node = by_name[layer.name]
        x = node.input[0]
        hit = analysis.group_positions(x)
        if hit is None:
            continue
        axis = analysis.channel_axis(x)
        reads = [pa for pa in analysis.params.get(node.name, []) if pa.role == "consume" and pa.tensor == x]
        weight, w_axis = (node.input[reads[0].index], reads[0].param_axis) if reads else (None, None)
        if weight is None and handler_for(node).channel_preserving(node, view):
            continue
        for p, (g, q) in enumerate(zip(*hit)):
            out[int(g)].append(ConsumerRow(layer.name, x, axis, p, weight, w_axis, int(q)))
    return dict(out)


def _attr(node: onnx.NodeProto, name: str, default=None):
    """Attribute value of `node` (kept for callers of the old name; see pruner.ops.attr)."""
    return attr(node, name, default)
