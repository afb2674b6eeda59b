"""Sensitivity criteria that need more than channel statistics: zero-ablation of a calibration loss
("ablation") and ThiNet's greedy selection by next-layer reconstruction error ("thinet").

Ablation gates a unit where its consumers read it, so its score is the divergence of the *pruned*
model from the dense one; ThiNet removes first what the next layer does not miss."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import make_model, relu_mlp, run, weight
from onnx import helper, numpy_helper

import onnxprune
from onnxprune.calibration import calibration_statistics, consumers_of, expose, rows
from onnxprune.calibration.ablation import AblationBudgetError, Sensitivity, ablation_sensitivity, gated_model
from onnxprune.calibration.removal_error import RemovalErrors, removal_errors
from onnxprune.calibration.stats import CalibrationStats
from onnxprune.errors import OnnxPruneError
from onnxprune.importance import CRITERIA, Criterion, Needs, score_groups
from onnxprune.importance.data_aware import (
    CalibrationRequired,
    criterion_statistics,
    greedy_removal_order,
    unit_error_matrix,
)
from onnxprune.passes.apply_plan import ApplyPlan
from onnxprune.pipeline import build_analysis, prepare
from onnxprune.runtime.evaluate import evaluate
from onnxprune.strategy.allocate import Target, allocate
from onnxprune.testing import masked_reference

ROOT = Path(__file__).resolve().parent.parent
DIGITS, CALIB, TEST = (ROOT / "models" / n for n in ("digits_resnet.onnx", "digits_calib.npz", "digits_test.npz"))
BERT = ROOT / "models" / "fixtures" / "transformers" / "bert_encoder_legacy.onnx"


def conv_bn_classifier():
    """Conv(3->6) -> BatchNorm (non-zero shift) -> Relu -> Conv(6->4) -> Relu -> GAP -> Flatten -> Gemm(4->5)."""
    rng = np.random.default_rng(7)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1),
    ]
    inits = [weight(6, 3, 3, 3, name="w1"), weight(6, name="b1"), weight(4, 6, 3, 3, name="w2"),
             weight(4, name="b2"), weight(5, 4, name="w3", scale=2.0), weight(5, name="b3"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, 6).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.uniform(0.5, 1.0, 6).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.normal(0, 0.1, 6).astype(np.float32), "mean"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, 6).astype(np.float32), "var")]
    return make_model(nodes, [("x", ["N", 3, 8, 8])], [("y", ["N", 5])], inits)


def images(n=24, seed=0):
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)}


def kl(dense_logits, logits):
    def log_softmax(z):
        z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    lp, lq = log_softmax(dense_logits), log_softmax(logits)
    return float((np.exp(lp) * (lp - lq)).sum(axis=1).mean())


# -- ablation -------------------------------------------------------------------------------------
def test_gating_a_unit_is_removing_it_not_zeroing_its_source():
    """Gate 0 at the consumers' inputs == the physically pruned model; a zero at the conv output instead
    is turned into BatchNorm's shift and still reaches the next layer."""
    model, _ = prepare(conv_bn_classifier())
    analysis = build_analysis(model)
    group = analysis.group("conv1")
    gm = gated_model(model, analysis, [group])
    removed = {int(group.roots[2]), int(group.roots[4])}
    gate = gm.ones()
    gate[[gm.slots[group.id] + 2, gm.slots[group.id] + 4]] = 0.0
    feeds = images(6)
    gated = run(gm.model, {**feeds, gm.gate: gate})[0]
    pruned = run(ApplyPlan(analysis, removed)(model).model, feeds)[0]
    np.testing.assert_allclose(gated, pruned, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run(gm.model, {**feeds, gm.gate: gm.ones()})[0], run(model, feeds)[0])

    at_source = masked_reference(model, analysis, set())
    mask = np.ones((1, 6, 1, 1), np.float32)
    mask[0, [2, 4]] = 0
    at_source.graph.initializer.append(numpy_helper.from_array(mask, "source_mask"))
    for node in at_source.graph.node:
        if node.name == "bn1":
            node.input[0] = "c1_zeroed"
    at_source.graph.node.insert(1, helper.make_node("Mul", ["c1", "source_mask"], ["c1_zeroed"]))
    assert np.abs(run(at_source, feeds)[0] - pruned).max() > 1e-3


