"""The OpenVINO backend on this CPU, and the backend interface the pipeline goes through:
fingerprints that keep tables apart, the IR artifact that is measured, per-layer times from
OpenVINO's performance counters mapped to ONNX nodes, and one-line errors for a runtime that
is missing or cannot compile a model."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnx_builders import residual_cnn
from latprune.profiler.backends import BackendUnavailable, available, get_backend

pytestmark = pytest.mark.skipif(available().get("openvino") != "ok",
                                reason=f"OpenVINO: {available().get('openvino')}")


def _ov(precision="f32"):
    return get_backend("openvino", threads=1, precision=precision)


def test_fingerprint_names_runtime_and_the_precision_in_use():
    fp = _ov().fingerprint()
    assert fp["runtime"].startswith("openvino ") and fp["precision"] == "f32"
    assert fp["timing"] == "openvino-perf-count-in-graph/1" and fp["threads"] == 1
    default = _ov(None)
    assert default.fingerprint()["precision"] in ("f32", "bf16", "f16")  # what OpenVINO chose here
    ort_fp = get_backend("ort-cpu").fingerprint()
    assert ort_fp != fp and ort_fp["runtime"].startswith("onnxruntime")
    with pytest.raises(BackendUnavailable, match="precision"):
        _ov("int4").check()


def test_ir_artifact_runs_like_the_onnx_model(tmp_path):
    model = residual_cnn()
    onnx.save(model, str(tmp_path / "m.onnx"))
    backend = _ov()
    xml = backend.build(tmp_path / "m.onnx", tmp_path)
    assert xml.name == "m.xml" and (tmp_path / "m.bin").stat().st_size > 0
    x = np.random.default_rng(0).normal(size=(1, 3, 16, 16)).astype(np.float32)
    import onnxruntime as ort

    want = ort.InferenceSession(model.SerializeToString()).run(None, {"input": x})[0]
    runner = backend.load(xml)
    runner.request.infer({0: x})
    got = runner.request.get_output_tensor(0).data
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    stats = backend.measure(xml, warmup=2, min_runs=5, min_seconds=0.01)
    assert stats.median_ms > 0 and stats.runs >= 5


def test_performance_counters_attribute_every_layer():
    from latprune.ingraph_profile import layer_names
    from latprune.pruner.analysis import analyse

    an = analyse(residual_cnn())
    prof = _ov().profiled(an.model.SerializeToString(), "unused")
    for _ in range(2):
        prof.run(timed=False)
    for _ in range(5):
        prof.run()
    timing = prof.finish(layer_names(an.model, an.problem), {})
    assert sorted(timing.layer_ms) == list(range(len(an.problem.layers)))  # each conv/gemm has time
    assert all(ms > 0 for ms in timing.layer_ms.values()) and timing.runs == 5
    # kernels outside layers: input reorder, pooling
    assert timing.unmapped_ms < sum(timing.layer_ms.values())


def test_optimize_on_openvino_writes_and_measures_the_ir(tmp_path):
    from latprune.pipeline import OptimizeOptions, optimize

    onnx.save(residual_cnn(), str(tmp_path / "m.onnx"))
    lut = tmp_path / "lut.sqlite"
    opts = OptimizeOptions(speedup=1.25, backend="openvino", precision="f32", lut_path=lut, rounds=3,
                           measure_processes=1)
    report = optimize(tmp_path / "m.onnx", tmp_path / "out", opts)
    out = tmp_path / "out"
    assert {"pruned.onnx", "pruned.xml", "pruned.bin", "report.json", "plan.json"} <= {p.name for p in out.iterdir()}
    assert report["backend"]["name"] == "openvino" and report["backend"]["precision"] == "f32"
    assert report["backend"]["artifacts"] == ["pruned.onnx", "pruned.bin", "pruned.xml"]
    assert report["device"]["runtime"].startswith("openvino")
    onnx.checker.check_model(onnx.load(str(out / "pruned.onnx")), full_check=True)
    # the table holds OpenVINO cells only: an ONNX Runtime table of the same file is empty
    from latprune.lut.store import LatencyTable
    ov_table = LatencyTable(lut, get_backend("openvino", precision="f32").fingerprint())
    ort_table = LatencyTable(lut, get_backend("ort-cpu").fingerprint())
    try:
        assert ov_table.count() > 0 and ort_table.count() == 0
    finally:
        ov_table.close()
        ort_table.close()


def test_missing_runtime_is_one_line_naming_the_package(tmp_path, monkeypatch):
    import latprune.profiler.backends.openvino as ovb

    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` fails
    monkeypatch.setattr(ovb, "_CORE", None)
    with pytest.raises(BackendUnavailable, match="pip install openvino"):
        get_backend("openvino").check()


def test_cli_unavailable_backend_and_uncompilable_model(tmp_path):
    onnx.save(residual_cnn(), str(tmp_path / "m.onnx"))
    proc = subprocess.run([sys.executable, "-m", "latprune.cli", "optimize", str(tmp_path / "m.onnx"), "--speedup",
                           "2", "--backend", "trt", "--out", str(tmp_path / "o"), "-q"], capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "tensorrt" in proc.stderr.lower() and not (tmp_path / "o").exists()
    proc = subprocess.run([sys.executable, "-m", "latprune.cli", "measure", str(tmp_path / "m.onnx"), "--backend",
                           "coreml"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown backend" in proc.stderr
    # a model OpenVINO cannot compile: an op from an unknown domain
    graph = helper.make_graph([helper.make_node("Mystery", ["x"], ["y"], domain="example.ops")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    bad = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.ops", 1)])
    onnx.save(bad, str(tmp_path / "bad.onnx"))
    proc = subprocess.run([sys.executable, "-m", "latprune.cli", "measure", str(tmp_path / "bad.onnx"), "--backend",
                           "openvino", "--json"], capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""
    assert "openvino" in proc.stderr.lower()


def test_side_by_side_measurement_in_fresh_processes_on_openvino(tmp_path):
    from latprune.profiler.compare import compare_in_subprocesses

    onnx.save(residual_cnn(), str(tmp_path / "m.onnx"))
    backend = _ov()
    xml = backend.build(tmp_path / "m.onnx", tmp_path)
    stats = compare_in_subprocesses({"a": xml, "b": tmp_path / "m.onnx"}, processes=1, bursts=2, backend=backend)
    assert set(stats) == {"a", "b"} and all(s.median_ms > 0 for s in stats.values())
    assert json.loads(json.dumps(backend.spec())) == {"name": "openvino", "threads": 1, "precision": "f32",
                                                      "device": "CPU"}


def test_channel_step_probe_decision():
    from latprune.profiler.probe import step_from_timings

    # a runtime that pads channels to blocks of 16: half-block widths cost like the next block
    blocked = {w: (-(-w // 16) * 16) ** 2 * 1e-4 for w in range(32, 129, 4)}
    assert step_from_timings(blocked)[0] == 16
    smooth = {w: w * w * 1e-4 for w in range(32, 129, 4)}
    step, ratios = step_from_timings(smooth)
    assert step == 8 and all(abs(r - 1) < 1e-9 for r in ratios.values())
