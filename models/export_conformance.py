#!/usr/bin/env python
"""Conformance models: real Hugging Face ``transformers`` architectures, exported by both
PyTorch exporters, with dead structure planted, and the same model with it physically removed.

Models: BERT, ViT, GPT-2, Qwen2 (4 query heads over 2 KV heads), LLaMA (6 over 2), Swin, ResNet,
MobileNetV2, ConvNeXt, EfficientNet, RegNetY, and qwen2_kv (Qwen2 as a decoder with a KV cache:
past_key_values.* inputs, present.* outputs).  Exports: ``legacy`` (``dynamo=False``, opset 17,
dynamic batch and sequence), ``dynamo`` (``dynamo=True`` with ``torch.export.Dim`` batch and
sequence) and ``dynamo_static`` (``dynamo=True`` without dynamic shapes, its default; not for
qwen2_kv, whose dynamo export is the one-token decode step).

For issue 13 ("coverage of real exporter output"): `onnxprune prune --lossless` must keep the
outputs of every model here and remove (nearly) every parameter the planted structure holds.
``benchmarks/bench_conformance.py`` measures that; ``tests/test_conformance.py`` checks it.

Each model is built from a ``transformers`` config with tiny sizes (no download: random
weights, built locally) and randomised weights (a fixed seed; no norm is an identity).
Then, in PyTorch, structures are planted dead -- weights zeroed the way structured-sparse
training leaves them, so that they compute exact zeros for every input:

* **heads**: the value projection of a head (its rows and bias) is zero, so its context is
  zero and the head contributes nothing (its Q, K, V and output slices can go);
* **KV groups** (grouped-query attention): a KV head's value rows are zero: every query
  head that reads it has a zero context (the KV head, its query heads and their output
  columns can go);
* **neurons**: an FFN neuron's input row and bias are zero (GELU(0) = SiLU(0) = 0; in
  SwiGLU the gate's row: silu(0) * up = 0);
* **channels** (CNNs): a conv's output channel and its BatchNorm gamma and beta are zero (and
  the BatchNorm after a depthwise or grouped conv that passes them on);
* **residual branches**: the branch's last projection (weight and bias), BatchNorm or layer
  scale is zero, so the whole branch adds zero (everything in it can go, its pre-norm included).

The "removed" model is the dead model with those structures physically gone (smaller
Linear and Conv layers, fewer heads, the branch replaced by nothing). It computes the same
function (checked here in PyTorch and onnxruntime), and the difference of the two ONNX
files' parameter counts is what `--lossless` can remove at most: the *removable* params.

Writes ``models/conformance/<model>_<exporter>.onnx`` (dead structure planted),
``<model>_<exporter>_removed.onnx`` and ``manifest.json`` (inputs, what was planted, the
cache's inputs and outputs).  Weights are stored inline (one file per model; the dynamo
exporter's external data is read back in) and the dynamo exporter's per-node metadata is
dropped.  A rerun writes byte-identical files.

Only for regenerating the files (needs torch, onnxscript and transformers; not the
package or its tests)::

    python models/export_conformance.py [--only bert,gpt2] [--exporters legacy,dynamo,dynamo_static] [--out DIR]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import traceback
import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn

torch.set_num_threads(1)
warnings.filterwarnings("ignore")

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "conformance")
LEGACY_OPSET = 17
ATOL = 1e-4
EXPORTERS = ("legacy", "dynamo", "dynamo_static")
TRACE_BATCH, TRACE_SEQ = 2, 8  # the example inputs every export traces (not 1: it would be specialised)


# --------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------

def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Weights ~ N(0, 1/fan_in), biases N(0, 0.1), norm scales U[0.5, 1.5), embeddings and
    tables N(0, 0.5), BatchNorm statistics perturbed: no norm is an identity, no layer is tiny."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            is_norm = isinstance(owner, (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm))
            if is_norm or "norm" in name.lower() and p.dim() == 1:
                if leaf == "weight":
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif isinstance(owner, nn.Embedding) or p.dim() == 1 and leaf != "bias" or "table" in leaf \
                    or "token" in leaf or "position" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif leaf == "bias":
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                fan_in = p[0].numel() if not _is_conv1d(owner) else p.shape[0]
                p.copy_(torch.randn(p.shape, generator=g) * fan_in ** -0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def _is_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D"  # GPT-2's transposed Linear: weight [in, out]


# -- zeroing and slicing Linear / Conv1D / Conv2d layers along their output or input axis ----

def _out_axis(layer) -> int:
    return 1 if _is_conv1d(layer) else 0


def zero_out(layer, idx) -> None:
    """Output features (or channels) `idx` of `layer` compute 0 (weight rows and bias)."""
    with torch.no_grad():
        layer.weight.index_fill_(_out_axis(layer), torch.as_tensor(idx, dtype=torch.long), 0.0)
        if getattr(layer, "bias", None) is not None:
            layer.bias.index_fill_(0, torch.as_tensor(idx, dtype=torch.long), 0.0)


def _keep(n: int, drop) -> torch.Tensor:
    drop = set(int(i) for i in drop)
    return torch.tensor([i for i in range(n) if i not in drop], dtype=torch.long)


def keep_out(layer, drop) -> None:
    axis = _out_axis(layer)
    keep = _keep(layer.weight.shape[axis], drop)
    with torch.no_grad():
        layer.weight = nn.Parameter(layer.weight.index_select(axis, keep).clone())
        if getattr(layer, "bias", None) is not None:
            layer.bias = nn.Parameter(layer.bias[keep].clone())
    for attr in ("out_features", "nf", "out_channels"):
        if hasattr(layer, attr):
            setattr(layer, attr, len(keep))


def keep_in(layer, drop) -> None:
    axis = 0 if _is_conv1d(layer) else 1
    keep = _keep(layer.weight.shape[axis], drop)
    with torch.no_grad():
        layer.weight = nn.Parameter(layer.weight.index_select(axis, keep).clone())
    for attr in ("in_features", "nx", "in_channels"):
        if hasattr(layer, attr):
            setattr(layer, attr, len(keep))


def rows(units, width: int) -> list[int]:
    return [u * width + i for u in units for i in range(width)]


class ZeroBranch(nn.Module):
    """What is left of a residual branch that adds zero: nothing. Returns zeros shaped like its
    input (and None, for attention modules that return (output, weights))."""

    def __init__(self, tuple_out: bool = False):
        super().__init__()
        self.tuple_out = tuple_out

    def forward(self, hidden_states, *args, **kwargs):
        # x * 0 rather than zeros_like(x): a static export folds the latter into a constant, which
        # would count as parameters of the removed model
        zero = hidden_states * 0.0
        return (zero, None) if self.tuple_out else zero


class PostNormOnly(nn.Module):
    """A post-norm block whose branch adds zero: LayerNorm(0 + x) = LayerNorm(x)."""

    def __init__(self, norm: nn.Module, tuple_out: bool = False, skip_arg: int = 0):
        super().__init__()
        self.norm, self.tuple_out, self.skip_arg = norm, tuple_out, skip_arg

    def forward(self, *args, **kwargs):
        out = self.norm(args[self.skip_arg])
        return (out, None) if self.tuple_out else out


# --------------------------------------------------------------------------------------------
# what is planted
# --------------------------------------------------------------------------------------------

@dataclass
class Planted:
    heads: dict[int, list[int]] = field(default_factory=dict)      # layer -> dead (query) heads
    kv_groups: dict[int, list[int]] = field(default_factory=dict)  # layer -> dead KV heads (with their query heads)
    neurons: dict[int, list[int]] = field(default_factory=dict)    # layer -> dead FFN neurons
    channels: dict[str, list[int]] = field(default_factory=dict)   # conv module path -> dead channels
    dead_attention: list[int] = field(default_factory=list)        # layers whose attention branch adds zero
    dead_mlp: list[int] = field(default_factory=list)              # layers whose MLP branch adds zero
    dead_blocks: list[str] = field(default_factory=list)           # CNN residual blocks that add zero

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v}


class Transformer:
    """Where one transformers architecture keeps its layers, projections and norms."""

    name = ""
    seq_dynamic = True

    def __init__(self):
        self.planted = Planted()

    # -- model-specific ---------------------------------------------------------------------
    def build(self) -> nn.Module: ...
    def inputs(self, batch: int, seq: int, g: torch.Generator) -> tuple: ...
    def input_spec(self) -> list[dict]: ...
    def layers(self, model) -> list[nn.Module]: ...
    def attention(self, layer) -> nn.Module: ...
    def proj(self, layer) -> dict[str, nn.Module]: ...  # q, k, v, o (or qkv for a fused projection)
    def mlp(self, layer) -> tuple[list[nn.Module], nn.Module]: ...  # input layers, output layer
    def head_dim(self, layer) -> int: ...
    def kv_heads(self, layer) -> int: return self.heads(layer)
    def heads(self, layer) -> int: ...
    def kill_attention(self, layer) -> None: ...  # the removed model: the branch is gone
    def kill_mlp(self, layer) -> None: ...
    def per_head_params(self, layer) -> list[tuple[nn.Module, str, int]]: return []
    def after_heads_removed(self, layer, n_heads: int, n_kv: int) -> None: ...

    # -- generic ----------------------------------------------------------------------------
    def plant(self, model) -> None:
        p, layers = self.planted, self.layers(model)
        for i, heads in p.heads.items():
            self._zero_values(layers[i], heads)
        for i, groups in p.kv_groups.items():
            self._zero_values(layers[i], groups, kv=True)
        for i, neurons in p.neurons.items():
            ins, _ = self.mlp(layers[i])
            zero_out(ins[0], neurons)  # fc1, or SwiGLU's gate
        for i in p.dead_attention:
            zero_out(self.proj(layers[i])["o"], range(self._width(self.proj(layers[i])["o"])))
        for i in p.dead_mlp:
            _, out = self.mlp(layers[i])
            zero_out(out, range(self._width(out)))

    @staticmethod
    def _width(layer) -> int:
        return layer.weight.shape[_out_axis(layer)]

    def _zero_values(self, layer, units, kv: bool = False) -> None:
        proj, hd = self.proj(layer), self.head_dim(layer)
        if "qkv" in proj:  # fused: [q | k | v] along the output axis
            width = self._width(proj["qkv"]) // 3
            zero_out(proj["qkv"], [2 * width + r for r in rows(units, hd)])
        else:
            zero_out(proj["v"], rows(units, hd))

    def remove(self, model) -> None:
        p, layers = self.planted, self.layers(model)
        for i, layer in enumerate(layers):
            q_heads = set(p.heads.get(i, []))
            kv_drop = set(p.kv_groups.get(i, []))
            n, n_kv = self.heads(layer), self.kv_heads(layer)
            rep = n // n_kv
            q_heads |= {g * rep + j for g in kv_drop for j in range(rep)}
            if n_kv == n:
                kv_drop |= q_heads
            if q_heads or kv_drop:
                self._remove_heads(layer, sorted(q_heads), sorted(kv_drop))
                self.after_heads_removed(layer, n - len(q_heads), n_kv - len(kv_drop))
            if p.neurons.get(i):
                ins, out = self.mlp(layer)
                for lin in ins:
                    keep_out(lin, p.neurons[i])
                keep_in(out, p.neurons[i])
        for i in p.dead_attention:
            self.kill_attention(layers[i])
        for i in p.dead_mlp:
            self.kill_mlp(layers[i])

    def _remove_heads(self, layer, q_heads, kv_heads) -> None:
        proj, hd = self.proj(layer), self.head_dim(layer)
        if "qkv" in proj:
            width = self._width(proj["qkv"]) // 3
            drop = rows(q_heads, hd) + [width + r for r in rows(kv_heads, hd)] + \
                [2 * width + r for r in rows(kv_heads, hd)]
            keep_out(proj["qkv"], drop)
        else:
            keep_out(proj["q"], rows(q_heads, hd))
            keep_out(proj["k"], rows(kv_heads, hd))
            keep_out(proj["v"], rows(kv_heads, hd))
        keep_in(proj["o"], rows(q_heads, hd))
        for module, attr, axis in self.per_head_params(layer):
            t = getattr(module, attr)
            keep = _keep(t.shape[axis], q_heads)
            setattr(module, attr, nn.Parameter(t.detach().index_select(axis, keep).clone()))


class Wrapper(nn.Module):
    """Positional inputs in, one tensor out (what both exporters want)."""

    def __init__(self, model, input_names, output):
        super().__init__()
        self.model, self.input_names, self.output = model, input_names, output

    def forward(self, *args):
        out = self.model(**dict(zip(self.input_names, args)))
        return getattr(out, self.output) if not isinstance(out, torch.Tensor) else out


# -- BERT ----------------------------------------------------------------------------------

class Bert(Transformer):
    name = "bert"
    input_names = ["input_ids", "attention_mask"]
    output = "last_hidden_state"

    def __init__(self):
        super().__init__()
        self.planted = Planted(heads={0: [1]}, neurons={0: [3, 17, 40], 1: [5]}, dead_attention=[1],
                               dead_mlp=[2])

    def build(self):
        from transformers import BertConfig, BertModel
        cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=32, type_vocab_size=2)
        return BertModel(cfg, add_pooling_layer=False)

    def inputs(self, batch, seq, g):
        ids = torch.randint(0, 64, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.int64)
        for b in range(1, batch):
            mask[b, max(2, seq - 2 * b):] = 0
        return ids, mask

    def input_spec(self):
        return [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"], "high": 64},
                {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"], "mask": True}]

    def layers(self, model):
        return list(model.encoder.layer)

    def proj(self, layer):
        s = layer.attention.self
        return {"q": s.query, "k": s.key, "v": s.value, "o": layer.attention.output.dense}

    def mlp(self, layer):
        return [layer.intermediate.dense], layer.output.dense

    def heads(self, layer):
        return layer.attention.self.query.weight.shape[0] // 8

    def head_dim(self, layer):
        return 8

    def kill_attention(self, layer):
        layer.attention = PostNormOnly(layer.attention.output.LayerNorm, tuple_out=True)

    def kill_mlp(self, layer):
        layer.intermediate = nn.Identity()
        layer.output = PostNormOnly(layer.output.LayerNorm, skip_arg=1)


# -- ViT ------------------------------------------------------------------------------------

class ViT(Transformer):
    name = "vit"
    input_names = ["pixel_values"]
    output = "logits"
    seq_dynamic = False

    def __init__(self):
        super().__init__()
        self.planted = Planted(heads={0: [2]}, neurons={0: [0, 9, 33], 2: [60]}, dead_attention=[1],
                               dead_mlp=[2])

    def build(self):
        from transformers import ViTConfig, ViTForImageClassification
        cfg = ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                        image_size=16, patch_size=4, num_channels=3, num_labels=10)
        return ViTForImageClassification(cfg)

    def inputs(self, batch, seq, g):
        return (torch.randn(batch, 3, 16, 16, generator=g),)

    def input_spec(self):
        return [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 16, 16]}]

    def layers(self, model):
        return list(model.vit.layers)

    def proj(self, layer):
        a = layer.attention
        return {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.o_proj}

    def mlp(self, layer):
        return [layer.mlp.fc1], layer.mlp.fc2

    def heads(self, layer):
        return layer.attention.q_proj.weight.shape[0] // 8

    def head_dim(self, layer):
        return 8

    def kill_attention(self, layer):
        layer.attention, layer.layernorm_before = ZeroBranch(tuple_out=True), nn.Identity()

    def kill_mlp(self, layer):
        layer.mlp, layer.layernorm_after = ZeroBranch(), nn.Identity()


# -- GPT-2 ------------------------------------------------------------------------------------

class GPT2(Transformer):
    name = "gpt2"
    input_names = ["input_ids", "attention_mask"]
    output = "logits"

    def __init__(self):
        super().__init__()
        self.planted = Planted(heads={0: [0], 2: [3]}, neurons={0: [1, 2, 50], 1: [7]}, dead_attention=[1],
                               dead_mlp=[2])

    def build(self):
        from transformers import GPT2Config, GPT2LMHeadModel
        cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_inner=64, n_positions=32,
                         tie_word_embeddings=False)
        return GPT2LMHeadModel(cfg)

    def inputs(self, batch, seq, g):
        return torch.randint(0, 64, (batch, seq), generator=g), torch.ones(batch, seq, dtype=torch.int64)

    def input_spec(self):
        return [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"], "high": 64},
                {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"], "mask": True}]

    def layers(self, model):
        return list(model.transformer.h)

    def proj(self, layer):
        return {"qkv": layer.attn.c_attn, "o": layer.attn.c_proj}

    def mlp(self, layer):
        return [layer.mlp.c_fc], layer.mlp.c_proj

    def heads(self, layer):
        return layer.attn.c_attn.weight.shape[1] // 3 // 8

    def head_dim(self, layer):
        return 8

    def after_heads_removed(self, layer, n_heads, n_kv):
        layer.attn.split_size = n_heads * 8
        layer.attn.num_heads = n_heads

    def kill_attention(self, layer):
        layer.attn, layer.ln_1 = ZeroBranch(tuple_out=True), nn.Identity()

    def kill_mlp(self, layer):
        layer.mlp, layer.ln_2 = ZeroBranch(), nn.Identity()


# -- Qwen2 / LLaMA (GQA + SwiGLU) ---------------------------------------------------------------

class Qwen2(Transformer):
    """4 query heads over 2 KV heads of 8 (Qwen2 has Q, K, V biases; LLaMA has none)."""

    name = "qwen2"
    input_names = ["input_ids", "attention_mask"]
    output = "logits"

    def __init__(self):
        super().__init__()
        self.planted = Planted(kv_groups={0: [1]}, neurons={0: [4, 30], 1: [11]}, dead_attention=[1],
                               dead_mlp=[2])

    def config(self):
        from transformers import Qwen2Config
        return Qwen2Config(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                           tie_word_embeddings=False, use_sliding_window=False)

    def build(self):
        from transformers import Qwen2ForCausalLM
        return Qwen2ForCausalLM(self.config())

    def inputs(self, batch, seq, g):
        return torch.randint(0, 64, (batch, seq), generator=g), torch.ones(batch, seq, dtype=torch.int64)

    def input_spec(self):
        return [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"], "high": 64},
                {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"], "mask": True}]

    def layers(self, model):
        return list(model.model.layers)

    def proj(self, layer):
        a = layer.self_attn
        return {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.o_proj}

    def mlp(self, layer):
        return [layer.mlp.gate_proj, layer.mlp.up_proj], layer.mlp.down_proj

    def heads(self, layer):
        return layer.self_attn.q_proj.weight.shape[0] // 8

    def kv_heads(self, layer):
        return layer.self_attn.k_proj.weight.shape[0] // 8

    def head_dim(self, layer):
        return 8

    def after_heads_removed(self, layer, n_heads, n_kv):
        layer.self_attn.num_key_value_groups = n_heads // n_kv

    def kill_attention(self, layer):
        layer.self_attn, layer.input_layernorm = ZeroBranch(tuple_out=True), nn.Identity()

    def kill_mlp(self, layer):
        layer.mlp, layer.post_attention_layernorm = ZeroBranch(), nn.Identity()


class Llama(Qwen2):
    """6 query heads over 2 KV heads (3 per group, no biases): more query heads per group than KV
    heads, so a unit is the same query head of every group and the KV heads stay (see
    onnxprune/analysis/rules/expand.py); nothing about heads is planted (a query head is never
    exactly dead by its own weights: its softmax averages the values), only neurons and branches."""

    name = "llama"

    def __init__(self):
        super().__init__()
        self.planted = Planted(neurons={0: [4, 30], 1: [11, 12]}, dead_attention=[1], dead_mlp=[2])

    def build(self):
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=64, hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                          tie_word_embeddings=False)
        return LlamaForCausalLM(cfg)


class Qwen2KV(Qwen2):
    """Qwen2 as a decoder with a KV cache, the way optimum and onnxruntime-genai export one:
    inputs input_ids, attention_mask (past + new positions), position_ids and
    past_key_values.{i}.key / .value (batch, kv heads, past, head_dim); outputs logits and
    present.{i}.key / .value.  KV group 1 of layer 0 is dead (zero values); its cache goes with it,
    so the pruned model reads and writes one KV head there.  A cache is what the model wrote at
    earlier steps: the dead group's cached values are zero.  The legacy export takes any batch,
    sequence and past length; the dynamo export is the one-token decode step (sequence 1; torch.export
    cannot say attention_mask's length is past + sequence for two dynamic sizes)."""

    name = "qwen2_kv"
    exporters = ("legacy", "dynamo")
    LAYERS, KV, HD, PAST = 3, 2, 8, 5

    def __init__(self):
        super().__init__()
        self.planted = Planted(kv_groups={0: [1]}, neurons={0: [4, 30], 1: [11]}, dead_mlp=[2])
        self.cache_names = [f"past_key_values.{i}.{k}" for i in range(self.LAYERS) for k in ("key", "value")]
        self.input_names = ["input_ids", "attention_mask", "position_ids"] + self.cache_names
        self.output_names = ["logits"] + [f"present.{i}.{k}" for i in range(self.LAYERS) for k in ("key", "value")]

    def wrap(self, model):
        return CacheWrapper(model, self.LAYERS).eval()

    def inputs(self, batch, seq, g):
        ids = torch.randint(0, 64, (batch, seq), generator=g)
        mask = torch.ones(batch, self.PAST + seq, dtype=torch.int64)
        pos = torch.arange(self.PAST, self.PAST + seq).expand(batch, seq)
        past = []
        for i in range(self.LAYERS):
            for kind in ("key", "value"):
                t = torch.randn(batch, self.KV, self.PAST, self.HD, generator=g)
                if kind == "value":  # what the model itself cached: its dead groups' values are zero
                    for group in self.planted.kv_groups.get(i, []):
                        t[:, group] = 0
                past.append(t)
        return (ids, mask, pos, *past)

    def for_removed(self, tensors, outputs: bool = False):
        """Inputs (or outputs) as the removed model has them: without the dead groups' cache."""
        tensors, first = list(tensors), 1 if outputs else 3
        for i, groups in self.planted.kv_groups.items():
            keep = _keep(self.KV, groups)
            for j in (2 * i, 2 * i + 1):
                t = tensors[first + j]
                tensors[first + j] = t[:, keep.numpy()] if isinstance(t, np.ndarray) else t[:, keep]
        return tensors

    def test_sizes(self, kind):
        return ((1, 1), (3, 1)) if kind == "dynamo" else ((1, 4), (3, 2))

    def input_spec(self):
        return [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"], "high": 64},
                {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total"], "mask": True},
                {"name": "position_ids", "dtype": "int64", "shape": ["batch", "sequence"], "positions": True}] + \
            [{"name": n, "dtype": "float32", "shape": ["batch", self.KV, "past", self.HD], "cache": True}
             for n in self.cache_names]

    def cache_entry(self, kind):
        return {"inputs": self.cache_names, "outputs": self.output_names[1:], "axis": 1,
                "sequence": 1 if kind == "dynamo" else None}

    def export(self, model, kind, path, removed):
        wrapped = self.wrap(model)
        seq = 1 if kind == "dynamo" else 3
        xs = self.inputs(TRACE_BATCH, seq, torch.Generator().manual_seed(7))
        if removed:
            xs = tuple(self.for_removed(xs))
        if kind == "legacy":
            dyn = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total"},
                   "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
            dyn.update({n: {0: "batch", 2: "past"} for n in self.cache_names})
            dyn.update({n: {0: "batch", 2: "total"} for n in self.output_names[1:]})
            torch.onnx.export(wrapped, xs, path, dynamo=False, opset_version=LEGACY_OPSET,
                              input_names=self.input_names, output_names=self.output_names, dynamic_axes=dyn)
        else:
            for f in (path, path + ".data"):
                if os.path.exists(f):
                    os.remove(f)
            batch = torch.export.Dim("batch", min=1, max=64)
            past = torch.export.Dim("past", min=1, max=64)
            shapes = ({0: batch}, {0: batch, 1: past + 1}, {0: batch},
                      tuple({0: batch, 2: past} for _ in self.cache_names))
            torch.onnx.export(wrapped, xs, path, dynamo=True, input_names=self.input_names,
                              output_names=self.output_names, dynamic_shapes=shapes)
        finish_file(path)


class CacheWrapper(nn.Module):
    """input_ids, attention_mask, position_ids, *past (key, value per layer) -> logits, *present."""

    def __init__(self, model, layers: int):
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        return (out.logits, *[t for layer in cache.layers for t in (layer.keys, layer.values)])


# -- Swin ---------------------------------------------------------------------------------------

class Swin(Transformer):
    """Two stages of two blocks (window 4 on 8x8 and 4x4 token maps; the second block of the first
    stage is shifted, with the cyclic-shift mask added to the relative position bias)."""

    name = "swin"
    input_names = ["pixel_values"]
    output = "logits"
    seq_dynamic = False

    def __init__(self):
        super().__init__()
        # layer numbers count blocks across stages: 0, 1 (shifted) in stage 0; 2, 3 in stage 1
        self.planted = Planted(heads={1: [1], 2: [0]}, neurons={0: [3, 20], 1: [9]}, dead_mlp=[2],
                               dead_attention=[3])

    def build(self):
        from transformers import SwinConfig, SwinForImageClassification
        cfg = SwinConfig(image_size=16, patch_size=2, num_channels=3, embed_dim=16, depths=[2, 2],
                         num_heads=[2, 4], window_size=4, mlp_ratio=2.0, num_labels=10,
                         drop_path_rate=0.0)
        # "eager": the dynamo exporter of torch 2.13 fails on the sdpa path's output view
        # ("Cannot view a tensor with shape [8, 16, 2, 8] and strides (256, 8, 128, 1)")
        cfg._attn_implementation = "eager"
        return SwinForImageClassification(cfg)

    def inputs(self, batch, seq, g):
        return (torch.randn(batch, 3, 16, 16, generator=g),)

    def input_spec(self):
        return [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 16, 16]}]

    def layers(self, model):
        return [blk for stage in model.swin.encoder.layers for blk in stage.blocks]

    def proj(self, layer):
        a = layer.attention
        return {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.o_proj}

    def mlp(self, layer):
        return [layer.mlp.fc1], layer.mlp.fc2

    def heads(self, layer):
        return layer.attention.num_attention_heads

    def head_dim(self, layer):
        return layer.attention.head_dim

    def per_head_params(self, layer):
        return [(layer.attention.relative_position_bias, "relative_position_bias_table", 1)]

    def after_heads_removed(self, layer, n_heads, n_kv):
        layer.attention.num_attention_heads = n_heads

    def kill_attention(self, layer):
        layer.attention, layer.layernorm_before = ZeroBranch(tuple_out=True), nn.Identity()

    def kill_mlp(self, layer):
        layer.mlp, layer.layernorm_after = ZeroBranch(), nn.Identity()


