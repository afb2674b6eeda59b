"""Broadcasting ops couple their inputs: residual Add/Sum tie both branches into
one group, squeeze-excite gates tie the gate conv to the features, per-channel
constants (biases, scales, PRelu slopes, Where conditions) are sliced with the
channels, and a run-time tensor that cannot lose channels pins them."""
import numpy as np
import pytest
from onnx import helper, numpy_helper

from helpers import analysis_of, blocked_reasons, const, make_model, prune_matches_oracle, weight

X = ("x", [1, 3, 8, 8])


def _conv(name, x, w, **attrs):
    return helper.make_node("Conv", [x, w], [name], name=name, **attrs)


def _initializer(model, name):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def _group_of(analysis, node_name):
    return next(g for g in analysis.groups if any(s.node == node_name for s in g.sources))


def _kept_channels(group, removed):
    """Unit index i of a conv's group is its output channel i."""
    return [i for i, r in enumerate(group.roots.tolist()) if r not in removed]


def test_residual_add_couples_both_branches_into_one_group():
    """h = conv0(x); s = h + conv2(relu(conv1(h))); y = head(s)."""
    inits = [weight(8, 3, 3, 3, name="w0"), weight(6, 8, 3, 3, name="w1"), weight(8, 6, 3, 3, name="w2"),
             weight(4, 8, 1, 1, name="wh")]
    nodes = [
        _conv("conv0", "x", "w0", pads=[1, 1, 1, 1]),
        _conv("conv1", "conv0", "w1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1"], ["relu"], name="relu"),
        _conv("conv2", "relu", "w2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["conv0", "conv2"], ["sum"], name="add"),
        _conv("head", "sum", "wh"),
    ]
    model = make_model(nodes, [X], [("head", [1, 4, 8, 8])], inits)
    analysis, pruned, removed = prune_matches_oracle(model)
    residual = _group_of(analysis, "conv0")
    assert residual.size == 8 and residual.prunable
    assert {s.node for s in residual.sources} == {"conv0", "conv2"}
    inner = _group_of(analysis, "conv1")
    assert inner.size == 6 and inner.prunable and inner.id != residual.id
    kept = 8 - sum(int(r) in removed for r in residual.roots.tolist())
    assert _initializer(pruned, "w0").shape[0] == kept
    assert _initializer(pruned, "w1").shape[1] == kept  # the branch input is cut too
    assert _initializer(pruned, "w2").shape[0] == kept
    assert _initializer(pruned, "wh").shape[1] == kept


def test_sum_of_three_branches_couples_all_three_convs():
    inits = [weight(8, 3, 3, 3, name="w0"), weight(8, 8, 3, 3, name="w1"), weight(8, 8, 3, 3, name="w2"),
             weight(4, 8, 1, 1, name="wh")]
    nodes = [
        _conv("conv0", "x", "w0", pads=[1, 1, 1, 1]),
        _conv("conv1", "conv0", "w1", pads=[1, 1, 1, 1]),
        _conv("conv2", "conv1", "w2", pads=[1, 1, 1, 1]),
        helper.make_node("Sum", ["conv0", "conv1", "conv2"], ["sum"], name="sum"),
        _conv("head", "sum", "wh"),
    ]
    model = make_model(nodes, [X], [("head", [1, 4, 8, 8])], inits)
    analysis, pruned, removed = prune_matches_oracle(model)
    group = _group_of(analysis, "conv0")
    assert group.size == 8 and group.prunable
    assert {s.node for s in group.sources} == {"conv0", "conv1", "conv2"}
    assert [g.name for g in analysis.prunable_groups()] == ["conv0"]
    kept = 8 - len(removed)
    assert _initializer(pruned, "w1").shape[:2] == (kept, kept)
    assert _initializer(pruned, "w2").shape[:2] == (kept, kept)


def test_squeeze_excite_gate_conv_is_coupled_with_the_features_it_scales():
    """f = conv0(x); gate = sigmoid(expand(relu(reduce(gap(f))))); y = head(f * gate)."""
    inits = [weight(8, 3, 3, 3, name="w0"), weight(4, 8, 1, 1, name="w_reduce"), weight(4, name="b_reduce"),
             weight(8, 4, 1, 1, name="w_expand"), weight(8, name="b_expand"), weight(4, 8, 1, 1, name="wh")]
    nodes = [
        _conv("conv0", "x", "w0", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["conv0"], ["pooled"], name="gap"),
        helper.make_node("Conv", ["pooled", "w_reduce", "b_reduce"], ["reduce"], name="reduce"),
        helper.make_node("Relu", ["reduce"], ["reduce_relu"], name="reduce_relu"),
        helper.make_node("Conv", ["reduce_relu", "w_expand", "b_expand"], ["expand"], name="expand"),
        helper.make_node("Sigmoid", ["expand"], ["gate"], name="gate"),
        helper.make_node("Mul", ["conv0", "gate"], ["scaled"], name="scale"),
        _conv("head", "scaled", "wh"),
    ]
    model = make_model(nodes, [X], [("head", [1, 4, 8, 8])], inits)
    analysis, pruned, removed = prune_matches_oracle(model)
    features = _group_of(analysis, "conv0")
    assert features.size == 8 and features.prunable
    assert {s.node for s in features.sources} == {"conv0", "expand"}
    squeeze = _group_of(analysis, "reduce")
    assert squeeze.size == 4 and squeeze.prunable and squeeze.id != features.id
    kept = 8 - sum(int(r) in removed for r in features.roots.tolist())
    kept_squeeze = 4 - sum(int(r) in removed for r in squeeze.roots.tolist())
    assert _initializer(pruned, "w_reduce").shape[:2] == (kept_squeeze, kept)
    assert _initializer(pruned, "w_expand").shape[:2] == (kept, kept_squeeze)
    assert _initializer(pruned, "b_expand").shape == (kept,)


