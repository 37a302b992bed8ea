"""Data-driven pruning on real ONNX Runtime runs: distortion curves (pruner.distortion),
post-pruning repair (pruner.repair) and per-channel statistics (pruner.channel_stats)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_builders import aliased_weights_cnn, depthwise_cnn, pad_shortcut_cnn, residual_cnn
from latprune.pruner.analysis import analyse, consumer_slices, weight_slices
from latprune.pruner.channel_stats import activation_scores, bn_scale_scores
from latprune.pruner.distortion import DistortionCurves, cache_key, joint_distortion, measure_distortion, mse
from latprune.pruner.forward import Runner
from latprune.pruner import repair as repair_module
from latprune.pruner.repair import repair, repair_samples
from latprune.pruner.surgery import apply_plan
from latprune.solver.importance import magnitude_importance
from latprune.solver.objective import importance_objective
from latprune.solver.problem_costs import make_plan
from latprune.solver.uniform import uniform_widths
from latprune.types import InputError, Plan


def _noise(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)


def _analysed(builder):
    analysis = analyse(builder(), step=8, max_candidates=3)
    magnitude_importance(analysis.problem, weight_slices(analysis))
    return analysis


@pytest.fixture(scope="module")
def residual():
    return _analysed(residual_cnn)


# ---- distortion curves ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def curves(residual, tmp_path_factory):
    x = _noise(16, 0)
    orders = importance_objective(residual.problem).orders
    cache = tmp_path_factory.mktemp("distortion")
    calls = []
    first = measure_distortion(residual, x, orders, blocks=True, cache_dir=cache,
                               progress=lambda d, t: calls.append((d, t)))
    return first, x, orders, cache, calls


def test_distortion_is_zero_at_full_width_and_non_negative(residual, curves):
    c, x, _, _, _ = curves
    prob = residual.problem
    prunable = [g for g in prob.groups if g.prunable]
    assert set(c.values) == set(c.widths) == {g.id for g in prunable}
    assert c.samples == len(x) and c.method == "forward"
    for g in prunable:
        assert c.widths[g.id] == g.candidate_widths
        vals = c.values[g.id]
        assert len(vals) == len(g.candidate_widths)
        assert vals[-1] == 0.0  # the full width
        assert all(v >= 0 and np.isfinite(v) for v in vals)
        assert all(v > 0 for v in vals[:-1])  # cutting a random net changes its logits


def test_group_distortion_equals_joint_distortion_of_the_single_group_plan(residual, curves):
    c, x, orders, _, _ = curves
    reference = Runner(residual.model).logits(x)
    for g in residual.problem.groups:
        if not g.prunable:
            continue
        for w, d in zip(g.candidate_widths[:-1], c.values[g.id][:-1]):
            plan = Plan(kept={g.id: sorted(orders[g.id][:w])})
            assert joint_distortion(residual, x, plan, reference) == pytest.approx(d, rel=1e-6)
    # the reference defaults to the dense model's own outputs
    g = next(g for g in residual.problem.groups if g.prunable)
    plan = Plan(kept={g.id: sorted(orders[g.id][:g.candidate_widths[0]])})
    assert joint_distortion(residual, x, plan) == pytest.approx(c.values[g.id][0], rel=1e-6)


def test_distortion_has_a_value_per_block(residual, curves):
    c, x, _, _, _ = curves
    prob = residual.problem
    assert set(c.blocks) == {b.id for b in prob.blocks} and len(prob.blocks) == 2
    reference = Runner(residual.model).logits(x)
    for b in prob.blocks:
        inner = {g.id: [] for g in prob.groups if g.prunable and g.inner_of_block == b.id}
        pruned = apply_plan(residual, Plan(kept=inner, removed_blocks=[b.id]), check=False)
        assert c.blocks[b.id] > 0
        assert c.blocks[b.id] == pytest.approx(mse(Runner(pruned).logits(x), reference), rel=1e-6)


def test_distortion_cache_is_written_and_reused(residual, curves):
    first, x, orders, cache, calls = curves
    files = sorted(cache.glob("distortion-*.json"))
    assert len(files) == 1
    assert DistortionCurves.from_json(files[0].read_text()) == first
    n_jobs = sum(len(g.candidate_widths) - 1 for g in residual.problem.groups if g.prunable) + 2
    assert calls and calls[-1] == (n_jobs, n_jobs)
    again_calls = []
    again = measure_distortion(residual, x, orders, blocks=True, cache_dir=cache,
                               progress=lambda d, t: again_calls.append((d, t)))
    assert again == first
    assert again.seconds == first.seconds  # the stored run, not a new measurement
    assert again_calls == []  # no pruned variant was run
    assert sorted(cache.glob("distortion-*.json")) == files
    # other inputs are another entry
    other = measure_distortion(residual, x[:8], orders, blocks=True, cache_dir=cache)
    assert other.samples == 8
    assert len(list(cache.glob("distortion-*.json"))) == 2


def test_a_foreign_or_broken_cache_file_is_measured_again(residual, curves, tmp_path):
    """A cache written by another version (an extra key) still reads; a truncated one is
    measured again and replaced, never an error."""
    first, x, orders, cache, _ = curves
    cached = cache / f"distortion-{cache_key(residual, x, orders, True)}.json"
    extra = json.loads(cached.read_text()) | {"written_by": "a later version"}
    assert DistortionCurves.from_json(json.dumps(extra)) == first
    broken = tmp_path / cached.name
    broken.write_text(cached.read_text()[:40])
    again = measure_distortion(residual, x, orders, blocks=True, cache_dir=tmp_path)
    assert again.values == first.values and again.blocks == first.blocks
    assert DistortionCurves.from_json(broken.read_text()) == again


def test_distortion_without_blocks_or_groups(residual, curves):
    c, x, orders, _, _ = curves
    no_blocks = measure_distortion(residual, x, orders, blocks=False)
    assert no_blocks.blocks == {}
    assert no_blocks.values == c.values
    only_blocks = measure_distortion(residual, x, {}, blocks=True, groups=False)
    assert only_blocks.blocks == pytest.approx(c.blocks, rel=1e-6)
    assert all(v == 0.0 for vals in only_blocks.values.values() for v in vals)


# ---- repair --------------------------------------------------------------------------------

def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _layer_param_shapes(model: onnx.ModelProto):
    """[(node name, op, weight shape, bias shape or None)] for Conv/Gemm nodes."""
    inits = _inits(model)
    out = []
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm", "ConvTranspose", "MatMul"):
            w = inits.get(n.input[1])
            b = inits.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            out.append((n.name, n.op_type, None if w is None else w.shape, None if b is None else b.shape))
    return out


def _io(model: onnx.ModelProto):
    return ([(v.name, str(v.type)) for v in model.graph.input],
            [(v.name, str(v.type)) for v in model.graph.output])


@pytest.mark.parametrize("builder", [residual_cnn, depthwise_cnn])
@pytest.mark.parametrize("mode", ["lsq", "bias"])
def test_repair_of_an_empty_plan_changes_nothing(builder, mode):
    analysis = _analysed(builder)
    x, held = _noise(16, 0), _noise(8, 1)
    for plan in (Plan(kept={}),  # nothing pruned
                 Plan(kept={g.id: list(range(g.size)) for g in analysis.problem.groups if g.prunable})):
        pruned = apply_plan(analysis, plan)
        repaired = repair(analysis, plan, pruned, x, mode=mode)
        for inputs in (x, held):
            ref = Runner(pruned).logits(inputs)
            out = Runner(repaired).logits(inputs)
            assert np.linalg.norm(out - ref) <= 1e-4 * np.linalg.norm(ref)


def _real_plans(analysis):
    prob = analysis.problem
    plans = [("uniform 0.5", make_plan(prob, uniform_widths(prob, 0.5), set(), "uniform"))]
    if prob.blocks:
        widths = uniform_widths(prob, 0.75)
        plans.append(("block removed", make_plan(prob, widths, {prob.blocks[0].id}, "test")))
    return plans


REPAIR_CASES = [(residual_cnn, "uniform 0.5"), (residual_cnn, "block removed"),
                (aliased_weights_cnn, "uniform 0.5"), (pad_shortcut_cnn, "uniform 0.5")]


@pytest.mark.parametrize("builder,which", REPAIR_CASES,
                         ids=[f"{b.__name__}-{w.replace(' ', '_')}" for b, w in REPAIR_CASES])
def test_lsq_repair_reduces_output_error(builder, which):
    analysis = _analysed(builder)
    plan = dict(_real_plans(analysis))[which]
    x, held = _noise(32, 0), _noise(32, 1)
    pruned = apply_plan(analysis, plan)
    lsq = repair(analysis, plan, pruned, x, mode="lsq")
    bias = repair(analysis, plan, pruned, x, mode="bias")
    dense = Runner(analysis.model)
    for inputs in (x, held):  # calibration inputs, and fresh ones of the same distribution
        ref = dense.logits(inputs)
        e_none = mse(Runner(pruned).logits(inputs), ref)
        e_lsq = mse(Runner(lsq).logits(inputs), ref)
        e_bias = mse(Runner(bias).logits(inputs), ref)
        assert e_none > 0
        assert e_lsq < 0.5 * e_none, (e_lsq, e_none)
        assert e_bias < e_none, (e_bias, e_none)

    # a valid model with the same interface and the same (latency-relevant) layer shapes
    for model in (lsq, bias):
        onnx.checker.check_model(model, full_check=True)
        assert _io(model) == _io(pruned)
        assert [(n.name, n.op_type) for n in model.graph.node] == [(n.name, n.op_type) for n in pruned.graph.node]
        before, after = _layer_param_shapes(pruned), _layer_param_shapes(model)
        assert [s[:3] for s in before] == [s[:3] for s in after]
        for (_, op, wshape, b0), (_, _, _, b1) in zip(before, after):
            if b0 is not None:
                assert b1 == b0
            elif b1 is not None:  # a bias added by the repair: one per output channel
                assert op == "Conv" and b1 == (wshape[0],)
        assert all(np.isfinite(a).all() for a in _inits(model).values())
    # the input model is not modified
    assert mse(Runner(pruned).logits(x), Runner(apply_plan(analysis, plan)).logits(x)) == 0.0


def test_repair_none_is_a_copy(residual):
    plan = _real_plans(residual)[0][1]
    pruned = apply_plan(residual, plan)
    out = repair(residual, plan, pruned, _noise(4, 0), mode="none")
    assert out is not pruned
    assert out.SerializeToString() == pruned.SerializeToString()


def test_repair_rejects_an_unknown_mode(residual):
    plan = _real_plans(residual)[0][1]
    pruned = apply_plan(residual, plan)
    with pytest.raises(InputError, match="bogus"):
        repair(residual, plan, pruned, _noise(4, 0), mode="bogus")


# ---- channel statistics --------------------------------------------------------------------

def test_activation_scores_one_non_negative_score_per_channel(residual):
    scores = activation_scores(residual, _noise(16, 0))
    prob = residual.problem
    assert set(scores) == {g.id for g in prob.groups if g.prunable}
    for gid, s in scores.items():
        assert len(s) == prob.groups[gid].size
        assert all(np.isfinite(v) and v >= 0 for v in s)
        assert sum(s) > 0


def test_activation_score_is_zero_when_consumer_weights_are_zeroed():
    analysis = _analysed(residual_cnn)
    prob = analysis.problem
    rows = consumer_slices(analysis)
    x = _noise(16, 0)
    for gid in [g.id for g in prob.groups if g.prunable]:
        channel = 3
        inits = {i.name: i for i in analysis.model.graph.initializer}
        for r in rows[gid]:
            if r.group_pos != channel:
                continue
            p, w_name, axis = r.position, r.weight, r.weight_axis
            arr = numpy_helper.to_array(inits[w_name]).copy()
            index = [slice(None)] * arr.ndim
            index[axis] = p
            arr[tuple(index)] = 0.0
            inits[w_name].CopyFrom(numpy_helper.from_array(arr, w_name))
    scores = activation_scores(analysis, x)
    for gid, s in scores.items():
        assert s[3] == 0.0, gid
        assert all(v > 0 for i, v in enumerate(s) if i != 3), gid


def test_bn_scale_scores_without_batch_norm_is_none():
    assert bn_scale_scores(_analysed(aliased_weights_cnn)) is None
    assert bn_scale_scores(_analysed(depthwise_cnn)) is None


def test_bn_scale_scores_sum_abs_gamma(residual):
    scores = bn_scale_scores(residual)
    inits = _inits(residual.model)
    gammas = [np.abs(inits[n.input[1]].astype(np.float64))
              for n in residual.model.graph.node if n.op_type == "BatchNormalization"]
    assert [len(g) for g in gammas] == [16, 24, 16, 24, 16]  # stem, then two blocks (a, b)
    prob = residual.problem
    trunk = next(g.id for g in prob.groups if g.prunable and g.size == 16 and g.inner_of_block is None)
    inner = {g.inner_of_block: g.id for g in prob.groups if g.inner_of_block is not None}
    # the trunk channels are written by the stem BN and by the last BN of each block (the Add)
    expect = {trunk: gammas[0] + gammas[2] + gammas[4], inner[0]: gammas[1], inner[1]: gammas[3]}
    assert set(scores) == set(expect)  # groups written by no BN have no score
    for gid, s in expect.items():
        assert scores[gid] == pytest.approx(list(s), rel=1e-6)


@pytest.mark.parametrize("name", ["channels_last", "yolo_like", "grouped_se", "shuffle"])
def test_lsq_repair_on_modern_blocks(name):
    """Repair refits convs and MatMul layers (a MatMul's bias lives in the Add after it) of
    the modern blocks; the detector's error is taken on its whole output."""
    from onnx_builders import MODERN_BUILDERS

    analysis = analyse(MODERN_BUILDERS[name](), step=8, max_candidates=3)
    magnitude_importance(analysis.problem, weight_slices(analysis))
    plan = _real_plans(analysis)[0][1]
    dims = [d.dim_value for d in analysis.model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(0)
    x, held = (rng.standard_normal([32] + dims[1:]).astype(np.float32) for _ in range(2))
    pruned = apply_plan(analysis, plan)
    lsq = repair(analysis, plan, pruned, x, mode="lsq")
    onnx.checker.check_model(lsq, full_check=True)
    assert _io(lsq) == _io(pruned)
    dense = Runner(analysis.model)
    for inputs in (x, held):
        ref = dense.logits(inputs)
        e_none, e_lsq = mse(Runner(pruned).logits(inputs), ref), mse(Runner(lsq).logits(inputs), ref)
        assert e_none > 0 and e_lsq < e_none, (e_lsq, e_none)
    if name == "channels_last":  # the MatMuls were refitted, their bias Adds too
        refit = {n.name for n in lsq.graph.node if any("__repaired_W" in i for i in n.input)}
        assert sum(n.op_type == "MatMul" and n.name in refit for n in lsq.graph.node) >= 2
        assert any("__repaired_B" in i for n in lsq.graph.node if n.op_type == "Add" for i in n.input)


# ---- the held-out check of a refit ---------------------------------------------------------

def _gemm_fit(n_items: int, noise: float, seed: int = 0):
    """(refit or None, true W, starting W) for a 64-in, 8-out Gemm whose targets are x @ W_true.T
    plus `noise`, starting from W_true perturbed."""
    from latprune.pruner.ops.layers import Gemm
    from latprune.pruner.repair import _least_squares
    rng = np.random.default_rng(seed)
    w_true = rng.standard_normal((8, 64))
    w_start = w_true + 0.3 * rng.standard_normal(w_true.shape)
    x = rng.standard_normal((n_items, 64)).astype(np.float32)
    y = (x @ w_true.T + noise * rng.standard_normal((n_items, 8))).astype(np.float32)
    node = onnx.helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)
    fit = _least_squares(x, y, w_start, np.zeros(8), node, Gemm(), w_true.shape, ridge=1e-6, chunk=16)
    return fit, w_true, w_start


def test_refit_is_kept_when_it_generalises_to_held_out_items():
    fit, w_true, w_start = _gemm_fit(n_items=512, noise=0.01)
    assert fit is not None
    assert np.abs(fit[0] - w_true).max() < 0.05 < np.abs(w_start - w_true).max()


def test_refit_from_too_few_items_is_rejected_by_the_held_out_check():
    # 24 fitting rows for 65 features and targets that are mostly noise: the fit matches the
    # calibration items and is worse than the starting weights on the held-out ones
    fit, _, _ = _gemm_fit(n_items=32, noise=5.0)
    assert fit is None


# ---- forward passes of graphs that hard-code a batch of 1 ----------------------------------

def _fixed_batch_graph(merge_batch: bool) -> onnx.ModelProto:
    """x (1, 4) -> Reshape to a hard-coded (1, -1) -> Add a (1, 4) constant (fails for a batch
    above 1), or -> ReduceSum over the merged axis (runs, but its output loses the batch)."""
    from onnx import TensorProto, helper

    tail = (helper.make_node("ReduceSum", ["r"], ["y"], keepdims=1, axes=[1]) if merge_batch
            else helper.make_node("Add", ["r", "c"], ["y"]))
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "s"], ["r"]), tail], "fixed_batch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1 if merge_batch else 4])],
        [numpy_helper.from_array(np.array([1, -1], np.int64), "s"),
         numpy_helper.from_array(np.arange(4, dtype=np.float32)[None], "c")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])


