"""ONNX benchmark models and CIFAR-10 accuracy helpers.

Exports the models the benchmarks run on:

* torchvision ``resnet18``, ``resnet50``, ``mobilenet_v2``, ``vgg11_bn`` with random weights
  (``weights=None``, ``torch.manual_seed(0)``; nothing is downloaded), input ``(1, 3, 224, 224)``;
* the CIFAR-10 ResNet-20/56 of akamaster/pytorch_resnet_cifar10 with its real trained weights
  from ``../shared/data/cifar10-resnet-weights`` (relative to the repository root), input
  ``(1, 3, 32, 32)``.

Every export uses the TorchScript exporter (``dynamo=False``), opset 17, constant folding, a
static batch-1 input named ``"input"`` (float32, NCHW) and an output named ``"logits"``
(float32, ``(1, num_classes)``; for the CIFAR ResNets the exporter leaves the output's dim 0
symbolic, see :func:`export_cifar_resnet`). Each exported file is checked with
``onnx.checker.check_model(full_check=True)`` and run once in onnxruntime against PyTorch.

Only the export functions need torch; they import it lazily so that ``import bench.models``
works without it (``cifar_test_arrays`` and ``onnx_top1`` need only numpy, onnx, onnxruntime).

Script use::

    python bench/models.py OUTDIR

exports all five benchmark models into ``OUTDIR/<name>.onnx``, prints name, file size and dense
onnxruntime latency (1 thread, median of 20 runs) and the top-1 of ``cifar_resnet56`` on the first
2000 CIFAR-10 test images.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: torchvision architectures :func:`export_torchvision` accepts.
TORCHVISION_MODELS: tuple[str, ...] = ("resnet18", "resnet50", "mobilenet_v2", "vgg11_bn", "resnet152")
#: Models the script exports, in order (``cifar_resnet56`` uses the trained weights).
BENCH_MODELS: tuple[str, ...] = TORCHVISION_MODELS[:4] + ("cifar_resnet56",)
#: CIFAR ResNet depths with weights in the data folder, mapped to their file names.
CIFAR_RESNET_WEIGHTS: dict[int, str] = {
    20: "resnet20-12fca82f.th",
    56: "resnet56-4bfd9763.th",
}
#: Per-channel input normalisation (RGB) applied to [0, 1] pixels.
CIFAR_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
CIFAR_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


# --------------------------------------------------------------------------------------------
# Data folder
# --------------------------------------------------------------------------------------------


def data_dir() -> Path:
    """The shared data folder, ``../shared/data`` relative to the repository root.

    Raises:
        FileNotFoundError: if the folder does not exist (the data exists only on machines
            laid out like the development one).
    """
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        raise FileNotFoundError(
            f"shared data folder not found at {path} (expected ../shared/data relative to the "
            "repository root; see shared/data/README.md)"
        )
    return path


# --------------------------------------------------------------------------------------------
# Export helpers
# --------------------------------------------------------------------------------------------


def _export(model: "torch.nn.Module", example: "torch.Tensor", path: str | Path) -> Path:
    """Export ``model`` (already in eval mode) at the static shape of ``example``; verify it.

    Returns the output path. The check compares onnxruntime's output on ``example`` with
    PyTorch's: max abs difference <= 1e-4 of the output's max magnitude (relative, because
    random-init models have logits anywhere from ~1e-9, mobilenet_v2, to ~1e2, resnet50).
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # Deliberate choices, not problems: the legacy exporter is requested (dynamo=False),
        # and it cannot fold Slice with step != 1 (F.pad's pads subgraph, x[:, :, ::2, ::2]).
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message=".*Only steps=1 can be constant folded")
        expected = model(example).numpy()
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            do_constant_folding=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)

    sess = _session(path, threads=1)
    (got,) = sess.run(None, {INPUT_NAME: example.numpy()})
    if got.shape != expected.shape:
        raise RuntimeError(f"{path}: ORT output shape {got.shape} != torch {expected.shape}")
    err = float(np.max(np.abs(got - expected)))
    tol = 1e-4 * float(np.max(np.abs(expected))) + 1e-30
    if not err <= tol:
        raise RuntimeError(f"{path}: ORT output differs from torch by {err:.3g} (tol {tol:.3g})")
    return path