def test_ablation_score_is_the_divergence_of_the_model_without_the_unit():
    model, _ = prepare(conv_bn_classifier())
    analysis = build_analysis(model)
    feeds = images(24)
    sens = ablation_sensitivity(model, analysis, feeds, samples=24, batch_size=10)
    assert sens.samples == 24 and sens.units == sum(g.size for g in analysis.prunable_groups())
    assert sens.losses == {"y": "kl"}
    dense = run(model, feeds)[0]
    for g in analysis.prunable_groups():
        for i, root in enumerate(g.roots.tolist()):
            pruned = run(ApplyPlan(analysis, {int(root)})(model).model, feeds)[0]
            assert sens.scores[g.id][i] == pytest.approx(kl(dense, pruned), rel=1e-3, abs=1e-7)
    # the suffix trick: only conv1's group runs the whole model
    assert sens.flops < sens.dense_flops


def planted_mlp():
    """Gemm(4->6) -> Relu -> Gemm(6->3) logits. Unit 1 is dead (always 0 after Relu), unit 3 is active
    and feeds the logits through a 20x larger column."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((4, 6)).astype(np.float32)
    b1 = rng.standard_normal(6).astype(np.float32)
    w1[:, 1], b1[1] = 0.0, -1.0
    b1[3] = 2.0
    w2 = rng.standard_normal((6, 3)).astype(np.float32)
    w2[3] *= 20.0
    return relu_mlp(w1, b1, w2)


def test_the_unit_that_moves_the_output_most_scores_highest():
    model, _ = prepare(planted_mlp())
    analysis = build_analysis(model)
    feeds = {"x": np.random.default_rng(1).standard_normal((80, 4)).astype(np.float32)}
    stats = criterion_statistics("ablation", model, analysis, feeds)
    group = analysis.group("fc1")
    scores = score_groups(analysis, [group], "ablation", stats=stats)[group.id]
    assert scores.argmax() == 3
    assert scores[1] == 0.0  # removing a dead unit changes nothing


def test_ablation_scores_keep_one_scale_across_layers_for_the_global_strategy():
    """Per-group normalisation would make each layer's mean unit equally important; ablation scores
    measure the same output divergence everywhere, so the global ranking uses them as they are."""
    model, _ = prepare(conv_bn_classifier())
    analysis = build_analysis(model)
    sens = criterion_statistics("ablation", model, analysis, images(40))
    groups = analysis.prunable_groups()
    scores = score_groups(analysis, groups, "ablation", stats=sens)
    raw = np.concatenate([sens.scores[g.id] for g in groups])
    for g in groups:
        np.testing.assert_allclose(scores[g.id], sens.scores[g.id] / raw.mean(), rtol=1e-9)
    keep = allocate(analysis, scores, Target(0.4, None, None, "global", 0.9, 1, [], []))
    removed = np.concatenate([np.delete(sens.scores[g.id], keep[g.id]) for g in groups])
    kept = np.concatenate([sens.scores[g.id][keep[g.id]] for g in groups])
    assert len(removed) == 4 and removed.max() <= kept.min()


def test_ablation_of_a_head_gates_all_its_channels():
    """A unit of 16 channels (an attention head) is one gate entry; its score is the relative MSE of the
    encoder's hidden states with that head removed."""
    model, _ = prepare(str(BERT))
    analysis = build_analysis(model)
    heads = next(g for g in analysis.prunable_groups() if g.channels_per_unit == 16)
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 50, (4, 12)).astype(np.int64),
             "attention_mask": np.ones((4, 12), np.int64)}
    sens = ablation_sensitivity(model, analysis, feeds, groups=[heads], samples=4)
    gm = gated_model(model, analysis, [heads])
    (index,) = gm.muls.values()
    assert np.bincount(index[index < gm.units]).tolist() == [16] * 4
    assert sens.losses == {"last_hidden_state": "mse"}
    dense = run(model, feeds)[0].astype(np.float64)
    pruned = run(ApplyPlan(analysis, {int(heads.roots[1])})(model).model, feeds)[0]
    want = np.square(pruned - dense).mean() / np.square(dense).mean()
    assert sens.scores[heads.id][1] == pytest.approx(want, rel=1e-3)


def test_ablation_stays_within_its_budget_or_says_why_not():
    model, _ = prepare(conv_bn_classifier())
    analysis = build_analysis(model)
    feeds = images(64)
    full = ablation_sensitivity(model, analysis, feeds, samples=64, budget_flops=None)
    fewer = ablation_sensitivity(model, analysis, feeds, samples=64, budget_flops=full.flops / 4)
    assert 8 <= fewer.samples <= 16 and "16 samples per unit" in fewer.notes[0]
    with pytest.raises(AblationBudgetError, match="thinet"):
        ablation_sensitivity(model, analysis, feeds, samples=64, budget_flops=full.flops / 100)


