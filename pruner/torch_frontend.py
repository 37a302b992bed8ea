"""The torch frontend: latency-budgeted pruning of an ``nn.Module`` (needs torch; import lazily).

Route: **export, analyse the ONNX graph, train the full-width module, cut by ONNX surgery.**
There is no second (torch) dependency analyser:

1. `export_with_names` exports the module with torch's TorchScript exporter so that every
   initializer keeps its parameter/buffer name (``layer1.0.conv1.weight``, ``...bn1.running_var``)
   and BatchNormalization stays a node of its own (not folded into the conv).
2. `analyse_module` runs the ONNX analyser (pruner.analysis) on that export: the same channel
   groups, removable blocks, layer specs and the same `Problem` type as the ONNX path, so the
   latency tables, importance estimators and every solver apply unchanged. It maps the
   analysis back onto the module: `TorchPruneGraph.param_slices[g]` lists every module tensor
   and index that holds group g's channels, as producer (conv/linear out-channels, their bias,
   BN weight/bias/running stats, per-channel additive constants) and as consumer (the next
   layer's in-channels, linear in-features after a flatten).
3. Training happens on the full-width module (`pruner.dpm` decays or masks the channels the
   plan removes, through `param_slices`); the module's shapes are never edited, which is why a
   hard-coded zero-padding shortcut (the CIFAR ResNets' option A, which broke Torch-Pruning
   1.6.1) is no problem.
4. `export_pruned` writes the module's *current* weights into the analysed graph and applies
   the Plan with pruner.surgery: a valid, smaller ONNX model.

Why this route rather than a torch analyser (Torch-Pruning style): one analyser means the
torch and ONNX paths cannot disagree about groups; the surgery that already handles Pad,
Slice, Concat, Split, flatten-into-Gemm and residual chains needs no torch twin; and users
get an ONNX file, which is what is measured on the device anyway. The cost: the model must
export with the TorchScript exporter, and the pruned result is an ONNX model, not a smaller
``nn.Module`` (fine-tune before cutting; after cutting, `pruner.onnx_torch.OnnxTorch` can
still train the ONNX graph in torch).

Exporter choice. ``torch.onnx.export(..., dynamo=False, training=TrainingMode.PRESERVE,
do_constant_folding=False)`` with the module in eval mode: the TorchScript exporter names
initializers by their ``state_dict`` keys; PRESERVE (module in eval) and no constant folding
keep Conv and BatchNormalization apart (the default eval export, which ``bench/models.py``
uses, folds BN into the conv weights under ``onnx::Conv_NNN`` names);
``keep_initializers_as_inputs=True`` skips the exporter's deduplication of initializers with
equal values (which would alias, e.g., every freshly initialised BN weight to the first one
through Identity nodes); the initializer inputs are removed again. Shape subgraphs left
unfolded are folded by the analyser's normaliser (pruner.model_io.normalise). The dynamo
exporter would need ``onnxscript`` and names its graph differently; it is not used.

Same Problem as the ONNX path. On the CIFAR ResNets the analysis of this export and of the
BN-folded export have the same groups (sizes, order, channel positions), blocks and layers;
one spec field differs: a conv followed by a BN has no bias here but a bias in the folded
export. ONNX Runtime folds the BN into the conv at session creation, so the timed kernel has a
bias; `analyse_module` sets ``has_bias`` for such convs so the LayerSpec signatures, hence the
latency-table cells, are the same (`structure_differences` compares two analyses).
The L1 magnitude prior is computed on the BN-folded weights (row p of a conv scaled by the
following BN's γ_p/σ_p, `_folded_weight_slices`), i.e. on what the ONNX path sees in a folded
export; on raw conv weights the trained ResNet-56's plan would differ (in our check, 27 of 27
groups kept other channels and 4 widths moved). Left different, by design: a block's
`branch_nodes` also list its BN nodes, and importances agree to float rounding only.
`optimize_module` plans on a BN-folded export (the ONNX path's exact input, so the same plan by
construction, and the latency is measured on the file users would deploy) and maps the plan onto
the named analysis after checking that both have the same structure (`structure_differences`).

Gradient importance: `taylor_importance` and `fisher_curves` run solver.gradients (first-order
Taylor on BN; Gauss-Newton distortion curves) on the analysed graph with the module's current
weights.
"""
from __future__ import annotations

