"""ONNX Runtime backends: CPU (default) and the CUDA / TensorRT execution providers.

ONNX Runtime's fusion records, used to map profiled kernels back to ONNX nodes, live here
(`_kernel_name`, `_fused_outputs`): a kernel is named after the node it runs, or after the
output of the last node fused into it (`<tensor>_nchwc` for blocked convs), or it is a node
ONNX Runtime made (`Gelu_token_3`, `<node>/QuickGeluFusion/`) whose output tensors its
optimised graph names.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from latprune.profiler.backends.base import Backend, BackendUnavailable, ProfiledModel, Runner
from latprune.types import TimingStats


def _model_bytes(model) -> bytes:
    if isinstance(model, bytes):
        return model
    if isinstance(model, (str, Path)):
        return Path(model).read_bytes()
    return model.SerializeToString()


class OrtRunner(Runner):
    def __init__(self, session) -> None:
        self.session = session

    def inputs(self, n: int = 1, seed: int = 0) -> list:
        from latprune.profiler.onnxrt import random_feed

        return [random_feed(self.session, seed + i) for i in range(n)]

    def run_ms(self, inputs) -> float:
        # session.run copies outputs back to the host, so it returns after the GPU finished.
        t0 = time.perf_counter()
        self.session.run(None, inputs)
        return (time.perf_counter() - t0) * 1e3


def _kernel_name(event_name: str) -> str:
    """The node (or tensor) name a kernel event refers to: without `_kernel_time`, the
    `_nchwc` of blocked convs and a trailing `/<Name>Fusion/` that ONNX Runtime appends to the
    node a fusion kept (x·sigmoid(x) runs as `<Mul node>/QuickGeluFusion/`)."""
    base = event_name[: -len("_kernel_time")]
    base = re.sub(r"/[A-Za-z]+Fusion/?$", "", base)
    return base[: -len("_nchwc")] if base.endswith("_nchwc") else base


# Kernels that move data between layouts: a reorder done for a layer running a plain-layout
# kernel is that layer's (_reorder_neighbours), any other (around pooling, flatten) overhead.
_LAYOUT_OPS = {"ReorderInput", "ReorderOutput", "Transpose"}


def _save_optimized(opts, path: str) -> None:
    """Make the session built with `opts` write its optimised graph to `path` (its large
    initializers beside it, so a big model stays under protobuf's 2 GB)."""
    opts.optimized_model_filepath = path
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                  os.path.basename(path) + ".bin")
    opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "64")


def _optimized_graph(path: str):
    import onnx

    try:
        return onnx.load(path, load_external_data=False).graph
    except Exception:  # pragma: no cover - written by ONNX Runtime itself
        return None


def _fused_outputs(graph) -> dict[str, list[str]]:
    """{node name: output tensors} of the nodes in ONNX Runtime's optimised graph (names it
    made up, e.g. `Gelu_token_3`), layout reorders left out; {} if it wrote none."""
    if graph is None:
        return {}
    return {n.name: list(n.output) for n in graph.node if n.op_type not in _LAYOUT_OPS}


def _reorder_neighbours(graph) -> dict[str, list[str]]:
    """{reorder node: the nodes it is done for}: a ReorderOutput (blocked to plain layout) for
    the nodes that read its output, a ReorderInput (plain to blocked) for the node that wrote
    its input. Either exists because that neighbour runs a plain-layout kernel (an NCHWc
    conv's fallback at an unaligned width, issue 15), so its time is that neighbour's when the
    neighbour is a layer."""
    if graph is None:
        return {}
    producer = {out: n.name for n in graph.node for out in n.output}
    consumers: dict[str, list[str]] = defaultdict(list)
    for n in graph.node:
        for inp in n.input:
            consumers[inp].append(n.name)
    out: dict[str, list[str]] = {}
    for n in graph.node:
        if n.op_type == "ReorderOutput":
            out[n.name] = consumers.get(n.output[0], [])
        elif n.op_type == "ReorderInput" and n.input and n.input[0] in producer:
            out[n.name] = [producer[n.input[0]]]
    return out


