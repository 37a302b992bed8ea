"""Calibration inputs for data-driven importance, distortion curves and repair.

Sources (`--calib`):
- a `.npz` file (loaded with allow_pickle=False) holding an array `x` (or `input`, or its only
  array): either float32 already in the model's input layout (N, C, H, W), or uint8 images
  (N, H, W, C) which are scaled to [0, 1], normalised with the ImageNet mean/std that
  torchvision models expect (`IMAGE_MEAN`, `IMAGE_STD`) and transposed to NCHW;
- `noise`: standard Gaussian inputs in the model's input shape (the zero-data mode of seed 000).

The rows used are spread evenly over the file (files are often ordered by class).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from latprune.types import InputError

IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
NOISE = "noise"


def load_calibration(source: str | Path, input_shape: list[int], samples: int = 512,
                     seed: int = 0) -> np.ndarray:
    """float32 array (samples, *input_shape[1:]) from `source` (see the module docstring).
    `input_shape` is the model input's shape; its batch entry is ignored."""
    item_shape = tuple(int(d) for d in input_shape[1:])
    if samples < 1:
        raise InputError(f"calibration samples must be at least 1, not {samples}")
    if any(d <= 0 for d in item_shape):
        raise InputError(f"the model input shape {input_shape} is not static; calibration needs it")
    if str(source) == NOISE:
        rng = np.random.default_rng(seed)
        return rng.standard_normal((samples, *item_shape)).astype(np.float32)
    path = Path(source)
    if not path.is_file():
        raise InputError(f"calibration file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = list(data.keys())
            key = next((k for k in ("x", "input") if k in keys), keys[0] if len(keys) == 1 else None)
            if key is None:
                raise InputError(f"{path}: no array named 'x' among {keys}")
            arr = data[key]
    except InputError:
        raise
    except Exception as exc:  # zip/pickle/format errors
        raise InputError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
    if arr.ndim != len(item_shape) + 1 or len(arr) == 0:
        raise InputError(f"{path}: array '{key}' has shape {arr.shape}; expected (N, *{item_shape})")
    if len(arr) > samples:  # evenly spread rows: files are often ordered by class
        arr = arr[np.unique(np.linspace(0, len(arr) - 1, samples).round().astype(np.int64))]
    if arr.dtype == np.uint8:
        if len(item_shape) == 3 and arr.shape[1:] == (item_shape[1], item_shape[2], item_shape[0]):
            x = arr.astype(np.float32) / 255.0
            if item_shape[0] == 3:
                x = (x - np.asarray(IMAGE_MEAN, np.float32)) / np.asarray(IMAGE_STD, np.float32)
            arr = x.transpose(0, 3, 1, 2)
        else:
            arr = arr.astype(np.float32) / 255.0
    if tuple(arr.shape[1:]) != item_shape:
        raise InputError(f"{path}: calibration inputs have shape {tuple(arr.shape[1:])} per item; "
                         f"the model takes {item_shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"{path}: calibration array has dtype {arr.dtype}; expected float32 or uint8 images")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise InputError(f"{path}: calibration inputs contain NaN or infinity")
    return arr
