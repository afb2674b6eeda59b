"""Sizes for dynamic inputs: never validate at a size the dense model cannot run, and say what was assumed."""
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxprune
from onnxprune.cli import main
from onnxprune.errors import UnsupportedModelError
from onnxprune.runtime.inputs import plan_input_shapes
from helpers import const, conv, make_model, weight


def detector_like(metadata: dict | None = None) -> onnx.ModelProto:
    """A two-scale head: the /64 map is upsampled and added to the /32 map, so the
    model runs only where H and W are multiples of 64-ish (320 works, 16 and 224 do not)."""
    nodes = [
        helper.make_node("Conv", ["images", "w1"], ["c1"], pads=[1, 1, 1, 1], name="stem"),
        helper.make_node("Relu", ["c1"], ["r1"], name="act"),
        helper.make_node("MaxPool", ["r1"], ["p32"], kernel_shape=[32, 32], strides=[32, 32], name="down32"),
        helper.make_node("MaxPool", ["r1"], ["p64"], kernel_shape=[64, 64], strides=[64, 64], name="down64"),
        helper.make_node("Resize", ["p64", "", "scales"], ["up"], mode="nearest", name="up2"),
        helper.make_node("Add", ["up", "p32"], ["fused"], name="fuse"),
        helper.make_node("Conv", ["fused", "w2"], ["maps"], name="head"),
    ]
    inits = [weight(16, 3, 3, 3, name="w1"), weight(4, 16, 1, 1, name="w2"),
             const([1.0, 1.0, 2.0, 2.0], "scales", np.float32)]
    model = make_model(nodes, [("images", ["batch", 3, "height", "width"])], [("maps", ["batch", 4, None, None])],
                       inits)
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    return model


def test_a_size_the_dense_model_runs_at_is_searched_and_named(tmp_path):
    _, report = onnxprune.prune(detector_like(), tmp_path / "out.onnx", ratio=0.5)
    note = next(n for n in report.notes if n.startswith("input shapes assumed"))
    assert "1x3x320x320" in note and "failed at images 1x3x224x224" in note and "--input-shape" in note


def test_the_training_size_in_metadata_comes_first():
    plan = plan_input_shapes(detector_like({"imgsz": "[640, 640]"}))
    assert plan.shapes == {"images": [1, 3, 640, 640]}
    assert "imgsz metadata" in plan.note()


def test_analyze_says_which_shapes_its_flops_are_counted_at(tmp_path, capsys):
    path = tmp_path / "det.onnx"
    onnx.save(detector_like(), path)
    assert main(["analyze", str(path)]) == 0
    out = capsys.readouterr().out
    assert "input shapes assumed" in out and "images 1x3x224x224" in out


def test_a_model_that_runs_at_no_size_tried_gets_one_paragraph_naming_input_shape():
    nodes = [helper.make_node("Reshape", ["images", "fixed"], ["r"], name="needs_100x100"),
             helper.make_node("Conv", ["r", "w1"], ["c"], name="conv1"),
             helper.make_node("Relu", ["c"], ["a"], name="act"),
             helper.make_node("Conv", ["a", "w2"], ["y"], name="conv2")]
    model = make_model(nodes, [("images", [1, 3, "h", "w"])], [("y", [1, 8, 100, 100])],
                       [const([1, 3, 100, 100], "fixed"), weight(16, 3, 1, 1, name="w1"),
                        weight(8, 16, 1, 1, name="w2")])
    with pytest.raises(UnsupportedModelError) as caught:
        onnxprune.prune(model, ratio=0.5)
    message = str(caught.value)
    assert "dense model itself does not run" in message and "--input-shape images:" in message
    assert len(message.splitlines()) < 12  # a paragraph, not a shape-inference dump


def test_a_given_shape_is_used_as_is_and_not_reported_as_assumed():
    _, report = onnxprune.prune(detector_like(), ratio=0.5, input_shapes={"images": [1, 3, 640, 640]})
    assert not any(n.startswith("input shapes assumed") for n in report.notes)


def test_an_output_declared_with_minus_one_is_dynamic_for_every_comparison():
    # paddle2onnx declares dynamic dims as -1: "(-1, 2) -> (1, 2)" must not block even --lossless
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1, name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1, name="fc2")]
    w1 = weight(8, 4, name="w1")
    dead = onnx.numpy_helper.to_array(w1).copy()
    dead[[1, 5]] = 0.0  # two dead neurons for lossless elimination to remove
    model = make_model(nodes, [("x", [-1, 4])], [("y", [-1, 2])],
                       [onnx.numpy_helper.from_array(dead, "w1"), weight(2, 8, name="w2")])
    pruned, report = onnxprune.prune(model, lossless=True)
    assert "output shapes unchanged" in report.checks
    assert report.after.params < report.before.params


