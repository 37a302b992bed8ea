"""The `latprune` command line, end to end in subprocesses (true exit codes)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import assert_valid_pruned
from onnx_builders import depthwise_cnn, residual_cnn
from latprune.types import Plan


def cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "latprune.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, contains: str = "") -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].strip()
    assert "Traceback" not in proc.stderr
    if contains:
        assert contains in lines[0], lines[0]
    return lines[0]


def assert_no_output(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


# ---- optimize on residual_cnn (run once per session) --------------------------------------

@pytest.fixture(scope="session")
def optimized(residual_path, shared_lut, cli_workdir):
    out = cli_workdir / "opt"
    proc = cli("optimize", residual_path, "--speedup", "1.3", "--out", out, "--lut", shared_lut,
               timeout=300)
    return proc, out


def test_optimize_writes_outputs_and_report(optimized):
    proc, out = optimized
    assert proc.returncode in (0, 3), proc.stderr
    for name in ("pruned.onnx", "plan.json", "report.json"):
        assert (out / name).is_file()
    assert sorted(p.name for p in out.iterdir()) == ["plan.json", "pruned.onnx", "report.html", "report.json"]
    report = json.loads((out / "report.json").read_text())
    for key in ("dense_ms", "budget_ms", "predicted_ms", "measured_ms"):
        assert isinstance(report[key], float) and report[key] > 0, key
    assert report["solver"]["method"] == "milp"
    assert report["solver"]["seconds"] >= 0
    assert report["budget_ms"] == pytest.approx(report["dense_ms"] / 1.3, rel=1e-9)
    assert report["meets_budget"] == (report["measured_ms"] <= report["budget_ms"])
    assert report["meets_budget"] == (proc.returncode == 0)
    assert bool(report["warnings"]) == (proc.returncode == 3)
    assert report["lut"]["cells_measured_now"] > 0
    assert report["groups"]["prunable"] > 0
    assert report["blocks"]["removable"] == 2
    # per-layer widths never exceed the dense ones
    for layer in report["layers"]:
        assert 0 <= layer["c_in"] <= layer["dense_c_in"]
        assert 0 <= layer["c_out"] <= layer["dense_c_out"]
        assert layer["removed"] == (layer["c_in"] == 0 and layer["c_out"] == 0)


def test_optimize_plan_matches_report(optimized):
    proc, out = optimized
    plan = Plan.from_json((out / "plan.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert plan.method == "milp"
    assert plan.predicted_ms == pytest.approx(report["predicted_ms"])
    assert plan.removed_blocks == report["blocks"]["removed"]
    for gid, idx in plan.kept.items():
        assert len(idx) == plan.widths[gid]


def test_optimized_model_is_valid_and_runs(optimized, residual_path):
    proc, out = optimized
    pruned = onnx.load(str(out / "pruned.onnx"))
    dense = onnx.load(str(residual_path))
    assert assert_valid_pruned(pruned, dense).shape == (1, 10)
    assert any(p.key == "latprune.family" for p in pruned.metadata_props)
    n = lambda m: sum(int(np.prod(i.dims)) for i in m.graph.initializer)  # noqa: E731
    assert n(pruned) <= n(dense)


def test_second_optimize_reuses_the_table(optimized, residual_path, shared_lut, cli_workdir):
    out = cli_workdir / "opt_uniform"
    proc = cli("optimize", residual_path, "--speedup", "1.2", "--out", out, "--lut", shared_lut,
               "--method", "uniform", "-q")
    assert proc.returncode in (0, 3), proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["lut"]["cells_measured_now"] == 0
    assert report["solver"]["method"] == "uniform"
    assert report["blocks"]["removed"] == []
    assert report["meets_budget"] == (proc.returncode == 0)


# ---- measure / profile / predict ----------------------------------------------------------

def test_measure_json(residual_path):
    proc = cli("measure", residual_path, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"median_ms", "p90_ms", "runs"}
    assert 0 < out["median_ms"] <= out["p90_ms"]
    assert isinstance(out["runs"], int) and out["runs"] >= 20


def test_profile_then_predict(optimized, residual_path, shared_lut):
    import sqlite3

    from latprune.lut.exchange import export_tables

    def cells():
        return {(json.dumps(c["signature"], sort_keys=True), c["c_in"], c["c_out"])
                for t in export_tables(shared_lut)["tables"] for c in t["cells"]}

    before = cells()
    proc = cli("profile", residual_path, "--lut", shared_lut, "-q")
    assert proc.returncode == 0, proc.stderr
    prof = json.loads(proc.stdout)
    # optimize filled the grid; profile adds only cells of widths that run the kernels'
    # fallback (or, under the block, the direct kernel) under the device's blocking rules
    # (recorded in the table), none twice
    from latprune.lut.blocking import BlockingRules
    from latprune.lut.store import blocking_records
    from latprune.types import LayerSpec

    db = sqlite3.connect(str(shared_lut))
    [fp_id] = {row[0] for row in db.execute("SELECT fingerprint FROM blocking")}
    rules = BlockingRules.from_records(blocking_records(db, fp_id))
    db.close()
    assert rules.rules, "profile records the blocking rules"
    added = cells() - before
    assert prof["cells_measured"] == len(added)
    assert all(rules.regime(LayerSpec(**json.loads(sig)), ci, co) != "fast" for sig, ci, co in added)
    again = json.loads(cli("profile", residual_path, "--lut", shared_lut, "-q").stdout)
    assert again["cells_measured"] == 0
    assert prof["cells_total"] > 0 and Path(prof["lut"]) == shared_lut
    proc = cli("predict", residual_path, "--lut", shared_lut, "--json")
    assert proc.returncode == 0, proc.stderr
    pred = json.loads(proc.stdout)
    assert pred["predicted_ms"] > 0 and pred["layer_sum_ms"] > 0
    assert pred["calibrated"] is True
    assert pred["layers"] == 9
    # the head's pooling runs outside the layers: its kernel is priced from the in-graph runs
    assert pred["outside_kernels"]["count"] >= 1 and pred["outside_kernels"]["ms"] > 0
    assert pred["outside_kernels"]["unpriced_classes"] == []
    text = cli("predict", residual_path, "--lut", shared_lut).stdout
    assert "other kernels outside the layers" in text
    db = sqlite3.connect(str(shared_lut))  # profile calibrated the graph's terms too (whole_model_ms)
    assert db.execute("SELECT COUNT(*) FROM calibration WHERE family LIKE '%/graph-calibration'").fetchone()[0] >= 3
    db.close()


def test_predict_a_model_pruned_elsewhere(optimized, residual_path, shared_lut, tmp_path):
    """A narrower copy built directly (no latprune surgery, no family tag): same layer specs,
    so the table predicts it, below the dense model."""
    from onnx_builders import residual_cnn

    narrow = tmp_path / "narrow.onnx"
    onnx.save(residual_cnn(width=8), str(narrow))
    dense = json.loads(cli("predict", residual_path, "--lut", shared_lut, "--json").stdout)
    proc = cli("predict", narrow, "--lut", shared_lut, "--json")
    assert proc.returncode == 0, proc.stderr
    pred = json.loads(proc.stdout)
    assert pred["layers"] == dense["layers"] and 0 < pred["layer_sum_ms"] < dense["layer_sum_ms"]


def test_profile_fills_an_empty_table(tmp_path, residual_path):
    lut = tmp_path / "fresh.sqlite"
    proc = cli("profile", residual_path, "--lut", lut, "--points", "2", "-q")
    assert proc.returncode == 0, proc.stderr
    prof = json.loads(proc.stdout)
    assert prof["cells_measured"] > 0 and prof["cells_total"] == prof["cells_measured"]
    again = json.loads(cli("profile", residual_path, "--lut", lut, "--points", "2", "-q").stdout)
    assert again["cells_measured"] == 0 and again["cells_total"] == prof["cells_total"]


def test_predict_without_cells_fails_cleanly(optimized, tmp_path, shared_lut):
    model = tmp_path / "depthwise.onnx"
    onnx.save(depthwise_cnn(), str(model))
    proc = cli("predict", model, "--lut", shared_lut)
    line = assert_one_line_error(proc, "lacks")
    assert "latprune profile" in line
    proc = cli("predict", model, "--lut", tmp_path / "empty.sqlite", "--json")
    assert_one_line_error(proc, "lacks")
    assert proc.stdout == ""


# ---- bad inputs ---------------------------------------------------------------------------

def _text_as_onnx(d: Path) -> Path:
    p = d / "notes.onnx"
    p.write_text("this is a text file, not a model\n" * 20)
    return p


def _truncated(d: Path) -> Path:
    data = residual_cnn().SerializeToString()
    p = d / "truncated.onnx"
    p.write_bytes(data[: len(data) // 2])
    return p


def _external_data(d: Path) -> Path:
    p = d / "external.onnx"
    onnx.save_model(residual_cnn(), str(p), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="external.bin", size_threshold=0)
    assert (d / "external.bin").is_file()
    return p


def _relu_only(d: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["output"], name="relu")], "relu",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 16, 16])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    p = d / "relu.onnx"
    onnx.save(model, str(p))
    return p


BAD_MODELS = {
    "text renamed .onnx": _text_as_onnx,
    "truncated protobuf": _truncated,
    "external data": _external_data,
    "relu only": _relu_only,
    "nonexistent file": lambda d: d / "does-not-exist.onnx",
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_optimize_rejects_bad_models(case, tmp_path, shared_lut):
    model = BAD_MODELS[case](tmp_path)
    out = tmp_path / "out"
    proc = cli("optimize", model, "--speedup", "1.5", "--out", out, "--lut", shared_lut, "-q")
    line = assert_one_line_error(proc)
    assert proc.stdout == ""
    assert_no_output(out)
    if case == "external data":
        assert "external data" in line
    if case == "relu only":
        assert "no layers to prune" in line
    if case == "nonexistent file":
        assert "no such file" in line


@pytest.mark.parametrize("case", ["text renamed .onnx", "truncated protobuf", "external data",
                                  "nonexistent file"])
@pytest.mark.parametrize("command", ["measure", "predict", "profile"])
def test_other_commands_reject_bad_models(case, command, tmp_path, shared_lut):
    model = BAD_MODELS[case](tmp_path)
    args = [command, model] + ([] if command == "measure" else ["--lut", shared_lut])
    proc = cli(*args)
    assert_one_line_error(proc)
    assert proc.stdout == ""


BAD_BUDGETS = {
    "budget zero": ["--budget-ms", "0"],
    "budget negative": ["--budget-ms", "-1"],
    "both budget and speedup": ["--budget-ms", "5", "--speedup", "2"],
    "neither budget nor speedup": [],
    "speedup zero": ["--speedup", "0"],
}


@pytest.mark.parametrize("case", list(BAD_BUDGETS))
def test_optimize_rejects_bad_budget_options(case, tmp_path, residual_path, shared_lut):
    out = tmp_path / "out"
    proc = cli("optimize", residual_path, "--out", out, "--lut", shared_lut, "-q",
               *BAD_BUDGETS[case])
    line = assert_one_line_error(proc)
    assert "budget" in line or "speedup" in line
    assert_no_output(out)


def test_optimize_rejects_unreachable_budget(optimized, tmp_path, residual_path, shared_lut):
    out = tmp_path / "out"
    proc = cli("optimize", residual_path, "--budget-ms", "0.000001", "--out", out,
               "--lut", shared_lut, "-q")
    assert_one_line_error(proc, "smallest reachable latency")
    assert_no_output(out)


def test_failed_run_keeps_previous_outputs(optimized, tmp_path, residual_path, shared_lut):
    """A failing run into a folder that holds a previous result leaves it untouched."""
    proc, out = optimized
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = cli("optimize", residual_path, "--budget-ms", "0.000001", "--out", out,
              "--lut", shared_lut, "-q")
    assert bad.returncode == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_bad_input_is_one_line_even_without_quiet(tmp_path):
    proc = cli("optimize", tmp_path / "missing.onnx", "--speedup", "2", "--out", tmp_path / "o")
    assert_one_line_error(proc, "no such file")
