"""Padded token positions (attention mask 0) never enter a statistic, a Gram matrix or a divergence:
the same samples padded further give the same numbers."""
import numpy as np
import pytest
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune.calibration.ablation import Divergence
from onnxprune.calibration.data import CalibrationSet
from onnxprune.calibration.features import consumers_of
from onnxprune.calibration.stats import GramRequest, collect_statistics

RNG = np.random.default_rng(7)
HIDDEN, OUT = 4, 3


def token_model() -> onnx.ModelProto:
    """y = (x @ W) * mask: a text-model-like graph with an attention mask input."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((HIDDEN, OUT)).astype(np.float32), "W")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"], name="proj"),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Unsqueeze", ["m", "axis"], ["m3"], name="unsq"),
        helper.make_node("Mul", ["xw", "m3"], ["y"], name="masked"),
    ]
    return masked_tokens(nodes, [w])


def masked_tokens(nodes, weights) -> onnx.ModelProto:
    """x [batch, seq, HIDDEN] and an int64 attention_mask [batch, seq] in, y [batch, seq, OUT] out."""
    graph = helper.make_graph(
        nodes, "tokens",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", OUT])],
        initializer=[*weights, numpy_helper.from_array(np.array([2], np.int64), "axis")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def samples(lengths, padded_to):
    """Each sample's real tokens are the same whatever the padding; padding holds large junk."""
    x = RNG.standard_normal((len(lengths), padded_to, HIDDEN)).astype(np.float32) * 50
    mask = np.zeros((len(lengths), padded_to), np.int64)
    real = np.random.default_rng(3).standard_normal((len(lengths), max(lengths), HIDDEN)).astype(np.float32)
    for i, n in enumerate(lengths):
        x[i, :n] = real[i, :n]
        mask[i, :n] = 1
    return {"x": x, "attention_mask": mask}


def statistics(data):
    model = token_model()
    consumer = consumers_of(model)["proj"]
    return collect_statistics(model, data, tensors=[("x", 2)], grams=[GramRequest(consumer, target="xw")],
                              per_sample=None, batch_size=2)


def test_channel_statistics_and_gram_matrices_ignore_padded_positions():
    lengths = [3, 5, 2, 4]
    short, long = statistics(samples(lengths, 5)), statistics(samples(lengths, 9))
    a, b = short.channels[("x", 2)], long.channels[("x", 2)]
    assert a.count == b.count == sum(lengths)
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-6)
    np.testing.assert_allclose(a.var, b.var, rtol=1e-5)
    ga, gb = short.grams["proj"], long.grams["proj"]
    assert ga.n == gb.n == sum(lengths)
    np.testing.assert_allclose(ga.xtx, gb.xtx, rtol=1e-5)
    np.testing.assert_allclose(ga.xty, gb.xty, rtol=1e-5)


def test_the_mask_input_is_found_by_name():
    calib = CalibrationSet.open(samples([2, 3], 4), token_model())
    assert calib.mask_input == "attention_mask"
    feeds, n = next(calib.batches(2))
    assert calib.real_positions(feeds, n).sum() == 5


def test_a_divergence_counts_real_positions_only():
    reference = RNG.standard_normal((2, 6, 3))
    valid = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], bool)
    changed = reference.copy()
    changed[~valid] += 100.0  # only padding moves
    loss = Divergence("y", [reference], "mse", [valid])
    assert loss.total(0, changed) == 0.0
    changed[0, 0] += 1.0
    assert loss.total(0, changed) > 0.0


def token_mlp() -> onnx.ModelProto:
    """y = (relu(x @ W1) @ W2) * mask: a prunable feed-forward block on tokens."""
    rng = np.random.default_rng(1)
    w1 = numpy_helper.from_array(rng.standard_normal((HIDDEN, 8)).astype(np.float32), "W1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, OUT)).astype(np.float32), "W2")
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="up"),
        helper.make_node("Relu", ["h"], ["a"], name="act"),
        helper.make_node("MatMul", ["a", "W2"], ["o"], name="down"),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Unsqueeze", ["m", "axis"], ["m3"], name="unsq"),
        helper.make_node("Mul", ["o", "m3"], ["y"], name="masked"),
    ]
    return masked_tokens(nodes, [w1, w2])


def test_a_least_squares_refit_is_the_same_whatever_the_padding():
    import onnxprune

    lengths = list(np.random.default_rng(5).integers(2, 6, size=40))
    weights = []
    for padded_to in (6, 11):
        pruned, report = onnxprune.prune(token_mlp(), ratio=0.25, round_to=1, calib=samples(lengths, padded_to),
                                         input_shapes={"x": [1, 6, HIDDEN], "attention_mask": [1, 6]},
                                         bias_correction=False, bn_recalibration=False)
        assert any("least_squares: applied" in n for n in report.notes)
        weights.append({t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer})
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        np.testing.assert_allclose(weights[0][name], weights[1][name], rtol=1e-4, atol=1e-5, err_msg=name)


