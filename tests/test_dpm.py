"""pruner.dpm (Decay Pruning Method) and latprune.finetune: exact zeros after the decay, no
change in output when the decayed channels are cut, the linear norm schedule, the one-shot
baseline, self-rectifying swaps, the training loop and the CLI's error path."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from conftest import ort_session  # noqa: E402
from latprune.models_cifar import cifar_resnet  # noqa: E402
from latprune.pruner.dpm import DecayPruner, one_shot_mask  # noqa: E402
from latprune.pruner.torch_frontend import analyse_module, export_pruned  # noqa: E402
from latprune.types import Plan  # noqa: E402
from test_torch_frontend import _one_torch_thread, randomise_bn  # noqa: E402,F401  (shared fixture, builder)


def resnet14(seed: int = 0):
    """CIFAR ResNet-14 (2 blocks per stage, 4 removable) at 16×16."""
    torch.manual_seed(seed)
    m = cifar_resnet(14).eval()
    randomise_bn(m, seed)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(seed + 1))
    return m, x, analyse_module(m, x, step=4)


def half_plan(graph, removed_blocks=()) -> Plan:
    """Keep the best-ranked half of every prunable group (inner groups of removed blocks: none)."""
    kept = {}
    for g in graph.problem.groups:
        if not g.prunable:
            continue
        if g.inner_of_block in removed_blocks:
            kept[g.id] = []
            continue
        order = np.argsort(-np.asarray(g.importance), kind="stable")
        kept[g.id] = sorted(int(i) for i in order[: g.size // 2])
    return Plan(kept=kept, removed_blocks=list(removed_blocks), widths={k: len(v) for k, v in kept.items()},
                method="test")


def train(module, pruner, steps: int, lr: float = 0.05, batch: int = 4, hw: int = 16, seed: int = 0,
          loss_fn=None, weight_decay: float = 0.0):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    module.train()
    for _ in range(steps):
        x = torch.randn(batch, 3, hw, hw, generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
        out = module(x)
        loss = F.cross_entropy(out, y) if loss_fn is None else loss_fn(module, x, out)
        opt.zero_grad()
        loss.backward()
        pruner.before_step()
        opt.step()
        pruner.after_step()
    module.eval()


def removed_entries(graph, plan):
    """(tensor, axis, index) of every decaying producer entry of the channels and blocks the
    plan removes (what must be exactly zero at the end)."""
    prob = graph.problem
    removed_nodes = {n for b in plan.removed_blocks for n in prob.blocks[b].branch_nodes}
    out = []
    for gid, kept in plan.kept.items():
        if prob.groups[gid].inner_of_block in plan.removed_blocks:
            continue
        for s in graph.param_slices[gid]:
            if s.role == "producer" and s.decays and s.node not in removed_nodes:
                sel = ~np.isin(s.positions, kept)
                out.append((s.name, s.axis, s.index[sel]))
    for b in plan.removed_blocks:
        out += [(s.name, s.axis, s.index) for s in graph.block_slices[b] if s.decays]
    return out


def entry_values(graph, entries):
    tensors = graph.tensors()
    return [tensors[n].detach().index_select(a, torch.as_tensor(i)) for n, a, i in entries if len(i)]


def test_decay_reaches_exact_zero_and_cutting_changes_nothing():
    m, x, graph = resnet14()
    plan = half_plan(graph, removed_blocks=[1])
    dpm = DecayPruner(graph, plan, decay_steps=6, rectify=False)
    entries = removed_entries(graph, plan)
    before = [float(v.norm()) for v in entry_values(graph, entries)]
    train(m, dpm, 3)
    mid = [float(v.norm()) for v in entry_values(graph, entries)]
    assert all(b == 0 or 0 < a < b for a, b in zip(mid, before))  # smooth: shrinking, not zero yet
    train(m, dpm, 5)  # 8 steps > N: zero from step 6 on, and kept at zero
    assert dpm.complete
    assert all(bool((v == 0).all()) for v in entry_values(graph, entries))
    final = dpm.finish()  # verifies the pruned ONNX against the module on the example input
    assert final.kept == plan.kept and final.widths == plan.widths and final.removed_blocks == [1]
    pruned = export_pruned(graph, final)
    onnx.checker.check_model(pruned, full_check=True)
    sess = ort_session(pruned)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        xi = torch.randn(1, 3, 16, 16, generator=gen)
        with torch.no_grad():
            ref = m(xi).numpy()
        np.testing.assert_allclose(sess.run(None, {"input": xi.numpy()})[0], ref, atol=1e-4)
    assert len([n for n in pruned.graph.node if n.op_type == "Conv"]) < \
        len([n for n in graph.onnx.graph.node if n.op_type == "Conv"])  # the block is gone


def test_norm_follows_the_linear_schedule():
    m, x, graph = resnet14(seed=1)
    plan = half_plan(graph)
    n_steps = 5
    dpm = DecayPruner(graph, plan, decay_steps=n_steps, rectify=False)
    units = sorted(dpm.active)
    norm0 = dpm._norms()[units]
    opt = torch.optim.SGD(m.parameters(), lr=0.0)  # weights move only by the decay
    m.train()
    for n in range(1, n_steps + 1):
        F.cross_entropy(m(torch.randn(2, 3, 16, 16)), torch.tensor([0, 1])).backward()
        dpm.before_step()
        opt.step()
        dpm.after_step()
        np.testing.assert_allclose(dpm._norms()[units], norm0 * (n_steps - n) / n_steps, rtol=1e-5, atol=1e-12)
    assert (dpm._norms()[units] == 0).all()


def test_one_shot_keeps_channels_at_zero_through_optimizer_steps():
    m, x, graph = resnet14(seed=2)
    plan = half_plan(graph, removed_blocks=[0])
    pruner = one_shot_mask(graph, plan)
    entries = removed_entries(graph, plan)
    assert all(bool((v == 0).all()) for v in entry_values(graph, entries))  # at once
    masks = pruner.decay_masks()
    assert masks and all(m_.any() for m_ in masks.values())
    train(m, pruner, 3, weight_decay=5e-4)
    assert all(bool((v == 0).all()) for v in entry_values(graph, entries))
    kept_vals = entry_values(graph, [(s.name, s.axis, s.index) for s in graph.block_slices[2]])
    assert any(float(v.abs().sum()) > 0 for v in kept_vals)  # other blocks untouched
    final = pruner.finish()
    assert final.kept == plan.kept and final.removed_blocks == [0]


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        self.act = F.relu(self.bn1(self.c1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.c2(self.act)), 1), 1))


def test_self_rectifying_swaps_a_resisting_channel():
    torch.manual_seed(0)
    m = TinyNet().eval()
    x = torch.randn(1, 3, 8, 8)
    graph = analyse_module(m, x, step=2)
    gid, sl = next((g.id, s) for g in graph.problem.groups if g.prunable
                   for s in graph.param_slices[g.id] if s.name == "c1.weight")
    pos_of = dict(zip(sl.index.tolist(), sl.positions.tolist()))  # c1 channel -> group position
    kept = sorted(pos_of[c] for c in (0, 1, 2, 3))
    plan = Plan(kept={gid: kept}, widths={gid: 4}, method="test")
    scores = [0.0] * 8
    for c in range(8):
        scores[pos_of[c]] = 8.0 - c  # channel 3 is the least important kept one
    resisting = pos_of[5]
    dpm = DecayPruner(graph, plan, decay_steps=40, window=5, interval=1, scores={gid: scores})

    def loss_fn(module, _x, _out):  # depends only on channel 5: the loss wants it back
        return -module.act[:, 5].pow(2).mean()

    train(m, dpm, 40, lr=0.01, hw=8, loss_fn=loss_fn)
    assert len(dpm.swaps) == 1
    swap = dpm.swaps[0]
    assert (swap.group, swap.released, swap.replacement) == (gid, resisting, pos_of[3])
    assert swap.step == 4 and swap.escape_rate == 1.0 and swap.length > 2.0
    final = dpm.finish()
    assert final.widths == {gid: 4} and len(final.kept[gid]) == 4
    assert final.kept[gid] == sorted(pos_of[c] for c in (0, 1, 2, 5))
    assert float(m.c1.weight[5].detach().norm()) > 0 and float(m.c1.weight[3].detach().norm()) == 0.0
    assert float(m.bn1.weight[3].detach()) == 0.0 and float(m.bn1.bias[3].detach()) == 0.0


def test_no_swap_without_resistance():
    """Released only when both thresholds are passed: a loss indifferent to the decaying
    channels (zero gradient there) never swaps."""
    torch.manual_seed(0)
    m = TinyNet().eval()
    graph = analyse_module(m, torch.randn(1, 3, 8, 8), step=2)
    gid = next(g.id for g in graph.problem.groups if g.prunable and g.size == 8)
    plan = Plan(kept={gid: [0, 1, 2, 3]}, widths={gid: 4})
    dpm = DecayPruner(graph, plan, decay_steps=20, window=3, interval=1)
    train(m, dpm, 20, hw=8, loss_fn=lambda mod, _x, out: out.pow(2).mean() * 0 + mod.fc.bias.pow(2).sum())
    assert dpm.swaps == [] and dpm.finish().kept == plan.kept


def test_finetune_loop_on_synthetic_data():
    from latprune.finetune import finetune

    m, x, graph = resnet14(seed=3)
    plan = half_plan(graph, removed_blocks=[3])
    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(24, 3, 16, 16, generator=gen),
                                          torch.randint(0, 10, (24,), generator=gen))
    records = []
    res = finetune(m, graph, plan, "dpm-sr", epochs=2, lr=0.02, batch_size=8, train_set=data,
                   progress=records.append, log_every=2)
    assert res.total_steps == 6 and res.decay_steps == 3
    assert [r["epoch"] for r in res.history] == [1, 2]
    assert res.plan.widths == plan.widths and res.plan.removed_blocks == [3]
    assert all(bool((v == 0).all()) for v in entry_values(graph, removed_entries(graph, res.plan)))
    assert records and not m.training


def test_cifar_data_helpers():
    from latprune.finetune import CifarTrain, cifar_test, data_dir, evaluate
    from latprune.types import InputError

    try:
        data_dir()
    except InputError as exc:
        pytest.skip(str(exc))
    ds = CifarTrain(subset=20)
    assert len(ds) == 20 and sorted(set(ds.y.tolist())) == list(range(10))
    xi, yi = ds[0]
    assert tuple(xi.shape) == (3, 32, 32) and xi.dtype == torch.float32 and 0 <= yi < 10
    x, y = cifar_test(limit=20)
    assert x.shape == (20, 3, 32, 32) and len(set(y.tolist())) == 10
    assert 0.0 <= evaluate(cifar_resnet(8), x, y) <= 1.0


def test_cli_finetune_bad_input_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "latprune.cli", "finetune", "--model", str(tmp_path / "no.pt"),
                           "--speedup", "1.5", "--data", str(tmp_path), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_dpm_on_a_vit_heads_mlp_and_a_block():
    """The torch frontend takes a ViT written like timm's (fused qkv Linear, unbind, GELU MLP):
    heads and MLP widths map to module tensors (Linear weights read transposed by MatMul), DPM
    decays them to exact zeros and cutting them changes no output."""
    from latprune.models_vit import cifar_vit

    torch.manual_seed(0)
    m = cifar_vit(image=16, patch=4, dim=32, depth=2, heads=4, mlp_ratio=2.0).eval()
    for p in m.parameters():  # non-zero biases and norms: every parameter stays in the graph
        with torch.no_grad():
            p.add_(0.02 * torch.randn_like(p))
    x = torch.randn(1, 3, 16, 16)
    graph = analyse_module(m, x, step=2)
    prob = graph.problem
    heads = [g for g in prob.groups if g.prunable and g.size == 4]
    mlp = [g for g in prob.groups if g.prunable and g.size == 64]
    assert len(heads) == 2 and len(mlp) == 2 and not [g for g in prob.groups if g.prunable and g.size == 32]
    names = {s.name for g in heads for s in graph.param_slices[g.id]}
    assert {"blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight"} <= names
    plan = half_plan(graph, removed_blocks=[prob.groups[mlp[1].id].inner_of_block])
    dpm = DecayPruner(graph, plan, decay_steps=4, rectify=False)
    train(m, dpm, 6)
    assert dpm.complete
    assert all(bool((v == 0).all()) for v in entry_values(graph, removed_entries(graph, plan)))
    pruned = export_pruned(graph, dpm.finish())
    sess = ort_session(pruned)
    with torch.no_grad():
        ref = m(x).numpy()
    np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], ref, atol=1e-4)


def test_cli_finetune_plans_from_its_own_training_images_by_default(tmp_path):
    """Without --calib, `latprune finetune` plans with the distortion objective measured on its
    own training images; --calib none keeps the magnitude prior; without --method it prunes
    one-shot. (A few steps on ResNet-20.)"""
    import json

    from latprune.finetune import data_dir
    from latprune.types import InputError

    try:
        data_dir()
    except InputError as exc:
        pytest.skip(str(exc))
    objectives = {}
    for name, extra in (("default", []), ("prior", ["--calib", "none", "--distill", "0"])):
        out = tmp_path / name
        proc = subprocess.run([sys.executable, "-m", "latprune.cli", "finetune", "--model", "resnet20",
                               "--speedup", "1.2", "--epochs", "0.02", "--subset", "200",
                               "--batch-size", "32", "--test-limit", "100", "--step", "16",
                               "--lut", str(tmp_path / "lut.sqlite"),
                               "--out", str(out), "-q", *extra], capture_output=True, text=True, timeout=900)
        assert proc.returncode in (0, 3), proc.stderr[-2000:]
        report = json.loads((out / "report.json").read_text())
        objectives[name] = report["scoring"]["objective"]
        assert report["method"] == "oneshot" and report["finetune"]["decay_steps"] in (0, None)
        assert report["distill"] == (0.5 if name == "default" else 0.0)  # distillation by default
        assert 0 <= report["top1_after"] <= 100
    assert objectives == {"default": "distortion", "prior": "importance"}
