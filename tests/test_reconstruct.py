"""Reconstruction passes: least squares, bias compensation, BN recalibration, the held-out guard,
and the bundled digits model pruned to half its FLOPs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import make_model
from onnx import helper, numpy_helper

from onnxprune.calibration import CalibrationSet
from onnxprune.passes.reconstruction import reconstruct
from onnxprune.cost import model_cost
from onnxprune.importance import score_groups
from onnxprune.passes import least_squares, reconstruct as passes
from onnxprune.passes.apply_plan import ApplyPlan
from onnxprune.pipeline import build_analysis, prepare
from onnxprune.runtime.evaluate import evaluate
from onnxprune.runtime.inputs import concrete_input_shapes
from onnxprune.runtime.session import make_session
from onnxprune.strategy.allocate import Target, allocate
from onnxprune.strategy.estimate import CostEstimator

MODELS = Path(__file__).resolve().parent.parent / "models"


def arr(value, name):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def outputs(model, feeds):
    return make_session(model).run(None, feeds)


def rel_error(model, dense, feeds) -> float:
    got, want = outputs(model, feeds)[0], outputs(dense, feeds)[0]
    return float(np.square(got - want).sum() / np.square(want).sum())


def remove_units(analysis, group_name, indices) -> set[int]:
    return {int(r) for r in analysis.group(group_name).roots[list(indices)]}


# -- least squares ---------------------------------------------------------------------------------
def two_conv_model():
    """Conv(3->8) -> Relu -> Conv(8->4): conv1's filters come in near-duplicate families, so the
    channels pruned from conv2's input are largely predictable from the kept ones."""
    rng = np.random.default_rng(7)
    base = rng.standard_normal((3, 3, 3, 3))
    w1 = np.stack([base[i % 3] * (1 + 0.2 * i) + 0.1 * rng.standard_normal((3, 3, 3)) for i in range(8)])
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    inits = [arr(w1, "w1"), arr(0.1 * rng.standard_normal(8), "b1"),
             arr(0.5 * rng.standard_normal((4, 8, 3, 3)), "w2"),
             arr(0.5 * rng.standard_normal(4), "b2")]
    return make_model(nodes, [("x", ["N", 3, 10, 10])], [("y", ["N", 4, 10, 10])], inits), "conv1", [1, 3, 4, 6]


def mlp_model():
    """MatMul(8->16) + Add -> Relu -> MatMul(16->5) (no bias: the refit adds one) -> Gemm(5->3, transB)."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
             helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="mm2"),
             helper.make_node("Relu", ["m2"], ["r2"], name="relu2"),
             helper.make_node("Gemm", ["r2", "w3", "b3"], ["y"], name="fc", transB=1)]
    inits = [arr(rng.standard_normal((8, 16)), "w1"), arr(rng.standard_normal(16), "b1"),
             arr(rng.standard_normal((16, 5)), "w2"), arr(rng.standard_normal((3, 5)), "w3"),
             arr(rng.standard_normal(3), "b3")]
    return make_model(nodes, [("x", ["N", 8])], [("y", ["N", 3])], inits), "mm1", list(range(0, 16, 2))


def depthwise_model():
    """Conv(3->8) -> Relu -> Conv 1x1 (8->8) -> Relu -> depthwise 3x3 (group 8) -> Relu -> Conv 1x1 (8->4),
    the MobileNet pattern; pruning the first conv changes every later input, the depthwise one's too."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal((3, 3, 3, 3))
    w0 = np.stack([base[i % 3] * (1 + 0.2 * i) + 0.1 * rng.standard_normal((3, 3, 3)) for i in range(8)])
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "wd", "bd"], ["cd"], name="dw", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["cd"], ["rd"], name="relud"),
             helper.make_node("Conv", ["rd", "w2", "b2"], ["y"], name="conv2")]
    inits = [arr(w0, "w0"), arr(0.1 * rng.standard_normal(8), "b0"),
             arr(0.5 * rng.standard_normal((8, 8, 1, 1)), "w1"), arr(0.1 * rng.standard_normal(8), "b1"),
             arr(0.5 * rng.standard_normal((8, 1, 3, 3)), "wd"), arr(0.1 * rng.standard_normal(8), "bd"),
             arr(0.5 * rng.standard_normal((4, 8, 1, 1)), "w2"), arr(0.1 * rng.standard_normal(4), "b2")]
    return make_model(nodes, [("x", ["N", 3, 10, 10])], [("y", ["N", 4, 10, 10])], inits), "conv0", [1, 3, 4, 6]


