"""Calibration inputs (latprune.calibration.load_calibration): noise, float and uint8 .npz
files, even spreading over the file, and one clear InputError for every bad source."""
from __future__ import annotations

import numpy as np
import pytest

from latprune.calibration import IMAGE_MEAN, IMAGE_STD, load_calibration
from latprune.types import InputError

SHAPE = [1, 3, 8, 10]  # N, C, H, W (H != W to catch transposition mistakes)


# ---- noise ---------------------------------------------------------------------------------

def test_noise_shape_dtype_and_determinism():
    x = load_calibration("noise", SHAPE, samples=16)
    assert x.shape == (16, 3, 8, 10) and x.dtype == np.float32
    assert x.flags["C_CONTIGUOUS"]
    assert np.array_equal(x, load_calibration("noise", SHAPE, samples=16))
    assert np.array_equal(x, load_calibration("noise", SHAPE, samples=16, seed=0))
    assert not np.array_equal(x, load_calibration("noise", SHAPE, samples=16, seed=1))
    assert abs(float(x.mean())) < 0.1 and 0.9 < float(x.std()) < 1.1  # standard Gaussian
    # the batch entry of the model's input shape is ignored (symbolic batch: 0)
    assert np.array_equal(load_calibration("noise", [0, 3, 8, 10], samples=16), x)
    assert load_calibration("noise", [1, 5], samples=3).shape == (3, 5)


def test_noise_needs_a_static_input_shape():
    with pytest.raises(InputError, match="static"):
        load_calibration("noise", [1, 3, 0, 10], samples=4)


@pytest.mark.parametrize("samples", [0, -3])
def test_samples_below_one_are_refused(tmp_path, samples):
    with pytest.raises(InputError, match="at least 1"):
        load_calibration("noise", SHAPE, samples=samples)
    path = tmp_path / "x.npz"
    np.savez(path, x=np.zeros((4, 3, 8, 10), np.float32))
    with pytest.raises(InputError, match="at least 1"):
        load_calibration(path, SHAPE, samples=samples)


# ---- float and uint8 files -----------------------------------------------------------------

