"""Channel scores and distortion curves from gradients (needs torch; imported lazily).

The network is evaluated by `latprune.pruner.onnx_torch.OnnxTorch` on `analysis.model` (the
normalised ONNX graph), so every model the analyser handles gets gradients; no ONNX protobuf
is built here.

Two estimators:

- `taylor_bn_importance`: the first-order Taylor importance of HALP/MDP (SEEDS.md §2/§3). Per
  BatchNorm channel |Σ_batches (γ·∂L/∂γ + β·∂L/∂β)|, summed over the BNs that produce a group
  position. L is the cross-entropy with the labels `y` when given; without labels it is the
  cross-entropy against the dense model's own argmax predictions (pseudo-labels), so the score
  says how much a channel supports the model's current decisions. L sums over the items and is
  divided by their number (so the scale does not depend on `batch`). Groups that no BN
  produces (e.g. conv without BN, depthwise stacks) get the same first-order Taylor on the
  producing layers' weights instead: |Σ_batches Σ_slice (w·∂L/∂w + b·∂L/∂b)| over each
  producing layer's output-channel slice (bias included: removing a channel removes both),
  summed over producing layers. A prunable group with neither (rare: channels created by a
  Pad) gets the activation Taylor |Σ a·∂L/∂a| at its consuming layers' inputs.

- `fisher_distortion` / `fisher_block_distortion`: the Gauss-Newton (Fisher) approximation of
  seed 000's output-distortion curves (SEEDS.md §1, "TPAMI" variant; the paper's exact formula
  is unverified, this is our design). D = mean over calibration items of
  ||f(x) − f_pruned(x)||² / n_logits. Pruning channels S of group g is exactly zeroing them at
  the input of every layer that reads the group, i.e. the perturbation δ = −a_S at those
  inputs; to first order f_pruned − f ≈ Jδ and D(S) ≈ E_x ||Jδ||² / n_logits. With Gaussian
  probes v ~ N(0, I), E_v (vᵀJδ)² = ||Jδ||², and vᵀJδ = −Σ_{c∈S} t_c where
  t_c = Σ_{consuming inputs} Σ_hw (∂(vᵀf)/∂a)_c · a_c. One forward and `probes` backward
  passes per batch give t for every group and channel at once, so all curves come from
  gradient passes only (no forward pass per (group, width)). The estimate is exact (up to
  probe noise) for a network that is linear in the pruned activations; with ReLUs it is a
  local (first-order) approximation that ignores the nonlinearity's response to the cut.
  Depthwise convs are not counted as consumers: their output channel is the same channel,
  zeroed again at the next consumer, so counting both would double the perturbation.
  Memory: t is kept as float64 (items × probes × size) per group.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from latprune.types import InputError


def _torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - depends on the environment
        raise InputError("gradient-based scores need torch (pip install 'latprune[bench]')") from None
    return torch


def _net(analysis):
    _torch()
    from latprune.pruner.onnx_torch import OnnxTorch

    return OnnxTorch(analysis.model)


def _per_batch(n: int, batch: int, fn) -> list:
    """[fn(slice)] over batches of `batch` items. A graph that hard-codes batch 1 (a Reshape
    to (1, -1)) fails on a larger first batch: then start over one item at a time."""
    results = []
    start = 0
    while start < n:
        sl = slice(start, min(n, start + batch))
        try:
            results.append(fn(sl))
        except (InputError, RuntimeError):
            if batch == 1 or start > 0:
                raise
            return _per_batch(n, 1, fn)
        start = sl.stop
    return results


def _position_map(analysis, tensor: str, gids) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """For `tensor`'s channel axis: {gid: (positions along the axis, positions in the group)}."""
    hit = analysis.group_positions(tensor)
    if hit is None:
        return {}
    groups, positions = hit
    out = {}
    for gid in set(int(g) for g in groups) & set(gids):
        sel = np.nonzero(groups == gid)[0]
        out[gid] = (sel.astype(np.int64), positions[sel].astype(np.int64))
    return out


