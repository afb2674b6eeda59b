"""Grouped convolutions with several channels per group (ResNeXt, RegNet).

With many narrow groups a unit is one whole conv group: its input channels
(the producer's) and its output channels go together and the `group`
attribute shrinks, so a dead group is removed.  With few wide groups a unit
stays one channel index in every group (tests/patterns/test_conv.py), which
leaves more units to choose from.
"""
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxprune
from helpers import analysis_of, group_of, make_model, prune_matches_oracle, weight

H = W = 6


def _attr(model, node_name, name):
    node = next(n for n in model.graph.node if n.name == node_name)
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def _init(model, name):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def resnext_block(width=16, groups=8, out=5, transposed=False):
    """conv1 1x1 (3 -> width) -> Relu -> grouped 3x3 (width -> width, `groups`) -> Relu -> conv3 1x1 (-> out)."""
    per_group = width // groups
    if transposed:
        gnode = helper.make_node("ConvTranspose", ["a", "wg", "bg"], ["g"], name="grouped", group=groups,
                                 kernel_shape=[3, 3], pads=[1] * 4)
        wg = weight(width, per_group, 3, 3, name="wg")
    else:
        gnode = helper.make_node("Conv", ["a", "wg", "bg"], ["g"], name="grouped", group=groups,
                                 kernel_shape=[3, 3], pads=[1] * 4)
        wg = weight(width, per_group, 3, 3, name="wg")
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c1"], ["a"], name="relu1"),
        gnode,
        helper.make_node("Relu", ["g"], ["r"], name="relu2"),
        helper.make_node("Conv", ["r", "w3"], ["y"], name="conv3", kernel_shape=[1, 1]),
    ]
    inits = [weight(width, 3, 1, 1, name="w1"), weight(width, name="b1"), wg, weight(width, name="bg"),
             weight(out, width, 1, 1, name="w3")]
    return make_model(nodes, [("x", [1, 3, H, W])], [("y", [1, out, H, W])], inits)


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "conv_transpose"])
def test_many_narrow_groups_prune_as_whole_groups_and_the_group_count_shrinks(transposed):
    model = resnext_block(transposed=transposed)
    analysis = analysis_of(model)
    group = group_of(analysis, "conv1")
    # 8 conv groups of 2 channels: one unit each, shared by conv1's channels and the grouped conv's
    assert group.prunable, group.blocked
    assert group.size == 8 and group.channels_per_unit == 2
    assert not any(s.node == "grouped" for g in analysis.groups for s in g.sources)
    roots = analysis.root_of
    np.testing.assert_array_equal(roots[analysis.layouts["c1"][1]], np.repeat(group.roots, 2))
    np.testing.assert_array_equal(roots[analysis.layouts["g"][1]], np.repeat(group.roots, 2))
    for seed in range(3):
        analysis, pruned, removed = prune_matches_oracle(model, 0.5, seed=seed)
        kept = 8 - len(removed)
        assert _attr(pruned, "grouped", "group") == kept
        assert _init(pruned, "w1").shape[0] == 2 * kept
        assert _init(pruned, "wg").shape[:2] == (2 * kept, 2)
        assert _init(pruned, "bg").shape == (2 * kept,)
        assert _init(pruned, "w3").shape[1] == 2 * kept


def test_few_wide_groups_keep_the_group_count_and_prune_an_index_in_every_group():
    # 2 groups of 8: whole groups would leave 2 units, the same index in every group 8 + 8
    analysis, pruned, removed = prune_matches_oracle(resnext_block(groups=2), 0.5)
    assert group_of(analysis, "conv1").size == 8 and group_of(analysis, "grouped").size == 8
    assert _attr(pruned, "grouped", "group") == 2


