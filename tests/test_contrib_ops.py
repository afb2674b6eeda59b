"""onnxruntime-fused transformer graphs: the com.microsoft contrib ops that
onnxruntime's transformer optimizer writes (models/export_ort_fused.py), and
MultiHeadAttention / GroupQueryAttention graphs built here with onnx.helper
(the optimizer writes neither for our fixtures)."""
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from helpers import analysis_of, group_of, prune_matches_oracle, weight

FIXTURES = Path(__file__).resolve().parent.parent / "models" / "fixtures" / "ort_fused"
ALL = sorted(p.name for p in FIXTURES.glob("*.onnx"))
# units per attention group: 4 heads, or 2 KV groups of 2 query heads (LLaMA's decomposed GQA)
HEAD_UNITS = {"llama_decoder_fused.onnx": 2}


def load(name: str) -> onnx.ModelProto:
    return onnx.load(str(FIXTURES / name))


def attrs(model: onnx.ModelProto, op_type: str) -> dict[str, dict]:
    return {n.name: {a.name: helper.get_attribute_value(a) for a in n.attribute}
            for n in model.graph.node if n.op_type == op_type}


def test_the_fixtures_hold_the_fused_ops():
    ops = {name: {n.op_type for n in load(name).graph.node} for name in ALL}
    assert len(ALL) == 5
    assert {"Attention", "EmbedLayerNormalization", "SkipLayerNormalization", "BiasGelu"} <= \
        ops["bert_encoder_attention.onnx"]
    assert "MultiHeadAttention" in ops["bert_encoder_mha.onnx"]
    assert {"Attention", "SkipLayerNormalization", "BiasGelu"} <= ops["vit_attention.onnx"]
    assert {"SkipLayerNormalization", "FastGelu"} <= ops["gpt2_decoder_fused.onnx"]
    assert {"SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"} <= ops["llama_decoder_fused.onnx"]


@pytest.mark.parametrize("name", ALL)
def test_heads_and_ffn_neurons_are_prunable_groups(name):
    groups = analysis_of(load(name)).groups
    assert sum(1 for g in groups if g.prunable and g.size == 256) == 2
    assert sum(1 for g in groups if g.prunable and g.size == HEAD_UNITS.get(name, 4)) == 2


@pytest.mark.parametrize("name", ALL)
def test_pruned_fused_model_matches_the_masking_oracle(name):
    _, pruned, _ = prune_matches_oracle(load(name), fraction=0.3)
    for op in ("Attention", "MultiHeadAttention"):
        for node, a in attrs(pruned, op).items():
            assert a["num_heads"] == 3, node  # one of 4 heads removed


def test_pruned_attention_has_sliced_packed_weights_and_three_heads():
    _, pruned, _ = prune_matches_oracle(load("bert_encoder_attention.onnx"), fraction=0.3)
    shapes = {t.name: list(t.dims) for t in pruned.graph.initializer}
    for node in (n for n in pruned.graph.node if n.op_type == "Attention"):
        assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "num_heads")) == 3
        assert shapes[node.input[1]] == [64, 3 * 48] and shapes[node.input[2]] == [3 * 48]


def test_hidden_axis_is_blocked_by_the_fused_norms_with_a_reason():
    analysis = analysis_of(load("bert_encoder_attention.onnx"))
    group = group_of(analysis, "/encoder/layer.0/attention/output/dense/MatMul")
    assert any("SkipLayerNormalization 'SkipLayerNorm_AddBias_0' normalises over the hidden axis" in r
               for r in group.blocked)


def test_prune_api_on_a_fused_bert_rewrites_heads_and_keeps_axes_dynamic():
    pruned, report = onnxprune.prune(FIXTURES / "bert_encoder_attention.onnx", ratio=0.25, round_to=1)
    assert [a["num_heads"] for a in attrs(pruned, "Attention").values()] == [3, 3]
    assert report.after.macs < report.before.macs  # the fused Attention's MACs are counted
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in pruned.graph.input]
    assert all(isinstance(d, str) for shape in dims for d in shape)


def test_prune_api_on_a_fused_llama_removes_a_kv_group_per_layer():
    """onnx.checker does not know SimplifiedLayerNormalization (an onnxruntime op in the
    default domain): validation skips the checker for it and runs everything else."""
    pruned, report = onnxprune.prune(FIXTURES / "llama_decoder_fused.onnx", ratio={"kv-groups": 0.5}, round_to=1)
    assert [c.after for c in report.changes] == [1, 1]  # 2 KV groups -> 1 in each layer
    assert "onnx.checker" not in report.checks and "onnxruntime run" in report.checks
    assert any("lenient: onnxruntime-only ops SimplifiedLayerNormalization" in c for c in report.checks)


