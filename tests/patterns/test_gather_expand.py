"""Gather, Expand and Tile: channels pass along axes the op leaves alone."""
import numpy as np
import pytest
from onnx import helper, numpy_helper

from helpers import analysis_of, blocked_reasons, const, conv, group_of, make_model, prune_matches_oracle, weight

C, H, W = 6, 4, 4
X = ("x", [1, 4, H, W])


def init(model, prefix):
    return next(t for t in model.graph.initializer if t.name.startswith(prefix))


def conv_then(nodes, inits, out_shape, opset=13):
    c0, c0_w = conv("conv0", "x", "c", 4, C)
    return make_model([c0, *nodes], [X], [("y", out_shape)], c0_w + list(inits), opset=opset)


# -- Gather -----------------------------------------------------------------------

def test_gather_rows_on_a_spatial_axis_passes_channels():
    head, head_w = conv("head", "g", "y", C, 3)
    model = conv_then(
        [helper.make_node("Gather", ["c", "rows"], ["g"], name="gather_rows", axis=2), head],
        [const([0, 2, 3], "rows"), *head_w],
        [1, 3, 3, W],
    )
    analysis = analysis_of(model)
    np.testing.assert_array_equal(analysis.layouts["g"][1], analysis.layouts["c"][1])
    assert group_of(analysis, "conv0").prunable
    _, pruned, removed = prune_matches_oracle(model, 0.5)
    assert init(pruned, "head.w").dims[1] == C - len(removed)


def test_gather_with_a_scalar_index_on_a_spatial_axis_drops_that_axis_and_passes_channels():
    # c[:, :, 0, :] -> (1, C, W) -> (1, W, C) @ (C, 5)
    model = conv_then(
        [helper.make_node("Gather", ["c", "row"], ["g"], name="gather_row", axis=2),
         helper.make_node("Transpose", ["g"], ["t"], name="transpose", perm=[0, 2, 1]),
         helper.make_node("MatMul", ["t", "fc.w"], ["y"], name="fc")],
        [const(0, "row"), weight(C, 5, name="fc.w")],
        [1, W, 5],
    )
    analysis = analysis_of(model)
    np.testing.assert_array_equal(analysis.layouts["g"][1], analysis.layouts["c"][1])
    assert group_of(analysis, "conv0").prunable
    prune_matches_oracle(model, 0.5)


def test_gather_on_the_channel_axis_blocks_with_a_reason():
    head, head_w = conv("head", "g", "y", 3, 2)
    model = conv_then(
        [helper.make_node("Gather", ["c", "channels"], ["g"], name="pick_channels", axis=1), head],
        [const([0, 2, 5], "channels"), *head_w],
        [1, 2, H, W],
    )
    group = group_of(analysis_of(model), "conv0")
    assert not group.prunable
    assert any("Gather 'pick_channels'" in r for r in group.blocked)
    assert any("Gather 'pick_channels'" in r for r in blocked_reasons(model))


# -- Expand -----------------------------------------------------------------------

EXPAND_SHAPES = {
    "full_rank_shape": [1, C, H, W],
    "shorter_shape": [C, H, W],
    "shorter_shape_broadcast_channels_only": [C, 1, 1],
}


@pytest.mark.parametrize("shape", EXPAND_SHAPES.values(), ids=EXPAND_SHAPES.keys())
def test_expand_with_the_channel_count_in_its_shape_is_rewritten(shape):
    # pooled (1, C, 1, 1) is expanded and added back to the map: a constant shape holds C
    head, head_w = conv("head", "s", "y", C, 3)
    model = conv_then(
        [helper.make_node("GlobalAveragePool", ["c"], ["p"], name="gap"),
         helper.make_node("Expand", ["p", "expand_shape"], ["e"], name="expand"),
         helper.make_node("Add", ["c", "e"], ["s"], name="add"),
         head],
        [const(shape, "expand_shape"), *head_w],
        [1, 3, H, W],
    )
    analysis = analysis_of(model)
    np.testing.assert_array_equal(analysis.layouts["e"][1], analysis.layouts["c"][1])
    assert group_of(analysis, "conv0").prunable
    for seed in range(2):
        _, pruned, removed = prune_matches_oracle(model, 0.5, seed=seed)
        node = next(n for n in pruned.graph.node if n.op_type == "Expand")
        new_shape = numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == node.input[1]))
        channel_pos = len(shape) - 3
        expected = list(shape)
        expected[channel_pos] = C - len(removed)
        assert new_shape.tolist() == expected


def test_expand_along_the_batch_axis_keeps_channels_prunable():
    head, head_w = conv("head", "e", "y", C, 3)
    model = conv_then(
        [helper.make_node("Expand", ["c", "expand_shape"], ["e"], name="expand"), head],
        [const([2, 1, 1, 1], "expand_shape"), *head_w],
        [2, 3, H, W],
    )
    assert group_of(analysis_of(model), "conv0").prunable
    _, pruned, _ = prune_matches_oracle(model, 0.5)
    node = next(n for n in pruned.graph.node if n.op_type == "Expand")
    assert node.input[1] == "expand_shape"  # nothing to rewrite


# -- Tile -------------------------------------------------------------------------

