"""service/inspect.py: safe inspection of uploaded ONNX models and calibration .npz files."""
from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from latprune.service.inspect import inspect_calibration, inspect_model
from latprune.types import InputError
from onnx_builders import GraphBuilder, residual_cnn

SUMMARY_KEYS = {
    "ir_version", "opset", "producer", "inputs", "outputs", "nodes", "ops", "parameters",
    "layers", "conv_layers", "groups", "prunable_groups", "removable_blocks", "notes", "prunable",
}


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def _no_traceback(message: str) -> None:
    assert "Traceback" not in message and "\n" not in message


# ---- models ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def residual_file(tmp_path_factory) -> Path:
    return _save(residual_cnn(), tmp_path_factory.mktemp("inspect") / "residual.onnx")


def test_valid_cnn_summary(residual_file):
    s = inspect_model(residual_file)
    assert set(s) == SUMMARY_KEYS
    assert s["inputs"] == [{"name": "input", "shape": [1, 3, 16, 16], "dtype": "float32"}]
    assert s["outputs"][0]["shape"] == [1, 10]
    assert s["opset"] == {"ai.onnx": 17} and s["ir_version"] == 8
    assert s["prunable"] is True and s["prunable_groups"] >= 1
    assert s["groups"] >= s["prunable_groups"]
    assert s["conv_layers"] == 8 and s["layers"] == 9
    assert s["removable_blocks"] == 2
    assert s["ops"]["Conv"] == 8 and list(s["ops"]) == sorted(s["ops"])
    assert s["nodes"] == sum(s["ops"].values())
    model = onnx.load(str(residual_file))
    assert s["parameters"] == sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def test_symbolic_batch_reported_as_string(tmp_path):
    model = residual_cnn()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    s = inspect_model(_save(model, tmp_path / "m.onnx"))
    assert s["inputs"][0]["shape"] == ["batch", 3, 16, 16]


@pytest.mark.parametrize("content", [
    pytest.param(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), id="random"),
    pytest.param(b"", id="empty"),
    pytest.param(b"\x0a\xff\xff\xff\xff\x0f", id="bad-length"),
])
def test_garbage_refused(tmp_path, content):
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    with pytest.raises(InputError) as err:
        inspect_model(p)
    _no_traceback(str(err.value))


def test_truncated_file_refused(tmp_path, residual_file):
    data = residual_file.read_bytes()
    p = tmp_path / "trunc.onnx"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as err:
        inspect_model(p)
    _no_traceback(str(err.value))


def _external(tensor: onnx.TensorProto, location: str) -> onnx.TensorProto:
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    return tensor


def test_external_data_refused_without_opening(tmp_path):
    model = residual_cnn()
    _external(model.graph.initializer[0], "../../etc/passwd")
    with pytest.raises(InputError) as err:
        inspect_model(_save(model, tmp_path / "ext.onnx"))
    msg = str(err.value)
    assert "external data" in msg and "passwd" in msg
    _no_traceback(msg)


def test_external_data_fifo_is_never_opened(tmp_path):
    """Opening a FIFO for reading blocks: a child that touched it would time out instead."""
    fifo = tmp_path / "weights.bin"
    os.mkfifo(fifo)
    model = residual_cnn()
    _external(model.graph.initializer[3], "weights.bin\n\x00evil" + "x" * 500)
    with pytest.raises(InputError) as err:
        inspect_model(_save(model, tmp_path / "ext.onnx"), timeout_s=30)
    msg = str(err.value)
    assert "external data" in msg and "weights.bin" in msg
    assert len(msg) < 300
    _no_traceback(msg)