def test_lossless_removes_a_dead_head_and_a_dead_ffn_neuron_of_the_fused_bert():
    model = load("bert_encoder_attention.onnx")
    inits = {t.name: t for t in model.graph.initializer}
    attention = next(n for n in model.graph.node if n.name == "Attention_0")

    def zero(name, index):
        values = numpy_helper.to_array(inits[name]).copy()
        values[index] = 0
        inits[name].CopyFrom(numpy_helper.from_array(values, name))

    zero(attention.input[1], (slice(None), slice(128 + 16, 128 + 32)))  # head 1's value columns
    zero(attention.input[2], slice(128 + 16, 128 + 32))
    zero("onnx::MatMul_287", (slice(None), 7))  # FFN neuron 7 of layer 0 and its BiasGelu bias
    zero("encoder.layer.0.intermediate.dense.bias", 7)
    pruned, _ = onnxprune.prune(model, lossless=True)
    assert attrs(pruned, "Attention")["Attention_0"]["num_heads"] == 3
    assert attrs(pruned, "Attention")["Attention_1"]["num_heads"] == 4
    shapes = {t.name: list(t.dims) for t in pruned.graph.initializer}
    assert shapes["onnx::MatMul_287"] == [64, 255]


# -- hand-built graphs ------------------------------------------------------------------

B, S, D = 2, 6, 64