import copy
import dataclasses
import io
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from latprune.types import InputError, Plan
from latprune.pruner.analysis import Analysis, _attr, analyse, consumer_slices

OPSET = 17


def _torch(purpose: str = "the torch frontend"):
    """torch, or a clear InputError saying what needs it."""
    try:
        import torch
    except ImportError:  # pragma: no cover - depends on the environment
        raise InputError(f"{purpose} needs PyTorch: pip install 'latprune[torch]'") from None
    return torch


# ---- export --------------------------------------------------------------------------------

def _as_tuple(example_inputs) -> tuple:
    torch = _torch()
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise InputError("example_inputs must be a tensor or a tuple of tensors")


def _io_names(n_in: int, module, inputs, input_names, output_names) -> tuple[list[str], list[str] | None]:
    if input_names is None:
        input_names = ["input"] if n_in == 1 else [f"input_{i}" for i in range(n_in)]
    return list(input_names), (list(output_names) if output_names is not None else None)


def _export(module, inputs: tuple, fold_bn: bool, input_names, output_names) -> onnx.ModelProto:
    torch = _torch()
    was_training = {m: m.training for m in module.modules()}
    module.eval()
    buf = io.BytesIO()
    kwargs: dict[str, Any] = dict(dynamo=False, opset_version=OPSET, input_names=input_names,
                                  export_params=True)
    if output_names is not None:
        kwargs["output_names"] = output_names
    if fold_bn:  # bench/models.py's export: eval mode, constant folding (BN folded into convs)
        kwargs.update(do_constant_folding=True)
    else:
        # keep_initializers_as_inputs=True skips the exporter's deduplication of initializers
        # with equal values (which would alias e.g. every freshly initialised BN weight to one
        # tensor through Identity nodes); the inputs are dropped again below.
        kwargs.update(do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE,
                      keep_initializers_as_inputs=True)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy-exporter deprecation, Slice folding
            torch.onnx.export(module, inputs, buf, **kwargs)
    except Exception as exc:
        raise InputError(f"torch.onnx.export failed: {type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
    finally:
        for m, mode in was_training.items():
            m.train(mode)
    model = onnx.load_from_string(buf.getvalue())
    inits = {i.name for i in model.graph.initializer}
    real = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(real)
    return model


def _verify_ort(module, inputs: tuple, model: onnx.ModelProto, rtol: float = 1e-4) -> float:
    """Max abs difference between ONNX Runtime and the module (eval mode) on `inputs`; raise
    InputError above rtol × the output's magnitude."""
    import onnxruntime as ort

    torch = _torch()
    was_training = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            expected = module(*inputs)
    finally:
        for m, mode in was_training.items():
            m.train(mode)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), inputs)}
    got = sess.run(None, feeds)
    worst = 0.0
    for g, e in zip(got, expected):
        e = e.detach().cpu().numpy()
        if g.shape != e.shape:
            raise InputError(f"exported model's output shape {g.shape} differs from the module's {e.shape}")
        err = float(np.max(np.abs(g - e))) if e.size else 0.0
        if not err <= rtol * (float(np.max(np.abs(e))) if e.size else 0.0) + 1e-6:
            raise InputError(f"exported model differs from the module by {err:.3g} (ONNX Runtime vs torch)")
        worst = max(worst, err)
    return worst


def export_with_names(module, example_inputs, path: str | Path | None = None, verify: bool = True,
                      input_names: list[str] | None = None,
                      output_names: list[str] | None = None) -> onnx.ModelProto:
    """Export `module` (evaluated in eval mode; its training flags are restored) at the static
    shapes of `example_inputs` (a tensor or tuple of tensors) to ONNX opset 17, keeping the
    parameter/buffer names as initializer names and BatchNormalization unfolded (module doc).

    Inputs are named ``input`` (``input_0``, ... for several), outputs as the exporter names
    them unless `output_names` is given. `verify`: run ONNX Runtime on `example_inputs` and
    require the module's outputs to 1e-4 of their magnitude. Writes `path` when given.
    """
    return _export_checked(module, example_inputs, False, path, verify, input_names, output_names)


