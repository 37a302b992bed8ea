"""Latency tables: JSON export/import, merging across machines, validation, and the CLI."""
import json

import pytest

from latprune.lut.exchange import export_tables, import_tables, merge_files, validate_file, validate_object
from latprune.lut.store import LatencyTable
from latprune.types import InputError, LayerSpec
from test_cli import assert_one_line_error, cli

SPEC = LayerSpec("Conv", [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], False, [8, 8], 1, activation="Relu")
FP_A = {"device": "cpu", "cpu": "A", "threads": 1}
FP_B = {"device": "cpu", "cpu": "B", "threads": 1}


def _table(path, fp, cells):
    t = LatencyTable(path, fp)
    for (ci, co), (ms, runs) in cells.items():
        t.put(SPEC.signature(), ci, co, ms, runs)
    t.close()


def test_export_import_round_trip(tmp_path):
    src, dst = tmp_path / "a.sqlite", tmp_path / "b.sqlite"
    _table(src, FP_A, {(8, 8): (0.1, 10), (8, 16): (0.2, 10)})
    LatencyTable(src, FP_A).add_calibration("fam", 1.0, 1.2)
    data = json.loads(json.dumps(export_tables(src)))  # through real JSON text
    counts = import_tables(dst, data)
    assert counts == {"cells_added": 2, "cells_combined": 0, "calibration_points": 1}
    t = LatencyTable(dst, FP_A)
    assert t.lookup(SPEC.signature(), 8, 16) == pytest.approx(0.2)
    c = t.calibration("fam")
    assert (c.scale, c.offset_ms) == pytest.approx((1.0, 0.2))


def test_merge_combines_same_fingerprint_and_keeps_others_apart(tmp_path):
    a, b, dst = tmp_path / "a.sqlite", tmp_path / "b.sqlite", tmp_path / "dst.sqlite"
    _table(a, FP_A, {(8, 8): (0.10, 10)})
    _table(b, FP_A, {(8, 8): (0.20, 30), (16, 16): (0.5, 5)})
    _table(b, FP_B, {(8, 8): (9.0, 5)})
    counts = merge_files(dst, [a, b])
    assert counts["cells_combined"] == 1 and counts["cells_added"] == 3
    ta, tb = LatencyTable(dst, FP_A), LatencyTable(dst, FP_B)
    assert ta.lookup(SPEC.signature(), 8, 8) == pytest.approx((0.1 * 10 + 0.2 * 30) / 40)  # weighted by runs
    assert tb.lookup(SPEC.signature(), 8, 8) == pytest.approx(9.0)  # never mixed with A
    assert ta.count() == 2 and tb.count() == 1


def test_validation_finds_bad_cells():
    good = {"signature": json.loads(SPEC.signature()), "c_in": 8, "c_out": 8, "ms": 0.1, "runs": 3}
    data = {"format": "latprune-lut", "version": 1, "tables": [{"fingerprint": FP_A, "cells": [
        good, dict(good), dict(good, c_in=16, ms=-1.0), dict(good, c_out=0, c_in=24),
        dict(good, c_in=32, signature={"op": "Conv"})]}]}
    problems = validate_object(data)
    assert any("duplicate" in p for p in problems)
    assert any("not a positive number" in p for p in problems)
    assert any("at least 1" in p for p in problems)
    assert any("bad signature" in p for p in problems)
    with pytest.raises(InputError):
        import_tables("/nonexistent-dir-never/x.sqlite", data)


def test_validate_warns_when_latency_falls_as_width_grows(tmp_path):
    path = tmp_path / "t.sqlite"
    _table(path, FP_A, {(8, 8): (1.0, 5), (16, 16): (0.5, 5)})
    res = validate_file(path)
    assert res["errors"] == [] and len(res["warnings"]) == 1


def test_lut_cli(tmp_path):
    path = tmp_path / "t.sqlite"
    _table(path, FP_A, {(8, 8): (0.1, 10), (16, 16): (0.4, 10)})
    shown = cli("lut", "show", path, "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)[0]["cells"] == 2
    exported = cli("lut", "export", path, "--out", tmp_path / "t.json")
    assert exported.returncode == 0 and json.loads(exported.stdout)["cells"] == 2
    imported = cli("lut", "import", tmp_path / "copy.sqlite", tmp_path / "t.json")
    assert imported.returncode == 0 and json.loads(imported.stdout)["cells_added"] == 2
    assert cli("lut", "validate", tmp_path / "copy.sqlite").returncode == 0
    merged = cli("lut", "merge", tmp_path / "m.sqlite", path, tmp_path / "copy.sqlite")
    assert merged.returncode == 0 and json.loads(merged.stdout)["cells_combined"] == 2
    (tmp_path / "bad.json").write_text("{not json")
    assert_one_line_error(cli("lut", "import", tmp_path / "x.sqlite", tmp_path / "bad.json"), "not a JSON")
    assert_one_line_error(cli("lut", "show", tmp_path / "missing.sqlite"), "no such latency table")