def _inferred_graph(model_bytes: bytes):
    """The model's graph after ONNX shape inference (symbolic input dimensions read as 1, the
    batch tables are keyed by), or None if inference fails."""
    import onnx

    try:
        model = onnx.load_from_string(model_bytes)
        for inp in model.graph.input:
            for dim in inp.type.tensor_type.shape.dim:
                if not dim.HasField("dim_value") or dim.dim_value <= 0:
                    dim.dim_value = 1
        return onnx.shape_inference.infer_shapes(model).graph
    except Exception:
        return None


def _graph_elements(graph) -> dict[str, int]:
    """{tensor: elements} of an inferred graph (_inferred_graph); {} for None."""
    out = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output) if graph is not None else ():
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in vi.type.tensor_type.shape.dim]
        if dims and all(d > 0 for d in dims):
            out[vi.name] = math.prod(dims)
    return out


def _tensor_elements(model_bytes: bytes) -> dict[str, int]:
    """{tensor: elements} of a model (_inferred_graph); {} if inference fails."""
    return _graph_elements(_inferred_graph(model_bytes))


def _reorder_sizes(graph, elements: dict[str, int]) -> dict[str, int] | None:
    """{layout reorder node: elements it moves} in ONNX Runtime's optimised graph: its plain
    side (a ReorderInput's input, a ReorderOutput's output keeps the original tensor's name),
    sized from the original model's shapes; None if a reorder's size is unknown."""
    if graph is None:
        return None
    sizes = {}
    for n in graph.node:
        if n.op_type in ("ReorderInput", "ReorderOutput"):
            tensor = n.input[0] if n.op_type == "ReorderInput" else n.output[0]
            if tensor not in elements:
                return None
            sizes[n.name] = elements[tensor]
    return sizes


_NCHWC_DOMAIN = "com.microsoft.nchwc"


def _original_sizes(model_bytes: bytes) -> tuple[dict[str, int], dict[str, int]]:
    """({tensor: elements}, {node name or output tensor: the most elements the node reads or
    writes}) of the original model, from one shape inference: a kernel the optimiser kept is
    named after its node, a blocked one after its output tensor (_kernel_name), and its work
    is its largest tensor (a GlobalAveragePool's input, a squeeze-excite Mul's output)."""
    graph = _inferred_graph(model_bytes)
    elements = _graph_elements(graph)
    touched: dict[str, int] = {}
    for n in graph.node if graph is not None else ():
        size = max((elements.get(t, 0) for t in list(n.input) + list(n.output) if t), default=0)
        if size:
            touched[n.name] = size
            for t in n.output:
                touched.setdefault(t, size)
    return elements, touched


def _graph_kernels(graph, sizes: tuple[dict[str, int], dict[str, int]], claimed) -> dict[str, tuple[str, int]]:
    """{kernel name (as _kernel_name gives it): (class, elements)} of the kernels of ONNX
    Runtime's optimised graph that no layer claims (`claimed(kernel)` is False): layout
    reorders (class "ReorderInput" / "ReorderOutput", sized by their plain side) and the other
    operators (class "<op>/blocked" when it runs on NCHWc tensors, "<op>/plain" otherwise,
    sized by the original node's largest tensor; 0 when unknown). What a kernel costs depends
    on its layout: a GlobalAveragePool over a plain tensor took ~3x the time per element of a
    blocked one on the AVX-512 EPYC (EfficientNet-B0's squeeze-excite, issue 15)."""
    if graph is None:
        return {}
    elements, touched = sizes
    reorder_sizes = _reorder_sizes(graph, elements) or {}
    blocked: set[str] = set()
    out: dict[str, tuple[str, int]] = {}
    for n in graph.node:  # topological order: a node's inputs are classified before it
        nchwc = n.domain == _NCHWC_DOMAIN
        is_blocked = (nchwc and n.op_type != "ReorderOutput") or (not nchwc and any(i in blocked for i in n.input))
        if is_blocked:
            blocked.update(t for t in n.output if t)
        kernel = _kernel_name(n.name + "_kernel_time")
        if n.op_type in ("ReorderInput", "ReorderOutput"):
            out[kernel] = (n.op_type, reorder_sizes.get(n.name, 0))
            continue
        if claimed(kernel):
            continue
        size = touched.get(kernel) or max((elements.get(t, 0) for t in list(n.input) + list(n.output) if t),
                                          default=0)
        out[kernel] = (f"{n.op_type}/{'blocked' if is_blocked else 'plain'}", size)
    return out


