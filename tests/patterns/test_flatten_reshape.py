"""Flatten/Reshape into a classifier: channel c becomes features c*HW .. c*HW+HW-1."""
import numpy as np
import pytest
from onnx import helper, numpy_helper

from helpers import analysis_of, const, group_of, make_model, prune_matches_oracle, weight

C, H, W = 6, 4, 4
X = ("x", [1, 4, H, W])


def conv(name="conv0", x="x", y="c", cin=4, cout=C):
    node = helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [y], name=name, kernel_shape=[3, 3], pads=[1] * 4)
    return node, [weight(cout, cin, 3, 3, name=f"{name}.w"), weight(cout, name=f"{name}.b")]


def model_with(nodes, inits, out_shape, opset=13, batch=1):
    conv_node, conv_inits = conv()
    x = ("x", [batch, *X[1][1:]])
    return make_model([conv_node, *nodes], [x], [("y", out_shape)], conv_inits + list(inits), opset=opset)


def initializer(model, name):
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def assert_block_index_map(analysis, flat):
    """Feature f of `flat` belongs to channel f // HW of the conv."""
    np.testing.assert_array_equal(analysis.layouts[flat][1], np.repeat(analysis.layouts["c"][1], H * W))


def head_weight_rows(pruned, prefix):
    return next(t for t in pruned.graph.initializer if t.name.startswith(prefix))


# -- Flatten -> Gemm --------------------------------------------------------------

@pytest.mark.parametrize("trans_b", [0, 1])
def test_flatten_into_gemm_maps_each_channel_to_a_block_of_features(trans_b):
    gemm_w = weight(*((5, C * H * W) if trans_b else (C * H * W, 5)), name="fc.w")
    model = model_with(
        [helper.make_node("Flatten", ["c"], ["f"], name="flatten", axis=1),
         helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["y"], name="fc", transB=trans_b)],
        [gemm_w, weight(5, name="fc.b")],
        [1, 5],
    )
    analysis = analysis_of(model)
    assert_block_index_map(analysis, "f")
    group = group_of(analysis, "conv0")
    assert group.prunable and group.size == C
    assert any(p.tensor == "fc.w" and p.role == "weight_in" for p in group.params)
    for seed in range(2):
        _, pruned, removed = prune_matches_oracle(model, 0.5, seed=seed)
        w = head_weight_rows(pruned, "fc.w")
        assert w.dims[1 if trans_b else 0] == (C - len(removed)) * H * W


# -- Reshape -> MatMul ------------------------------------------------------------

RESHAPE_TARGETS = {
    "one_minus_one": [1, -1],
    "zero_minus_one": [0, -1],
    "explicit_feature_count": [1, C * H * W],
}


@pytest.mark.parametrize("target", RESHAPE_TARGETS.values(), ids=RESHAPE_TARGETS.keys())
def test_constant_reshape_into_matmul_prunes_and_rewrites_explicit_targets(target):
    model = model_with(
        [helper.make_node("Reshape", ["c", "target"], ["f"], name="reshape"),
         helper.make_node("MatMul", ["f", "fc.w"], ["y"], name="fc")],
        [const(target, "target"), weight(C * H * W, 5, name="fc.w")],
        [1, 5],
    )
    analysis = analysis_of(model)
    assert_block_index_map(analysis, "f")
    assert group_of(analysis, "conv0").prunable
    for seed in range(2):
        _, pruned, removed = prune_matches_oracle(model, 0.5, seed=seed)
        reshape = next(n for n in pruned.graph.node if n.op_type == "Reshape")
        new_target = initializer(pruned, reshape.input[1]).tolist()
        kept_features = (C - len(removed)) * H * W
        if -1 in target:
            assert reshape.input[1] == "target"  # an inferred axis needs no rewrite
            assert new_target == target
        else:
            assert new_target == [1, kept_features]
        assert head_weight_rows(pruned, "fc.w").dims[0] == kept_features


def test_reshape_to_channels_by_pixels_then_transpose_into_matmul():
    # (1, C, H, W) -> (1, C, HW) -> (1, HW, C) @ (C, 5): a token-style head
    model = model_with(
        [helper.make_node("Reshape", ["c", "target"], ["r"], name="reshape"),
         helper.make_node("Transpose", ["r"], ["t"], name="transpose", perm=[0, 2, 1]),
         helper.make_node("MatMul", ["t", "fc.w"], ["y"], name="fc")],
        [const([1, C, H * W], "target"), weight(C, 5, name="fc.w")],
        [1, H * W, 5],
    )
    analysis = analysis_of(model)
    np.testing.assert_array_equal(analysis.layouts["t"][2], analysis.layouts["c"][1])
    _, pruned, removed = prune_matches_oracle(model, 0.5)
    reshape = next(n for n in pruned.graph.node if n.op_type == "Reshape")
    assert initializer(pruned, reshape.input[1]).tolist() == [1, C - len(removed), H * W]


