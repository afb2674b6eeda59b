"""Decoders with a key-value cache (issue 13): with `prune_cache`, heads and KV groups go from the
cache inputs and outputs too. The pruned model declares and reads fewer heads per layer, is
validated with a cache of that size, a generation loop over it (its own, smaller cache) produces
the masking oracle's tokens, and the report states the head counts a generation config needs.

The decoder is models/conformance/qwen2_kv_* (Qwen2, 3 layers of 4 query heads over 2 KV heads,
exported by the TorchScript exporter and by dynamo as a one-token decode step; KV group 1 of
layer 0 is planted dead)."""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.errors import PlanError, UsageError
from onnxprune.pipeline import build_analysis, prepare
from onnxprune.strategy.plan import Plan
from onnxprune.testing import greedy_generate, masked_reference

FOLDER = Path(__file__).resolve().parent.parent / "models" / "conformance"
MANIFEST = json.loads((FOLDER / "manifest.json").read_text())
EXPORTS = ["qwen2_kv_legacy", "qwen2_kv_dynamo"]
HALF_THE_KV_GROUPS = {"kv-groups": 0.5}


def decoder(name: str) -> onnx.ModelProto:
    return onnx.load(str(FOLDER / MANIFEST[name]["file"]))


def cache_names(name: str) -> list[str]:
    return MANIFEST[name]["cache"]["inputs"]


def declared_heads(model: onnx.ModelProto) -> dict[str, int]:
    """Cache input or output -> the heads its declared shape holds."""
    return {vi.name: vi.type.tensor_type.shape.dim[1].dim_value for vi in [*model.graph.input, *model.graph.output]
            if vi.name.startswith(("past_key_values", "present"))}


def generate(model: onnx.ModelProto, name: str, new_tokens: int = 8) -> tuple[np.ndarray, list[np.ndarray]]:
    prompt = np.random.default_rng(0).integers(0, 64, (2, 5))
    return greedy_generate(model, prompt, new_tokens, cache_names(name), chunk=MANIFEST[name]["cache"]["sequence"])


@pytest.mark.parametrize("name", EXPORTS)
def test_greedy_generation_over_the_pruned_cache_matches_the_masking_oracle_token_for_token(name, tmp_path):
    """Half the KV groups go (query heads, KV heads and their cache entries); the pruned model
    generates from an empty cache of its own size the tokens the masked dense model generates with
    the whole cache, and the same logits at every step."""
    dense = decoder(name)
    pruned, _ = onnxprune.prune(dense, ratio=HALF_THE_KV_GROUPS, prune_cache=True, save_plan=tmp_path / "plan.json")
    working, _ = prepare(dense)
    analysis = build_analysis(working, prune_cache=True)
    oracle = masked_reference(working, analysis, Plan.load(tmp_path / "plan.json").removed_roots(analysis))
    assert set(declared_heads(pruned).values()) == {1} and set(declared_heads(oracle).values()) == {2}
    tokens, logits = generate(pruned, name)
    want_tokens, want_logits = generate(oracle, name)
    np.testing.assert_array_equal(tokens, want_tokens)
    for got, want in zip(logits, want_logits):
        np.testing.assert_allclose(got, want, atol=1e-4 * np.max(np.abs(want)))


@pytest.mark.parametrize("name", EXPORTS)
def test_the_written_file_declares_and_runs_with_a_cache_of_the_kept_heads(name, tmp_path):
    out = tmp_path / "pruned.onnx"
    _, report = onnxprune.prune(FOLDER / MANIFEST[name]["file"], out, ratio=HALF_THE_KV_GROUPS, prune_cache=True)
    written = onnx.load(str(out))
    assert declared_heads(written) == report.cache == dict.fromkeys(declared_heads(written), 1)
    assert "output shapes as expected (the caches at their kept heads)" in report.checks
    tokens, _ = generate(written, name, new_tokens=3)
    assert tokens.shape == (2, 3)
    assert [(c.heads, c.kv_heads) for c in report.attention] == [((4, 2), (2, 1))] * 3
    assert report.to_dict()["attention"][0]["num_key_value_heads"] == [2, 1]
    assert ("Attention heads per layer (num_attention_heads/num_key_value_heads), in graph order: 2/1 in each of "
            "3 layer(s) (were 4/2 in each of 3 layer(s)).") in report.summary()


def test_lossless_names_the_one_layer_whose_cache_lost_a_kv_head():
    _, report = onnxprune.prune(decoder("qwen2_kv_legacy"), lossless=True, prune_cache=True)
    assert [(c.heads[1], c.kv_heads[1]) for c in report.attention] == [(2, 1), (4, 2), (4, 2)]
    assert "in graph order: 2/1, 4/2, 4/2 (were 4/2 in each of 3 layer(s))" in report.summary()