def _conv_op_conv(op_nodes, extra_inits, opset=17, extra_inputs=()):
    """x -> conv1 (8 ch) -> <op_nodes: 'conv1' -> 'mid'> -> conv2 (4 ch)."""
    inits = [weight(8, 3, 3, 3, name="w1"), weight(4, 8, 3, 3, name="w2"), *extra_inits]
    nodes = [
        _conv("conv1", "x", "w1", pads=[1, 1, 1, 1]),
        *op_nodes,
        _conv("conv2", "mid", "w2", pads=[1, 1, 1, 1]),
    ]
    return make_model(nodes, [X, *extra_inputs], [("conv2", [1, 4, 8, 8])], inits, opset=opset)


def test_where_with_a_per_channel_constant_condition_slices_the_condition():
    cond = np.array([True, False] * 4).reshape(8, 1, 1)
    model = _conv_op_conv(
        [helper.make_node("Where", ["cond", "conv1", "fill"], ["mid"], name="where")],
        [const(cond, "cond", np.bool_), const(0.25, "fill", np.float32)],
    )
    analysis, pruned, removed = prune_matches_oracle(model)
    group = _group_of(analysis, "conv1")
    assert group.prunable and ("cond", "constant") in {(p.tensor, p.role) for p in group.params}
    np.testing.assert_array_equal(_initializer(pruned, "cond"), cond[_kept_channels(group, removed)])
    assert _initializer(pruned, "fill").shape == ()


def test_prelu_with_a_per_channel_slope_slices_the_slope():
    slope = weight(8, 1, 1, name="slope")
    model = _conv_op_conv([helper.make_node("PRelu", ["conv1", "slope"], ["mid"], name="prelu")], [slope])
    analysis, pruned, removed = prune_matches_oracle(model)
    assert _group_of(analysis, "conv1").prunable
    assert _initializer(pruned, "slope").shape == (8 - len(removed), 1, 1)


ARITHMETIC = [
    pytest.param(op, shape, const_first, id=f"{op}-{'c_op_x' if const_first else 'x_op_c'}-{sid}")
    for op in ("Add", "Mul", "Sub", "Div")
    for const_first in (False, True)
    for shape, sid in (((8, 1, 1), "per_channel"), ((), "scalar"))
    if not (op == "Div" and const_first)  # c / x divides by activations that may be ~0
]


@pytest.mark.parametrize("op,shape,const_first", ARITHMETIC)
def test_arithmetic_with_a_constant_slices_per_channel_constants_and_leaves_scalars(op, shape, const_first):
    values = np.random.default_rng(3).uniform(0.5, 1.5, shape).astype(np.float32)
    inputs = ["c", "conv1"] if const_first else ["conv1", "c"]
    model = _conv_op_conv([helper.make_node(op, inputs, ["mid"], name="arith")],
                          [numpy_helper.from_array(values, "c")])
    analysis, pruned, removed = prune_matches_oracle(model)
    group = _group_of(analysis, "conv1")
    assert group.size == 8 and group.prunable
    expected = values[_kept_channels(group, removed)] if shape else values
    np.testing.assert_array_equal(_initializer(pruned, "c"), expected)
    assert (("c", "constant") in {(p.tensor, p.role) for p in group.params}) == bool(shape)


def test_add_with_a_full_size_graph_input_blocks_the_channels():
    model = _conv_op_conv([helper.make_node("Add", ["conv1", "skip"], ["mid"], name="add")], [],
                          extra_inputs=[("skip", [1, 8, 8, 8])])
    group = _group_of(analysis_of(model), "conv1")
    assert not group.prunable
    assert any("Add 'add'" in r and "'skip'" in r and "cannot be pruned" in r for r in group.blocked), group.blocked
    assert any("skip" in r for r in blocked_reasons(model))


def test_add_with_a_broadcast_graph_input_leaves_the_channels_prunable():
    """A (1,1,H,W) run-time tensor has no channel axis to pin."""
    model = _conv_op_conv([helper.make_node("Add", ["conv1", "spatial"], ["mid"], name="add")], [],
                          extra_inputs=[("spatial", [1, 1, 8, 8])])
    analysis, _, _ = prune_matches_oracle(model)
    assert _group_of(analysis, "conv1").prunable
