#!/usr/bin/env python
"""Write the onnxruntime-fused transformer fixtures in ``models/fixtures/ort_fused/``.

These are the graphs a deployment engineer gets from onnxruntime's transformer
optimizer (``python -m onnxruntime.transformers.optimizer``, or optimum's
``ORTOptimizer``, which calls it): the committed PyTorch-legacy fixtures of
``models/fixtures/transformers/`` (made by ``export_transformers.py``: hidden
64, 4 heads of 16, FFN 256, 2 layers) run through
``onnxruntime.transformers.optimizer.optimize_model`` with ``num_heads=4``,
``hidden_size=64``, ``opt_level=1`` (onnxruntime's basic, hardware-independent
graph optimizations first, as the optimizer does by default for these model
types), on CPU, float32 (no fp16 conversion).  No torch and no network are
needed: only onnx and onnxruntime.

=============================  ==================  ========================================
file                           source / model_type  com.microsoft ops it contains
=============================  ==================  ========================================
bert_encoder_attention.onnx    bert_encoder, bert   EmbedLayerNormalization, Attention,
                                                    SkipLayerNormalization, BiasGelu
bert_encoder_mha.onnx          bert_encoder, bert   the same with MultiHeadAttention (separate
                               use_multi_head_      Q/K/V MatMuls, packed QKV bias) instead of
                               attention=True       Attention
vit_attention.onnx             vit, vit             Attention (no mask), SkipLayerNormalization
                                                    (with its input_skip_bias_sum output),
                                                    BiasGelu
gpt2_decoder_fused.onnx        gpt2_decoder, gpt2   SkipLayerNormalization, FastGelu (the
                                                    optimizer's GPT-2 attention fusion expects
                                                    the older masking pattern: attention stays
                                                    decomposed, fused QKV + Split)
llama_decoder_fused.onnx       llama_decoder, gpt2  SkipSimplifiedLayerNormalization and
                                                    SimplifiedLayerNormalization (ai.onnx
                                                    domain, onnxruntime-only); attention, RoPE
                                                    and grouped-query attention stay decomposed
=============================  ==================  ========================================

The optimizer writes no MultiHeadAttention or GroupQueryAttention for the
LLaMA fixture (model types gpt2 and qwen3 tried: its rotary-attention fusion
wants a past key/value cache), so those ops are tested on graphs built with
onnx.helper in ``tests/test_contrib_ops.py``.

Every written file is checked against the unfused model with onnxruntime at
two batch sizes and sequence lengths (attention masks with padding), max abs
difference < 1e-4, and one line per file is printed: name, size, max abs
difference, op-type counts.  Usage::

    python models/export_ort_fused.py [--out DIR]

Made with onnx 1.23.2 and onnxruntime 1.31.1.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "fixtures", "transformers")
DEFAULT_OUT = os.path.join(HERE, "fixtures", "ort_fused")
ATOL = 1e-4

# output name: (source fixture, optimizer model_type, FusionOptions overrides)
FIXTURES = {
    "bert_encoder_attention": ("bert_encoder_legacy", "bert", {}),
    "bert_encoder_mha": ("bert_encoder_legacy", "bert", {"use_multi_head_attention": True}),
    "vit_attention": ("vit_legacy", "vit", {}),
    "gpt2_decoder_fused": ("gpt2_decoder_legacy", "gpt2", {}),
    "llama_decoder_fused": ("llama_decoder_legacy", "gpt2", {}),
}


def fuse(source: str, model_type: str, overrides: dict) -> onnx.ModelProto:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions(model_type)
    for name, value in overrides.items():
        setattr(options, name, value)
    optimized = optimize_model(os.path.join(SOURCE, source + ".onnx"), model_type=model_type, num_heads=4,
                               hidden_size=64, opt_level=1, use_gpu=False, optimization_options=options)
    return optimized.model


def feeds(model: onnx.ModelProto, batch: int, seq: int, rng) -> dict:
    out = {}
    for vi in model.graph.input:
        dims = [d.dim_value if d.dim_value > 0 else (batch if i == 0 else seq)
                for i, d in enumerate(vi.type.tensor_type.shape.dim)]
        if vi.name == "attention_mask":
            mask = np.ones(dims, dtype=np.int64)
            mask[0, seq - 2:] = 0  # padding at the end of the first sequence
            out[vi.name] = mask
        elif vi.type.tensor_type.elem_type == onnx.TensorProto.INT64:
            out[vi.name] = rng.integers(0, 128, dims).astype(np.int64)
        else:
            out[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return out


def max_diff(dense: str, fused: onnx.ModelProto) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    a = ort.InferenceSession(dense, options, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(fused.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    worst = 0.0
    for batch, seq in ((1, 16), (2, 7)):
        f = feeds(fused, batch, seq, rng)
        for x, y in zip(a.run(None, f), b.run(None, f)):
            worst = max(worst, float(np.abs(x - y).max()))
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    failed = False
    for name, (source, model_type, overrides) in FIXTURES.items():
        model = fuse(source, model_type, overrides)
        diff = max_diff(os.path.join(SOURCE, source + ".onnx"), model)
        path = os.path.join(args.out, name + ".onnx")
        with tempfile.NamedTemporaryFile(dir=args.out, suffix=".tmp", delete=False) as tmp:
            tmp.write(model.SerializeToString())
        os.chmod(tmp.name, 0o644)
        os.replace(tmp.name, path)
        counts = collections.Counter(n.op_type for n in model.graph.node)
        status = "ok" if diff < ATOL else "MISMATCH"
        failed |= diff >= ATOL
        print(f"{name}: {os.path.getsize(path) / 1e3:.0f} kB, max |fused - unfused| = {diff:.2e} ({status}); "
              + ", ".join(f"{op}:{n}" for op, n in sorted(counts.items())))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
