"""Split and Slice on the channel axis: offset maps, rewritten sizes and bounds."""
import numpy as np
import pytest
from onnx import helper, numpy_helper

from helpers import analysis_of, blocked_reasons, const, conv, group_of, make_model, prune_matches_oracle

INT64_MAX = np.iinfo(np.int64).max
X = ("x", [1, 4, 8, 8])


def build(items, outputs, opset, inits=()):
    """items: conv specs (name, x, y, cin, cout) or ready nodes, in graph order."""
    nodes, all_inits = [], list(inits)
    for item in items:
        if isinstance(item, tuple):
            node, ws = conv(*item)
            nodes.append(node)
            all_inits += ws
        else:
            nodes.append(item)
    return make_model(nodes, [X], [(name, [1, None, None, None]) for name in outputs], all_inits, opset=opset)


def node_of(model, op_type):
    return next(n for n in model.graph.node if n.op_type == op_type)


def int_values(model, node, attr, index):
    """An int list given as attribute `attr` or as constant input `index`."""
    for a in node.attribute:
        if a.name == attr:
            return list(helper.get_attribute_value(a))
    tensor = next(t for t in model.graph.initializer if t.name == node.input[index])
    return numpy_helper.to_array(tensor).tolist()


# -- Split ----------------------------------------------------------------------

def split_model(opset, sizes, *, form):
    """conv0 (8 ch) -> Split into len(sizes) pieces -> one conv per piece."""
    outs = [f"p{i}" for i in range(len(sizes))]
    attrs, inputs, inits = {"axis": 1}, ["c"], []
    if form == "attribute":
        attrs["split"] = sizes
    elif form == "input":
        inputs.append("split_sizes")
        inits.append(const(sizes, "split_sizes"))
    elif form == "num_outputs":
        attrs["num_outputs"] = len(sizes)
    split = helper.make_node("Split", inputs, outs, name="split", **attrs)
    items = [("conv0", "x", "c", 4, 8), split]
    items += [(f"conv_p{i}", out, f"y{i}", size, 3) for i, (out, size) in enumerate(zip(outs, sizes))]
    return build(items, [f"y{i}" for i in range(len(sizes))], opset, inits)


SPLIT_CASES = {
    "split_attribute_opset11": (11, [3, 5], "attribute"),
    "split_input_opset13": (13, [5, 3], "input"),
    "num_outputs_opset18": (18, [3, 3, 2], "num_outputs"),
    "equal_split_without_sizes_opset13": (13, [4, 4], "none"),
    "equal_split_without_sizes_opset11": (11, [4, 4], "none"),
}


@pytest.mark.parametrize("opset,sizes,form", SPLIT_CASES.values(), ids=SPLIT_CASES.keys())
def test_split_pieces_carry_offset_ranges_and_sizes_are_rewritten(opset, sizes, form):
    model = split_model(opset, sizes, form=form)
    analysis = analysis_of(model)
    source = analysis.layouts["c"][1]
    offsets = np.cumsum([0] + sizes)
    for i in range(len(sizes)):
        np.testing.assert_array_equal(analysis.layouts[f"p{i}"][1], source[offsets[i]:offsets[i + 1]])
    group = group_of(analysis, "conv0")
    assert group.prunable and group.size == 8
    for seed in range(2):
        # 1 of 8 removed: never a whole piece
        analysis, pruned, removed = prune_matches_oracle(model, 0.125, seed=seed)
        keep = analysis.keep_masks(removed)[("c", 1)]
        expected = [int(keep[a:b].sum()) for a, b in zip(offsets[:-1], offsets[1:])]
        split = node_of(pruned, "Split")
        assert int_values(pruned, split, "split", 1) == expected
        assert not any(a.name == "num_outputs" for a in split.attribute)


def test_split_removing_units_from_every_piece_matches_oracle():
    model = split_model(13, [4, 4], form="input")
    for seed in range(3):
        prune_matches_oracle(model, 0.25, seed=seed)


def test_split_along_a_spatial_axis_gives_every_piece_all_channels():
    split = helper.make_node("Split", ["c", "split_sizes"], ["top", "bottom"], name="split_rows", axis=2)
    model = build(
        [("conv0", "x", "c", 4, 8), split, ("conv_top", "top", "y0", 8, 3), ("conv_bottom", "bottom", "y1", 8, 3)],
        ["y0", "y1"], 13, [const([3, 5], "split_sizes")],
    )
    analysis = analysis_of(model)
    for piece in ("top", "bottom"):
        np.testing.assert_array_equal(analysis.layouts[piece][1], analysis.layouts["c"][1])
    assert group_of(analysis, "conv0").prunable
    _, pruned, _ = prune_matches_oracle(model, 0.5)
    assert int_values(pruned, node_of(pruned, "Split"), "split", 1) == [3, 5]