@pytest.mark.parametrize("merge_batch", [False, True], ids=["fails_batched", "merges_the_batch"])
def test_runner_goes_item_by_item_when_the_graph_fixes_the_batch(merge_batch):
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    got = Runner(_fixed_batch_graph(merge_batch)).logits(x)
    want = x.sum(axis=1, keepdims=True) if merge_batch else x + np.arange(4, dtype=np.float32)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6)


# ---- label-free recovery (pruner.recover, issue 16) ----------------------------------------

def test_label_free_recovery_moves_the_pruned_outputs_towards_the_dense_ones(residual):
    """Distillation steps on calibration inputs bring the pruned model's outputs closer to the
    dense model's on inputs it never saw, keep the graph (so the latency) as it is, and report
    the held-out loss of the weights they wrote."""
    pytest.importorskip("torch")
    from latprune.pruner.recover import recover

    plan = _real_plans(residual)[0][1]
    pruned = apply_plan(residual, plan)
    x, held = _noise(64, 0), _noise(32, 1)
    recovered, rec = recover(residual.model, pruned, x, steps=60, lr=1e-3, batch=16, eval_every=10)
    dense = Runner(residual.model)
    ref = dense.logits(held)
    assert mse(Runner(recovered).logits(held), ref) < 0.8 * mse(Runner(pruned).logits(held), ref)
    assert 0 < rec.best_step <= 60 and rec.holdout_loss_after < rec.holdout_loss_before
    onnx.checker.check_model(recovered, full_check=True)
    assert [(n.name, n.op_type) for n in recovered.graph.node] == [(n.name, n.op_type) for n in pruned.graph.node]
    assert _layer_param_shapes(recovered) == _layer_param_shapes(pruned)
    with pytest.raises(InputError):
        recover(residual.model, pruned, x[:1], steps=5)
    with pytest.raises(InputError):
        recover(residual.model, pruned, x, steps=0)
    assert rec.mixed_inputs  # a float input: blended inputs, the teacher run online (the default)


