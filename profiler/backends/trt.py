"""Native TensorRT: build an engine from ONNX (precision flags, builder optimisation level, a
timing cache), bind pycuda device buffers, time each run with CUDA events.

Only imported when the "trt" backend is asked for; tensorrt and pycuda are never needed on
the CPU path. Written against the TensorRT 10 API (named I/O tensors, execute_async_v3).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from latprune.profiler.backends.base import Backend, BackendUnavailable, PairedProfiled, ProfiledModel, Runner


def cuda_device_count() -> int:
    """Number of CUDA devices visible through the driver (0 without a driver)."""
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        if lib.cuInit(0) != 0:
            return 0
        count = ctypes.c_int(0)
        return count.value if lib.cuDeviceGetCount(ctypes.byref(count)) == 0 else 0
    return 0


def _import_trt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailable("TensorRT is not installed (pip install tensorrt on a CUDA machine)") from None
    try:
        import pycuda.driver as cuda
    except ImportError:
        raise BackendUnavailable("pycuda is not installed (pip install pycuda)") from None
    return trt, cuda


class TensorRTRunner(Runner):
    def __init__(self, engine, context, cuda, stream) -> None:
        self.engine, self.context, self.cuda, self.stream = engine, context, cuda, stream
        self.names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.device: dict[str, object] = {}
        self.host_out: dict[str, np.ndarray] = {}
        trt = __import__("tensorrt")
        for name in self.names:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = trt.nptype(engine.get_tensor_dtype(name))
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            self.device[name] = cuda.mem_alloc(max(nbytes, 1))
            self.context.set_tensor_address(name, int(self.device[name]))
            if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                self.host_out[name] = cuda.pagelocked_empty(shape, dtype)
        self.start, self.end = cuda.Event(), cuda.Event()

    def inputs(self, n: int = 1, seed: int = 0) -> list:
        trt = __import__("tensorrt")
        rng = np.random.default_rng(seed)
        sets = []
        for _ in range(n):
            one = {}
            for name in self.names:
                if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                    shape = tuple(self.context.get_tensor_shape(name))
                    dtype = trt.nptype(self.engine.get_tensor_dtype(name))
                    one[name] = self.cuda.register_host_memory(
                        np.ascontiguousarray(rng.standard_normal(shape).astype(dtype)))
            sets.append(one)
        return sets

    def run_ms(self, inputs) -> float:
        """Host-to-device copy, execution and device-to-host copy, timed with CUDA events."""
        for name, host in inputs.items():
            self.cuda.memcpy_htod_async(self.device[name], host, self.stream)
        self.start.record(self.stream)
        self.context.execute_async_v3(self.stream.handle)
        self.end.record(self.stream)
        for name, host in self.host_out.items():
            self.cuda.memcpy_dtoh_async(host, self.device[name], self.stream)
        self.stream.synchronize()
        return float(self.end.time_since(self.start))

    def close(self) -> None:
        for buf in self.device.values():
            buf.free()


class TensorRTBackend(Backend):
    """Native TensorRT. precision: 'fp32' (default), 'fp16' or 'int8' (builder flags; INT8
    without calibration data uses TensorRT's default dynamic ranges, for latency only). The
    artifact is the serialized engine; measurements load that engine."""

    name = "trt"
    timing_labels = {"in-graph": "trt-layer-profile/1", "isolated": "trt-isolated/1"}
    artifact_suffix = ".engine"

    def __init__(self, threads: int = 1, precision: str | None = None, fp16: bool = False, opt_level: int = 3,
                 timing_cache: str | Path | None = None, workspace_mib: int = 1024) -> None:
        super().__init__(threads, precision or ("fp16" if fp16 else "fp32"))
        if self.precision not in ("fp32", "fp16", "int8"):
            raise BackendUnavailable(f"trt: precision {self.precision!r}: choose fp32, fp16 or int8")
        self.fp16 = self.precision == "fp16"
        self.opt_level, self.workspace_mib = opt_level, workspace_mib
        self.timing_cache = Path(timing_cache) if timing_cache else None
        self._ctx = None

    def check(self) -> None:
        _import_trt()
        if cuda_device_count() == 0:
            raise BackendUnavailable("trt: no CUDA device visible")

    def build_engine(self, model) -> bytes:
        """Serialized engine for `model` (ONNX bytes or ModelProto)."""
        trt, _ = _import_trt()
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        data = model if isinstance(model, bytes) else model.SerializeToString()
        if not parser.parse(data):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendUnavailable(f"TensorRT cannot parse the model: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_mib << 20)
        config.builder_optimization_level = self.opt_level
        # layer names (ONNX node names, fused ones joined by ' + ') for TensorRTProfiled
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        if self.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif self.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
        cache_bytes = self.timing_cache.read_bytes() if self.timing_cache and self.timing_cache.exists() else b""
        cache = config.create_timing_cache(cache_bytes)
        config.set_timing_cache(cache, ignore_mismatch=False)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise BackendUnavailable("TensorRT failed to build an engine")
        if self.timing_cache:
            self.timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
        return bytes(engine)

    def build(self, onnx_path: Path, out_dir: Path) -> Path:
        """The serialized engine of the ONNX file: `<stem>.engine` in out_dir."""
        out = Path(out_dir) / (Path(onnx_path).stem + self.artifact_suffix)
        out.write_bytes(self.build_engine(Path(onnx_path).read_bytes()))
        return out

    def load(self, model) -> TensorRTRunner:
        """A runner for an engine file (`.engine`: the artifact, as built) or an ONNX model
        (built now)."""
        self.check()
        trt, cuda = _import_trt()
        if self._ctx is None:
            cuda.init()
            self._ctx = cuda.Device(0).retain_primary_context()
        if isinstance(model, (str, Path)) and str(model).endswith(self.artifact_suffix):
            serialized = Path(model).read_bytes()
        else:
            serialized = self.build_engine(Path(model).read_bytes() if isinstance(model, (str, Path)) else model)
        self._ctx.push()
        try:
            engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(serialized)
            return TensorRTRunner(engine, engine.create_execution_context(), cuda, cuda.Stream())
        finally:
            self._ctx.pop()

    def fingerprint(self, batch: int = 1, timing: str = "in-graph") -> dict:
        from latprune.profiler.fingerprint import gpu_fingerprint

        trt, _ = _import_trt()
        fp = gpu_fingerprint(batch=batch, precision={"fp16": "float16", "int8": "int8"}.get(self.precision, "float32"))
        fp.update({"runtime": f"tensorrt {trt.__version__}", "provider": "tensorrt",
                   "builder_optimization_level": self.opt_level, "timing": self.timing_labels[timing]})
        return fp

    def profiled(self, data: bytes, prefix: str) -> ProfiledModel:
        self.check()
        return TensorRTProfiled(self, data)


class TensorRTProfiled(PairedProfiled):
    """Per-layer times from TensorRT's IProfiler on an engine built with detailed profiling
    verbosity; each engine layer is mapped back to ONNX nodes through the names in the engine
    inspector's layer information (fused layers are named after the ONNX nodes they contain,
    joined by ' + '). Unverified here: no GPU has been lent to any session (scripts/gpu_check.sh)."""

    def __init__(self, backend: "TensorRTBackend", data: bytes) -> None:
        import json as _json

        trt, cuda = _import_trt()
        backend.check()
        self.profile_backend = backend
        self.runner = backend.load(data)
        self.plain = backend.load(data)
        engine = self.runner.engine
        inspector = engine.create_engine_inspector()
        info = _json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
        self.layers = [layer if isinstance(layer, str) else layer.get("Name", "") for layer in info.get("Layers", [])]
        outer = self

        class _Profiler(trt.IProfiler):
            def report_layer_time(self, layer_name, ms):
                outer._last[layer_name] = outer._last.get(layer_name, 0.0) + ms

        self._profiler = _Profiler()
        self.runner.context.profiler = self._profiler
        self._last: dict[str, float] = {}
        self.feed = self.runner.inputs(1)[0]
        self.plain_feed = self.plain.inputs(1)[0]
        self._start()

    def _kernel_times(self) -> dict[str, float]:
        self._last = {}
        self.runner.run_ms(self.feed)
        return dict(self._last)

    def _layer_of(self, layer: str, names: dict[str, int]) -> int | None:
        for part in [layer] + [p.strip() for p in layer.replace("||", "+").split("+")]:
            if part in names:
                return names[part]
        return None
