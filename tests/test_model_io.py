"""Loading and saving: external data, corrupt files, never touching the input."""
import hashlib
from pathlib import Path

import onnx
import pytest

import onnxprune
from onnxprune.errors import ModelLoadError, OutputError
from onnxprune.ir.graph_view import tensor_values
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
    w1 = next(t for t in reloaded.graph.initializer if t.name == "w1")
    assert w1.data_location == onnx.TensorProto.EXTERNAL  # loading leaves the weights on disk
    assert tensor_values(w1).shape == (16, 3, 3, 3)


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


# -- what is written is what was validated -------------------------------------------------------------

def run_in_new_process(path: Path) -> list:
    """Load `path` from disk in a fresh interpreter (as a user would) and run it; returns output shapes."""
    import json
    import subprocess
    import sys

    script = (
        "import json, sys, numpy as np, onnxruntime as ort\n"
        "s = ort.InferenceSession(sys.argv[1])\n"
        "feeds = {i.name: np.ones([d if isinstance(d, int) else 1 for d in i.shape], np.float32) "
        "for i in s.get_inputs()}\n"
        "print(json.dumps([list(o.shape) for o in s.run(None, feeds)]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def wide_cnn():
    """Weights large enough (>= 1 KiB after pruning) to go to an external data file."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2"),
    ]
    inits = [weight(64, 3, 3, 3, name="w1"), weight(64, name="b1"), weight(4, 64, 1, 1, name="w2")]
    return make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, 8, 8])], inits)


def test_per_tensor_external_data_prunes_to_one_data_file_named_after_the_output(tmp_path):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src = src_dir / "model.onnx"
    onnx.save(wide_cnn(), src, save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(src_dir.iterdir())) > 2  # one file per tensor
    out = tmp_path / "pruned.onnx"
    _, report = onnxprune.prune(src, out, ratio=0.5)
    header = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in header.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"pruned.onnx.data"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned.onnx", "pruned.onnx.data", "src"]
    assert run_in_new_process(out) == [[1, 4, 8, 8]]
    assert "onnxruntime run of the written file" in report.checks  # weights on disk: validated from the file
    assert report.after.file_size == out.stat().st_size + (tmp_path / "pruned.onnx.data").stat().st_size


def test_a_broken_write_is_caught_by_reading_it_back_and_leaves_nothing(tmp_path, monkeypatch):
    from onnxprune.errors import ValidationError
    from onnxprune.ir import model_io

    src = tmp_path / "in.onnx"
    onnx.save(wide_cnn(), src, save_as_external_data=True, location="in.onnx.data", size_threshold=0)
    real_write = model_io.write_model

    def write_then_lose_the_weights(model, path, **kwargs):
        real_write(model, path, **kwargs)
        Path(str(path) + ".data").write_bytes(b"")  # the data file ends up empty, as it once did

    monkeypatch.setattr(model_io, "write_model", write_then_lose_the_weights)
    with pytest.raises(ValidationError, match="out.onnx"):
        onnxprune.prune(src, tmp_path / "out.onnx", ratio=0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "in.onnx.data"]


def test_models_over_the_protobuf_limit_keep_their_weights_and_the_callers_model(tmp_path, monkeypatch):
    # the >2 GB code paths, on a small model: every "is it over the limit" check says yes
    from onnxprune.ir import model_io
    from onnxprune.runtime import session, validate

    for module in (model_io, session, validate):
        monkeypatch.setattr(module, "EXTERNAL_DATA_THRESHOLD", 1)
    model = wide_cnn()
    before = model.SerializeToString()
    out = tmp_path / "big.onnx"
    onnxprune.prune(model, out, ratio=0.5)
    assert model.SerializeToString() == before
    assert (tmp_path / "big.onnx.data").stat().st_size > 0
    assert run_in_new_process(out) == [[1, 4, 8, 8]]


def test_missing_output_folder_fails_before_the_weights_are_read(tmp_path, monkeypatch):
    src = tmp_path / "in.onnx"
    onnx.save(small_cnn(), src, save_as_external_data=True, location="in.onnx.data", size_threshold=0)
    read = []
    monkeypatch.setattr(onnx, "load_external_data_for_model", lambda *a, **k: read.append(a))
    with pytest.raises(OutputError, match="does not exist"):
        onnxprune.prune(src, tmp_path / "no" / "such" / "out.onnx", ratio=0.5)
    assert not read


def test_output_folder_without_room_is_refused(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    src = tmp_path / "in.onnx"
    onnx.save(small_cnn(), src)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10, 10, 0))
    with pytest.raises(OutputError, match="free"):
        onnxprune.prune(src, tmp_path / "out.onnx", ratio=0.5)


def test_an_interrupted_write_leaves_nothing_behind(tmp_path, monkeypatch):
    from onnxprune.ir import model_io

    def interrupted(model, path, **kwargs):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt  # what SIGINT, and SIGTERM in the CLI, raise

    monkeypatch.setattr(model_io, "write_model", interrupted)
    model, _ = load_model_from(small_cnn(), tmp_path)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.onnx"]


def test_a_decoder_with_one_file_per_tensor_prunes_heads_and_neurons_to_a_file_that_runs_in_a_new_process(
        tmp_path, monkeypatch):
    # the large-model path (over protobuf's limit) on a small LLaMA-style decoder with per-tensor data files
    from onnxprune.ir import model_io
    from onnxprune.runtime import session, validate
    from onnxprune.testing import LlamaShape, write_llama_decoder

    for module in (model_io, session, validate):
        monkeypatch.setattr(module, "EXTERNAL_DATA_THRESHOLD", 1)
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    shape = LlamaShape(vocab=256, hidden=64, layers=2, heads=8, kv_heads=2, intermediate=128)
    src = write_llama_decoder(src_dir / "llama.onnx", shape)
    out = tmp_path / "out" / "llama_pruned.onnx"
    out.parent.mkdir()
    _, report = onnxprune.prune(src, out, ratio={"kv-groups": 0.5, "neurons": 0.5}, round_to=1)
    assert sorted(p.name for p in out.parent.iterdir()) == ["llama_pruned.onnx", "llama_pruned.onnx.data"]
    assert report.after.params < 0.8 * report.before.params
    assert 0 < report.after.file_size < report.before.file_size
    import subprocess
    import sys

    script = ("import sys, numpy as np, onnxruntime as ort\n"
              "s = ort.InferenceSession(sys.argv[1])\n"
              "print(s.run(None, {'input_ids': np.arange(6, dtype=np.int64).reshape(1, 6)})[0].shape)\n")
    done = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "(1, 6, 256)"


def test_a_lossless_run_that_finds_nothing_does_not_grow_the_file(tmp_path):
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(small_cnn(), src)
    _, report = onnxprune.prune(src, out, lossless=True)
    assert out.stat().st_size <= src.stat().st_size
