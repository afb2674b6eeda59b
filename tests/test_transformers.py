"""Transformer fixtures exported from PyTorch (models/export_transformers.py):
FFN neurons and attention heads prune and match the masking oracle."""
from pathlib import Path

import pytest

import onnxprune
from helpers import prune_matches_oracle

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
    heads = [g for g in groups if g.prunable and g.size == 4]  # 4 heads of 16 dims per layer
    assert len(heads) == 2


@pytest.mark.parametrize("name", ["bert_encoder_legacy.onnx", "bert_encoder_dynamo.onnx"])
def test_removing_a_head_keeps_batch_and_sequence_dynamic(name):
    pruned, report = onnxprune.prune(FIXTURES / name, ratio=0.25, round_to=1)
    assert report.after.params < report.before.params
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in pruned.graph.input]
    assert all(isinstance(d, str) for shape in dims for d in shape)
