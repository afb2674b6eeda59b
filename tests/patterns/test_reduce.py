"""Reductions: over spatial axes channels pass; over the channel axis they are blocked."""
import numpy as np
import pytest
from onnx import helper

from helpers import analysis_of, blocked_reasons, const, conv, group_of, make_model, prune_matches_oracle, weight

C, H, W = 6, 4, 4
X = ("x", [1, 4, H, W])


def reduce_mean(opset, x, y, axes, keepdims, name="reduce"):
    """ReduceMean with axes as attribute (< 18) or constant input (>= 18); returns (node, inits)."""
    if opset < 18:
        return helper.make_node("ReduceMean", [x], [y], name=name, axes=axes, keepdims=keepdims), []
    return (helper.make_node("ReduceMean", [x, f"{name}.axes"], [y], name=name, keepdims=keepdims),
            [const(axes, f"{name}.axes")])


SPATIAL_CASES = {
    "keepdims1_attribute_axes_opset13": (13, 1),
    "keepdims0_attribute_axes_opset13": (13, 0),
    "keepdims1_input_axes_opset18": (18, 1),
    "keepdims0_input_axes_opset18": (18, 0),
}


@pytest.mark.parametrize("opset,keepdims", SPATIAL_CASES.values(), ids=SPATIAL_CASES.keys())
def test_reduce_mean_over_spatial_axes_passes_channels(opset, keepdims):
    c0, inits = conv("conv0", "x", "c", 4, C)
    rm, rm_inits = reduce_mean(opset, "c", "r", [2, 3], keepdims)
    if keepdims:  # (1, C, 1, 1) -> 1x1 conv
        head, head_inits = conv("head", "r", "y", C, 5, k=1)
        out_shape = [1, 5, 1, 1]
    else:  # (1, C) -> Gemm, the dynamo exporter's pooling head
        head = helper.make_node("Gemm", ["r", "head.w", "head.b"], ["y"], name="head", transB=1)
        head_inits = [weight(5, C, name="head.w"), weight(5, name="head.b")]
        out_shape = [1, 5]
    model = make_model([c0, rm, head], [X], [("y", out_shape)], inits + rm_inits + head_inits, opset=opset)
    analysis = analysis_of(model)
    np.testing.assert_array_equal(analysis.layouts["r"][1], analysis.layouts["c"][1])
    assert set(analysis.layouts["r"]) == {1}
    group = group_of(analysis, "conv0")
    assert group.prunable, group.blocked
    for seed in range(2):
        _, pruned, removed = prune_matches_oracle(model, 0.5, seed=seed)
        head_w = next(t for t in pruned.graph.initializer if t.name.startswith("head.w"))
        assert head_w.dims[1] == C - len(removed)


def channel_mixing_model(opset, mixer_nodes, mixer_inits, out_shape):
    """conv0 -> conv1 -> <mixer over channels> -> y.  conv0 never reaches the mixer."""
    c0, c0_w = conv("conv0", "x", "a", 4, C)
    c1, c1_w = conv("conv1", "a", "c", C, 8)
    return make_model([c0, c1, *mixer_nodes], [X], [("y", out_shape)], c0_w + c1_w + mixer_inits, opset=opset)


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce_mean_over_the_channel_axis_blocks_only_the_reduced_group(opset, keepdims):
    rm, rm_inits = reduce_mean(opset, "c", "y", [1], keepdims, name="channel_mean")
    out_shape = [1, 1, H, W] if keepdims else [1, H, W]
    model = channel_mixing_model(opset, [rm], rm_inits, out_shape)
    analysis = analysis_of(model)
    reduced = group_of(analysis, "conv1")
    assert not reduced.prunable
    assert any("ReduceMean 'channel_mean'" in r and "axis 1" in r for r in reduced.blocked)
    assert group_of(analysis, "conv0").prunable
    prune_matches_oracle(model, 0.5)


def test_reduce_over_all_axes_blocks_with_a_reason():
    # no axes: reduce everything (and the channel axis with it)
    rm = helper.make_node("ReduceSum", ["c"], ["y"], name="total", keepdims=0)
    model = channel_mixing_model(13, [rm], [], [])
    reasons = blocked_reasons(model)
    assert any("ReduceSum 'total'" in r for r in reasons)
    assert group_of(analysis_of(model), "conv0").prunable


@pytest.mark.parametrize("opset,axis", [(13, 1), (13, -3), (11, 1)], ids=["opset13", "opset13_negative", "opset11"])
def test_softmax_over_the_channel_axis_blocks_with_a_reason(opset, axis):
    sm = helper.make_node("Softmax", ["c"], ["s"], name="channel_softmax", axis=axis)
    head, head_w = conv("head", "s", "y", 8, 3, k=1)
    model = channel_mixing_model(opset, [sm, head], head_w, [1, 3, H, W])
    analysis = analysis_of(model)
    group = group_of(analysis, "conv1")
    assert not group.prunable
    assert any("Softmax 'channel_softmax'" in r and "axis 1" in r for r in group.blocked)
    prune_matches_oracle(model, 0.5)  # conv0 still prunes


def test_softmax_over_the_last_spatial_axis_passes_channels():
    sm = helper.make_node("Softmax", ["c"], ["s"], name="row_softmax", axis=-1)
    head, head_w = conv("head", "s", "y", 8, 3, k=1)
    model = channel_mixing_model(13, [sm, head], head_w, [1, 3, H, W])
    analysis = analysis_of(model)
    assert group_of(analysis, "conv1").prunable
    np.testing.assert_array_equal(analysis.layouts["s"][1], analysis.layouts["c"][1])
    prune_matches_oracle(model, 0.5)
