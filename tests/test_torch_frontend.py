"""pruner.torch_frontend: export with names, the ONNX analysis mapped onto the module, the
pruned export, and the torch path against the ONNX path (bench's BN-folded export)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from conftest import ort_session  # noqa: E402
from latprune.models_cifar import cifar_resnet, load_cifar_resnet  # noqa: E402
from latprune.pruner.analysis import analyse, weight_slices  # noqa: E402
from latprune.pruner.torch_frontend import (analyse_module, current_analysis, export_folded,  # noqa: E402
                                            export_pruned, export_with_names, structure_differences,
                                            taylor_importance)
from latprune.solver.budgets import analytic_costs, dense_count  # noqa: E402
from latprune.solver.importance import magnitude_importance  # noqa: E402
from latprune.solver.milp import solve_milp  # noqa: E402
from latprune.solver.problem_costs import SolveInput  # noqa: E402
from latprune.types import InputError, Plan  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread: tiny models, and on a shared 2-core machine torch's thread pool
    fighting another process makes a step 30× slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class PadBlock(nn.Module):
    """BasicBlock with the CIFAR ResNets' option-A shortcut when it downsamples."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2 if cout != cin else 0
        self.down = stride != 1 or cin != cout

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.down:
            x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + x)


class TinyRes(nn.Module):
    """conv-bn-relu, an identity block, a zero-padding downsampling block, a conv with bias,
    GAP, flatten, linear: 16×16 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.b1 = PadBlock(8, 8, 1)
        self.b2 = PadBlock(8, 16, 2)
        self.head = nn.Conv2d(16, 16, 1, bias=True)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.b2(self.b1(F.relu(self.bn(self.stem(x)))))
        x = F.relu(self.head(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def randomise_bn(module, seed: int = 0) -> None:
    """Non-trivial BN statistics and affine terms (fresh BNs are the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = TinyRes().eval()
    randomise_bn(m)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return m, x, analyse_module(m, x, step=4)


def test_export_keeps_names_and_batchnorm(tiny):
    m, x, _ = tiny
    model = export_with_names(m, x)
    onnx.checker.check_model(model, full_check=True)
    names = {i.name for i in model.graph.initializer}
    state = set(m.state_dict())
    used = {k for k in state if not k.endswith("num_batches_tracked")}
    assert used <= names  # every parameter and running statistic, under its own name
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == 5  # not folded
    assert not any(n.op_type == "Identity" for n in model.graph.node)  # no deduplicated aliases
    with torch.no_grad():
        ref = m(x).numpy()
    got = ort_session(model).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    # the module's training flags survive the export
    m.train()
    export_with_names(m, x, verify=False)
    assert m.training and m.bn.training
    m.eval()


def test_torch_analysis_is_the_onnx_analysis(tiny):
    m, x, graph = tiny
    ref = analyse(graph.onnx, step=4, model_name="module")
    pa, pb = graph.problem, ref.problem
    assert [(g.size, g.prunable, g.inner_of_block, g.candidate_widths) for g in pa.groups] == \
        [(g.size, g.prunable, g.inner_of_block, g.candidate_widths) for g in pb.groups]
    assert [(b.add_node, b.skip, b.branch_nodes) for b in pa.blocks] == \
        [(b.add_node, b.skip, b.branch_nodes) for b in pb.blocks]
    assert [(la.name, la.c_in, la.c_out, la.block) for la in pa.layers] == \
        [(lb.name, lb.c_in, lb.c_out, lb.block) for lb in pb.layers]
    assert len(pa.blocks) == 1  # the identity block; the padded shortcut is not removable
    # the BN-folded export has the same structure and (thanks to has_bias) the same signatures
    folded = analyse(export_folded(m, x), step=4)
    assert structure_differences(folded, graph.analysis) == []
    assert [la.spec.signature() for la in folded.problem.layers] == [la.spec.signature() for la in pa.layers]


def test_param_slices_cover_every_producer_and_consumer(tiny):
    m, x, graph = tiny
    prob = graph.problem
    assert set(graph.param_slices) == {g.id for g in prob.groups if g.prunable}
    state = m.state_dict()
    for gid, slices in graph.param_slices.items():
        size = prob.groups[gid].size
        for s in slices:
            assert s.name in state
            assert len(s.index) == len(s.positions) and s.positions.max() < size
            assert s.index.max() < state[s.name].shape[s.axis]
        producers = {s.name for s in slices if s.role == "producer" and s.kind == "weight"}
        assert producers == {graph.names[r[1]] for r in graph.analysis.source_rows[gid]}
        # every position of the group has at least one decaying producer and one consumer
        for role in ("producer", "consumer"):
            pos = set().union(*[set(s.positions.tolist()) for s in slices if s.role == role])
            assert pos == set(range(size)), (gid, role)
    # the residual group of the padded stage: written by b2.conv2 (and bn2) only, the padded
    # positions never by b1; its consumers include the head conv
    res16 = [g for g in prob.groups if g.prunable and g.size == 8 and any(
        s.name == "b2.conv2.weight" for s in graph.param_slices[g.id])]
    assert res16
    kinds = {(s.name, s.kind) for s in graph.param_slices[res16[0].id]}
    assert ("b2.bn2.weight", "bn_weight") in kinds and ("b2.bn2.bias", "bn_bias") in kinds
    assert ("b2.bn2.running_var", "bn_var") in kinds and ("head.weight", "weight") in kinds
    head = [g for g in prob.groups if g.prunable and any(s.name == "head.bias" for s in graph.param_slices[g.id])]
    assert head and any(s.name == "fc.weight" and s.role == "consumer" for s in graph.param_slices[head[0].id])
    # the removable block maps onto its branch output producers
    assert {s.name for s in graph.block_slices[0]} >= {"b1.conv2.weight", "b1.bn2.weight", "b1.bn2.bias"}


def test_zeroing_a_channels_producers_equals_pruning_it(tiny):
    """What DPM relies on: with every decaying producer slice of channel c at zero, the module's
    output equals the ONNX model with c removed (residual group across the pad shortcut)."""
    m, x, graph = tiny
    m2 = TinyRes().eval()
    m2.load_state_dict(m.state_dict())
    graph2 = analyse_module(m2, x, step=4, verify=False)
    prob = graph2.problem
    tensors = graph2.tensors()
    kept = {}
    with torch.no_grad():
        for g in prob.groups:
            if not g.prunable:
                continue
            drop = {1, g.size - 1}
            kept[g.id] = [p for p in range(g.size) if p not in drop]
            for s in graph2.param_slices[g.id]:
                if s.role == "producer" and s.decays:
                    sel = np.isin(s.positions, list(drop))
                    idx = torch.as_tensor(s.index[sel])
                    tensors[s.name].index_fill_(s.axis, idx, 0.0)
    plan = Plan(kept=kept, widths={k: len(v) for k, v in kept.items()})
    pruned = export_pruned(graph2, plan)
    onnx.checker.check_model(pruned, full_check=True)
    with torch.no_grad():
        ref = m2(x).numpy()
    np.testing.assert_allclose(ort_session(pruned).run(None, {"input": x.numpy()})[0], ref, atol=1e-5)
    assert sum(int(np.prod(i.dims)) for i in pruned.graph.initializer) < \
        sum(int(np.prod(i.dims)) for i in graph2.onnx.graph.initializer)


def test_keep_all_plan_reproduces_the_module_with_current_weights(tiny):
    m, x, graph = tiny
    with torch.no_grad():
        m.fc.bias.add_(1.0)  # a weight changed after the analysis is exported as it is now
        try:
            out = export_pruned(graph, Plan(kept={}))
            np.testing.assert_allclose(ort_session(out).run(None, {"input": x.numpy()})[0], m(x).numpy(),
                                       atol=1e-5)
        finally:
            m.fc.bias.sub_(1.0)


def test_a_channel_constant_outside_the_module_is_refused():
    class Offset(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.c2 = nn.Conv2d(8, 4, 3, padding=1)

        def forward(self, x):
            y = self.c1(x) + torch.arange(8, dtype=x.dtype).view(1, 8, 1, 1)  # not a parameter
            return self.c2(F.relu(y))

    with pytest.raises(InputError, match="not a parameter or buffer"):
        analyse_module(Offset().eval(), torch.randn(1, 3, 8, 8), step=4)


def test_taylor_importance_uses_current_weights(tiny):
    m, x, graph = tiny
    xs = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    scores = taylor_importance(graph, xs)
    assert set(scores) == {g.id for g in graph.problem.groups if g.prunable}
    gid, sl = next((g.id, s) for g in graph.problem.groups if g.prunable
                   for s in graph.param_slices[g.id] if s.name == "b1.bn1.weight")
    pos = int(sl.positions[list(sl.index).index(0)])  # group position of BN channel 0
    with torch.no_grad():
        saved = m.b1.bn1.weight.clone(), m.b1.bn1.bias.clone()
        m.b1.bn1.weight[0] = 0.0
        m.b1.bn1.bias[0] = 0.0
        try:
            after = taylor_importance(graph, xs)
        finally:
            m.b1.bn1.weight.copy_(saved[0])
            m.b1.bn1.bias.copy_(saved[1])
    assert after[gid][pos] == 0.0 and scores[gid][pos] != 0.0
    assert current_analysis(graph).problem is graph.problem


def _bench_export(module, x, path):
    """bench/models.py's export (eval mode, constant folding: BN folded into the convs)."""
    sys.path.insert(0, str(REPO))
    try:
        from bench.models import _export
    except ImportError:  # the bench changed: the same arguments
        return export_folded(module, x, path, output_names=["logits"])
    finally:
        sys.path.remove(str(REPO))
    _export(module, x, path)
    return onnx.load(str(path))


@pytest.mark.parametrize("depth", [20, 56])
def test_torch_path_and_onnx_path_agree_on_cifar_resnet(depth, tmp_path):
    """Groups, blocks, layers (with latency signatures) and the MILP plan under the same costs:
    identical. Known, explained differences: block branch_nodes also list the BN nodes
    (the folded export has none) and importances agree to float rounding (folded weights)."""
    torch.manual_seed(depth)
    m = cifar_resnet(depth).eval()
    randomise_bn(m, seed=depth)
    if depth == 56:  # the trained weights when the shared data is here (the acceptance case)
        try:
            m = load_cifar_resnet(56)
        except (FileNotFoundError, InputError):
            pass
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    graph = analyse_module(m, x, step=8, output_names=["logits"])
    onnx_path = analyse(_bench_export(m, x, tmp_path / "m.onnx"), step=8, model_name="module")
    magnitude_importance(onnx_path.problem, weight_slices(onnx_path), norm="l1")  # pipeline.prepare
    assert not any(n.op_type == "BatchNormalization" for n in onnx_path.model.graph.node)
    assert structure_differences(onnx_path, graph.analysis) == []
    pa, pb = onnx_path.problem, graph.problem
    assert len(pa.groups) == len(pb.groups) and len(pa.blocks) == len(pb.blocks) == 3 * ((depth - 2) // 6) - 2
    for ga, gb in zip(pa.groups, pb.groups):
        np.testing.assert_allclose(ga.importance, gb.importance, rtol=1e-6)
    plans = []
    for prob in (pa, pb):
        inp = SolveInput(prob, analytic_costs(prob, "flops"), 0.5 * dense_count(prob, "flops"),
                         allow_block_removal=True)
        plans.append(solve_milp(inp))
    assert plans[0].kept == plans[1].kept and plans[0].removed_blocks == plans[1].removed_blocks
    assert plans[0].widths == plans[1].widths
    # and the plan applies to the module's export: valid, smaller, same interface
    pruned = export_pruned(graph, plans[1])
    onnx.checker.check_model(pruned, full_check=True)
    assert [o.name for o in pruned.graph.output] == ["logits"]
