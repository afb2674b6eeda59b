"""Transformer fixtures exported from PyTorch (models/export_transformers.py):
FFN neurons and attention heads prune and match the masking oracle."""
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from helpers import prune_matches_oracle, run
from onnxprune.ir.graph_view import tensor_values
from onnxprune.ir.model_io import materialized
from onnxprune.cli import main
from onnxprune.passes.apply_plan import ApplyPlan
from onnxprune.pipeline import build_analysis, prepare
from onnxprune.testing import masked_reference

FIXTURES = Path(__file__).resolve().parent.parent / "models" / "fixtures" / "transformers"
ALL = sorted(p.name for p in FIXTURES.glob("*.onnx"))


@pytest.mark.parametrize("name", ALL)
def test_pruned_transformer_matches_the_masking_oracle(name):
    prune_matches_oracle(FIXTURES / name, fraction=0.3)


@pytest.mark.parametrize("name", ALL)
def test_ffn_neurons_are_prunable_in_every_layer(name):
    groups = onnxprune.analyze(FIXTURES / name).analysis.groups
    assert sum(1 for g in groups if g.prunable and g.size == 256) == 2


@pytest.mark.parametrize("name", ["bert_encoder_legacy.onnx", "bert_encoder_dynamo.onnx",
                                  "vit_legacy.onnx", "vit_dynamo.onnx",
                                  # fused QKV: one MatMul then Split; a unit is a head of Q, K and V together
                                  "gpt2_decoder_legacy.onnx", "gpt2_decoder_dynamo.onnx"])
def test_attention_heads_are_groups_of_whole_heads(name):
    groups = onnxprune.analyze(FIXTURES / name).analysis.groups
    heads = [g for g in groups if g.prunable and g.kind == "heads"]
    assert [(g.size, g.head_dim) for g in heads] == [(4, 16), (4, 16)]  # 4 heads of 16 dims per layer


@pytest.mark.parametrize("name", ["bert_encoder_legacy.onnx", "bert_encoder_dynamo.onnx"])
def test_removing_a_head_keeps_batch_and_sequence_dynamic(name):
    pruned, report = onnxprune.prune(FIXTURES / name, ratio=0.25, round_to=1)
    assert report.after.params < report.before.params
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in pruned.graph.input]
    assert all(isinstance(d, str) for shape in dims for d in shape)


@pytest.mark.parametrize("name", ["llama_decoder_legacy.onnx", "llama_decoder_dynamo.onnx"])
def test_grouped_query_attention_removes_whole_kv_groups(name):
    """4 query heads share 2 KV heads: a unit is one KV head with its 2 query heads
    (through repeat_kv's Expand+Reshape, and, in the dynamo export, SDPA's fold of
    the heads into the batch axis)."""
    groups = onnxprune.analyze(FIXTURES / name).analysis.groups
    gqa = [g for g in groups if g.prunable and g.kind == "kv groups"]
    assert len(gqa) == 2
    for g in gqa:
        assert g.size == 2 and g.head_dim == 16
        assert sorted(g.heads_per_unit.values()) == [1, 1, 2]  # k_proj, v_proj: one head; q_proj: two
        assert g.describe_units() == "2 kv groups (2 query + 1 kv heads x 16)"


@pytest.mark.parametrize("name", ["llama_decoder_legacy.onnx", "llama_decoder_dynamo.onnx"])
def test_removing_a_kv_group_matches_the_oracle_at_any_batch_and_length(name):
    working, _ = prepare(FIXTURES / name)
    analysis = build_analysis(working)
    removed = {int(g.roots[0]) for g in analysis.groups if g.prunable and g.kind == "kv groups"}
    reference = masked_reference(working, analysis, removed)
    pruned = ApplyPlan(analysis, removed)(working).model
    onnx.checker.check_model(materialized(pruned))  # tensors left on disk are read in
    rng = np.random.default_rng(0)
    for batch, length in [(1, 5), (3, 11)]:
        feeds = {"input_ids": rng.integers(0, 128, (batch, length)).astype(np.int64)}
        got, want = run(pruned, feeds)[0], run(reference, feeds)[0]
        assert got.shape == (batch, length, 128)
        np.testing.assert_allclose(got, want, atol=1e-4)
    # half the heads are gone: q_proj 64 -> 32 outputs, k_proj/v_proj 32 -> 16
    widths = sorted(numpy_width(pruned, i.name) for i in pruned.graph.initializer
                    if i.name in {p.tensor for g in analysis.groups if g.kind == "kv groups" for p in g.params})
    assert widths.count(32) == 2 and widths.count(16) == 4


def numpy_width(model, name):
    tensor = next(i for i in model.graph.initializer if i.name == name)
    return int(tensor_values(tensor).shape[-1]) if len(tensor.dims) == 2 else -1


def test_analyze_lists_head_groups_with_head_counts_and_kv_grouping(capsys):
    assert main(["analyze", str(FIXTURES / "llama_decoder_dynamo.onnx")]) == 0
    out = capsys.readouterr().out
    assert out.count("2 kv groups (2 query + 1 kv heads x 16)") == 2
    assert "kv groups: 2, neurons: 2" in out
    assert main(["analyze", str(FIXTURES / "bert_encoder_legacy.onnx")]) == 0
    assert capsys.readouterr().out.count("4 heads x 16") == 2