def ms_model(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "contrib",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def ints(value, name: str, dtype=np.int32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def linear(name: str, x: str, cin: int, cout: int):
    return helper.make_node("MatMul", [x, f"{name}.w"], [name], name=name), weight(cin, cout, name=f"{name}.w")


def attention_model(*, qkv_hidden_sizes=(64, 64, 64), bias_per_head=False, extra_inputs=(), past=False, **kw):
    q, k, v = qkv_hidden_sizes
    inputs, outputs = [("x", [B, S, D])], [("y", [B, S, D])]
    inits = [weight(D, q + k + v, name="qkv.w"), weight(q + k + v, name="qkv.b"), weight(v, D, name="o.w")]
    node_inputs = ["x", "qkv.w", "qkv.b", "", "", ""]
    node_outputs = ["att"]
    if bias_per_head:
        inits.append(weight(1, 4, S, S, name="rel_bias"))
        node_inputs[5] = "rel_bias"
    if past:
        inputs.append(("past", [2, B, 4, 3, q // 4]))
        outputs.append(("present", [2, B, 4, 3 + S, q // 4]))
        node_inputs[4] = "past"
        node_outputs.append("present")
    inputs += list(extra_inputs)
    kw.setdefault("qkv_hidden_sizes", list(qkv_hidden_sizes))
    nodes = [helper.make_node("Attention", node_inputs, node_outputs, name="attn", domain="com.microsoft",
                              num_heads=4, **kw),
             helper.make_node("MatMul", ["att", "o.w"], ["y"], name="o_proj")]
    return ms_model(nodes, inputs, outputs, inits)


def test_attention_with_qkv_hidden_sizes_and_a_per_head_bias_rewrites_both():
    model = attention_model(qkv_hidden_sizes=(64, 64, 32), bias_per_head=True, unidirectional=1)
    analysis, pruned, _ = prune_matches_oracle(model, fraction=0.3)
    assert group_of(analysis, "attn").size == 4 and group_of(analysis, "attn").channels_per_unit == 8
    assert attrs(pruned, "Attention")["attn"]["num_heads"] == 3
    assert list(attrs(pruned, "Attention")["attn"]["qkv_hidden_sizes"]) == [48, 48, 24]
    shapes = {t.name: list(t.dims) for t in pruned.graph.initializer}
    assert [1, 3, S, S] in shapes.values()


def test_attention_with_a_past_state_is_blocked_with_a_reason_naming_the_node():
    group = group_of(analysis_of(attention_model(past=True)), "attn")
    assert not group.prunable
    assert any("Attention 'attn' reads past state 'past'" in r for r in group.blocked), group.blocked


def test_attention_with_rotary_embeddings_is_blocked_with_a_reason():
    group = group_of(analysis_of(attention_model(do_rotary=1)), "attn")
    assert any("Attention 'attn' applies rotary embeddings" in r for r in group.blocked), group.blocked


def test_attention_with_a_run_time_per_head_bias_is_blocked():
    model = attention_model(extra_inputs=[("bias_in", [1, 4, S, S])])
    attn = next(n for n in model.graph.node if n.name == "attn")
    attn.input[5] = "bias_in"
    group = group_of(analysis_of(model), "attn")
    assert any("attention_bias 'bias_in' is computed at run time" in r for r in group.blocked), group.blocked


L = 5  # memory length for cross-attention


def mha_model(*, past_key=False):
    """Cross-attention: q from x, k and v (narrower: 4 heads of 8) from a memory, packed bias,
    a constant per-head attention bias."""
    nodes, inits = [], [weight(64 + 64 + 32, name="qkv.b"), weight(1, 4, S, L, name="rel_bias")]
    for name, x, cout in (("q", "x", 64), ("k", "mem", 64), ("v", "mem", 32)):
        node, w = linear(name, x, D, cout)
        nodes.append(node)
        inits.append(w)
    mha_inputs = ["q", "k", "v", "qkv.b", "", "rel_bias"]
    inputs = [("x", [B, S, D]), ("mem", [B, L, D])]
    if past_key:
        mha_inputs += ["past_k", "past_v"]
        inputs += [("past_k", [B, 4, 3, 16]), ("past_v", [B, 4, 3, 8])]
    nodes.append(helper.make_node("MultiHeadAttention", mha_inputs, ["att"], name="mha", domain="com.microsoft",
                                  num_heads=4))
    out, w = linear("o", "att", 32, D)
    return ms_model(nodes + [out], inputs, [("o", [B, S, D])], inits + [w])


def test_multi_head_attention_couples_q_k_v_heads_and_rewrites_num_heads():
    analysis, pruned, _ = prune_matches_oracle(mha_model(), fraction=0.3)
    heads = group_of(analysis, "mha")
    assert heads.prunable and heads.size == 4
    assert {s.node for s in heads.sources} == {"q", "k", "v", "mha"}
    assert attrs(pruned, "MultiHeadAttention")["mha"]["num_heads"] == 3
    shapes = {t.name: list(t.dims) for t in pruned.graph.initializer}
    assert shapes["q.w"] == [64, 48] and shapes["v.w"] == [64, 24] and shapes["qkv.b"] == [120]


def test_multi_head_attention_with_a_kv_cache_is_blocked_with_a_reason():
    group = group_of(analysis_of(mha_model(past_key=True)), "mha")
    assert any("MultiHeadAttention 'mha' reads past_key 'past_k'" in r for r in group.blocked), group.blocked


def gqa_model(*, packed=False, rotary=False):
    """4 query heads sharing 2 KV heads of 16 (causal, as onnxruntime's GQA always is)."""
    nodes, inits = [], [ints([S - 1] * B, "seqlens_k"), ints(S, "total_len")]
    if packed:
        node, w = linear("qkv", "x", D, 64 + 2 * 32)
        nodes.append(node)
        inits.append(w)
        gqa_inputs = ["qkv", "", ""]
    else:
        for name, cout in (("q", 64), ("k", 32), ("v", 32)):
            node, w = linear(name, "x", D, cout)
            nodes.append(node)
            inits.append(w)
        gqa_inputs = ["q", "k", "v"]
    gqa_inputs += ["", "", "seqlens_k", "total_len"]
    kw = {}
    if rotary:
        angles = np.outer(np.arange(S), 1.0 / 10000 ** (np.arange(8) / 8))
        inits += [numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
                  numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin")]
        gqa_inputs += ["cos", "sin"]
        kw["do_rotary"] = 1
    nodes.append(helper.make_node("GroupQueryAttention", gqa_inputs, ["att"], name="gqa",
                                  domain="com.microsoft", num_heads=4, kv_num_heads=2, **kw))
    out, w = linear("o", "att", 64, D)
    return ms_model(nodes + [out], [("x", [B, S, D])], [("o", [B, S, D])], inits + [w])


@pytest.mark.parametrize("variant", [{}, {"packed": True}, {"rotary": True}], ids=["separate", "packed", "rotary"])
def test_group_query_attention_removes_whole_kv_groups(variant):
    analysis, pruned, _ = prune_matches_oracle(gqa_model(**variant), fraction=0.3)
    groups = group_of(analysis, "gqa")
    assert groups.prunable and groups.size == 2  # 2 KV groups of (1 KV head, 2 query heads)
    a = attrs(pruned, "GroupQueryAttention")["gqa"]
    assert (a["num_heads"], a["kv_num_heads"]) == (2, 1)
    shapes = {t.name: list(t.dims) for t in pruned.graph.initializer}
    if variant.get("packed"):
        assert shapes["qkv.w"] == [64, 32 + 2 * 16]
    else:
        assert shapes["q.w"] == [64, 32] and shapes["k.w"] == [64, 16] and shapes["o.w"] == [32, 64]


def test_fused_elementwise_ops_pass_units_and_slice_their_bias():
    nodes, inits = [], []
    node, w = linear("fc", "x", D, 32)
    nodes.append(node)
    inits += [w, weight(32, name="b1"), weight(32, name="b2")]
    nodes += [helper.make_node("FastGelu", ["fc", "b1"], ["a"], name="fast", domain="com.microsoft"),
              helper.make_node("QuickGelu", ["a"], ["b"], name="quick", domain="com.microsoft", alpha=1.702),
              helper.make_node("Gelu", ["b"], ["c"], name="gelu", domain="com.microsoft"),
              helper.make_node("BiasGelu", ["c", "b2"], ["d"], name="biasgelu", domain="com.microsoft")]
    out, w = linear("out", "d", 32, D)
    model = ms_model(nodes + [out], [("x", [B, S, D])], [("out", [B, S, D])], inits + [w])
    analysis, pruned, removed = prune_matches_oracle(model, fraction=0.5)
    assert group_of(analysis, "fc").prunable and len(removed) == 16
    shapes = {t.name: list(t.dims) for t in pruned.graph.initializer}
    assert shapes["b1"] == shapes["b2"] == [16]
