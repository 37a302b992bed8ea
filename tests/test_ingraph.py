"""In-graph layer timing (profiler/ingraph.py, latprune/ingraph_profile.py): ONNX Runtime's profiler attributes every kernel
of a whole model to its layer; few pruned copies cover the table's grid."""
from __future__ import annotations

import itertools

import pytest

from latprune.lut.predict import group_grid, required_cells
from latprune.pruner.analysis import analyse
from latprune.pruner.model_io import normalise
from latprune.profiler.fingerprint import TIMING_IN_GRAPH, cpu_fingerprint, fingerprint_id
from latprune.ingraph_profile import config_cells, design_configs, layer_names, profile_in_graph
from latprune.profiler.ingraph import MIN_RUNS, profile_interleaved
from latprune.lut.store import LatencyTable
from onnx_builders import depthwise_cnn, residual_cnn


def _analysis(model, step=8):
    return analyse(normalise(model), step=step)


@pytest.mark.parametrize("build", [residual_cnn, depthwise_cnn], ids=["residual", "depthwise"])
def test_every_layer_kernel_is_attributed(build):
    """Convs fused with BN, activations and residual Adds, depthwise convs and the Gemm head
    all map to their layer; only pooling/flatten/reorders are left as overhead."""
    analysis = _analysis(build())
    prob = analysis.problem
    data = analysis.model.SerializeToString()
    [timing] = profile_interleaved([{}], lambda _: data, data, layer_names(analysis.model, prob), min_seconds=0,
                                   min_runs=3)
    assert sorted(timing.layer_ms) == list(range(len(prob.layers)))
    assert all(ms > 0 for ms in timing.layer_ms.values())
    assert timing.end_to_end_ms > 0
    assert all("Conv" not in name and "Gemm" not in name for name in timing.unmapped), timing.unmapped


def test_design_covers_every_reachable_cell_with_fewer_runs_than_cells():
    prob = _analysis(residual_cnn(blocks=2, width=32)).problem
    grids = {g.id: group_grid(g, 3) for g in prob.groups if g.prunable}
    needed = {(s.signature(), ci, co) for s, ci, co in required_cells(prob, 3)}
    configs = design_configs(prob, needed, grids)
    sigs = [layer.spec.signature() for layer in prob.layers]
    covered = {(sigs[i], ci, co) for w in configs for i, ci, co in config_cells(prob, w)}
    # brute force over every combination of grid widths: what any design could reach
    ids = sorted(grids)
    reachable = set()
    for combo in itertools.product(*(grids[g] for g in ids)):
        reachable |= {(sigs[i], ci, co) for i, ci, co in config_cells(prob, dict(zip(ids, combo)))}
    assert needed & reachable <= covered
    assert len(configs) < len(needed)
    assert all(w[g] in grids[g] for w in configs for g in w)


def test_profile_in_graph_fills_resumes_and_remeasures(tmp_path):
    analysis = _analysis(residual_cnn(blocks=1, width=16))
    prob = analysis.problem
    fp = cpu_fingerprint(threads=1, timing="in-graph")
    assert fp["timing"] == TIMING_IN_GRAPH
    assert fingerprint_id(fp) != fingerprint_id(cpu_fingerprint(threads=1))  # never mixed with isolated cells
    table = LatencyTable(tmp_path / "t.sqlite", fp)
    cells = required_cells(prob, 3)
    stored, runs = profile_in_graph(table, analysis, cells, grid_points=3, min_seconds=0)
    assert stored == len({(s.signature(), ci, co) for s, ci, co in cells}) == table.count()
    assert 0 < len(runs) < stored
    again, runs2 = profile_in_graph(table, analysis, cells, grid_points=3, min_seconds=0)
    assert (again, runs2) == (0, [])
    before = {s.signature(): table.cells(s.signature()) for s, _, _ in cells}
    redo, runs3 = profile_in_graph(table, analysis, cells, grid_points=3, min_seconds=0, remeasure=True)
    assert redo == stored and table.count() == stored
    # the first profile recorded its scale (the dense model's kernel time); later ones use it
    from latprune.ingraph_profile import reference_key

    first = table.reference_phase(reference_key(analysis.model))
    assert first == runs[0].reference_ms > 0 and {t.reference_ms for t in runs3} == {first}
    after = {s.signature(): table.cells(s.signature()) for s, _, _ in cells}
    assert after.keys() == before.keys() and after != before  # new timings replaced the old
    table.close()