def flattened_token_mlp(seq: int) -> onnx.ModelProto:
    """A fixed-batch export (MiniLM's esp32 build): tokens flattened into the rows of Gemms, and an additive
    float mask [1, 1, 1, seq] (0 for a token, -30 for padding) that the graph adds to its outputs."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal((8, HIDDEN)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "B1"),
             numpy_helper.from_array(rng.standard_normal((OUT, 8)).astype(np.float32), "W2"),
             numpy_helper.from_array(np.array([-1, HIDDEN], np.int64), "rows"),
             numpy_helper.from_array(np.array([1, seq, OUT], np.int64), "back"),
             numpy_helper.from_array(np.array([1, seq, 1], np.int64), "mask_shape")]
    nodes = [
        helper.make_node("Reshape", ["x", "rows"], ["tokens"], name="flatten"),
        helper.make_node("Gemm", ["tokens", "W1", "B1"], ["h"], name="up", transB=1),
        helper.make_node("Relu", ["h"], ["a"], name="act"),
        helper.make_node("Gemm", ["a", "W2"], ["o"], name="down", transB=1),
        helper.make_node("Reshape", ["o", "back"], ["o3"], name="unflatten"),
        helper.make_node("Reshape", ["attention_mask", "mask_shape"], ["m"], name="mask_rows"),
        helper.make_node("Add", ["o3", "m"], ["y"], name="masked"),
    ]
    graph = helper.make_graph(
        nodes, "flat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, HIDDEN]),
         helper.make_tensor_value_info("attention_mask", TensorProto.FLOAT, [1, 1, 1, seq])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, OUT])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def additive(data):
    return {"x": data["x"], "attention_mask": np.where(data["attention_mask"] > 0, 0.0, -30.0)
            .astype(np.float32)[:, None, None, :]}


def test_an_additive_mask_marks_padding_too():
    calib = CalibrationSet.open(additive(samples([2, 4, 3], 4)), flattened_token_mlp(4))
    assert calib.mask_input == "attention_mask"
    found = [calib.real_positions(feeds, n) for feeds, n in calib.batches(2)]  # batches of 1: a fixed batch
    assert found[1] is None  # nothing padded: all of it counts
    assert found[0].sum() + found[2].sum() == 5


def test_gemms_on_flattened_tokens_of_a_fixed_batch_are_refit_and_padding_is_left_out():
    """One sample is `seq` rows of each Gemm: the refit reads every real row, whatever the padding."""
    import onnxprune

    lengths = list(np.random.default_rng(5).integers(2, 6, size=40))
    weights = []
    for padded_to in (6, 11):
        pruned, report = onnxprune.prune(flattened_token_mlp(padded_to), ratio=0.25, round_to=1,
                                         calib=additive(samples(lengths, padded_to)),
                                         bias_correction=False, bn_recalibration=False)
        assert any("least_squares: applied" in n for n in report.notes)
        weights.append({t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer})
    for name in ("W1", "B1", "W2"):
        found = [next(v for k, v in w.items() if k.startswith(name)) for w in weights]
        np.testing.assert_allclose(found[0], found[1], rtol=1e-4, atol=1e-5, err_msg=name)


def test_a_named_mask_input_must_exist():
    import pytest

    import onnxprune
    from onnxprune.errors import DataError

    with pytest.raises(DataError, match="--mask-input 'mask' is not an input of the model"):
        onnxprune.prune(flattened_token_mlp(4), ratio=0.25, round_to=1, calib=additive(samples([2, 3], 4)),
                        mask_input="mask")


def test_the_pooled_output_error_reads_the_mean_over_real_positions_only():
    from onnxprune.passes.reconstruct import _add_pooled

    reference = RNG.standard_normal((2, 6, 3))
    valid = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], bool)
    changed = reference.copy()
    changed[~valid] += 100.0  # only padding moves
    sums = [0.0, 0.0]
    _add_pooled(sums, reference, changed, valid)
    assert sums[0] == 0.0 and sums[1] > 0.0
    changed[0, 0] += 1.0
    changed[0, 1] -= 1.0  # errors that cancel in the mean: per-position error, no pooled error
    sums = [0.0, 0.0]
    _add_pooled(sums, reference, changed, valid)
    assert sums[0] == pytest.approx(0.0, abs=1e-20)
    changed[1, 0] += 1.0  # one of the 5 real positions of sample 1, every feature
    _add_pooled(sums, reference, changed, valid)
    assert sums[0] == pytest.approx(3 * (1.0 / 5) ** 2, abs=1e-12)  # 1/5 off on each of 3 features


def test_a_declared_class_axis_makes_the_repair_keep_top1_agreement_per_position():
    import onnxprune
    from onnxprune.passes.reconstruct import _class_axis_of

    logits = np.zeros((20, 4, 37), np.float32)  # CTC logits: [steps, batch, classes]
    assert _class_axis_of(None, logits) is None and _class_axis_of(2, logits) == 2
    assert _class_axis_of(None, np.zeros((4, 10), np.float32)) == 1
    data = samples([6, 3, 5, 6, 2, 4, 6, 6, 5, 3], padded_to=6)
    details = {}
    for axis in (None, 2):
        _, report = onnxprune.prune(token_mlp(), ratio=0.5, calib=data, class_axis=axis, round_to=1)
        details[axis] = next(p for p in report.passes if p["name"] == "reconstruction")["details"]
    assert details[None]["agreement_after"] is None
    assert 0.0 <= details[2]["agreement_before"] <= details[2]["agreement_after"] <= 1.0
