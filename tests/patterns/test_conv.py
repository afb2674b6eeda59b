"""Conv and ConvTranspose: output channels open units, the next layer's input
channels consume them; depthwise convs pass them through; grouped convs keep
their group count and prune the same channel index in every group."""
import pytest
from onnx import helper, numpy_helper

from helpers import analysis_of, make_model, prune_matches_oracle, weight


def _conv(name, x, w, b=None, **attrs):
    inputs = [x, w] + ([b] if b else [])
    return helper.make_node("Conv", inputs, [name], name=name, **attrs)


def _initializer(model, name):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def _node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def _group_of(analysis, node_name):
    return next(g for g in analysis.groups if any(s.node == node_name for s in g.sources))


def _chain(spatial, bias):
    """x -> conv1 (8 ch) -> Relu -> conv2 (6 ch) -> y, in `spatial` dimensions."""
    k = [3] * spatial
    pads = [1] * (2 * spatial)
    size = {1: [16], 2: [8, 8], 3: [4, 6, 6]}[spatial]
    inits = [weight(8, 3, *k, name="w1"), weight(6, 8, *k, name="w2")]
    if bias:
        inits += [weight(8, name="b1"), weight(6, name="b2")]
    nodes = [
        _conv("conv1", "x", "w1", "b1" if bias else None, pads=pads),
        helper.make_node("Relu", ["conv1"], ["relu"], name="relu"),
        _conv("conv2", "relu", "w2", "b2" if bias else None, pads=pads),
    ]
    return make_model(nodes, [("x", [1, 3, *size])], [("conv2", [1, 6, *size])], inits)


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("spatial", [1, 2, 3], ids=["conv1d", "conv2d", "conv3d"])
def test_conv_output_channels_are_cut_together_with_the_next_conv_input_channels(spatial, bias):
    analysis, pruned, removed = prune_matches_oracle(_chain(spatial, bias))
    first = _group_of(analysis, "conv1")
    assert first.size == 8 and first.prunable
    roles = {(p.tensor, p.role) for p in first.params}
    assert {("w1", "weight_out"), ("w2", "weight_in")} <= roles
    assert (("b1", "bias") in roles) == bias
    kept = 8 - len(removed)
    assert _initializer(pruned, "w1").shape[0] == kept
    assert _initializer(pruned, "w2").shape[1] == kept
    if bias:
        assert _initializer(pruned, "b1").shape == (kept,)


def test_conv_whose_output_is_a_graph_output_keeps_its_channels():
    analysis = analysis_of(_chain(2, bias=True))
    last = _group_of(analysis, "conv2")
    assert not last.prunable
    assert any("graph output" in r for r in last.blocked)


def _grouped_model():
    """conv1 (16 ch) -> grouped conv (group=4, 16 -> 16) -> conv3."""
    inits = [weight(16, 3, 3, 3, name="w1"), weight(16, name="b1"),
             weight(16, 4, 3, 3, name="wg"), weight(16, name="bg"),
             weight(5, 16, 1, 1, name="w3")]
    nodes = [
        _conv("conv1", "x", "w1", "b1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1"], ["relu"], name="relu"),
        _conv("grouped", "relu", "wg", "bg", group=4, pads=[1, 1, 1, 1]),
        _conv("conv3", "grouped", "w3"),
    ]
    return make_model(nodes, [("x", [1, 3, 8, 8])], [("conv3", [1, None, None, None])], inits)


def test_grouped_conv_prunes_one_channel_index_in_every_group_and_keeps_the_group_count():
    analysis, pruned, removed = prune_matches_oracle(_grouped_model())
    feeding, grouped = _group_of(analysis, "conv1"), _group_of(analysis, "grouped")
    # a unit is channel index i of every one of the 4 groups: 16 channels, 4 units
    assert feeding.size == 4 and feeding.prunable
    assert grouped.size == 4 and grouped.prunable
    assert feeding.id != grouped.id
    attrs = {a.name: helper.get_attribute_value(a) for a in _node(pruned, "grouped").attribute}
    assert attrs["group"] == 4
    kept_in = 4 - sum(int(r) in removed for r in feeding.roots.tolist())
    kept_out = 4 - sum(int(r) in removed for r in grouped.roots.tolist())
    assert _initializer(pruned, "w1").shape[0] == 4 * kept_in
    assert _initializer(pruned, "wg").shape[:2] == (4 * kept_out, kept_in)
    assert _initializer(pruned, "w3").shape[1] == 4 * kept_out