def consumer_taps(analysis, gids) -> list[tuple[str, int, dict[int, tuple[np.ndarray, np.ndarray]]]]:
    """The layer inputs where pruning the groups `gids` acts: [(layer node name, channel axis
    of its input, {gid: (input positions, group positions)})], depthwise (channel-preserving)
    layers left out."""
    from latprune.pruner.ops import handler_for

    gids = set(gids)
    layer_names = {layer.name for layer in analysis.problem.layers}
    view = analysis.view()
    taps = []
    for node in analysis.model.graph.node:
        if node.name not in layer_names or analysis.channel_axis(node.input[0]) is None:
            continue
        if handler_for(node).channel_preserving(node, view):
            continue  # depthwise: the channel continues to the next consumer
        pm = _position_map(analysis, node.input[0], gids)
        if pm:
            taps.append((node.name, analysis.channel_axis(node.input[0]), pm))
    return taps


def _outputs_vector(torch, outs, analysis):
    """The outputs distortion is measured on (pruner.forward.compared_outputs: a detector's
    every fixed-shape output), flattened per item and joined: (items, n)."""
    from latprune.pruner.forward import compared_outputs

    names = [o.name for o in analysis.model.graph.output]
    flat = [outs[names.index(n)] for n in compared_outputs(analysis.model)]
    flat = [o.reshape(o.shape[0], -1) for o in flat]
    return flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)


def _channel_sums(prod, axis: int):
    """Σ over every dim but the batch (0) and the channel `axis`: (items, channels)."""
    dims = [d for d in range(prod.dim()) if d not in (0, axis)]
    out = prod.sum(dim=dims) if dims else prod
    return out.reshape(prod.shape[0], -1)


def _cross_entropy(torch, logits, labels):
    if logits.dim() == 1:
        logits = logits.unsqueeze(0)
    return torch.nn.functional.cross_entropy(logits, labels, reduction="sum")


# ---- first-order Taylor importance ---------------------------------------------------------