def test_profile_model_in_graph_and_isolated_tables_are_separate(tmp_path):
    import onnx

    from latprune.pipeline import predict_model, profile_model

    path = tmp_path / "m.onnx"
    onnx.save(residual_cnn(blocks=1, width=16), str(path))
    lut = tmp_path / "lut.sqlite"
    out = profile_model(path, lut, points=3)
    assert out["cells_measured"] > 0
    pred = predict_model(path, lut)
    assert pred["calibrated"] and pred["predicted_ms"] > 0
    from latprune.types import InputError
    with pytest.raises(InputError, match="--timing isolated"):  # no isolated cells yet
        predict_model(path, lut, timing="isolated")
    iso = profile_model(path, lut, points=3, timing="isolated")
    assert iso["cells_measured"] == out["cells_measured"]
    assert iso["cells_total"] == out["cells_total"]  # counts are per fingerprint
    with pytest.raises(InputError, match="--timing"):
        predict_model(path, lut, timing="sideways")


def test_passes_measure_every_cell_in_several_runs(tmp_path):
    """Each pass has its own design; a cell's value is the median of its measurements and
    its `runs` count grows with the passes."""
    analysis = _analysis(residual_cnn(blocks=1, width=16))
    prob = analysis.problem
    cells = required_cells(prob, 3)
    counts = {}
    for passes in (1, 2):
        table = LatencyTable(tmp_path / f"p{passes}.sqlite", cpu_fingerprint(threads=1, timing="in-graph"))
        stored, runs = profile_in_graph(table, analysis, cells, grid_points=3, min_seconds=0, passes=passes)
        assert stored == table.count() == len({(s.signature(), ci, co) for s, ci, co in cells})
        counts[passes] = (len(runs), dict(table.db.execute("SELECT signature || c_in || '/' || c_out, runs FROM cells")))
        table.close()
    assert counts[2][0] > counts[1][0]
    # MIN_RUNS timed runs per measurement (min_seconds=0): every cell measured at least once, resp. twice
    assert min(counts[1][1].values()) >= MIN_RUNS and min(counts[2][1].values()) >= 2 * MIN_RUNS
    assert sum(counts[2][1].values()) > sum(counts[1][1].values())


def test_a_negative_overhead_never_makes_an_impossible_budget_feasible(tmp_path):
    """The overhead constant of an in-graph table may be negative (the profiler's per-kernel
    cost); the solver still refuses a budget below half the smallest layer sum."""
    from types import SimpleNamespace

    from latprune.lut.predict import layer_costs
    from latprune.lut.store import Calibration
    import onnx

    from latprune.pipeline import OptimizeOptions, _solve_input, prepare
    from latprune.solver.problem_costs import assert_feasible_budget, min_raw_latency
    from latprune.solver.objective import importance_objective
    from latprune.types import InputError

    onnx.save(residual_cnn(blocks=1, width=16), str(tmp_path / "m.onnx"))
    _, _, analysis = prepare(tmp_path / "m.onnx", step=8)
    prob = analysis.problem
    table = LatencyTable(tmp_path / "t.sqlite", cpu_fingerprint(threads=1, timing="in-graph"))
    profile_in_graph(table, analysis, required_cells(prob, 3), grid_points=3, min_seconds=0)
    costs = layer_costs(prob, table)
    scoring = SimpleNamespace(objective=importance_objective(prob))
    inp = _solve_input(prob, costs, 1e-6, Calibration(1.0, 0.0, -1e3), True, OptimizeOptions(), scoring)
    smallest = min_raw_latency(inp)
    assert inp.offset_ms == pytest.approx(-0.5 * smallest)
    with pytest.raises(InputError, match="smallest reachable latency"):
        assert_feasible_budget(inp)
    kept = _solve_input(prob, costs, 1.0, Calibration(1.0, 0.0, -0.1 * smallest), True, OptimizeOptions(), scoring)
    assert kept.offset_ms == pytest.approx(-0.1 * smallest)  # a small negative constant stays
    table.close()


