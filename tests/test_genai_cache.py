"""Decoders in the onnxruntime-genai layout (issue 13): attention is com.microsoft.GroupQueryAttention
over a packed QKV projection, reading past_key_values.{i}.key / .value ([batch, kv heads, past, head
size]) and writing present.{i}.key / .value. With `prune_cache` its KV groups go from the cache too:
the pruned model reads and writes fewer KV heads, generates what the masking oracle generates with
its cache fed back, and the report states the head counts genai_config.json needs.

The decoder is models/fixtures/genai_qwen2/model.onnx, written by onnxruntime-genai's model builder
(models/export_genai.py): Qwen2, 2 layers of 4 query heads over 2 KV heads of 16; KV group 1 of
layer 0 and KV group 0 of layer 1 are planted dead (their Q/K/V rows and o_proj columns zero)."""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxprune
from onnxprune.errors import PlanError
from onnxprune.pipeline import build_analysis, prepare
from onnxprune.runtime.session import make_session
from onnxprune.strategy.plan import GroupPlan, Plan
from onnxprune.testing import masked_reference

FOLDER = Path(__file__).resolve().parent.parent / "models" / "fixtures" / "genai_qwen2"
CONFIG = json.loads((FOLDER / "genai_config.json").read_text())["model"]["decoder"]
LAYERS, HEAD_SIZE = CONFIG["num_hidden_layers"], CONFIG["head_size"]
CACHES = [f"past_key_values.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")]
QKV = "/model/layers.{}/attn/qkv_proj/MatMul"  # each layer's KV-group group is named after it
GQA = "/model/layers.{}/attn/GroupQueryAttention"
# batch 2 and a past of 3 are sizes prune would not choose itself (it plans batch 1, an empty past):
PREFILL = {"input_ids": [2, 4], "attention_mask": [2, 4], **{c: [2, 2, 0, HEAD_SIZE] for c in CACHES}}
DECODE = {"input_ids": [2, 1], "attention_mask": [2, 4], **{c: [2, 2, 3, HEAD_SIZE] for c in CACHES}}


def decoder() -> onnx.ModelProto:
    return onnx.load(str(FOLDER / "model.onnx"))


def declared_heads(model: onnx.ModelProto) -> dict[str, int]:
    """Cache input or output -> the KV heads its declared shape holds."""
    return {vi.name: vi.type.tensor_type.shape.dim[1].dim_value for vi in [*model.graph.input, *model.graph.output]
            if vi.name.startswith(("past_key_values", "present"))}


def generate(model: onnx.ModelProto, new_tokens: int = 8) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
    """Greedy decoding as onnxruntime-genai runs the model: the prompt in one step from an empty cache
    (batch 2), then one token a step. attention_mask is ones over past + new positions: the graph derives
    GroupQueryAttention's seqlens_k (mask sum - 1) and total_sequence_length (mask length) from it, so they
    agree with the cache length. Each step's presents are the next step's past, shaped as the model declares
    (a pruned model: its fewer KV heads). Returns the new tokens and every step's outputs by name."""
    session = make_session(model)
    names = [o.name for o in session.get_outputs()]
    heads = declared_heads(model)
    ids = np.random.default_rng(0).integers(0, 128, (2, 5))
    past = {c: np.zeros((2, heads[c], 0, HEAD_SIZE), np.float32) for c in CACHES}
    length, tokens, steps = 0, [], []
    while len(tokens) < new_tokens:
        length += ids.shape[1]
        out = dict(zip(names, session.run(None, {"input_ids": ids, "attention_mask": np.ones((2, length), np.int64),
                                                 **past})))
        steps.append(out)
        past = {c: out[c.replace("past_key_values", "present")] for c in CACHES}
        ids = out["logits"][:, -1:].argmax(-1)
        tokens.append(ids)
    return np.concatenate(tokens, axis=1), steps


def plan_keeping(tmp_path: Path, keep: dict[int, list[int]]) -> Path:
    """A plan that keeps, in layer i, the KV groups keep[i] (of 2)."""
    path = tmp_path / "plan.json"
    Plan([GroupPlan(QKV.format(i), 2, kept) for i, kept in keep.items()], {"prune_cache": True}).save(path)
    return path


