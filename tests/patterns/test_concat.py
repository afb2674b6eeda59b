"""Concat: each input keeps its own units, placed at its offset along the axis."""
import numpy as np
import pytest
from onnx import helper, numpy_helper

import onnxprune
from helpers import analysis_of, const, conv, make_model, prune_matches_oracle, weight

X = ("x", [1, 4, 8, 8])


def build(items, outputs=(("y", [1, None, 8, 8]),), inputs=(X,)):
    """items: conv specs (name, x, y, cin, cout) or ready nodes, in graph order."""
    nodes, inits = [], []
    for item in items:
        if isinstance(item, tuple):
            node, ws = conv(*item)
            nodes.append(node)
            inits += ws
        else:
            nodes.append(item)
    return make_model(nodes, list(inputs), list(outputs), inits)


def concat(name, inputs, y, axis=1):
    return helper.make_node("Concat", inputs, [y], name=name, axis=axis)


def two_sources_into_head():
    return build([
        ("convA", "x", "a", 4, 6),
        ("convB", "x", "b", 4, 5),
        concat("cat", ["a", "b"], "c"),
        ("head", "c", "y", 11, 3),
    ])


def test_concat_of_two_convs_keeps_each_source_a_separate_group():
    model = two_sources_into_head()
    analysis = analysis_of(model)
    group_a, group_b = group_of(analysis, "convA"), group_of(analysis, "convB")
    assert group_a.id != group_b.id
    assert group_a.size == 6 and group_b.size == 5
    assert group_a.prunable and group_b.prunable
    # offset map: c's channels are a's units, then b's units
    np.testing.assert_array_equal(
        analysis.layouts["c"][1], np.concatenate([analysis.layouts["a"][1], analysis.layouts["b"][1]])
    )
    assert not group_of(analysis, "head").prunable  # its output is the graph output
    _, pruned, removed = prune_matches_oracle(model, 0.5, seed=1)
    assert init(pruned, "head.w").dims[1] == 11 - len(removed)


def test_concat_sources_prune_independently_with_any_selection():
    model = two_sources_into_head()
    for seed in range(3):
        prune_matches_oracle(model, 0.34, seed=seed)


def test_nested_concat_composes_offsets():
    model = build([
        ("convA", "x", "a", 4, 4),
        ("convB", "x", "b", 4, 5),
        ("convC", "x", "c", 4, 6),
        concat("cat_inner", ["a", "b"], "ab"),
        concat("cat_outer", ["c", "ab"], "abc"),
        ("head", "abc", "y", 15, 3),
    ])
    analysis = analysis_of(model)
    la, lb, lc = (analysis.layouts[t][1] for t in "abc")
    np.testing.assert_array_equal(analysis.layouts["abc"][1], np.concatenate([lc, la, lb]))
    groups = [group_of(analysis, n) for n in ("convA", "convB", "convC")]
    assert len({g.id for g in groups}) == 3
    assert all(g.prunable for g in groups)
    for seed in range(2):
        prune_matches_oracle(model, 0.5, seed=seed)


def test_concat_with_network_input_keeps_input_channels_and_prunes_the_conv():
    model = build([
        ("convA", "x", "a", 4, 6),
        concat("cat", ["x", "a"], "c"),
        ("head", "c", "y", 10, 3),
    ])
    analysis = analysis_of(model)
    layout = analysis.layouts["c"][1]
    assert (layout[:4] == -1).all(), "the network input's channels carry no units"
    np.testing.assert_array_equal(layout[4:], analysis.layouts["a"][1])
    assert group_of(analysis, "convA").prunable
    assert not any(g.blocked for g in analysis.groups if g.name == "convA")
    _, pruned, removed = prune_matches_oracle(model, 0.5)
    assert init(pruned, "head.w").dims[1] == 10 - len(removed)  # all 4 input channels survive