def export_torchvision(name: str, path: str | Path, input_hw: int = 224) -> Path:
    """Export a randomly initialised torchvision classifier to ONNX.

    Args:
        name: one of :data:`TORCHVISION_MODELS` (``torchvision.models.<name>(weights=None)``,
            built after ``torch.manual_seed(0)``; 1000 classes; BatchNorm keeps its initial
            running statistics mean 0 / var 1).
        path: output ``.onnx`` file (parent folders are created).
        input_hw: input height = width in pixels.

    Returns:
        ``Path(path)``. The graph has input ``"input"`` float32 ``(1, 3, input_hw, input_hw)``
        and output ``"logits"`` float32 ``(1, 1000)``.
    """
    if name not in TORCHVISION_MODELS:
        raise ValueError(f"unknown torchvision model {name!r}; expected one of {TORCHVISION_MODELS}")
    import torch
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    example = torch.randn(1, 3, input_hw, input_hw, generator=torch.Generator().manual_seed(0))
    return _export(model, example, path)


# --------------------------------------------------------------------------------------------
# CIFAR-10 ResNet (akamaster/pytorch_resnet_cifar10)
# --------------------------------------------------------------------------------------------


def _cifar_resnet_module(depth: int) -> "torch.nn.Module":
    """The CIFAR ResNet of ``depth`` = 6n + 2 layers (random init), akamaster layout; the
    definition lives in the library (``latprune.models_cifar``) for the torch frontend."""
    from latprune.models_cifar import cifar_resnet

    return cifar_resnet(depth)


def load_cifar_resnet(depth: int) -> "torch.nn.Module":
    """The trained CIFAR-10 ResNet-``depth`` (20 or 56) in eval mode (``latprune.models_cifar``),
    weights from ``<data>/cifar10-resnet-weights/``. The model maps normalised float32
    ``(N, 3, 32, 32)`` images to ``(N, 10)`` logits."""
    from latprune.models_cifar import load_cifar_resnet as load

    return load(depth, data_dir())


def export_cifar_resnet(depth: int, path: str | Path) -> Path:
    """Export the trained CIFAR-10 ResNet-``depth`` (20 or 56) to ONNX.

    Returns ``Path(path)``. Input ``"input"`` float32 ``(1, 3, 32, 32)`` (normalised as in
    :func:`cifar_test_arrays`), output ``"logits"`` float32 ``(1, 10)`` at run time. Besides the
    checks of every export, verifies that each option-A shortcut ``Pad`` pads only the channel
    axis (pads ``[0, planes/4, 0, 0, 0, planes/4, 0, 0]``).

    Graph quirks (TorchScript exporter): the pads of each ``Pad`` are computed by an unfolded
    constant subgraph rather than an initializer (see :func:`_pad_amounts`), so ONNX shape
    inference loses the batch dim after each ``Pad`` and the declared output shape is
    ``("Gemmlogits_dim_0", 10)``. The shortcut subsampling is two ``Slice`` nodes (axes 2 and
    3, step 2).
    """
    import torch

    model = load_cifar_resnet(depth)
    example = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    path = _export(model, example, path)

    onnx_model = onnx.load(str(path))
    pads = [_pad_amounts(onnx_model, node) for node in onnx_model.graph.node if node.op_type == "Pad"]
    if len(pads) != 2:  # one downsampling block in layer2 and one in layer3
        raise RuntimeError(f"{path}: expected 2 Pad nodes, found {len(pads)}")
    for p in pads:
        rank = len(p) // 2
        nonzero_axes = {i % rank for i, v in enumerate(p) if v != 0}
        if rank != 4 or nonzero_axes != {1}:
            raise RuntimeError(f"{path}: shortcut Pad {p.tolist()} does not pad only the channel axis")
    return path


