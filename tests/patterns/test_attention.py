"""Attention as current exporters write it (issue 13): GPT-2's fused QKV projection (Conv1D:
flatten, Gemm, unflatten, Split), an additive per-head bias that meets a run-time mask before
the scores (Swin's relative position bias plus its shifted-window mask).  Heads prune, match the
masking oracle, and a head planted dead (zero values) goes with --lossless."""
import numpy as np
import pytest
from onnx import helper, numpy_helper

import onnxprune
import onnx

from helpers import analysis_of, const, group_of, make_model, prune_matches_oracle, run, weight

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


def zero_rows(model, weight_name: str, heads) -> onnx.ModelProto:
    """The rows of `weight_name` (an output projection, heads x head_dim rows) that read `heads`, zeroed."""
    w = next(t for t in model.graph.initializer if t.name == weight_name)
    values = numpy_helper.to_array(w).copy()
    for h in heads:
        values[h * HD:(h + 1) * HD] = 0
    w.CopyFrom(numpy_helper.from_array(values, w.name))
    return model


@pytest.fixture
def own_weights(monkeypatch):
    """Weights from a generator of the test's own: tests that run later draw the same weights as before."""
    import helpers
    monkeypatch.setattr(helpers, "RNG", np.random.default_rng(13))


def test_lossless_removes_a_query_head_whose_output_projection_rows_are_zero(own_weights):
    """The head computes values (its Q, K and V columns are not zero), but o_proj never reads them."""
    pruned, report = onnxprune.prune(zero_rows(fused_qkv("matmul"), "c_proj.weight", [2]), lossless=True)
    assert [(c.before, c.after) for c in report.changes] == [(H, H - 1)]
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-5
    assert [(c.heads, c.kv_heads) for c in report.attention] == [((H, H - 1), (H, H - 1))]


def test_lossless_removes_a_query_head_slot_only_when_no_group_reads_it(own_weights):
    """6 query heads over 2 KV heads: a unit is query head j of both groups (heads j and 3 + j). With
    o_proj's rows of heads 1 and 4 zero, slot 1 goes and the KV heads stay; with only head 1's, the
    slot is still read by the other group and stays."""
    _, report = onnxprune.prune(zero_rows(gqa(6, 2), "wo", [1, 4]), lossless=True)
    assert [(c.before, c.after) for c in report.changes] == [(3, 2)]
    assert [(c.heads, c.kv_heads) for c in report.attention] == [((6, 4), (2, 2))]
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-5
    _, report = onnxprune.prune(zero_rows(gqa(6, 2), "wo", [1]), lossless=True)
    assert report.changes == []


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


def static_sdpa(batch=2):
    """torch.onnx.export(dynamo=True) without dynamic shapes: SDPA's decomposition folds K's
    (batch, heads) into one static axis to transpose it: k (B, S, D) -> (B, S, H, hd) -> Transpose
    (0, 2, 1, 3) -> Reshape (B*H, S, hd) -> Transpose (0, 2, 1) -> Reshape (B, H, hd, S).
    The head split followed by a swap of two adjacent axes and a Reshape to the input's rank is
    not a channel shuffle: the swapped axes come from two input axes."""
    inits = [weight(D, D, name=f"w{n}") for n in "qkvo"] + [
        const([batch, S, H, HD], "heads_shape"), const([batch * H, S, HD], "fold"),
        const([batch, H, HD, S], "unfold"), const([batch, S, D], "merge_shape"),
        numpy_helper.from_array(np.float32(HD ** -0.5), "scale")]
    nodes = [helper.make_node("MatMul", ["x", f"w{n}"], [n], name=f"{n}_proj") for n in "qkv"]
    for n in "qkv":
        nodes += [helper.make_node("Reshape", [n, "heads_shape"], [f"{n}_h"], name=f"{n}_split"),
                  helper.make_node("Transpose", [f"{n}_h"], [f"{n}_t"], name=f"{n}_t", perm=[0, 2, 1, 3])]
    nodes += [helper.make_node("Reshape", ["k_t", "fold"], ["k_f"], name="k_fold"),
              helper.make_node("Transpose", ["k_f"], ["k_ft"], name="k_swap", perm=[0, 2, 1]),
              helper.make_node("Reshape", ["k_ft", "unfold"], ["k_T"], name="k_unfold"),
              helper.make_node("MatMul", ["q_t", "k_T"], ["qk"], name="qk"),
              helper.make_node("Mul", ["qk", "scale"], ["scores"], name="scale"),
              helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=-1),
              helper.make_node("MatMul", ["probs", "v_t"], ["ctx_h"], name="pv"),
              helper.make_node("Transpose", ["ctx_h"], ["ctx_t"], name="ctx_t", perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["ctx"], name="merge"),
              helper.make_node("MatMul", ["ctx", "wo"], ["o"], name="o_proj"),
              helper.make_node("Add", ["x", "o"], ["y"], name="residual")]
    return make_model(nodes, [("x", [batch, S, D])], [("y", [batch, S, D])], inits)


