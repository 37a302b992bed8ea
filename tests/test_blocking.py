"""Blocking-aware latency tables (issue 15): the probe's rule inference, the table's fast and
fallback regimes, the exchange format's rules, fallback cells in the profile grid, and
layout reorders attributed to the layer they are done for (real ONNX Runtime sessions)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from latprune.lut.blocking import AxisRule, BlockingRules, layer_kind
from latprune.lut.exchange import export_tables, import_tables
from latprune.lut.predict import fallback_grid, needs_fallback, predict_layers, required_cells, single_group
from latprune.lut.store import LatencyTable
from latprune.profiler.probe import axis_rule
from latprune.pruner.analysis import analyse
from latprune.pruner.model_io import normalise
from latprune.types import LayerSpec
from onnx_builders import GraphBuilder, concat_cnn, depthwise_cnn, pad_shortcut_cnn, residual_cnn

FP = {"device": "cpu", "cpu": "test-blocking", "threads": 1}
CONV = LayerSpec("Conv", [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], False, [14, 14], 1, activation="Relu")
RULES = BlockingRules({"conv": {"in": AxisRule(4, 8, 1.5), "out": AxisRule(1, 8, 1.0)}})
WIDTHS = range(48, 81)


def _noisy(ms: dict[int, float], rel: float = 0.005, seed: int = 0) -> dict[int, float]:
    rng = np.random.default_rng(seed)
    return {w: t * (1 + rel * rng.standard_normal()) for w, t in ms.items()}


def _pad(w: int, b: int) -> int:
    return -(-w // b) * b


def test_axis_rule_finds_padding_alignment_and_smooth_axes():
    padded = _noisy({w: 0.01 + 0.002 * _pad(w, 8) for w in WIDTHS})
    assert axis_rule(padded) == AxisRule(1, 8, 1.0)
    blocked = _noisy({w: (0.01 + 0.002 * _pad(w, 8)) if w % 4 == 0 else 1.4 * (0.01 + 0.002 * w) for w in WIDTHS})
    rule = axis_rule(blocked)
    assert (rule.align, rule.block) == (4, 8) and 1.25 < rule.penalty < 1.5
    depthwise = _noisy({w: 0.002 * w if w % 4 == 0 else 0.01 * w for w in WIDTHS})
    rule = axis_rule(depthwise)
    assert (rule.align, rule.block) == (4, 1) and 4.5 < rule.penalty < 5.5
    assert axis_rule(_noisy({w: 0.003 * w for w in WIDTHS})) == AxisRule()
    assert axis_rule({48: 1.0, 49: 2.0}) == AxisRule()  # too few widths to say anything


def _cost(ci: int, co: int) -> float:
    return 0.02 + 0.0005 * ci * co


@pytest.fixture
def table(tmp_path):
    t = LatencyTable(tmp_path / "lut.sqlite", FP)
    sig = CONV.signature()
    for ci in (16, 32, 48, 64):
        for co in (16, 32, 48, 64):
            t.put(sig, ci, co, _cost(ci, co), 10)
    yield t
    t.close()


def test_fast_widths_cost_their_padded_width_and_fallback_cells_stay_apart(table):
    sig = CONV.signature()
    table.set_blocking(RULES)
    assert table.has_blocking()
    # 44 input channels (aligned to 4) and 41 output channels run like 48 x 48
    assert table.lookup_detail(sig, 44, 41) == (pytest.approx(_cost(48, 48)), "interpolated")
    # no fallback cell yet: the fast value at the padded widths times the probed penalty
    ms, how = table.lookup_detail(sig, 45, 48)
    assert how == "modelled" and ms == pytest.approx(1.5 * _cost(48, 48))
    for ci in (15, 31, 47, 63):  # fallback cells: their own (smooth) surface
        for co in (16, 64):
            table.put(sig, ci, co, 3 * _cost(ci, co), 10)
    ms, how = table.lookup_detail(sig, 39, 40)
    assert how == "interpolated" and ms == pytest.approx(3 * _cost(39, 40))
    assert table.lookup(sig, 44, 41) == pytest.approx(_cost(48, 48))  # fast cells untouched by them
    assert table.lookup_detail(sig, 64, 64) == (pytest.approx(_cost(64, 64)), "measured")
    assert table.lookup_detail(sig, 96, 64)[1] == "extrapolated"
    # the same cells without rules: one bilinear surface through fast and fallback cells alike
    # (the lookup before issue 15) misses the padded cost
    table.set_blocking(BlockingRules())
    assert not table.has_blocking()
    assert abs(table.lookup(sig, 44, 41) / _cost(48, 48) - 1) > 0.1


def test_rules_travel_in_the_exchange_format_and_version_1_still_reads(table, tmp_path):
    table.set_blocking(RULES)
    data = export_tables(table.path)
    assert data["version"] == 3
    assert {(r["kind"], r["axis"], r["align"], r["block"]) for r in data["tables"][0]["blocking"]} == \
        {("conv", "in", 4, 8), ("conv", "out", 1, 8)}
    copy = tmp_path / "copy.sqlite"
    import_tables(copy, data)
    other = LatencyTable(copy, FP)
    assert other.blocking.axes(CONV) == RULES.axes(CONV)
    assert other.lookup(CONV.signature(), 44, 41) == pytest.approx(_cost(48, 48))
    other.close()
    v2 = json.loads(json.dumps(dict(data, version=2)))  # version 2: rules without the direct kernel
    for rule in v2["tables"][0]["blocking"]:
        del rule["direct_below"], rule["direct"], rule["direct_fixed"]
    import_tables(tmp_path / "v2.sqlite", v2)
    assert LatencyTable(tmp_path / "v2.sqlite", FP).blocking.axes(CONV) == RULES.axes(CONV)
    old = dict(data, version=1, tables=[{k: v for k, v in t.items() if k != "blocking"} for t in data["tables"]])
    v1 = tmp_path / "v1.sqlite"
    assert import_tables(v1, json.loads(json.dumps(old)))["cells_added"] == 16
    assert not LatencyTable(v1, FP).has_blocking()
    bad = json.loads(json.dumps(data))
    bad["tables"][0]["blocking"][0]["align"] = 0
    from latprune.types import InputError
    with pytest.raises(InputError, match="blocking rule"):
        import_tables(tmp_path / "bad.sqlite", bad)


def test_layer_kinds():
    assert layer_kind(CONV) == "conv"
    assert layer_kind(LayerSpec("Conv", [1, 1], [1, 1], [0] * 4, [1, 1], False, [7, 7], 1)) == "conv1x1"
    assert layer_kind(LayerSpec("Conv", [3, 3], [1, 1], [1] * 4, [1, 1], True, [7, 7], 1)) == "depthwise"
    assert layer_kind(LayerSpec("Conv", [3, 3], [1, 1], [1] * 4, [1, 1], False, [7, 7], 1, fixed_groups=4)) == "grouped"
    assert layer_kind(LayerSpec("Gemm", [], [], [], [], False, [], 1)) == "gemm"
    assert layer_kind(LayerSpec("Attention", [64], [], [], [], False, [8, 8], 1)) is None


def test_fallback_cells_join_the_grid_only_where_a_width_can_fall_back():
    rules = BlockingRules({kind: {"in": AxisRule(4, 8, 1.5), "out": AxisRule(1, 8)}
                           for kind in ("conv", "conv1x1", "depthwise")})
    on_step = analyse(normalise(depthwise_cnn()), step=8).problem
    any_width = analyse(normalise(depthwise_cnn()), step=1).problem
    assert not needs_fallback(on_step, rules) and needs_fallback(any_width, rules)
    plain = {(c[0].signature(), c[1], c[2]) for c in required_cells(on_step)}
    extra = {(c[0].signature(), c[1], c[2]) for c in required_cells(on_step, rules=rules)} - plain
    assert extra, "fallback cells for the layers whose input is a prunable group"
    for sig, ci, co in extra:
        spec = LayerSpec(**json.loads(sig))
        assert not rules.fast(spec, ci, co)
    dw = next(layer for layer in on_step.layers if layer.spec.depthwise)
    assert all(ci == co for ci, co in fallback_grid(on_step, dw, rules))


# A width no NCHWc block aligns (not a multiple of 4) and above the block on every x86 CPU (8
# with AVX2, 16 with AVX-512): a conv reading fewer channels than the block reads the plain
# layout directly, as a first layer does (13 channels took no input reorder on AVX-512).
OFF_BLOCK = 21


def _chain(width: int):
    g = GraphBuilder(in_shape=(1, 3, 24, 24))
    x = g.relu(g.conv("input", 3, 32))
    x = g.relu(g.conv(x, 32, width))
    x = g.relu(g.conv(x, width, 32))
    x = g.relu(g.conv(x, 32, 32))
    return g.build(g.head(x, 32), "chain")


def test_layout_reorders_are_counted_for_the_fallback_layer_that_needs_them():
    """At OFF_BLOCK channels (aligned to no NCHWc block) the conv reading them runs a
    plain-layout kernel, and ONNX Runtime reorders its input and output; those reorders are
    counted as done for that layer (timing.reorder_ms, not the layer's cell: they depend on the
    neighbours): no more reorders are left unclaimed than at an aligned width."""
    from latprune.ingraph_profile import layer_names
    from latprune.profiler.ingraph import profile_interleaved

    unclaimed, reorder_ms = {}, {}
    for width in (16, OFF_BLOCK):
        analysis = analyse(normalise(_chain(width)), step=8)
        data = analysis.model.SerializeToString()
        [timing] = profile_interleaved([{}], lambda _: data, data, layer_names(analysis.model, analysis.problem),
                                       min_seconds=0, min_runs=3)
        assert sorted(timing.layer_ms) == list(range(len(analysis.problem.layers)))
        unclaimed[width] = sorted(k for k in timing.unmapped if k.startswith("Reorder"))
        reorder_ms[width] = timing.reorder_ms
    assert len(unclaimed[OFF_BLOCK]) <= len(unclaimed[16]), unclaimed
    assert reorder_ms[16] == 0 < reorder_ms[OFF_BLOCK]  # kept apart from the layers' cells


def test_the_runtime_says_which_layout_reorders_its_compiled_graph_holds():
    """ONNX Runtime's optimised graph of the chain at OFF_BLOCK channels holds, besides the
    head's reorder (32 x 1 x 1 after the pooling), the two around the fallback conv: its
    OFF_BLOCK-channel input and its 32-channel output, 24 x 24 each. The in-graph profile of the same model
    counts the same reorders (ConfigTiming.reorder_count / reorder_melements)."""
    from latprune.ingraph_profile import layer_names
    from latprune.profiler.backends import get_backend
    from latprune.profiler.ingraph import profile_interleaved

    ort = get_backend("ort-cpu")
    head = ort.layout_reorders(_chain(16))
    count, mel = ort.layout_reorders(_chain(OFF_BLOCK))
    assert count == head[0] + 2
    assert mel - head[1] == pytest.approx((OFF_BLOCK + 32) * 24 * 24 / 1e6)
    analysis = analyse(normalise(_chain(OFF_BLOCK)), step=8)
    data = analysis.model.SerializeToString()
    [timing] = profile_interleaved([{}], lambda _: data, data, layer_names(analysis.model, analysis.problem),
                                   min_seconds=0, min_runs=3)
    assert (timing.reorder_count, timing.reorder_melements) == (count, pytest.approx(mel))


def test_graph_reorders_are_priced_per_reorder_and_per_element(tmp_path):
    """LatencyTable.reorder_fit recovers a fixed cost per reorder kernel and a cost per element
    from in-graph runs, and predict_layers prices the reorders a compiled graph holds with it
    in place of the modelled ones."""
    from latprune.lut.predict import graph_reorder_ms

    t = LatencyTable(tmp_path / "lut.sqlite", FP)
    assert t.reorder_fit() is None and graph_reorder_ms(t, (3, 1.0)) is None
    for count, mel in ((10, 0.5), (30, 0.6), (20, 2.0)):
        t.add_reorder_point(0.004 * count + 0.2 * mel, mel, "graph", count)
    per_reorder, per_mel = t.reorder_fit()
    assert (per_reorder, per_mel) == (pytest.approx(0.004), pytest.approx(0.2))
    t.add_reorder_point(0.5, 1.0, "layers")  # other kinds stay apart
    assert t.reorder_fit() == (pytest.approx(0.004), pytest.approx(0.2))
    assert graph_reorder_ms(t, (5, 1.5)) == pytest.approx(0.02 + 0.3)
    t.close()


def _squeeze_excite(width: int):
    """A conv to `width` channels, a squeeze-excite block on it (GlobalAveragePool, 1x1 conv,
    Sigmoid, Mul: the pooling and the Mul belong to no layer) and a conv back to 32."""
    g = GraphBuilder(in_shape=(1, 3, 24, 24))
    x = g.relu(g.conv("input", 3, 32))
    x = g.relu(g.conv(x, 32, width))
    s = g.node("Sigmoid", [g.conv(g.node("GlobalAveragePool", [x]), width, width, k=1)])
    y = g.relu(g.conv(g.node("Mul", [x, s]), width, 32))
    return g.build(g.head(y, 32), "se")


def test_the_runtime_names_each_kernel_outside_the_layers_by_class_and_layout():
    """Backend.graph_kernels lists the kernels of ONNX Runtime's compiled graph that no layer
    claims: at 32 channels (a multiple of every x86 block) the squeeze-excite pooling runs on
    the blocked tensor, at OFF_BLOCK channels on the plain one (its own class: it costs ~3x
    per element there), sized by the tensor it reads. The in-graph profile of the same model
    times exactly these kernels (ConfigTiming.kernels)."""
    from latprune.ingraph_profile import layer_names
    from latprune.profiler.backends import get_backend
    from latprune.profiler.ingraph import profile_interleaved

    ort = get_backend("ort-cpu")
    census = {}
    for width in (32, OFF_BLOCK):
        analysis = analyse(normalise(_squeeze_excite(width)), step=8)
        names = layer_names(analysis.model, analysis.problem)
        census[width] = sorted(ort.graph_kernels(analysis.model, names))
        classes = {cls for cls, _ in census[width]}
        assert not any(cls.startswith(("Conv", "Relu", "Sigmoid", "Gemm")) for cls in classes), classes
        assert ("Mul/plain", pytest.approx(width * 24 * 24 / 1e6)) in census[width]
        if width == 32:
            assert ("GlobalAveragePool/blocked", pytest.approx(32 * 24 * 24 / 1e6)) in census[width]
        else:
            assert ("GlobalAveragePool/plain", pytest.approx(OFF_BLOCK * 24 * 24 / 1e6)) in census[width]
            assert "GlobalAveragePool/blocked" not in classes
        data = analysis.model.SerializeToString()
        [timing] = profile_interleaved([{}], lambda _: data, data, names, min_seconds=0, min_runs=3)
        timed = sorted((cls, mel) for cls, mel, _ in timing.kernels)
        assert [cls for cls, _ in timed] == [cls for cls, _ in census[width]]
        assert [mel for _, mel in timed] == pytest.approx([mel for _, mel in census[width]])
        assert all(ms > 0 for *_, ms in timing.kernels)
    assert get_backend("ort-cpu").graph_kernels(_squeeze_excite(32), {}) is not None


def test_kernels_outside_the_layers_are_priced_by_class(tmp_path):
    """LatencyTable.kernel_prices gives each class a curve of one kernel's ms against its size
    from the kernels the in-graph runs timed (exact for a cost linear in the size, and it
    follows a cost per element that grows past the cache); price_kernels splits the reorders
    from the rest, lends an operator's price across layouts and names a class no run timed;
    whole_model_ms adds the priced kernels and the time outside every kernel
    (LatencyTable.remainder) to the layers."""
    from latprune.lut.predict import LayerSum, price_kernels, whole_model_ms
    from latprune.lut.store import Calibration

    t = LatencyTable(tmp_path / "lut.sqlite", FP)
    assert t.kernel_prices() == {} and price_kernels(t, [("Mul/plain", 1.0)]) is None
    assert t.remainder("fam") is None
    def cached(mel):  # 0.1 ms per M elements up to 1 M, 0.2 past it
        return 0.001 + 0.1 * mel if mel <= 1 else 0.101 + 0.2 * (mel - 1)

    for mel in (0.001, 0.05, 0.3, 1.0, 2.0, 4.0):  # sizes in bins of their own
        t.add_kernel_points([("GlobalAveragePool/plain", mel, 0.003 + 0.2 * mel),
                             ("GlobalAveragePool/plain", mel, 0.003 + 0.2 * mel),
                             ("GlobalAveragePool/blocked", mel, 0.002 + 0.07 * mel),
                             ("ReorderOutput", mel, cached(mel))])
    prices = t.kernel_prices()
    for mel in (0.02, 0.5, 1.0, 3.0):
        assert prices["GlobalAveragePool/plain"].price(mel) == pytest.approx(0.003 + 0.2 * mel)
        assert prices["GlobalAveragePool/blocked"].price(mel) == pytest.approx(0.002 + 0.07 * mel)
        assert prices["ReorderOutput"].price(mel) == pytest.approx(cached(mel))
    assert prices["ReorderOutput"].kernels == 6
    reorder, other, unpriced = price_kernels(t, [("ReorderOutput", 1.0), ("GlobalAveragePool/plain", 0.5),
                                                 ("Softmax/plain", 2.0)])
    assert reorder == pytest.approx(0.101) and other == pytest.approx(0.103) and unpriced == ["Softmax/plain"]
    _, lent, _ = price_kernels(t, [("GlobalAveragePool/other", 0.5)])
    assert lent in (pytest.approx(0.103), pytest.approx(0.037))  # the operator's price in a layout it was timed in
    t.add_remainder_point("fam", 10.0, 9.8)
    t.add_remainder_point("fam", 11.0, 10.9)
    t.add_remainder_point("fam", 12.0, 11.6)
    assert t.remainder("fam") == pytest.approx(-0.2)
    assert t.remainder("a model the table never profiled") == pytest.approx(-0.2)  # every family's median
    assert t.remainder("fam", 5.0) == pytest.approx(-0.2)  # runs of one size: no line
    for kernel_ms in (3.0, 6.0, 12.0):  # the calibration models profiled in-graph: smaller, more negative
        t.add_remainder_point("sized", kernel_ms, kernel_ms + 0.02 * kernel_ms - 0.3)
    assert t.remainder("sized", 4.5) == pytest.approx(0.02 * 4.5 - 0.3)
    assert t.remainder("sized") == pytest.approx(0.02 * 6.0 - 0.3)  # no size asked: the median
    sums = LayerSum(5.0, 0.1, {}, [], [], 0.2, "graph", outside_ms=0.5)
    calib = Calibration(scale=1.1, ms_per_melement=0.3, offset_ms=0.4)
    assert whole_model_ms(sums, calib, 2.0, -0.2) == pytest.approx(1.1 * (5.0 + 0.5 - 0.2))
    # the machine's speed fitted in the graph's own terms on the calibration models, with an
    # offset where they span enough sizes: a small model gains more from warm caches
    assert t.graph_speed("fam") is None
    t.add_graph_calibration("fam", 10.0, 10.5)
    t.add_graph_calibration("fam", 5.0, 5.25)
    assert t.graph_speed("fam") == (pytest.approx(1.05), 0.0, pytest.approx(1.05)) and t.graph_speed("other") is None
    assert whole_model_ms(sums, calib, 2.0, -0.2, t.graph_speed("fam")) == pytest.approx(1.05 * 5.3)
    for base in (10.0, 6.0, 3.0):
        t.add_graph_calibration("cached", base, 1.02 * base - 0.3)
        t.add_graph_calibration("absurd", base, 1.02 * base - 2.5)  # the smallest would be predicted at ~0.3 of it
    assert t.graph_speed("cached") == (pytest.approx(1.02), pytest.approx(-0.3), pytest.approx(0.92))
    assert t.graph_speed("absurd")[1] == 0.0  # then the scale alone
    assert whole_model_ms(sums, calib, 2.0, -0.2, t.graph_speed("cached")) == pytest.approx(1.02 * 5.3 - 0.3)
    tiny = LayerSum(1.0, 0.0, {}, [], [], 0.0, "graph", outside_ms=0.2)  # under every calibration model
    assert whole_model_ms(tiny, calib, 0.0, 0.0, t.graph_speed("cached")) == pytest.approx(0.92 * 1.2)
    sums.outside_ms = None  # no priced kernels: the calibration's overhead fit
    assert whole_model_ms(sums, calib, 2.0, -0.2) == pytest.approx(1.1 * 5.0 + 0.3 * 2.0 + 0.4)
    t.close()


def test_predict_layers_says_how_each_value_was_found(table):
    analysis = analyse(normalise(residual_cnn()), step=8)
    with pytest.raises(KeyError):  # the table holds none of this model's signatures
        predict_layers(analysis.problem, table)


def test_any_width_candidates_are_the_widest_of_each_cost_plateau():
    from latprune.lut.predict import plateau_widths

    rules = BlockingRules({kind: {"in": AxisRule(4, 8, 1.5), "out": AxisRule(1, 8)}
                           for kind in ("conv", "conv1x1", "gemm")}
                          | {"depthwise": {"in": AxisRule(4, 1, 5.0), "out": AxisRule(4, 1, 5.0)}})
    prob = analyse(normalise(depthwise_cnn()), step=1, max_candidates=64).problem
    widths = plateau_widths(prob, rules, max_candidates=64)
    assert widths
    for gid, ws in widths.items():
        size = prob.groups[gid].size
        assert ws[-1] == size and all(w % 8 == 0 for w in ws[:-1]), ws
        assert set(range(8, size, 8)) <= set(ws)  # every plateau top, none skipped
    smooth = plateau_widths(prob, BlockingRules(), max_candidates=64)
    assert any(len(ws) > len(widths[gid]) for gid, ws in smooth.items())


@pytest.mark.parametrize("build", [pad_shortcut_cnn, concat_cnn])
def test_any_width_candidates_keep_a_shared_axis_on_the_block(build):
    """A conv whose input several groups set together (a zero-padded residual stream, a
    Concat) is aligned only if the sum is: every group's share stays a multiple of the block,
    so --step 1 offers no width that would push the sum off it (before: every width)."""
    from latprune.lut.predict import plateau_widths

    rules = BlockingRules({kind: {"in": AxisRule(4, 8, 1.5), "out": AxisRule(1, 8)}
                           for kind in ("conv", "conv1x1", "gemm")})
    prob = analyse(normalise(build()), step=1, max_candidates=64).problem
    shared = {gid for layer in prob.layers for space in (layer.c_in, layer.c_out) if len(space.terms) > 1
              for gid, _ in space.terms if prob.groups[gid].prunable}
    assert shared  # the model has such an axis
    widths = plateau_widths(prob, rules, max_candidates=64)
    for gid in shared:
        ws = widths[gid]
        assert all(w % 8 == 0 for w in ws[:-1]) and ws[-1] == prob.groups[gid].size, (gid, ws)
        for layer in prob.layers:  # the smallest candidates together keep every shared axis aligned
            for space in (layer.c_in, layer.c_out):
                if len(space.terms) > 1 and all(prob.groups[g].prunable for g, _ in space.terms):
                    assert (space.fixed + sum(m * widths[g][0] for g, m in space.terms)) % 8 == space.fixed % 8


def test_layout_boundaries_count_elements_between_blocked_and_fallback_convs(tmp_path):
    """A conv chain 32 -> w -> 32: at w = 13 the conv reading 13 channels falls back and
    reads its input (13 x 24 x 24) through a reorder from the blocked conv before it, and
    writes its output (32 x 24 x 24) through one to the blocked conv after it; at w = 16 or
    without rules there is none. The reorders' ms follow the table's cost per element."""
    from latprune.lut.predict import layout_boundaries, predict_raw, reorder_ms

    prob = analyse(normalise(_chain(16)), step=1).problem
    t = LatencyTable(tmp_path / "lut.sqlite", FP)
    gid = next(g.id for g in prob.groups if g.prunable and g.size == 16)
    assert layout_boundaries(prob, t, {gid: 13}) == 0  # no rules: every conv is one surface
    t.set_blocking(BlockingRules({k: {"in": AxisRule(4, 8, 1.5), "out": AxisRule(1, 8)}
                                  for k in ("conv", "conv1x1")}))
    assert layout_boundaries(prob, t, {gid: 16}) == 0
    assert layout_boundaries(prob, t, {gid: 13}) * 1e6 == pytest.approx(13 * 24 * 24 + 32 * 24 * 24)
    assert reorder_ms(prob, t, {gid: 13}) == 0  # no cost measured yet
    t.add_reorder_point(0.2, 0.1)
    t.add_reorder_point(0.4, 0.1)
    assert t.reorder_cost() == pytest.approx(3.0)
    assert reorder_ms(prob, t, {gid: 13}) == pytest.approx(3.0 * (13 + 32) * 24 * 24 / 1e6)
    t.close()


def test_depthwise_cells_interpolate_along_their_diagonal(tmp_path):
    """A depthwise layer's cells lie on c_in = c_out; a width between two of them takes the
    line between them, fixed cost included (not a narrow cell's cost scaled up)."""
    dw = LayerSpec("Conv", [3, 3], [1, 1], [1] * 4, [1, 1], True, [7, 7], 1)
    t = LatencyTable(tmp_path / "lut.sqlite", FP)
    for c in (7, 615, 1151):
        t.put(dw.signature(), c, c, 0.01 + 0.0004 * c, 10)
    assert t.lookup(dw.signature(), 455, 455) == pytest.approx(0.01 + 0.0004 * 455)
    t.close()


def test_blocked_overhead_elements_count_only_tensors_kept_in_the_blocked_layout(tmp_path):
    from latprune.lut.predict import blocked_overhead_elements, overhead_elements

    prob = analyse(normalise(residual_cnn(width=16)), step=1).problem
    t = LatencyTable(tmp_path / "lut.sqlite", FP)
    assert blocked_overhead_elements(prob, t) == 0  # no rules
    t.set_blocking(RULES)
    dense = blocked_overhead_elements(prob, t)
    assert 0 < dense <= overhead_elements(prob)
    stream = next(g.id for g in prob.groups if g.prunable and g.size == 16)
    assert blocked_overhead_elements(prob, t, {stream: 13}) < blocked_overhead_elements(prob, t, {stream: 12})
    t.close()


def test_grouped_rules_apply_to_the_channels_of_one_group():
    """ONNX Runtime blocks a grouped conv only when each group's widths are multiples of its
    block: RegNetX's 16 channels per group run blocked, Torch-Pruning's 13 per group do not."""
    rules = BlockingRules({"grouped": {"in": AxisRule(8, 8, 2.0), "out": AxisRule(8, 8, 2.0)}})

    def grouped(**kw):
        return LayerSpec("Conv", [3, 3], [1, 1], [1] * 4, [1, 1], False, [14, 14], 1, **kw)

    assert rules.fast(grouped(group_channels=16), 32, 32)
    assert not rules.fast(grouped(group_channels=13), 26, 10)
    assert rules.fast(grouped(fixed_groups=2), 48, 32)  # 24 and 16 per group
    assert not rules.fast(grouped(fixed_groups=2), 52, 32)  # 26 per group
    assert rules.padded(grouped(fixed_groups=2), 44, 30) == (48, 32)  # 22 -> 24, 15 -> 16 per group


DIRECT = BlockingRules({"conv": {"in": AxisRule(4, 16, 1.4, direct_below=16, direct=1.2, direct_fixed=0.25),
                                 "out": AxisRule(1, 16)}})


def test_probe_finds_a_direct_kernel_under_the_block_only_where_its_widths_lie_on_a_line():
    """Under the block an input width that runs the direct kernel costs along one line,
    aligned or not (ONNX Runtime on AVX-512: a 3x3 conv at 8 input channels ~0.6x its 16);
    where narrow widths instead pad to the block or pay the fallback penalty, no direct kernel."""
    from latprune.profiler.probe import DIRECT_WIDTHS, direct_rule

    rule = AxisRule(4, 16, 1.4)
    fast16 = 0.037
    direct = _noisy({w: (0.004 + 0.0022 * w) if w < 16 else fast16 * _pad(w, 16) / 16 * (1 if w % 4 == 0 else 1.4)
                     for w in DIRECT_WIDTHS})
    direct[16] = fast16
    found = direct_rule(rule, direct)
    assert found.direct_below == 16 and (found.align, found.block, found.penalty) == (4, 16, 1.4)
    at_block = 0.004 + 0.0022 * 16  # the line through the direct widths, where it reaches the block
    assert found.direct == pytest.approx(at_block / fast16, rel=0.03)
    assert found.direct_fixed == pytest.approx(0.004 / at_block, abs=0.03)
    assert found.direct_cost(8, fast16) == pytest.approx(0.004 + 0.0022 * 8, rel=0.03)
    padded = _noisy({w: fast16 * _pad(w, 16) / 16 if w % 4 == 0 else 1.4 * fast16 * w / 16 for w in DIRECT_WIDTHS})
    assert direct_rule(rule, padded) == rule
    assert direct_rule(AxisRule(), direct) == AxisRule()  # no blocking: nothing to tell apart
    # the runtime's block, where the axis' own padding fit missed it (a 1x1 conv's input padding
    # read 8 on an AVX-512 CPU whose direct kernel runs under 16)
    assert direct_rule(AxisRule(4, 8, 1.4), direct, block=16).direct_below == 16
    # a block-8 CPU: direct under 8, then 8 and 12 blocked (12 padded to 16) and the widths off
    # multiples of 4 falling back at 1.4x; 2-15 is no line of one kernel (the aligned widths
    # of its upper half cost less), so the threshold is 8
    fast8 = 0.02
    avx2 = _noisy({w: (0.003 + 0.0024 * w) if w < 8 else fast8 * _pad(w, 8) / 8 * (1 if w % 4 == 0 else 1.4)
                   for w in DIRECT_WIDTHS}, seed=1)
    found = direct_rule(AxisRule(4, 8, 1.4), avx2)
    assert found.direct_below == 8
    assert found.direct_cost(4, avx2[8]) == pytest.approx(0.003 + 0.0024 * 4, rel=0.05)
    assert direct_rule(AxisRule(4, 8, 1.4), {w: t for w, t in avx2.items() if w > 8}) == AxisRule(4, 8, 1.4)


def test_a_direct_input_is_its_own_regime_not_the_padded_width(tmp_path):
    """With a direct kernel under the block, an 8-channel input is neither the 16-channel
    cost (padding) nor a fallback: the probe's line from the fast cell at the block until
    the table holds direct cells, then those; a stem's fixed 3-channel input stays
    the fast regime's."""
    t = LatencyTable(tmp_path / "lut.sqlite", FP)
    t.set_blocking(DIRECT)
    sig = CONV.signature()
    for ci in (16, 32):
        for co in (16, 32):
            t.put(sig, ci, co, _cost(ci, co), 10)
    assert DIRECT.regime(CONV, 8, 32) == "direct" and DIRECT.regime(CONV, 8, 32, fixed_in=True) == "fast"
    assert DIRECT.regime(CONV, 16, 32) == "fast" and DIRECT.regime(CONV, 18, 32) == "fallback"
    ms, how = t.lookup_detail(sig, 8, 32)
    assert how == "modelled" and ms == pytest.approx(_cost(16, 32) * 1.2 * (0.25 + 0.75 * 8 / 16))
    assert t.lookup_detail(sig, 8, 30)[0] == pytest.approx(ms)  # its output still pads to the block
    assert t.lookup(sig, 16, 32) == pytest.approx(_cost(16, 32))  # fast cells untouched
    for ci in (6, 12):
        t.put(sig, ci, 32, 0.01 * ci, 10)
    assert t.lookup_detail(sig, 9, 32) == (pytest.approx(0.09), "interpolated")
    t.close()
    stem_only = LatencyTable(tmp_path / "stem.sqlite", FP)
    stem_only.set_blocking(DIRECT)
    stem_only.put(sig, 3, 16, 0.02, 10)
    stem_only.put(sig, 3, 32, 0.04, 10)
    assert stem_only.lookup_detail(sig, 3, 24) == (pytest.approx(0.04), "interpolated")  # 24 pads to 32
    stem_only.close()


def test_blocking_rules_of_a_table_written_before_direct_kernels_migrate(tmp_path):
    """A table whose blocking table lacks the direct columns opens, reads its rules as
    before (no direct kernel) and takes new rules with them."""
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE fingerprints (id TEXT PRIMARY KEY, json TEXT NOT NULL);
        CREATE TABLE blocking (fingerprint TEXT NOT NULL, kind TEXT NOT NULL, axis TEXT NOT NULL,
            align INTEGER NOT NULL, block INTEGER NOT NULL, penalty REAL NOT NULL,
            measured_at REAL NOT NULL, PRIMARY KEY (fingerprint, kind, axis));""")
    from latprune.profiler.fingerprint import fingerprint_id
    db.execute("INSERT INTO blocking VALUES (?, 'conv', 'in', 4, 8, 1.5, 0)", (fingerprint_id(FP),))
    db.commit()
    db.close()
    t = LatencyTable(path, FP)
    assert t.blocking.axes(CONV)[0] == AxisRule(4, 8, 1.5)
    t.set_blocking(DIRECT)
    t.close()
    assert LatencyTable(path, FP).blocking.axes(CONV) == DIRECT.axes(CONV)


def test_a_direct_conv_reads_its_input_through_one_reorder_and_writes_blocked(tmp_path):
    """A conv chain 32 -> w -> 32 under DIRECT: at w = 8 the conv reading 8 channels runs the
    direct kernel: a reorder brings its input (8 x 24 x 24) out of the blocked conv before it,
    its output stays blocked; at 18 (a fallback width) both sides are reordered."""
    from latprune.lut.predict import layout_boundaries

    prob = analyse(normalise(_chain(16)), step=1).problem
    t = LatencyTable(tmp_path / "lut.sqlite", FP)
    t.set_blocking(BlockingRules({k: dict(DIRECT.rules["conv"]) for k in ("conv", "conv1x1")}))
    gid = next(g.id for g in prob.groups if g.prunable and g.size == 16)
    assert layout_boundaries(prob, t, {gid: 16}) == 0
    assert layout_boundaries(prob, t, {gid: 8}) * 1e6 == pytest.approx(8 * 24 * 24)
    assert layout_boundaries(prob, t, {gid: 14}) * 1e6 == pytest.approx(14 * 24 * 24)
    t.close()


def test_profile_grid_holds_direct_cells_for_every_layer_reading_one_prunable_group():
    """`latprune profile` promises any width: a layer whose input is one prunable group gets
    cells of the direct kernel (a quarter, half and one under its bound), even where the
    profile's step keeps every candidate on the block, so the table measures that kernel
    instead of trusting the probe's line; a stem's fixed input gets none."""
    rules = BlockingRules({k: dict(DIRECT.rules["conv"]) for k in ("conv", "conv1x1")})
    prob = analyse(normalise(_chain(32)), step=16).problem
    gid = next(g.id for g in prob.groups if g.prunable and g.size == 32)
    reader = next(layer for layer in prob.layers if single_group(layer.c_in) == gid)
    cells = fallback_grid(prob, reader, rules)
    assert {ci for ci, _ in cells if ci < 16} == {4, 8, 15}
    assert all(rules.regime(reader.spec, ci, co) == "direct" for ci, co in cells if ci < 16)
    assert not any(ci < 16 for ci, _ in fallback_grid(prob, prob.layers[0], rules))


@pytest.mark.parametrize("recording", ["probe_avx512_epyc.json", "probe_avx512_epyc_noisy.json"])
def test_a_recorded_avx512_probe_reads_the_direct_kernel_under_its_block_of_16(recording):
    """A real probe (tests/data: AMD EPYC with AVX-512, ONNX Runtime): its 48-80 sweep read the
    1x1 conv's input padding as 8 (another, on a noisy machine, has the 1x1's narrow widths 16%
    RMS off their line), but ONNX Runtime reads every input under its NCHWc block (16)
    directly, and the 1x1 conv at 8-15 channels costs 2-3x its 16-channel time: the threshold
    is the block the other axes agree on, for the 3x3 and the 1x1 alike."""
    from pathlib import Path

    from latprune.profiler.probe import rules_from_timings, runtime_block

    raw = json.loads((Path(__file__).parent / "data" / recording).read_text())["timings"]
    timings = {kind: {axis: {int(w): t for w, t in ms.items()} for axis, ms in axes.items()}
               for kind, axes in raw.items()}
    rules = rules_from_timings(timings)
    conv, conv1x1 = rules.rules["conv"]["in"], rules.rules["conv1x1"]["in"]
    assert runtime_block(rules.rules) == 16
    assert conv.direct_below == 16 and conv1x1.direct_below == 16
    assert conv.align == conv1x1.align == 4
    low = timings["conv1x1"]["in_low"]
    # the 1x1 conv at 12 input channels is priced on the direct line (measured ~2.7x the
    # 16-channel time), not as the fast kernel's padded width
    assert conv1x1.direct_cost(12, low[16]) == pytest.approx(low[12], rel=0.15)
    assert conv.direct_cost(8, timings["conv"]["in_low"][16]) == pytest.approx(timings["conv"]["in_low"][8], rel=0.15)
