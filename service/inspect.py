"""Safe inspection of user uploads: ONNX models and calibration `.npz` files.

The API calls these right after an upload has been streamed to disk, before a job is queued.

`inspect_model` never parses the model in the server process: it runs
`python -m latprune.service.inspect model PATH` in a child process under an address-space limit
(RLIMIT_AS) and a CPU-time limit (RLIMIT_CPU), so a hostile protobuf that crashes or exhausts the
parser cannot hurt the server, and the server's memory does not grow by the model's size. The
child prints one JSON object on stdout, `{"ok": true, "summary": {...}}` or
`{"ok": false, "error": "one line"}`; the parent turns a rejection, a crash, a memory failure or a
timeout into `InputError` with one clear sentence (never a traceback).

`inspect_calibration` checks the archive's declared sizes and every member's `.npy` header
(shape, dtype, no pickled objects) before loading anything; the API runs it in the same kind of
child (`inspect_calibration_isolated`), since loading a small compressed archive can allocate
its whole declared size.

This module keeps its heavy imports (onnx, numpy, the analysis) inside functions: the child sets
nothing up before they run, and importing it in the server costs nothing.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

from latprune.types import InputError

MAX_MODEL_BYTES = 2 * 1024**3 - 1  # protobuf's hard limit (same as pruner.model_io)
MAX_NOTES = 20
MAX_MESSAGE_CHARS = 400
DEFAULT_CALIBRATION_BYTES = 2 * 1024**3
MAX_NPZ_MEMBERS = 1024
CALIBRATION_DTYPES = ("float32", "float64", "uint8")

# Substrings in the child's stderr that mean it ran out of (address space) memory.
_MEMORY_MARKERS = ("MemoryError", "bad_alloc", "Cannot allocate memory", "out of memory",
                   "Out of memory", "memory allocation", "Memory allocation", "RLIMIT_AS",
                   "failed to map segment")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _one_line(text: object, limit: int = MAX_MESSAGE_CHARS) -> str:
    """First non-empty line of `text`, stripped and truncated."""
    s = str(text).strip()
    line = next((ln.strip() for ln in s.splitlines() if ln.strip()), "")
    if len(line) > limit:
        line = line[: limit - 3] + "..."
    return line


def _quote(text: str, limit: int = 100) -> str:
    """`text` as a quoted, escaped (ASCII-only, no control characters), truncated string."""
    cut = text[:limit]
    return ascii(cut) + ("..." if len(text) > limit else "")


def _is_memory_error(exc: BaseException | None) -> bool:
    """True if `exc` or an exception it was raised from is a memory failure (a MemoryError,
    or a shared library that could not be mapped under the address-space limit)."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, MemoryError) or any(m in str(exc) for m in _MEMORY_MARKERS):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _exc_line(exc: BaseException) -> str:
    msg = _one_line(exc)
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# model: parent side
# ---------------------------------------------------------------------------------------------

def default_memory_mb(size_bytes: int) -> int:
    """The child's address-space limit by default: 4 × the file size + 2048 MB."""
    return int(math.ceil(4 * size_bytes / 2**20)) + 2048