def test_recovery_on_fixed_inputs_and_under_a_time_cap(residual):
    """mix=False distils on the calibration inputs as they are (the teacher's outputs computed
    once); a time cap cuts the steps to what fits, after the few steps that time them, and the
    report gives the steps run and the steps asked."""
    pytest.importorskip("torch")
    from latprune.pruner.recover import TIMED_STEPS, recover

    pruned = apply_plan(residual, _real_plans(residual)[0][1])
    x = _noise(64, 0)
    _, rec = recover(residual.model, pruned, x, steps=30, lr=1e-3, batch=16, eval_every=10, mix=False)
    assert not rec.mixed_inputs and rec.steps == rec.steps_asked == 30
    assert rec.holdout_loss_after < rec.holdout_loss_before
    capped, rec = recover(residual.model, pruned, x, steps=10_000, batch=16, eval_every=10, max_seconds=1e-3)
    assert rec.steps_asked == 10_000 and rec.steps == TIMED_STEPS
    onnx.checker.check_model(capped, full_check=True)


def test_fitting_steps_follow_the_pace_of_the_first_steps():
    from latprune.pruner.recover import fitting_steps

    # 5 steps in 1 s, a held-out check every 25 steps: 0.208 s per step, 100 s left -> 480
    assert fitting_steps(100.0, 1.0, 5, 25, 600) == 480
    assert fitting_steps(1000.0, 1.0, 5, 25, 600) == 600  # never more than asked
    assert fitting_steps(0.0, 1.0, 5, 25, 600) == 5  # never fewer than already run
    assert fitting_steps(-3.0, 1.0, 5, 25, 600) == 5