def export_folded(module, example_inputs, path: str | Path | None = None, verify: bool = True,
                  input_names: list[str] | None = None,
                  output_names: list[str] | None = None) -> onnx.ModelProto:
    """The deployment export of the ONNX path (bench/models.py): eval mode, constant folding,
    BatchNormalization folded into the convs. Names of folded weights are lost."""
    return _export_checked(module, example_inputs, True, path, verify, input_names, output_names)


def _export_checked(module, example_inputs, folded: bool, path, verify: bool, input_names,
                    output_names) -> onnx.ModelProto:
    inputs = _as_tuple(example_inputs)
    input_names, output_names = _io_names(len(inputs), module, inputs, input_names, output_names)
    model = _export(module, inputs, folded, input_names, output_names)
    if verify:
        _verify_ort(module, inputs, model)
    if path is not None:
        _save(model, path)
    return model


def _save(model: onnx.ModelProto, path: str | Path) -> None:
    from latprune.pruner.model_io import save_model_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model_atomic(model, path)


# ---- analysis mapped onto the module ------------------------------------------------------------

@dataclass
class ParamSlice:
    """Positions of one module tensor that hold channels of one group.

    `name`: the module's parameter/buffer name (``module.get_parameter(name)`` or a buffer),
    `onnx_name`: the initializer it came from, `node`: the ONNX node that reads it.
    `role`: ``producer`` (it makes the channel's value: zeroing every producer with
    ``decays`` makes the channel exactly 0 everywhere) or ``consumer`` (a layer reading the
    channel: its input-channel weights). `kind`: weight | bias | bn_weight | bn_bias | bn_mean
    | bn_var | const. Position `index[i]` along `axis` holds group channel `positions[i]`.
    `decays`: DPM rescales it (layer weights and biases, BN weight and bias, additive
    constants); running statistics, multiplicative constants and consumers are listed only.
    """

    name: str
    onnx_name: str
    node: str
    role: str
    kind: str
    axis: int
    index: np.ndarray
    positions: np.ndarray
    decays: bool


@dataclass
class TorchPruneGraph:
    """`analyse_module`'s result: the module, its export and analysis, and the group → module
    tensor map. `analysis.problem` is the Problem the ONNX path builds for the same graph."""

    module: Any
    example_inputs: tuple
    onnx: onnx.ModelProto  # the export (before normalisation)
    analysis: Analysis
    param_slices: dict[int, list[ParamSlice]]  # prunable group id -> slices
    block_slices: dict[int, list[ParamSlice]] = field(default_factory=dict)  # block -> branch output producers
    names: dict[str, str] = field(default_factory=dict)  # ONNX initializer -> module tensor name
    notes: list[str] = field(default_factory=list)
    # initializers that are a module tensor transposed (an nn.Linear weight read by MatMul as
    # Wᵀ; the exporter writes Transpose(W), which normalisation folds into a constant)
    transposed: set[str] = field(default_factory=set)


    @property
    def problem(self):
        return self.analysis.problem

    def tensors(self) -> dict[str, Any]:
        """The module's parameters and buffers by name (live tensors)."""
        out = dict(self.module.named_buffers())
        out.update(dict(self.module.named_parameters()))
        return out


def _module_tensors(module) -> dict[str, Any]:
    out = dict(module.named_buffers())
    out.update(dict(module.named_parameters()))
    return out


def _name_map(model: onnx.ModelProto, module, raw: onnx.ModelProto | None = None) -> tuple[dict[str, str], set[str]]:
    """(ONNX initializer (and Identity alias) name -> module tensor name, the initializers that
    are a module tensor transposed). The TorchScript exporter names initializers by their
    state-dict keys; an nn.Linear on a (B, N, C) input is exported as MatMul(x, Transpose(W)),
    whose folded constant keeps the Transpose's output name (read from the `raw` export). An
    initializer with any other name (a constant built in forward) is not a module tensor. No
    match by value: a constant that happens to equal a parameter must not follow it through
    training."""
    tensors = _module_tensors(module)
    names = {i.name: i.name for i in model.graph.initializer if i.name in tensors}
    transposed: set[str] = set()
    inits = {i.name for i in model.graph.initializer}
    for node in (raw or model).graph.node:
        if node.op_type == "Transpose" and node.input[0] in tensors and node.output[0] in inits \
                and tensors[node.input[0]].dim() == 2 and list(_attr(node, "perm", [1, 0])) == [1, 0]:
            names[node.output[0]] = node.input[0]
            transposed.add(node.output[0])
    for node in model.graph.node:  # shared weights: Identity(initializer)
        if node.op_type == "Identity" and node.input[0] in names and node.output[0] not in names:
            names[node.output[0]] = names[node.input[0]]
    return names, transposed