def inspect_model(path: Path, timeout_s: float = 120, memory_mb: int | None = None) -> dict:
    """Inspect the ONNX model at `path` in a child process; return its summary.

    Raises InputError when the file is not a usable self-contained ONNX model, and when the
    child dies: out of memory (`memory_mb`, default 4 × file size + 2048 MB), over `timeout_s`
    (wall clock, also the CPU-time limit) or killed by a signal.

    Summary keys: ir_version, opset {domain: version} ("ai.onnx" for the default domain),
    producer, inputs/outputs [{name, shape (ints, or strings for symbolic/unknown dims; None if
    no shape), dtype}], nodes, ops {op: count} (sorted; "domain.Op" outside the default domain),
    parameters, layers, conv_layers, groups, prunable_groups, removable_blocks, notes (<= 20
    strings), prunable (any prunable channel group).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("the uploaded model file does not exist")
    size = path.stat().st_size
    if size == 0:
        raise InputError("the file is empty, not an ONNX model")
    if size > MAX_MODEL_BYTES:
        raise InputError(f"the model is {size} bytes, over the 2 GiB protobuf limit; "
                         "larger models need external data, which is refused")
    if memory_mb is None:
        memory_mb = default_memory_mb(size)
    return _run_isolated(["model", str(path)], int(memory_mb), timeout_s, "the model")


def inspect_calibration_isolated(path: Path, max_bytes: int = DEFAULT_CALIBRATION_BYTES,
                                 timeout_s: float = 120) -> dict:
    """`inspect_calibration` in a child process under the same limits as models (memory:
    2 × max_bytes + 1024 MB), so that a small compressed archive declaring a large array makes
    only the child allocate it."""
    memory_mb = int(math.ceil(2 * max_bytes / 2**20)) + 1024
    return _run_isolated(["calibration", str(path), str(int(max_bytes))], memory_mb, timeout_s,
                         "the calibration file")


def _run_isolated(args: list[str], memory_mb: int, timeout_s: float, what: str) -> dict:
    """Run `python -m latprune.service.inspect ARGS` with an address-space limit of memory_mb and
    a CPU-time limit of timeout_s, which the child sets on itself before any heavy import (no
    preexec_fn: the server is threaded)."""
    cpu_s = max(1, int(math.ceil(timeout_s)))
    env = dict(os.environ)
    # One thread per math library: thread pools reserve address space under RLIMIT_AS.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["LATPRUNE_INSPECT_LIMITS"] = f"{memory_mb * 2**20},{cpu_s}"
    # -P: do not put the working directory on sys.path (it may hold uploads).
    flags = ["-P"] if sys.version_info >= (3, 11) else []
    cmd = [sys.executable, *flags, "-m", "latprune.service.inspect", *args]
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout_s, env=env, close_fds=True)
    except subprocess.TimeoutExpired:
        raise InputError(f"inspection took longer than {timeout_s:g} s") from None
    return _interpret(proc.returncode, proc.stdout, proc.stderr, memory_mb, timeout_s, what)


def _set_own_limits() -> None:
    """In the child, first thing: the limits the parent asked for (LATPRUNE_INSPECT_LIMITS)."""
    import resource

    spec = os.environ.get("LATPRUNE_INSPECT_LIMITS")
    if not spec:
        return
    mem_bytes, cpu_s = (int(v) for v in spec.split(","))
    resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _interpret(rc: int, stdout: bytes, stderr: bytes, memory_mb: int, timeout_s: float,
               what: str = "the model") -> dict:
    """The child's answer, or InputError for a rejection or a dead child."""
    memory_msg = f"{what} could not be parsed within the memory limit of {memory_mb} MB"
    answer = None
    for line in reversed(stdout.decode("utf-8", "replace").splitlines()):
        if line.strip():
            try:
                answer = json.loads(line)
            except ValueError:
                answer = None
            break
    if isinstance(answer, dict) and "ok" in answer:
        if answer["ok"] and isinstance(answer.get("summary"), dict):
            return answer["summary"]
        if not answer["ok"]:
            if answer.get("reason") == "memory":
                raise InputError(memory_msg)
            error = _one_line(answer.get("error") or "the model was rejected")
            raise InputError(error)
    err = stderr.decode("utf-8", "replace")
    if rc == -signal.SIGXCPU or (rc == -signal.SIGKILL and "SIGXCPU" in err):
        raise InputError(f"inspection took longer than {timeout_s:g} s")
    if any(m in err for m in _MEMORY_MARKERS):
        raise InputError(memory_msg)
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        if rc == -signal.SIGKILL:  # the kernel's OOM killer, or the hard CPU limit
            raise InputError(f"{memory_msg} (the inspector was killed)")
        raise InputError(f"{what} crashed its parser ({name}); it is not usable")
    raise InputError(f"{what} could not be inspected (the inspector exited with status {rc})")


# ---------------------------------------------------------------------------------------------
# model: child side
# ---------------------------------------------------------------------------------------------

def _external_location(tensor) -> str:
    for entry in tensor.external_data:
        if entry.key == "location":
            return entry.value
    return "?"