def test_tile_on_spatial_axes_passes_channels():
    head, head_w = conv("head", "t", "y", C, 3)
    model = conv_then(
        [helper.make_node("Tile", ["c", "repeats"], ["t"], name="tile"), head],
        [const([1, 1, 2, 2], "repeats"), *head_w],
        [1, 3, 2 * H, 2 * W],
    )
    analysis = analysis_of(model)
    np.testing.assert_array_equal(analysis.layouts["t"][1], analysis.layouts["c"][1])
    assert group_of(analysis, "conv0").prunable
    _, pruned, removed = prune_matches_oracle(model, 0.5)
    tile = next(n for n in pruned.graph.node if n.op_type == "Tile")
    assert tile.input[1] == "repeats"  # repeats hold no channel count


def test_tile_on_the_channel_axis_blocks_with_a_reason():
    head, head_w = conv("head", "t", "y", 2 * C, 3)
    model = conv_then(
        [helper.make_node("Tile", ["c", "repeats"], ["t"], name="tile"), head],
        [const([1, 2, 1, 1], "repeats"), *head_w],
        [1, 3, H, W],
    )
    group = group_of(analysis_of(model), "conv0")
    assert not group.prunable
    assert any("Tile 'tile'" in r and "axis 1" in r for r in group.blocked)


# -- Expand to a run-time shape (expand_as) --------------------------------------------

def expand_as_model(gate_nodes, gate_inits, gate):
    """c * gate.expand_as(c) -> head; gate is built by gate_nodes."""
    head, head_w = conv("head", "m", "y", C, 3)
    return conv_then(
        [*gate_nodes,
         helper.make_node("Shape", ["c"], ["c_shape"], name="shape"),
         helper.make_node("Expand", [gate, "c_shape"], ["e"], name="expand_as"),
         helper.make_node("Mul", ["c", "e"], ["m"], name="gate_mul"),
         head],
        [*gate_inits, *head_w],
        [1, 3, H, W],
    )


def test_expand_as_of_a_squeeze_excite_gate_keeps_the_group_prunable():
    model = expand_as_model(
        [helper.make_node("GlobalAveragePool", ["c"], ["p"], name="gap"),
         helper.make_node("Sigmoid", ["p"], ["gate"], name="sigmoid")],
        [], "gate",
    )
    analysis = analysis_of(model)
    np.testing.assert_array_equal(analysis.layouts["e"][1], analysis.layouts["c"][1])
    assert group_of(analysis, "conv0").prunable
    prune_matches_oracle(model, 0.5)


def test_expand_as_of_a_one_channel_spatial_mask_follows_the_pruned_channels():
    # a (1, 1, H, W) attention mask broadcast over c's channels at run time
    mask, mask_w = conv("mask_conv", "x", "mask", 4, 1)
    model = expand_as_model(
        [mask, helper.make_node("Sigmoid", ["mask"], ["gate"], name="sigmoid")],
        mask_w, "gate",
    )
    analysis = analysis_of(model)
    np.testing.assert_array_equal(analysis.layouts["e"][1], analysis.layouts["c"][1])
    group = group_of(analysis, "conv0")
    assert group.prunable, group.blocked
    prune_matches_oracle(model, 0.5)


def test_expand_as_of_another_groups_channels_couples_the_groups():
    # gate from conv1's channels expanded to the shape of conv0's output, used on its own
    c1, c1_w = conv("conv1", "x", "z", 4, C)
    head2, head2_w = conv("head2", "e", "y2", C, 3)
    c0, c0_w = conv("conv0", "x", "c", 4, C)
    head, head_w = conv("head", "c", "y", C, 3)
    model = make_model(
        [c0, c1, head,
         helper.make_node("GlobalAveragePool", ["z"], ["p"], name="gap"),
         helper.make_node("Shape", ["c"], ["c_shape"], name="shape"),
         helper.make_node("Expand", ["p", "c_shape"], ["e"], name="expand_as"),
         head2],
        [X], [("y", [1, 3, H, W]), ("y2", [1, 3, H, W])],
        c0_w + c1_w + head_w + head2_w,
    )
    analysis = analysis_of(model)
    assert group_of(analysis, "conv0").id == group_of(analysis, "conv1").id
    assert group_of(analysis, "conv0").prunable
    prune_matches_oracle(model, 0.5)


def test_zeros_like_from_constant_of_shape_follows_the_pruned_channels():
    # torch.zeros_like(c) + 1 -> ConstantOfShape(Shape(c)); used as an additive offset on c
    head, head_w = conv("head", "m", "y", C, 3)
    model = conv_then(
        [helper.make_node("Shape", ["c"], ["c_shape"], name="shape"),
         helper.make_node("ConstantOfShape", ["c_shape"], ["ones"], name="ones_like",
                          value=numpy_helper.from_array(np.ones(1, np.float32))),
         helper.make_node("Add", ["c", "ones"], ["m"], name="offset"),
         head],
        head_w,
        [1, 3, H, W],
    )
    analysis = analysis_of(model)
    np.testing.assert_array_equal(analysis.layouts["ones"][1], analysis.layouts["c"][1])
    assert group_of(analysis, "conv0").prunable
    prune_matches_oracle(model, 0.5)