def test_recovery_runs_by_default_only_with_a_calibration_file_and_torch(monkeypatch):
    """--recover-steps unset: DEFAULT_STEPS with a calibration file and repair (torch
    installed), off for the zero-data noise, without --calib, with --repair none, and off when
    torch is missing; an explicit count is kept as given."""
    import importlib.util

    from latprune.options import OptimizeOptions
    from latprune.pruner.recover import DEFAULT_STEPS

    opts = OptimizeOptions(speedup=2, calib="calib.npz")
    has_torch = importlib.util.find_spec("torch") is not None
    assert opts.recover_steps is None and opts.resolved_recover_steps() == (DEFAULT_STEPS if has_torch else 0)
    assert OptimizeOptions(speedup=2, calib="noise").resolved_recover_steps() == 0
    assert OptimizeOptions(speedup=2).resolved_recover_steps() == 0
    assert OptimizeOptions(speedup=2, calib="c.npz", repair="none").resolved_recover_steps() == 0
    assert OptimizeOptions(speedup=2, calib="c.npz", recover_steps=0).resolved_recover_steps() == 0
    assert OptimizeOptions(speedup=2, calib="noise", recover_steps=7).resolved_recover_steps() == 7
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert opts.resolved_recover_steps() == 0


def test_repair_samples_are_capped_by_the_dense_activations_they_hold(residual, monkeypatch):
    """repair holds every repaired layer's dense output for all its inputs: the number of inputs
    it reads is what fits REPAIR_MEMORY_BYTES (per input: the layers' output bytes, here
    measured by running the model), at most REPAIR_SAMPLES and what the file holds."""
    names = [n.output[0] for n in residual.model.graph.node if n.name in {l.name for l in residual.problem.layers}]
    per_item = sum(a.nbytes for a in Runner(residual.model, names).run(_noise(1, 0)).values())
    assert repair_samples(residual, 10_000) == repair_module.REPAIR_SAMPLES
    assert repair_samples(residual, 40) == 40
    monkeypatch.setattr(repair_module, "REPAIR_MEMORY_BYTES", 5 * per_item)
    assert repair_samples(residual, 10_000) == 5
    monkeypatch.setattr(repair_module, "REPAIR_MEMORY_BYTES", per_item // 2)
    assert repair_samples(residual, 10_000) == 1