# -- CNNs -------------------------------------------------------------------------------------

def keep_norm(bn: nn.BatchNorm2d, drop) -> None:
    keep = _keep(bn.num_features, drop)
    with torch.no_grad():
        bn.weight = nn.Parameter(bn.weight[keep].clone())
        bn.bias = nn.Parameter(bn.bias[keep].clone())
        bn.running_mean = bn.running_mean[keep].clone()
        bn.running_var = bn.running_var[keep].clone()
    bn.num_features = len(keep)


def keep_grouped(conv: nn.Conv2d, drop) -> None:
    """Remove whole groups of a grouped (or depthwise) conv: their output channels, which are also
    the input channels they read."""
    per_group, groups = conv.out_channels // conv.groups, conv.groups
    in_per_group = conv.in_channels // groups
    assert len(drop) % per_group == 0, "a grouped conv loses whole groups"
    lost = len(drop) // per_group
    keep_out(conv, drop)
    conv.groups = groups - lost
    conv.in_channels -= lost * in_per_group


@dataclass
class ChannelCut:
    """Channels (or FC neurons) planted dead: `producer`'s outputs and every norm's gamma and beta
    there are zero. The removed model slices them out of the producer, the norms, the grouped
    convs they pass through, the layers that read them (`consumers`) and the layers whose outputs
    are multiplied with them (`multiplied`: a squeeze-excite's expand conv)."""

    producer: str
    channels: list[int]
    norms: list[str] = field(default_factory=list)
    grouped: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    multiplied: list[str] = field(default_factory=list)
    #: grouped convs reading the channels, which are the same index in every group
    grouped_consumers: list[str] = field(default_factory=list)