def test_the_ablation_sample_count_is_the_callers_choice():
    model, _ = prepare(conv_bn_classifier())
    analysis = build_analysis(model)
    sens = criterion_statistics("ablation", model, analysis, images(40), ablation_samples=8)
    assert sens.samples == 8
    with pytest.raises(OnnxPruneError, match="ablation-samples"):
        onnxprune.prune(conv_bn_classifier(), ratio=0.5, criterion="ablation", calib=images(40),
                        ablation_samples=0)


def test_sensitivity_criteria_need_their_own_statistics():
    model, _ = prepare(planted_mlp())
    analysis = build_analysis(model)
    assert CRITERIA["ablation"].needs is Needs.ABLATION and CRITERIA["thinet"].needs is Needs.REMOVAL_ERRORS
    feeds = {"x": np.zeros((4, 4), np.float32)}
    for name in ("ablation", "thinet"):
        with pytest.raises(CalibrationRequired, match="calibration"):
            score_groups(analysis, analysis.prunable_groups(), name)
        with pytest.raises(CalibrationRequired, match=f"criterion_statistics\\('{name}'"):
            score_groups(analysis, analysis.prunable_groups(), name,
                         stats=calibration_statistics(model, analysis, feeds))



@pytest.mark.parametrize("needs, measured", [(Needs.NOTHING, type(None)), (Needs.STATISTICS, CalibrationStats),
                                             (Needs.REMOVAL_ERRORS, RemovalErrors), (Needs.ABLATION, Sensitivity)])
def test_prune_measures_what_the_criterion_declares_it_needs(monkeypatch, needs, measured):
    """A criterion is a class whose `needs` says what calibration must measure; prune measures that, and only that."""
    given = []

    class Probe(Criterion):
        name = "probe"

        def score(self, analysis, group, rng, stats=None):
            given.append(stats)
            return None

    Probe.needs = needs
    monkeypatch.setitem(CRITERIA, "probe", Probe())
    onnxprune.prune(conv_bn_classifier(), ratio=0.5, round_to=1, criterion="probe", calib=images(16),
                    ablation_samples=4)
    assert given and all(type(stats) is measured for stats in given)

# -- thinet ---------------------------------------------------------------------------------------
def test_channel_matrix_is_the_consumers_output_error():
    """err(S) = sum of M[S, S] = || (X_S - mean) W_S^T ||^2 / || (X - mean) W^T ||^2 for a 3x3 padded conv."""
    model, _ = prepare(conv_bn_classifier())
    analysis = build_analysis(model)
    feeds = images(5)
    errors = removal_errors(model, analysis, feeds, per_sample=None)
    (key,) = [k for k in errors.matrices if k[2] == "conv2"]
    m = errors.matrices[key]
    c = consumers_of(model)["conv2"]
    x = run(expose(model, ["r1"]), feeds)[0]
    xr, _ = rows(c, x, per_sample=None)
    xr = xr.astype(np.float64) - xr.mean(axis=0)
    w = analysis.view.const("w2").reshape(4, -1).astype(np.float64)

    def err(channels):
        cols = [ch * 9 + k for ch in channels for k in range(9)]
        return float(np.square(xr[:, cols] @ w[:, cols].T).sum())

    total = err(range(6))
    for s in ([0], [3], [1, 4], [0, 2, 5]):
        assert m[np.ix_(s, s)].sum() == pytest.approx(err(s) / total, rel=1e-4)


def redundant_mlp():
    """Gemm(4->8) -> Relu -> Gemm(8->3). Unit 1 is dead, unit 4 constant, unit 6 has a zero column in the
    next layer; units 2 and 5 compute the same activation and cancel in the next layer (opposite
    columns)."""
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((4, 8)).astype(np.float32)
    b1 = rng.standard_normal(8).astype(np.float32)
    w1[:, 1], b1[1] = 0.0, -1.0
    w1[:, 4], b1[4] = 0.0, 9.0
    w1[:, 5], b1[5] = w1[:, 2], b1[2]
    w1[:, [2, 5, 6]] *= 4.0
    w2 = rng.standard_normal((8, 3)).astype(np.float32)
    w2[5] = -w2[2]
    w2[6] = 0.0
    w2[[2, 4, 5]] *= 4.0
    return relu_mlp(w1, b1, w2)