def test_heads_follow_a_static_fold_of_batch_and_heads():
    analysis, _, _ = prune_matches_oracle(static_sdpa())
    heads = group_of(analysis, "q_proj")
    assert heads.prunable and heads.kind == "heads" and (heads.size, heads.head_dim) == (H, HD)


def gqa(heads: int, kv_heads: int, dead_kv=(), traced_fold=False):
    """LLaMA-style grouped-query attention as the exporters write repeat_kv: k and v (batch, S,
    kv*hd) -> (batch, kv, S, hd) -> Unsqueeze(2) -> Expand (batch, kv, rep, S, hd) -> Reshape
    (batch, kv*rep, S, hd); q has `heads` heads.  dead_kv: those KV heads' values are zero.
    traced_fold: the fold's target as the legacy exporter traces it, (Shape[0], Shape[1] * rep, -1,
    hd), the KV-head count times a constant."""
    rep = heads // kv_heads
    rng = np.random.default_rng(2)
    wv = (rng.standard_normal((D, kv_heads * HD)) * D ** -0.5).astype(np.float32)
    for g in dead_kv:
        wv[:, g * HD:(g + 1) * HD] = 0
    inits = [weight(D, heads * HD, name="wq"), weight(D, kv_heads * HD, name="wk"),
             numpy_helper.from_array(wv, "wv"), weight(heads * HD, D, name="wo"),
             const([0, 0, heads, HD], "q_shape"), const([0, 0, kv_heads, HD], "kv_shape"), const([2], "axis2"),
             const([1, 1, rep, 1, 1], "repeat"), const([0, heads, -1, HD], "fold"), const([0, 0, heads * HD], "merge"),
             numpy_helper.from_array(np.float32(HD ** -0.5), "scale")]
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
             helper.make_node("Reshape", ["q", "q_shape"], ["q_h"], name="q_split"),
             helper.make_node("Transpose", ["q_h"], ["q_t"], name="q_t", perm=[0, 2, 1, 3])]
    for n in "kv":
        nodes += [helper.make_node("MatMul", ["x", f"w{n}"], [n], name=f"{n}_proj"),
                  helper.make_node("Reshape", [n, "kv_shape"], [f"{n}_h"], name=f"{n}_split"),
                  helper.make_node("Transpose", [f"{n}_h"], [f"{n}_t"], name=f"{n}_t", perm=[0, 2, 1, 3]),
                  helper.make_node("Unsqueeze", [f"{n}_t", "axis2"], [f"{n}_5d"], name=f"{n}_5d"),
                  helper.make_node("Expand", [f"{n}_5d", "repeat"], [f"{n}_rep"], name=f"{n}_repeat_kv"),
                  helper.make_node("Reshape", [f"{n}_rep", f"{n}_fold" if traced_fold else "fold"], [f"{n}_all"],
                                   name=f"{n}_all")]
        if traced_fold:
            nodes += [helper.make_node("Shape", [f"{n}_t"], [f"{n}_shape"], name=f"{n}_shape"),
                      helper.make_node("Gather", [f"{n}_shape", "zero"], [f"{n}_b"], name=f"{n}_b", axis=0),
                      helper.make_node("Gather", [f"{n}_shape", "one"], [f"{n}_kv"], name=f"{n}_kv", axis=0),
                      helper.make_node("Mul", [f"{n}_kv", "n_rep"], [f"{n}_heads"], name=f"{n}_heads"),
                      helper.make_node("Unsqueeze", [f"{n}_b", "axis0"], [f"{n}_b1"], name=f"{n}_b1"),
                      helper.make_node("Unsqueeze", [f"{n}_heads", "axis0"], [f"{n}_h1"], name=f"{n}_h1"),
                      helper.make_node("Concat", [f"{n}_b1", f"{n}_h1", "rest"], [f"{n}_fold"], name=f"{n}_fold",
                                       axis=0)]
    if traced_fold:
        inits += [const(0, "zero"), const(1, "one"), const(rep, "n_rep"), const([0], "axis0"), const([-1, HD], "rest")]
        nodes = _topological(nodes)
    nodes += [helper.make_node("Transpose", ["k_all"], ["k_T"], name="k_T", perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q_t", "k_T"], ["qk"], name="qk"),
              helper.make_node("Mul", ["qk", "scale"], ["scores"], name="scale"),
              helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=-1),
              helper.make_node("MatMul", ["probs", "v_all"], ["ctx_h"], name="pv"),
              helper.make_node("Transpose", ["ctx_h"], ["ctx_t"], name="ctx_t", perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctx_t", "merge"], ["ctx"], name="merge"),
              helper.make_node("MatMul", ["ctx", "wo"], ["o"], name="o_proj"),
              helper.make_node("Add", ["x", "o"], ["y"], name="residual")]
    return make_model(nodes, [("x", ["batch", S, D])], [("y", ["batch", S, D])], inits)


def test_with_more_query_heads_per_group_than_kv_heads_a_unit_is_the_same_query_head_of_every_group():
    """6 query heads over 2 KV heads (3 per group): 3 units of 2 query heads (one per group); the
    KV heads stay; the repeat count in the Expand and the fold shrink with the kept slots."""
    analysis, pruned, removed = prune_matches_oracle(gqa(6, 2), fraction=0.34)
    slots = group_of(analysis, "q_proj")
    assert slots.prunable and slots.kind == "heads" and slots.size == 3
    assert slots.describe_units() == "3 query heads in each of 2 kv groups x 8"
    assert not group_of(analysis, "k_proj").prunable
    kept = 3 - len(removed)
    shapes = {t.name: list(t.dims) for t in pruned.graph.initializer}
    assert shapes["wq"] == [D, 2 * kept * HD] and shapes["wo"] == [2 * kept * HD, D]
    assert shapes["wk"] == [D, 2 * HD]


def _topological(nodes, given=("x", "past_k", "past_v")):
    """`nodes` in an order where each reads only given tensors, constants and earlier outputs."""
    inits = {"wq", "wk", "wv", "wo", "q_shape", "kv_shape", "axis2", "repeat", "fold", "merge", "scale", "zero", "one",
             "n_rep", "axis0", "rest"}
    made, out, pending = set(given) | inits, [], list(nodes)
    while pending:
        ready = next(n for n in pending if all(i in made for i in n.input))
        out.append(ready)
        made.update(ready.output)
        pending.remove(ready)
    return out


def test_slots_follow_a_traced_fold_that_multiplies_the_kv_head_count():
    """The legacy exporter's fold reads the KV-head count and multiplies it by n_rep: that constant
    becomes the kept slots (the KV heads never change)."""
    analysis, pruned, removed = prune_matches_oracle(gqa(6, 2, traced_fold=True), fraction=0.34)
    assert group_of(analysis, "q_proj").prunable and len(removed) == 1
    muls = [n for n in pruned.graph.node if n.op_type == "Mul" and n.name.endswith("_heads")]
    values = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    assert [int(values[n.input[1]]) for n in muls] == [2, 2]


def test_with_as_many_kv_heads_as_query_heads_per_group_a_unit_is_a_kv_group():
    analysis, _, _ = prune_matches_oracle(gqa(4, 2))
    groups = group_of(analysis, "q_proj")
    assert groups.kind == "kv groups" and groups.describe_units() == "2 kv groups (2 query + 1 kv heads x 8)"


def test_lossless_removes_a_dead_kv_group_with_its_query_heads():
    pruned, report = onnxprune.prune(gqa(4, 2, dead_kv=[0]), lossless=True)
    assert [(c.before, c.after) for c in report.changes] == [(2, 1)]
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-5


# -- key-value caches (decoders exported with past_key_values inputs and present outputs) ------------

def cached_attention(heads=H, kv_heads=H):
    """One decoder attention block with a cache: past_key / past_value (batch, kv, past, hd) are
    concatenated with the new keys and values along the sequence; the sums are the outputs
    present_key / present_value; repeat_kv when kv_heads < heads."""
    model = gqa(heads, kv_heads)
    graph = model.graph
    for n in "kv":
        concat_in = f"{n}_t"
        for node in graph.node:  # read the concatenated keys where the new ones were read
            for i, x in enumerate(node.input):
                if x == concat_in:
                    node.input[i] = f"present_{n}"
        graph.node.insert(0, helper.make_node("Concat", [f"past_{n}", concat_in], [f"present_{n}"],
                                              name=f"{n}_cache", axis=2))
        graph.input.append(helper.make_tensor_value_info(f"past_{n}", onnx.TensorProto.FLOAT,
                                                         ["batch", kv_heads, "past", HD]))
        graph.output.append(helper.make_tensor_value_info(f"present_{n}", onnx.TensorProto.FLOAT,
                                                          ["batch", kv_heads, "total", HD]))
    nodes = _topological(list(graph.node))
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model


def _cache_analysis(model, prune_cache):
    from onnxprune.analysis import analyze_graph
    from onnxprune.ir.graph_view import GraphView
    from onnxprune.ir.shapes import infer_shapes
    from onnxprune.pipeline import prepare
    working, _ = prepare(model)
    return working, analyze_graph(GraphView(working, infer_shapes(working)), prune_cache=prune_cache)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2)])