@dataclass
class DeadBranch:
    """A residual branch that adds zero: its last norm's gamma and beta (or its layer scale) are
    zero; the removed model replaces `block` (the whole residual unit) by an Identity (the
    block's input already went through the activation the block ends with)."""

    zero: str     # a BatchNorm2d module, or a parameter (ConvNeXt's layer_scale_parameter)
    block: str


class CNN:
    input_names = ["pixel_values"]
    output = "logits"
    seq_dynamic = False
    cuts: list[ChannelCut] = []
    branches: list[DeadBranch] = []

    def __init__(self):
        self.planted = Planted(channels={c.producer: c.channels for c in self.cuts},
                               dead_blocks=[b.block for b in self.branches])

    def inputs(self, batch, seq, g):
        return (torch.randn(batch, 3, 32, 32, generator=g),)

    def input_spec(self):
        return [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 32, 32]}]

    def plant(self, model) -> None:
        with torch.no_grad():
            for cut in self.cuts:
                zero_out(model.get_submodule(cut.producer), cut.channels)
                for path in cut.norms:
                    zero_out(model.get_submodule(path), cut.channels)  # gamma and beta
            for branch in self.branches:
                target = _get(model, branch.zero)
                if isinstance(target, nn.Parameter):
                    target.zero_()
                else:
                    target.weight.zero_()
                    target.bias.zero_()

    def remove(self, model) -> None:
        for cut in self.cuts:
            keep_out(model.get_submodule(cut.producer), cut.channels)
            for path in cut.norms:
                keep_norm(model.get_submodule(path), cut.channels)
            for path in cut.grouped:
                keep_grouped(model.get_submodule(path), cut.channels)
            for path in cut.consumers:
                keep_in(model.get_submodule(path), cut.channels)
            for path in cut.grouped_consumers:
                conv = model.get_submodule(path)
                per_group = conv.in_channels // conv.groups
                index = sorted({c % per_group for c in cut.channels})
                assert len(index) * conv.groups == len(cut.channels), "the same index in every group"
                keep_in(conv, index)
                conv.in_channels = per_group * conv.groups - len(cut.channels)
            for path in cut.multiplied:
                keep_out(model.get_submodule(path), cut.channels)
        for branch in self.branches:
            parent, _, attr = branch.block.rpartition(".")
            setattr(model.get_submodule(parent), attr, nn.Identity())