def test_lossless_on_a_past_that_holds_values_compares_with_a_cache_the_dense_model_could_have_written():
    """Validation at a non-empty past: the dense reference runs with the removed KV group's cached
    entries zero (what the model caches for a dead group), the pruned model on the kept heads."""
    shapes = {"input_ids": [2, 4], "attention_mask": [2, 7], "position_ids": [2, 4],
              **{n: [2, 2, 3, 8] for n in cache_names("qwen2_kv_legacy")}}
    _, report = onnxprune.prune(decoder("qwen2_kv_legacy"), lossless=True, prune_cache=True, input_shapes=shapes)
    assert "outputs equal the dense model" in report.checks
    assert report.cache["past_key_values.0.value"] == 1


def test_a_saved_plan_replays_with_the_cache_pruned_the_same_way(tmp_path):
    first, _ = onnxprune.prune(decoder("qwen2_kv_dynamo"), ratio=HALF_THE_KV_GROUPS, prune_cache=True,
                               save_plan=tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json").meta["prune_cache"] is True
    again, _ = onnxprune.prune(decoder("qwen2_kv_dynamo"), plan=tmp_path / "plan.json")
    assert declared_heads(again) == declared_heads(first)


def test_without_prune_cache_the_heads_that_reach_the_cache_stay():
    with pytest.raises(PlanError, match="nothing to remove"):
        onnxprune.prune(decoder("qwen2_kv_legacy"), ratio=HALF_THE_KV_GROUPS)
    pruned, report = onnxprune.prune(decoder("qwen2_kv_legacy"), lossless=True)
    assert set(declared_heads(pruned).values()) == {2} and report.cache is None and not report.attention


@pytest.mark.parametrize("keywords, message", [
    ({"calib": "calib.npz"}, "drop --calib"),
    ({"steps": 2}, "prune in one step"),
])
def test_prune_cache_refuses_what_would_feed_or_change_the_dense_cache(keywords, message):
    with pytest.raises(UsageError, match=message):
        onnxprune.prune(decoder("qwen2_kv_legacy"), ratio=HALF_THE_KV_GROUPS, prune_cache=True, **keywords)


def test_analyze_with_prune_cache_lists_the_kv_groups_as_prunable():
    def prunable(**keywords):
        return [g.describe_units() for g in onnxprune.analyze(FOLDER / "qwen2_kv_legacy.onnx", **keywords)
                .analysis.groups if g.prunable and g.kind == "kv groups"]

    assert prunable() == []
    assert prunable(prune_cache=True) == ["2 kv groups (2 query + 1 kv heads x 8)"] * 3


def next_token_data(model: onnx.ModelProto, name: str, samples: int = 6, prompt: int = 3) -> dict[str, np.ndarray]:
    """Validation data for a decode step: the caches the dense model wrote for a random prompt, and one
    new token each."""
    from onnxprune.runtime.session import make_session

    rng = np.random.default_rng(1)
    caches = cache_names(name)
    session = make_session(model)
    feeds = {"input_ids": rng.integers(0, 64, (samples, prompt)), "attention_mask": np.ones((samples, prompt), np.int64),
             "position_ids": np.tile(np.arange(prompt), (samples, 1)),
             **{c: np.zeros((samples, 2, 0, 8), np.float32) for c in caches}}
    present = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    return {"input_ids": rng.integers(0, 64, (samples, 1)), "attention_mask": np.ones((samples, prompt + 1), np.int64),
            "position_ids": np.full((samples, 1), prompt),
            **{c: present[c.replace("past_key_values", "present")] for c in caches}}


def test_validation_data_feeds_the_pruned_cache_at_its_kept_heads(tmp_path):
    """The dense model's caches are fed to the pruned model at the heads it kept, and its present
    outputs are compared with the dense ones' kept heads: lossless, every output stays equal."""
    model = decoder("qwen2_kv_legacy")
    _, report = onnxprune.prune(model, tmp_path / "p.onnx", lossless=True, prune_cache=True,
                                validate_data=next_token_data(model, "qwen2_kv_legacy"), measure_latency=False)
    assert report.cache["present.0.value"] == 1 and report.quality.samples == 6
    assert {"logits", "present.0.key", "present.0.value", "present.2.value"} <= set(report.quality.outputs)
    for output, measured in report.quality.outputs.items():
        assert measured["max_abs_error"] < 1e-4, output
