"""Pooling, Resize/Upsample and Pad work on spatial axes: channels pass through.
Sizes given explicitly (Resize sizes) are rewritten; padding the channel axis
blocks the channels."""
import numpy as np
import pytest
from onnx import helper, numpy_helper

from helpers import analysis_of, const, make_model, prune_matches_oracle, weight


def _initializer(model, name):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def _node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def _group_of(analysis, node_name):
    return next(g for g in analysis.groups if any(s.node == node_name for s in g.sources))


def _conv_op_conv(op_nodes, extra_inits=(), opset=17, out_hw=(8, 8), mid_channels=8):
    """x (1,3,8,8) -> conv1 (8 ch) -> <op_nodes: 'conv1' -> 'mid'> -> conv2 (4 ch, 1x1)."""
    inits = [weight(8, 3, 3, 3, name="w1"), weight(8, name="b1"), weight(4, mid_channels, 1, 1, name="w2"),
             *extra_inits]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["conv1"], name="conv1", pads=[1, 1, 1, 1]),
        *op_nodes,
        helper.make_node("Conv", ["mid", "w2"], ["conv2"], name="conv2"),
    ]
    return make_model(nodes, [("x", [1, 3, 8, 8])], [("conv2", [1, 4, *out_hw])], list(inits), opset=opset)


def _assert_channels_pass(model):
    analysis, pruned, removed = prune_matches_oracle(model)
    group = _group_of(analysis, "conv1")
    assert group.size == 8 and group.prunable
    assert [g.name for g in analysis.prunable_groups()] == ["conv1"]
    assert _initializer(pruned, "w2").shape[1] == 8 - len(removed)
    return analysis, pruned, removed


