#!/usr/bin/env python
"""Write ``models/fixtures/genai_qwen2/``: a tiny Qwen2 decoder in the onnxruntime-genai layout.

The model is built by onnxruntime-genai's own model builder
(``python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p fp32 -e cpu``),
from a random-weight ``Qwen2ForCausalLM`` saved with ``save_pretrained``.
What the builder writes is what onnxprune must handle for a genai user:

* attention as ``com.microsoft.GroupQueryAttention`` over a **packed** QKV
  projection (one MatMul ``qkv_proj``, then an Add of the packed Q/K/V bias),
  rotary embeddings applied inside the op (``do_rotary=1``, ``cos_cache`` /
  ``sin_cache`` initializers), ``num_heads=4``, ``kv_num_heads=2``;
* inputs ``input_ids``, ``attention_mask`` (past + new positions) and
  ``past_key_values.{i}.key`` / ``.value`` ``[batch, 2, past, 16]``; outputs
  ``logits`` and ``present.{i}.key`` / ``.value`` ``[batch, 2, total, 16]``;
  GroupQueryAttention's ``seqlens_k`` (``ReduceSum(attention_mask) - 1``) and
  ``total_sequence_length`` (``attention_mask``'s length) are computed in
  the graph, so a caller feeds only the mask;
* SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization norms.

Config: vocab 128, hidden 64, 2 layers, 4 query heads over 2 KV heads of 16,
intermediate 96, at most 64 positions, untied LM head.  (The intermediate size
must differ from the vocabulary: the builder takes every Linear with
``out_features == vocab_size`` for the LM head.)  Weights from
``torch.manual_seed(0)``; the Q/K/V biases (zero at initialisation) and the norm
weights are drawn too, so none is trivial.

Planted: KV group 1 of layer 0 and KV group 0 of layer 1 are dead -- their K
and V projection rows (and biases), their two query heads' rows (and biases)
and the matching ``o_proj`` input columns are zero.  A dead group adds nothing to
the residual stream, and caches zero values; ``onnxprune prune --lossless
--prune-cache`` removes both, leaving 2 query heads over 1 KV head in each layer
(the same count in every layer, as genai_config.json needs).

Written: ``model.onnx`` (weights inline, about 0.4 MB) and the builder's
``genai_config.json`` (tokenizer files are not kept).  The script checks the ONNX
model against PyTorch on a prefill of 5 tokens and 3 decode steps with the cache
fed back (max abs difference of the logits < 1e-4) and prints it.

Needs torch, transformers and onnxruntime-genai (``pip install onnxruntime-genai``);
made with torch 2.13.0+cpu, transformers 5.24.0, onnxruntime-genai 0.18.0,
onnx 1.23.2, onnxruntime 1.32.0.  Usage::

    python models/export_genai.py [--out DIR]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

HERE = Path(__file__).resolve().parent
LAYERS, HEADS, KV_HEADS, HEAD_DIM = 2, 4, 2, 16
DEAD = {0: 1, 1: 0}  # layer -> its dead KV group


def build() -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                         tie_word_embeddings=False, use_sliding_window=False)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.1)
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.uniform_(0.5, 1.5)
        model.model.norm.weight.uniform_(0.5, 1.5)
        for i, group in DEAD.items():
            plant_dead_group(model.model.layers[i].self_attn, group)
    return model


def plant_dead_group(attn, group: int) -> None:
    """Zero KV head `group`, the query heads that read it, and the o_proj columns of those heads."""
    per_group = HEADS // KV_HEADS
    q_rows = slice(group * per_group * HEAD_DIM, (group + 1) * per_group * HEAD_DIM)
    kv_rows = slice(group * HEAD_DIM, (group + 1) * HEAD_DIM)
    for proj, rows in ((attn.q_proj, q_rows), (attn.k_proj, kv_rows), (attn.v_proj, kv_rows)):
        proj.weight[rows] = 0
        proj.bias[rows] = 0
    attn.o_proj.weight[:, q_rows] = 0


def run_builder(hf_dir: Path, out_dir: Path, cache_dir: Path) -> None:
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out_dir),
                    "-p", "fp32", "-e", "cpu", "-c", str(cache_dir)], check=True, stdout=subprocess.DEVNULL)


def check(model: torch.nn.Module, path: Path) -> float:
    """Max abs difference of the logits, ONNX vs PyTorch, over a prefill and three decode steps."""
    from transformers import DynamicCache

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 128, (2, 5))
    past = {f"past_key_values.{i}.{k}": np.zeros((2, KV_HEADS, 0, HEAD_DIM), np.float32)
            for i in range(LAYERS) for k in ("key", "value")}
    cache, length, worst = DynamicCache(), 0, 0.0
    for _ in range(4):
        length += ids.shape[1]
        mask = np.ones((2, length), np.int64)
        names = [o.name for o in session.get_outputs()]
        out = dict(zip(names, session.run(None, {"input_ids": ids, "attention_mask": mask, **past})))
        with torch.no_grad():
            want = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), cache=cache,
                         use_cache=True)
        cache = want.past_key_values
        worst = max(worst, float(np.abs(out["logits"] - want.logits.numpy()).max()))
        past = {name: out[name.replace("past_key_values", "present")] for name in past}
        ids = out["logits"][:, -1:].argmax(-1)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "fixtures" / "genai_qwen2")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model.save_pretrained(tmp / "hf")
        run_builder(tmp / "hf", tmp / "built", tmp / "cache")
        built = onnx.load(str(tmp / "built" / "model.onnx"))  # reads model.onnx.data
        args.out.mkdir(parents=True, exist_ok=True)
        onnx.save(built, str(args.out / "model.onnx"))  # inline: small enough, and one file to commit
        shutil.copy(tmp / "built" / "genai_config.json", args.out / "genai_config.json")
    diff = check(model, args.out / "model.onnx")
    ops = sorted({n.op_type for n in built.graph.node})
    size = (args.out / "model.onnx").stat().st_size
    print(f"{args.out / 'model.onnx'}: {size} bytes, logits vs PyTorch max abs diff {diff:.2e}, ops {ops}")
    assert diff < 1e-4, diff


if __name__ == "__main__":
    main()