def taylor_bn_importance(analysis, x: np.ndarray, y: np.ndarray | None = None,
                         batch: int = 64) -> dict[int, list[float]]:
    """{group id: one score per channel position} for every prunable group (module doc)."""
    torch = _torch()
    problem = analysis.problem
    sizes = {g.id: g.size for g in problem.groups if g.prunable}
    if not sizes:
        return {}
    x = np.asarray(x, dtype=np.float32)
    if y is not None and len(y) != len(x):
        raise InputError(f"{len(y)} labels for {len(x)} calibration inputs")
    net = _net(analysis)
    net.requires_grad_(False)
    graph = analysis.model.graph
    nodes = {n.name: n for n in graph.node}
    # Gradients are taken at taps on the nodes' parameter inputs, so a weight shared by two
    # layers (Identity aliases) still gets each layer's own gradient.
    # BatchNorm terms: (node, {gid: (bn channels, group positions)}).
    bn_terms = []
    for node in graph.node:
        bn = [pa for pa in analysis.params.get(node.name, []) if pa.kind == "bn_weight"]
        if node.op_type == "BatchNormalization" and bn:
            pm = _position_map(analysis, bn[0].tensor, sizes)
            if pm:
                bn_terms.append((node.name, pm))
    bn_groups = {g for _, pm in bn_terms for g in pm}
    # Producing-layer terms for the other groups: node -> (weight axis, has bias, rows).
    w_terms: dict[str, tuple[int, bool, list[tuple[int, int, int]]]] = {}
    for gid, rows in analysis.source_rows.items():
        if gid not in sizes or gid in bn_groups:
            continue
        for node_name, _w_name, axis, p, pos in rows:
            node = nodes[node_name]
            has_bias = len(node.input) > 2 and bool(node.input[2])
            w_terms.setdefault(node_name, (axis, has_bias, []))[2].append((p, gid, pos))
    w_groups = {gid for _, _, rows in w_terms.values() for _, gid, _ in rows}
    rest = set(sizes) - bn_groups - w_groups
    act_terms = consumer_taps(analysis, rest) if rest else []

    keys: list[tuple[str, int]] = []
    for name, _ in bn_terms:
        keys += [(name, 1), (name, 2)]
    for name, (_, has_bias, _) in w_terms.items():
        keys += [(name, 1)] + ([(name, 2)] if has_bias else [])
    keys += [(name, 0) for name, _, _ in act_terms]
    slot = {k: i for i, k in enumerate(keys)}

    def taylor(tensor, grad):  # Σ value·grad per channel of axis 1 (activations, batch summed)
        return (tensor * grad).double()

    def run(sl):
        outs, cap = net(torch.from_numpy(x[sl]), taps=keys)
        logits = outs[0]
        if logits.shape[0] != len(x[sl]):  # a Reshape fixes the batch at 1: start over item by item
            raise RuntimeError("the graph's outputs do not follow the batch")
        if y is not None:
            labels = torch.as_tensor(np.asarray(y[sl]), dtype=torch.long)
        else:
            labels = logits.detach().argmax(dim=1)  # pseudo-labels: the dense model's decisions
        loss = _cross_entropy(torch, logits, labels)
        tensors = [cap[k] for k in keys]
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        prods = [taylor(t.detach(), torch.zeros_like(t) if g is None else g)
                 for t, g in zip(tensors, grads)]
        res_bn = [(prods[slot[(n, 1)]] + prods[slot[(n, 2)]]).reshape(-1).numpy() for n, _ in bn_terms]
        res_w = []
        for name, (axis, has_bias, _) in w_terms.items():
            wg = prods[slot[(name, 1)]]
            dims = [d for d in range(wg.dim()) if d != axis]
            val = wg.sum(dim=dims).numpy() if dims else wg.numpy()
            if has_bias:
                val = val + prods[slot[(name, 2)]].reshape(-1).numpy()
            res_w.append(val)
        res_a = []
        for name, axis, _ in act_terms:
            res_a.append(_channel_sums(prods[slot[(name, 0)]], axis).sum(dim=0).numpy())
        return res_bn, res_w, res_a

    results = _per_batch(len(x), batch, run)
    n = max(len(x), 1)
    scores = {gid: np.zeros(size) for gid, size in sizes.items()}
    for k, (_, pm) in enumerate(bn_terms):
        total = np.abs(sum(r[0][k] for r in results)) / n
        for gid, (ps, qs) in pm.items():
            np.add.at(scores[gid], qs, total[ps])
    for k, (_, _, rows) in enumerate(w_terms.values()):
        total = np.abs(sum(r[1][k] for r in results)) / n
        for p, gid, pos in rows:
            scores[gid][pos] += total[p]
    for k, (_, _, pm) in enumerate(act_terms):
        total = np.abs(sum(r[2][k] for r in results)) / n
        for gid, (ps, qs) in pm.items():
            np.add.at(scores[gid], qs, total[ps])
    return {gid: [float(v) for v in s] for gid, s in scores.items()}


# ---- Gauss-Newton (Fisher) output distortion -----------------------------------------------

def _probe_products(analysis, x: np.ndarray, tap_keys: list[tuple[str, int]], probes: int,
                    batch: int, seed: int, axes: list[int] | None = None):
    """Per batch: ([per tap: float64 (items, probes, channels) of Σ_hw (∂(vᵀf)/∂a)·a], n_logits).
    f is every float output of the graph (flattened and joined); `axes`: the channel axis of
    each tap (default 1)."""
    axes = axes if axes is not None else [1] * len(tap_keys)
    torch = _torch()
    if probes < 1:
        raise InputError(f"probes must be at least 1, not {probes}")
    x = np.asarray(x, dtype=np.float32)
    net = _net(analysis)
    net.requires_grad_(False)
    state = {}

    def run(sl):
        if sl.start == 0:  # (re)seed: also when _per_batch starts over one item at a time
            state["gen"] = torch.Generator().manual_seed(seed)
        outs, cap = net(torch.from_numpy(x[sl]), taps=tap_keys)
        f = _outputs_vector(torch, outs, analysis)
        if f.shape[0] != len(x[sl]):  # a Reshape fixes the batch at 1: start over item by item
            raise RuntimeError("the graph's outputs do not follow the batch")
        tensors = [cap[k] for k in tap_keys]
        values = [t.detach() for t in tensors]
        b = f.shape[0]
        prods = [np.zeros((b, probes, t.shape[ax] if t.dim() > ax else 1)) for t, ax in zip(values, axes)]
        for k in range(probes):
            v = torch.randn(f.shape, generator=state["gen"], dtype=f.dtype)
            grads = torch.autograd.grad(f, tensors, grad_outputs=v, retain_graph=k < probes - 1,
                                        allow_unused=True)
            for j, (gr, a) in enumerate(zip(grads, values)):
                if gr is None:
                    continue
                prods[j][:, k, :] = _channel_sums((gr * a).double(), axes[j]).numpy()
        return prods, int(np.prod(f.shape[1:])) if f.dim() > 1 else 1

    return _per_batch(len(x), batch, run)