POOLS = [
    pytest.param(helper.make_node("MaxPool", ["conv1"], ["mid"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
                 (4, 4), id="MaxPool"),
    pytest.param(helper.make_node("AveragePool", ["conv1"], ["mid"], name="pool", kernel_shape=[3, 3],
                                  pads=[1, 1, 1, 1], count_include_pad=0), (8, 8), id="AveragePool"),
    pytest.param(helper.make_node("LpPool", ["conv1"], ["mid"], name="pool", kernel_shape=[2, 2], strides=[2, 2],
                                  p=2), (4, 4), id="LpPool"),
    pytest.param(helper.make_node("GlobalAveragePool", ["conv1"], ["mid"], name="pool"), (1, 1),
                 id="GlobalAveragePool"),
    pytest.param(helper.make_node("GlobalMaxPool", ["conv1"], ["mid"], name="pool"), (1, 1), id="GlobalMaxPool"),
]


@pytest.mark.parametrize("pool,out_hw", POOLS)
def test_pooling_passes_channels_through(pool, out_hw):
    _assert_channels_pass(_conv_op_conv([pool], out_hw=out_hw))


def test_maxpool_whose_indices_are_used_blocks_the_channels():
    """The indices encode flat NCHW positions: they change when channels go."""
    pool = helper.make_node("MaxPool", ["conv1"], ["mid", "indices"], name="pool", kernel_shape=[2, 2],
                            strides=[2, 2])
    cast = helper.make_node("Cast", ["indices"], ["indices_f"], name="cast", to=1)
    model = _conv_op_conv([pool, cast], out_hw=(4, 4))
    model.graph.output.append(helper.make_tensor_value_info("indices_f", 1, [1, 8, 4, 4]))
    group = _group_of(analysis_of(model), "conv1")
    assert not group.prunable
    assert any("MaxPool 'pool'" in r and "indices" in r for r in group.blocked), group.blocked


def test_resize_with_scales_passes_channels_through():
    resize = helper.make_node("Resize", ["conv1", "", "scales"], ["mid"], name="resize", mode="nearest")
    model = _conv_op_conv([resize], [const([1.0, 1.0, 2.0, 2.0], "scales", np.float32)], out_hw=(16, 16))
    _, pruned, _ = _assert_channels_pass(model)
    np.testing.assert_array_equal(_initializer(pruned, "scales"), [1, 1, 2, 2])


def test_resize_with_explicit_sizes_has_its_channel_count_rewritten():
    resize = helper.make_node("Resize", ["conv1", "", "", "sizes"], ["mid"], name="resize", mode="linear")
    model = _conv_op_conv([resize], [const([1, 8, 12, 12], "sizes")], out_hw=(12, 12))
    _, pruned, removed = _assert_channels_pass(model)
    sizes = _initializer(pruned, _node(pruned, "resize").input[3])
    np.testing.assert_array_equal(sizes, [1, 8 - len(removed), 12, 12])


def test_resize_with_sizes_for_spatial_axes_only_keeps_them():
    resize = helper.make_node("Resize", ["conv1", "", "", "sizes"], ["mid"], name="resize", mode="nearest",
                              axes=[2, 3])
    model = _conv_op_conv([resize], [const([16, 16], "sizes")], opset=18, out_hw=(16, 16))
    _, pruned, _ = _assert_channels_pass(model)
    np.testing.assert_array_equal(_initializer(pruned, _node(pruned, "resize").input[3]), [16, 16])


def test_upsample_opset9_passes_channels_through():
    up = helper.make_node("Upsample", ["conv1", "scales"], ["mid"], name="up", mode="nearest")
    model = _conv_op_conv([up], [const([1.0, 1.0, 2.0, 2.0], "scales", np.float32)], opset=9, out_hw=(16, 16))
    _assert_channels_pass(model)


def test_pad_on_spatial_axes_as_an_attribute_passes_channels_through():
    pad = helper.make_node("Pad", ["conv1"], ["mid"], name="pad", pads=[0, 0, 1, 2, 0, 0, 1, 0], value=0.5)
    _assert_channels_pass(_conv_op_conv([pad], opset=10, out_hw=(10, 10)))


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad_on_spatial_axes_as_an_input_passes_channels_through(mode):
    pad = helper.make_node("Pad", ["conv1", "pads", "value"], ["mid"], name="pad", mode=mode)
    inits = [const([0, 0, 1, 2, 0, 0, 1, 0], "pads"), const(0.5, "value", np.float32)]
    _, pruned, _ = _assert_channels_pass(_conv_op_conv([pad], inits, opset=13, out_hw=(10, 10)))
    np.testing.assert_array_equal(_initializer(pruned, "pads"), [0, 0, 1, 2, 0, 0, 1, 0])


def test_pad_with_an_axes_input_on_spatial_axes_passes_channels_through():
    pad = helper.make_node("Pad", ["conv1", "pads", "", "axes"], ["mid"], name="pad")
    inits = [const([1, 2, 1, 0], "pads"), const([-2, -1], "axes")]
    _assert_channels_pass(_conv_op_conv([pad], inits, opset=18, out_hw=(10, 10)))


@pytest.mark.parametrize("form", ["attribute", "input"])
def test_pad_on_the_channel_axis_blocks_the_channels(form):
    pads = [0, 1, 0, 0, 0, 2, 0, 0]
    if form == "attribute":
        pad, inits, opset = helper.make_node("Pad", ["conv1"], ["mid"], name="pad", pads=pads), [], 10
    else:
        pad, inits, opset = helper.make_node("Pad", ["conv1", "pads"], ["mid"], name="pad"), [const(pads, "pads")], 13
    model = _conv_op_conv([pad], inits, opset=opset, mid_channels=11)
    group = _group_of(analysis_of(model), "conv1")
    assert not group.prunable
    assert any("Pad 'pad'" in r and "axis 1" in r for r in group.blocked), group.blocked


def _run_time_pads(gathered_axes):
    """pads = Concat([0, 0, 1, 1, 0, 0], Gather(Shape(conv1), gathered_axes)), as exporters write it."""
    return [
        helper.make_node("Shape", ["conv1"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "which"], ["dims"], name="gather", axis=0),
        helper.make_node("Concat", ["head_pads", "dims"], ["pads"], name="pads", axis=0),
        helper.make_node("Pad", ["conv1", "pads"], ["mid"], name="pad"),
    ], [const([0, 0, 1, 1, 0, 0], "head_pads"), const(gathered_axes, "which")]


def test_pad_with_amounts_computed_from_shapes_on_spatial_axes_passes_channels_through():
    nodes, inits = _run_time_pads([0, 0])  # end pads of H and W = the batch size
    _assert_channels_pass(_conv_op_conv(nodes, inits, opset=13, out_hw=(None, None)))


def test_pad_whose_amount_is_the_pruned_channel_count_blocks_the_channels():
    nodes, inits = _run_time_pads([1, 0])  # H padded by the channel count: pruning would move it
    group = _group_of(analysis_of(_conv_op_conv(nodes, inits, opset=13, out_hw=(None, None))), "conv1")
    assert not group.prunable
    assert any("Pad 'pad'" in r for r in group.blocked), group.blocked