def test_external_data_in_subgraph_and_constant_refused(tmp_path):
    # Constant node whose tensor is external.
    const = helper.make_node("Constant", [], ["c"], value=_external(
        numpy_helper.from_array(np.ones(4, np.float32), "c"), "secret.bin"))
    add = helper.make_node("Add", ["x", "c"], ["y"])
    g = helper.make_graph([const, add], "g", [helper.make_tensor_value_info("x", 1, [4])],
                          [helper.make_tensor_value_info("y", 1, [4])])
    with pytest.raises(InputError, match="external data"):
        inspect_model(_save(helper.make_model(g), tmp_path / "const.onnx"))
    # If whose branch holds an external initializer.
    branch = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["o"])], "then", [],
        [helper.make_tensor_value_info("o", 1, [4])],
        [_external(numpy_helper.from_array(np.ones(4, np.float32), "w"), "branch.bin")])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["o2"])], "else", [],
                              [helper.make_tensor_value_info("o2", 1, [4])])
    cond = helper.make_node("If", ["b"], ["y"], then_branch=branch, else_branch=other)
    g = helper.make_graph([cond], "g", [helper.make_tensor_value_info("b", TensorProto.BOOL, []),
                                        helper.make_tensor_value_info("x", 1, [4])],
                          [helper.make_tensor_value_info("y", 1, [4])])
    with pytest.raises(InputError, match="branch.bin"):
        inspect_model(_save(helper.make_model(g), tmp_path / "if.onnx"))


def test_custom_domain_op_is_not_an_error(tmp_path):
    g = GraphBuilder()
    x = g.relu(g.conv("input", 3, 16))
    x = g.relu(g.conv(x, 16, 16))
    x = g.node("FancyNorm", [x], domain="com.example", alpha=0.5)
    x = g.relu(g.conv(x, 16, 24))
    x = g.relu(g.conv(x, 24, 16))
    out = g.head(x, 16)
    graph = helper.make_graph(g.nodes, "custom", g.inputs,
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 10])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    s = inspect_model(_save(model, tmp_path / "custom.onnx"))
    assert s["ops"]["com.example.FancyNorm"] == 1
    assert s["opset"]["com.example"] == 1
    assert any("FancyNorm" in n for n in s["notes"])
    assert s["prunable_groups"] < s["groups"]
    assert len(s["notes"]) <= 20


def test_huge_declared_tensor_without_data(tmp_path):
    t = TensorProto()
    t.name, t.data_type = "w", TensorProto.FLOAT
    t.dims.extend([1 << 20, 1 << 20, 1 << 10])
    node = helper.make_node("Add", ["x", "w"], ["y"])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [1])],
                          [helper.make_tensor_value_info("y", 1, [1])], [t])
    with pytest.raises(InputError) as err:
        inspect_model(_save(helper.make_model(g), tmp_path / "huge.onnx"))
    assert "declares shape" in str(err.value)
    _no_traceback(str(err.value))


def test_no_graph_inputs_refused(tmp_path):
    const = helper.make_node("Constant", [], ["y"], value=numpy_helper.from_array(np.ones(2, np.float32)))
    g = helper.make_graph([const], "g", [], [helper.make_tensor_value_info("y", 1, [2])])
    with pytest.raises(InputError, match="no inputs"):
        inspect_model(_save(helper.make_model(g), tmp_path / "noin.onnx"))


def test_checker_failure_is_clear(tmp_path):
    model = residual_cnn()
    model.graph.node[0].input[1] = "does_not_exist"
    with pytest.raises(InputError, match="invalid ONNX model") as err:
        inspect_model(_save(model, tmp_path / "bad.onnx"))
    _no_traceback(str(err.value))


def test_memory_limit(residual_file):
    with pytest.raises(InputError, match="memory limit of 50 MB"):
        inspect_model(residual_file, memory_mb=50)


def test_timeout(residual_file):
    with pytest.raises(InputError, match="took longer than 0.01 s"):
        inspect_model(residual_file, timeout_s=0.01)


def test_missing_file(tmp_path):
    with pytest.raises(InputError):
        inspect_model(tmp_path / "nope.onnx")


# ---- calibration ----------------------------------------------------------------------------

def test_calibration_float(tmp_path):
    p = tmp_path / "c.npz"
    np.savez(p, x=np.random.default_rng(0).standard_normal((5, 3, 16, 16)).astype(np.float32))
    s = inspect_calibration(p)
    assert s == {"arrays": {"x": {"shape": [5, 3, 16, 16], "dtype": "float32"}},
                 "samples": 5, "layout": "NCHW float"}


