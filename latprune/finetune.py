"""CIFAR-10 fine-tuning while pruning: data, evaluation and the training loop (needs torch).

Data: the shared folder (``../shared/data`` relative to the repository root, or the
``LATPRUNE_DATA`` environment variable, or an explicit argument) holds
``cifar10-train-jpg.zip`` (50,000 JPEGs ``train/<class>/NNNN.jpg``) and ``cifar10-test.npz``
(``x`` uint8 (10000, 32, 32, 3), ``y``). Images are scaled to [0, 1] and normalised with the
ImageNet mean/std the CIFAR ResNets were trained with (latprune.models_cifar).

`finetune` trains a module analysed by pruner.torch_frontend towards a Plan with one of:

- ``oneshot``: the removed channels/blocks are zeroed at once and kept at zero (the classic
  "prune, then fine-tune" baseline, equivalent to training the pruned network);
- ``dpm``: DPM's smooth pruning (pruner.dpm.DecayPruner), no self-rectifying;
- ``dpm-sr``: DPM with self-rectifying swaps.

Recipe: SGD, momentum 0.9, weight decay 5e-4 (added to the gradients by hand so that decaying
and zeroed entries get none), cosine learning rate from `lr` to 0 over all steps, cross-entropy,
random crop (4-pixel zero padding) and horizontal flip. Your own loop: see pruner.dpm's hook.
"""
from __future__ import annotations

import io
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from latprune.types import InputError, Plan

METHODS = ("oneshot", "dpm", "dpm-sr")
DISTILL_TEMPERATURE = 4.0
# Share of the loss distilled from the dense module by default. Same 0.5x plan of ResNet-56,
# one-shot, 156 steps, 2 seeds (bench/dpm.py --plan-from dpm_distill): 81.55% with 0.5
# against 78.97% with labels only. It adds the teacher's forward pass to every step (571 s of
# training per run with it, 472-551 s without, under different machine loads).
DEFAULT_DISTILL = 0.5
TRAIN_ZIP = "cifar10-train-jpg.zip"
TEST_NPZ = "cifar10-test.npz"


def _torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - depends on the environment
        raise InputError("fine-tuning needs PyTorch: pip install torch") from None
    return torch


def data_dir(path: str | Path | None = None) -> Path:
    """The CIFAR data folder: `path`, else $LATPRUNE_DATA, else ../shared/data relative to the
    repository root. InputError when it does not exist."""
    if path is None:
        path = os.environ.get("LATPRUNE_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data"
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"CIFAR data folder not found at {path} (set LATPRUNE_DATA or pass --data; "
                         f"it must hold {TRAIN_ZIP} and {TEST_NPZ})")
    return path