def test_interleaved_rounds_are_sized_by_time_and_scaled_to_the_median_phase():
    """Models run in rounds beside the reference: min_runs..max_runs rounds, sized by
    min_seconds; every timing is scaled by the median batch phase / its batch's phase."""
    import numpy as np

    analysis = _analysis(residual_cnn(blocks=1, width=16))
    prob = analysis.problem
    names = layer_names(analysis.model, prob)
    data = analysis.model.SerializeToString()
    items = [{"i": i} for i in range(5)]
    seen = []
    common = dict(names=names, reference=data, build=lambda item: data, batch=2,
                  on_config=lambda t, scale: seen.append((dict(t.widths), dict(t.layer_ms), scale)))
    quick = profile_interleaved(items, min_seconds=0, min_runs=4, max_runs=6, **common)
    assert [t.widths for t in quick] == items and [w for w, _, _ in seen] == items  # order kept, one call each
    assert {t.runs for t in quick} == {4}
    phases = [quick[0].phase_ms, quick[2].phase_ms, quick[4].phase_ms]  # batches of 2
    assert [t.phase_ms for t in quick] == [phases[0]] * 2 + [phases[1]] * 2 + [phases[2]]
    for k, (t, (_, raw, scale_then)) in enumerate(zip(quick, seen)):
        assert sorted(t.layer_ms) == sorted(raw) == list(range(len(prob.layers)))
        # the callback saw raw times and the scale known then; the final times use all batches
        assert scale_then == pytest.approx(np.median(phases[: k // 2 + 1]) / t.phase_ms)
        for index, ms in t.layer_ms.items():
            assert ms == pytest.approx(raw[index] * np.median(phases) / t.phase_ms)
    assert {t.runs for t in profile_interleaved(items[:1], min_seconds=60, min_runs=4, max_runs=6, **common)} == {6}


class _FakeBackend:
    """A backend whose profiled models are _FakeProfiled."""

    threads = 1

    def profiled(self, data: bytes, prefix: str):
        return _FakeProfiled(data, 1, prefix)


class _FakeProfiled:
    """Stands in for a backend's ProfiledModel: the model bytes say what it is; every plain
    run takes RUN_MS; kernel times are known (the reference's differ from batch to batch)."""

    RUN_MS = 4.0
    opened: list[list[bytes]] = []  # models per batch, in opening order

    def __init__(self, data: bytes, threads: int, prefix: str):
        if data == b"ref":
            _FakeProfiled.opened.append([])
        _FakeProfiled.opened[-1].append(data)
        self.data, self.runs = data, 0

    def run(self, timed: bool = True) -> float:
        self.runs += timed
        return self.RUN_MS

    def finish(self, names, widths):
        from latprune.profiler.ingraph import ConfigTiming

        batch = len(_FakeProfiled.opened)
        ms = 10.0 * batch if self.data == b"ref" else float(self.data[1:])  # b"m<ms>"
        return ConfigTiming(dict(widths or {}), {0: ms}, 0.0, ms, runs=self.runs)


def test_interleaving_uses_the_reference_of_each_batch_and_sizes_rounds_and_batches(monkeypatch):
    import math

    import latprune.profiler.ingraph as ingraph

    _FakeProfiled.opened = []
    monkeypatch.setattr(ingraph, "BATCH_BYTES", 2 * 3 * len(b"ref"))  # room for 3 models: ref + 2
    items = [{0: ms} for ms in (1, 2, 3, 4, 5)]  # group widths, here the copy's kernel ms too
    out = ingraph.profile_interleaved(items, lambda w: b"m%d" % w[0], b"ref", {}, min_seconds=0.1,
                                      min_runs=2, max_runs=1000, backend=_FakeBackend())
    assert _FakeProfiled.opened == [[b"ref", b"m1", b"m2"], [b"ref", b"m3", b"m4"], [b"ref", b"m5"]]
    assert {t.runs for t in out} == {math.ceil(0.1 * 1e3 / _FakeProfiled.RUN_MS)}  # 25 rounds, between the limits
    # the reference's kernel sum in batches 1, 2, 3 is 10, 20, 30 ms: the median is 20
    assert [t.phase_ms for t in out] == [10.0, 10.0, 20.0, 20.0, 30.0]
    for w, t in zip(items, out):
        assert t.widths == w and t.reference_ms == 20.0
        assert t.layer_ms[0] == pytest.approx(w[0] * 20.0 / t.phase_ms)
        assert t.end_to_end_ms == pytest.approx(w[0] * 20.0 / t.phase_ms)
    # an earlier profile's scale: every batch goes to it instead of this profile's median
    _FakeProfiled.opened = []
    anchored = ingraph.profile_interleaved(items, lambda w: b"m%d" % w[0], b"ref", {}, min_seconds=0.1,
                                           min_runs=2, max_runs=1000, phase_ms=40.0, backend=_FakeBackend())
    assert [t.layer_ms[0] for t in anchored] == pytest.approx([w[0] * 40.0 / t.phase_ms for w, t in zip(items, anchored)])
    assert {t.reference_ms for t in anchored} == {40.0}


def test_kernel_medians_skip_the_warmup_runs(tmp_path):
    """Each kernel logs one event per run, warm-up runs first: only the timed ones count."""
    import json

    from latprune.profiler.backends.onnxrt import OrtProfiled as _Profiled

    events = []
    for run, dur in enumerate([9000, 9000, 100, 110, 120]):  # 2 slow warm-up runs, then 3 timed
        events.append({"cat": "Node", "name": "conv_out_nchwc_kernel_time", "dur": dur})
        events.append({"cat": "Node", "name": "pool_kernel_time", "dur": 50})
        events.append({"cat": "Node", "name": "Gelu_token_3_kernel_time", "dur": 20})  # a fusion's node
        events.append({"cat": "Session", "name": "model_run", "dur": dur + 60})
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps(events))
    member = object.__new__(_Profiled)  # no sessions: only the parsing is under test
    member.profiled = type("S", (), {"end_profiling": lambda self: str(trace)})()
    member.runs, member.plain_ms = 3, [1.0, 2.0, 3.0]
    member.fused_outputs = {"Gelu_token_3": ["gelu_out"]}  # from ONNX Runtime's optimised graph
    timing = member.finish({"conv_out": 0, "gelu_out": 1}, {7: 16})
    assert timing.layer_ms == {0: pytest.approx(0.110), 1: pytest.approx(0.020)}
    assert timing.unmapped == ["pool"]
    assert timing.unmapped_ms == pytest.approx(0.05) and timing.end_to_end_ms == 2.0 and timing.runs == 3
    member.runs = 0
    with pytest.raises(ValueError, match="no timed run"):
        member.finish({}, None)


def _filled_table(tmp_path, prob, f, points=5, extra=None):
    from latprune.profiler.fingerprint import cpu_fingerprint

    table = LatencyTable(tmp_path / "r.sqlite", cpu_fingerprint(threads=1, timing="in-graph"))
    table.db.execute("DELETE FROM cells")
    for spec, ci, co in required_cells(prob, points, extra):
        table.put(spec.signature(), ci, co, f(spec.signature(), ci, co), 1)
    return table


def test_refinement_adds_widths_only_where_latency_bends(tmp_path):
    """A table linear between grid widths needs nothing; a bend at one grid width of a group
    gets the candidate widths nearest the midpoints on both sides; one odd cell does not; once
    those cells are in, the same call asks for nothing new."""
    from latprune.lut.predict import group_grid, missing_cells, refine_widths, single_group

    prob = _analysis(residual_cnn(blocks=2, width=64), step=8).problem
    smooth = lambda sig, ci, co: 0.05 + 1e-4 * ci * co  # noqa: E731 (bilinear: interpolation is exact)
    table = _filled_table(tmp_path, prob, smooth)
    assert refine_widths(prob, table) == {}

    # the stem's output group: bend its latency at an interior grid width of the group
    stem = prob.layers[0]
    gid = single_group(stem.c_out)
    grid = group_grid(prob.groups[gid])
    bend = grid[1]  # 24 of 8, 24, 40, 48, 64: candidates (multiples of 8) lie on both sides
    sig = stem.spec.signature()
    bent = lambda s, ci, co: smooth(s, ci, co) * (1.3 if (s, co) == (sig, bend) else 1.0)  # noqa: E731
    table.close()
    table = _filled_table(tmp_path, prob, bent)
    extra = refine_widths(prob, table)
    assert gid in extra
    below, above = grid[grid.index(bend) - 1], grid[grid.index(bend) + 1]
    cands = prob.groups[gid].candidate_widths
    # the intervals on both sides of the bend get a width (a neighbour's check, which uses the
    # bent cell, may add one more beyond it); none on the grid, all candidates
    assert (below, bend, above) == (8, 24, 40)
    assert 16 in extra[gid] and 32 in extra[gid]
    assert set(extra[gid]) <= set(cands) - set(grid)
    missing = missing_cells(prob, table, extra=extra)
    added = {w for ws in extra.values() for w in ws}  # (layers share the stem's signature: more groups bend)
    assert missing and all(ci in added or co in added for _, ci, co in missing)
    for spec, ci, co in missing:
        table.put(spec.signature(), ci, co, bent(spec.signature(), ci, co), 1)
    assert refine_widths(prob, table) == extra and missing_cells(prob, table, extra=extra) == []
    table.close()

    # one odd cell of a layer with 5 rows and 5 columns: the median over its lines stays small
    from latprune.lut.predict import layer_grid

    inner = next(x for x in prob.layers if single_group(x.c_in) is not None and single_group(x.c_out) is not None)
    cell = (inner.spec.signature(), *layer_grid(prob, inner)[6])  # second row, second column
    odd = lambda s, ci, co: smooth(s, ci, co) * (1.3 if (s, ci, co) == cell else 1.0)  # noqa: E731
    table = _filled_table(tmp_path, prob, odd)
    assert refine_widths(prob, table) == {}
    table.close()


def test_profile_in_graph_reaches_widths_added_to_the_grid(tmp_path):
    from latprune.lut.predict import group_grid, missing_cells

    analysis = _analysis(residual_cnn(blocks=1, width=32))
    prob = analysis.problem
    gid = next(g.id for g in prob.groups if g.prunable and len(g.candidate_widths) > 3)
    grid = group_grid(prob.groups[gid], 3)
    extra = {gid: [w for w in prob.groups[gid].candidate_widths if w not in grid][:1]}
    table = LatencyTable(tmp_path / "t.sqlite", cpu_fingerprint(threads=1, timing="in-graph"))
    profile_in_graph(table, analysis, required_cells(prob, 3), grid_points=3, min_seconds=0)
    todo = missing_cells(prob, table, 3, extra)
    assert todo and all(extra[gid][0] in (ci, co) for _, ci, co in todo)
    stored, _ = profile_in_graph(table, analysis, todo, grid_points=3, min_seconds=0)  # widths from the cells
    assert stored > 0 and len(missing_cells(prob, table, 3, extra)) < len(todo)
    table.close()


def test_models_new_to_a_table_are_scaled_to_the_tables_clock(tmp_path):
    """The first model profiled into a table records the clock's kernel time; a later model's
    phase is its dense kernel time times (recorded clock / clock now): a table whose clock was
    recorded on a machine 3x slower scales a new model's cells up by about 3."""
    from latprune.ingraph_profile import CLOCK_KEY, anchored_phase

    analysis = _analysis(residual_cnn(blocks=1, width=16))
    table = LatencyTable(tmp_path / "t.sqlite", cpu_fingerprint(threads=1, timing="in-graph"))
    plain = anchored_phase(table, analysis, min_seconds=0.2)
    clock = table.reference_phase(CLOCK_KEY)
    assert plain > 0 and clock > 0
    slow = LatencyTable(tmp_path / "slow.sqlite", cpu_fingerprint(threads=1, timing="in-graph"))
    slow.set_reference_phase(CLOCK_KEY, 3 * clock)
    scaled = anchored_phase(slow, analysis, min_seconds=0.2)
    assert slow.reference_phase(CLOCK_KEY) == 3 * clock  # the first record stays
    assert 2.0 < scaled / plain < 4.5
    table.close()
    slow.close()


def test_a_model_new_to_a_table_is_scaled_to_the_tables_cells_not_a_wrong_clock(tmp_path):
    """A second model whose layers the table already covers (same kinds, narrower) is scaled
    so that its cells agree with the earlier ones, even when the table's clock is off: here
    the clock's record says the machine was 3x slower, which alone would scale its cells by
    about 3 (test_models_new_to_a_table_are_scaled_to_the_tables_clock)."""
    from latprune.ingraph_profile import CLOCK_KEY, reference_key
    from latprune.lut.predict import predict_layers

    wide, narrow = _analysis(residual_cnn(blocks=1, width=32)), _analysis(residual_cnn(blocks=1, width=24))
    table = LatencyTable(tmp_path / "t.sqlite", cpu_fingerprint(threads=1, timing="in-graph"))
    profile_in_graph(table, wide, required_cells(wide.problem, 3), grid_points=3, min_seconds=0.2)
    table.set_reference_phase(CLOCK_KEY, 3 * table.reference_phase(CLOCK_KEY), replace=True)
    middle = {g.id: 16 for g in narrow.problem.groups if g.prunable}  # on the narrow grid, not the wide one
    before = predict_layers(narrow.problem, table, middle)  # interpolated between the wide model's cells
    assert before.found["interpolated"] > 0
    notes = []
    profile_in_graph(table, narrow, required_cells(narrow.problem, 3), grid_points=3, min_seconds=0.2,
                     note=notes.append)
    assert len(notes) == 1 and "table's earlier cells" in notes[0]
    after = predict_layers(narrow.problem, table, middle)  # the narrow model's own cells
    assert after.found["measured"] > before.found["measured"]
    assert 0.6 < after.raw_ms / before.raw_ms < 1.6
    assert table.reference_phase(reference_key(narrow.model)) > 0
    table.close()
