"""OpenVINO on the CPU: ONNX compiled directly, per-layer timings from its performance
counters, the OpenVINO IR (model.xml + model.bin) as the artifact.

Precision. On CPUs with bf16 support OpenVINO runs bf16 by default, which changes latency and
accuracy: `precision` None keeps the runtime's choice, 'f32' / 'bf16' / 'f16' ask for one
(INFERENCE_PRECISION_HINT). The precision that is actually used is read back from the compiled
model and recorded in the fingerprint, so tables of different precisions never mix.

Fusion records. A compiled model's runtime graph gives, for every executed node, the names of
the original (ONNX) nodes fused into it (`originalLayersNames`); its performance counters
(PERF_COUNT) time each executed node. A node is attributed to the layer that claims one of its
original names (latprune.ingraph_profile.layer_names), else it is overhead.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from latprune.profiler.backends.base import Backend, BackendUnavailable, PairedProfiled, ProfiledModel, Runner
from latprune.types import TimingStats

PRECISIONS = {"f32": "f32", "fp32": "f32", "float32": "f32", "bf16": "bf16", "bfloat16": "bf16",
              "f16": "f16", "fp16": "f16", "float16": "f16"}


def _ov():
    try:
        import openvino as ov
    except ImportError:
        raise BackendUnavailable("openvino is not installed (pip install openvino)") from None
    return ov


_CORE = None


def _core():
    global _CORE
    if _CORE is None:
        _CORE = _ov().Core()
    return _CORE


def _read(model):
    """An ov.Model from ONNX bytes, a ModelProto, or a path (.onnx or IR .xml)."""
    core = _core()
    try:
        if isinstance(model, (str, Path)):
            return core.read_model(str(model))
        data = model if isinstance(model, bytes) else model.SerializeToString()
        return core.read_model(data)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackendUnavailable(f"OpenVINO cannot read the model: {first}") from None


class OpenVINORunner(Runner):
    def __init__(self, compiled) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()

    def inputs(self, n: int = 1, seed: int = 0) -> list:
        rng = np.random.default_rng(seed)
        sets = []
        for _ in range(n):
            feed = {}
            for i, port in enumerate(self.compiled.inputs):
                shape = [d if d > 0 else 1 for d in port.get_partial_shape().get_min_shape()]
                dtype = port.get_element_type().to_dtype()
                feed[i] = (rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating)
                           else np.zeros(shape, dtype))
            sets.append(feed)
        return sets

    def run_ms(self, inputs) -> float:
        t0 = time.perf_counter()
        self.request.infer(inputs, share_inputs=True, share_outputs=True)
        return (time.perf_counter() - t0) * 1e3


class OpenVINOProfiled(PairedProfiled):
    """One model compiled twice: with performance counters (per-node times) and plain."""

    def __init__(self, backend: "OpenVINOBackend", data: bytes) -> None:
        model = _read(data)
        self.perf = backend.compile(model, perf_count=True)
        self.plain = OpenVINORunner(backend.compile(model))
        self.request = self.perf.create_infer_request()
        self.feed = OpenVINORunner(self.perf).inputs(1)[0]
        self.plain_feed = self.plain.inputs(1)[0]
        self.originals: dict[str, list[str]] = {}
        for op in self.perf.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            names = info["originalLayersNames"].astype(str) if "originalLayersNames" in info else ""
            self.originals[op.get_friendly_name()] = [n for n in names.split(",") if n]
        self._start()

    def _kernel_times(self) -> dict[str, float]:
        self.request.infer(self.feed, share_inputs=True, share_outputs=True)
        times: dict[str, float] = {}
        for p in self.request.get_profiling_info():
            if p.status.name == "EXECUTED":
                times[p.node_name] = times.get(p.node_name, 0.0) + p.real_time.total_seconds() * 1e3
        return times

    def _layer_of(self, node: str, names: dict[str, int]) -> int | None:
        if node in names:
            return names[node]
        return next((names[o] for o in self.originals.get(node, []) if o in names), None)


class OpenVINOBackend(Backend):
    name = "openvino"
    timing_labels = {"in-graph": "openvino-perf-count-in-graph/1", "isolated": "openvino-isolated/1"}
    artifact_suffix = ".xml"

    def __init__(self, threads: int = 1, precision: str | None = None, device: str = "CPU") -> None:
        super().__init__(threads, precision)
        self.device = device
        self._effective: str | None = None

    def check(self) -> None:
        ov = _ov()
        core = _core()
        if self.device not in core.available_devices:
            raise BackendUnavailable(f"openvino: no {self.device} device ({', '.join(core.available_devices)})")
        if self.precision is not None:
            p = PRECISIONS.get(str(self.precision).lower())
            if p is None:
                raise BackendUnavailable(f"openvino: precision {self.precision!r}: choose f32, bf16 or f16")
            caps = core.get_property(self.device, "OPTIMIZATION_CAPABILITIES")
            if {"f32": "FP32", "bf16": "BF16", "f16": "FP16"}[p] not in [str(c).upper() for c in caps]:
                raise BackendUnavailable(f"openvino: {p} is not supported by this {self.device} "
                                         f"({', '.join(map(str, caps))})")
        del ov

    def config(self, perf_count: bool = False) -> dict:
        cfg = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": int(self.threads), "NUM_STREAMS": 1}
        if self.precision is not None:
            cfg["INFERENCE_PRECISION_HINT"] = PRECISIONS[str(self.precision).lower()]
        if perf_count:
            cfg["PERF_COUNT"] = True
        return cfg

    def compile(self, model, perf_count: bool = False):
        self.check()
        try:
            return _core().compile_model(model, self.device, self.config(perf_count))
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackendUnavailable(f"OpenVINO cannot compile the model: {first}") from None

    def effective_precision(self) -> str:
        """The inference precision OpenVINO uses here (read back from a compiled model)."""
        if self._effective is None:
            from onnx import TensorProto, helper

            graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
            model.ir_version = 8
            compiled = self.compile(_read(model.SerializeToString()))
            hint = compiled.get_property("INFERENCE_PRECISION_HINT")
            self._effective = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        return self._effective

    def fingerprint(self, batch: int = 1, timing: str = "in-graph") -> dict:
        import platform

        from latprune.profiler.fingerprint import cpu_model

        ov = _ov()
        return {
            "device": self.device.lower(),
            "cpu": cpu_model(),
            "machine": platform.machine(),
            "runtime": f"openvino {ov.__version__.split('-')[0]}",
            "provider": f"openvino-{self.device}",
            "threads": self.threads,
            "batch": batch,
            "precision": self.effective_precision(),
            "timing": self.timing_labels[timing],
        }

    def spec(self) -> dict:
        return {**super().spec(), "device": self.device}

    def load(self, model) -> OpenVINORunner:
        return OpenVINORunner(self.compile(_read(model)))

    def build(self, onnx_path: Path, out_dir: Path) -> Path:
        """OpenVINO IR of the ONNX file: `<stem>.xml` + `<stem>.bin` in out_dir (weights kept
        in float32; the inference precision is a compile-time choice)."""
        ov = _ov()
        out = Path(out_dir) / (Path(onnx_path).stem + self.artifact_suffix)
        ov.save_model(_read(Path(onnx_path)), str(out), compress_to_fp16=False)
        return out

    def profiled(self, data: bytes, prefix: str) -> ProfiledModel:
        return OpenVINOProfiled(self, data)

    def time_layer(self, spec, c_in: int, c_out: int) -> TimingStats:
        """One layer timed alone, minus OpenVINO's per-inference cost (a trivial model's)."""
        st = super().time_layer(spec, c_in, c_out)
        overhead = self._call_overhead_ms()
        net = lambda v: max(v - overhead, 0.1 * v)  # noqa: E731
        return TimingStats(net(st.median_ms), net(st.p90_ms), net(st.min_ms), st.runs)

    _overhead: float | None = None

    def _call_overhead_ms(self) -> float:
        if self._overhead is None:
            from onnx import TensorProto, helper

            from latprune.profiler.backends.base import timed_runs

            graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "noop",
                                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
                                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
            model.ir_version = 8
            self._overhead = float(np.median(timed_runs(self.load(model.SerializeToString()), 20, 200, 0.05)))
        return self._overhead