def _patch_bn_bias(analysis: Analysis) -> None:
    """A conv whose only consumer is a BatchNormalization runs with a bias once ONNX Runtime
    folds the BN into it (and the BN-folded export writes that bias): set has_bias so the
    LayerSpec signature is the ONNX path's."""
    graph = analysis.model.graph
    consumers: dict[str, list] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    by_name = {n.name: n for n in graph.node}
    for layer in analysis.problem.layers:
        node = by_name[layer.name]
        if node.op_type not in ("Conv", "ConvTranspose"):
            continue
        chain = consumers.get(node.output[0], [])
        if len(chain) == 1 and chain[0].op_type == "BatchNormalization":
            layer.spec.has_bias = True


def _folded_weight_slices(analysis: Analysis) -> dict[int, list[tuple[str, int, np.ndarray]]]:
    """pruner.analysis.weight_slices with each BatchNormalization that directly follows a conv
    folded in (row p scaled by γ_p / sqrt(var_p + ε)): the slices the ONNX path sees in a
    BN-folded export, so the magnitude prior (and the plan) is the same."""
    from latprune.pruner.model_io import initializer_arrays

    graph = analysis.model.graph
    inits = initializer_arrays(analysis.model)
    for n in graph.node:
        if n.op_type == "Identity" and n.input[0] in inits:
            inits[n.output[0]] = inits[n.input[0]]
    consumers: dict[str, list] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    by_name = {n.name: n for n in graph.node}
    scale: dict[str, np.ndarray] = {}
    for layer in analysis.problem.layers:
        node = by_name[layer.name]
        chain = consumers.get(node.output[0], [])
        if node.op_type == "Conv" and len(chain) == 1 and chain[0].op_type == "BatchNormalization":
            bn = chain[0]
            if all(t in inits for t in bn.input[1:5]):
                eps = float(_attr(bn, "epsilon", 1e-5))
                gamma, var = inits[bn.input[1]], inits[bn.input[4]]
                scale[node.name] = gamma / np.sqrt(var + eps)
    out: dict[int, list[tuple[str, int, np.ndarray]]] = defaultdict(list)
    for gid, rows in analysis.source_rows.items():
        for node_name, w_name, axis, p, pos in rows:
            w = np.take(inits[w_name], p, axis=axis)
            if node_name in scale and axis == 0:
                w = w * scale[node_name][p]
            out[gid].append((node_name, pos, w))
    return dict(out)