def test_concat_then_residual_add_couples_units_across_offsets():
    # cat(a[4], b[5]) + d[9]: d's channels 0..3 couple with a's, 4..8 with b's
    model = build([
        ("convA", "x", "a", 4, 4),
        ("convB", "x", "b", 4, 5),
        ("convD", "x", "d", 4, 9),
        concat("cat", ["a", "b"], "c"),
        helper.make_node("Add", ["c", "d"], ["s"], name="add"),
        ("head", "s", "y", 9, 2),
    ])
    analysis = analysis_of(model)
    group = group_of(analysis, "convD")
    # convD's units join both concat sources: one group holding all three
    assert group_of(analysis, "convA").id == group_of(analysis, "convB").id == group.id
    assert {s.node for s in group.sources} == {"convA", "convB", "convD"}
    assert group.size == 9 and group.prunable
    roots = analysis.root_of
    la, lb, ld = (analysis.layouts[t][1] for t in "abd")
    np.testing.assert_array_equal(roots[ld[:4]], roots[la])
    np.testing.assert_array_equal(roots[ld[4:]], roots[lb])
    for seed in range(3):  # 3 of 9 removed: never a whole concat piece
        _, pruned, removed = prune_matches_oracle(model, 0.34, seed=seed)
        assert init(pruned, "convD.w").dims[0] == 9 - len(removed)
        assert init(pruned, "head.w").dims[1] == 9 - len(removed)


def test_concat_of_a_tensor_with_itself_repeats_its_units():
    # torch.cat([a, a], 1): channel c and channel c + 6 are the same unit
    model = build([
        ("convA", "x", "a", 4, 6),
        concat("cat", ["a", "a"], "c"),
        ("head", "c", "y", 12, 3),
    ])
    analysis = analysis_of(model)
    la = analysis.layouts["a"][1]
    np.testing.assert_array_equal(analysis.layouts["c"][1], np.concatenate([la, la]))
    assert group_of(analysis, "convA").size == 6
    _, pruned, removed = prune_matches_oracle(model, 0.5)
    assert init(pruned, "head.w").dims[1] == 2 * (6 - len(removed))


def test_concat_along_a_spatial_axis_couples_the_channels_of_both_inputs():
    model = build([
        ("convA", "x", "a", 4, 6),
        ("convB", "x", "b", 4, 6),
        concat("cat_rows", ["a", "b"], "c", axis=2),
        ("head", "c", "y", 6, 3),
    ], outputs=(("y", [1, 3, 16, 8]),))
    analysis = analysis_of(model)
    group = group_of(analysis, "convA")
    assert group.id == group_of(analysis, "convB").id
    assert group.size == 6 and group.prunable
    prune_matches_oracle(model, 0.5)


def test_concat_along_a_spatial_axis_with_the_network_input_blocks_the_conv():
    # the input's channels cannot go, so the conv's channels it is stacked with cannot either
    model = build([
        ("convA", "x", "a", 4, 4),
        concat("cat_rows", ["x", "a"], "c", axis=2),
        ("head", "c", "y", 4, 3),
    ], outputs=(("y", [1, 3, 16, 8]),))
    group = group_of(analysis_of(model), "convA")
    assert not group.prunable
    assert any("Concat 'cat_rows'" in r for r in group.blocked)


def test_concat_along_an_axis_of_unknown_size_still_couples_the_channels():
    # a key-cache Concat along the sequence: its length is only known at run time, the heads are not
    model = build([
        ("convA", "x", "a", 4, 6),
        ("convB", "x", "b", 4, 6),
        concat("cat_rows", ["a", "b"], "c", axis=2),
        ("head", "c", "y", 6, 3),
    ], inputs=(("x", [1, 4, "rows", 8]),), outputs=(("y", [1, 3, None, 8]),))
    analysis = analysis_of(model)
    group = group_of(analysis, "convA")
    assert group.id == group_of(analysis, "convB").id and group.prunable
    _, pruned, removed = prune_matches_oracle(model, 0.5)
    assert init(pruned, "head.w").dims[1] == 6 - len(removed)


def init(model, prefix):
    """The (possibly renamed) initializer whose name starts with `prefix`."""
    return next(t for t in model.graph.initializer if t.name.startswith(prefix))


def group_of(analysis, source_node):
    """The group a source node's units ended up in."""
    return next(g for g in analysis.groups if any(s.node == source_node for s in g.sources))


# -- ViT's class token: Concat([Expand(cls_token), patches], axis=1) --------------------------------------

