"""Gemm and MatMul: output features open units, the next layer's K rows consume
them; MatMul of two run-time tensors couples the contracted axes."""
import pytest
from onnx import helper, numpy_helper

from helpers import analysis_of, blocked_reasons, make_model, prune_matches_oracle, weight


def _initializer(model, name):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def _group_of(analysis, node_name):
    return next(g for g in analysis.groups if any(s.node == node_name for s in g.sources))


def _removed_in(group, removed):
    return sum(int(r) in removed for r in group.roots.tolist())


@pytest.mark.parametrize("trans_b", [0, 1], ids=["W_KxN", "W_NxK"])
@pytest.mark.parametrize("trans_a", [0, 1], ids=["A_MxK", "A_KxM"])
def test_gemm_output_features_are_cut_with_the_next_gemm_weight_rows_for_every_transpose_flag(trans_a, trans_b):
    """fc1 -> Relu -> [Transpose if transA] -> fc2 -> y; both Gemms use the flags."""
    def w(k, n, name):
        return weight(n, k, name=name) if trans_b else weight(k, n, name=name)

    inits = [w(6, 12, "w1"), weight(12, name="b1"), w(12, 5, "w2"), weight(5, name="b2")]
    x_shape = [6, 3] if trans_a else [3, 6]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["fc1"], name="fc1", transA=trans_a, transB=trans_b),
        helper.make_node("Relu", ["fc1"], ["relu"], name="relu"),
    ]
    fc2_in = "relu"
    if trans_a:  # fc2 reads its A operand as (K, M)
        nodes.append(helper.make_node("Transpose", ["relu"], ["relu_t"], name="relu_t", perm=[1, 0]))
        fc2_in = "relu_t"
    nodes.append(helper.make_node("Gemm", [fc2_in, "w2", "b2"], ["fc2"], name="fc2", transA=trans_a, transB=trans_b))
    model = make_model(nodes, [("x", x_shape)], [("fc2", [3, 5])], inits)
    analysis, pruned, removed = prune_matches_oracle(model)
    group = _group_of(analysis, "fc1")
    assert group.size == 12 and group.prunable
    kept = 12 - len(removed)
    n_axis, k_axis = (0, 1) if trans_b else (1, 0)
    assert _initializer(pruned, "w1").shape[n_axis] == kept
    assert _initializer(pruned, "w2").shape[k_axis] == kept
    assert _initializer(pruned, "b1").shape == (kept,)
    assert not _group_of(analysis, "fc2").prunable  # its output is the graph output


@pytest.mark.parametrize("bias_shape", [(12,), (1, 12), (3, 12), (1,)], ids=["N", "1xN", "MxN", "scalar"])
def test_gemm_bias_is_sliced_along_its_feature_axis_whatever_its_broadcast_shape(bias_shape):
    inits = [weight(6, 12, name="w1"), weight(*bias_shape, name="b1"), weight(12, 5, name="w2")]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["fc1"], name="fc1", alpha=0.5, beta=2.0),
        helper.make_node("Relu", ["fc1"], ["relu"], name="relu"),
        helper.make_node("Gemm", ["relu", "w2"], ["fc2"], name="fc2"),
    ]
    model = make_model(nodes, [("x", [3, 6])], [("fc2", [3, 5])], inits)
    analysis, pruned, removed = prune_matches_oracle(model)
    kept = 12 - len(removed)
    expected = bias_shape[:-1] + ((kept,) if bias_shape[-1] == 12 else (1,))
    assert _initializer(pruned, "b1").shape == expected
    sliced = {p.tensor for p in _group_of(analysis, "fc1").params if p.role == "bias"}
    assert sliced == ({"b1"} if bias_shape[-1] == 12 else set())


def test_matmul_with_a_constant_weight_on_the_right_is_a_linear_layer():
    inits = [weight(6, 12, name="w1"), weight(12, name="b1"), weight(12, 5, name="w2")]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["mm1"], name="mm1"),
        helper.make_node("Add", ["mm1", "b1"], ["biased"], name="bias"),
        helper.make_node("Relu", ["biased"], ["relu"], name="relu"),
        helper.make_node("MatMul", ["relu", "w2"], ["mm2"], name="mm2"),
    ]
    model = make_model(nodes, [("x", [2, 3, 6])], [("mm2", [2, 3, 5])], inits)
    analysis, pruned, removed = prune_matches_oracle(model)
    group = _group_of(analysis, "mm1")
    assert group.size == 12 and group.prunable
    kept = 12 - len(removed)
    assert _initializer(pruned, "w1").shape == (6, kept)
    assert _initializer(pruned, "b1").shape == (kept,)
    assert _initializer(pruned, "w2").shape == (kept, 5)


def test_matmul_with_a_constant_weight_on_the_left_opens_units_on_the_row_axis():
    """W1 (12x6) @ x (6x4) -> Relu -> W2 (5x12) @ h: units are rows of h."""
    inits = [weight(12, 6, name="w1"), weight(5, 12, name="w2")]
    nodes = [
        helper.make_node("MatMul", ["w1", "x"], ["mm1"], name="mm1"),
        helper.make_node("Relu", ["mm1"], ["relu"], name="relu"),
        helper.make_node("MatMul", ["w2", "relu"], ["mm2"], name="mm2"),
    ]
    model = make_model(nodes, [("x", [6, 4])], [("mm2", [5, 4])], inits)
    analysis, pruned, removed = prune_matches_oracle(model)
    group = _group_of(analysis, "mm1")
    assert group.size == 12 and group.prunable
    kept = 12 - len(removed)
    assert _initializer(pruned, "w1").shape == (kept, 6)
    assert _initializer(pruned, "w2").shape == (5, kept)