def _find_external(model) -> str | None:
    """Location of the first tensor that uses external data (graph, subgraphs, functions)."""
    from onnx import AttributeProto, TensorProto

    def tensor_ext(t) -> str | None:
        if t.data_location == TensorProto.EXTERNAL or len(t.external_data) > 0:
            return _external_location(t)
        return None

    def sparse_ext(s) -> str | None:
        return tensor_ext(s.values) or tensor_ext(s.indices)

    def nodes_ext(nodes) -> str | None:
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t") or attr.type == AttributeProto.TENSOR:
                    if (loc := tensor_ext(attr.t)) is not None:
                        return loc
                for t in attr.tensors:
                    if (loc := tensor_ext(t)) is not None:
                        return loc
                if attr.HasField("sparse_tensor") and (loc := sparse_ext(attr.sparse_tensor)):
                    return loc
                for s in attr.sparse_tensors:
                    if (loc := sparse_ext(s)) is not None:
                        return loc
                if attr.HasField("g") and (loc := graph_ext(attr.g)) is not None:
                    return loc
                for g in attr.graphs:
                    if (loc := graph_ext(g)) is not None:
                        return loc
        return None

    def graph_ext(graph) -> str | None:
        for t in graph.initializer:
            if (loc := tensor_ext(t)) is not None:
                return loc
        for s in graph.sparse_initializer:
            if (loc := sparse_ext(s)) is not None:
                return loc
        return nodes_ext(graph.node)

    if model.HasField("graph") and (loc := graph_ext(model.graph)) is not None:
        return loc
    for fn in model.functions:
        if (loc := nodes_ext(fn.node)) is not None:
            return loc
    return None


def _check_initializer_sizes(graph) -> None:
    """Every top-level initializer holds as many values as its dims declare (so nothing later
    allocates a huge array for a tensor that has no data)."""
    from onnx import TensorProto, helper

    fields = {
        TensorProto.FLOAT: "float_data", TensorProto.DOUBLE: "double_data",
        TensorProto.INT64: "int64_data", TensorProto.UINT64: "uint64_data",
        TensorProto.STRING: "string_data", TensorProto.COMPLEX64: "float_data",
        TensorProto.COMPLEX128: "double_data",
    }
    for t in graph.initializer:
        declared = 1
        for d in t.dims:
            if d < 0:
                raise InputError(f"initializer {_quote(t.name)} has a negative dimension {d}")
            declared *= int(d)
        if t.data_type in (TensorProto.UNDEFINED, TensorProto.STRING):
            continue
        try:
            itemsize = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except Exception:
            continue  # exotic types (float8, int4): left to the checker
        if t.HasField("raw_data"):
            held = len(t.raw_data) // max(itemsize, 1)
        else:
            name = fields.get(t.data_type, "int32_data")
            held = len(getattr(t, name))
            if t.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128):
                held //= 2
        if held != declared:
            dims = list(t.dims)
            if len(dims) > 8:
                dims = dims[:8] + ["..."]
            raise InputError(f"initializer {_quote(t.name)} declares shape {dims} "
                             f"({declared} values) but holds {held}")


def _value_infos(values) -> list[dict]:
    from onnx import helper

    out = []
    for vi in values:
        tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        if tt is None:
            out.append({"name": vi.name, "shape": None, "dtype": "non-tensor"})
            continue
        if tt.HasField("shape"):
            shape = [d.dim_value if d.HasField("dim_value")
                     else (d.dim_param if d.HasField("dim_param") else "?") for d in tt.shape.dim]
        else:
            shape = None
        try:
            dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type).name
        except Exception:
            dtype = helper.tensor_dtype_to_string(tt.elem_type).replace("TensorProto.", "").lower() \
                if tt.elem_type else "undefined"
        out.append({"name": vi.name, "shape": shape, "dtype": dtype})
    return out