def fisher_distortion(analysis, x: np.ndarray, orders: dict[int, list[int]],
                      widths: dict[int, list[int]], probes: int = 4, batch: int = 64,
                      seed: int = 0) -> dict[int, list[float]]:
    """{gid: [D_g(w) for w in widths[gid]]}: the Gauss-Newton estimate of the logits' MSE when
    only group g keeps the first w channels of `orders[gid]` (module doc). D = 0 at full width."""
    problem = analysis.problem
    for gid, order in orders.items():
        size = problem.groups[gid].size
        if sorted(order) != list(range(size)):
            raise InputError(f"orders[{gid}] is not a permutation of the group's {size} channels")
        if any(not 0 <= w <= size for w in widths.get(gid, [])):
            raise InputError(f"widths[{gid}] must lie in 0..{size}")
    gids = [g for g in orders if g in widths]
    taps = consumer_taps(analysis, gids)
    t_batches: dict[int, list[np.ndarray]] = defaultdict(list)
    n_logits = 1
    if taps:
        results = _probe_products(analysis, x, [(name, 0) for name, _, _ in taps], probes, batch, seed,
                                  [axis for _, axis, _ in taps])
        for prods, n_logits in results:
            items = prods[0].shape[0]
            t = {gid: np.zeros((items, probes, problem.groups[gid].size)) for gid in gids}
            for (_, _, pm), prod in zip(taps, prods):
                for gid, (ps, qs) in pm.items():
                    np.add.at(t[gid], (slice(None), slice(None), qs), prod[:, :, ps])
            for gid in gids:
                t_batches[gid].append(t[gid])
    out: dict[int, list[float]] = {}
    for gid in gids:
        size = problem.groups[gid].size
        if not t_batches[gid]:
            out[gid] = [0.0] * len(widths[gid])
            continue
        t = np.concatenate(t_batches[gid])[..., list(orders[gid])]
        cum = np.concatenate([np.zeros(t.shape[:2] + (1,)), np.cumsum(t, axis=-1)], axis=-1)
        total = cum[..., size]
        vals = []
        for w in widths[gid]:
            if w >= size:
                vals.append(0.0)
                continue
            removed = total - cum[..., w]  # Σ of t over the channels not kept
            vals.append(float(np.mean(removed ** 2) / n_logits))
        out[gid] = vals
    return out


def fisher_block_distortion(analysis, x: np.ndarray, probes: int = 4, batch: int = 64,
                            seed: int = 0) -> dict[int, float]:
    """{block id: D_b}: the Gauss-Newton estimate of the logits' MSE when only block b is
    removed, i.e. its branch input of the residual Add is replaced by zero (δ = −branch)."""
    blocks = analysis.problem.blocks
    if not blocks:
        return {}
    nodes = {n.name: n for n in analysis.model.graph.node}
    keys, axes = [], []
    for b in blocks:
        add = nodes[b.add_node]
        index = 1 if add.input[0] == b.skip else 0
        keys.append((add.name, index))
        axes.append(analysis.channel_axis(add.input[index]) or 1)
    results = _probe_products(analysis, x, keys, probes, batch, seed, axes)
    sums: dict[int, list[np.ndarray]] = defaultdict(list)
    n_logits = 1
    for prods, n_logits in results:
        for b, prod in zip(blocks, prods):
            sums[b.id].append(prod.sum(axis=-1))  # (items, probes)
    return {b.id: float(np.mean(np.concatenate(sums[b.id]) ** 2) / n_logits) for b in blocks}


__all__ = ["taylor_bn_importance", "fisher_distortion", "fisher_block_distortion", "consumer_taps"]
