"""Distillation toward the dense model (`sparsify --distill`): the PyTorch view of an ONNX graph computes what
onnxruntime computes, fitting lowers the held-out error without touching a zero, and what cannot help or
cannot run says so."""
import importlib
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from helpers import feeds_for, make_model, run
from onnxprune.errors import UnsupportedModelError, UsageError
from onnxprune.sparsity import sparsify

torch = pytest.importorskip("torch")
from onnxprune.autodiff.distill import distill, trainable_tensors  # noqa: E402
from onnxprune.autodiff.torch_graph import TorchGraph  # noqa: E402
from onnxprune.calibration.data import CalibrationSet  # noqa: E402

MODELS = Path(__file__).resolve().parent.parent / "models"
CONFORMANCE = MODELS / "conformance"


@pytest.mark.parametrize("path", [
    MODELS / "digits_resnet.onnx",
    MODELS / "fixtures" / "inception_legacy.onnx",  # concat of branches, max and average pools
    CONFORMANCE / "bert_legacy.onnx",  # Flatten at axis = rank, GatherElements, masks from comparisons
    CONFORMANCE / "bert_dynamo.onnx",  # GatherND, IsNaN
    CONFORMANCE / "efficientnet_legacy.onnx",  # Conv auto_pad SAME, Pad, a Slice that steps backwards
    CONFORMANCE / "swin_legacy.onnx",  # Mod, windows by Reshape/Transpose/Pad
    CONFORMANCE / "gpt2_legacy.onnx",  # causal mask by LessOrEqual, Where
    MODELS / "fixtures" / "transformers" / "llama_decoder_legacy.onnx",  # causal mask by Trilu
], ids=lambda p: p.stem)
def test_the_torch_graph_computes_what_onnxruntime_computes(path):
    model = onnx.load(str(path))
    feeds = feeds_for(model)
    expected = run(model, feeds)
    with torch.no_grad():
        got = TorchGraph(model)(feeds, [o.name for o in model.graph.output])
    for name, want, value in zip(got, expected, got.values()):
        value = value.double().numpy()
        assert value.shape == want.shape, name
        scale = max(float(np.abs(want).max()), 1e-6)
        assert np.abs(value - want).max() <= 1e-5 * scale, name


def test_an_op_without_a_rule_is_refused_by_node_name_before_anything_runs():
    model = make_model([helper.make_node("Resize", ["x", "", "scales"], ["y"], name="upsample", mode="nearest")],
                       [("x", [1, 1, 2, 2])], [("y", [1, 1, 4, 4])],
                       [onnx.numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")])
    with pytest.raises(UnsupportedModelError, match=r"upsample \(Resize\)"):
        TorchGraph(model)


def test_a_node_pytorch_cannot_run_is_named_in_the_error():
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mismatched")], [("x", [2, 3])],
                       [("y", [2, 4])], [onnx.numpy_helper.from_array(np.ones((5, 4), np.float32), "w")])
    with pytest.raises(UnsupportedModelError, match=r"'mismatched' \(MatMul\) fails"):
        TorchGraph(model)({"x": np.ones((2, 3), np.float32)}, ["y"])


def test_gradients_reach_the_trainable_initializers_under_their_own_names():
    # (its own weight, not helpers.weight: the random weights of later test files depend on that shared RNG)
    w = onnx.numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "w")
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", [2, 3])], [("y", [2, 4])], [w])
    graph = TorchGraph(model, ["w"])
    graph({"x": np.ones((2, 3), np.float32)}, ["y"])["y"].sum().backward()
    assert set(graph.parameters) == {"w"}
    np.testing.assert_allclose(graph.parameters["w"].grad.numpy(), np.full((3, 4), 2.0))


def test_distillation_lowers_the_held_out_error_and_keeps_every_zero(tmp_path):
    out = tmp_path / "sparse.onnx"
    solved, plain = sparsify(MODELS / "digits_resnet.onnx", None, pattern="2:4", calib=MODELS / "digits_calib.npz",
                        calib_samples=128, progress=False)
    _, report = sparsify(MODELS / "digits_resnet.onnx", out, pattern="2:4", calib=MODELS / "digits_calib.npz",
                         calib_samples=128, distill=3, progress=False)
    d = report.distillation
    assert d.kept and d.held_out_after < d.held_out_before
    assert "distilled" in report.mode and "held-out output error" in report.summary()
    before = {t.name: onnx.numpy_helper.to_array(t) for t in solved.graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    for layer in report.sparsified:  # exactly the zeros SparseGPT made (its 2:4 blocks), values moved
        np.testing.assert_array_equal(after[layer.weight] == 0, before[layer.weight] == 0)
    assert any(not np.array_equal(after[r.weight], before[r.weight]) for r in report.sparsified)
    assert report.to_dict()["distillation"]["best_epoch"] == d.best_epoch


def test_nothing_changes_when_no_epoch_beats_the_start():
    model = onnx.load(str(MODELS / "digits_resnet.onnx"))
    calib = CalibrationSet.open(MODELS / "digits_calib.npz", model, max_samples=20)
    trainable = trainable_tensors(model, {}, [t.name for t in model.graph.initializer if len(t.dims) == 1])
    fitted, result = distill(model, model, calib, trainable, epochs=2)  # the student is the teacher already
    assert fitted == {} and not result.kept and result.held_out_before < 1e-10  # float noise only
    assert "no epoch lowered it" in result.describe()


def test_distillation_without_calibration_data_is_a_usage_error():
    with pytest.raises(UsageError, match="--calib"):
        sparsify(MODELS / "digits_resnet.onnx", None, pattern="2:4", distill=2, progress=False)


def test_without_pytorch_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    monkeypatch.delitem(sys.modules, "onnxprune.autodiff.torch_graph")
    with pytest.raises(UsageError, match=r"onnxprune\[distill\]"):
        importlib.import_module("onnxprune.autodiff.torch_graph")