def test_matmul_of_two_run_time_tensors_couples_their_contracted_axes():
    """scores = (x Wq) (x Wk)^T: Wq's and Wk's output features are one group."""
    inits = [weight(6, 8, name="wq"), weight(6, 8, name="wk")]
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="k"),
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="scores"),
    ]
    model = make_model(nodes, [("x", [2, 5, 6])], [("scores", [2, 5, 5])], inits)
    analysis, pruned, removed = prune_matches_oracle(model)
    group = _group_of(analysis, "q")
    assert group.size == 8 and group.prunable
    assert {s.node for s in group.sources} == {"q", "k"}
    assert len(analysis.prunable_groups()) == 1
    kept = 8 - len(removed)
    assert _initializer(pruned, "wq").shape == (6, kept)
    assert _initializer(pruned, "wk").shape == (6, kept)


def test_matmul_contracting_with_a_graph_input_blocks_the_features():
    inits = [weight(6, 8, name="wq")]
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
        helper.make_node("MatMul", ["q", "other"], ["out"], name="out"),
    ]
    model = make_model(nodes, [("x", [5, 6]), ("other", [8, 3])], [("out", [5, 3])], inits)
    group = _group_of(analysis_of(model), "q")
    assert not group.prunable
    assert any("MatMul 'out'" in r and "cannot be pruned" in r for r in group.blocked)


def test_gemm_whose_weight_is_a_graph_input_blocks_the_features_it_consumes():
    inits = [weight(6, 12, name="w1"), weight(12, name="b1")]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["fc1"], name="fc1"),
        helper.make_node("Relu", ["fc1"], ["relu"], name="relu"),
        helper.make_node("Gemm", ["relu", "w_runtime"], ["fc2"], name="fc2"),
    ]
    model = make_model(nodes, [("x", [3, 6]), ("w_runtime", [12, 5])], [("fc2", [3, 5])], inits)
    analysis = analysis_of(model)
    group = _group_of(analysis, "fc1")
    assert not group.prunable
    assert any("Gemm 'fc2'" in r and "w_runtime" in r and "run time" in r for r in group.blocked), group.blocked
    assert analysis.prunable_groups() == []
    assert any("w_runtime" in r for r in blocked_reasons(model))


def test_matmul_with_a_per_channel_batched_constant_weight_slices_its_batch_axis():
    """conv (1,8,4,4) @ W (8,4,5): W holds one 4x5 matrix per channel."""
    inits = [weight(8, 3, 3, 3, name="w1"), weight(8, 4, 5, name="w_per_channel"), weight(3, 8, 1, 1, name="w3")]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["conv1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("MatMul", ["conv1", "w_per_channel"], ["mm"], name="mm"),
        helper.make_node("Conv", ["mm", "w3"], ["conv3"], name="conv3"),
    ]
    model = make_model(nodes, [("x", [1, 3, 4, 4])], [("conv3", [1, 3, 4, 5])], inits)
    analysis, pruned, removed = prune_matches_oracle(model)
    group = _group_of(analysis, "conv1")
    assert group.size == 8 and group.prunable
    kept = 8 - sum(int(r) in removed for r in group.roots.tolist())
    assert _initializer(pruned, "w_per_channel").shape == (kept, 4, 5)


def test_matmul_sharing_a_batch_axis_with_a_graph_input_blocks_the_channels():
    inits = [weight(8, 3, 3, 3, name="w1"), weight(3, 8, 1, 1, name="w3")]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["conv1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("MatMul", ["conv1", "other"], ["mm"], name="mm"),
        helper.make_node("Conv", ["mm", "w3"], ["conv3"], name="conv3"),
    ]
    model = make_model(nodes, [("x", [1, 3, 4, 4]), ("other", [1, 8, 4, 5])], [("conv3", [1, 3, 4, 5])], inits)
    group = _group_of(analysis_of(model), "conv1")
    assert not group.prunable
    assert any("MatMul 'mm'" in r and "'other'" in r for r in group.blocked), group.blocked


def test_gemm_passes_row_units_through_and_slices_a_full_bias_with_them():
    """W1 (12x6) @ x -> h (12 rows = units) -> Gemm(h, W2, C (12x5)) -> W3 (3x12) @ ."""
    inits = [weight(12, 6, name="w1"), weight(4, 5, name="w2"), weight(12, 5, name="c"), weight(3, 12, name="w3")]
    nodes = [
        helper.make_node("MatMul", ["w1", "x"], ["rows"], name="rows"),
        helper.make_node("Gemm", ["rows", "w2", "c"], ["fc"], name="fc"),
        helper.make_node("MatMul", ["w3", "fc"], ["out"], name="out"),
    ]
    model = make_model(nodes, [("x", [6, 4])], [("out", [3, 5])], inits)
    analysis, pruned, removed = prune_matches_oracle(model)
    group = _group_of(analysis, "rows")
    assert group.size == 12 and group.prunable
    kept = 12 - sum(int(r) in removed for r in group.roots.tolist())
    assert _initializer(pruned, "c").shape[0] == kept
    assert _initializer(pruned, "w3").shape == (3, kept)
