"""Shared fixtures: the ONNX builders, an ORT runner and a session-wide latency table."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from onnx_builders import ALL_BUILDERS  # noqa: E402

INPUT_SHAPE = (1, 3, 16, 16)


def ort_session(model: onnx.ModelProto):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), sess_options=opts,
                                providers=["CPUExecutionProvider"])


def run_model(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """Run `model` on input `x` (name "input") with ONNX Runtime; return the first output."""
    return ort_session(model).run(None, {"input": x})[0]


def random_inputs(n: int = 3, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(INPUT_SHAPE).astype(np.float32) for _ in range(n)]


@pytest.fixture(params=sorted(ALL_BUILDERS))
def builder_name(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def cli_workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="session")
def shared_lut(cli_workdir) -> Path:
    """One latency table for the whole session: layer cells are profiled once."""
    return cli_workdir / "lut.sqlite"


@pytest.fixture(scope="session")
def residual_path(cli_workdir) -> Path:
    from onnx_builders import residual_cnn

    p = cli_workdir / "residual.onnx"
    onnx.save(residual_cnn(), str(p))
    return p


def assert_plan_well_formed(prob, plan, removable=None) -> None:
    """Widths are candidates (0 for a removed block's inner groups), kept indices match them,
    only prunable groups are cut, and removed blocks are removable (when `removable` given)."""
    if removable is not None:
        assert set(plan.removed_blocks) <= set(removable)
    for g in prob.groups:
        if not g.prunable:
            assert g.id not in plan.kept
            continue
        w = plan.widths[g.id]
        if g.inner_of_block is not None and g.inner_of_block in plan.removed_blocks:
            assert w == 0
        else:
            assert w in g.candidate_widths
        if w < g.size:
            kept = plan.kept[g.id]
            assert len(kept) == w and kept == sorted(set(kept))


def assert_valid_pruned(pruned: onnx.ModelProto, dense: onnx.ModelProto) -> np.ndarray:
    """Full checker, same input/output names, runs in ONNX Runtime with the dense output shape.
    Returns the pruned model's output on one random input."""
    onnx.checker.check_model(pruned, full_check=True)
    assert [i.name for i in pruned.graph.input] == [i.name for i in dense.graph.input]
    assert [o.name for o in pruned.graph.output] == [o.name for o in dense.graph.output]
    x = random_inputs(1)[0]
    y = run_model(pruned, x)
    assert y.shape == run_model(dense, x).shape
    return y

# Real PostgreSQL / Redis servers for the service tests (scripts/servers.sh), session-wide.
from servers import free_port, postgres_url, redis_url  # noqa: E402,F401
