"""solver.gradients: Taylor importance on BatchNorm and the Gauss-Newton distortion estimate,
checked against true distortions measured with ONNX Runtime."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

torch = pytest.importorskip("torch")

from onnx_builders import ALL_BUILDERS, GraphBuilder, misc_ops_cnn  # noqa: E402
from latprune.calibration import load_calibration  # noqa: E402
from latprune.pruner.analysis import analyse  # noqa: E402
from latprune.pruner.forward import Runner  # noqa: E402
from latprune.pruner.onnx_torch import OnnxTorch  # noqa: E402
from latprune.solver.gradients import (consumer_taps, fisher_block_distortion,  # noqa: E402
                                       fisher_distortion, taylor_bn_importance)


def _x(shape=(1, 3, 16, 16), samples=64, seed=0):
    return load_calibration("noise", list(shape), samples=samples, seed=seed)


def bn_cnn(seed: int = 0) -> onnx.ModelProto:
    """conv-bn-relu x2 with small weights (moderate logits, so the CE is not saturated)."""
    g = GraphBuilder(seed=seed)
    x = g.relu(g.bn(g.conv("input", 3, 8), 8))
    x = g.relu(g.bn(g.conv(x, 8, 12), 12))
    x = g.relu(g.conv(x, 12, 16))  # no BN: scored by weight·grad
    return g.build(g.head(x, 16), "bn_cnn")


def linear_cnn() -> onnx.ModelProto:
    """conv -> bn -> conv -> flatten -> gemm, no activation: linear in every layer input."""
    g = GraphBuilder(in_shape=(1, 3, 8, 8), seed=1)
    x = g.bn(g.conv("input", 3, 8), 8)
    x = g.conv(x, 8, 12)
    f = g.node("Flatten", [x], axis=1)
    w = g.init(g.rng.normal(0, 0.1, (10, 12 * 64)).astype(np.float32))
    return g.build(g.node("Gemm", [f, w, g.init(np.zeros(10, np.float32), "b")], transB=1), "linear")


# ---- Taylor importance ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["residual", "depthwise", "concat", "aliased", "unsupported", "misc"])
def test_taylor_scores_cover_every_prunable_group(name):
    model = misc_ops_cnn() if name == "misc" else ALL_BUILDERS[name]()  # misc: batch 1 only
    an = analyse(model)
    scores = taylor_bn_importance(an, _x(samples=8), batch=8)
    prunable = {g.id: g.size for g in an.problem.groups if g.prunable}
    assert set(scores) == set(prunable)
    for gid, s in scores.items():
        assert len(s) == prunable[gid]
        assert all(np.isfinite(v) and v >= 0 for v in s)
    if name != "residual":  # random residual nets saturate the softmax: all gradients vanish
        assert sum(sum(s) for s in scores.values()) > 0
    if name == "aliased":  # two layers sharing one weight still get their own gradients
        assert len({tuple(s) for s in scores.values()}) == len(scores)


def test_taylor_bn_matches_a_direct_computation():
    an = analyse(bn_cnn())
    x = _x(samples=24)
    scores = taylor_bn_importance(an, x, batch=8)
    # The same per-channel sums, computed in one batch by hand.
    net = OnnxTorch(an.model)
    logits = net(torch.from_numpy(x))[0][0]
    loss = torch.nn.functional.cross_entropy(logits, logits.detach().argmax(1), reduction="sum")
    loss.backward()
    for node in an.model.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        gamma, beta = net.params[node.input[1]], net.params[node.input[2]]
        want = ((gamma * gamma.grad + beta * beta.grad).abs() / len(x)).detach().numpy()
        gids, positions = an.group_positions(node.output[0])
        gid, pos = int(gids[0]), [int(q) for q in positions]
        np.testing.assert_allclose(np.asarray(scores[gid])[pos], want, rtol=1e-3, atol=1e-9)
        assert want.max() > 0
    # The BN-less group (last conv) is scored from its weights.
    last = [g.id for g in an.problem.groups if g.prunable and g.size == 16]
    assert last and max(scores[last[0]]) > 0
    # Labels change the loss, hence the scores.
    labelled = taylor_bn_importance(an, x, y=np.zeros(len(x), np.int64), batch=8)
    assert any(not np.allclose(labelled[g], scores[g]) for g in scores)


# ---- Gauss-Newton distortion --------------------------------------------------------------------

def _zero_inputs(an, gid: int, removed) -> onnx.ModelProto:
    """Copy of the model with the group's `removed` positions zeroed at every consuming layer
    (through the layers' weights): the exact pruned network."""
    model = copy.deepcopy(an.model)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
    removed = set(int(r) for r in removed)
    for name, _axis, pm in consumer_taps(an, [gid]):
        node = next(n for n in graph.node if n.name == name)
        ps, qs = pm[gid]
        cols = [int(p) for p, q in zip(ps, qs) if int(q) in removed]
        src = node.input[1]
        while src not in inits:
            src = alias[src]
        w = numpy_helper.to_array(inits[src]).copy()
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        if node.op_type == "Conv" or (node.op_type == "Gemm" and trans_b):
            w[:, cols] = 0
        else:
            w[cols] = 0
        graph.initializer.append(numpy_helper.from_array(w, node.name + "_zeroed"))
        node.input[1] = node.name + "_zeroed"
    return model


def _true_distortion(an, x, gid, removed) -> float:
    f = Runner(an.model).logits(x).astype(np.float64)
    fp = Runner(_zero_inputs(an, gid, removed)).logits(x)
    return float(np.mean((f - fp) ** 2))


def test_fisher_is_exact_on_a_linear_model():
    an = analyse(linear_cnn())
    x = _x((1, 3, 8, 8), samples=32)
    groups = [g for g in an.problem.groups if g.prunable]
    assert len(groups) == 2
    rng = np.random.default_rng(0)
    orders = {g.id: [int(i) for i in rng.permutation(g.size)] for g in groups}
    widths = {g.id: [1, g.size // 2, g.size - 1, g.size] for g in groups}
    est = fisher_distortion(an, x, orders, widths, probes=48, batch=32)
    for g in groups:
        assert est[g.id][-1] == 0.0
        for w, d in zip(widths[g.id][:-1], est[g.id]):
            true = _true_distortion(an, x, g.id, orders[g.id][w:])
            assert true > 0
            assert abs(d - true) <= 0.15 * true, (g.id, w, d, true)


@pytest.mark.parametrize("name", ["depthwise", "concat", "aliased"])
def test_fisher_is_close_for_small_removals_with_relu(name):
    an = analyse(ALL_BUILDERS[name]())
    x = _x(samples=48)
    rng = np.random.default_rng(1)
    groups = [g for g in an.problem.groups if g.prunable]
    orders = {g.id: [int(i) for i in rng.permutation(g.size)] for g in groups}
    widths = {g.id: [g.size - 1, g.size] for g in groups}
    est = fisher_distortion(an, x, orders, widths, probes=12, batch=48)
    checked = 0
    for g in groups:
        assert est[g.id][1] == 0.0
        true = _true_distortion(an, x, g.id, orders[g.id][-1:])
        if true < 1e-9:  # a channel no layer reads (e.g. sliced away): free to prune
            assert est[g.id][0] < 1e-9
            continue
        assert 0.5 * true <= est[g.id][0] <= 2.0 * true, (g.id, est[g.id][0], true)
        checked += 1
    assert checked >= 2


def test_fisher_is_deterministic_and_grows_with_removals():
    an = analyse(ALL_BUILDERS["depthwise"]())
    x = _x(samples=16)
    groups = [g for g in an.problem.groups if g.prunable]
    orders = {g.id: list(range(g.size)) for g in groups}
    widths = {g.id: g.candidate_widths for g in groups}
    a = fisher_distortion(an, x, orders, widths, probes=4, batch=8, seed=3)
    b = fisher_distortion(an, x, orders, widths, probes=4, batch=16, seed=3)
    for g in groups:
        assert a[g.id][-1] == 0.0 and len(a[g.id]) == len(widths[g.id])
        assert all(np.isfinite(v) and v >= 0 for v in a[g.id])
        if len(widths[g.id]) > 2:  # the narrowest width costs more than the widest cut
            assert a[g.id][0] > a[g.id][-2]
    c = fisher_distortion(an, x, orders, widths, probes=4, batch=8, seed=3)
    assert a == c
    # Another batching draws other probes: the same estimate up to probe noise.
    for g in groups:
        for u, v in zip(a[g.id][:-1], b[g.id][:-1]):
            assert 0.5 * v <= u <= 2.0 * v


def test_fisher_block_distortion_matches_removing_the_branch():
    an = analyse(ALL_BUILDERS["depthwise"]())
    x = _x(samples=48)
    est = fisher_block_distortion(an, x, probes=12)
    assert set(est) == {b.id for b in an.problem.blocks} and est
    f = Runner(an.model).logits(x).astype(np.float64)
    for b in an.problem.blocks:
        model = copy.deepcopy(an.model)
        add = next(n for n in model.graph.node if n.name == b.add_node)
        idx = 1 if add.input[0] == b.skip else 0
        branch = add.input[idx]
        model.graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), "zero_c"))
        nodes = list(model.graph.node)
        nodes.insert(nodes.index(add), helper.make_node("Mul", [branch, "zero_c"], ["zeroed_branch"]))
        add.input[idx] = "zeroed_branch"
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        true = float(np.mean((f - Runner(model).logits(x)) ** 2))
        assert 0.5 * true <= est[b.id] <= 2.0 * true, (b.id, est[b.id], true)
