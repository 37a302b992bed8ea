"""Graph analysis: channel groups, removable blocks and layer specs of an ONNX CNN.

Method. Every tensor with a channel axis (axis 1 of an N×C×... tensor, or the feature axis of
an N×F matrix) gets one *atom* per channel. Operators either pass atoms through (ReLU,
BatchNorm, pooling, depthwise conv), create new ones (conv/gemm outputs, graph inputs, the
zeros a channel-axis Pad inserts), rearrange them (Concat, Split, Slice, Flatten) or tie them
(a residual Add unites the atoms of its two inputs, channel by channel). A union-find over
atoms yields *classes*: channels that must be kept or removed together. Classes with the same
origin (the same producing nodes, the same set of layer inputs/outputs they appear in) form
one *channel group*, whose width the solver chooses.

Anything not understood marks the atoms it touches as fixed (non-prunable); it never raises.
Graph inputs and outputs are fixed too: pruning never changes the model's interface.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from latprune.types import Block, ChannelGroup, Layer, LayerSpec, Overhead, Problem, Space
from latprune.pruner.model_io import initializer_arrays, normalise, tensor_shapes, with_static_shapes

UNARY_PASSTHROUGH = {
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish", "Elu",
    "Selu", "Celu", "Softplus", "Softsign", "Gelu", "Erf", "Abs", "Neg", "Exp", "Log", "Sqrt",
    "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Mish", "ThresholdedRelu", "Identity",
    "Dropout", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool",
    "GlobalLpPool", "Resize", "Upsample", "BatchNormalization", "InstanceNormalization",
    "Cast", "Not",
}
BINARY_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "Sum", "Mean", "Where"}
# Unary ops that ONNX Runtime fuses into the preceding Conv on the CPU.
FUSABLE_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid"}
SHAPE_ONLY = {"Shape", "Size"}
LAYER_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


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


@dataclass
class Analysis:
    """The result of `analyse`: the Problem plus what surgery needs to apply a Plan."""

    model: onnx.ModelProto  # normalised copy (Constants folded into initializers)
    problem: Problem
    atoms: dict[str, np.ndarray]  # tensor name -> atom id per channel position
    uf: _UnionFind
    class_of_group: dict[int, list[int]]  # group id -> class roots, in channel order
    group_of_class: dict[int, tuple[int, int]]  # class root -> (group id, position)
    shapes: dict[str, list[int] | None]
    source_rows: dict[int, list[tuple[str, str, int]]] = field(default_factory=dict)
    # group id -> [(layer node, weight name, weight axis, channel index in the layer output,
    #              channel position in the group)]
    notes: list[str] = field(default_factory=list)

    def kept_positions(self, tensor: str, kept_classes: set[int]) -> np.ndarray:
        """Positions along `tensor`'s channel axis whose class survives the plan."""
        atoms = self.atoms[tensor]
        return np.array(
            [p for p, a in enumerate(atoms) if self.uf.find(int(a)) in kept_classes], dtype=np.int64
        )


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _const_ints(inits: dict[str, np.ndarray], name: str) -> list[int] | None:
    if name in inits:
        return [int(v) for v in np.asarray(inits[name]).reshape(-1)]
    return None


