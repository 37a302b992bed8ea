"""Modern CNNs and detectors for the benchmarks (issue 12), exported as a user would.

Each model is built with random weights (nothing is downloaded) after ``torch.manual_seed(0)``
and exported with ``torch.onnx.export(..., opset_version=17, dynamo=False)``, batch 1, input
``"input"``; the export is checked against torch with ONNX Runtime.

==================  =========================================================  ==========
name                what                                                       input
==================  =========================================================  ==========
yolov8s             ultralytics ``YOLO("yolov8s.yaml")``, the decoded output     640
                    (1, 84, 8400) as ultralytics' own export gives it
ssdlite320          torchvision ``ssdlite320_mobilenet_v3_large`` whole:         320
                    transform, backbone, head, anchors, box decoding and NMS
                    (``score_thresh=0.3``: with random weights no score passes
                    it, so the NMS costs what it does in deployment, not the
                    worst case of 3234 anchors x 90 classes at 0.001)
ssdlite320_net      the same network without pre/post-processing: normalised     320
                    image in, (1, 3234, 4) box regressions and (1, 3234, 91)
                    class logits out (how SSD runs with an NMS plugin)
(yolov8s and ssdlite320_net: BatchNorm statistics re-estimated on 8 real images,
recalibrate_batchnorm, so that their outputs depend on the image; weights stay random)
convnext_tiny       timm ``convnext_tiny``                                        224
regnety_016         timm ``regnety_016`` (RegNetY-1.6GF: grouped convs + SE)      224
resnext50_32x4d     torchvision ``resnext50_32x4d``                              224
deit_small          timm ``deit_small_patch16_224`` (6 heads, 12 blocks)          224
vit_base            timm ``vit_base_patch16_224`` (12 heads, 12 blocks)           224
mobilevit_s         timm ``mobilevit_s`` (hybrid conv-attention)                  256
bert_base           HF transformers ``BertModel(BertConfig())`` (12 layers, 768,  128 tokens
                    12 heads), inputs input_ids and attention_mask (1, 128)
                    int64, output the last hidden state
==================  =========================================================  ==========

Needs the bench extras in the venv: ``pip install torch==2.14.1 torchvision==0.29.1 timm
ultralytics``. Script use: ``python bench/zoo.py OUTDIR [NAME ...]``.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import warnings
from pathlib import Path

import numpy as np

ZOO = ("yolov8s", "ssdlite320", "ssdlite320_net", "convnext_tiny", "regnety_016", "resnext50_32x4d",
       "deit_small", "vit_base", "mobilevit_s", "bert_base")
INPUT_SIZE = {"yolov8s": 640, "ssdlite320": 320, "ssdlite320_net": 320, "mobilevit_s": 256}
TIMM_NAMES = {"convnext_tiny": "convnext_tiny", "regnety_016": "regnety_016", "deit_small": "deit_small_patch16_224",
              "vit_base": "vit_base_patch16_224", "mobilevit_s": "mobilevit_s"}
BERT_TOKENS = 128
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def input_size(name: str) -> int:
    return INPUT_SIZE.get(name, 224)


def recalibrate_batchnorm(module, x: np.ndarray) -> None:
    """Re-estimate every BatchNorm's running statistics on the images `x` (train-mode
    forward passes, cumulative average), then back to eval mode. With random weights and
    the default statistics (mean 0, variance 1) a deep detector's activations shrink to
    nothing and its outputs barely depend on the image; after this they are normalised as in
    a trained network, so output distortion means something (the weights stay random)."""
    import torch

    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    module.train()
    with torch.no_grad():
        for i in range(0, len(x), 4):  # batches: a BatchNorm on a 1x1 map needs more than one value
            module(torch.from_numpy(x[i:i + 4]))
    module.eval()


# Models whose BatchNorm statistics are recalibrated on real images before export
# (recalibrate_batchnorm), with the images as the model takes them.
RECALIBRATED = {"yolov8s": 8, "ssdlite320_net": 8}


def _module(name: str):
    import torch

    torch.manual_seed(0)
    if name == "yolov8s":
        os.environ.setdefault("YOLO_OFFLINE", "1")
        from ultralytics import YOLO

        net = YOLO("yolov8s.yaml", verbose=False).model.eval()

        class Decoded(torch.nn.Module):  # ultralytics' ONNX export returns the decoded output only
            def __init__(self):
                super().__init__()
                self.net = net

            def forward(self, x):
                out = self.net(x)
                return out if self.training else out[0]

        return Decoded().eval()
    if name.startswith("ssdlite320"):
        import torchvision

        ssd = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
            weights=None, weights_backbone=None, score_thresh=0.3).eval()
        if name == "ssdlite320":
            class Whole(torch.nn.Module):  # list of images in, boxes/scores/labels out
                def __init__(self):
                    super().__init__()
                    self.ssd = ssd

                def forward(self, x):
                    out = self.ssd([x[0]])[0]
                    return out["boxes"], out["scores"], out["labels"]

            return Whole().eval()

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.backbone, self.head = ssd.backbone, ssd.head

            def forward(self, x):
                out = self.head(list(self.backbone(x).values()))
                return out["bbox_regression"], out["cls_logits"]

        return Net().eval()
    if name in TIMM_NAMES:
        import timm

        return timm.create_model(TIMM_NAMES[name], pretrained=False).eval()
    if name == "bert_base":
        from transformers import BertConfig, BertModel

        bert = BertModel(BertConfig()).eval()

        class Encoder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.bert = bert

            def forward(self, input_ids, attention_mask):
                return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

        return Encoder().eval()
    if name == "resnext50_32x4d":
        import torchvision

        return torchvision.models.resnext50_32x4d(weights=None).eval()
    raise ValueError(f"unknown model {name!r}; expected one of {ZOO}")


def export(name: str, path: str | Path) -> Path:
    """Export zoo model `name` to `path` (module doc) and check it against torch."""
    import onnx
    import onnxruntime as ort
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = _module(name)
    if name in RECALIBRATED:  # images 12..19 (the proxy bench calibrates on 0..7, evaluates on 8..17)
        recalibrate_batchnorm(module, model_inputs(name, RECALIBRATED[name], offset=12))
    feeds = model_feeds(name, 1)
    example = tuple(torch.from_numpy(v) for v in feeds.values())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = module(*example)
        expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
        buf = io.BytesIO()
        torch.onnx.export(module, example, buf, dynamo=False, opset_version=17, input_names=list(feeds))
    model = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(model, full_check=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    got = ort.InferenceSession(model.SerializeToString(), opts).run(None, feeds)
    for g, e in zip(got, expected):
        e = e.numpy()
        if g.shape != e.shape:
            raise RuntimeError(f"{name}: ONNX Runtime output {g.shape} != torch {e.shape}")
        if e.size and e.dtype.kind == "f" and not np.abs(g - e).max() <= 1e-3 * max(1.0, float(np.abs(e).max())):
            raise RuntimeError(f"{name}: ONNX Runtime differs from torch by {np.abs(g - e).max():.3g}")
    onnx.save(model, str(path))
    return path


def images(n: int, size: int, offset: int = 0) -> np.ndarray:
    """`n` real photographs (the 20 ImageNet JPEGs of ../shared/data/foolbox-samples, from
    `offset` on, cycling) letterboxed to size x size: float32 (n, 3, size, size) in [0, 1], RGB."""
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from models import data_dir

    files = sorted((data_dir() / "foolbox-samples").glob("imagenet_*.jpg"))
    if not files:
        raise FileNotFoundError("no imagenet_*.jpg under ../shared/data/foolbox-samples")
    out = np.full((n, 3, size, size), 114 / 255, dtype=np.float32)  # YOLO's grey letterbox
    for i in range(n):
        img = Image.open(files[(offset + i) % len(files)]).convert("RGB")
        scale = size / max(img.size)
        w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
        arr = np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.float32) / 255
        top, left = (size - h) // 2, (size - w) // 2
        out[i, :, top:top + h, left:left + w] = arr.transpose(2, 0, 1)
    return out


def model_inputs(name: str, n: int, offset: int = 0) -> np.ndarray:
    """Real images prepared as model `name` expects them: [0, 1] for YOLO and the whole SSD
    (which normalises inside), ImageNet mean/std for the classifiers and the SSD network."""
    x = images(n, input_size(name), offset)
    if name in ("yolov8s", "ssdlite320"):
        return x
    mean = np.array(IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.array(IMAGENET_STD, np.float32).reshape(1, 3, 1, 1)
    return (x - mean) / std


def model_feeds(name: str, n: int = 1, offset: int = 0) -> dict[str, np.ndarray]:
    """Inputs of model `name` by input name: real images prepared as it expects (model_inputs),
    or for BERT random token ids (seeded by `offset`) with the last quarter masked out."""
    if name == "bert_base":
        rng = np.random.default_rng(offset)
        mask = np.ones((n, BERT_TOKENS), np.int64)
        mask[:, 3 * BERT_TOKENS // 4:] = 0
        return {"input_ids": rng.integers(1000, 30000, (n, BERT_TOKENS)).astype(np.int64), "attention_mask": mask}
    return {"input": model_inputs(name, n, offset)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("names", nargs="*", default=list(ZOO))
    args = ap.parse_args(argv)
    for name in args.names:
        path = export(name, args.out / f"{name}.onnx")
        print(f"{name}: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