# -- Slice ----------------------------------------------------------------------

def slice_model(opset, starts, ends, axes, steps=None, *, cin_next):
    """conv0 (8 ch) -> Slice -> conv1."""
    if opset < 10:
        kwargs = {"starts": starts, "ends": ends}
        if axes is not None:
            kwargs["axes"] = axes
        node = helper.make_node("Slice", ["c"], ["s"], name="slice", **kwargs)
        inits = []
    else:
        inputs = ["c", "starts", "ends"]
        inits = [const(starts, "starts"), const(ends, "ends")]
        if axes is not None or steps is not None:
            inputs.append("axes")
            inits.append(const(axes, "axes"))
        if steps is not None:
            inputs.append("steps")
            inits.append(const(steps, "steps"))
        node = helper.make_node("Slice", inputs, ["s"], name="slice")
    return build([("conv0", "x", "c", 4, 8), node, ("conv1", "s", "y", cin_next, 3)], ["y"], opset, inits)


SLICE_CASES = {
    # (opset, starts, ends, axes, steps, channels kept by the slice)
    "attribute_opset9": (9, [2], [7], [1], None, range(2, 7)),
    "attribute_opset9_negative_start_int64_max_end": (9, [-6], [INT64_MAX], [1], None, range(2, 8)),
    "attribute_opset9_without_axes": (9, [0, 1], [1, 6], None, None, range(1, 6)),
    "input_opset13": (13, [1], [6], [1], None, range(1, 6)),
    "input_opset13_negative_bounds_and_axis": (13, [-7], [-1], [-3], [1], range(1, 7)),
    "input_opset13_int64_max_end": (13, [3], [INT64_MAX], [1], None, range(3, 8)),
    "input_opset13_channels_and_space": (13, [1, 1, 2], [7, 7, 7], [2, 1, 3], None, range(1, 7)),
}


@pytest.mark.parametrize("opset,starts,ends,axes,steps,kept", SLICE_CASES.values(), ids=SLICE_CASES.keys())
def test_slice_on_channels_carries_the_range_and_bounds_are_rewritten(opset, starts, ends, axes, steps, kept):
    kept = list(kept)
    model = slice_model(opset, starts, ends, axes, steps, cin_next=len(kept))
    analysis = analysis_of(model)
    np.testing.assert_array_equal(analysis.layouts["s"][1], analysis.layouts["c"][1][kept])
    assert group_of(analysis, "conv0").prunable
    for seed in range(3):
        # 2 of 8 removed: the slice always keeps a channel
        analysis, pruned, removed = prune_matches_oracle(model, 0.25, seed=seed)
        keep = analysis.keep_masks(removed)[("c", 1)]
        conv1_w = next(t for t in pruned.graph.initializer if t.name.startswith("conv1.w"))
        assert conv1_w.dims[1] == int(keep[kept].sum())


def test_slice_with_step_two_on_channels_is_blocked():
    model = slice_model(13, [0], [8], [1], [2], cin_next=4)
    analysis = analysis_of(model)
    group = group_of(analysis, "conv0")
    assert not group.prunable
    assert any("Slice 'slice'" in r and "step" in r for r in group.blocked)
    assert any("step" in r for r in blocked_reasons(model))


def test_slice_on_spatial_axes_passes_channels():
    model = slice_model(13, [1, 2], [7, 8], [2, 3], None, cin_next=8)
    analysis = analysis_of(model)
    np.testing.assert_array_equal(analysis.layouts["s"][1], analysis.layouts["c"][1])
    assert group_of(analysis, "conv0").prunable
    _, pruned, _ = prune_matches_oracle(model, 0.5)
    slice_node = node_of(pruned, "Slice")
    assert slice_node.input[1] == "starts" and slice_node.input[2] == "ends"  # untouched


def test_slice_with_step_two_on_spatial_axis_passes_channels():
    model = slice_model(13, [0], [8], [3], [2], cin_next=8)
    assert group_of(analysis_of(model), "conv0").prunable
    prune_matches_oracle(model, 0.5)