def _get(model, path: str):
    parent, _, attr = path.rpartition(".")
    return getattr(model.get_submodule(parent), attr)


class ResNet(CNN):
    name = "resnet"
    _l = "resnet.encoder.stages"
    cuts = [ChannelCut(f"{_l}.0.layers.0.layer.0.convolution", [2, 5], norms=[f"{_l}.0.layers.0.layer.0.normalization"],
                       consumers=[f"{_l}.0.layers.0.layer.1.convolution"]),
            ChannelCut(f"{_l}.1.layers.0.layer.0.convolution", [0, 9, 30],
                       norms=[f"{_l}.1.layers.0.layer.0.normalization"],
                       consumers=[f"{_l}.1.layers.0.layer.1.convolution"])]
    branches = [DeadBranch(f"{_l}.1.layers.1.layer.1.normalization", f"{_l}.1.layers.1")]

    def build(self):
        from transformers import ResNetConfig, ResNetForImageClassification
        return ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[2, 2],
                                                         layer_type="basic", num_labels=10))


class MobileNetV2(CNN):
    name = "mobilenet_v2"
    _l = "mobilenet_v2.layer"
    cuts = [ChannelCut(f"{_l}.2.expand_1x1.convolution", [1, 7, 40],
                       norms=[f"{_l}.2.expand_1x1.normalization", f"{_l}.2.conv_3x3.normalization"],
                       grouped=[f"{_l}.2.conv_3x3.convolution"], consumers=[f"{_l}.2.reduce_1x1.convolution"])]
    branches = [DeadBranch(f"{_l}.3.reduce_1x1.normalization", f"{_l}.3")]

    def build(self):
        from transformers import MobileNetV2Config, MobileNetV2ForImageClassification
        return MobileNetV2ForImageClassification(MobileNetV2Config(image_size=32, depth_multiplier=0.1,
                                                                   finegrained_output=False, num_labels=10))


