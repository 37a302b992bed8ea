"""The SQLite latency table: cells, interpolation, fingerprints, calibration, resume."""
from __future__ import annotations

import numpy as np
import pytest

from latprune.lut.store import LatencyTable, fit_calibration, fit_overhead
from latprune.types import InputError

FP_A = {"device": "cpu", "cpu": "test-a", "threads": 1}
FP_B = {"device": "cpu", "cpu": "test-b", "threads": 1}
SIG = '{"op":"Conv","test":1}'


@pytest.fixture
def table(tmp_path):
    t = LatencyTable(tmp_path / "lut.sqlite", FP_A)
    yield t
    t.close()


def test_put_has_lookup(table):
    assert not table.has(SIG, 8, 16)
    assert table.count() == 0
    table.put(SIG, 8, 16, 0.25, 15)
    assert table.has(SIG, 8, 16)
    assert not table.has(SIG, 16, 8)
    assert not table.has(SIG + "x", 8, 16)
    assert table.lookup(SIG, 8, 16) == pytest.approx(0.25)
    assert table.count() == 1
    table.put(SIG, 8, 16, 0.5, 15)  # replace, not duplicate
    assert table.count() == 1
    assert table.lookup(SIG, 8, 16) == pytest.approx(0.5)
    assert table.cells(SIG) == {8: [(16, 0.5)]}


def test_lookup_unknown_signature_raises_key_error(table):
    with pytest.raises(KeyError):
        table.lookup("never-profiled", 8, 8)


def _bilinear(ci, co):
    return 0.03 + 0.002 * ci + 0.005 * co + 0.0007 * ci * co


def test_interpolation_is_exact_for_bilinear_latency(table):
    grid_in, grid_out = [8, 16, 40, 64], [8, 24, 32, 96]
    for ci in grid_in:
        for co in grid_out:
            table.put(SIG, ci, co, _bilinear(ci, co), 10)
    for ci in range(8, 65, 3):
        for co in range(8, 97, 5):
            assert table.lookup(SIG, ci, co) == pytest.approx(_bilinear(ci, co), rel=1e-12)