# -- run-time targets -------------------------------------------------------------

def runtime_target(parts):
    """Shape(c) -> Gather(i) -> Unsqueeze for int parts given as ('dim', i); constants as lists.

    Returns the nodes and initializers that compute Concat(parts) into 'target'.
    """
    nodes = [helper.make_node("Shape", ["c"], ["c_shape"], name="shape")]
    inits, pieces = [], []
    for k, part in enumerate(parts):
        if isinstance(part, tuple):
            _, axis = part
            inits += [const(axis, f"idx{k}"), const([0], f"unsq_axes{k}")]
            nodes += [
                helper.make_node("Gather", ["c_shape", f"idx{k}"], [f"dim{k}"], name=f"gather{k}", axis=0),
                helper.make_node("Unsqueeze", [f"dim{k}", f"unsq_axes{k}"], [f"dim{k}_1d"], name=f"unsqueeze{k}"),
            ]
            pieces.append(f"dim{k}_1d")
        else:
            inits.append(const(part, f"part{k}"))
            pieces.append(f"part{k}")
    nodes.append(helper.make_node("Concat", pieces, ["target"], name="target_concat", axis=0))
    return nodes, inits


def runtime_reshape_model(parts, consumer_nodes, consumer_inits, out_shape, batch=1):
    shape_nodes, shape_inits = runtime_target(parts)
    return model_with(
        [*shape_nodes, helper.make_node("Reshape", ["c", "target"], ["f"], name="reshape"), *consumer_nodes],
        shape_inits + consumer_inits,
        [batch, *out_shape[1:]],
        batch=batch,
    )


@pytest.mark.parametrize("batch", [1, "N"], ids=["static_batch", "dynamic_batch"])
def test_runtime_view_batch_minus_one_is_prunable(batch):
    # PyTorch's x.view(x.size(0), -1)
    model = runtime_reshape_model(
        [("dim", 0), [-1]],
        [helper.make_node("MatMul", ["f", "fc.w"], ["y"], name="fc")],
        [weight(C * H * W, 5, name="fc.w")],
        [1, 5],
        batch=batch,
    )
    analysis = analysis_of(model)
    assert_block_index_map(analysis, "f")
    group = group_of(analysis, "conv0")
    assert group.prunable, group.blocked
    for seed in range(2):
        prune_matches_oracle(model, 0.5, seed=seed)


def test_runtime_target_reading_the_channel_dimension_is_prunable():
    # x.view(x.size(0), x.size(1), -1): the channel count follows the pruned tensor
    model = runtime_reshape_model(
        [("dim", 0), ("dim", 1), [-1]],
        [helper.make_node("Transpose", ["f"], ["t"], name="transpose", perm=[0, 2, 1]),
         helper.make_node("MatMul", ["t", "fc.w"], ["y"], name="fc")],
        [weight(C, 5, name="fc.w")],
        [1, H * W, 5],
    )
    analysis = analysis_of(model)
    np.testing.assert_array_equal(analysis.layouts["f"][1], analysis.layouts["c"][1])
    assert group_of(analysis, "conv0").prunable
    prune_matches_oracle(model, 0.5)


def test_runtime_target_hard_coding_the_feature_count_is_rewritten():
    # x.view(x.size(0), 96): the literal 96 in the shape Concat becomes the kept feature count
    model = runtime_reshape_model(
        [("dim", 0), [C * H * W]],
        [helper.make_node("MatMul", ["f", "fc.w"], ["y"], name="fc")],
        [weight(C * H * W, 5, name="fc.w")],
        [1, 5],
    )
    assert group_of(analysis_of(model), "conv0").prunable
    prune_matches_oracle(model, fraction=0.5)


def test_runtime_target_hard_coding_the_channel_count_is_rewritten():
    # x.view(n, 6, h, w) rebuilt from Shape with the channel count as a literal
    model = runtime_reshape_model(
        [("dim", 0), [C], ("dim", 2), ("dim", 3)],
        [helper.make_node("Conv", ["f", "head.w"], ["y"], name="head", kernel_shape=[1, 1])],
        [weight(3, C, 1, 1, name="head.w")],
        [1, 3, H, W],
    )
    assert group_of(analysis_of(model), "conv0").prunable
    prune_matches_oracle(model, fraction=0.5)


# -- a run-time target read from another tensor's shape (x.view_as(other)) ----------