@pytest.mark.parametrize("name", ALL)
def test_a_quarter_of_the_heads_and_30_percent_of_the_ffn_by_unit_kind(name):
    """--ratio heads=0.25,kv-groups=0.5,neurons=0.3: each kind at its own ratio (LLaMA's 2 KV
    groups per layer can only lose whole groups), validated by onnxruntime."""
    pruned, report = onnxprune.prune(FIXTURES / name, ratio={"heads": 0.25, "kv-groups": 0.5, "neurons": 0.3})
    sizes = sorted((c.before, c.after) for c in report.changes)
    heads = (2, 1) if name.startswith("llama") else (4, 3)
    assert sizes == [heads, heads, (256, 184), (256, 184)]  # 179.2 kept neurons, rounded up to 8
    assert "onnxruntime run" in report.checks and report.after.flops < report.before.flops


def test_ratio_per_kind_names_only_known_kinds():
    with pytest.raises(onnxprune.OnnxPruneError, match="unknown unit kind"):
        onnxprune.prune(FIXTURES / "vit_legacy.onnx", ratio={"attention": 0.25})


@pytest.mark.parametrize("name", ["gpt2_decoder_legacy.onnx", "gpt2_decoder_dynamo.onnx",
                                  "llama_decoder_legacy.onnx", "llama_decoder_dynamo.onnx"])
def test_hidden_width_is_prunable_only_when_opted_in(name):
    """The residual stream (embedding, every block's output projection, LayerNorm / RMSNorm
    scales, the LM head's inputs) is one group; its norms make it inexact."""
    assert not any(g.kind == "hidden" for g in onnxprune.analyze(FIXTURES / name).analysis.groups)
    hidden = [g for g in onnxprune.analyze(FIXTURES / name, prune_hidden=True).analysis.groups if g.kind == "hidden"]
    assert len(hidden) == 1 and hidden[0].prunable and hidden[0].size == 64 and hidden[0].inexact
    pruned, report = onnxprune.prune(FIXTURES / name, ratio={"hidden": 0.25}, prune_hidden=True)
    assert [(c.before, c.after) for c in report.changes] == [(64, 48)]
    assert "onnxruntime run" in report.checks
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in pruned.graph.input]
    assert all(isinstance(d, str) for shape in dims for d in shape)


@pytest.mark.parametrize("name", ["vit_legacy.onnx", "vit_dynamo.onnx"])
def test_vit_hidden_width_prunes_through_the_class_token(name):
    """Concat([Expand(cls_token), patches], axis=1): the class token is sliced with the hidden
    width (opt-in), for the legacy (Where) and dynamo (Concat of Shape) expand shapes."""
    hidden = [g for g in onnxprune.analyze(FIXTURES / name, prune_hidden=True).analysis.groups
              if g.kind == "hidden"]
    assert len(hidden) == 1 and hidden[0].prunable and hidden[0].size == 64, [g.blocked for g in hidden]
    assert any(p.tensor == "vit.embeddings.cls_token" and p.axis == 2 for p in hidden[0].params)
    pruned, report = onnxprune.prune(FIXTURES / name, ratio={"hidden": 0.25}, prune_hidden=True)
    assert [(c.before, c.after) for c in report.changes] == [(64, 48)]
    assert "onnxruntime run" in report.checks
    cls = next(t for t in materialized(pruned).graph.initializer if t.name == "vit.embeddings.cls_token")
    assert list(cls.dims) == [1, 1, 48]


def test_hidden_width_that_reaches_the_output_stays_with_a_reason():
    groups = onnxprune.analyze(FIXTURES / "bert_encoder_legacy.onnx", prune_hidden=True).analysis.groups
    hidden = next(g for g in groups if g.kind == "hidden")
    assert hidden.blocked == ["reaches graph output 'last_hidden_state'"]


def _zero_columns(model, matmul_name, columns):
    """Zero some output columns of a MatMul's weight and of the bias Add that follows it."""
    inits = {t.name: t for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == matmul_name)
    bias_add = next((n for n in model.graph.node if n.op_type == "Add" and node.output[0] in n.input), None)
    targets = [(node.input[1], (slice(None), columns))]
    if bias_add is not None:
        targets += [(i, (columns,)) for i in bias_add.input if i in inits]
    for name, index in targets:
        values = onnx.numpy_helper.to_array(inits[name]).copy()
        values[index] = 0
        inits[name].CopyFrom(onnx.numpy_helper.from_array(values, name))


@pytest.mark.parametrize("name, value_proj, heads_after", [
    ("bert_encoder_legacy.onnx", "/encoder/layer.0/attention/self/value/MatMul", [3]),
    ("llama_decoder_legacy.onnx", "/model/layers.0/self_attn/v_proj/MatMul", [1]),  # a dead KV head: its group
])
def test_lossless_removes_a_head_whose_values_are_zero(name, value_proj, heads_after):
    model = onnx.load(str(FIXTURES / name))
    _zero_columns(model, value_proj, slice(16, 32))  # head 1 (16 dims)
    pruned, report = onnxprune.prune(model, lossless=True)
    assert [c.after for c in report.changes] == heads_after
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-5


def test_lossless_removes_dead_ffn_neurons():
    model = onnx.load(str(FIXTURES / "bert_encoder_legacy.onnx"))
    _zero_columns(model, "/encoder/layer.1/intermediate/dense/MatMul", [3, 70, 200])  # GELU(0) = 0
    pruned, report = onnxprune.prune(model, lossless=True)
    assert [(c.before, c.after) for c in report.changes] == [(256, 253)]
    assert report.max_abs_diff < 1e-5
