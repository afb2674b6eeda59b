"""Attention as current exporters write it (issue 13): GPT-2's fused QKV projection (Conv1D:
flatten, Gemm, unflatten, Split), an additive per-head bias that meets a run-time mask before
the scores (Swin's relative position bias plus its shifted-window mask).  Heads prune, match the
masking oracle, and a head planted dead (zero values) goes with --lossless."""
import numpy as np
import pytest
from onnx import helper, numpy_helper

import onnxprune
from helpers import analysis_of, const, group_of, make_model, prune_matches_oracle, weight

D, H, HD, S = 32, 4, 8, 6


def _attention_core(q, k, v, out, nodes, inits, bias=None):
    """q, k, v (batch, S, D) -> heads -> softmax(q k^T / sqrt(hd) [+ bias]) v -> (batch, S, D)."""
    inits += [const([0, S, H, HD], "heads_shape"), const([0, S, D], "merge_shape"),
              numpy_helper.from_array(np.float32(HD ** -0.5), "scale")]
    for name, perm in ((q, [0, 2, 1, 3]), (k, [0, 2, 3, 1]), (v, [0, 2, 1, 3])):
        nodes += [helper.make_node("Reshape", [name, "heads_shape"], [f"{name}_h"], name=f"{name}_split"),
                  helper.make_node("Transpose", [f"{name}_h"], [f"{name}_t"], name=f"{name}_t", perm=perm)]
    nodes += [helper.make_node("MatMul", [f"{q}_t", f"{k}_t"], ["qk"], name="qk"),
              helper.make_node("Mul", ["qk", "scale"], ["scores0"], name="scale")]
    scores = "scores0"
    if bias is not None:
        nodes.append(helper.make_node("Add", [scores, bias], ["scores1"], name="add_bias"))
        scores = "scores1"
    nodes += [helper.make_node("Softmax", [scores], ["probs"], name="softmax", axis=-1),
              helper.make_node("MatMul", ["probs", f"{v}_t"], ["ctx_h"], name="pv"),
              helper.make_node("Transpose", ["ctx_h"], ["ctx_t"], name="ctx_t", perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctx_t", "merge_shape"], [out], name="merge")]


def fused_qkv(kind: str, dead_heads=(), rng_seed=0):
    """x (batch, S, D) -> one projection to [q | k | v] (3D wide) -> Split -> attention -> o_proj.

    kind "conv1d": GPT-2's Conv1D as both exporters write it (Reshape to 2-D, Gemm with bias,
    Reshape back, Split with sizes); "matmul": MatMul + bias Add, Split(num_outputs=3) (opset 18).
    dead_heads: their value columns (weight and bias) are zero.
    """
    rng = np.random.default_rng(rng_seed)
    w = (rng.standard_normal((D, 3 * D)) * D ** -0.5).astype(np.float32)
    b = (rng.standard_normal(3 * D) * 0.1).astype(np.float32)
    for h in dead_heads:
        w[:, 2 * D + h * HD: 2 * D + (h + 1) * HD] = 0
        b[2 * D + h * HD: 2 * D + (h + 1) * HD] = 0
    inits = [numpy_helper.from_array(w, "c_attn.weight"), numpy_helper.from_array(b, "c_attn.bias"),
             weight(D, D, name="c_proj.weight"), weight(D, name="c_proj.bias", scale=0.1)]
    nodes = []
    if kind == "conv1d":
        inits += [const([-1, D], "flat"), const([-1, S, 3 * D], "unflat"), const([D, D, D], "qkv_sizes")]
        nodes += [helper.make_node("Reshape", ["x", "flat"], ["x2"], name="flatten"),
                  helper.make_node("Gemm", ["x2", "c_attn.weight", "c_attn.bias"], ["qkv2"], name="c_attn"),
                  helper.make_node("Reshape", ["qkv2", "unflat"], ["qkv"], name="unflatten"),
                  helper.make_node("Split", ["qkv", "qkv_sizes"], ["q", "k", "v"], name="split", axis=2)]
        opset = 17
    else:
        nodes += [helper.make_node("MatMul", ["x", "c_attn.weight"], ["qkv0"], name="c_attn"),
                  helper.make_node("Add", ["qkv0", "c_attn.bias"], ["qkv"], name="c_attn_bias"),
                  helper.make_node("Split", ["qkv"], ["q", "k", "v"], name="split", axis=2, num_outputs=3)]
        opset = 18
    _attention_core("q", "k", "v", "ctx", nodes, inits)
    nodes += [helper.make_node("MatMul", ["ctx", "c_proj.weight"], ["o0"], name="c_proj"),
              helper.make_node("Add", ["o0", "c_proj.bias"], ["o"], name="c_proj_bias"),
              helper.make_node("Add", ["x", "o"], ["y"], name="residual")]
    return make_model(nodes, [("x", ["batch", S, D])], [("y", ["batch", S, D])], inits, opset=opset)


@pytest.mark.parametrize("kind", ["conv1d", "matmul"])
def test_a_fused_qkv_projection_prunes_whole_heads_across_its_q_k_and_v_columns(kind):
    analysis, pruned, removed = prune_matches_oracle(fused_qkv(kind))
    heads = group_of(analysis, "c_attn")
    assert heads.prunable and heads.kind == "heads" and (heads.size, heads.head_dim) == (H, HD)
    w = next(numpy_helper.to_array(t) for t in pruned.graph.initializer if t.name == "c_attn.weight")
    assert w.shape == (D, 3 * (D - HD * len(removed)))


@pytest.mark.parametrize("kind", ["conv1d", "matmul"])
def test_lossless_removes_a_head_whose_value_columns_in_a_fused_projection_are_zero(kind):
    """Only the head's V columns are zero (its Q and K columns are not): the zeros are tracked per
    position through the Gemm (or MatMul and bias Add), the reshapes and the Split."""
    pruned, report = onnxprune.prune(fused_qkv(kind, dead_heads=[1, 3]), lossless=True)
    assert [(c.before, c.after) for c in report.changes] == [(H, H - 2)]
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-5
    w = next(numpy_helper.to_array(t) for t in pruned.graph.initializer if t.name == "c_attn.weight")
    assert w.shape == (D, 3 * (D - 2 * HD))


def test_lossless_keeps_a_head_whose_values_are_only_partly_zero():
    model = fused_qkv("conv1d")
    w = next(t for t in model.graph.initializer if t.name == "c_attn.weight")
    values = numpy_helper.to_array(w).copy()
    values[:, 2 * D: 2 * D + HD - 1] = 0  # all but one value column of head 0
    w.CopyFrom(numpy_helper.from_array(values, w.name))
    b = next(t for t in model.graph.initializer if t.name == "c_attn.bias")
    bias = numpy_helper.to_array(b).copy()
    bias[2 * D: 2 * D + HD] = 0
    b.CopyFrom(numpy_helper.from_array(bias, b.name))
    _, report = onnxprune.prune(model, lossless=True)
    assert report.changes == []


def biased_attention(mask_shape=("batch", 1, S, S), second_reader=False, dead_heads=()):
    """Separate q, k, v projections; a constant per-head bias [1, H, S, S] (Swin's relative position
    bias) plus a run-time mask `mask_shape` (its shifted-window mask, the same for every head) is
    added to the scores.  second_reader: the summed bias is also a graph output."""
    rng = np.random.default_rng(1)
    inits = [weight(D, D, name=f"w{n}") for n in "qko"] + [weight(D, name=f"b{n}", scale=0.1) for n in "qko"]
    wv = (rng.standard_normal((D, D)) * D ** -0.5).astype(np.float32)
    bv = (rng.standard_normal(D) * 0.1).astype(np.float32)
    for h in dead_heads:
        wv[:, h * HD:(h + 1) * HD], bv[h * HD:(h + 1) * HD] = 0, 0
    inits += [numpy_helper.from_array(wv, "wv"), numpy_helper.from_array(bv, "bv"),
              weight(1, H, S, S, name="relative_position_bias")]
    nodes = []
    for n in "qkv":
        nodes += [helper.make_node("MatMul", ["x", f"w{n}"], [f"{n}0"], name=f"{n}_proj"),
                  helper.make_node("Add", [f"{n}0", f"b{n}"], [n], name=f"{n}_bias")]
    nodes.append(helper.make_node("Add", ["relative_position_bias", "mask"], ["bias"], name="bias_plus_mask"))
    _attention_core("q", "k", "v", "ctx", nodes, inits, bias="bias")
    nodes += [helper.make_node("MatMul", ["ctx", "wo"], ["o0"], name="o_proj"),
              helper.make_node("Add", ["o0", "bo"], ["o"], name="o_bias"),
              helper.make_node("Add", ["x", "o"], ["y"], name="residual")]
    outputs = [("y", ["batch", S, D])] + ([("bias", ["batch", H, S, S])] if second_reader else [])
    return make_model(nodes, [("x", ["batch", S, D]), ("mask", list(mask_shape))], outputs, inits)


def test_a_constant_per_head_bias_plus_a_run_time_mask_is_sliced_with_the_heads():
    analysis, pruned, removed = prune_matches_oracle(biased_attention())
    heads = group_of(analysis, "q_proj")
    assert heads.prunable and heads.kind == "heads" and heads.size == H
    assert any(p.tensor == "relative_position_bias" and p.axis == 1 for p in heads.params)
    bias = next(t for t in pruned.graph.initializer if t.name == "relative_position_bias")
    assert list(bias.dims) == [1, H - len(removed), S, S]


def test_lossless_removes_a_dead_head_behind_a_biased_and_masked_softmax():
    pruned, report = onnxprune.prune(biased_attention(dead_heads=[2]), lossless=True,
                                     input_shapes={"x": [2, S, D], "mask": [2, 1, S, S]})
    assert [(c.before, c.after) for c in report.changes] == [(H, H - 1)]
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-5


@pytest.mark.parametrize("mask_shape, second_reader", [
    (("batch", H, S, S), False),  # the run-time part differs per head
    (("batch", 1, S, S), True),   # the sum is read elsewhere too: it would have to shrink there
])
def test_a_bias_that_is_not_constant_along_the_heads_keeps_them(mask_shape, second_reader):
    heads = group_of(analysis_of(biased_attention(mask_shape, second_reader)), "q_proj")
    assert heads.blocked == ["Add 'add_bias' combines it with 'bias', whose channels cannot be pruned"]
