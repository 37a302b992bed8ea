"""The CIFAR-10 ResNets of akamaster/pytorch_resnet_cifar10 as torch modules (needs torch).

The same architecture as ``bench/models.py``'s ``_cifar_resnet_module`` (which the benchmarks
keep using; they may import this module instead), as importable top-level classes so that the
torch frontend, ``latprune finetune`` and user code can build and load them:

* ``conv1`` 3→16 3×3 + ``bn1``, then ``layer1``/``layer2``/``layer3`` of n BasicBlocks with 16, 32,
  64 channels (3×3 convs without bias, BN, ReLU after each BN and after the residual add), global
  average pool, ``linear`` 64→10; depth = 6n + 2.
* "Option A" shortcut of a downsampling block: no weights, ``x[:, :, ::2, ::2]`` zero-padded by
  planes/4 channels on each side (ONNX: Slice + Pad on the channel axis). Its width is hard-coded
  in the module, which is why pruning works on the exported ONNX graph (pruner.torch_frontend)
  and never edits this module's shapes.

Inputs are float32 ``(N, 3, 32, 32)`` RGB in [0, 1] normalised with :data:`CIFAR_MEAN` /
:data:`CIFAR_STD` (the ImageNet statistics, as the published weights expect); outputs ``(N, 10)``
logits. Trained weights live in ``<data>/cifar10-resnet-weights`` (``latprune.finetune.data_dir``).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

#: CIFAR ResNet depths with published weights in the data folder, mapped to their file names.
CIFAR_RESNET_WEIGHTS: dict[int, str] = {
    20: "resnet20-12fca82f.th",
    56: "resnet56-4bfd9763.th",
}
#: Per-channel input normalisation (RGB) applied to [0, 1] pixels.
CIFAR_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
CIFAR_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
CIFAR_CLASSES: tuple[str, ...] = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                  "horse", "ship", "truck")


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN + shortcut, then ReLU (option-A shortcut when downsampling)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = stride != 1 or in_planes != planes
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample:
            shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0)
        else:
            shortcut = x
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6·n_blocks + 2) for 32×32 inputs (akamaster layout; state-dict names match)."""

    def __init__(self, n_blocks: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        layers = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n_blocks):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1)
        out = torch.flatten(out, 1)
        return self.linear(out)


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    """A randomly initialised CIFAR ResNet of ``depth`` = 6n + 2 layers (n >= 1)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
    return CifarResNet((depth - 2) // 6, num_classes)


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``path``: akamaster's ``{"state_dict": ...}`` checkpoints (``module.``
    prefix stripped) or a plain ``torch.save(module.state_dict())`` file. ``weights_only=True``."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_cifar_resnet(depth: int, data: str | Path | None = None) -> CifarResNet:
    """The trained CIFAR-10 ResNet-``depth`` (20 or 56) in eval mode, weights from
    ``<data>/cifar10-resnet-weights/`` (``data`` default: ``latprune.finetune.data_dir()``),
    loaded with ``strict=True``. Raises FileNotFoundError when the weights are missing."""
    if depth not in CIFAR_RESNET_WEIGHTS:
        raise ValueError(f"no weights for depth {depth}; available: {sorted(CIFAR_RESNET_WEIGHTS)}")
    if data is None:
        from latprune.finetune import data_dir
        data = data_dir()
    weights = Path(data) / "cifar10-resnet-weights" / CIFAR_RESNET_WEIGHTS[depth]
    if not weights.is_file():
        raise FileNotFoundError(f"CIFAR ResNet weights not found: {weights}")
    model = cifar_resnet(depth)
    model.load_state_dict(load_state(weights), strict=True)
    return model.eval()


__all__ = ["BasicBlock", "CifarResNet", "cifar_resnet", "load_cifar_resnet", "load_state",
           "CIFAR_MEAN", "CIFAR_STD", "CIFAR_CLASSES", "CIFAR_RESNET_WEIGHTS"]
