"""Lossless elimination on hand-built graphs: only exactly-dead structure goes."""
import numpy as np
import pytest
from onnx import helper, numpy_helper

import onnxprune
from helpers import make_model, weight


def conv_bn_relu_conv(dead_channels, *, bias_alive=False, beta_alive=False, activation="Relu"):
    """conv1 (8 ch) -> BN -> activation -> conv2; `dead_channels` of conv1 planted dead."""
    w1 = numpy_helper.to_array(weight(8, 3, 3, 3, name="w1")).copy()
    b1 = np.full(8, 0.1, np.float32)
    gamma = np.ones(8, np.float32)
    beta = np.full(8, 0.05, np.float32)
    for c in dead_channels:
        w1[c] = 0
        b1[c] = 0.3 if bias_alive else 0.0
        gamma[c] = 0
        beta[c] = 0.2 if beta_alive else 0.0
    inits = [
        numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
        numpy_helper.from_array(gamma, "g"), numpy_helper.from_array(beta, "be"),
        numpy_helper.from_array(np.zeros(8, np.float32), "m"), numpy_helper.from_array(np.ones(8, np.float32), "v"),
        weight(4, 8, 3, 3, name="w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "g", "be", "m", "v"], ["n1"], name="bn1"),
        helper.make_node(activation, ["n1"], ["a1"], name="act1"),
        helper.make_node("Conv", ["a1", "w2"], ["y"], pads=[1, 1, 1, 1], name="conv2"),
    ]
    return make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, 8, 8])], inits)


def removed_units(report):
    return sum(c.before - c.after for c in report.changes)


def test_channels_with_zero_filters_and_zero_bn_are_removed_exactly():
    pruned, report = onnxprune.prune(conv_bn_relu_conv([1, 4, 6]), lossless=True)
    assert removed_units(report) == 3
    assert report.max_abs_diff < 1e-6
    w2 = next(t for t in pruned.graph.initializer if t.name == "w2")
    assert list(w2.dims) == [4, 5, 3, 3]


def test_a_nonzero_bn_beta_keeps_the_channel_alive():
    _, report = onnxprune.prune(conv_bn_relu_conv([2], beta_alive=True), lossless=True)
    assert removed_units(report) == 0


def test_gamma_zero_makes_the_conv_bias_irrelevant():
    # BN output is gamma * (...) + beta: with gamma = beta = 0 the conv bias cannot leak through
    _, report = onnxprune.prune(conv_bn_relu_conv([2], bias_alive=True), lossless=True)
    assert removed_units(report) == 1


def test_an_activation_with_nonzero_value_at_zero_keeps_the_channel_alive():
    _, report = onnxprune.prune(conv_bn_relu_conv([2], activation="Sigmoid"), lossless=True)
    assert removed_units(report) == 0


@pytest.mark.parametrize("activation", ["Relu", "Tanh", "Erf", "HardSwish", "LeakyRelu"])
def test_zero_preserving_activations_keep_a_dead_channel_dead(activation):
    _, report = onnxprune.prune(conv_bn_relu_conv([0, 7], activation=activation), lossless=True)
    assert removed_units(report) == 2


def test_if_every_channel_is_dead_one_is_kept_so_the_graph_stays_valid():
    _, report = onnxprune.prune(conv_bn_relu_conv(range(8)), lossless=True)
    assert removed_units(report) == 7
    assert report.max_abs_diff < 1e-6


def test_zero_branch_of_a_residual_block_is_bypassed():
    inits = [weight(8, 8, 3, 3, name="wa"), numpy_helper.from_array(np.zeros((8, 8, 3, 3), np.float32), "wb"),
             weight(8, 3, 1, 1, name="w0"), weight(2, 8, 1, 1, name="wh")]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["t"], name="stem"),
        helper.make_node("Conv", ["t", "wa"], ["a"], pads=[1, 1, 1, 1], name="branch_a"),
        helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
        helper.make_node("Conv", ["ra", "wb"], ["b"], pads=[1, 1, 1, 1], name="branch_b"),
        helper.make_node("Add", ["t", "b"], ["s"], name="residual"),
        helper.make_node("Conv", ["s", "wh"], ["y"], name="head"),
    ]
    model = make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 2, 8, 8])], inits)
    pruned, report = onnxprune.prune(model, lossless=True)
    ops = [n.op_type for n in pruned.graph.node]
    assert ops.count("Conv") == 2 and "Add" not in ops
    assert report.max_abs_diff < 1e-6