def class_token_model(hidden_element=8, token_width=8, second_reader=False):
    """A patch embedding (Conv 3 -> 8, 2x2 patches of a 4x4 image: 4 tokens), the class token
    [1, 1, token_width] expanded to [batch, 1, 8] and put first along the sequence, position
    embeddings added, then a MatMul reading the 8 hidden channels.

    The Expand's shape is Concat(Shape(x)[:1], [1], [hidden_element]), as
    `cls_token.expand(x.shape[0], 1, 8)` exports it (8: a literal the rewrite sets to the
    kept width; 1: the token's own width, which follows its slicing)."""
    nodes = [
        helper.make_node("Conv", ["x", "patch.w", "patch.b"], ["p"], name="patch", kernel_shape=[2, 2],
                         strides=[2, 2]),
        helper.make_node("Reshape", ["p", "flat"], ["pf"], name="flatten"),
        helper.make_node("Transpose", ["pf"], ["tokens"], name="to_tokens", perm=[0, 2, 1]),
        helper.make_node("Expand", ["cls_token", "cls_shape"], ["cls"], name="expand_cls"),
        concat("cat_cls", ["cls", "tokens"], "seq"),
        helper.make_node("Add", ["seq", "pos"], ["emb"], name="add_pos"),
        helper.make_node("MatMul", ["emb", "proj"], ["y"], name="proj"),
    ]
    inits = [weight(8, 3, 2, 2, name="patch.w"), weight(8, name="patch.b"), const([0, 8, -1], "flat"),
             weight(1, 1, token_width, name="cls_token"), weight(1, 5, 8, name="pos"), weight(8, 6, name="proj")]
    nodes[3:3] = [helper.make_node("Shape", ["x"], ["x_shape"], name="shape", start=0, end=1),
                  helper.make_node("Concat", ["x_shape", "one", "hidden"], ["cls_shape"], name="cls_shape", axis=0)]
    inits += [const([1], "one"), const([hidden_element], "hidden")]
    outputs = [("y", ["N", 5, 6])]
    if second_reader:
        nodes.append(helper.make_node("ReduceSum", ["cls"], ["cls_sum"], name="cls_sum", keepdims=0))
        outputs.append(("cls_sum", []))
    return make_model(nodes, [("x", ["N", 3, 4, 4])], outputs, inits)


def _tensor(model, name):
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _expand_target(model):
    """The constant elements of the Expand's run-time shape ([1, hidden])."""
    node = next(n for n in model.graph.node if n.name == "expand_cls")
    names = {t.name for t in model.graph.initializer}
    shape_concat = next(n for n in model.graph.node if node.input[1] in n.output)
    return [v for i in shape_concat.input if i in names for v in _tensor(model, i).tolist()]


@pytest.mark.parametrize("hidden_element", [8, 1], ids=["literal_width", "token_width"])
def test_class_token_is_sliced_with_the_hidden_channels_it_is_concatenated_with(hidden_element):
    model = class_token_model(hidden_element)
    analysis = analysis_of(model)
    hidden = group_of(analysis, "patch")
    assert hidden.prunable, hidden.blocked
    assert ("cls_token", 2, "constant") in {(p.tensor, p.axis, p.role) for p in hidden.params}
    for seed in range(2):
        _, pruned, removed = prune_matches_oracle(model, 0.5, seed=seed)
        kept = 8 - len(removed)
        assert _tensor(pruned, "cls_token").shape == (1, 1, kept)
        assert _tensor(pruned, "pos").shape == (1, 5, kept)
        if hidden_element == 8:  # a 1 may stay or become the kept width: Expand reads both the same
            assert _expand_target(pruned) == [1, kept]


def test_lossless_removes_a_dead_hidden_channel_behind_the_class_token():
    model = class_token_model()
    inits = {t.name: t for t in model.graph.initializer}
    for name, index in (("patch.w", (3,)), ("patch.b", (3,)), ("cls_token", (0, 0, 3)), ("pos", (0, slice(None), 3))):
        values = numpy_helper.to_array(inits[name]).copy()
        values[index] = 0
        inits[name].CopyFrom(numpy_helper.from_array(values, name))
    pruned, report = onnxprune.prune(model, lossless=True)
    assert _tensor(pruned, "cls_token").shape == (1, 1, 7) and _tensor(pruned, "proj").shape == (7, 6)
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-5


@pytest.mark.parametrize("case", ["broadcast_token", "expand_read_twice"])
def test_class_token_that_cannot_follow_the_hidden_channels_blocks_them_with_a_reason(case):
    model = class_token_model(token_width=1) if case == "broadcast_token" else class_token_model(second_reader=True)
    hidden = group_of(analysis_of(model), "patch")
    assert not hidden.prunable
    assert any("Concat 'cat_cls' joins it with 'cls'" in r for r in hidden.blocked), hidden.blocked
