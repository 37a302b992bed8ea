"""Pruned models made by another tool: torchvision classifiers pruned by Torch-Pruning with a
random ratio per convolution, so their widths are whatever falls out (not multiples of
anything). What a user brings to `latprune predict` (issue 15).

    from tp_configs import export_tp_configs
    dense, configs = export_tp_configs("mobilenet_v2", out_dir, n=10, seed=0)

Each model is built with random weights after torch.manual_seed(0) (nothing is downloaded),
input (1, 3, H, H). Torch-Pruning's MetaPruner with random importance prunes every conv (the
classifier's output layer is kept) by its own ratio drawn uniformly from RATIO_RANGE, with
`round_to=None`; its dependency graph keeps residual adds and depthwise pairs consistent. Grouped
convs (RegNetX) keep their group count with fewer channels per group, which is how
Torch-Pruning prunes them. Needs torch, torchvision and torch-pruning.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from models import _export  # noqa: E402

RATIO_RANGE = (0.05, 0.7)
TP_MODELS = ("resnet18", "mobilenet_v2", "regnet_x_400mf", "efficientnet_b0")


def _build(name: str):
    import torch
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()


def export_tp_configs(name: str, out_dir: str | Path, n: int = 10, seed: int = 0,
                      input_hw: int = 224, round_to: int | None = None) -> tuple[Path, list[Path]]:
    """(dense ONNX, [n pruned ONNX]) in out_dir (reused when already there). `round_to`:
    Torch-Pruning rounds every width to a multiple of it (None: arbitrary widths)."""
    import torch
    import torch_pruning as tp

    out_dir = Path(out_dir)
    example = torch.randn(1, 3, input_hw, input_hw, generator=torch.Generator().manual_seed(0))
    dense = out_dir / f"{name}_{input_hw}_dense.onnx"
    if not dense.is_file():
        _export(_build(name), example, dense)
    configs = []
    for i in range(n):
        path = out_dir / f"{name}_{input_hw}_tp{seed}{f'_r{round_to}' if round_to else ''}_{i}.onnx"
        configs.append(path)
        if path.is_file():
            continue
        model = _build(name)
        rng = np.random.default_rng([seed, i])
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1000]
        ratios = {m: float(rng.uniform(*RATIO_RANGE)) for m in convs}
        pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.RandomImportance(),
                                      pruning_ratio=0.0, pruning_ratio_dict=ratios, ignored_layers=head,
                                      round_to=round_to)
        torch.manual_seed(1000 * seed + i)  # random importance draws from torch's generator
        pruner.step()
        _export(model.eval(), example, path)
    return dense, configs