@pytest.mark.parametrize("build, memory_cap", [(two_conv_model, 1 << 30), (two_conv_model, 20_000),
                                               (mlp_model, 1 << 30), (depthwise_model, 1 << 30)])
def test_least_squares_brings_the_pruned_model_back_to_the_dense_outputs(build, memory_cap):
    """memory_cap=20 kB: the dense targets no longer fit in the cache and batches shrink; each level
    then reads its targets from a dense pass of its own (same result up to the sampled positions)."""
    model, group, indices = build()
    dense, _ = prepare(model)
    analysis = build_analysis(dense)
    removed = remove_units(analysis, group, indices)
    pruned = ApplyPlan(analysis, removed)(dense).model
    shape = [d.dim_value or 1 for d in dense.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(0)
    calib = {"x": rng.standard_normal([120] + shape[1:]).astype(np.float32)}
    test = {"x": rng.standard_normal([40] + shape[1:]).astype(np.float32)}
    repaired, report = reconstruct(dense, pruned, analysis, removed, calib, bias_correction=False,
                                   bn_recalibration=False, memory_cap=memory_cap)
    onnx.checker.check_model(repaired, full_check=True)
    before, after = rel_error(pruned, dense, test), rel_error(repaired, dense, test)
    assert report.passes[0].name == "least_squares" and report.passes[0].details["verdict"] == "kept"
    assert after < 0.25 * before, (before, after)
    assert report.fidelity_after < report.fidelity_before
    [least_squares] = report.passes[0].children
    refit = [l["node"] for l in least_squares.details["layers"] if l["action"] == "refit"]
    assert refit  # the consumers downstream of the pruned group were refit
    assert len(pruned.graph.initializer) == len(ApplyPlan(analysis, removed)(dense).model.graph.initializer)


def test_a_depthwise_conv_is_refit_channel_by_channel():
    model, group, indices = depthwise_model()
    dense, _ = prepare(model)
    analysis = build_analysis(dense)
    removed = remove_units(analysis, group, indices)
    pruned = ApplyPlan(analysis, removed)(dense).model
    rng = np.random.default_rng(1)
    data = CalibrationSet.open({"x": rng.standard_normal((60, 3, 10, 10)).astype(np.float32)}, dense)
    fit, held = data.split(0.25, 0)
    ctx = passes.ReconstructionContext(dense, analysis.keep_masks(removed), fit, held, batch_size=16)
    result = least_squares.LeastSquaresRefit(ctx, nodes=["dw"])(pruned)
    repaired, [layer] = result.model, result.record.details["layers"]
    assert layer["action"] == "refit" and layer["features"] == 9  # one 3x3 tap set (+ bias) per channel
    assert layer["error_after"] < 0.8 * layer["error_before"]
    test = {"x": rng.standard_normal((20, 3, 10, 10)).astype(np.float32)}
    assert rel_error(repaired, dense, test) < rel_error(pruned, dense, test)
    weights = {t.name: numpy_helper.to_array(t) for t in repaired.graph.initializer}
    dw = next(n for n in repaired.graph.node if n.name == "dw")
    assert weights[dw.input[1]].shape == (8, 1, 3, 3)


# -- bias compensation ----------------------------------------------------------------------------
def constant_units_model(kind: str):
    """producer -> Relu -> consumer, where units 1 (dead: always 0) and 4 (always 2) of the producer
    are constant; the consumer has no bias (compensation must create one)."""
    rng = np.random.default_rng(5)
    w1 = rng.standard_normal((4, 6))
    b1 = rng.standard_normal(6)
    w1[:, 1], b1[1] = 0.0, -1.0
    w1[:, 4], b1[4] = 0.0, 2.0
    w2 = rng.standard_normal((6, 3))
    if kind == "conv":
        nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="p"),
                 helper.make_node("Relu", ["h"], ["r"], name="relu"),
                 helper.make_node("Conv", ["r", "w2"], ["y"], name="c")]
        inits = [arr(w1.T[:, :, None, None], "w1"), arr(b1, "b1"), arr(w2.T[:, :, None, None], "w2")]
        return make_model(nodes, [("x", ["N", 4, 5, 5])], [("y", ["N", 3, 5, 5])], inits)
    producer = helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="p")
    consumer = (helper.make_node("Gemm", ["r", "w2"], ["y"], name="c") if kind == "gemm"
                else helper.make_node("MatMul", ["r", "w2"], ["y"], name="c"))
    nodes = [producer, helper.make_node("Relu", ["h"], ["r"], name="relu"), consumer]
    inits = [arr(w1, "w1"), arr(b1, "b1"), arr(w2, "w2")]
    return make_model(nodes, [("x", ["N", 4])], [("y", ["N", 3])], inits)