def test_calibration_uint8_single_array_compressed(tmp_path):
    p = tmp_path / "c.npz"
    np.savez_compressed(p, images=np.zeros((7, 16, 16, 3), np.uint8))
    s = inspect_calibration(p)
    assert s["samples"] == 7 and s["layout"] == "NHWC uint8"
    assert s["arrays"] == {"images": {"shape": [7, 16, 16, 3], "dtype": "uint8"}}


def test_calibration_pickle_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    arr = np.empty((1, 1, 1, 1), dtype=object)
    arr[0, 0, 0, 0] = Evil()
    p = tmp_path / "c.npz"
    np.savez(p, x=arr)
    with pytest.raises(InputError, match="Python objects"):
        inspect_calibration(p)
    assert not marker.exists()


def test_calibration_missing_x(tmp_path):
    p = tmp_path / "c.npz"
    np.savez(p, a=np.zeros((1, 3, 4, 4), np.float32), b=np.zeros((1, 3, 4, 4), np.float32))
    with pytest.raises(InputError, match="no array named 'x'"):
        inspect_calibration(p)


def test_calibration_wrong_ndim_dtype_and_empty(tmp_path):
    p = tmp_path / "c.npz"
    np.savez(p, x=np.zeros((4, 3, 16), np.float32))
    with pytest.raises(InputError, match="4 dimensions"):
        inspect_calibration(p)
    np.savez(p, x=np.zeros((4, 3, 16, 16), np.int64))
    with pytest.raises(InputError, match="dtype int64"):
        inspect_calibration(p)
    np.savez(p, x=np.zeros((0, 3, 16, 16), np.float32))
    with pytest.raises(InputError, match="no samples"):
        inspect_calibration(p)
    np.savez(p, x=np.full((1, 3, 2, 2), np.nan, np.float32))
    with pytest.raises(InputError, match="NaN"):
        inspect_calibration(p)


def test_calibration_not_npz(tmp_path):
    p = tmp_path / "c.npy"
    np.save(p, np.zeros((1, 3, 4, 4), np.float32))
    with pytest.raises(InputError, match="not a .npz"):
        inspect_calibration(p)
    p.write_bytes(b"")
    with pytest.raises(InputError):
        inspect_calibration(p)


def test_calibration_zip_bomb_refused(tmp_path):
    p = tmp_path / "bomb.npz"
    np.savez(p, x=np.zeros((1, 3, 4, 4), np.float32))
    data = bytearray(p.read_bytes())
    cd = data.index(b"PK\x01\x02")  # central directory entry: uncompressed size at +24
    data[cd + 24: cd + 28] = struct.pack("<I", 0xF0000000)  # declares ~3.75 GiB
    p.write_bytes(bytes(data))
    assert zipfile.ZipFile(p).infolist()[0].file_size == 0xF0000000
    with pytest.raises(InputError, match="over the limit"):
        inspect_calibration(p)
    # A real archive over a smaller limit.
    q = tmp_path / "big.npz"
    np.savez_compressed(q, x=np.zeros((64, 3, 32, 32), np.float32))
    with pytest.raises(InputError, match="over the limit"):
        inspect_calibration(q, max_bytes=100_000)


def test_calibration_is_inspected_in_a_limited_child(tmp_path):
    """A small compressed archive declaring ~400 MB of zeros: refused by the child's size cap,
    and with a larger cap loaded by the child, never by the caller."""
    import resource

    import numpy as np

    from latprune.service.inspect import inspect_calibration_isolated

    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, x=np.zeros((100, 4, 512, 512), np.float32))
    assert path.stat().st_size < 2 * 2**20
    with pytest.raises(InputError, match="over the limit"):
        inspect_calibration_isolated(path, max_bytes=64 * 2**20)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    summary = inspect_calibration_isolated(path, max_bytes=2**30)
    assert summary["samples"] == 100 and summary["layout"] == "NCHW float"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 100 * 1024  # KiB