class OrtProfiled(ProfiledModel):
    """One model open twice: under ONNX Runtime's profiler (kernel times) and plain (end-to-end
    time of the same moments)."""

    fused_outputs: dict[str, list[str]] = {}  # nodes ONNX Runtime made -> the tensors they write
    reorders: dict[str, list[str]] = {}  # layout reorder nodes -> the nodes they are done for
    reorder_sizes: dict[str, int] | None = None  # layout reorder nodes -> elements they move
    graph = None  # ONNX Runtime's optimised graph (onnx GraphProto), None if it wrote none
    sizes: tuple[dict[str, int], dict[str, int]] = ({}, {})  # _original_sizes of the model

    def __init__(self, data: bytes, threads: int, prefix: str):
        from latprune.profiler.onnxrt import make_session, random_feed, session_options

        opts = session_options(threads)
        opts.enable_profiling = True
        opts.profile_file_prefix = prefix
        # ONNX Runtime's optimised graph, to map the kernels of nodes its fusions made (a GELU
        # written out in five nodes runs as one `Gelu_token_N`) to the tensors they write.
        optimized = prefix + "_optimized.onnx"
        _save_optimized(opts, optimized)
        self.profiled = make_session(data, threads, opts)
        graph = _optimized_graph(optimized)
        self.fused_outputs = _fused_outputs(graph)
        self.reorders = _reorder_neighbours(graph)
        self.graph = graph
        self.sizes = _original_sizes(data)
        self.reorder_sizes = _reorder_sizes(graph, self.sizes[0])
        self.feed = random_feed(self.profiled)
        self.plain = make_session(data, threads)
        self.plain_feed = random_feed(self.plain)
        self.plain_ms: list[float] = []
        self.runs = 0

    def run(self, timed: bool = True) -> float:
        """One profiled run and one plain run (counted unless warming up); the plain run's ms."""
        self.profiled.run(None, self.feed)
        t0 = time.perf_counter()
        self.plain.run(None, self.plain_feed)
        ms = (time.perf_counter() - t0) * 1e3
        if timed:
            self.plain_ms.append(ms)
            self.runs += 1
        return ms

    def finish(self, names: dict[str, int], widths: dict[int, int] | None):
        """Kernel medians over the timed runs (each kernel logs one event per run, warm-up
        runs first), attributed to layers through `names`."""
        if self.runs < 1:
            raise ValueError("no timed run to take kernel times from")
        events = json.loads(Path(self.profiled.end_profiling()).read_text())
        kernel_us: dict[str, list[float]] = defaultdict(list)
        for ev in events:
            if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
                kernel_us[ev["name"]].append(float(ev["dur"]))
        kernel_ms = {}
        for name, durs in kernel_us.items():
            key = _kernel_name(name)
            kernel_ms[key] = kernel_ms.get(key, 0.0) + float(np.median(durs[len(durs) - self.runs:])) / 1e3

        def node_layer(kernel: str) -> int | None:
            index = names.get(kernel)
            for tensor in self.fused_outputs.get(kernel, []) if index is None else ():
                index = names.get(tensor, index)
            return index

        def reorder_of(kernel: str) -> int | None:  # a layout reorder: the layer it is done for, if any
            return next((i for i in map(node_layer, self.reorders.get(kernel, ())) if i is not None), None)

        for_layer = {k for k in kernel_ms if reorder_of(k) is not None}
        for_other = {k for k in kernel_ms if k in self.reorders and k not in for_layer}
        timing = attribute_kernels({k: v for k, v in kernel_ms.items() if k not in for_layer | for_other},
                                   node_layer, widths, float(np.median(self.plain_ms)), self.runs)
        timing.reorder_ms = sum(kernel_ms[k] for k in for_layer)
        timing.overhead_reorder_ms = sum(kernel_ms[k] for k in for_other)
        if self.reorder_sizes is not None:  # the graph's own reorders, for lut.predict's graph fit
            timing.reorder_count = len(self.reorder_sizes)
            timing.reorder_melements = sum(self.reorder_sizes.values()) / 1e6
        census = _graph_kernels(self.graph, self.sizes, lambda k: node_layer(k) is not None)
        if census:  # every kernel no layer claims, by class and size (LatencyTable.kernel_prices)
            timing.kernels = [(cls, size / 1e6, kernel_ms[k]) for k, (cls, size) in census.items() if k in kernel_ms]
        return timing