def _depthwise_model(multiplier, bias=True):
    """conv1 (8 ch) -> depthwise conv (group=8, 8*multiplier out) -> conv3."""
    out = 8 * multiplier
    inits = [weight(8, 3, 3, 3, name="w1"), weight(out, 1, 3, 3, name="wd"), weight(4, out, 1, 1, name="w3")]
    if bias:
        inits.append(weight(out, name="bd"))
    nodes = [
        _conv("conv1", "x", "w1", pads=[1, 1, 1, 1]),
        _conv("depthwise", "conv1", "wd", "bd" if bias else None, group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["depthwise"], ["relu"], name="relu"),
        _conv("conv3", "relu", "w3"),
    ]
    return make_model(nodes, [("x", [1, 3, 8, 8])], [("conv3", [1, None, None, None])], inits)


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_depthwise_conv_passes_channels_through_to_the_next_layer(bias):
    analysis, pruned, removed = prune_matches_oracle(_depthwise_model(1, bias))
    group = _group_of(analysis, "conv1")
    assert group.size == 8 and group.prunable
    # the depthwise conv opens no units of its own: its channels are conv1's
    assert not any(s.node == "depthwise" for g in analysis.groups for s in g.sources)
    kept = 8 - len(removed)
    attrs = {a.name: helper.get_attribute_value(a) for a in _node(pruned, "depthwise").attribute}
    assert attrs["group"] == kept
    assert _initializer(pruned, "wd").shape[0] == kept
    assert _initializer(pruned, "w3").shape[1] == kept


def test_depthwise_conv_with_depth_multiplier_2_removes_both_outputs_of_a_channel():
    analysis, pruned, removed = prune_matches_oracle(_depthwise_model(2))
    group = _group_of(analysis, "conv1")
    assert group.size == 8 and group.prunable
    kept = 8 - len(removed)
    attrs = {a.name: helper.get_attribute_value(a) for a in _node(pruned, "depthwise").attribute}
    assert attrs["group"] == kept
    assert _initializer(pruned, "wd").shape[0] == 2 * kept
    assert _initializer(pruned, "bd").shape == (2 * kept,)
    assert _initializer(pruned, "w3").shape[1] == 2 * kept


def _transpose_model(depthwise, multiplier=1):
    """conv1 (8 ch) -> ConvTranspose (dense 8 -> 6, or depthwise) -> conv3."""
    if depthwise:
        wt, out, attrs = weight(8, multiplier, 2, 2, name="wt"), 8 * multiplier, {"group": 8}
    else:
        wt, out, attrs = weight(8, 6, 2, 2, name="wt"), 6, {}
    inits = [weight(8, 3, 3, 3, name="w1"), wt, weight(out, name="bt"), weight(4, out, 1, 1, name="w3")]
    nodes = [
        _conv("conv1", "x", "w1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1"], ["relu"], name="relu"),
        helper.make_node("ConvTranspose", ["relu", "wt", "bt"], ["up"], name="up", strides=[2, 2], **attrs),
        _conv("conv3", "up", "w3"),
    ]
    return make_model(nodes, [("x", [1, 3, 4, 4])], [("conv3", [1, None, None, None])], inits)


def test_conv_transpose_consumes_input_channels_on_weight_axis_0_and_opens_output_channels_on_axis_1():
    analysis, pruned, removed = prune_matches_oracle(_transpose_model(depthwise=False))
    feeding, up = _group_of(analysis, "conv1"), _group_of(analysis, "up")
    assert (feeding.size, up.size) == (8, 6)
    assert feeding.prunable and up.prunable
    kept_in = 8 - sum(int(r) in removed for r in feeding.roots.tolist())
    kept_out = 6 - sum(int(r) in removed for r in up.roots.tolist())
    assert _initializer(pruned, "wt").shape[:2] == (kept_in, kept_out)
    assert _initializer(pruned, "bt").shape == (kept_out,)


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_conv_transpose_passes_channels_through_and_rewrites_its_group(multiplier):
    analysis, pruned, removed = prune_matches_oracle(_transpose_model(depthwise=True, multiplier=multiplier))
    group = _group_of(analysis, "conv1")
    assert group.size == 8 and group.prunable
    assert not any(s.node == "up" for g in analysis.groups for s in g.sources)
    kept = 8 - len(removed)
    attrs = {a.name: helper.get_attribute_value(a) for a in _node(pruned, "up").attribute}
    assert attrs["group"] == kept
    assert _initializer(pruned, "wt").shape[:2] == (kept, multiplier)
    assert _initializer(pruned, "bt").shape == (kept * multiplier,)


def test_grouped_conv_transpose_keeps_its_group_count():
    inits = [weight(8, 3, 3, 3, name="w1"), weight(8, 3, 2, 2, name="wt"), weight(6, name="bt"),
             weight(4, 6, 1, 1, name="w3")]
    nodes = [
        _conv("conv1", "x", "w1", pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["conv1", "wt", "bt"], ["up"], name="up", strides=[2, 2], group=2),
        _conv("conv3", "up", "w3"),
    ]
    model = make_model(nodes, [("x", [1, 3, 4, 4])], [("conv3", [1, 4, 8, 8])], inits)
    analysis, pruned, removed = prune_matches_oracle(model)
    feeding, up = _group_of(analysis, "conv1"), _group_of(analysis, "up")
    assert (feeding.size, up.size) == (4, 3)  # channel index i of each of the 2 groups
    attrs = {a.name: helper.get_attribute_value(a) for a in _node(pruned, "up").attribute}
    assert attrs["group"] == 2
    kept_in = 4 - sum(int(r) in removed for r in feeding.roots.tolist())
    kept_out = 3 - sum(int(r) in removed for r in up.roots.tolist())
    assert _initializer(pruned, "wt").shape[:2] == (2 * kept_in, kept_out)
    assert _initializer(pruned, "w3").shape[1] == 2 * kept_out