def test_reshape_to_the_shape_of_another_conv_output_couples_the_two_groups():
    # z.view_as(c): z's channels must shrink exactly like c's
    c0, c0_w = conv("conv0", "x", "c", 4, C)
    c1, c1_w = conv("conv1", "x", "z", 4, C)
    model = make_model(
        [c0, c1,
         helper.make_node("Shape", ["c"], ["c_shape"], name="shape"),
         helper.make_node("Reshape", ["z", "c_shape"], ["zr"], name="view_as"),
         helper.make_node("Conv", ["zr", "head_z.w"], ["y"], name="head_z", kernel_shape=[1, 1]),
         helper.make_node("Conv", ["c", "head_c.w"], ["y2"], name="head_c", kernel_shape=[1, 1])],
        [X], [("y", [1, 3, H, W]), ("y2", [1, 3, H, W])],
        c0_w + c1_w + [weight(3, C, 1, 1, name="head_z.w"), weight(3, C, 1, 1, name="head_c.w")],
    )
    analysis = analysis_of(model)
    assert group_of(analysis, "conv0").id == group_of(analysis, "conv1").id
    assert group_of(analysis, "conv0").prunable
    prune_matches_oracle(model, 0.5)


def test_reshape_of_unpruned_tensor_to_a_pruned_tensors_shape_blocks_that_tensor():
    # x.view_as(c) where x (the network input) cannot lose channels: c must keep its own
    c0, c0_w = conv("conv0", "x", "c", 4, 4)
    c1, c1_w = conv("conv1", "c", "c1", 4, 5)
    model = make_model(
        [c0, c1,
         helper.make_node("Shape", ["c"], ["c_shape"], name="shape"),
         helper.make_node("Reshape", ["x", "c_shape"], ["xr"], name="view_as"),
         helper.make_node("Conv", ["xr", "head.w"], ["y"], name="head", kernel_shape=[1, 1]),
         helper.make_node("Conv", ["c1", "tail.w"], ["y2"], name="tail", kernel_shape=[1, 1])],
        [X], [("y", [1, 3, H, W]), ("y2", [1, 3, H, W])],
        c0_w + c1_w + [weight(3, 4, 1, 1, name="head.w"), weight(3, 5, 1, 1, name="tail.w")],
    )
    analysis = analysis_of(model)
    group = group_of(analysis, "conv0")
    assert not group.prunable
    assert any("Reshape 'view_as'" in r for r in group.blocked)
    assert group_of(analysis, "conv1").prunable
    prune_matches_oracle(model, 0.5)


# -- heads folded into a dynamic batch axis (SDPA exports: (batch, heads, S, d) -> (heads*batch, S, d)) --

def folded_heads(between):
    """x (batch, 3, 64) -> 4 heads of 16 -> folded (4*batch, 3, 16) -> `between` -> unfolded by the
    heads tensor's own Shape[0:2] -> merged back to (batch, 3, 64) -> o_proj."""
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
        helper.make_node("Reshape", ["q", "split_heads"], ["qh"], name="split"),
        helper.make_node("Transpose", ["qh"], ["qt"], name="to_heads", perm=[0, 2, 1, 3]),
        helper.make_node("Shape", ["qt"], ["qt_shape"], name="shape"),
        helper.make_node("Slice", ["qt_shape", "zero", "two"], ["batch_heads"], name="batch_heads"),
        helper.make_node("Reshape", ["qt", "fold"], ["folded"], name="fold"),
        *between,
        helper.make_node("Concat", ["batch_heads", "seq_dim"], ["unfold_shape"], name="unfold_shape", axis=0),
        helper.make_node("Reshape", ["mixed", "unfold_shape"], ["unfolded"], name="unfold"),
        helper.make_node("Transpose", ["unfolded"], ["back"], name="from_heads", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["back", "merge_heads"], ["ctx"], name="merge"),
        helper.make_node("MatMul", ["ctx", "wo"], ["y"], name="o_proj"),
    ]
    inits = [weight(64, 64, name="wq"), weight(64, 8, name="wo"), const([0, 3, 4, 16], "split_heads"),
             const([-1, 3, 16], "fold"), const([0], "zero"), const([2], "two"), const([3, 16], "seq_dim"),
             const([0, 3, 64], "merge_heads")]
    return make_model(nodes, [("x", ["batch", 3, 64])], [("y", ["batch", 3, 8])], inits)


def test_heads_folded_into_the_batch_axis_are_followed_through_the_fold_and_back():
    model = folded_heads([helper.make_node("Transpose", ["folded"], ["t1"], name="t1", perm=[0, 2, 1]),
                          helper.make_node("Transpose", ["t1"], ["mixed"], name="t2", perm=[0, 2, 1])])
    analysis = analysis_of(model)
    heads = group_of(analysis, "q_proj")
    assert heads.prunable and heads.kind == "heads" and (heads.size, heads.head_dim) == (4, 16)
    assert analysis.view.shape("folded")[0] == "4*batch"  # stays dynamic: its layout is one period of 4 heads
    for seed in range(2):
        _, pruned, _ = prune_matches_oracle(model, 0.5, seed=seed)


def test_an_op_that_does_not_know_the_fold_keeps_the_heads():
    analysis = analysis_of(folded_heads([helper.make_node("Relu", ["folded"], ["mixed"], name="relu")]))
    heads = group_of(analysis, "q_proj")
    assert not heads.prunable
    assert "Relu 'relu' reads units folded into the dynamic axis 0" in heads.blocked[0]