def test_float_npz_is_used_as_is(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.normal(3.0, 2.0, (5, 3, 8, 10)).astype(np.float32)
    path = tmp_path / "calib.npz"
    np.savez(path, x=arr)
    x = load_calibration(path, SHAPE, samples=5)
    assert x.dtype == np.float32 and np.array_equal(x, arr)
    # str paths work too; float64 is converted, not rescaled
    np.savez(tmp_path / "f64.npz", x=arr.astype(np.float64))
    assert np.allclose(load_calibration(str(tmp_path / "f64.npz"), SHAPE, samples=5), arr)


def test_array_name_x_input_or_the_only_one(tmp_path):
    arr = np.ones((4, 3, 8, 10), np.float32)
    np.savez(tmp_path / "a.npz", input=arr, labels=np.arange(4))
    assert np.array_equal(load_calibration(tmp_path / "a.npz", SHAPE, samples=4), arr)
    np.savez(tmp_path / "b.npz", images=arr * 2)
    assert np.array_equal(load_calibration(tmp_path / "b.npz", SHAPE, samples=4), arr * 2)
    np.savez(tmp_path / "c.npz", images=arr, labels=np.arange(4))
    with pytest.raises(InputError, match="'x'"):
        load_calibration(tmp_path / "c.npz", SHAPE, samples=4)


def test_uint8_nhwc_images_are_normalised_and_transposed(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (4, 8, 10, 3), dtype=np.uint8)  # N, H, W, C
    path = tmp_path / "images.npz"
    np.savez(path, x=imgs)
    x = load_calibration(path, SHAPE, samples=4)
    assert x.shape == (4, 3, 8, 10) and x.dtype == np.float32
    # one pixel by hand: image 2, row 5, column 7, channel 1 (green)
    v = imgs[2, 5, 7, 1]
    assert x[2, 1, 5, 7] == pytest.approx((v / 255.0 - 0.456) / 0.224, rel=1e-5)
    assert IMAGE_MEAN[1] == 0.456 and IMAGE_STD[1] == 0.224
    # and every pixel
    mean = np.asarray(IMAGE_MEAN).reshape(1, 3, 1, 1)
    std = np.asarray(IMAGE_STD).reshape(1, 3, 1, 1)
    expect = (imgs.transpose(0, 3, 1, 2) / 255.0 - mean) / std
    assert np.allclose(x, expect, atol=1e-5)


def test_uint8_single_channel_images_are_scaled(tmp_path):
    imgs = np.full((2, 8, 10, 1), 51, np.uint8)
    np.savez(tmp_path / "gray.npz", x=imgs)
    x = load_calibration(tmp_path / "gray.npz", [1, 1, 8, 10], samples=2)
    assert x.shape == (2, 1, 8, 10)
    assert np.allclose(x, 0.2)  # 51 / 255, no ImageNet normalisation for one channel


# ---- spreading rows over the file -----------------------------------------------------------

def _class_ordered(tmp_path, classes: int, per_class: int):
    """A file ordered by class: row i holds the value of its class everywhere."""
    labels = np.repeat(np.arange(classes), per_class)
    arr = np.broadcast_to(labels[:, None, None, None], (len(labels), 3, 8, 10)).astype(np.float32)
    path = tmp_path / "ordered.npz"
    np.savez(path, x=arr)
    return path


@pytest.mark.parametrize("samples", [10, 20, 50])
def test_rows_are_spread_over_a_class_ordered_file(tmp_path, samples):
    path = _class_ordered(tmp_path, classes=10, per_class=10)
    x = load_calibration(path, SHAPE, samples=samples)
    assert len(x) == samples
    classes = x[:, 0, 0, 0].astype(int)
    assert set(classes) == set(range(10))  # every class represented
    assert list(classes) == sorted(classes)  # file order is kept
    counts = np.bincount(classes, minlength=10)
    assert counts.max() - counts.min() <= 1  # evenly


def test_more_samples_than_rows_uses_every_row_once(tmp_path):
    path = _class_ordered(tmp_path, classes=4, per_class=3)
    x = load_calibration(path, SHAPE, samples=100)
    assert len(x) == 12
    assert list(x[:, 0, 0, 0].astype(int)) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_rows_are_spread_when_the_file_is_not_a_multiple_of_samples(tmp_path):
    path = _class_ordered(tmp_path, classes=10, per_class=19)
    x = load_calibration(path, SHAPE, samples=100)
    assert len(x) == 100
    assert set(x[:, 0, 0, 0].astype(int)) == set(range(10))


# ---- errors --------------------------------------------------------------------------------

def _error(source, shape=SHAPE, samples=4) -> str:
    with pytest.raises(InputError) as info:
        load_calibration(source, shape, samples=samples)
    msg = str(info.value)
    assert msg and "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    assert "not found" in _error(tmp_path / "missing.npz")
    assert "not found" in _error(tmp_path)  # a folder is not a file either


def test_not_an_npz_file(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("just some text, not numpy data\n" * 10)
    assert "npz" in _error(text)
    npy = tmp_path / "plain.npy"  # a bare .npy array is not an .npz archive
    np.save(npy, np.zeros((4, 3, 8, 10), np.float32))
    _error(npy)
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    _error(empty)


def test_pickled_object_array_is_refused(tmp_path):
    path = tmp_path / "objects.npz"
    arr = np.empty(4, dtype=object)
    for i in range(4):
        arr[i] = np.zeros((3, 8, 10), np.float32)
    np.savez(path, x=arr)
    assert "npz" in _error(path)


@pytest.mark.parametrize("shape", [(4, 3, 16, 16), (4, 8, 10, 3), (4, 3, 8), (4, 1, 3, 8, 10), (0, 3, 8, 10)])
def test_wrong_shape(tmp_path, shape):
    path = tmp_path / "wrong.npz"
    np.savez(path, x=np.zeros(shape, np.float32))
    assert "shape" in _error(path)


def test_uint8_images_of_the_wrong_size(tmp_path):
    path = tmp_path / "small.npz"
    np.savez(path, x=np.zeros((4, 4, 5, 3), np.uint8))
    assert "shape" in _error(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(tmp_path, bad):
    arr = np.zeros((4, 3, 8, 10), np.float32)
    arr[2, 1, 3, 4] = bad
    path = tmp_path / "nan.npz"
    np.savez(path, x=arr)
    assert "NaN" in _error(path)


@pytest.mark.parametrize("dtype", [np.int64, np.bool_, np.complex64])
def test_non_float_dtypes(tmp_path, dtype):
    path = tmp_path / "ints.npz"
    np.savez(path, x=np.zeros((4, 3, 8, 10), dtype))
    _error(path)
