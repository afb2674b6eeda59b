"""Importance criteria and allocation: which units go, and how many."""
from pathlib import Path

import numpy as np
import pytest
from onnx import helper, numpy_helper

import onnxprune
from onnxprune.cost import model_cost
from onnxprune.errors import PlanError
from onnxprune.importance import score_groups
from onnxprune.pipeline import build_analysis, prepare
from onnxprune.strategy.allocate import Target, allocate, removed_flags
from onnxprune.strategy.estimate import CostEstimator
from helpers import make_model, weight

EXAMPLE = Path(__file__).resolve().parent.parent / "models" / "digits_resnet.onnx"


def two_conv_model(w1):
    channels = w1.shape[0]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["y"], pads=[1, 1, 1, 1], name="conv2"),
    ]
    gamma = np.linspace(1.0, 2.0, channels).astype(np.float32)
    gamma[3] = 0.01  # the BN-scale criterion should drop channel 3
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(gamma, "g"),
             numpy_helper.from_array(np.zeros(channels, np.float32), "b"),
             numpy_helper.from_array(np.zeros(channels, np.float32), "m"),
             numpy_helper.from_array(np.ones(channels, np.float32), "v"),
             weight(4, channels, 3, 3, name="w2")]
    return make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, 8, 8])], inits)


def scores_of(model, criterion):
    working, _ = prepare(model)
    analysis = build_analysis(working)
    group = analysis.group("conv1")
    return score_groups(analysis, [group], criterion)[group.id]


def test_l1_ranks_small_filters_lowest():
    w1 = np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32)
    w1[5] *= 0.01
    assert np.argmin(scores_of(two_conv_model(w1), "l1")) == 5
    assert np.argmin(scores_of(two_conv_model(w1), "l2")) == 5


def test_bn_scale_ranks_the_smallest_gamma_lowest():
    w1 = np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32)
    assert np.argmin(scores_of(two_conv_model(w1), "bn_scale")) == 3


def test_fpgm_ranks_the_filter_nearest_the_others_lowest():
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 3
    w1[6] = w1[[0, 1, 2, 3, 4, 5, 7]].mean(axis=0)  # the geometric centre: replaceable
    assert np.argmin(scores_of(two_conv_model(w1), "fpgm")) == 6


def test_random_is_reproducible_with_a_seed():
    a, _ = onnxprune.prune(EXAMPLE, ratio=0.5, criterion="random", seed=3)
    b, _ = onnxprune.prune(EXAMPLE, ratio=0.5, criterion="random", seed=3)
    assert [t.dims for t in a.graph.initializer] == [t.dims for t in b.graph.initializer]


def allocation(target: Target):
    working, _ = prepare(EXAMPLE)
    analysis = build_analysis(working)
    groups = analysis.prunable_groups()
    scores = score_groups(analysis, groups, "l1")
    estimator = CostEstimator(analysis, model_cost(working))
    return analysis, allocate(analysis, scores, target, estimator), estimator


def test_uniform_ratio_removes_the_same_fraction_of_every_group():
    analysis, keep, _ = allocation(Target(ratio=0.25, round_to=1))
    for gid, kept in keep.items():
        size = analysis.groups[gid].size
        assert len(kept) == size - int(size * 0.25)


def test_round_to_keeps_multiples_of_eight():
    analysis, keep, _ = allocation(Target(ratio=0.3, round_to=8))
    assert all(len(kept) % 8 == 0 for kept in keep.values())


def test_global_ranking_respects_the_per_group_maximum():
    analysis, keep, _ = allocation(Target(ratio=0.5, strategy="global", max_ratio=0.6, round_to=1))
    total = sum(analysis.groups[g].size for g in keep)
    removed = sum(analysis.groups[g].size - len(k) for g, k in keep.items())
    assert removed == int(total * 0.5)
    assert all(len(k) >= analysis.groups[g].size * 0.4 for g, k in keep.items())


def test_include_and_exclude_select_groups_by_node_name():
    analysis, keep, _ = allocation(Target(ratio=0.5, include=["/stage1/*"], round_to=1))
    assert keep and all(any(s.node.startswith("/stage1/") for s in analysis.groups[g].sources) for g in keep)
    analysis, keep, _ = allocation(Target(ratio=0.5, exclude=["/stage1/*"], round_to=1))
    assert all(not any(s.node.startswith("/stage1/") for s in analysis.groups[g].sources) for g in keep)


@pytest.mark.parametrize("goal", [0.3, 0.5])
def test_flops_target_is_met_and_the_estimate_matches_the_rewritten_model(goal):
    analysis, keep, estimator = allocation(Target(target_flops=goal))
    estimate, _ = estimator.estimate(removed_flags(analysis, keep))
    assert 1 - estimate / estimator.dense_flops >= goal
    _, report = onnxprune.prune(EXAMPLE, target_flops=goal)
    assert report.after.flops == pytest.approx(estimate, rel=0.01)
    assert 1 - report.after.flops / report.before.flops >= goal - 0.01


def test_params_target_is_met():
    _, report = onnxprune.prune(EXAMPLE, target_params=0.4)
    assert 1 - report.after.params / report.before.params >= 0.39


def test_an_impossible_target_says_what_is_achievable():
    with pytest.raises(PlanError, match="at most"):
        onnxprune.prune(EXAMPLE, target_flops=0.999)


def narrow_convs():
    """Four 16-channel convs: kept in multiples of 8, a uniform ratio removes none or half of each."""
    nodes, inits, x = [], [], "x"
    widths = [3, 16, 16, 16, 16]
    for i in range(4):
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        inits.append(weight(widths[i + 1], widths[i], 3, 3, name=f"w{i}"))
        x = f"r{i}"
    nodes.append(helper.make_node("Conv", [x, "head"], ["y"], name="head"))
    inits.append(weight(4, 16, 1, 1, name="head"))
    return make_model(nodes, [("x", [1, 3, 16, 16])], [("y", [1, 4, 16, 16])], inits)


def test_a_flops_target_on_narrow_layers_is_not_overshot_by_a_whole_rounding_step():
    _, report = onnxprune.prune(narrow_convs(), target_flops=0.3, round_to=8)
    removed = 1 - report.after.flops / report.before.flops
    assert 0.3 <= removed <= 0.4  # a uniform half of every group would remove about 70%
    kept = sorted(c.after for c in report.changes)
    assert set(kept) <= {8, 16}  # still multiples of the rounding