class ConvNeXt(CNN):
    name = "convnext"
    _l = "convnext.encoder.stages"
    cuts = [ChannelCut(f"{_l}.0.layers.0.pwconv1", [4, 33, 60], consumers=[f"{_l}.0.layers.0.pwconv2"]),
            ChannelCut(f"{_l}.1.layers.0.pwconv1", [100], consumers=[f"{_l}.1.layers.0.pwconv2"])]
    branches = [DeadBranch(f"{_l}.1.layers.1.layer_scale_parameter", f"{_l}.1.layers.1")]

    def build(self):
        from transformers import ConvNextConfig, ConvNextForImageClassification
        return ConvNextForImageClassification(ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[2, 2],
                                                             num_labels=10, image_size=32, patch_size=2))


class EfficientNet(CNN):
    name = "efficientnet"
    _b = "efficientnet.encoder.blocks"
    cuts = [ChannelCut(f"{_b}.1.expansion.expand_conv", [3, 10],
                       norms=[f"{_b}.1.expansion.expand_bn", f"{_b}.1.depthwise_conv.depthwise_norm"],
                       grouped=[f"{_b}.1.depthwise_conv.depthwise_conv"],
                       consumers=[f"{_b}.1.squeeze_excite.reduce", f"{_b}.1.projection.project_conv"],
                       multiplied=[f"{_b}.1.squeeze_excite.expand"])]
    branches = [DeadBranch(f"{_b}.4.projection.project_bn", f"{_b}.4")]

    def build(self):
        from transformers import EfficientNetConfig, EfficientNetForImageClassification
        return EfficientNetForImageClassification(EfficientNetConfig(
            image_size=32, width_coefficient=0.1, depth_coefficient=0.5, hidden_dim=128, num_labels=10))


