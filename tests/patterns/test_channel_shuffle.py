"""ShuffleNet's channel shuffle: Reshape(N,g,C/g,H,W) -> Transpose(0,2,1,3,4) -> Reshape(N,C,H,W).

A unit is one channel index inside every group of the grouped conv, so every
group keeps the same count, and the shuffle's Reshape targets shrink with it.
"""
import numpy as np
import pytest
from onnx import helper, numpy_helper

import onnxprune
from helpers import analysis_of, const, group_of, make_model, prune_matches_oracle, weight

C, H, W = 8, 4, 4
X = ("x", [1, 4, H, W])


def shuffle_model(groups, explicit_targets=True):
    """conv0 -> grouped 1x1 gconv -> shuffle -> depthwise dw -> conv_out."""
    per_group = C // groups
    if explicit_targets:
        split_target, merge_target = [1, groups, per_group, H, W], [1, C, H, W]
    else:
        split_target, merge_target = [0, groups, -1, H, W], [0, -1, H, W]
    nodes = [
        helper.make_node("Conv", ["x", "conv0.w"], ["a"], name="conv0", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Conv", ["a", "gconv.w", "gconv.b"], ["g"], name="gconv", kernel_shape=[1, 1], group=groups),
        helper.make_node("Relu", ["g"], ["g_act"], name="relu"),
        helper.make_node("Reshape", ["g_act", "split_target"], ["r5"], name="shuffle_split"),
        helper.make_node("Transpose", ["r5"], ["t5"], name="shuffle_transpose", perm=[0, 2, 1, 3, 4]),
        helper.make_node("Reshape", ["t5", "merge_target"], ["s"], name="shuffle_merge"),
        helper.make_node("Conv", ["s", "dw.w", "dw.b"], ["d"], name="dw", kernel_shape=[3, 3], pads=[1] * 4, group=C),
        helper.make_node("Conv", ["d", "conv_out.w"], ["y"], name="conv_out", kernel_shape=[1, 1]),
    ]
    inits = [
        weight(C, 4, 3, 3, name="conv0.w"),
        weight(C, C // groups, 1, 1, name="gconv.w"), weight(C, name="gconv.b"),
        const(split_target, "split_target"), const(merge_target, "merge_target"),
        weight(C, 1, 3, 3, name="dw.w"), weight(C, name="dw.b"),
        weight(3, C, 1, 1, name="conv_out.w"),
    ]
    return make_model(nodes, [X], [("y", [1, 3, H, W])], inits, opset=13)


def target_of(model, node_name):
    node = next(n for n in model.graph.node if n.name == node_name)
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == node.input[1])).tolist()


@pytest.mark.parametrize("groups", [2, 4])
def test_channel_shuffle_unit_is_one_channel_index_in_every_group(groups):
    analysis = analysis_of(shuffle_model(groups))
    per_group = C // groups
    shuffle = group_of(analysis, "gconv")
    assert shuffle.prunable, shuffle.blocked
    assert shuffle.size == per_group
    roots = analysis.root_of
    g_roots = roots[analysis.layouts["g"][1]].reshape(groups, per_group)
    assert (g_roots == g_roots[0]).all(), "channel j of every group is one unit"
    # after the shuffle, channel j*groups + k is channel j of group k
    s_roots = roots[analysis.layouts["s"][1]]
    np.testing.assert_array_equal(s_roots, np.repeat(g_roots[0], groups))
    # the depthwise conv passes them through to the last conv's input
    np.testing.assert_array_equal(roots[analysis.layouts["d"][1]], s_roots)
    # the grouped conv's input channels are coupled across groups too
    assert group_of(analysis, "conv0").size == per_group


@pytest.mark.parametrize("explicit_targets", [True, False], ids=["explicit_targets", "inferred_targets"])
@pytest.mark.parametrize("groups", [2, 4])
def test_channel_shuffle_prunes_and_rewrites_reshape_targets(groups, explicit_targets):
    model = shuffle_model(groups, explicit_targets)
    for seed in range(2):
        analysis, pruned, removed = prune_matches_oracle(model, 0.5, seed=seed)
        kept = C // groups - len(set(removed) & set(group_of(analysis, "gconv").roots.tolist()))
        gconv = next(n for n in pruned.graph.node if n.name == "gconv")
        assert helper.get_attribute_value(next(a for a in gconv.attribute if a.name == "group")) == groups
        dw = next(n for n in pruned.graph.node if n.name == "dw")
        assert helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group")) == groups * kept
        if explicit_targets:
            assert target_of(pruned, "shuffle_split") == [1, groups, kept, H, W]
            assert target_of(pruned, "shuffle_merge") == [1, groups * kept, H, W]
        else:
            assert target_of(pruned, "shuffle_split") == [0, groups, -1, H, W]
            assert target_of(pruned, "shuffle_merge") == [0, -1, H, W]