def _summarise(path: Path, step: int = 8) -> dict:
    """What the child does: load, refuse, check, analyse (raises InputError on a rejection)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        if _is_memory_error(exc):
            raise MemoryError from None
        raise InputError(f"not an ONNX model (protobuf parse failed: {_exc_line(exc)})") from None
    loc = _find_external(model)
    if loc is not None:
        raise InputError(f"the model references external data files ({_quote(loc)}); "
                         "upload a single self-contained .onnx")
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise InputError("not an ONNX model (no graph or an empty graph)")
    inits = {i.name for i in model.graph.initializer}
    if not [i for i in model.graph.input if i.name not in inits]:
        raise InputError("the model has no inputs")
    if len(model.graph.output) == 0:
        raise InputError("the model has no outputs")
    _check_initializer_sizes(model.graph)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        if _is_memory_error(exc):
            raise MemoryError from None
        raise InputError(f"invalid ONNX model: {_one_line(exc) or type(exc).__name__}") from None

    graph = model.graph
    ops: dict[str, int] = {}
    for node in graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        ops[key] = ops.get(key, 0) + 1
    parameters = 0
    for t in graph.initializer:
        n = 1
        for d in t.dims:
            n *= int(d)
        parameters += n
    producer = " ".join(s for s in (model.producer_name, model.producer_version) if s)
    summary = {
        "ir_version": int(model.ir_version),
        "opset": {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import},
        "producer": _one_line(producer, 200),
        # old exporters list the initializers among the inputs too
        "inputs": _value_infos([i for i in graph.input if i.name not in inits]),
        "outputs": _value_infos(graph.output),
        "nodes": len(graph.node),
        "ops": dict(sorted(ops.items())),
        "parameters": parameters,
        "layers": 0,
        "conv_layers": 0,
        "groups": 0,
        "prunable_groups": 0,
        "removable_blocks": 0,
        "notes": [],
        "prunable": False,
    }

    from latprune.pruner.analysis import analyse

    name = graph.name or path.stem
    notes: list[str]
    try:
        analysis = analyse(model, step=step, model_name=name)
    except (InputError, MemoryError):
        raise
    except Exception as exc:  # analysis never rejects a valid model: report and go on
        if _is_memory_error(exc):
            raise MemoryError from None
        notes = [f"analysis failed: {_exc_line(exc)}"]
    else:
        problem = analysis.problem
        prunable_groups = sum(1 for g in problem.groups if g.prunable)
        summary.update(
            layers=len(problem.layers),
            conv_layers=sum(1 for layer in problem.layers
                            if layer.spec.op in ("Conv", "ConvTranspose")),
            groups=len(problem.groups),
            prunable_groups=prunable_groups,
            removable_blocks=len(problem.blocks),
            prunable=prunable_groups > 0,
        )
        notes = list(analysis.notes)
        if not prunable_groups:
            notes.insert(0, "no channel group can be pruned")
    if len(notes) > MAX_NOTES:
        extra = len(notes) - (MAX_NOTES - 1)
        notes = notes[: MAX_NOTES - 1] + [f"... and {extra} more notes"]
    summary["notes"] = [_one_line(n, 300) for n in notes]
    return summary


def _child_main(argv: list[str]) -> int:
    """`python -m latprune.service.inspect model PATH` or `... calibration PATH MAX_BYTES`:
    print one JSON answer on stdout."""
    _set_own_limits()
    # Anything a library prints goes to stderr; the answer alone goes to the real stdout.
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    if not ((len(argv) == 2 and argv[0] == "model") or (len(argv) == 3 and argv[0] == "calibration")):
        answer = {"ok": False, "error": "usage: python -m latprune.service.inspect "
                                        "(model PATH | calibration PATH MAX_BYTES)"}
        rc = 2
    else:
        rc = 0
        try:
            if argv[0] == "model":
                summary = _summarise(Path(argv[1]))
            else:
                summary = inspect_calibration(Path(argv[1]), int(argv[2]))
            answer = {"ok": True, "summary": summary}
        except InputError as exc:
            answer = {"ok": False, "error": _one_line(exc) or "the model was rejected"}
        except RecursionError:
            answer = {"ok": False, "error": "the model is nested too deeply to inspect"}
        except Exception as exc:  # never a traceback: one line for the parent
            if _is_memory_error(exc):
                answer = {"ok": False, "error": "out of memory", "reason": "memory"}
            else:
                answer = {"ok": False,
                          "error": f"the model could not be inspected ({_exc_line(exc)})"}
    try:
        out.write(json.dumps(answer) + "\n")
        out.flush()
    except MemoryError:
        out.write('{"ok": false, "error": "out of memory", "reason": "memory"}\n')
        out.flush()
    return rc


# ---------------------------------------------------------------------------------------------
# calibration
# ---------------------------------------------------------------------------------------------

def inspect_calibration(path: Path, max_bytes: int = DEFAULT_CALIBRATION_BYTES) -> dict:
    """Check the calibration `.npz` at `path` (see `latprune.calibration.load_calibration`);
    return {arrays: {name: {shape, dtype}}, samples: N, layout: "NCHW float" | "NHWC uint8"}.

    The archive's declared uncompressed sizes and every member's `.npy` header are checked
    against `max_bytes` before anything is loaded; pickled (object) arrays are refused."""
    import zipfile

    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise InputError("calibration file not found")
    if path.stat().st_size == 0:
        raise InputError("the calibration file is empty; expected a .npz archive")
    if not zipfile.is_zipfile(path):
        raise InputError("the calibration file is not a .npz archive (save it with numpy.savez)")
    arrays: dict[str, dict] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_NPZ_MEMBERS:
                raise InputError(f"the .npz archive has {len(infos)} members; at most "
                                 f"{MAX_NPZ_MEMBERS} are accepted")
            total = 0
            for info in infos:
                total += info.file_size
                if info.file_size > max_bytes or total > max_bytes:
                    raise InputError(
                        f"the .npz archive declares {total} bytes uncompressed "
                        f"(member {_quote(info.filename)}: {info.file_size} bytes), over the "
                        f"limit of {max_bytes} bytes")
            for info in infos:
                if info.is_dir():
                    continue
                name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                with zf.open(info) as fh:
                    try:
                        version = np.lib.format.read_magic(fh)
                        if version == (1, 0):
                            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
                        else:
                            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
                    except Exception:
                        raise InputError(f"the .npz member {_quote(info.filename)} is not a "
                                         "numpy array (.npy)") from None
                if dtype.hasobject:
                    raise InputError(
                        f"array {_quote(name)} holds Python objects (it would need pickle); only "
                        f"numeric arrays are accepted ({', '.join(CALIBRATION_DTYPES)})")
                nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if nbytes > info.file_size:
                    raise InputError(f"array {_quote(name)} declares shape {tuple(shape)} "
                                     f"({nbytes} bytes) but its member holds {info.file_size}")
                arrays[name] = {"shape": [int(d) for d in shape], "dtype": str(dtype)}
    except InputError:
        raise
    except Exception as exc:  # zip/format errors
        raise InputError(f"not a readable .npz file ({_exc_line(exc)})") from None
    if not arrays:
        raise InputError("the .npz archive holds no arrays")
    keys = list(arrays)
    key = next((k for k in ("x", "input") if k in keys), keys[0] if len(keys) == 1 else None)
    if key is None:
        raise InputError(f"no array named 'x' among {keys[:20]}")
    shape, dtype = tuple(arrays[key]["shape"]), arrays[key]["dtype"]
    if dtype not in CALIBRATION_DTYPES:
        raise InputError(f"calibration array has dtype {dtype}; expected float32 (N, C, H, W) "
                         "or uint8 images (N, H, W, C)")
    if len(shape) != 4:
        raise InputError(f"array '{key}' has shape {shape}; expected 4 dimensions: "
                         "(N, C, H, W) float32 or (N, H, W, C) uint8")
    if shape[0] < 1:
        raise InputError(f"array '{key}' has shape {shape}; it holds no samples")
    if any(d < 1 for d in shape[1:]):
        raise InputError(f"array '{key}' has shape {shape}; every dimension must be at least 1")
    try:
        with np.load(path, allow_pickle=False) as data:
            arr = data[key]
    except Exception as exc:
        raise InputError(f"not a readable .npz file ({_exc_line(exc)})") from None
    if tuple(arr.shape) != shape or str(arr.dtype) != dtype:
        raise InputError(f"array '{key}' does not match its header")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError("calibration inputs contain NaN or infinity")
    del arr
    return {
        "arrays": arrays,
        "samples": int(shape[0]),
        "layout": "NHWC uint8" if dtype == "uint8" else "NCHW float",
    }


__all__ = ["inspect_model", "inspect_calibration", "inspect_calibration_isolated", "default_memory_mb"]


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