class RegNet(CNN):
    """RegNetY: grouped 3x3 convs (4 groups of 8 channels here) and squeeze-excite. With few wide
    groups a unit is the same channel index in every group (rules/conv.py), so that is what is
    planted: channel index 3 of the 1x1 conv feeding the grouped conv, and output index 5 of the
    grouped conv (with its squeeze-excite and the 1x1 conv after it)."""

    name = "regnet"
    _l = "regnet.encoder.stages.1.layers"
    cuts = [ChannelCut(f"{_l}.1.layer.0.convolution", [3, 11, 19, 27], norms=[f"{_l}.1.layer.0.normalization"],
                       grouped_consumers=[f"{_l}.1.layer.1.convolution"]),
            ChannelCut(f"{_l}.1.layer.1.convolution", [5, 13, 21, 29], norms=[f"{_l}.1.layer.1.normalization"],
                       consumers=[f"{_l}.1.layer.2.attention.0", f"{_l}.1.layer.3.convolution"],
                       multiplied=[f"{_l}.1.layer.2.attention.2"])]
    branches = [DeadBranch(f"{_l}.2.layer.3.normalization", f"{_l}.2")]

    def build(self):
        from transformers import RegNetConfig, RegNetForImageClassification
        return RegNetForImageClassification(RegNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 3],
                                                         groups_width=8, num_labels=10, layer_type="y"))


