"""Conformance on real exporter output (issue 13): models/conformance/ holds tiny random-weight
Hugging Face models (BERT, ViT, GPT-2, Qwen2, LLaMA, Swin, ResNet, MobileNetV2, ConvNeXt,
EfficientNet, RegNetY), each exported by the TorchScript exporter, the dynamo exporter with
dynamic shapes and the dynamo exporter without, with dead heads, KV groups, neurons, channels and
residual branches planted (models/export_conformance.py).  `--lossless` must keep their outputs
and remove at least 95% of what the same model with those structures physically removed
(`<name>_removed.onnx`) no longer has.  benchmarks/bench_conformance.py prints the table."""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from helpers import prune_matches_oracle, run
from onnxprune.cost import unique_parameters

FOLDER = Path(__file__).resolve().parent.parent / "models" / "conformance"
MANIFEST = json.loads((FOLDER / "manifest.json").read_text())
TRANSFORMERS = ("bert", "vit", "gpt2", "qwen2", "llama", "swin")
PLAIN = sorted(n for n in MANIFEST if "cache" not in MANIFEST[n])
CACHED = sorted(n for n in MANIFEST if "cache" in MANIFEST[n])


def feeds(entry: dict, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for spec in entry["inputs"]:
        shape = [batch if d == "batch" else seq if d == "sequence" else int(d) for d in spec["shape"]]
        if spec["dtype"] == "float32":
            out[spec["name"]] = rng.standard_normal(shape).astype(np.float32)
        elif spec.get("mask"):
            mask = np.ones(shape, np.int64)
            mask[1:, -2:] = 0  # padding at the end of later rows
            out[spec["name"]] = mask
        else:
            out[spec["name"]] = rng.integers(0, spec["high"], shape).astype(np.int64)
    return out


@pytest.mark.parametrize("name", PLAIN)
def test_lossless_keeps_the_outputs_and_removes_the_planted_structure(name):
    entry = MANIFEST[name]
    dense = onnx.load(str(FOLDER / entry["file"]))
    floor = unique_parameters(onnx.load(str(FOLDER / entry["removed"])))[0]
    before = unique_parameters(dense)[0]
    pruned, report = onnxprune.prune(dense, lossless=True)
    removed = before - unique_parameters(pruned)[0]
    assert removed >= 0.95 * (before - floor), (removed, before - floor, report.notes)
    for batch, seq, seed in ((1, 16, 0), (3, 7, 1)):
        x = feeds(entry, batch, seq, seed)
        for want, got in zip(run(dense, x), run(pruned, x)):
            assert got.shape == want.shape
            assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))


@pytest.mark.parametrize("name", sorted(n for n in PLAIN if MANIFEST[n]["model"] in TRANSFORMERS))
def test_random_heads_and_neurons_match_the_masking_oracle(name):
    prune_matches_oracle(FOLDER / MANIFEST[name]["file"], fraction=0.3)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo", "dynamo_static"])
@pytest.mark.parametrize("model, heads", [
    ("bert", ["4 heads x 8"] * 3),
    ("vit", ["4 heads x 8"] * 3),
    ("gpt2", ["4 heads x 8"] * 3),  # fused QKV (Conv1D): a head across its Q, K and V columns
    ("qwen2", ["2 kv groups (2 query + 1 kv heads x 8)"] * 3),  # as many KV heads as query heads per group
    ("llama", ["3 query heads in each of 2 kv groups x 8"] * 3),  # more query heads per group: by slot
    ("swin", ["2 heads x 8"] * 2 + ["4 heads x 8"] * 2),  # shifted windows: relative bias + mask
])
def test_attention_units_per_architecture_and_exporter(model, exporter, heads):
    groups = onnxprune.analyze(FOLDER / f"{model}_{exporter}.onnx").analysis.groups
    assert [g.describe_units() for g in groups if g.prunable and g.kind in ("heads", "kv groups")] == heads


def generate(model, entry: dict, batch: int, steps, seed: int = 0) -> list[list[np.ndarray]]:
    """Run a decoder with a KV cache for len(steps) steps from an empty cache (its declared head
    counts), feeding each step's presents back: the outputs of every step."""
    cache = entry["cache"]
    declared = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in model.graph.input}
    past = {n: np.zeros((batch, declared[n][1], 0, declared[n][3]), np.float32) for n in cache["inputs"]}
    rng, start, outs = np.random.default_rng(seed), 0, []
    for length in steps:
        x = {"input_ids": rng.integers(0, 64, (batch, length)).astype(np.int64),
             "attention_mask": np.ones((batch, start + length), np.int64),
             "position_ids": np.tile(np.arange(start, start + length), (batch, 1)).astype(np.int64), **past}
        got = run(model, x)
        outs.append(got)
        past = dict(zip(cache["inputs"], got[1:]))
        start += length
    return outs


def kept_heads(entry: dict) -> dict[str, np.ndarray]:
    """Cache output -> the heads it keeps once the planted dead KV groups are gone."""
    kv = entry["inputs"][-1]["shape"][1]
    dead = {int(layer): groups for layer, groups in entry["planted"]["kv_groups"].items()}
    return {n: np.array([h not in dead.get(int(n.split(".")[1]), []) for h in range(kv)])
            for n in entry["cache"]["outputs"]}


@pytest.mark.parametrize("name", CACHED)
def test_lossless_with_a_kv_cache_removes_a_dead_kv_group_from_the_cache_too(name):
    """With prune_cache the dead KV group goes with its cache entries (the pruned model reads and writes
    one KV head in that layer, and says so); over three generation steps its logits are the dense
    model's and its presents the dense ones' kept heads."""
    entry = MANIFEST[name]
    dense = onnx.load(str(FOLDER / entry["file"]))
    floor = unique_parameters(onnx.load(str(FOLDER / entry["removed"])))[0]
    before = unique_parameters(dense)[0]
    pruned, report = onnxprune.prune(dense, lossless=True, prune_cache=True)
    assert before - unique_parameters(pruned)[0] >= 0.95 * (before - floor)
    keep = kept_heads(entry)
    assert report.cache == {n: 1 for n in ("past_key_values.0.key", "past_key_values.0.value", "present.0.key",
                                           "present.0.value")}
    steps = (1, 1, 1) if entry["cache"]["sequence"] == 1 else (4, 2, 1)
    for step_dense, step_pruned in zip(generate(dense, entry, 2, steps), generate(pruned, entry, 2, steps)):
        np.testing.assert_allclose(step_pruned[0], step_dense[0], atol=1e-4 * np.max(np.abs(step_dense[0])))
        for n, d, p in zip(entry["cache"]["outputs"], step_dense[1:], step_pruned[1:]):
            np.testing.assert_allclose(p, d[:, keep[n]], atol=1e-5)
