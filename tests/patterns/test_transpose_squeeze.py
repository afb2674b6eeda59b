"""Transpose moves the unit axis; Squeeze/Unsqueeze shift it around size-1 axes."""
import numpy as np
import pytest
from onnx import helper

from helpers import analysis_of, const, conv, group_of, make_model, prune_matches_oracle, weight

C, H, W = 6, 4, 4
X = ("x", [1, 4, H, W])


def init(model, prefix):
    return next(t for t in model.graph.initializer if t.name.startswith(prefix))


# -- Transpose --------------------------------------------------------------------

def test_nchw_to_nhwc_transpose_before_matmul_moves_channels_to_the_last_axis():
    c0, c0_w = conv("conv0", "x", "c", 4, C)
    model = make_model(
        [c0,
         helper.make_node("Transpose", ["c"], ["t"], name="to_nhwc", perm=[0, 2, 3, 1]),
         helper.make_node("MatMul", ["t", "fc.w"], ["y"], name="fc")],
        [X], [("y", [1, H, W, 5])], c0_w + [weight(C, 5, name="fc.w")],
    )
    analysis = analysis_of(model)
    np.testing.assert_array_equal(analysis.layouts["t"][3], analysis.layouts["c"][1])
    assert 1 not in analysis.layouts["t"]
    group = group_of(analysis, "conv0")
    assert group.prunable
    assert any(p.tensor == "fc.w" and p.axis == 0 for p in group.params)
    _, pruned, removed = prune_matches_oracle(model, 0.5)
    assert init(pruned, "fc.w").dims[0] == C - len(removed)


def test_matmul_in_nhwc_transposed_back_feeds_a_conv():
    # a channels-last pointwise layer (MatMul) between two NCHW convs
    c0, c0_w = conv("conv0", "x", "c", 4, C)
    c1, c1_w = conv("conv1", "back", "y", 8, 3)
    model = make_model(
        [c0,
         helper.make_node("Transpose", ["c"], ["t"], name="to_nhwc", perm=[0, 2, 3, 1]),
         helper.make_node("MatMul", ["t", "pw.w"], ["m"], name="pw"),
         helper.make_node("Transpose", ["m"], ["back"], name="to_nchw", perm=[0, 3, 1, 2]),
         c1],
        [X], [("y", [1, 3, H, W])], c0_w + c1_w + [weight(C, 8, name="pw.w")],
    )
    analysis = analysis_of(model)
    np.testing.assert_array_equal(analysis.layouts["back"][1], analysis.layouts["m"][3])
    assert group_of(analysis, "conv0").prunable and group_of(analysis, "pw").prunable
    assert group_of(analysis, "conv0").id != group_of(analysis, "pw").id
    for seed in range(2):
        _, pruned, _ = prune_matches_oracle(model, 0.5, seed=seed)
        assert init(pruned, "conv1.w").dims[1] == 4


# -- Squeeze / Unsqueeze around a GlobalAveragePool -> Gemm head ------------------

def gap_head(opset, squeeze_axes, unsqueeze_axes):
    """conv0 -> GAP -> Squeeze -> Gemm(fc) -> Unsqueeze -> 1x1 conv."""
    c0, c0_w = conv("conv0", "x", "c", 4, C)
    c1, c1_w = conv("conv1", "u", "y", 8, 3, k=1)
    inits = c0_w + c1_w + [weight(C, 8, name="fc.w"), weight(8, name="fc.b")]
    if opset < 13:
        squeeze = helper.make_node("Squeeze", ["p"], ["s"], name="squeeze", axes=squeeze_axes)
        unsqueeze = helper.make_node("Unsqueeze", ["f"], ["u"], name="unsqueeze", axes=unsqueeze_axes)
    else:
        squeeze = helper.make_node("Squeeze", ["p", "sq_axes"], ["s"], name="squeeze")
        unsqueeze = helper.make_node("Unsqueeze", ["f", "unsq_axes"], ["u"], name="unsqueeze")
        inits += [const(squeeze_axes, "sq_axes"), const(unsqueeze_axes, "unsq_axes")]
    return make_model(
        [c0,
         helper.make_node("GlobalAveragePool", ["c"], ["p"], name="gap"),
         squeeze,
         helper.make_node("Gemm", ["s", "fc.w", "fc.b"], ["f"], name="fc"),
         unsqueeze,
         c1],
        [X], [("y", [1, 3, 1, 1])], inits, opset=opset,
    )


SQUEEZE_CASES = {
    "attribute_opset11": (11, [2, 3], [2, 3]),
    "attribute_opset11_negative_axes": (11, [-1, -2], [-2, -1]),
    "input_opset13": (13, [2, 3], [2, 3]),
    "input_opset13_negative_axes": (13, [-2, -1], [-1, -2]),
}


@pytest.mark.parametrize("opset,squeeze_axes,unsqueeze_axes", SQUEEZE_CASES.values(), ids=SQUEEZE_CASES.keys())
def test_squeeze_and_unsqueeze_around_gap_gemm_head_keep_both_groups_prunable(opset, squeeze_axes, unsqueeze_axes):
    model = gap_head(opset, squeeze_axes, unsqueeze_axes)
    analysis = analysis_of(model)
    np.testing.assert_array_equal(analysis.layouts["s"][1], analysis.layouts["c"][1])
    np.testing.assert_array_equal(analysis.layouts["u"][1], analysis.layouts["f"][1])
    conv_group, fc_group = group_of(analysis, "conv0"), group_of(analysis, "fc")
    assert conv_group.prunable and fc_group.prunable
    assert conv_group.id != fc_group.id
    for seed in range(2):
        _, pruned, _ = prune_matches_oracle(model, 0.5, seed=seed)
        assert init(pruned, "fc.w").dims == [3, 4]
        assert init(pruned, "conv1.w").dims[1] == 4


@pytest.mark.parametrize("opset", [11, 13])
def test_squeeze_without_axes_keeps_a_channel_axis_pruned_down_to_one(opset):
    # Squeeze() drops every size-1 axis: once conv0 keeps a single channel it must not drop that one
    c0, c0_w = conv("conv0", "x", "c", 4, 2)
    model = make_model(
        [c0,
         helper.make_node("GlobalAveragePool", ["c"], ["p"], name="gap"),
         helper.make_node("Squeeze", ["p"], ["s"], name="squeeze"),
         helper.make_node("Gemm", ["s", "fc.w"], ["y"], name="fc")],
        [("x", ["N", 4, H, W])], [("y", ["N", 5])], c0_w + [weight(2, 5, name="fc.w")], opset=opset,
    )
    analysis = analysis_of(model)
    np.testing.assert_array_equal(analysis.layouts["s"][1], analysis.layouts["c"][1])
    _, pruned, removed = prune_matches_oracle(model, 0.5)
    assert len(removed) == 1
    assert init(pruned, "fc.w").dims == [1, 5]