MODELS = {cls.name: cls for cls in (Bert, ViT, GPT2, Qwen2, Llama, Qwen2KV, Swin, ResNet, MobileNetV2, ConvNeXt,
                                    EfficientNet, RegNet)}


# a model's seed is 1000 + its place here (new models go at the end: the others' files stay the same)
SEED_ORDER = ["bert", "convnext", "efficientnet", "gpt2", "llama", "mobilenet_v2", "qwen2", "regnet", "resnet", "swin",
              "vit", "qwen2_kv"]


# --------------------------------------------------------------------------------------------
# export and checks
# --------------------------------------------------------------------------------------------

def export(spec: Transformer, model: nn.Module, kind: str, path: str, removed: bool = False) -> None:
    if hasattr(spec, "export"):  # its own inputs, outputs and dynamic axes (a decoder with a KV cache)
        return spec.export(model, kind, path, removed)
    wrapped = Wrapper(model, spec.input_names, spec.output).eval()
    xs = spec.inputs(TRACE_BATCH, TRACE_SEQ, torch.Generator().manual_seed(7))
    names = spec.input_names
    if kind == "legacy":
        dyn = {n: ({0: "batch", 1: "sequence"} if spec.seq_dynamic and len(s["shape"]) == 2 else {0: "batch"})
               for n, s in zip(names, spec.input_spec())}
        dyn["output"] = {0: "batch", 1: "sequence"} if spec.seq_dynamic and spec.output != "logits" or \
            spec.seq_dynamic else {0: "batch"}
        torch.onnx.export(wrapped, xs, path, dynamo=False, opset_version=LEGACY_OPSET, input_names=names,
                          output_names=["output"], dynamic_axes=dyn)
    elif kind == "dynamo_static":  # torch.onnx.export(..., dynamo=True) as called without dynamic shapes
        for f in (path, path + ".data"):
            if os.path.exists(f):
                os.remove(f)
        torch.onnx.export(wrapped, xs, path, dynamo=True, input_names=names, output_names=["output"])
    else:
        batch = torch.export.Dim("batch", min=1, max=64)
        seq = torch.export.Dim("sequence", min=2, max=32)
        shapes = tuple({0: batch, 1: seq} if spec.seq_dynamic and len(s["shape"]) == 2 else {0: batch}
                       for s in spec.input_spec())
        for f in (path, path + ".data"):
            if os.path.exists(f):
                os.remove(f)
        torch.onnx.export(wrapped, xs, path, dynamo=True, input_names=names, output_names=["output"],
                          dynamic_shapes=(shapes,))
    finish_file(path)


def finish_file(path: str) -> None:
    m = onnx.load(path)  # reads the dynamo exporter's external data back in
    strip_node_metadata(m)
    if os.path.exists(path + ".data"):
        os.remove(path + ".data")
    onnx.save_model(m, path)
    onnx.checker.check_model(path)