@pytest.mark.parametrize("kind", ["gemm", "matmul", "conv"])
def test_bias_compensation_is_exact_for_constant_removed_inputs(kind):
    dense, _ = prepare(constant_units_model(kind))
    analysis = build_analysis(dense)
    removed = remove_units(analysis, "p", [1, 4])
    pruned = ApplyPlan(analysis, removed)(dense).model
    shape = [d.dim_value or 1 for d in dense.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(0)
    calib = {"x": rng.standard_normal([30] + shape[1:]).astype(np.float32)}
    test = {"x": rng.standard_normal([10] + shape[1:]).astype(np.float32)}
    assert rel_error(pruned, dense, test) > 1e-2  # unit 4 carried a constant 2 into every output
    repaired, report = reconstruct(dense, pruned, analysis, removed, calib, least_squares=False,
                                   bn_recalibration=False)
    onnx.checker.check_model(repaired, full_check=True)
    [bias_pass] = report.passes
    assert bias_pass.name == "bias_compensation" and bias_pass.details["verdict"] == "kept"
    np.testing.assert_allclose(outputs(repaired, test)[0], outputs(dense, test)[0], rtol=1e-5, atol=1e-5)


# -- BatchNorm recalibration -------------------------------------------------------------------------
def bn_model(mean=-3.0, var=9.0):
    """Conv(3->6) -> Relu -> Conv(6->4) -> BN(4) with running stats (mean, var) -> Relu -> pool -> Flatten.

    The running statistics are deliberately not those of the data: the dense model is the reference,
    so re-estimating them moves the outputs away from it."""
    rng = np.random.default_rng(11)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c2", "g", "beta", "mu", "var"], ["n2"], name="bn"),
             helper.make_node("Relu", ["n2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["y"], name="flat")]
    inits = [arr(0.3 * rng.standard_normal((6, 3, 3, 3)), "w1"), arr(0.1 * rng.standard_normal(6), "b1"),
             arr(0.3 * rng.standard_normal((4, 6, 3, 3)), "w2"), arr(0.1 * rng.standard_normal(4), "b2"),
             arr(np.ones(4), "g"), arr(np.zeros(4), "beta"), arr(np.full(4, mean), "mu"),
             arr(np.full(4, var), "var")]
    return make_model(nodes, [("x", ["N", 3, 8, 8])], [("y", ["N", 4])], inits)


def bn_setup():
    dense, _ = prepare(bn_model())
    analysis = build_analysis(dense)
    removed = remove_units(analysis, "conv1", [0, 5])
    pruned = ApplyPlan(analysis, removed)(dense).model
    calib = {"x": np.random.default_rng(2).standard_normal((40, 3, 8, 8)).astype(np.float32)}
    return dense, analysis, removed, pruned, calib


def test_bn_recalibration_recovers_the_statistics():
    dense, analysis, removed, pruned, calib = bn_setup()
    data = CalibrationSet.open(calib, dense)
    empty = CalibrationSet(data.dataset, data.specs, np.arange(0))
    ctx = passes.ReconstructionContext(dense, analysis.keep_masks(removed), data, empty, batch_size=16)
    result = passes.BnRecalibration(ctx)(pruned)
    recalibrated, layers = result.model, result.record.details["layers"]
    assert [l["node"] for l in layers] == ["bn"] and layers[0]["action"] == "recalibrated"
    c2 = make_session(_with_output(pruned, "c2")).run(["c2"], calib)[0].astype(np.float64)
    inits = {t.name: numpy_helper.to_array(t) for t in recalibrated.graph.initializer}
    bn = next(n for n in recalibrated.graph.node if n.name == "bn")
    np.testing.assert_allclose(inits[bn.input[3]], c2.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(inits[bn.input[4]], c2.var(axis=(0, 2, 3)), rtol=1e-4)
    assert numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == "mu"))[0] == -3.0
    # after a least-squares refit of conv2 its outputs match the dense ones: the BN's statistics stay
    untouched = passes.BnRecalibration(ctx, skip={"conv2"})(pruned)
    assert untouched.record.details["layers"] == [] and untouched.model is pruned and not untouched.modified


def _with_output(model, name):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.append(onnx.ValueInfoProto(name=name))
    return out


def test_guard_rejects_a_pass_that_worsens_held_out_fidelity():
    """The dense model's BN statistics are deliberately off; recalibrating moves the pruned model
    away from the dense outputs, so the guard must undo it."""
    dense, analysis, removed, pruned, calib = bn_setup()
    repaired, report = reconstruct(dense, pruned, analysis, removed, calib, least_squares=False,
                                   bias_correction=False)
    bn_pass, matching = report.passes
    assert matching.name == "output_matching" and matching.details["verdict"] == "nothing to do"  # conv2 feeds the BN
    assert bn_pass.name == "bn_recalibration" and bn_pass.details["verdict"] == "undone" and not bn_pass.modified
    assert bn_pass.details["fidelity_after"] > bn_pass.details["fidelity_before"]
    assert "kept the model before it" in bn_pass.summary and "bn_recalibration: rejected" in report.summary()
    assert report.fidelity_after == report.fidelity_before
    test = {"x": np.random.default_rng(9).standard_normal((8, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_array_equal(outputs(repaired, test)[0], outputs(pruned, test)[0])


# -- output statistics matching (folded BatchNorm) ------------------------------------------------------
def _fold_bn(model):
    """The same model with the BN folded into conv2 (as exporters do)."""
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    eps = next(a.f for a in bn.attribute if a.name == "epsilon")
    factor = inits["g"] / np.sqrt(inits["var"] + eps)
    w2 = inits["w2"] * factor[:, None, None, None]
    b2 = (inits["b2"] - inits["mu"]) * factor + inits["beta"]
    nodes = [helper.make_node(n.op_type, ["c2" if i == "n2" else i for i in n.input], n.output, name=n.name)
             for n in model.graph.node if n.op_type != "BatchNormalization"]
    for new, old in zip(nodes, (n for n in model.graph.node if n.op_type != "BatchNormalization")):
        new.attribute.extend(old.attribute)
    keep = [t for t in model.graph.initializer if t.name in ("w1", "b1")]
    return make_model(nodes, [("x", ["N", 3, 8, 8])], [("y", ["N", 4])], keep + [arr(w2, "w2"), arr(b2, "b2")])


def test_output_matching_on_folded_bn_equals_bn_recalibration():
    """When the dense BN's running statistics are those of the calibration data, matching the folded
    conv's output statistics gives the same model as recalibrating the unfolded BN."""
    calib = {"x": np.random.default_rng(2).standard_normal((40, 3, 8, 8)).astype(np.float32)}
    unfolded = bn_model()
    c2 = make_session(_with_output(unfolded, "c2")).run(["c2"], calib)[0].astype(np.float64)
    for init in unfolded.graph.initializer:
        value = {"mu": c2.mean(axis=(0, 2, 3)), "var": c2.var(axis=(0, 2, 3)),
                 "g": [1.5, -0.7, 0.9, 2.0], "beta": [0.1, -0.2, 0.3, 0.0]}.get(init.name)
        if value is not None:
            init.CopyFrom(arr(value, init.name))
    bn = next(n for n in unfolded.graph.node if n.op_type == "BatchNormalization")
    bn.attribute.append(helper.make_attribute("epsilon", 1e-9))
    repaired = {}
    for name, model, run in [("bn", unfolded, passes.BnRecalibration), ("folded", _fold_bn(unfolded),
                                                                         passes.OutputMatching)]:
        dense, _ = prepare(model)
        analysis = build_analysis(dense)
        removed = remove_units(analysis, "conv1", [0, 5])
        data = CalibrationSet.open(calib, dense)
        empty = CalibrationSet(data.dataset, data.specs, np.arange(0))
        ctx = passes.ReconstructionContext(dense, analysis.keep_masks(removed), data, empty, batch_size=16)
        result = run(ctx)(ApplyPlan(analysis, removed)(dense).model)
        repaired[name], layers = result.model, result.record.details["layers"]
        assert [l["node"] for l in layers] == ["bn" if name == "bn" else "conv2"]
    test = {"x": np.random.default_rng(5).standard_normal((8, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(outputs(repaired["folded"], test)[0], outputs(repaired["bn"], test)[0],
                               rtol=1e-4, atol=1e-5)


def test_output_matching_gives_each_channel_the_dense_mean_and_std():
    dense, _ = prepare(two_conv_model()[0])
    analysis = build_analysis(dense)
    removed = remove_units(analysis, "conv1", [1, 3, 4, 6])
    data = CalibrationSet.open({"x": np.random.default_rng(4).standard_normal((30, 3, 10, 10))
                               .astype(np.float32)}, dense)
    empty = CalibrationSet(data.dataset, data.specs, np.arange(0))
    ctx = passes.ReconstructionContext(dense, analysis.keep_masks(removed), data, empty, batch_size=8)
    result = passes.OutputMatching(ctx)(ApplyPlan(analysis, removed)(dense).model)
    matched, [layer] = result.model, result.record.details["layers"]
    assert layer["node"] == "conv2" and layer["action"] == "matched"
    feeds = {"x": data.dataset.arrays(0, 30)["x"]}
    got, want = outputs(matched, feeds)[0].astype(np.float64), outputs(dense, feeds)[0].astype(np.float64)
    np.testing.assert_allclose(got.mean(axis=(0, 2, 3)), want.mean(axis=(0, 2, 3)), atol=1e-4)
    np.testing.assert_allclose(got.std(axis=(0, 2, 3)), want.std(axis=(0, 2, 3)), rtol=1e-4)


# -- the bundled example -------------------------------------------------------------------------------
def test_digits_half_flops_recovers_accuracy_with_calibration():
    """Magnitude pruning to 50% of FLOPs removed: data-free ~23% top-1; least squares on
    digits_calib.npz brings it back (measured 99.6% on digits_test.npz, dense 99.8%)."""
    dense, _ = prepare(str(MODELS / "digits_resnet.onnx"))
    analysis = build_analysis(dense)
    fixed = concrete_input_shapes(dense, None)
    cost = model_cost(dense, fixed)
    scores = score_groups(analysis, analysis.prunable_groups(), "l1")
    target = Target(None, 0.5, None, "uniform", 0.9, 8, [], [])
    keep = allocate(analysis, scores, target, CostEstimator(analysis, cost))
    removed = set()
    for gid, kept in keep.items():
        flags = np.ones(analysis.groups[gid].size, dtype=bool)
        flags[kept] = False
        removed.update(int(r) for r in analysis.groups[gid].roots[flags])
    pruned = ApplyPlan(analysis, removed)(dense).model
    assert model_cost(pruned, fixed).flops <= 0.55 * cost.flops
    test = str(MODELS / "digits_test.npz")
    data_free = evaluate(pruned, test).accuracy["top1"]
    repaired, report = reconstruct(dense, pruned, analysis, removed, str(MODELS / "digits_calib.npz"),
                                   per_sample=32)
    accuracy = evaluate(repaired, test).accuracy["top1"]
    assert data_free < 0.5
    assert accuracy >= 0.95, report.summary()
    assert report.fit_samples + report.holdout_samples == 270
    assert report.agreement_after is not None and report.agreement_after >= 0.9


def test_digits_without_least_squares_output_matching_does_most_of_the_repair():
    """BN is folded into digits_resnet's convs: with least squares off, bias compensation plus output
    statistics matching takes magnitude pruning at 50% FLOPs from ~26% to ~97% top-1 (measured)."""
    dense, _ = prepare(str(MODELS / "digits_resnet.onnx"))
    analysis = build_analysis(dense)
    scores = score_groups(analysis, analysis.prunable_groups(), "l1")
    cost = model_cost(dense, concrete_input_shapes(dense, None))
    keep = allocate(analysis, scores, Target(None, 0.5, None, "uniform", 0.9, 8, [], []),
                    CostEstimator(analysis, cost))
    removed = {int(r) for gid, kept in keep.items()
               for r in np.delete(analysis.groups[gid].roots, kept)}
    pruned = ApplyPlan(analysis, removed)(dense).model
    repaired, report = reconstruct(dense, pruned, analysis, removed, str(MODELS / "digits_calib.npz"),
                                   least_squares=False)
    matching = next(p for p in report.passes if p.name == "output_matching")
    assert matching.modified and matching.details["fidelity_after"] < matching.details["fidelity_before"]
    assert evaluate(repaired, str(MODELS / "digits_test.npz")).accuracy["top1"] >= 0.9, report.summary()


# -- a weight tied across the steps of an unrolled recurrence ---------------------------------------
def unrolled(steps: int = 3) -> onnx.ModelProto:
    """x [N, steps, 8] -> MatMul (8 -> 12) -> Relu -> per step: Gather -> Gemm with one weight and bias read
    by every step (as an exporter unrolls an RNN's input projection) -> Concat [N, steps * 6]."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 12)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.standard_normal((6, 12)).astype(np.float32) * 0.5, "w_ih"),
             numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b_ih")]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"], name="embed"),
             helper.make_node("Relu", ["h"], ["a"], name="relu")]
    for t in range(steps):
        inits.append(numpy_helper.from_array(np.array(t, np.int64), f"t{t}"))
        nodes += [helper.make_node("Gather", ["a", f"t{t}"], [f"a{t}"], name=f"step{t}", axis=1),
                  helper.make_node("Gemm", [f"a{t}", "w_ih", "b_ih"], [f"y{t}"], name=f"cell{t}", transB=1)]
    nodes.append(helper.make_node("Concat", [f"y{t}" for t in range(steps)], ["y"], name="cat", axis=1))
    return make_model(nodes, [("x", ["N", steps, 8])], [("y", ["N", steps * 6])], inits)


def test_a_weight_tied_across_steps_is_refit_once_from_every_steps_inputs():
    import onnxprune

    calib = {"x": np.random.default_rng(4).standard_normal((200, 3, 8)).astype(np.float32)}
    pruned, report = onnxprune.prune(unrolled(), ratio=0.5, round_to=1, calib=calib, bias_correction=False,
                                     bn_recalibration=False)
    repair = next(p for p in report.passes if p["name"] == "reconstruction")
    [least_squares] = repair["passes"][0]["passes"]
    layers = {layer["node"]: layer for layer in least_squares["details"]["layers"]}
    assert {layers[f"cell{t}"]["action"] for t in range(3)} == {"refit"}
    assert all("tied across 3 readers" in layers[f"cell{t}"]["detail"] for t in range(3))
    assert repair["details"]["fidelity_after"] < 0.5 * repair["details"]["fidelity_before"]
    weights = [t.name for t in pruned.graph.initializer if t.name.startswith("w_ih")]
    assert weights == ["w_ih"] and all(n.input[1] == "w_ih" for n in pruned.graph.node if n.op_type == "Gemm")


def test_the_refit_is_the_same_whatever_the_memory_cap_splits_the_levels_into(monkeypatch):
    """A small cap holds the dense targets of fewer levels at a time (more dense passes): the same picks, the
    same fit (up to the float sums of inputs the pruned model then computes from the graph inputs)."""
    dense, _ = prepare(str(MODELS / "digits_resnet.onnx"))
    analysis = build_analysis(dense)
    scores = score_groups(analysis, analysis.prunable_groups(), "l1")
    keep = allocate(analysis, scores, Target(0.5, None, None, "uniform", 0.9, 8, [], []))
    removed = {int(r) for gid, kept in keep.items()
               for i, r in enumerate(analysis.groups[gid].roots.tolist()) if i not in set(kept.tolist())}
    pruned = ApplyPlan(analysis, removed)(dense).model
    calib = {"input": np.load(MODELS / "digits_calib.npz")["input"][:48]}
    collect, passes_made = least_squares.DenseTargets.collect, []

    def counted(self, nodes):
        passes_made.append(len(nodes))
        return collect(self, nodes)

    monkeypatch.setattr(least_squares.DenseTargets, "collect", counted)
    fits, windows = {}, {}
    for cap in (1 << 30, 1 << 20):
        passes_made.clear()
        repaired, report = reconstruct(dense, pruned, analysis, removed, calib, per_sample=16, memory_cap=cap,
                                       bias_correction=False, bn_recalibration=False)
        windows[cap] = len(passes_made)
        fits[cap] = {t.name: numpy_helper.to_array(t) for t in repaired.graph.initializer}
    assert windows[1 << 30] == 1 and windows[1 << 20] > 1
    assert fits[1 << 30].keys() == fits[1 << 20].keys()
    for name, value in fits[1 << 30].items():
        np.testing.assert_allclose(value, fits[1 << 20][name], rtol=1e-2, atol=2e-3, err_msg=name)