def test_interpolation_is_monotone_between_and_beyond_cells(table):
    for ci in (8, 32):
        for co in (8, 32):
            table.put(SIG, ci, co, _bilinear(ci, co), 10)
    vals = [table.lookup(SIG, w, w) for w in range(1, 80)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    # below the smallest cell: the first segment's line (exact for a bilinear cost: a fixed
    # part does not shrink), between proportional scaling and the smallest cell
    assert table.lookup(SIG, 4, 8) == pytest.approx(_bilinear(4, 8))
    assert _bilinear(8, 8) / 2 < table.lookup(SIG, 4, 8) < _bilinear(8, 8)
    assert table.lookup(SIG, 64, 32) > table.lookup(SIG, 32, 32)


def test_zero_width_costs_nothing(table):
    table.put(SIG, 8, 8, 1.0, 10)
    assert table.lookup(SIG, 0, 8) == 0.0
    assert table.lookup(SIG, 8, 0) == 0.0
    assert table.lookup("not-even-profiled", 0, 0) == 0.0


def test_fingerprints_do_not_share_cells(tmp_path):
    path = tmp_path / "shared.sqlite"
    a = LatencyTable(path, FP_A)
    b = LatencyTable(path, FP_B)
    try:
        assert a.fp_id != b.fp_id
        a.put(SIG, 8, 8, 1.0, 10)
        b.put(SIG, 16, 16, 2.0, 10)
        assert a.has(SIG, 8, 8) and not a.has(SIG, 16, 16)
        assert b.has(SIG, 16, 16) and not b.has(SIG, 8, 8)
        assert a.count() == 1 and b.count() == 1
        assert a.lookup(SIG, 8, 8) == pytest.approx(1.0)
        assert b.lookup(SIG, 8, 8) == pytest.approx(0.5)  # b scales its own 16x16 cell in both axes
        a.add_calibration("fam", 1.0, 2.0)
        assert b.calibration("fam") is None
    finally:
        a.close()
        b.close()


def test_reopening_keeps_cells_and_calibration(tmp_path):
    path = tmp_path / "resume.sqlite"
    t = LatencyTable(path, FP_A)
    t.put(SIG, 8, 8, 0.1, 10)
    t.put(SIG, 16, 8, 0.2, 10)
    t.add_calibration("fam", 1.0, 1.5)
    t.close()
    again = LatencyTable(path, dict(FP_A))
    try:
        assert again.count() == 2
        assert again.has(SIG, 8, 8) and again.has(SIG, 16, 8)
        assert again.lookup(SIG, 12, 8) == pytest.approx(0.15)
        c = again.calibration("fam")
        assert (c.scale, c.offset_ms) == pytest.approx((1.0, 0.5))
    finally:
        again.close()


def test_calibration_fit_recovers_scale_and_offset():
    rng = np.random.default_rng(0)
    raw = list(rng.uniform(0.1, 5.0, 12))
    measured = [1.7 * r + 0.35 for r in raw]
    c = fit_calibration(raw, measured)
    scale, offset = c.scale, c.offset_ms
    assert scale == pytest.approx(1.7, rel=1e-9)
    assert offset == pytest.approx(0.35, rel=1e-9)


def test_calibration_single_point_is_pure_offset():
    for raw, meas, expected in (([2.0], [2.5], (1.0, 0.5)), ([2.0, 2.0], [2.5, 3.5], (1.0, 1.0))):
        c = fit_calibration(raw, meas)
        assert (c.scale, c.offset_ms) == pytest.approx(expected)


def test_calibration_three_terms_recover_overhead_cost():
    raw = [10.0, 6.0, 3.0, 8.0, 5.0]
    mel = [2.0, 1.5, 1.0, 1.2, 1.9]
    meas = [0.9 * r + 0.4 * m + 0.2 for r, m in zip(raw, mel)]
    c = fit_calibration(raw, meas, mel)
    assert (c.scale, c.ms_per_melement, c.offset_ms) == pytest.approx((0.9, 0.4, 0.2))
    assert c.predict(5.0, 1.0) == pytest.approx(0.9 * 5 + 0.4 + 0.2)
    # an unphysical (negative) cost per element falls back to scale·raw + offset
    meas_neg = [0.9 * r - 0.4 * m + 0.2 for r, m in zip(raw, mel)]
    assert fit_calibration(raw, meas_neg, mel).ms_per_melement == 0.0
    # three points are not enough for three terms: scale·raw + offset only
    assert fit_calibration(raw[:3], meas[:3], mel[:3]).ms_per_melement == 0.0


def test_table_calibration_uses_family_points(table):
    assert table.calibration("fam") is None
    for raw in (1.0, 2.0, 4.0):
        table.add_calibration("fam", raw, 3.0 * raw + 0.25)
    table.add_calibration("other", 1.0, 100.0)
    c = table.calibration("fam")
    scale, offset = c.scale, c.offset_ms
    assert scale == pytest.approx(3.0) and offset == pytest.approx(0.25)


def test_negative_offset_falls_back_to_a_fit_through_the_origin():
    """Time outside the layers is never negative: a noisy fit with offset < 0 would predict ~0 ms
    for tiny widths and let an impossible budget look feasible."""
    raw, meas = [10.0, 7.5, 5.0], [20.5, 14.0, 9.2]  # slope 2.26, offset -2.1
    c = fit_calibration(raw, meas)
    assert c.offset_ms == 0.0 and c.scale == pytest.approx(np.dot(raw, meas) / np.dot(raw, raw))
    assert c.predict(0.01) > 0


def test_overhead_fit_and_speed_only_calibration():
    raw = [10.0, 6.0, 3.0, 8.0, 5.0, 4.0]
    mel = [2.0, 1.5, 1.0, 1.2, 1.9, 0.7]
    assert fit_overhead(raw, [r + 0.3 + 0.1 * m for r, m in zip(raw, mel)], mel) == pytest.approx((0.3, 0.1))
    # a negative slope falls back to the median difference
    assert fit_overhead(raw, [r + 0.5 - 0.2 * m for r, m in zip(raw, mel)], mel)[1] == 0.0
    # a negative constant stays: the profiler's per-kernel cost made the layer sum exceed the run
    assert fit_overhead(raw, [r - 1.0 for r in raw], mel) == pytest.approx((-1.0, 0.0))
    # the end-to-end points then only fit the machine's speed: measured = 1.3·(raw + 0.3 + 0.1·mel)
    meas = [1.3 * (r + 0.3 + 0.1 * m) for r, m in zip(raw[:3], mel[:3])]
    c = fit_calibration(raw[:3], meas, mel[:3], overhead=(0.3, 0.1))
    assert (c.scale, c.offset_ms, c.ms_per_melement) == pytest.approx((1.3, 0.39, 0.13))


def test_table_calibration_uses_its_in_graph_overhead(table):
    for raw, mel in ((10.0, 2.0), (6.0, 1.5), (3.0, 1.0), (8.0, 1.2), (5.0, 1.9)):
        table.add_overhead_point("fam", raw, raw + 0.3 + 0.1 * mel, mel)
    assert table.overhead("fam") == pytest.approx((0.3, 0.1))
    assert table.overhead("other") is None
    table.add_calibration("fam", 10.0, 2.0 * (10.0 + 0.3 + 0.1 * 2.0), 2.0)
    c = table.calibration("fam")
    assert c.scale == pytest.approx(2.0) and c.predict(5.0, 1.0) == pytest.approx(2.0 * (5.0 + 0.3 + 0.1))


def test_not_a_table_is_input_error(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(InputError):
        LatencyTable(bad, FP_A)