def test_heads_reaching_a_kv_cache_are_kept_unless_the_cache_may_change(heads, kv_heads):
    _, analysis = _cache_analysis(cached_attention(heads, kv_heads), prune_cache=False)
    units = group_of(analysis, "q_proj")
    assert not units.prunable
    assert ("Concat 'k_cache' appends to the key-value cache 'past_k', which the caller feeds and reads with this "
            "many heads") in units.blocked
    assert "reaches graph output 'present_k'" in units.blocked


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2)])
def test_with_prune_cache_heads_and_kv_groups_go_from_the_cache_inputs_and_outputs_too(heads, kv_heads):
    """The pruned model reads and writes only the kept heads' keys and values; its logits are the
    masked dense model's (fed the whole cache) and its presents are the dense ones' kept heads."""
    from onnxprune.passes.apply_plan import ApplyPlan
    from onnxprune.testing import masked_reference
    working, analysis = _cache_analysis(cached_attention(heads, kv_heads), prune_cache=True)
    units = group_of(analysis, "q_proj")
    assert units.prunable and units.kind == ("heads" if heads == kv_heads else "kv groups")
    assert analysis.state.cache_inputs == {"past_k": 1, "past_v": 1}
    assert analysis.state.cache_outputs == {"present_k": 1, "present_v": 1}
    removed = {int(units.roots[1])}
    reference = masked_reference(working, analysis, removed)
    pruned = ApplyPlan(analysis, removed)(working).model
    keep = analysis.keep_masks(removed)[("past_k", 1)]
    declared = {vi.name: vi.type.tensor_type.shape.dim[1].dim_value
                for vi in [*pruned.graph.input, *pruned.graph.output] if vi.name.startswith(("past", "present"))}
    assert declared == dict.fromkeys(["past_k", "past_v", "present_k", "present_v"], int(keep.sum()))  # the interface
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, S, D)).astype(np.float32)}
    feeds.update({f"past_{n}": rng.standard_normal((2, kv_heads, 5, HD)).astype(np.float32) for n in "kv"})
    want = dict(zip(["y", "present_k", "present_v"], run(reference, feeds)))
    got = dict(zip(["y", "present_k", "present_v"], run(pruned, {k: v[:, keep] if k.startswith("past") else v
                                                                 for k, v in feeds.items()})))
    np.testing.assert_allclose(got["y"], want["y"], atol=1e-5)
    for n in ("present_k", "present_v"):
        assert got[n].shape == (2, int(keep.sum()), 5 + S, HD)
        np.testing.assert_allclose(got[n], want[n][:, keep], atol=1e-6)