def test_thinet_removes_what_the_next_layer_does_not_miss_first():
    model, _ = prepare(redundant_mlp())
    analysis = build_analysis(model)
    group = analysis.group("fc1")
    feeds = {"x": np.random.default_rng(1).standard_normal((200, 4)).astype(np.float32)}
    stats = criterion_statistics("thinet", model, analysis, feeds)
    scores = score_groups(analysis, [group], "thinet", stats=stats)[group.id]
    order = list(np.argsort(scores))
    assert set(order[:3]) == {1, 4, 6}  # dead, constant (its mean is compensated), unused
    assert abs(order.index(2) - order.index(5)) == 1  # a cancelling pair leaves together
    l1 = score_groups(analysis, [group], "l1")[group.id]
    assert 4 not in np.argsort(l1)[:3]  # magnitude sees a large weight, not a constant


def test_greedy_order_follows_the_summed_error():
    errors = np.array([[4.0, -3.9, 0.0], [-3.9, 4.0, 0.0], [0.0, 0.0, 1.0]])
    assert greedy_removal_order(errors).tolist() == [2, 0, 1]  # 1 first (cheapest), then the pair
    errors[2, 2] = 5.0
    assert greedy_removal_order(errors).tolist() == [0, 1, 2]  # 0 then its partner (4 - 7.8 < 5)


def test_thinet_removes_a_head_with_all_its_channels():
    model, _ = prepare(str(BERT))
    analysis = build_analysis(model)
    heads = next(g for g in analysis.prunable_groups() if g.channels_per_unit == 16)
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 50, (8, 12)).astype(np.int64),
             "attention_mask": np.ones((8, 12), np.int64)}
    stats = removal_errors(model, analysis, feeds, groups=[heads])
    (m,) = stats.matrices.values()
    per_head = unit_error_matrix(analysis, heads, stats)
    assert per_head.shape == (4, 4)
    # heads are contiguous blocks of 16 features at the output projection here
    np.testing.assert_allclose(per_head, m.reshape(4, 16, 4, 16).sum(axis=(1, 3)), rtol=1e-9)
    scores = score_groups(analysis, [heads], "thinet", stats=stats)[heads.id]
    assert sorted(scores.tolist()) == pytest.approx(sorted((np.arange(1, 5) / 2.5).tolist()))


# -- end to end -----------------------------------------------------------------------------------
def test_sensitivity_criteria_prune_digits_at_least_as_well_as_magnitude(tmp_path):
    """50% of FLOPs removed from the digits ResNet, calibrated on 64 images of digits_calib.npz, top-1 on
    the held-out digits_test.npz; with full reconstruction and with bias compensation + BN only."""
    results = {}
    for criterion in ("l1", "ablation", "thinet"):
        plan = tmp_path / f"{criterion}.json"
        full, report = onnxprune.prune(DIGITS, target_flops=0.5, criterion=criterion, calib=CALIB,
                                       calib_samples=64, round_to=1, save_plan=plan, strategy="uniform")
        assert 0.45 <= 1 - report.after.flops / report.before.flops <= 0.6
        light, _ = onnxprune.prune(DIGITS, plan=plan, calib=CALIB, calib_samples=64, least_squares=False)
        results[criterion] = {"full": evaluate(full, str(TEST)).accuracy["top1"],
                              "light": evaluate(light, str(TEST)).accuracy["top1"]}
    print(results)
    for criterion in ("ablation", "thinet"):
        for kind in ("full", "light"):
            assert results[criterion][kind] >= results["l1"][kind], (criterion, kind, results)


# -- residual layers -------------------------------------------------------------------------------
def test_sensitivity_gives_each_residual_layer_the_divergence_of_dropping_it_alone():
    from onnxprune.passes.depth import DropLayers
    from onnxprune.pipeline.sensitivity import sensitivity
    from onnxprune.strategy.depth import scan_blocks

    with np.load(CALIB) as d:
        calib = {"input": d["input"][:16]}
    report = sensitivity(DIGITS, calib=calib, sensitivity_samples=16, sensitivity_grid=(0.5,))
    model, _ = prepare(str(DIGITS))
    [unit] = scan_blocks(model).candidates("layer")
    [row] = report.layers
    assert row["name"] == unit.name and row["influence"] > 0
    dense, dropped = run(model, calib)[0], run(DropLayers([unit])(model).model, calib)[0]
    assert row["loss"] == pytest.approx(kl(dense, dropped), rel=1e-3)
    assert report.to_dict()["layers"] == report.layers and "loss dropped" in report.render_table()
