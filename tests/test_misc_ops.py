"""Analysis and surgery through MaxPool, grouped conv, SE broadcast Mul, ConvTranspose,
Resize and a Reshape-to-MatMul head."""
import numpy as np
import onnx
import pytest

from conftest import run_model
from onnx_builders import misc_ops_cnn
from latprune.pruner.analysis import analyse
from latprune.pruner.surgery import apply_plan
from latprune.types import Plan


@pytest.fixture(scope="module")
def analysed():
    model = misc_ops_cnn()
    return model, analyse(model)


def _layer(an, op, nth=0):
    return [l for l in an.problem.layers if l.spec.op == op][nth]


def test_groups_through_misc_ops(analysed):
    _, an = analysed
    prob = an.problem
    # the grouped conv (group=2, 8 channels per group) is pruned by whole groups: its input
    # (the stem's 16 channels) and its output are one group of 2 units of 8 channels each
    (grouped,) = [l for l in prob.layers if l.spec.group_channels == 8]
    assert grouped.c_in.terms == grouped.c_out.terms and grouped.c_in.terms[0][1] == 8
    unit_group = prob.groups[grouped.c_in.terms[0][0]]
    assert unit_group.size == 2 and unit_group.prunable and unit_group.candidate_widths == [1, 2]
    assert an.notes == []
    # ConvTranspose is a layer, and its output group (16) is prunable
    ct = _layer(an, "ConvTranspose")
    assert ct.c_out.fixed == 0 and len(ct.c_out.terms) == 1
    assert prob.groups[ct.c_out.terms[0][0]].size == 16
    # the SE excitation conv's output is tied (by the Mul) to the 24-channel conv output
    sizes = sorted(g.size for g in prob.groups if g.prunable)
    assert 24 in sizes and 8 in sizes
    # MatMul after Reshape: input space is the last conv's 8 channels × 16 features each
    mm = _layer(an, "Gemm")
    assert mm.dense_c_in == 128 and mm.c_in.terms[0][1] == 16


def test_zero_plan_and_random_plans(analysed):
    model, an = analysed
    x = np.random.default_rng(0).normal(size=(1, 3, 16, 16)).astype(np.float32)
    ref = run_model(model, x)
    same = apply_plan(an, Plan(kept={}))
    assert np.abs(run_model(same, x) - ref).max() <= 1e-5
    rng = np.random.default_rng(1)
    for _ in range(5):
        kept = {g.id: sorted(rng.choice(g.size, size=int(rng.integers(1, g.size + 1)), replace=False).tolist())
                for g in an.problem.groups if g.prunable}
        pruned = apply_plan(an, Plan(kept=kept))
        onnx.checker.check_model(pruned, full_check=True)
        assert run_model(pruned, x).shape == ref.shape