def oracle(plan: Path) -> onnx.ModelProto:
    """The masking oracle: the dense model with the plan's KV groups zeroed where o_proj reads them."""
    working, _ = prepare(decoder())
    analysis = build_analysis(working, prune_cache=True)
    return masked_reference(working, analysis, Plan.load(plan).removed_roots(analysis))


def assert_steps_match(got: list[dict], want: list[dict], kept: dict[int, list[int]]) -> float:
    """Logits within 1e-4 and each present the oracle's at the kept KV heads, at every step. Returns the
    largest difference."""
    worst = 0.0
    assert len(got) == len(want)
    for g, w in zip(got, want):
        pairs = [(g["logits"], w["logits"])] + [(g[f"present.{i}.{k}"], w[f"present.{i}.{k}"][:, kept[i]])
                                                 for i in kept for k in ("key", "value")]
        for a, b in pairs:
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
            worst = max(worst, float(np.abs(a - b).max()))
    return worst


def test_removing_live_kv_groups_matches_the_masking_oracle_at_prefill_and_every_decode_step(tmp_path):
    """Layer 0 loses KV group 0 and layer 1 KV group 1 (both alive): the pruned model, fed its own smaller
    cache, gives the oracle's logits and the oracle's presents at the kept heads from the prefill through
    seven decode steps, and generates the oracle's tokens."""
    kept = {0: [1], 1: [0]}
    plan = plan_keeping(tmp_path, kept)
    pruned, report = onnxprune.prune(decoder(), plan=plan, prune_cache=True, input_shapes=PREFILL)
    assert set(declared_heads(pruned).values()) == {1}
    tokens, steps = generate(pruned)
    want_tokens, want_steps = generate(oracle(plan))
    np.testing.assert_array_equal(tokens, want_tokens)
    assert assert_steps_match(steps, want_steps, kept) < 1e-4
    dense_tokens, _ = generate(decoder())
    assert not np.array_equal(tokens, dense_tokens)  # the removed groups were alive: the oracle is not the dense


def test_the_pruned_file_declares_the_kept_kv_heads_and_rewrites_the_head_counts(tmp_path):
    out = tmp_path / "model.onnx"
    _, report = onnxprune.prune(FOLDER / "model.onnx", out, ratio={"kv-groups": 0.5}, prune_cache=True,
                                input_shapes=DECODE)
    written = onnx.load(str(out))
    assert declared_heads(written) == report.cache == dict.fromkeys(declared_heads(decoder()), 1)
    attention = [n for n in written.graph.node if n.op_type == "GroupQueryAttention"]
    assert [{a.name: a.i for a in n.attribute if a.name in ("num_heads", "kv_num_heads")} for n in attention] \
        == [{"num_heads": 2, "kv_num_heads": 1}] * LAYERS
    weights = {t.name: list(t.dims) for t in written.graph.initializer}
    assert weights["model.layers.0.attn.qkv_proj.MatMul.weight"] == [64, 2 * 16 + 16 + 16]
    assert weights["model.layers.0.attn.qkv_proj.Add.bias"] == [64]
    assert weights["model.layers.0.attn.o_proj.MatMul.weight"] == [32, 64]
    assert "output shapes as expected (the caches at their kept heads)" in report.checks
    assert [(c.heads, c.kv_heads) for c in report.attention] == [((4, 2), (2, 1))] * LAYERS
    assert ("in graph order: 2/1 in each of 2 layer(s) (were 4/2 in each of 2 layer(s))" in report.summary())


def test_lossless_removes_the_planted_dead_groups_and_generates_the_dense_models_tokens():
    pruned, report = onnxprune.prune(decoder(), lossless=True, prune_cache=True, input_shapes=DECODE)
    assert "outputs equal the dense model" in report.checks  # on a past of 3 positions, the dead heads' zero
    assert [(c.name, c.kv_heads) for c in report.attention] == [(QKV.format(i), (2, 1)) for i in range(LAYERS)]
    dense = {t.name: numpy_helper.to_array(t) for t in decoder().graph.initializer}
    small = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    for layer, dead in ((0, 1), (1, 0)):  # the live group's query, key and value columns are what is left
        live = 1 - dead
        columns = [*range(live * 32, live * 32 + 32), *range(64 + live * 16, 64 + live * 16 + 16),
                   *range(96 + live * 16, 96 + live * 16 + 16)]
        name = f"model.layers.{layer}.attn.qkv_proj.MatMul.weight"
        np.testing.assert_array_equal(small[name], dense[name][:, columns])
    tokens, steps = generate(pruned)
    want_tokens, want_steps = generate(decoder())
    np.testing.assert_array_equal(tokens, want_tokens)
    assert assert_steps_match(steps, want_steps, {0: [0], 1: [1]}) < 1e-4