def normalise_images(x_u8: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) normalised."""
    from latprune.models_cifar import CIFAR_MEAN, CIFAR_STD

    mean = np.asarray(CIFAR_MEAN, dtype=np.float32)
    std = np.asarray(CIFAR_STD, dtype=np.float32)
    x = (x_u8.astype(np.float32) / 255.0 - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def cifar_test(limit: int | None = None, data: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The test set: (x float32 (N, 3, 32, 32) normalised, y int64 (N,)). `limit`: that many
    images taken evenly over the class-ordered file (all 10,000 when None)."""
    f = data_dir(data) / TEST_NPZ
    if not f.is_file():
        raise InputError(f"{f}: CIFAR-10 test set not found")
    with np.load(f) as d:
        stride = 1 if limit is None else max(1, len(d["y"]) // max(limit, 1))
        x_u8 = d["x"][::stride][:limit]
        y = d["y"][::stride][:limit].astype(np.int64)
    return normalise_images(x_u8), y


def load_train_images(subset: int | None = None, data: str | Path | None = None,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Decode training images from the zip with Pillow: (x uint8 (N, 32, 32, 3), y int64).
    `subset`: N images, the same number from each class (chosen by `seed`); all when None."""
    from PIL import Image

    from latprune.models_cifar import CIFAR_CLASSES

    f = data_dir(data) / TRAIN_ZIP
    if not f.is_file():
        raise InputError(f"{f}: CIFAR-10 training images not found")
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(f) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".jpg"))
        label_of = {c: i for i, c in enumerate(CIFAR_CLASSES)}
        by_class: dict[int, list[str]] = {i: [] for i in range(len(CIFAR_CLASSES))}
        for n in names:
            c = n.split("/")[-2]
            if c in label_of:
                by_class[label_of[c]].append(n)
        chosen: list[tuple[str, int]] = []
        for label, files in by_class.items():
            if subset is not None:
                per = subset // len(by_class) + (1 if label < subset % len(by_class) else 0)
                files = [files[i] for i in sorted(rng.choice(len(files), size=min(per, len(files)), replace=False))]
            chosen += [(n, label) for n in files]
        x = np.stack([np.asarray(Image.open(io.BytesIO(zf.read(n))).convert("RGB"), dtype=np.uint8)
                      for n, _ in chosen]) if chosen else np.zeros((0, 32, 32, 3), np.uint8)
    y = np.asarray([label for _, label in chosen], dtype=np.int64)
    return x, y


def _dataset_base():
    torch = _torch()
    return torch.utils.data.Dataset


class CifarTrain(_dataset_base()):  # type: ignore[misc]
    """CIFAR-10 training images as a torch Dataset: item i is (float32 (3, 32, 32) normalised,
    label). Decoded once (Pillow) at construction; `augment`: random crop of the image
    zero-padded by 4 pixels, and a horizontal flip with probability 1/2 (numpy RNG `seed`)."""

    def __init__(self, subset: int | None = None, data: str | Path | None = None, augment: bool = True,
                 seed: int = 0, images: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.x, self.y = images if images is not None else load_train_images(subset, data, seed)
        self.augment = augment
        self.rng = np.random.default_rng(seed + 1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        torch = _torch()
        img = self.x[i]
        if self.augment:
            padded = np.zeros((40, 40, 3), dtype=np.uint8)  # zero pixels, as torchvision's RandomCrop
            padded[4:36, 4:36] = img
            r, c = self.rng.integers(0, 9, size=2)
            img = padded[r:r + 32, c:c + 32]
            if self.rng.random() < 0.5:
                img = img[:, ::-1]
        x = normalise_images(np.ascontiguousarray(img)[None])[0]
        return torch.from_numpy(x), int(self.y[i])


def evaluate(module, x: np.ndarray, y: np.ndarray, batch_size: int = 500) -> float:
    """Top-1 accuracy (0..1) of `module` in eval mode (its modes are restored)."""
    torch = _torch()
    was = {m: m.training for m in module.modules()}
    module.eval()
    correct = 0
    try:
        with torch.no_grad():
            for s in range(0, len(x), batch_size):
                out = module(torch.from_numpy(x[s:s + batch_size]))
                correct += int((out.argmax(1).numpy() == y[s:s + batch_size]).sum())
    finally:
        for m, mode in was.items():
            m.train(mode)
    return correct / max(len(x), 1)


@dataclass
class FinetuneResult:
    module: Any
    plan: Plan  # the final plan (after DPM swaps)
    pruner: Any  # the DecayPruner used
    history: list[dict] = field(default_factory=list)
    decay_steps: int = 0
    total_steps: int = 0
    seconds: float = 0.0


def make_pruner(graph, plan: Plan, method: str, decay_steps: int | None = None,
                rate_threshold: float | None = None, length_threshold: float | None = None, **kw):
    """The DecayPruner for `method` (oneshot | dpm | dpm-sr)."""
    from latprune.pruner import dpm

    if method not in METHODS:
        raise InputError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    if method == "oneshot":
        return dpm.one_shot_mask(graph, plan)
    return dpm.DecayPruner(
        graph, plan, decay_steps=dpm.DEFAULT_DECAY_STEPS if decay_steps is None else decay_steps,
        rate_threshold=dpm.DEFAULT_RATE_THRESHOLD if rate_threshold is None else rate_threshold,
        length_threshold=dpm.DEFAULT_LENGTH_THRESHOLD if length_threshold is None else length_threshold,
        rectify=method == "dpm-sr", **kw)


def finetune(module, graph, plan: Plan, method: str = "oneshot", epochs: float = 2, lr: float = 0.01,
             batch_size: int = 128, seed: int = 0, subset: int | None = None,
             decay_steps: int | None = None, rate_threshold: float | None = None,
             length_threshold: float | None = None, weight_decay: float = 5e-4, momentum: float = 0.9,
             data: str | Path | None = None, train_set=None,
             eval_set: tuple[np.ndarray, np.ndarray] | None = None,
             progress: Callable[[dict], None] | None = None, log_every: int = 50,
             distill: float = DEFAULT_DISTILL, temperature: float = DISTILL_TEMPERATURE) -> FinetuneResult:
    """Fine-tune `module` (analysed as `graph`) towards `plan` on CIFAR-10 training images.

    `epochs` may be fractional (steps = ceil(epochs · len(data) / batch_size)); `subset`: that
    many training images (balanced); `train_set`: any Dataset of (x, label) instead.
    `decay_steps` (dpm, dpm-sr): None = half of the total steps (decay in the first half,
    recover at the final width in the second); clipped to the total steps. `eval_set`: (x, y)
    evaluated after each epoch. `progress(record)` gets every `log_every` steps and each
    epoch's record. `distill` (0..1): the share of the loss that is knowledge distillation from
    a frozen copy of the dense module (Hinton et al.: KL divergence between the softened
    outputs at `temperature`, times its square), the rest cross-entropy with the labels
    (default DEFAULT_DISTILL; 0: labels only).
    Returns the module (trained in place), the final plan, the pruner and a history of records
    {epoch, step, loss, lr, train_top1, ...}.
    """
    torch = _torch()
    if epochs <= 0 or lr <= 0 or batch_size < 1:
        raise InputError("epochs and lr must be positive and batch_size at least 1")
    if not 0.0 <= distill <= 1.0 or temperature <= 0:
        raise InputError("distill must lie in [0, 1] and the temperature be positive")
    torch.manual_seed(seed)
    teacher = None
    if distill > 0:  # the dense module, frozen, before any channel is decayed
        import copy

        teacher = copy.deepcopy(module).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    if train_set is None:
        train_set = CifarTrain(subset, data, augment=True, seed=seed)
    if len(train_set) == 0:
        raise InputError("no training images")
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True,
                                         generator=gen, drop_last=len(train_set) >= batch_size)
    per_epoch = len(loader)
    total = max(1, int(np.ceil(epochs * per_epoch)))
    if method != "oneshot":
        decay_steps = total // 2 if decay_steps is None else min(int(decay_steps), total)
        decay_steps = max(decay_steps, 1)
    pruner = make_pruner(graph, plan, method, decay_steps, rate_threshold, length_threshold)
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    opt = torch.optim.SGD([p for _, p in params], lr=lr, momentum=momentum, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    history: list[dict] = []
    module.train()
    step, epoch, t0 = 0, 0, time.perf_counter()
    while step < total:
        epoch += 1
        run_loss, run_correct, run_n = 0.0, 0, 0
        for xb, yb in loader:
            out = module(xb)
            loss = torch.nn.functional.cross_entropy(out, yb)
            if teacher is not None:
                with torch.no_grad():
                    soft = torch.nn.functional.softmax(teacher(xb) / temperature, dim=1)
                kd = torch.nn.functional.kl_div(torch.nn.functional.log_softmax(out / temperature, dim=1), soft,
                                                reduction="batchmean") * temperature ** 2
                loss = (1 - distill) * loss + distill * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            pruner.before_step()
            if weight_decay:
                masks = pruner.decay_masks()
                with torch.no_grad():
                    for name, p in params:
                        if p.grad is None:
                            continue
                        m = masks.get(name)
                        if m is None:
                            p.grad.add_(p, alpha=weight_decay)
                        else:
                            p.grad.add_(p * (~m), alpha=weight_decay)
            opt.step()
            sched.step()
            pruner.after_step()
            step += 1
            run_loss += float(loss.detach()) * len(yb)
            run_correct += int((out.detach().argmax(1) == yb).sum())
            run_n += len(yb)
            if progress is not None and log_every and step % log_every == 0:
                progress({"epoch": epoch, "step": step, "total_steps": total, "loss": run_loss / run_n,
                          "train_top1": run_correct / run_n, "lr": sched.get_last_lr()[0], **pruner.status()})
            if step >= total:
                break
        rec = {"epoch": epoch, "step": step, "loss": run_loss / max(run_n, 1),
               "train_top1": run_correct / max(run_n, 1), "lr": sched.get_last_lr()[0],
               "seconds": time.perf_counter() - t0, **{k: v for k, v in pruner.status().items() if k != "step"}}
        if eval_set is not None:
            rec["test_top1"] = evaluate(module, *eval_set)
        history.append(rec)
        if progress is not None:
            progress(rec)
    final = pruner.finish(force=True)
    module.eval()
    return FinetuneResult(module, final, pruner, history, pruner.decay_steps, total,
                          time.perf_counter() - t0)


__all__ = ["data_dir", "cifar_test", "load_train_images", "CifarTrain", "evaluate", "finetune",
           "make_pruner", "FinetuneResult", "METHODS"]