def test_whole_groups_meet_a_channel_shuffle_and_the_next_grouped_conv():
    """ShuffleNet's unit with narrow groups: gconv1 loses whole groups, the shuffle spreads
    each group over the tensor (its Reshape carries one group per slice of the group axis),
    and gconv2, whose every group then reads several gconv1 groups, removes the same index
    in each of its groups: gconv1's groups 0, 2, 4, 6 become one unit, 1, 3, 5, 7 another."""
    c, g = 16, 8
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["a"], name="conv0", kernel_shape=[1, 1]),
        helper.make_node("Conv", ["a", "w1", "b1"], ["g1"], name="gconv1", kernel_shape=[1, 1], group=g),
        helper.make_node("Relu", ["g1"], ["r1"], name="relu"),
        helper.make_node("Reshape", ["r1", "split"], ["r5"], name="shuffle_split"),
        helper.make_node("Transpose", ["r5"], ["t5"], name="shuffle_transpose", perm=[0, 2, 1, 3, 4]),
        helper.make_node("Reshape", ["t5", "merge"], ["s"], name="shuffle_merge"),
        helper.make_node("Conv", ["s", "wd"], ["d"], name="dw", kernel_shape=[3, 3], pads=[1] * 4, group=c),
        helper.make_node("Conv", ["d", "w2", "b2"], ["g2"], name="gconv2", kernel_shape=[1, 1], group=g),
        helper.make_node("Conv", ["g2", "w3"], ["y"], name="conv3", kernel_shape=[1, 1]),
    ]
    inits = [weight(c, 3, 1, 1, name="w0"), weight(c, c // g, 1, 1, name="w1"), weight(c, name="b1"),
             numpy_helper.from_array(np.array([1, g, c // g, H, W], np.int64), "split"),
             numpy_helper.from_array(np.array([1, c, H, W], np.int64), "merge"),
             weight(c, 1, 3, 3, name="wd"), weight(c, c // g, 1, 1, name="w2"), weight(c, name="b2"),
             weight(4, c, 1, 1, name="w3")]
    model = make_model(nodes, [("x", [1, 3, H, W])], [("y", [1, 4, H, W])], inits, opset=13)
    analysis = analysis_of(model)
    first = group_of(analysis, "conv0")
    assert first.prunable and first.size == 2
    np.testing.assert_array_equal(analysis.root_of[analysis.layouts["g1"][1]], np.repeat(np.tile(first.roots, 4), 2))
    assert group_of(analysis, "gconv2").size == c // g
    for seed in range(2):
        _, pruned, removed = prune_matches_oracle(model, 0.5, seed=seed)
        assert len(set(removed) & set(first.roots.tolist())) == 1
        assert _attr(pruned, "gconv1", "group") == 4
        split = next(n for n in pruned.graph.node if n.name == "shuffle_split")
        assert _init(pruned, split.input[1]).tolist() == [1, 4, 2, H, W]
        assert _attr(pruned, "gconv2", "group") == g
        assert _init(pruned, "w2").shape[1] == 1  # one of its two input channels per group


def test_lossless_removes_a_dead_conv_group():
    """Structured-sparse training zeroed group 3 of the grouped conv (its weights and bias):
    that group, and the conv1 channels only it read, are physically removed."""
    model = resnext_block()
    inits = {t.name: t for t in model.graph.initializer}
    for name in ("wg", "bg"):
        values = numpy_helper.to_array(inits[name]).copy()
        values[6:8] = 0  # output channels of group 3
        inits[name].CopyFrom(numpy_helper.from_array(values, name))
    pruned, report = onnxprune.prune(model, lossless=True)
    assert _attr(pruned, "grouped", "group") == 7
    assert _init(pruned, "w1").shape[0] == 14 and _init(pruned, "wg").shape[:2] == (14, 2)
    assert _init(pruned, "w3").shape[1] == 14
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-5
    onnx.checker.check_model(pruned)


def test_lossless_keeps_a_conv_group_whose_input_is_read_elsewhere():
    """conv1's channels also reach a second reader: a dead group's inputs are not dead there."""
    model = resnext_block()
    graph = model.graph
    graph.node.append(helper.make_node("Conv", ["a", "w_side"], ["side"], name="side", kernel_shape=[1, 1]))
    graph.initializer.append(weight(2, 16, 1, 1, name="w_side"))
    graph.output.append(helper.make_tensor_value_info("side", onnx.TensorProto.FLOAT, [1, 2, H, W]))
    inits = {t.name: t for t in graph.initializer}
    for name in ("wg", "bg"):
        values = numpy_helper.to_array(inits[name]).copy()
        values[6:8] = 0
        inits[name].CopyFrom(numpy_helper.from_array(values, name))
    pruned, report = onnxprune.prune(model, lossless=True)
    assert _attr(pruned, "grouped", "group") == 8
    assert _init(pruned, "w1").shape[0] == 16