def analyse(model: onnx.ModelProto, step: int = 8, max_candidates: int = 16,
            model_name: str = "model") -> Analysis:
    """Find channel groups, removable blocks and layer specs of `model` (validated ONNX)."""
    model = normalise(model)
    static = with_static_shapes(model)
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

    uf = _UnionFind()
    atoms: dict[str, np.ndarray] = {}
    fixed: set[int] = set()
    origin: dict[int, str] = {}  # atom -> node (or input) that created it
    notes: list[str] = []

    def new_atoms(n: int, creator: str) -> np.ndarray:
        arr = uf.new(n)
        for a in arr:
            origin[int(a)] = creator
        return arr

    def chan(t: str) -> int | None:
        s = shapes.get(t)
        if s is None or len(s) < 2:
            return None
        return s[1]

    def fix_tensor(t: str) -> None:
        if t in atoms:
            fixed.update(int(a) for a in atoms[t])

    def fix_node(node: onnx.NodeProto, why: str) -> None:
        for t in list(node.input) + list(node.output):
            fix_tensor(t)
        for t in node.output:
            if t and t not in atoms and chan(t):
                atoms[t] = new_atoms(chan(t), node.name)
                fix_tensor(t)
        notes.append(f"{node.name} ({node.op_type}): {why}; its channels are not pruned")

    for inp in graph.input:
        c = chan(inp.name)
        if c:
            atoms[inp.name] = new_atoms(c, f"input:{inp.name}")
            fix_tensor(inp.name)

    layer_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        op = node.op_type
        ins = [i for i in node.input]
        x = ins[0] if ins else ""
        out = node.output[0] if node.output else ""
        if op == "Identity" and x in inits:
            continue
        if all((i in inits or not i) for i in ins) and op not in ("Shape", "Size"):
            # Pure constant computation: no channels involved. Leave untouched.
            if chan(out):
                atoms[out] = new_atoms(chan(out), node.name)
                fix_tensor(out)
            continue
        try:
            handled = _handle(node, op, ins, x, out, atoms, inits, shapes, uf, new_atoms, chan,
                              fixed, layer_nodes)
        except Exception as exc:  # defensive: analysis never crashes the run
            handled = f"analysis error {type(exc).__name__}: {exc}"
        if handled is not True:
            fix_node(node, handled if isinstance(handled, str) else f"operator {op} not understood")

    for o in graph.output:
        fix_tensor(o.name)

    # ---- classes -> groups ------------------------------------------------------------
    layer_io: list[str] = []
    for node in layer_nodes:
        layer_io.append(node.input[0])
        layer_io.append(node.output[0])
    class_tensor_counts: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for t in dict.fromkeys(layer_io):
        if t in atoms:
            for a in atoms[t]:
                class_tensor_counts[uf.find(int(a))][t] += 1
    class_origins: dict[int, set[str]] = defaultdict(set)
    class_fixed: dict[int, bool] = defaultdict(bool)
    first_pos: dict[int, tuple[int, int]] = {}
    for a in range(len(uf.parent)):
        r = uf.find(a)
        class_origins[r].add(origin.get(a, "?"))
        if a in fixed:
            class_fixed[r] = True
    order = 0
    for t, arr in atoms.items():  # channel order: first tensor (topological) that holds a class
        for p, a in enumerate(arr):
            r = uf.find(int(a))
            if r not in first_pos:
                first_pos[r] = (order, p)
        order += 1
    signature_to_group: dict[tuple, int] = {}
    class_of_group: dict[int, list[int]] = defaultdict(list)
    for r in sorted(first_pos, key=lambda r: first_pos[r]):
        sig = (
            class_fixed[r],
            tuple(sorted(class_origins[r])),
            tuple(sorted(class_tensor_counts[r].items())),
        )
        gid = signature_to_group.setdefault(sig, len(signature_to_group))
        class_of_group[gid].append(r)
    group_of_class = {r: (g, i) for g, rs in class_of_group.items() for i, r in enumerate(rs)}
    sig_of_group = {g: s for s, g in signature_to_group.items()}

    groups: list[ChannelGroup] = []
    for gid in range(len(signature_to_group)):
        size = len(class_of_group[gid])
        prunable = not sig_of_group[gid][0] and size > 1
        members = [f"{t}" for t, _ in sig_of_group[gid][2]][:4]
        groups.append(ChannelGroup(gid, size, prunable, _candidates(size, step, max_candidates)
                                   if prunable else [size], members=members))

    # ---- layers -------------------------------------------------------------------------
    def space(t: str, mult_div: int = 1) -> tuple[Space, int]:
        if t not in atoms:
            c = chan(t) or 1
            return Space(fixed=c), c
        counts: dict[int, int] = defaultdict(int)
        for a in atoms[t]:
            counts[group_of_class[uf.find(int(a))][0]] += 1
        sp = Space()
        for g, n in sorted(counts.items()):
            if groups[g].prunable:
                sp.terms.append((g, n // groups[g].size))
            else:
                sp.fixed += n
        return sp, len(atoms[t])

    layers: list[Layer] = []
    for node in layer_nodes:
        spec = _layer_spec(node, shapes, inits, graph)
        cin, dense_in = space(node.input[0])
        cout, dense_out = space(node.output[0])
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
    overheads = _overheads(graph, shapes, atoms, layer_nodes, overhead_block, space)
    source_rows = _source_rows(graph, inits, atoms, uf, group_of_class, layer_nodes)
    problem = Problem(model_name, groups, layers, blocks, step, overheads)
    return Analysis(model, problem, atoms, uf, dict(class_of_group), group_of_class, shapes,
                    source_rows, notes)


# Operators that move no data in ONNX Runtime (views, shape arithmetic).
FREE_OPS = {"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Shape", "Size", "Dropout"}


def _overheads(graph, shapes, atoms, layer_nodes, node_block, space) -> list[Overhead]:
    """Elements written by non-layer operators, per block, as linear functions of widths.
    BatchNorm right after a conv and the activation after it are fused by ONNX Runtime, so
    they are not counted."""
    layer_names = {n.name for n in layer_nodes}
    consumers: dict[str, list] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    fused: set[str] = set()
    for node in layer_nodes:
        chain = consumers.get(node.output[0], [])
        if len(chain) == 1 and chain[0].op_type == "BatchNormalization":
            fused.add(chain[0].name)
            chain = consumers.get(chain[0].output[0], [])
        if node.op_type == "Conv" and len(chain) == 1 and chain[0].op_type in FUSABLE_ACTIVATIONS:
            fused.add(chain[0].name)
    per_block: dict[int | None, Space] = {}
    for node in graph.node:
        if node.name in layer_names or node.name in fused or node.op_type in FREE_OPS:
            continue
        for t in node.output:
            shp = shapes.get(t)
            if not t or not shp:
                continue
            per_channel = int(np.prod(shp)) // max(shp[1], 1) if len(shp) >= 2 else int(np.prod(shp))
            total = per_block.setdefault(node_block.get(node.name), Space())
            if t in atoms and len(shp) >= 2:
                sp, _ = space(t)
                total.fixed += sp.fixed * per_channel
                for g, m in sp.terms:
                    total.terms.append((g, m * per_channel))
            else:
                total.fixed += int(np.prod(shp))
    out = []
    for b, sp in per_block.items():
        merged: dict[int, int] = defaultdict(int)
        for g, m in sp.terms:
            merged[g] += m
        out.append(Overhead(b, Space(sp.fixed, sorted(merged.items()))))
    return out


def _candidates(size: int, step: int, max_candidates: int) -> list[int]:
    """Candidate widths: multiples of `step` up to `size`, plus `size`; at most
    `max_candidates`, evenly spread, always including the smallest and `size`."""
    if size <= step:
        return [size]
    widths = list(range(step, size, step)) + [size]
    if len(widths) > max_candidates:
        idx = np.unique(np.round(np.linspace(0, len(widths) - 1, max_candidates)).astype(int))
        widths = [widths[i] for i in idx]
    return widths


def _handle(node, op, ins, x, out, atoms, inits, shapes, uf, new_atoms, chan, fixed,
            layer_nodes):
    """Propagate atoms through one node. Return True when understood, else a reason."""

    def rank(t):
        s = shapes.get(t)
        return None if s is None else len(s)

    if op in SHAPE_ONLY:
        return True
    if op in UNARY_PASSTHROUGH:
        if x not in atoms:
            return True if not chan(out) else "input channels unknown"
        if rank(out) != rank(x) or chan(out) != len(atoms[x]):
            return "changes the channel count"
        if op == "Resize" and len(ins) >= 4 and ins[3]:
            sizes = _const_ints(inits, ins[3])
            if sizes is None or len(sizes) < 2 or sizes[1] != len(atoms[x]):
                return "Resize with non-constant sizes"
        if op == "PRelu":
            slope = inits.get(ins[1])
            if slope is None or (slope.size not in (1, len(atoms[x])) and slope.ndim > 0):
                return "PRelu slope not per-channel"
        atoms[out] = atoms[x]
        for extra in node.output[1:]:  # e.g. MaxPool indices, Dropout mask: fixed
            if extra and chan(extra):
                atoms[extra] = atoms[x]
                fixed.update(int(a) for a in atoms[x])
        return True
    if op in ("Conv", "ConvTranspose"):
        w = inits.get(ins[1])
        if w is None or x not in atoms:
            return "weights are not an initializer" if w is None else "input channels unknown"
        if len(ins) > 2 and ins[2] and ins[2] not in inits:
            return "bias is not an initializer"
        group = int(_attr(node, "group", 1))
        c_in = len(atoms[x])
        c_out = chan(out)
        if c_out is None:
            return "output shape unknown"
        if op == "Conv" and group > 1 and group == c_in and c_out == c_in and w.shape[1] == 1:
            atoms[out] = atoms[x]  # depthwise: output channel i is input channel i
            layer_nodes.append(node)
            return True
        if group != 1:
            return f"grouped convolution (group={group})"
        atoms[out] = new_atoms(c_out, node.name)
        layer_nodes.append(node)
        return True
    if op in ("Gemm", "MatMul"):
        w = inits.get(ins[1])
        if w is None or x not in atoms or rank(x) != 2 or w.ndim != 2:
            return "not a matrix product of a 2-D input with a weight initializer"
        if op == "Gemm" and int(_attr(node, "transA", 0)):
            return "Gemm with transA"
        if op == "Gemm" and len(ins) > 2 and ins[2] and ins[2] not in inits:
            return "bias is not an initializer"
        atoms[out] = new_atoms(chan(out), node.name)
        layer_nodes.append(node)
        return True
    if op in ("Flatten", "Reshape", "Squeeze", "Unsqueeze"):
        if x not in atoms:
            return True if not chan(out) else "input channels unknown"
        s_in, s_out = shapes.get(x), shapes.get(out)
        if s_in is None or s_out is None:
            return "shape unknown"
        if op == "Flatten" and int(_attr(node, "axis", 1)) != 1:
            return "Flatten axis other than 1"
        if len(s_out) == 2 and s_out[0] == s_in[0] and s_out[1] == int(np.prod(s_in[1:])):
            atoms[out] = np.repeat(atoms[x], int(np.prod(s_in[2:])))  # channel-major features
            return True
        if len(s_out) >= 2 and s_out[:2] == s_in[:2] and op in ("Squeeze", "Unsqueeze"):
            atoms[out] = atoms[x]
            return True
        return "reshape that moves the channel axis"
    if op in BINARY_ELEMENTWISE:
        return _binary(node, op, ins, out, atoms, inits, shapes, uf, chan)
    if op == "Concat":
        axis = int(_attr(node, "axis", 1))
        if axis < 0:
            axis += rank(out) or 0
        if axis != 1:
            return _binary(node, op, ins, out, atoms, inits, shapes, uf, chan)
        parts = []
        for i in ins:
            if i not in atoms:
                return "concatenates a tensor with unknown channels"
            parts.append(atoms[i])
        atoms[out] = np.concatenate(parts)
        return True
    if op == "Split":
        axis = int(_attr(node, "axis", 0))
        if x not in atoms:
            return "input channels unknown"
        if axis < 0:
            axis += rank(x)
        if axis != 1:
            for o in node.output:
                atoms[o] = atoms[x]
            return True
        start = 0
        for o in node.output:
            c = chan(o)
            if c is None:
                return "output shape unknown"
            atoms[o] = atoms[x][start:start + c]
            start += c
        return True
    if op == "Slice":
        if x not in atoms:
            return "input channels unknown"
        starts = _const_ints(inits, ins[1])
        ends = _const_ints(inits, ins[2])
        axes = _const_ints(inits, ins[3]) if len(ins) > 3 and ins[3] else list(range(len(starts or [])))
        steps = _const_ints(inits, ins[4]) if len(ins) > 4 and ins[4] else [1] * len(starts or [])
        if starts is None or ends is None or axes is None or steps is None:
            return "Slice with non-constant bounds"
        r = rank(x)
        axes = [a + r if a < 0 else a for a in axes]
        if 1 not in axes:
            atoms[out] = atoms[x]
            return True
        k = axes.index(1)
        if steps[k] != 1:
            return "strided Slice on the channel axis"
        c = len(atoms[x])
        s, e = starts[k], ends[k]
        s = max(0, min(c, s + c if s < 0 else s))
        e = max(0, min(c, e + c if e < 0 else e))
        atoms[out] = atoms[x][s:e]
        return True
    if op == "Pad":
        if x not in atoms:
            return "input channels unknown"
        mode = _attr(node, "mode", b"constant")
        if isinstance(mode, bytes):
            mode = mode.decode()
        pads = _const_ints(inits, ins[1]) if len(ins) > 1 and ins[1] else _attr(node, "pads")
        if pads is None:
            return "Pad with non-constant pads"
        pads = list(pads)
        r = rank(x)
        if len(ins) > 3 and ins[3]:
            axes = _const_ints(inits, ins[3])
            if axes is None:
                return "Pad with non-constant axes"
            full = [0] * (2 * r)
            for i, a in enumerate(axes):
                a = a + r if a < 0 else a
                full[a], full[a + r] = pads[i], pads[i + len(axes)]
            pads = full
        before, after = pads[1], pads[1 + r]
        if before == 0 and after == 0:
            atoms[out] = atoms[x]
            return True
        if mode != "constant" or before < 0 or after < 0:
            return "non-constant or negative Pad on the channel axis"
        atoms[out] = np.concatenate([new_atoms(before, node.name), atoms[x],
                                     new_atoms(after, node.name)])
        return True
    return f"operator {op} not understood"


def _binary(node, op, ins, out, atoms, inits, shapes, uf, chan):
    """Elementwise op with broadcasting: tie the channel atoms of inputs that carry them."""
    r_out = len(shapes[out]) if shapes.get(out) else None
    if r_out is None or r_out < 2:
        return "output shape unknown"
    c_out = shapes[out][1]
    carriers = []
    for i in ins:
        if not i:
            continue
        s = shapes.get(i)
        if i in atoms and s is not None and len(s) == r_out and s[1] == c_out:
            carriers.append(atoms[i])
            continue
        if s is None:
            return "operand shape unknown"
        # Broadcast operand: right-aligned; its channel dim must be absent or 1 or a
        # per-channel constant (which surgery slices).
        offset = r_out - len(s)
        cdim = 1 - offset
        if cdim < 0 or s[cdim] == 1:
            continue
        if s[cdim] == c_out and i in inits:
            continue
        return "operand broadcasts along channels without being a constant"
    if not carriers:
        return "no operand carries channels"
    for other in carriers[1:]:
        for a, b in zip(carriers[0], other):
            uf.union(int(a), int(b))
    atoms[out] = carriers[0]
    return True


def _layer_spec(node, shapes, inits, graph) -> LayerSpec:
    op = node.op_type
    x = node.input[0]
    s_in = shapes.get(x) or [1, 1]
    batch = s_in[0]
    consumers = [n for n in graph.node if node.output[0] in n.input]
    act = ""
    # ORT folds a following BatchNormalization into the conv, then fuses an activation.
    chain = consumers
    if len(chain) == 1 and chain[0].op_type == "BatchNormalization":
        chain = [n for n in graph.node if chain[0].output[0] in n.input]
    if op == "Conv" and len(chain) == 1 and chain[0].op_type in FUSABLE_ACTIVATIONS:
        act = chain[0].op_type
    if op in ("Gemm", "MatMul"):
        return LayerSpec("Gemm", [], [], [], [], False, [], batch, activation="",
                         has_bias=len(node.input) > 2 and bool(node.input[2]))
    w = inits[node.input[1]]
    k = list(w.shape[2:])
    nd = len(k)
    group = int(_attr(node, "group", 1))
    depthwise = op == "Conv" and group > 1 and w.shape[1] == 1 and group == s_in[1]
    return LayerSpec(
        op=op,
        kernel=k,
        stride=list(_attr(node, "strides", [1] * nd)),
        pads=list(_attr(node, "pads", [0] * (2 * nd))),
        dilation=list(_attr(node, "dilations", [1] * nd)),
        depthwise=bool(depthwise),
        input_hw=list(s_in[2:]),
        batch=batch,
        activation=act,
        has_bias=len(node.input) > 2 and bool(node.input[2]),
        fixed_groups=1 if depthwise else group,
    )


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


def _source_rows(graph, inits, atoms, uf, group_of_class, layer_nodes):
    """For each group: (weight name, axis, index) of the weight slices that produce each
    channel, so importance can be computed from numpy arrays alone."""
    rows: dict[int, list[tuple[str, str, int, int, int]]] = defaultdict(list)
    for node in layer_nodes:
        out = node.output[0]
        if out not in atoms:
            continue
        w_name = node.input[1]
        op = node.op_type
        for p, a in enumerate(atoms[out]):
            g, pos = group_of_class[uf.find(int(a))]
            axis = 1 if op == "ConvTranspose" or (op != "Conv" and not int(_attr(node, "transB", 0))) else 0
            rows[g].append((node.name, w_name, axis, p, pos))
    return dict(rows)


def weight_slices(analysis: Analysis) -> dict[int, list[tuple[str, int, np.ndarray]]]:
    """Per group: (layer node name, channel position, weight slice) for every layer output
    channel that produces a channel of the group: the numpy input of solver.importance."""
    inits = initializer_arrays(analysis.model)
    for node in analysis.model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            inits[node.output[0]] = inits[node.input[0]]
    out: dict[int, list[tuple[str, int, np.ndarray]]] = defaultdict(list)
    for gid, rows in analysis.source_rows.items():
        for node_name, w_name, axis, p, pos in rows:
            out[gid].append((node_name, pos, np.take(inits[w_name], p, axis=axis)))
    return dict(out)


def consumer_slices(analysis: Analysis) -> dict[int, list[tuple[str, str, int, str, int, int]]]:
    """Per group: where its channels are *read* by a layer, as (layer node name, input tensor,
    position along the tensor's channel axis, weight name, weight axis of that input channel,
    channel position in the group). Pruning channel c of a group is exactly zeroing position p
    of every listed input tensor with group position c (nothing else reads it).
    A Flatten into a Gemm lists one row per feature (channel × spatial position)."""
    by_name = {n.name: n for n in analysis.model.graph.node}
    uf, group_of_class = analysis.uf, analysis.group_of_class
    out: dict[int, list[tuple[str, str, int, str, int, int]]] = defaultdict(list)
    for layer in analysis.problem.layers:
        node = by_name[layer.name]
        x = node.input[0]
        if x not in analysis.atoms:
            continue
        op = node.op_type
        if op == "Conv":
            axis = 0 if layer.spec.depthwise else 1
        elif op == "ConvTranspose":
            axis = 0
        elif op == "Gemm":
            axis = 1 if int(_attr(node, "transB", 0)) else 0
        else:  # MatMul with a [K, N] weight
            axis = 0
        for p, a in enumerate(analysis.atoms[x]):
            hit = group_of_class.get(uf.find(int(a)))
            if hit is not None:
                out[hit[0]].append((layer.name, x, p, node.input[1], axis, hit[1]))
    return dict(out)