def runtime_shuffle_model(groups, batch):
    """The shuffle as torch's exporter writes it with a dynamic batch:
    b, c, h, w = x.size(); x.view(b, g, c // g, h, w).transpose(1, 2).view(b, -1, h, w)."""
    model = shuffle_model(groups)
    graph = model.graph
    dims = []
    nodes = [helper.make_node("Shape", ["g_act"], ["shp"], name="shape")]
    inits = [const([0], "unsq_axes"), const(groups, "groups_scalar"), const([groups], "groups_1d"),
             const([-1], "minus_one")]
    for i in range(4):
        inits.append(const(i, f"i{i}"))
        nodes.append(helper.make_node("Gather", ["shp", f"i{i}"], [f"d{i}"], name=f"gather{i}", axis=0))
        dims.append(f"d{i}")
    nodes += [
        helper.make_node("Div", ["d1", "groups_scalar"], ["per_group"], name="div"),
        helper.make_node("Cast", ["per_group"], ["per_group_i"], name="cast", to=7),
    ]
    unsq = {}
    for name in ["d0", "per_group_i", "d2", "d3"]:
        unsq[name] = f"{name}_1d"
        nodes.append(helper.make_node("Unsqueeze", [name, "unsq_axes"], [f"{name}_1d"], name=f"unsqueeze_{name}"))
    nodes += [
        helper.make_node("Concat", [unsq["d0"], "groups_1d", unsq["per_group_i"], unsq["d2"], unsq["d3"]],
                         ["split_target_rt"], name="concat_split", axis=0),
        helper.make_node("Concat", [unsq["d0"], "minus_one", unsq["d2"], unsq["d3"]],
                         ["merge_target_rt"], name="concat_merge", axis=0),
    ]
    old = list(graph.node)
    at = next(i for i, n in enumerate(old) if n.name == "shuffle_split")
    old[at].input[1] = "split_target_rt"
    next(n for n in old if n.name == "shuffle_merge").input[1] = "merge_target_rt"
    del graph.node[:]
    graph.node.extend(old[:at] + nodes + old[at:])
    keep = [t for t in graph.initializer if t.name not in ("split_target", "merge_target")]
    del graph.initializer[:]
    graph.initializer.extend(keep + inits)
    graph.input[0].type.tensor_type.shape.dim[0].Clear()
    graph.output[0].type.tensor_type.shape.dim[0].Clear()
    if isinstance(batch, str):
        graph.input[0].type.tensor_type.shape.dim[0].dim_param = batch
        graph.output[0].type.tensor_type.shape.dim[0].dim_param = batch
    else:
        graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
        graph.output[0].type.tensor_type.shape.dim[0].dim_value = batch
    return model


@pytest.mark.parametrize("batch", [1, "N"], ids=["static_batch", "dynamic_batch"])
@pytest.mark.parametrize("groups", [2, 4])
def test_channel_shuffle_with_run_time_targets_from_shape_is_prunable(groups, batch):
    # c // groups follows the pruned channel count: nothing to rewrite, nothing to block
    model = runtime_shuffle_model(groups, batch)
    analysis = analysis_of(model)
    group = group_of(analysis, "gconv")
    assert group.prunable, group.blocked
    assert group.size == C // groups
    for seed in range(2):
        _, pruned, _ = prune_matches_oracle(model, 0.5, seed=seed)
        assert not any(n.op_type == "Reshape" and n.input[1] in ("split_target", "merge_target")
                       for n in pruned.graph.node)