def _pad_amounts(model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray:
    """The int64 ``pads`` of an opset-11+ ``Pad`` node, ``[x1_begin, x2_begin, ..., x1_end, ...]``.

    The TorchScript exporter does not fold ``F.pad``'s pads: they arrive through a small
    constant subgraph (Constant, ConstantOfShape, Concat, Reshape, Slice with step -1,
    Transpose, Reshape, Cast), which is evaluated here with :mod:`onnx.reference`.
    """
    return np.asarray(_constant_value(model, node.input[1]), dtype=np.int64)


def _constant_value(model: onnx.ModelProto, name: str) -> np.ndarray:
    """Evaluate tensor ``name`` of ``model``'s graph if it depends on no graph input."""
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    if name in inits:
        return numpy_helper.to_array(inits[name])
    producers = {out: i for i, node in enumerate(graph.node) for out in node.output}
    graph_inputs = {value.name for value in graph.input}
    needed_nodes: set[int] = set()
    needed_inits: set[str] = set()
    stack = [name]
    while stack:
        tensor = stack.pop()
        if not tensor or tensor in needed_inits:
            continue
        if tensor in inits:
            needed_inits.add(tensor)
        elif tensor in graph_inputs or tensor not in producers:
            raise RuntimeError(f"tensor {name!r} is not constant (depends on {tensor!r})")
        else:
            index = producers[tensor]
            if index not in needed_nodes:
                needed_nodes.add(index)
                stack.extend(graph.node[index].input)
    sub = onnx.helper.make_graph(
        [graph.node[i] for i in sorted(needed_nodes)],  # graph order is topological
        "constant_subgraph",
        inputs=[],
        outputs=[onnx.helper.make_empty_tensor_value_info(name)],
        initializer=[inits[n] for n in sorted(needed_inits)],
    )
    sub_model = onnx.helper.make_model(sub, opset_imports=list(model.opset_import))
    return ReferenceEvaluator(sub_model).run(None, {})[0]


# --------------------------------------------------------------------------------------------
# CIFAR-10 evaluation
# --------------------------------------------------------------------------------------------


def cifar_test_arrays(limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The CIFAR-10 test set from ``<data>/cifar10-test.npz`` (lossy JPEG-decoded copy).

    Args:
        limit: keep ``limit`` images spread evenly over the (class-ordered) file (all 10,000 when None).

    Returns:
        ``(x, y)``: ``x`` float32 ``(N, 3, 32, 32)`` RGB, pixels scaled to [0, 1] then
        normalised per channel with :data:`CIFAR_MEAN` / :data:`CIFAR_STD`; ``y`` int64 ``(N,)``
        class labels 0..9.
    """
    with np.load(data_dir() / "cifar10-test.npz") as data:
        # The file is ordered by class: a limited subset takes every k-th image so that it
        # keeps all classes in their proportions.
        stride = 1 if limit is None else max(1, len(data["y"]) // limit)
        x_u8 = data["x"][::stride][:limit]  # uint8 (N, 32, 32, 3)
        y = data["y"][::stride][:limit].astype(np.int64)
    mean = np.asarray(CIFAR_MEAN, dtype=np.float32)
    std = np.asarray(CIFAR_STD, dtype=np.float32)
    x = (x_u8.astype(np.float32) / 255.0 - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y


def cifar_train_calibration(n: int = 1024, out_dir: str | Path | None = None) -> Path:
    """An .npz of ``n`` CIFAR-10 *training* images (``x`` uint8 (n, 32, 32, 3), ``y`` int64),
    the same number from each class, decoded from ``<data>/cifar10-train-jpg.zip`` with Pillow.
    latprune's ``--calib`` reads it (uint8 images are normalised with the ImageNet mean/std,
    which are the CIFAR ResNets' :data:`CIFAR_MEAN` / :data:`CIFAR_STD`). Cached in ``out_dir``."""
    import io
    import zipfile

    from PIL import Image

    out_dir = Path(out_dir) if out_dir else Path(__file__).resolve().parent / "out" / "models"
    path = out_dir / f"cifar10_train_calib_{n}.npz"
    if path.is_file():
        return path
    with zipfile.ZipFile(data_dir() / "cifar10-train-jpg.zip") as zf:
        names = sorted(n_ for n_ in zf.namelist() if n_.endswith(".jpg"))
        classes = sorted({name.split("/")[-2] for name in names})
        by_class = {c: [name for name in names if name.split("/")[-2] == c] for c in classes}
        order = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        xs, ys = [], []
        per = n // len(order)
        for label, c in enumerate(order):
            files = by_class[c]
            for name in files[:: max(1, len(files) // per)][:per]:
                xs.append(np.asarray(Image.open(io.BytesIO(zf.read(name))).convert("RGB"), dtype=np.uint8))
                ys.append(label)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=np.stack(xs), y=np.asarray(ys, dtype=np.int64))
    return path


def imagenet_samples_calibration(out_dir: str | Path | None = None, size: int = 224) -> Path:
    """An .npz (``x`` uint8 (20, size, size, 3)) of the 20 ImageNet JPEGs in
    ``<data>/foolbox-samples``, resized (shorter side ``size``·256/224) and centre-cropped as
    torchvision's evaluation transform does: real images for ImageNet-shaped models."""
    from PIL import Image

    out_dir = Path(out_dir) if out_dir else Path(__file__).resolve().parent / "out" / "models"
    path = out_dir / f"imagenet_samples_{size}.npz"
    if path.is_file():
        return path
    xs = []
    for f in sorted((data_dir() / "foolbox-samples").glob("imagenet_*.jpg")):
        img = Image.open(f).convert("RGB")
        short = round(size * 256 / 224)
        w, h = img.size
        img = img.resize((round(w * short / min(w, h)), round(h * short / min(w, h))), Image.BILINEAR)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        xs.append(np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8))
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=np.stack(xs))
    return path


def _session(model: str | Path | bytes, threads: int = 1) -> ort.InferenceSession:
    """A CPU onnxruntime session with ``threads`` intra-op threads (sequential execution)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def with_symbolic_batch(model: onnx.ModelProto, dim_param: str = "N") -> onnx.ModelProto:
    """A copy of ``model`` whose graph inputs' and outputs' dim 0 is the symbol ``dim_param``.

    ``value_info`` is cleared so that stale batch-1 intermediate shapes do not conflict. Works for
    graphs whose batch dimension flows through shape-agnostic ops (Conv, Pool, Flatten, Gemm,
    Pad/Slice on other axes); a Reshape with a hard-coded batch of 1 would still fail at run time.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for value in list(copy.graph.input) + list(copy.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_value")
        dim.dim_param = dim_param
    del copy.graph.value_info[:]
    return copy


def onnx_top1(
    model_path: str | Path,
    x: np.ndarray,
    y: np.ndarray,
    batch: int = 200,
    threads: int = 2,
) -> float:
    """Top-1 accuracy in percent (0..100) of an ONNX classifier under onnxruntime (CPU).

    Args:
        model_path: ONNX model with one input and first output of logits ``(N, classes)``;
            a static batch-1 graph is fine (dim 0 is made symbolic in an in-memory copy).
        x: float32 inputs ``(N, ...)`` as the model expects (e.g. ``(N, 3, 32, 32)``).
        y: int labels ``(N,)``.
        batch: images per onnxruntime call.
        threads: onnxruntime intra-op threads.
    """
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
    if len(x) == 0:
        raise ValueError("empty evaluation set")
    model = with_symbolic_batch(onnx.load(str(model_path)))
    sess = _session(model.SerializeToString(), threads=threads)
    input_name = sess.get_inputs()[0].name
    correct = 0
    for start in range(0, len(x), batch):
        xb = np.ascontiguousarray(x[start : start + batch], dtype=np.float32)
        logits = sess.run(None, {input_name: xb})[0]
        correct += int(np.sum(np.argmax(logits, axis=1) == y[start : start + batch]))
    return 100.0 * correct / len(x)


# --------------------------------------------------------------------------------------------
# Script
# --------------------------------------------------------------------------------------------


def ort_latency_ms(model_path: str | Path, runs: int = 20, warmup: int = 3, threads: int = 1) -> float:
    """Median wall-clock latency in milliseconds of one onnxruntime CPU inference.

    Uses a random float32 input of the model's static input shape, ``threads`` intra-op threads,
    ``warmup`` untimed runs and the median of ``runs`` timed runs.
    """
    sess = _session(model_path, threads=threads)
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    feed = {inp.name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def export_model(name: str, path: str | Path) -> Path:
    """Export benchmark model ``name`` (one of :data:`BENCH_MODELS`) to ``path``."""
    if name in TORCHVISION_MODELS:
        return export_torchvision(name, path)
    if name.startswith("cifar_resnet"):
        return export_cifar_resnet(int(name.removeprefix("cifar_resnet")), path)
    raise ValueError(f"unknown model {name!r}; expected one of {BENCH_MODELS}")


def exported(name: str, out_dir: str | Path | None = None) -> Path:
    """Path of ``<out_dir>/<name>.onnx`` (default bench/out/models), exported on first use."""
    folder = Path(out_dir) if out_dir is not None else Path(__file__).resolve().parent / "out" / "models"
    path = folder / f"{name}.onnx"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        export_model(name, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path, help="folder for <name>.onnx files")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per model (median)")
    parser.add_argument("--top1-limit", type=int, default=2000, help="CIFAR test images for top-1")
    args = parser.parse_args(argv)

    args.outdir.mkdir(parents=True, exist_ok=True)
    print(f"{'model':<16} {'size (MB)':>10} {'ORT 1-thread median (ms)':>26}")
    paths = {}
    for name in BENCH_MODELS:
        path = export_model(name, args.outdir / f"{name}.onnx")
        paths[name] = path
        size_mb = path.stat().st_size / 1e6
        lat = ort_latency_ms(path, runs=args.runs, threads=1)
        print(f"{name:<16} {size_mb:>10.2f} {lat:>26.2f}", flush=True)

    x, y = cifar_test_arrays(limit=args.top1_limit)
    acc = onnx_top1(paths["cifar_resnet56"], x, y)
    print(f"cifar_resnet56 top-1 on the first {len(y)} CIFAR-10 test images: {acc:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
