"""The backend interface: ONNX Runtime CPU runs here; GPU backends skip cleanly without a GPU
(and run on a machine that has one)."""
import numpy as np
import pytest

from onnx_builders import residual_cnn
from latprune.profiler.backends import available, get_backend
from latprune.profiler.backends.base import BackendUnavailable
from latprune.profiler.backends.trt import cuda_device_count

HAS_GPU = cuda_device_count() > 0


def test_ort_cpu_backend_times_a_model():
    backend = get_backend("ort-cpu", threads=1)
    backend.check()
    runner = backend.load(residual_cnn())
    inputs = runner.inputs(3)
    assert len(inputs) == 3 and not np.array_equal(inputs[0]["input"], inputs[1]["input"])  # rotating
    times = [runner.run_ms(inputs[i % 3]) for i in range(6)]
    assert all(t > 0 for t in times)
    fp = backend.fingerprint()
    assert fp["provider"] == "CPUExecutionProvider" and fp["threads"] == 1


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        get_backend("tpu")


def test_available_reports_every_backend_without_raising():
    status = available()
    assert status["ort-cpu"] == "ok"
    assert set(status) == {"ort-cpu", "openvino", "ort-cuda", "ort-trt", "trt", "torch"}
    if not HAS_GPU:
        for name in ("ort-cuda", "ort-trt", "trt"):
            assert status[name] != "ok" and status[name]  # says why


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["ort-cuda", "ort-trt", "trt"])
def test_gpu_backends_time_a_model(name):
    backend = get_backend(name)
    try:
        backend.check()
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    runner = backend.load(residual_cnn())
    inputs = runner.inputs(2)
    assert all(runner.run_ms(inputs[i % 2]) > 0 for i in range(5))
    assert backend.fingerprint()["device"] == "cuda"