def _class_map(analysis: Analysis, tensor: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(group id, group position) per channel position of `tensor`, or None."""
    return analysis.group_positions(tensor)


def _producer_rows(analysis: Analysis) -> dict[int, list[tuple[str, str, str, int, np.ndarray, np.ndarray, bool]]]:
    """Per group (every group): (node, onnx tensor, kind, axis, index, positions, decays) for
    every constant the operator handlers list as following the group's channels, except the
    layers' input columns (consumers): layer weights and biases, BatchNorm/LayerNorm
    parameters and statistics, per-channel constants. `decays`: role 'produce' (zeroing it
    with the others makes the channel 0)."""
    by_name = {n.name: n for n in analysis.model.graph.node}
    rows: dict[int, list] = defaultdict(list)
    for node_name, axes in analysis.params.items():
        node = by_name[node_name]
        for pa in axes:
            if pa.role == "consume":
                continue
            hit = analysis.group_positions(pa.tensor)
            if hit is None or analysis.channel_axis(pa.tensor) != pa.tensor_axis:
                continue
            gids, pos = hit
            for gid in np.unique(gids):
                sel = np.nonzero(gids == gid)[0]
                rows[int(gid)].append((node_name, node.input[pa.index], pa.kind, pa.param_axis,
                                       sel.astype(np.int64), pos[sel], pa.role == "produce"))
    return dict(rows)


def _to_slices(rows, names: dict[str, str], role: str, gid_label: str, needed: bool,
               notes: list[str], transposed: set[str] = frozenset()) -> list[ParamSlice]:
    out = []
    for node_name, t, kind, axis, idx, pos, dec in rows:
        name = names.get(t)
        if t in transposed:
            axis = 1 - axis  # the module's tensor is the transpose of this initializer
        if name is None:
            if needed and dec:
                raise InputError(
                    f"initializer '{t}' (read by node {node_name}) holds channels of {gid_label} but "
                    "is not a parameter or buffer of the module, so training cannot act on it; make "
                    "it an nn.Parameter or register_buffer it")
            notes.append(f"{gid_label}: initializer {t} of node {node_name} is not a module tensor")
            continue
        out.append(ParamSlice(name, t, node_name, role, kind, int(axis), idx, pos, bool(dec)))
    return out


def analyse_module(module, example_inputs, step: int | None = None, max_candidates: int = 16,
                   model_name: str = "module", verify: bool = True,
                   input_names: list[str] | None = None,
                   output_names: list[str] | None = None, prune_streams: str = "auto") -> TorchPruneGraph:
    """Export `module` with names (`export_with_names`), analyse the export with the ONNX
    analyser and map every prunable group and removable block onto module tensors.

    `step` None: the backend's preferred channel multiple (as the optimize pipeline). Group
    importance is filled with the L1 magnitude prior of the BN-folded weights, as
    pipeline.prepare computes it on a BN-folded export (module doc). Raises
    InputError when a tensor that makes a channel's value is not a module parameter/buffer.
    """
    from latprune.pipeline import apply_stream_policy, resolve_step
    from latprune.solver.importance import magnitude_importance

    inputs = _as_tuple(example_inputs)
    exported = export_with_names(module, inputs, verify=verify, input_names=input_names,
                                 output_names=output_names)
    analysis = analyse(exported, step=resolve_step(step), max_candidates=max_candidates,
                       model_name=model_name, keep_parameters=True)
    apply_stream_policy(analysis, prune_streams)
    _patch_bn_bias(analysis)
    prob = analysis.problem
    magnitude_importance(prob, _folded_weight_slices(analysis), norm="l1")
    notes: list[str] = []
    names, transposed = _name_map(analysis.model, module, exported)
    producers = _producer_rows(analysis)
    consumers: dict[int, dict[tuple, tuple[list[int], list[int]]]] = defaultdict(lambda: defaultdict(lambda: ([], [])))
    for gid, crows in consumer_slices(analysis).items():
        for r in crows:
            if r.weight is None:
                continue
            consumers[gid][(r.layer, r.weight, r.weight_axis)][0].append(r.position)
            consumers[gid][(r.layer, r.weight, r.weight_axis)][1].append(r.group_pos)
    param_slices: dict[int, list[ParamSlice]] = {}
    for g in prob.groups:
        if not g.prunable:
            continue
        label = f"group {g.id}"
        sl = _to_slices(producers.get(g.id, []), names, "producer", label, True, notes, transposed)
        crows = [(layer, w, "weight", axis, np.asarray(ps, np.int64), np.asarray(qs, np.int64), False)
                 for (layer, w, axis), (ps, qs) in consumers.get(g.id, {}).items()]
        sl += _to_slices(crows, names, "consumer", label, False, notes, transposed)
        param_slices[g.id] = sl
    block_slices: dict[int, list[ParamSlice]] = {}
    by_name = {n.name: n for n in analysis.model.graph.node}
    for b in prob.blocks:
        add = by_name[b.add_node]
        branch_out = add.input[1] if add.input[0] == b.skip else add.input[0]
        cm = _class_map(analysis, branch_out)
        inside = set(b.branch_nodes)
        rows = []
        for gid in (sorted(set(int(g) for g in cm[0])) if cm is not None else []):
            rows += [r for r in producers.get(gid, []) if r[0] in inside]
        try:
            block_slices[b.id] = _to_slices(rows, names, "producer", f"block {b.id}", True, notes, transposed)
        except InputError as exc:  # only fatal if a plan removes this block by decay (pruner.dpm)
            notes.append(f"block {b.id} cannot be decayed: {exc}")
    return TorchPruneGraph(module, inputs, exported, analysis, param_slices, block_slices, names, notes, transposed)


# ---- current weights, pruned export -------------------------------------------------------------

def current_analysis(graph: TorchPruneGraph) -> Analysis:
    """`graph.analysis` with every initializer recomputed from the module's current tensors
    (same graph, groups and ids): what surgery and the gradient estimators use. The export is
    normalised again with the current tensors, so constants that normalisation folded from
    module tensors (an nn.Linear weight transposed for MatMul, a class token expanded to the
    batch) follow training too."""
    from latprune.pruner.model_io import normalise

    torch = _torch()
    tensors = graph.tensors()
    raw = copy.deepcopy(graph.onnx)
    with torch.no_grad():
        for init in raw.graph.initializer:
            if init.name not in tensors:
                continue
            arr = tensors[init.name].detach().cpu().numpy()
            if tuple(arr.shape) != tuple(init.dims):
                raise InputError(f"module tensor {init.name} has shape {tuple(arr.shape)}, the export had "
                                 f"{tuple(init.dims)}: the module changed shape since analyse_module")
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr.astype(
                onnx.helper.tensor_dtype_to_np_dtype(init.data_type))), init.name))
    fresh = {i.name: i for i in normalise(raw, keep_parameters=True).graph.initializer}
    model = copy.deepcopy(graph.analysis.model)
    for init in model.graph.initializer:
        if init.name in fresh and tuple(fresh[init.name].dims) == tuple(init.dims):
            init.CopyFrom(fresh[init.name])
    return dataclasses.replace(graph.analysis, model=model)


def export_pruned(graph: TorchPruneGraph, plan: Plan, path: str | Path | None = None,
                  check: bool = True) -> onnx.ModelProto:
    """The module's current (trained) weights with `plan` applied by pruner.surgery: a valid
    smaller ONNX model with the same inputs and outputs (onnx.checker full check when `check`).
    BatchNormalization is kept as a node (ONNX Runtime folds it at load time)."""
    from latprune.pruner.surgery import apply_plan

    model = apply_plan(current_analysis(graph), plan, check=check)
    if path is not None:
        _save(model, path)
    return model


# ---- comparing with the ONNX path ---------------------------------------------------------------

def structure_differences(a: Analysis, b: Analysis) -> list[str]:
    """How two analyses of the same network differ in what a Plan refers to: groups (size,
    prunable, block), channel positions of every producing and consuming layer, blocks, layers
    and their latency signatures. Empty: a Plan for one applies to the other."""
    pa, pb = a.problem, b.problem
    out: list[str] = []
    if len(pa.groups) != len(pb.groups):
        out.append(f"{len(pa.groups)} vs {len(pb.groups)} channel groups")
    for ga, gb in zip(pa.groups, pb.groups):
        if (ga.size, ga.prunable, ga.inner_of_block) != (gb.size, gb.prunable, gb.inner_of_block):
            out.append(f"group {ga.id}: size/prunable/block {(ga.size, ga.prunable, ga.inner_of_block)} "
                       f"vs {(gb.size, gb.prunable, gb.inner_of_block)}")
    if [x.add_node for x in pa.blocks] != [x.add_node for x in pb.blocks]:
        out.append(f"blocks differ: {len(pa.blocks)} vs {len(pb.blocks)}")
    la = {x.name: x for x in pa.layers}
    lb = {x.name: x for x in pb.layers}
    if list(la) != list(lb):
        out.append(f"layers differ: {sorted(set(la) ^ set(lb))[:4]}")
    for name in la.keys() & lb.keys():
        x, y = la[name], lb[name]
        if (x.c_in, x.c_out, x.block, x.dense_c_in, x.dense_c_out) != (y.c_in, y.c_out, y.block, y.dense_c_in, y.dense_c_out):
            out.append(f"layer {name}: channel spaces or block differ")
        elif x.spec.signature() != y.spec.signature():
            diff = [f.name for f in dataclasses.fields(x.spec) if getattr(x.spec, f.name) != getattr(y.spec, f.name)]
            out.append(f"layer {name}: spec differs in {diff}")

    def rows(an: Analysis):
        src = {g: sorted((n, p, q) for n, _w, _ax, p, q in r) for g, r in an.source_rows.items()}
        con = defaultdict(list)
        for g, r in consumer_slices(an).items():
            con[g] = sorted((row.layer, row.position, row.group_pos) for row in r)
        return src, dict(con)

    (sa, ca), (sb, cb) = rows(a), rows(b)
    for kind, x, y in (("producer", sa, sb), ("consumer", ca, cb)):
        for g in sorted(set(x) | set(y)):
            if x.get(g, []) != y.get(g, []):
                out.append(f"group {g}: {kind} channel positions differ")
    return out


# ---- gradient importance on the module ---------------------------------------------------------

def taylor_importance(graph: TorchPruneGraph, x: np.ndarray, y: np.ndarray | None = None,
                      batch: int = 64) -> dict[int, list[float]]:
    """First-order Taylor importance on BatchNorm (solver.gradients.taylor_bn_importance) with
    the module's current weights: {group id: one score per channel position}. `x`: float32
    model inputs (N, ...); `y`: labels (None: the model's own argmax)."""
    from latprune.solver.gradients import taylor_bn_importance

    with _torch().enable_grad():
        return taylor_bn_importance(current_analysis(graph), x, y, batch=batch)


def fisher_curves(graph: TorchPruneGraph, x: np.ndarray, orders: dict[int, list[int]] | None = None,
                  widths: dict[int, list[int]] | None = None, probes: int = 4,
                  batch: int = 64) -> dict[int, list[float]]:
    """Gauss-Newton (Fisher) distortion curves (solver.gradients.fisher_distortion) with the
    module's current weights: {group id: D at each of widths[g]} (default: the candidate widths,
    channels ranked by the group's importance)."""
    from latprune.solver.gradients import fisher_distortion
    from latprune.solver.objective import ranking

    prob = graph.problem
    if orders is None:
        orders = {g.id: ranking(g.importance) for g in prob.groups if g.prunable}
    if widths is None:
        widths = {g.id: list(g.candidate_widths) for g in prob.groups if g.prunable}
    with _torch().enable_grad():
        return fisher_distortion(current_analysis(graph), x, orders, widths, probes=probes, batch=batch)


# ---- the whole optimize pipeline on a module ----------------------------------------------------

def optimize_module(module, example_inputs, out_dir: str | Path, opts, progress=None,
                    graph: TorchPruneGraph | None = None,
                    input_names: list[str] | None = None,
                    output_names: list[str] | None = None) -> tuple[TorchPruneGraph, Plan, dict]:
    """Run latprune.pipeline.optimize on the module: (named analysis, plan, report).

    The pipeline gets the BN-folded export (`export_folded`, the file the ONNX path would be
    given), so profiling, latency tables, importance, solver and measurement are exactly the
    ONNX path's, and so is the plan. The plan is then checked to refer to the same groups in the
    named analysis (`structure_differences`, InputError otherwise), ready for pruner.dpm and
    `export_pruned`. Writes out_dir/pruned.onnx (the one-shot pruned folded export), plan.json,
    report.json, report.html, and out_dir/dense.onnx (the folded export that was measured).
    `opts`: latprune.pipeline.OptimizeOptions.
    """
    from latprune.pipeline import apply_stream_policy, make_backend, optimize, resolve_step

    out_dir = Path(out_dir)
    inputs = _as_tuple(example_inputs)
    step = resolve_step(opts.step, make_backend(opts.backend, opts.threads, opts.precision))
    opts = opts.replace(step=step)
    if graph is None:
        graph = analyse_module(module, inputs, step=step, max_candidates=opts.max_candidates,
                               input_names=input_names, output_names=output_names,
                               prune_streams=opts.prune_streams)
    folded = export_folded(module, inputs, input_names=input_names, output_names=output_names)
    folded_analysis = analyse(folded, step=step, max_candidates=opts.max_candidates, keep_parameters=True)
    apply_stream_policy(folded_analysis, opts.prune_streams)
    diffs = structure_differences(folded_analysis, graph.analysis)
    if diffs:
        raise InputError("the BN-folded export and the named export analyse differently, so the "
                         f"plan cannot be mapped onto the module: {diffs[0]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    _save(folded, out_dir / "dense.onnx")
    report = optimize(out_dir / "dense.onnx", out_dir, opts, progress)
    plan = Plan.from_json((out_dir / "plan.json").read_text())
    from latprune.pruner.surgery import validate_plan

    validate_plan(graph.analysis, plan)
    return graph, plan, report


__all__ = ["export_with_names", "export_folded", "analyse_module", "export_pruned", "current_analysis",
           "structure_differences", "taylor_importance", "fisher_curves", "optimize_module",
           "TorchPruneGraph", "ParamSlice"]
