"""Loading and saving: external data, corrupt files, never touching the input."""
import hashlib
from pathlib import Path

import onnx
import pytest

import onnxprune
from onnxprune.errors import ModelLoadError, OutputError
from onnxprune.ir.model_io import load_model, save_model
from helpers import make_model, weight
from onnx import helper


def small_cnn():
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2"),
    ]
    inits = [weight(16, 3, 3, 3, name="w1"), weight(16, name="b1"), weight(4, 16, 1, 1, name="w2")]
    return make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, 8, 8])], inits)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_input_file_is_never_modified(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(small_cnn(), src)
    before = digest(src)
    onnxprune.prune(src, tmp_path / "out.onnx", ratio=0.5)
    assert digest(src) == before


def test_refuses_to_write_over_the_input(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(small_cnn(), src)
    with pytest.raises(OutputError, match="overwrite the input"):
        onnxprune.prune(src, src, ratio=0.5)


def test_model_proto_given_by_the_caller_is_not_modified():
    model = small_cnn()
    before = model.SerializeToString()
    onnxprune.prune(model, ratio=0.5)
    assert model.SerializeToString() == before


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_files_get_a_clear_error_naming_the_file(tmp_path, damage):
    path = tmp_path / "bad.onnx"
    data = small_cnn().SerializeToString()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00\xffnot onnx" * 10, "empty": b""}[damage])
    with pytest.raises(ModelLoadError, match="bad.onnx"):
        load_model(path)


def test_missing_file_says_so(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "nope.onnx")


def test_missing_external_data_is_reported(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(small_cnn(), path, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(ModelLoadError, match="external data"):
        load_model(path)


def test_external_data_round_trip_keeps_int_tensors_inline(tmp_path):
    model, source = load_model_from(small_cnn(), tmp_path)
    out = tmp_path / "saved.onnx"
    save_model(model, out, external_data=True)
    header = onnx.load(str(out), load_external_data=False)
    external = {t.name for t in header.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert "w1" in external
    reloaded, info = load_model(out)
    assert info.used_external_data
    assert onnx.numpy_helper.to_array(next(t for t in reloaded.graph.initializer if t.name == "w1")).shape == (16, 3, 3, 3)


def load_model_from(model, tmp_path):
    path = tmp_path / "src.onnx"
    onnx.save(model, path)
    return load_model(path)


def test_failed_write_leaves_no_partial_file(tmp_path):
    model, _ = load_model_from(small_cnn(), tmp_path)
    with pytest.raises(OutputError):
        save_model(model, tmp_path / "missing_dir" / "out.onnx")
    assert not list(tmp_path.glob(".*tmp*"))


def test_constant_nodes_become_initializers_and_prune_like_weights():
    model = small_cnn()
    w1 = next(t for t in model.graph.initializer if t.name == "w1")
    model.graph.node.insert(0, helper.make_node("Constant", [], ["w1"], value=w1))
    model.graph.initializer.remove(w1)
    _, report = onnxprune.prune(model, ratio=0.5)
    assert report.after.params < report.before.params


def test_file_size_counts_the_external_data_file():
    path = Path(__file__).resolve().parent.parent / "models" / "fixtures" / "transformers" / "bert_encoder_dynamo.onnx"
    _, info = load_model(path)
    assert info.file_size == path.stat().st_size + Path(str(path) + ".data").stat().st_size