def test_channel_shuffle_with_a_hard_coded_group_size_at_run_time_is_rewritten():
    # view(b, g, 4, h, w) with b, h, w read at run time but C/g written as a literal:
    # the literal sits in the shape Concat's constant input and is set to the kept size
    model = runtime_shuffle_model(2, 1)
    graph = model.graph
    concat = next(n for n in graph.node if n.name == "concat_split")
    concat.input[2] = "literal_per_group"
    graph.initializer.append(const([C // 2], "literal_per_group"))
    assert group_of(analysis_of(model), "gconv").prunable
    prune_matches_oracle(model, fraction=0.5)


def chunk_unit(bound_from="channels"):
    """ShuffleNetV2's unit as the legacy exporter writes it with a dynamic batch:
    x1, x2 = conv0(x).chunk(2, dim=1), the bounds computed at run time as
    (Shape[1] + 1) / 2; cat(x1, branch(x2)) -> channel shuffle (2 groups) -> conv_out.

    bound_from="dynamic": the first half ends at a dimension of another input that
    is dynamic (not a channel count): nothing says where the halves meet.
    """
    c, half = 8, 4
    nodes = [
        helper.make_node("Conv", ["x", "conv0.w", "conv0.b"], ["a"], name="conv0", kernel_shape=[1, 1]),
        helper.make_node("Shape", ["a"], ["a_shape"], name="shape"),
        helper.make_node("Gather", ["a_shape", "one_1d"], ["channels"], name="gather", axis=0),
        helper.make_node("Add", ["channels", "one_1d"], ["channels_1"], name="add"),
        helper.make_node("Div", ["channels_1", "two_1d"], ["half"], name="div"),
        helper.make_node("Mul", ["half", "two_1d"], ["end2"], name="mul"),
        helper.make_node("Slice", ["a", "zero_1d", "half", "one_1d"], ["x1"], name="chunk_first"),
        helper.make_node("Slice", ["a", "half", "end2", "one_1d"], ["x2"], name="chunk_second"),
        helper.make_node("Conv", ["x2", "b1.w"], ["b1"], name="branch1", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["b1"], ["b1r"], name="branch_relu"),
        helper.make_node("Conv", ["b1r", "bdw.w"], ["bdw"], name="branch_dw", kernel_shape=[3, 3], pads=[1] * 4,
                         group=half),
        helper.make_node("Conv", ["bdw", "b2.w", "b2.b"], ["b2"], name="branch2", kernel_shape=[1, 1]),
        helper.make_node("Concat", ["x1", "b2"], ["cat"], name="cat", axis=1),
        helper.make_node("Reshape", ["cat", "split_target"], ["r5"], name="shuffle_split"),
        helper.make_node("Transpose", ["r5"], ["t5"], name="shuffle_transpose", perm=[0, 2, 1, 3, 4]),
        helper.make_node("Reshape", ["t5", "merge_target"], ["s"], name="shuffle_merge"),
        helper.make_node("Conv", ["s", "out.w"], ["y"], name="conv_out", kernel_shape=[1, 1]),
    ]
    inits = [
        weight(c, 4, 1, 1, name="conv0.w"), weight(c, name="conv0.b"),
        const([0], "zero_1d"), const([1], "one_1d"), const([2], "two_1d"),
        weight(half, half, 1, 1, name="b1.w"), weight(half, 1, 3, 3, name="bdw.w"),
        weight(half, half, 1, 1, name="b2.w"), weight(half, name="b2.b"),
        const([0, 2, -1, H, W], "split_target"), const([0, -1, H, W], "merge_target"),
        weight(3, c, 1, 1, name="out.w"),
    ]
    inputs = [("x", ["N", 4, H, W])]
    if bound_from == "dynamic":
        nodes[1] = helper.make_node("Shape", ["lengths"], ["a_shape"], name="shape")
        inputs.append(("lengths", [1, "n"]))
    return make_model(nodes, inputs, [("y", ["N", 3, H, W])], inits, opset=13)


def _bounds(model, name):
    node = next(n for n in model.graph.node if n.name == name)
    values = {t.name: numpy_helper.to_array(t).tolist() for t in model.graph.initializer}
    return values[node.input[1]], values[node.input[2]]


def test_chunk_with_bounds_from_the_channel_count_prunes_both_halves_freely():
    model = chunk_unit()
    analysis = analysis_of(model)
    conv0 = group_of(analysis, "conv0")
    assert conv0.prunable, conv0.blocked
    roots = analysis.root_of
    layout = roots[analysis.layouts["a"][1]]
    np.testing.assert_array_equal(roots[analysis.layouts["x1"][1]], layout[:4])
    np.testing.assert_array_equal(roots[analysis.layouts["x2"][1]], layout[4:])
    # the second half is consumed by the branch alone: its channels are not tied to the first half's
    assert not set(layout[:4].tolist()) & set(layout[4:].tolist())
    for seed in range(3):
        analysis, pruned, removed = prune_matches_oracle(model, 0.5, seed=seed)
        keep = analysis.keep_masks(removed).get(("a", 1), np.ones(8, bool))
        first, second = int(keep[:4].sum()), int(keep[4:].sum())
        assert _bounds(pruned, "chunk_first") == ([0], [first])
        assert _bounds(pruned, "chunk_second") == ([first], [first + second])


def test_chunk_bounds_from_a_dynamic_dimension_block_with_the_slice_named():
    analysis = analysis_of(chunk_unit(bound_from="dynamic"))
    conv0 = group_of(analysis, "conv0")
    assert not conv0.prunable
    assert any("Slice 'chunk_first': bounds computed at run time from dimensions that are not static" in r
               for r in conv0.blocked)
    assert group_of(analysis, "branch1").prunable


def test_lossless_removes_dead_channels_on_both_sides_of_a_chunk():
    model = chunk_unit()
    inits = {t.name: t for t in model.graph.initializer}

    def zero(name, rows):
        values = numpy_helper.to_array(inits[name]).copy()
        values[rows] = 0
        inits[name].CopyFrom(numpy_helper.from_array(values, name))

    # first half, channel 1: passed straight to the shuffle, where it is one unit with the
    # branch's output channel 1 (one channel index in both shuffle groups): both are dead
    zero("conv0.w", [1, 6]), zero("conv0.b", [1, 6]), zero("b2.w", [1]), zero("b2.b", [1])
    # second half, channel 6 (index 2 of x2): read only by the branch's first conv
    pruned, report = onnxprune.prune(model, lossless=True)
    assert numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == "conv0.w")).shape[0] == 6
    assert _bounds(pruned, "chunk_first") == ([0], [3])
    assert _bounds(pruned, "chunk_second") == ([3], [6])
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-5