def test_an_output_whose_length_depends_on_the_data_is_not_compared():
    # like a TTS model whose audio length follows predicted durations: pruning may change it
    (c1, w1), (c2, w2) = conv("c1", "x", "a", 3, 16), conv("c2", "r", "y", 16, 4)
    nodes = [c1, helper.make_node("Relu", ["a"], ["r"], name="act"), c2,
             helper.make_node("Greater", ["y", "zero"], ["positive"], name="gt"),
             helper.make_node("NonZero", ["positive"], ["where"], name="nonzero")]
    graph = helper.make_graph(nodes, "data_dependent", [helper.make_tensor_value_info("x", 1, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("where", onnx.TensorProto.INT64, [4, None])],
                              w1 + w2 + [const(0.0, "zero", np.float32)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _, report = onnxprune.prune(model, ratio=0.5)
    assert "output shapes unchanged" in report.checks


def cache_inputs(mask_dim: str) -> onnx.ModelProto:
    """The inputs a decoder with a key-value cache declares (only the shapes matter here)."""
    graph = helper.make_graph([], "decoder", [
        helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, ["batch", mask_dim]),
        helper.make_tensor_value_info("past_key_values.0.key", onnx.TensorProto.FLOAT, ["batch", 2, "past", 8]),
    ], [])
    return helper.make_model(graph)


def test_a_key_value_cache_starts_empty_and_a_dim_named_by_arithmetic_follows_the_dims_it_names():
    """The first generation step (past length 0), not an image: the attention mask then covers the
    new tokens only, whether it is its own symbol or written as 'past + sequence' (dynamo)."""
    for mask_dim in ("total", "past + sequence"):
        planned = plan_input_shapes(cache_inputs(mask_dim))
        assert planned.shapes == {"input_ids": [1, 128], "attention_mask": [1, 128],
                                  "past_key_values.0.key": [1, 2, 0, 8]}
    assert "past=0 (past length: an empty key-value cache" in plan_input_shapes(cache_inputs("total")).note()


def test_the_kv_decoders_run_at_their_planned_sizes_without_input_shape():
    folder = Path(__file__).resolve().parent.parent / "models" / "conformance"
    for name in ("qwen2_kv_legacy", "qwen2_kv_dynamo"):  # dynamo: input_ids (batch, 1), mask (batch, past + 1)
        _, report = onnxprune.prune(folder / f"{name}.onnx", lossless=True)
        assert "outputs equal the dense model" in report.checks


def test_the_dense_model_is_run_at_its_planned_sizes_only_when_the_pruned_model_fails_there(tmp_path, monkeypatch):
    import onnxprune.runtime.inputs as inputs

    probes = []
    real = inputs.probe_dense
    monkeypatch.setattr(inputs, "probe_dense", lambda *a, **k: probes.append(1) or real(*a, **k))
    _, report = onnxprune.prune(detector_like(), ratio=0.5, input_shapes={"images": [1, 3, 320, 320]})
    assert probes == []  # validation ran the pruned model there: that was the check
    onnxprune.prune(detector_like(), ratio=0.5)  # 224 fails: the dense model is probed, prune starts again
    assert probes == [1]


def test_a_failure_before_validation_at_a_size_the_dense_model_cannot_take_starts_again_at_one_it_can():
    # a 200-tap filter over audio: the planned 128 samples are too short, so the cost or the plan fails
    # before any validation run; the dense model is probed, and prune starts again at 512 samples
    nodes = [helper.make_node("Conv", ["audio", "taps"], ["bands"], name="filterbank"),
             helper.make_node("Relu", ["bands"], ["r"], name="act"),
             helper.make_node("Conv", ["r", "mix"], ["y"], name="mix")]
    model = make_model(nodes, [("audio", [1, 1, "samples"])], [("y", [1, 4, None])],
                       [weight(16, 1, 200, name="taps"), weight(4, 16, 1, name="mix")])
    _, report = onnxprune.prune(model, ratio=0.5)
    note = next(n for n in report.notes if n.startswith("input shapes assumed"))
    assert "audio 1x1x512" in note and "failed at audio 1x1x128" in note
    assert report.after.params < report.before.params


def test_random_validation_inputs_give_an_attention_mask_of_ones_and_other_integers_their_usual_draw():
    from onnxprune.runtime.inputs import random_inputs

    graph = helper.make_graph(
        [helper.make_node("Identity", ["input_ids"], ["y"])], "tokens",
        [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, [2, 16]),
         helper.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, [2, 16]),
         helper.make_tensor_value_info("token_type_ids", onnx.TensorProto.INT64, [2, 16])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.INT64, [2, 16])])
    model = helper.make_model(graph)
    shapes = {i.name: [2, 16] for i in graph.input}
    feeds = random_inputs(model, shapes, seed=0)
    assert (feeds["attention_mask"] == 1).all()
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, 2, (2, 16)) for _ in range(3)]
    assert np.array_equal(feeds["input_ids"], draws[0]) and np.array_equal(feeds["token_type_ids"], draws[2])
