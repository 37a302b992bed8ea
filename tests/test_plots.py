"""`latprune lut heatmap`, `lut scatter` (PNG files, lut/plots.py), `lut coverage` and `--cpus`,
on one small model profiled once."""
from __future__ import annotations

import json
import struct

import onnx
import pytest

from onnx_builders import residual_cnn
from test_cli import assert_one_line_error, cli


def _need_matplotlib():
    pytest.importorskip("matplotlib")


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plots")
    model = tmp / "m.onnx"
    onnx.save(residual_cnn(blocks=1, width=16), str(model))
    lut = tmp / "lut.sqlite"
    proc = cli("profile", model, "--lut", lut, "--points", "3", timeout=300)
    assert proc.returncode == 0, proc.stderr
    return model, lut


def test_heatmap_of_the_slowest_layer_and_of_a_named_one(profiled, tmp_path):
    _need_matplotlib()
    model, lut = profiled
    out = tmp_path / "h.png"
    proc = cli("lut", "heatmap", lut, "--model", model, "--out", out)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    w, h = _png_size(out)
    assert w > 300 and h > 300
    assert res["cells_measured"] > 0 and res["cells_shown"] >= res["cells_measured"]
    assert 0 < res["min_ms"] <= res["max_ms"]
    named = cli("lut", "heatmap", lut, "--model", model, "--layer", res["layer"], "--out", tmp_path / "n.png")
    assert named.returncode == 0 and json.loads(named.stdout)["layer"] == res["layer"]


def test_heatmap_errors_are_one_line(profiled, tmp_path):
    _need_matplotlib()
    model, lut = profiled
    assert_one_line_error(cli("lut", "heatmap", lut, "--model", model, "--layer", "nope", "--out", tmp_path / "x.png"),
                          "no prunable conv/gemm layer named")
    assert_one_line_error(cli("lut", "heatmap", tmp_path / "empty.sqlite", "--model", model, "--out", tmp_path / "x.png"),
                          "latprune profile")
    assert not (tmp_path / "x.png").exists()
    assert_one_line_error(cli("lut", "heatmap", lut, "--model", model, "--out", tmp_path / "no" / "x.png"),
                          "cannot write the PNG")


def test_scatter_from_report_rounds_and_bad_input(tmp_path):
    _need_matplotlib()
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"model": "m.onnx", "rounds": [
        {"predicted_ms": 4.0, "measured_ms": 4.2}, {"predicted_ms": 3.0, "measured_ms": 2.9},
        {"predicted_ms": 2.0, "measured_ms": 2.5}]}))
    out = tmp_path / "s.png"
    proc = cli("lut", "scatter", report, "--out", out)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["points"] == 3 and res["within_10pct"] == pytest.approx(2 / 3)
    assert res["median_abs_err"] == pytest.approx(abs(4.0 - 4.2) / 4.2)
    assert _png_size(out)[0] > 300
    (tmp_path / "bad.json").write_text("{not json")
    assert_one_line_error(cli("lut", "scatter", tmp_path / "bad.json", "--out", tmp_path / "b.png"), "not a readable JSON")
    (tmp_path / "odd.json").write_text(json.dumps({"whole_model": [1, {"configs": [2, {"measured_ms": 1}]}]}))
    assert_one_line_error(cli("lut", "scatter", tmp_path / "odd.json", "--out", tmp_path / "b.png"), "no predicted/measured")
    (tmp_path / "empty.json").write_text(json.dumps({"rounds": [{"predicted_ms": "x"}]}))
    assert_one_line_error(cli("lut", "scatter", tmp_path / "empty.json", "--out", tmp_path / "b.png"), "no predicted/measured")


def test_coverage_report(profiled, tmp_path):
    model, lut = profiled
    proc = cli("lut", "coverage", lut, "--model", model, "--points", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["measured"] == res["grid_cells"] > 0 and res["share"] == 1.0
    assert res["unpredictable_layers"] == 0 and all(r["predictable"] for r in res["layers"])
    isolated = cli("lut", "coverage", lut, "--model", model, "--timing", "isolated", "--json")  # never profiled so
    assert isolated.returncode == 1 and json.loads(isolated.stdout)["measured"] == 0
    assert_one_line_error(cli("lut", "coverage", tmp_path / "none.sqlite", "--model", model), "no such latency table")
    assert not (tmp_path / "none.sqlite").exists()
    assert_one_line_error(cli("lut", "coverage", lut, "--model", model, "--points", "0"), "--points")


def test_cpus_pins_the_process_or_says_why_not(profiled):
    import os

    model, _ = profiled
    first = min(os.sched_getaffinity(0))
    proc = cli("measure", model, "--cpus", str(first), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["median_ms"] > 0
    assert_one_line_error(cli("measure", model, "--cpus", "9999"), "may use CPUs")
    assert_one_line_error(cli("measure", model, "--cpus", "a-b"), "expected CPU numbers")