def test_a_kv_group_whose_values_are_zero_is_dead_through_the_packed_projection_and_the_cache():
    """o_proj of layer 0 reads the dead group again (its columns made nonzero): only the zero value
    columns of the packed QKV projection, and the zero values that group caches, show it is dead."""
    model = decoder()
    o_proj = next(t for t in model.graph.initializer if t.name == "model.layers.0.attn.o_proj.MatMul.weight")
    values = numpy_helper.to_array(o_proj).copy()
    values[32:64] = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    o_proj.CopyFrom(numpy_helper.from_array(values, o_proj.name))
    pruned, report = onnxprune.prune(model, lossless=True, prune_cache=True, input_shapes=DECODE)
    assert report.cache["past_key_values.0.value"] == 1 and "outputs equal the dense model" in report.checks


def test_without_prune_cache_the_cache_blocks_the_kv_groups_naming_the_node_and_the_flag():
    groups = {g.name: g for g in onnxprune.analyze(FOLDER / "model.onnx").analysis.groups}
    for i in range(LAYERS):
        reasons = groups[QKV.format(i)].blocked
        assert any(r.startswith(f"GroupQueryAttention '{GQA.format(i)}' reads past_key 'past_key_values.{i}.key'")
                   and "--prune-cache" in r for r in reasons), reasons
    with pytest.raises(PlanError, match="nothing to remove"):
        onnxprune.prune(decoder(), ratio={"kv-groups": 0.5}, input_shapes=PREFILL)
    pruned, report = onnxprune.prune(decoder(), lossless=True, input_shapes=PREFILL)
    assert set(declared_heads(pruned).values()) == {2} and report.cache is None and not report.attention


def test_analyze_counts_a_kv_group_as_two_query_heads_and_one_kv_head_not_the_packed_projection_width():
    prunable = [g.describe_units() for g in onnxprune.analyze(FOLDER / "model.onnx", prune_cache=True).analysis.groups
                if g.prunable and g.kind == "kv groups"]
    assert prunable == ["2 kv groups (2 query + 1 kv heads x 16)"] * LAYERS


def test_layers_left_with_different_kv_head_counts_are_reported_as_such(tmp_path):
    """One layer loses a KV group, the other keeps both: the file declares 1 and 2 KV heads, and the report
    says that a config with one num_key_value_heads cannot describe it (onnxruntime-genai 0.15 and later read
    each layer's count from the file; 0.14 does not)."""
    pruned, report = onnxprune.prune(decoder(), plan=plan_keeping(tmp_path, {0: [0]}), prune_cache=True,
                                     input_shapes=PREFILL)
    assert declared_heads(pruned) == {"past_key_values.0.key": 1, "past_key_values.0.value": 1, "present.0.key": 1,
                                      "present.0.value": 1, "past_key_values.1.key": 2, "past_key_values.1.value": 2,
                                      "present.1.key": 2, "present.1.value": 2}
    assert "in graph order: 2/1, 4/2" in report.summary()
    assert "a config with one num_key_value_heads for all layers cannot describe them" in report.summary()
    tokens, _ = generate(pruned, new_tokens=3)
    assert tokens.shape == (2, 3)


def test_the_symbolic_head_size_of_the_cache_is_read_from_the_attention_without_input_shape(tmp_path):
    out = tmp_path / "model.onnx"
    pruned, report = onnxprune.prune(decoder(), out, ratio={"kv-groups": 0.5}, prune_cache=True)
    note = next(n for n in report.notes if n.startswith("input shapes assumed"))
    assert f"kv_cache_dim={HEAD_SIZE} (head size, from the attention reading it)" in note
    assert set(declared_heads(onnx.load(str(out))).values()) == {1}