def attribute_kernels(kernel_ms: dict[str, float], layer_of, widths, end_to_end_ms: float, runs: int):
    """ConfigTiming from per-kernel medians (ms) and a kernel -> layer index (or None) map."""
    from latprune.profiler.ingraph import ConfigTiming

    layer_ms: dict[int, float] = defaultdict(float)
    unmapped: dict[str, float] = {}
    for kernel, ms in kernel_ms.items():
        index = layer_of(kernel)
        if index is None:
            unmapped[kernel] = unmapped.get(kernel, 0.0) + ms
        else:
            layer_ms[index] += ms
    return ConfigTiming(dict(widths or {}), dict(layer_ms), float(sum(unmapped.values())), end_to_end_ms,
                        list(unmapped), unmapped, runs=runs)


PROVIDER_NAMES = {"CPUExecutionProvider": "ort-cpu", "CUDAExecutionProvider": "ort-cuda",
                  "TensorrtExecutionProvider": "ort-trt"}


class OrtBackend(Backend):
    """ONNX Runtime with one execution provider. CPU: full graph optimisation, `threads`
    intra-op threads, float32. CUDA / TensorRT EP: precision 'fp16' enables TensorRT's FP16."""

    def __init__(self, provider: str = "CPUExecutionProvider", threads: int = 1, precision: str | None = None,
                 fp16: bool = False) -> None:
        super().__init__(threads, precision or ("fp16" if fp16 else None))
        self.provider = provider
        self.fp16 = self.precision == "fp16"
        self.name = PROVIDER_NAMES.get(provider, provider)
        gpu = "gpu-ep" if provider != "CPUExecutionProvider" else None
        from latprune.profiler.fingerprint import TIMINGS

        self.timing_labels = dict(TIMINGS) if gpu is None else {"in-graph": f"ort-profile-in-graph/2-{gpu}",
                                                                 "isolated": f"ort-isolated/1-{gpu}"}

    @property
    def cpu(self) -> bool:
        return self.provider == "CPUExecutionProvider"

    def check(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailable("onnxruntime is not installed (pip install onnxruntime)") from None
        if self.provider not in ort.get_available_providers():
            raise BackendUnavailable(
                f"{self.name}: {self.provider} is not in this onnxruntime build "
                f"({', '.join(ort.get_available_providers())}); install onnxruntime-gpu on a CUDA machine")
        if not self.cpu:
            from latprune.profiler.backends.trt import cuda_device_count
            if cuda_device_count() == 0:
                raise BackendUnavailable(f"{self.name}: no CUDA device visible")
        if self.precision not in (None, "fp32", "float32") and (self.cpu or self.precision != "fp16"):
            raise BackendUnavailable(f"{self.name}: precision {self.precision!r} is not supported "
                                     f"({'float32 only' if self.cpu else 'fp32 or fp16'})")

    def _session(self, model, opts=None):
        self.check()
        if self.cpu:
            from latprune.profiler.onnxrt import make_session
            return make_session(_model_bytes(model), self.threads, opts)
        import onnxruntime as ort

        opts = opts or ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        provider_opts = {}
        if self.provider == "TensorrtExecutionProvider":
            provider_opts = {"trt_fp16_enable": self.fp16, "trt_engine_cache_enable": True,
                             "trt_timing_cache_enable": True}
        return ort.InferenceSession(_model_bytes(model), sess_options=opts,
                                    providers=[(self.provider, provider_opts), "CPUExecutionProvider"])

    def load(self, model) -> OrtRunner:
        return OrtRunner(self._session(model))

    def fingerprint(self, batch: int = 1, timing: str = "in-graph") -> dict:
        from latprune.profiler.fingerprint import cpu_fingerprint, gpu_fingerprint

        if self.cpu:
            return cpu_fingerprint(threads=self.threads, batch=batch, timing=timing)
        fp = gpu_fingerprint(batch=batch, precision="float16" if self.fp16 else "float32")
        fp["provider"] = self.provider
        fp["timing"] = self.timing_labels[timing]
        return fp

    def measure(self, model, warmup: int = 5, min_runs: int = 20, min_seconds: float = 1.0) -> TimingStats:
        if not self.cpu:
            return super().measure(model, warmup, min_runs, min_seconds)
        from latprune.profiler.onnxrt import measure_model

        return measure_model(_model_bytes(model), self.threads, warmup, min_runs, min_seconds)

    def measure_interleaved(self, models: dict[str, object], bursts: int = 5, min_runs: int = 10,
                            min_seconds: float = 0.2) -> dict[str, TimingStats]:
        if not self.cpu:
            return super().measure_interleaved(models, bursts, min_runs, min_seconds)
        from latprune.profiler.onnxrt import measure_interleaved

        return measure_interleaved({k: _model_bytes(v) for k, v in models.items()}, self.threads, bursts,
                                   min_runs, min_seconds)

    def profiled(self, data: bytes, prefix: str) -> ProfiledModel:
        if not self.cpu:
            return super().profiled(data, prefix)
        self.check()
        return OrtProfiled(data, self.threads, prefix)

    def _compiled_graph(self, data: bytes):
        """ONNX Runtime's optimised CPU graph of the model `data` (static shapes), from a
        session that is created, not run (~0.1 s); None if it wrote none."""
        import tempfile

        from latprune.profiler.onnxrt import make_session, session_options

        with tempfile.TemporaryDirectory(prefix="latprune-opt-") as tmp:
            opts = session_options(self.threads)
            optimized = os.path.join(tmp, "optimized.onnx")
            _save_optimized(opts, optimized)
            make_session(data, self.threads, opts)
            return _optimized_graph(optimized)

    def layout_reorders(self, model) -> tuple[int, float] | None:
        """The layout reorders ONNX Runtime's CPU optimiser puts into `model` (static shapes)
        around its NCHWc kernels: (count, millions of elements moved), read from the compiled
        graph (_compiled_graph). None on GPU providers or when a reorder's size is unknown."""
        if not self.cpu:
            return None
        data = _model_bytes(model)
        sizes = _reorder_sizes(self._compiled_graph(data), _tensor_elements(data))
        return None if sizes is None else (len(sizes), sum(sizes.values()) / 1e6)

    def graph_kernels(self, model, names: dict[str, int]) -> list[tuple[str, float]] | None:
        """(class, millions of elements) of each kernel no layer claims (`names`, as for
        `profiled`) in ONNX Runtime's optimised CPU graph of `model` (static shapes): layout
        reorders and the other operators by layout (_graph_kernels). None on GPU providers."""
        if not self.cpu:
            return None
        data = _model_bytes(model)
        graph = self._compiled_graph(data)
        if graph is None:
            return None
        fused = _fused_outputs(graph)

        def claimed(kernel: str) -> bool:
            return kernel in names or any(t in names for t in fused.get(kernel, ()))

        return [(cls, size / 1e6) for cls, size in _graph_kernels(graph, _original_sizes(data), claimed).values()]

    def time_layer(self, spec, c_in: int, c_out: int) -> TimingStats:
        if not self.cpu:
            return super().time_layer(spec, c_in, c_out)
        from latprune.profiler.layers import measure_layer

        return measure_layer(spec, c_in, c_out, self.threads)