def strip_node_metadata(m: onnx.ModelProto) -> None:
    """The dynamo exporter's per-node metadata (module scopes, FX nodes, source paths: most of a
    small file, and machine-specific) is dropped; onnxprune does not read it."""
    for node in m.graph.node:
        del node.metadata_props[:]


def torch_outputs(spec, model, xs) -> list[np.ndarray]:
    with torch.no_grad():
        if hasattr(spec, "wrap"):
            return [t.numpy() for t in spec.wrap(model)(*xs)]
        return [Wrapper(model, spec.input_names, spec.output)(*xs).numpy()]


def input_spec(spec, kind) -> list[dict]:
    """The inputs' shapes as exported: static ones (the traced batch 2 and sequence 8) for dynamo_static."""
    entries = spec.input_spec()
    if kind == "dynamo_static":
        static = {"batch": TRACE_BATCH, "sequence": TRACE_SEQ}
        entries = [dict(e, shape=[static.get(d, d) for d in e["shape"]]) for e in entries]
    return entries


def test_sizes(spec, kind):
    if hasattr(spec, "test_sizes"):
        return spec.test_sizes(kind)
    return ((TRACE_BATCH, TRACE_SEQ),) if kind == "dynamo_static" else ((1, 16), (3, 7))


def check_ort(path, spec, model, seed, kind, removed: bool = False) -> float:
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch, seq in test_sizes(spec, kind):
        xs = spec.inputs(batch, seq, g)
        if removed and hasattr(spec, "for_removed"):
            xs = spec.for_removed(xs)
        ref = torch_outputs(spec, model, xs)
        got = sess.run(None, {n: x.numpy() for n, x in zip(spec.input_names, xs)})
        for r, o in zip(ref, got):
            assert o.shape == r.shape, (o.shape, r.shape)
            worst = max(worst, float(np.max(np.abs(o - r))))
    assert worst < ATOL, f"onnxruntime vs torch: max abs err {worst:.3g}"
    return worst


def same_function(spec, a, b, seed) -> float:
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    sizes = spec.test_sizes("legacy") if hasattr(spec, "test_sizes") else ((1, 16), (3, 7), (TRACE_BATCH, TRACE_SEQ))
    for batch, seq in sizes:
        xs = spec.inputs(batch, seq, g)
        want = torch_outputs(spec, a, xs)
        if hasattr(spec, "for_removed"):  # the removed model reads and writes fewer cached heads
            xs, want = spec.for_removed(xs), spec.for_removed(want, outputs=True)
        got = torch_outputs(spec, b, xs)
        worst = max(worst, max(float(np.max(np.abs(w - o))) for w, o in zip(want, got)))
    assert worst < 1e-5, f"removed model differs from the dead one by {worst:.3g}"
    return worst


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(MODELS))
    ap.add_argument("--exporters", default=",".join(EXPORTERS),
                    help="legacy: dynamo=False, opset 17, dynamic batch (and sequence); dynamo: dynamo=True with "
                         "dynamic shapes; dynamo_static: dynamo=True without (static shapes, its default)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    names = [n for n in args.only.split(",") if n] or list(MODELS)
    manifest_path = os.path.join(args.out, "manifest.json")
    manifest = json.load(open(manifest_path)) if os.path.exists(manifest_path) else {}
    import transformers
    print(f"torch {torch.__version__}  transformers {transformers.__version__}  onnx {onnx.__version__}  "
          f"onnxruntime {ort.__version__}", flush=True)
    failures = []
    for name in names:
        spec = MODELS[name]()
        seed = 1000 + SEED_ORDER.index(name)
        torch.manual_seed(seed)
        dead = randomise(spec.build(), seed)
        spec.plant(dead)
        removed = copy.deepcopy(dead)
        spec.remove(removed)
        removed.eval()
        diff = same_function(spec, dead, removed, seed)
        print(f"{name}: torch params {n_params(dead)} -> {n_params(removed)} removed "
              f"(max |dead - removed| {diff:.1e})", flush=True)
        for kind in [k for k in args.exporters.split(",") if k and k in getattr(spec, "exporters", EXPORTERS)]:
            for variant, model in (("", dead), ("_removed", removed)):
                path = os.path.join(args.out, f"{name}_{kind}{variant}.onnx")
                try:
                    export(spec, model, kind, path, removed=bool(variant))
                    err = check_ort(path, spec, model, seed + 1, kind, removed=bool(variant))
                    print(f"  {os.path.basename(path):28s} {os.path.getsize(path) / 1024:7.1f} KB  "
                          f"ort-vs-torch {err:.1e}", flush=True)
                except Exception as e:  # one failed export does not stop the others
                    failures.append(os.path.basename(path))
                    print(f"FAILED {os.path.basename(path)}: {type(e).__name__}: {e}", flush=True)
                    traceback.print_exc()
            manifest[f"{name}_{kind}"] = {
                "model": name, "exporter": kind, "file": f"{name}_{kind}.onnx",
                "removed": f"{name}_{kind}_removed.onnx", "inputs": input_spec(spec, kind),
                "planted": spec.planted.to_dict(), "architecture": type(dead).__name__,
            }
            if hasattr(spec, "cache_entry"):
                manifest[f"{name}_{kind}"]["cache"] = spec.cache_entry(kind)
    with open(manifest_path, "w") as f:
        json.dump(dict(sorted(manifest.items())), f, indent=1)
        f.write("\n")
    for f in os.listdir(args.out):
        if f.endswith((".md", ".sarif")) and f.startswith("onnx_export"):
            os.remove(os.path.join(args.out, f))
    if failures:
        print("FAILURES: " + ", ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
