#!/usr/bin/env python
"""Export the small transformer test fixtures in ``models/fixtures/transformers/``.

(A subfolder, because ``tests/test_fixtures.py`` runs its CNN checks on every
``models/fixtures/*.onnx`` and feeds float inputs; these models take int64
token ids.)

Four tiny transformer architectures are written here by hand in PyTorch.
They follow the Hugging Face ``transformers`` modelling code (same module
names, same reshapes, same mask and rotary arithmetic), so the exported graphs
look like real exported checkpoints, but ``transformers`` is not needed:

* ``bert_encoder`` -- BERT-style encoder: word + position embeddings,
  embedding LayerNorm, self-attention with separate Q/K/V Linears and an
  additive attention mask built from the int64 ``attention_mask`` input
  (``(1 - mask) * finfo.min``), exact (erf) GELU FFN, residuals, post-LN.
  Inputs ``input_ids`` and ``attention_mask`` (int64 ``[batch, seq]``),
  output ``last_hidden_state`` ``[batch, seq, 64]``.
* ``vit`` -- ViT: Conv patch embedding (patch 4 on ``[batch, 3, 16, 16]``),
  cls token expanded and concatenated, learned position embeddings, pre-LN
  blocks with erf GELU FFN, final LayerNorm and a Linear head on the cls
  token.  Input ``pixel_values``, output ``logits`` ``[batch, 10]``.  Only
  the batch is dynamic (the sequence is fixed at 1 + 16 patches).
* ``gpt2_decoder`` -- GPT-2 style decoder: fused QKV projection ``c_attn``
  (one Linear to 3*hidden, then ``split``), causal mask from a ``tril``
  buffer sliced to the sequence length and applied with ``where``, "gelu_new"
  (tanh approximation written out as in HF), pre-LN, final LayerNorm,
  untied LM head.  Input ``input_ids``, output ``logits`` ``[batch, seq, 128]``.
* ``llama_decoder`` -- LLaMA style: RMSNorm (float32 variance, rsqrt),
  rotary embeddings computed in the graph from ``inv_freq`` and the
  positions (``rotate_half`` by slicing, negation and concat), grouped-query
  attention (4 query heads, 2 KV heads; ``repeat_kv`` by ``expand`` and
  ``reshape``) through ``F.scaled_dot_product_attention(is_causal=True)``
  (the HF default "sdpa" path), SwiGLU MLP (gate_proj, up_proj, SiLU, Mul,
  down_proj), no biases, untied LM head.  Input ``input_ids``, output
  ``logits``.

All use hidden 64, 4 heads of 16, FFN 256, 2 layers, vocab 128 and at most
16 positions.  Weights are random with a fixed seed.  LayerNorm / RMSNorm
weights and biases are perturbed so that no norm is an identity.

Each model is exported twice:

* ``<name>_legacy.onnx`` -- the TorchScript exporter (``dynamo=False``),
  opset 17, dynamic ``batch`` and ``sequence`` axes, all weights inline.
* ``<name>_dynamo.onnx`` + ``<name>_dynamo.onnx.data`` -- the
  ``torch.export``-based exporter (``dynamo=True``) with its default opset,
  dynamic batch and sequence via ``torch.export.Dim``, external data as the
  exporter writes it (large weights external, small and int64 tensors
  inline; onnxruntime refuses int64 shape tensors stored externally).

Every written file is checked with onnxruntime against PyTorch at two
sequence lengths (and two batch sizes), max abs error < 1e-4, and one line
per file is printed: name, opset, size, op-type counts.  A failure of one
exporter for one model is reported and the script continues; the exit
status is non-zero if anything failed.

Only needed to regenerate the fixtures (not by the package or its tests)::

    pip install torch onnxscript      # CPU build is enough
    python models/export_transformers.py [--only bert_encoder,vit] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import sys
import traceback

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.set_num_threads(1)

HERE = os.path.dirname(os.path.abspath(__file__))
# a subfolder: tests/test_fixtures.py globs fixtures/*.onnx for the CNN suite
DEFAULT_OUT = os.path.join(HERE, "fixtures", "transformers")
LEGACY_OPSET = 17
ATOL = 1e-4

HIDDEN = 64
HEADS = 4
HEAD_DIM = HIDDEN // HEADS  # 16
KV_HEADS = 2  # llama only
FFN = 256
LAYERS = 2
VOCAB = 128
MAX_POS = 16
NUM_CLASSES = 10
IMAGE = 16
PATCH = 4

# --size base: the widths and depths of the published base models (BERT-base, ViT-B/16, GPT-2 small;
# LLaMA at that width with 4 KV heads; one 30522-token vocabulary), for benchmarks/bench_transformers.py.
# --size small: a 22 M-parameter sentence encoder's shape (6 layers of 12 heads x 32, FFN 1536, as
# all-MiniLM-L6-v2), for benchmarks/bench_repair.py. Not committed: BERT-base alone is 440 MB.
SIZES = {
    "tiny": dict(HIDDEN=64, HEADS=4, KV_HEADS=2, FFN=256, LAYERS=2, VOCAB=128, MAX_POS=16,
                 NUM_CLASSES=10, IMAGE=16, PATCH=4, LLAMA_FFN=256),
    "base": dict(HIDDEN=768, HEADS=12, KV_HEADS=4, FFN=3072, LAYERS=12, VOCAB=30522, MAX_POS=512,
                 NUM_CLASSES=1000, IMAGE=224, PATCH=16, LLAMA_FFN=2048),
    "small": dict(HIDDEN=384, HEADS=12, KV_HEADS=4, FFN=1536, LAYERS=6, VOCAB=30522, MAX_POS=512,
                  NUM_CLASSES=1000, IMAGE=224, PATCH=16, LLAMA_FFN=1024),
}
LLAMA_FFN = FFN


def configure(size: str) -> None:
    """Set the module-level dimensions the model classes read (before building a model)."""
    global ATOL, HEAD_DIM
    globals().update(SIZES[size])
    HEAD_DIM = HIDDEN // HEADS
    ATOL = 1e-4 if size == "tiny" else 2e-3  # layers of 384- and 768-wide float32 sums drift more


# --------------------------------------------------------------------------
# BERT (post-LN encoder, HF BertModel with eager attention)
# --------------------------------------------------------------------------


class BertEmbeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, HIDDEN)
        self.position_embeddings = nn.Embedding(MAX_POS, HIDDEN)
        self.LayerNorm = nn.LayerNorm(HIDDEN, eps=1e-12)
        self.register_buffer("position_ids", torch.arange(MAX_POS).expand((1, -1)), persistent=False)

    def forward(self, input_ids):
        seq_length = input_ids.size(1)
        position_ids = self.position_ids[:, :seq_length]
        emb = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        return self.LayerNorm(emb)


class BertSelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.num_attention_heads = HEADS
        self.attention_head_size = HEAD_DIM
        self.all_head_size = HEADS * HEAD_DIM
        self.query = nn.Linear(HIDDEN, self.all_head_size)
        self.key = nn.Linear(HIDDEN, self.all_head_size)
        self.value = nn.Linear(HIDDEN, self.all_head_size)

    def transpose_for_scores(self, x):
        new_x_shape = x.size()[:-1] + (self.num_attention_heads, self.attention_head_size)
        x = x.view(new_x_shape)
        return x.permute(0, 2, 1, 3)

    def forward(self, hidden_states, attention_mask):
        q = self.transpose_for_scores(self.query(hidden_states))
        k = self.transpose_for_scores(self.key(hidden_states))
        v = self.transpose_for_scores(self.value(hidden_states))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        scores = scores + attention_mask
        probs = F.softmax(scores, dim=-1)
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        new_shape = ctx.size()[:-2] + (self.all_head_size,)
        return ctx.view(new_shape)


class BertSelfOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(HIDDEN, HIDDEN)
        self.LayerNorm = nn.LayerNorm(HIDDEN, eps=1e-12)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dense(hidden_states) + input_tensor)


class BertAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.self = BertSelfAttention()
        self.output = BertSelfOutput()

    def forward(self, hidden_states, attention_mask):
        return self.output(self.self(hidden_states, attention_mask), hidden_states)


class BertIntermediate(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(HIDDEN, FFN)
        self.intermediate_act_fn = nn.GELU()  # exact (erf)

    def forward(self, x):
        return self.intermediate_act_fn(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(FFN, HIDDEN)
        self.LayerNorm = nn.LayerNorm(HIDDEN, eps=1e-12)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dense(hidden_states) + input_tensor)


class BertLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = BertAttention()
        self.intermediate = BertIntermediate()
        self.output = BertOutput()

    def forward(self, hidden_states, attention_mask):
        a = self.attention(hidden_states, attention_mask)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer() for _ in range(LAYERS)])

    def forward(self, hidden_states, attention_mask):
        for layer in self.layer:
            hidden_states = layer(hidden_states, attention_mask)
        return hidden_states


class BertModel(nn.Module):
    """BertModel without pooler; returns last_hidden_state."""

    input_names = ["input_ids", "attention_mask"]
    output_names = ["last_hidden_state"]

    def __init__(self):
        super().__init__()
        self.embeddings = BertEmbeddings()
        self.encoder = BertEncoder()

    def forward(self, input_ids, attention_mask):
        dtype = torch.float32
        ext = attention_mask[:, None, None, :].to(dtype)
        ext = (1.0 - ext) * torch.finfo(dtype).min
        return self.encoder(self.embeddings(input_ids), ext)


# --------------------------------------------------------------------------
# ViT (pre-LN, HF ViTForImageClassification with eager attention)
# --------------------------------------------------------------------------


class ViTPatchEmbeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.projection = nn.Conv2d(3, HIDDEN, kernel_size=PATCH, stride=PATCH)

    def forward(self, pixel_values):
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class ViTEmbeddings(nn.Module):
    def __init__(self):
        super().__init__()
        num_patches = (IMAGE // PATCH) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, HIDDEN))
        self.patch_embeddings = ViTPatchEmbeddings()
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_patches + 1, HIDDEN))

    def forward(self, pixel_values):
        batch_size = pixel_values.shape[0]
        emb = self.patch_embeddings(pixel_values)
        cls_tokens = self.cls_token.expand(batch_size, -1, -1)
        emb = torch.cat((cls_tokens, emb), dim=1)
        return emb + self.position_embeddings


class ViTSelfAttention(BertSelfAttention):
    def forward(self, hidden_states):  # no mask
        q = self.transpose_for_scores(self.query(hidden_states))
        k = self.transpose_for_scores(self.key(hidden_states))
        v = self.transpose_for_scores(self.value(hidden_states))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        probs = F.softmax(scores, dim=-1)
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        return ctx.view(ctx.size()[:-2] + (self.all_head_size,))


class ViTSelfOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        return self.dense(x)


class ViTAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = ViTSelfAttention()
        self.output = ViTSelfOutput()

    def forward(self, x):
        return self.output(self.attention(x))


class ViTOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(FFN, HIDDEN)

    def forward(self, hidden_states, input_tensor):
        return self.dense(hidden_states) + input_tensor


class ViTLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = ViTAttention()
        self.intermediate = BertIntermediate()
        self.output = ViTOutput()
        self.layernorm_before = nn.LayerNorm(HIDDEN, eps=1e-12)
        self.layernorm_after = nn.LayerNorm(HIDDEN, eps=1e-12)

    def forward(self, hidden_states):
        hidden_states = self.attention(self.layernorm_before(hidden_states)) + hidden_states
        return self.output(self.intermediate(self.layernorm_after(hidden_states)), hidden_states)


class ViTEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList([ViTLayer() for _ in range(LAYERS)])

    def forward(self, x):
        for layer in self.layer:
            x = layer(x)
        return x


class ViTModelInner(nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings = ViTEmbeddings()
        self.encoder = ViTEncoder()
        self.layernorm = nn.LayerNorm(HIDDEN, eps=1e-12)

    def forward(self, pixel_values):
        return self.layernorm(self.encoder(self.embeddings(pixel_values)))


class ViTForImageClassification(nn.Module):
    input_names = ["pixel_values"]
    output_names = ["logits"]

    def __init__(self):
        super().__init__()
        self.vit = ViTModelInner()
        self.classifier = nn.Linear(HIDDEN, NUM_CLASSES)

    def forward(self, pixel_values):
        seq = self.vit(pixel_values)
        return self.classifier(seq[:, 0, :])


# --------------------------------------------------------------------------
# GPT-2 (pre-LN decoder, fused c_attn, HF GPT2LMHeadModel eager attention)
# --------------------------------------------------------------------------


class NewGELUActivation(nn.Module):
    """HF "gelu_new": the tanh approximation, written out."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GPT2Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_dim = HIDDEN
        self.num_heads = HEADS
        self.head_dim = HEAD_DIM
        self.split_size = HIDDEN
        self.register_buffer(
            "bias", torch.tril(torch.ones((MAX_POS, MAX_POS), dtype=torch.bool)).view(1, 1, MAX_POS, MAX_POS),
            persistent=False,
        )
        self.c_attn = nn.Linear(HIDDEN, 3 * HIDDEN)  # fused QKV
        self.c_proj = nn.Linear(HIDDEN, HIDDEN)

    def _split_heads(self, tensor):
        new_shape = tensor.size()[:-1] + (self.num_heads, self.head_dim)
        return tensor.view(new_shape).permute(0, 2, 1, 3)

    def _merge_heads(self, tensor):
        tensor = tensor.permute(0, 2, 1, 3).contiguous()
        return tensor.view(tensor.size()[:-2] + (self.num_heads * self.head_dim,))

    def forward(self, hidden_states):
        query, key, value = self.c_attn(hidden_states).split(self.split_size, dim=2)
        query, key, value = self._split_heads(query), self._split_heads(key), self._split_heads(value)
        attn_weights = torch.matmul(query, key.transpose(-1, -2)) / (value.size(-1) ** 0.5)
        query_length, key_length = query.size(-2), key.size(-2)
        causal_mask = self.bias[:, :, key_length - query_length : key_length, :key_length]
        mask_value = torch.full([], torch.finfo(attn_weights.dtype).min, dtype=attn_weights.dtype)
        attn_weights = torch.where(causal_mask, attn_weights, mask_value)
        attn_weights = F.softmax(attn_weights, dim=-1)
        attn_output = self._merge_heads(torch.matmul(attn_weights, value))
        return self.c_proj(attn_output)


class GPT2MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = nn.Linear(HIDDEN, FFN)
        self.c_proj = nn.Linear(FFN, HIDDEN)
        self.act = NewGELUActivation()

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(HIDDEN, eps=1e-5)
        self.attn = GPT2Attention()
        self.ln_2 = nn.LayerNorm(HIDDEN, eps=1e-5)
        self.mlp = GPT2MLP()

    def forward(self, hidden_states):
        hidden_states = self.attn(self.ln_1(hidden_states)) + hidden_states
        return self.mlp(self.ln_2(hidden_states)) + hidden_states


class GPT2Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, HIDDEN)
        self.wpe = nn.Embedding(MAX_POS, HIDDEN)
        self.h = nn.ModuleList([GPT2Block() for _ in range(LAYERS)])
        self.ln_f = nn.LayerNorm(HIDDEN, eps=1e-5)

    def forward(self, input_ids):
        position_ids = torch.arange(0, input_ids.size(-1), dtype=torch.long, device=input_ids.device).unsqueeze(0)
        hidden_states = self.wte(input_ids) + self.wpe(position_ids)
        for block in self.h:
            hidden_states = block(hidden_states)
        return self.ln_f(hidden_states)


class GPT2LMHeadModel(nn.Module):
    input_names = ["input_ids"]
    output_names = ["logits"]

    def __init__(self):
        super().__init__()
        self.transformer = GPT2Model()
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)  # untied

    def forward(self, input_ids):
        return self.lm_head(self.transformer(input_ids))


# --------------------------------------------------------------------------
# LLaMA (RMSNorm, rotary, GQA, SwiGLU; HF LlamaForCausalLM "sdpa" attention)
# --------------------------------------------------------------------------


class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class LlamaRotaryEmbedding(nn.Module):
    def __init__(self, dim=None, base=10000.0):
        dim = dim or HEAD_DIM
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x, position_ids):
        inv_freq_expanded = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        position_ids_expanded = position_ids[:, None, :].float()
        freqs = (inv_freq_expanded.float() @ position_ids_expanded.float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states, n_rep):
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


class LlamaAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.head_dim = HEAD_DIM
        self.num_key_value_groups = HEADS // KV_HEADS
        self.scaling = HEAD_DIM ** -0.5
        self.q_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.k_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.v_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)

    def forward(self, hidden_states, position_embeddings):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = repeat_kv(k, self.num_key_value_groups)
        v = repeat_kv(v, self.num_key_value_groups)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, scale=self.scaling, is_causal=True)
        out = out.transpose(1, 2).contiguous()
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, LLAMA_FFN, bias=False)
        self.up_proj = nn.Linear(HIDDEN, LLAMA_FFN, bias=False)
        self.down_proj = nn.Linear(LLAMA_FFN, HIDDEN, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = LlamaAttention()
        self.mlp = LlamaMLP()
        self.input_layernorm = LlamaRMSNorm(HIDDEN)
        self.post_attention_layernorm = LlamaRMSNorm(HIDDEN)

    def forward(self, hidden_states, position_embeddings):
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), position_embeddings)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class LlamaModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList([LlamaDecoderLayer() for _ in range(LAYERS)])
        self.norm = LlamaRMSNorm(HIDDEN)
        self.rotary_emb = LlamaRotaryEmbedding()

    def forward(self, input_ids):
        hidden_states = self.embed_tokens(input_ids)
        position_ids = torch.arange(0, input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings)
        return self.norm(hidden_states)


class LlamaForCausalLM(nn.Module):
    input_names = ["input_ids"]
    output_names = ["logits"]

    def __init__(self):
        super().__init__()
        self.model = LlamaModel()
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)  # untied

    def forward(self, input_ids):
        return self.lm_head(self.model(input_ids))


MODELS = {
    "bert_encoder": BertModel,
    "vit": ViTForImageClassification,
    "gpt2_decoder": GPT2LMHeadModel,
    "llama_decoder": LlamaForCausalLM,
}
# models whose sequence axis is dynamic (ViT's is fixed by the image size)
DYNAMIC_SEQ = {"bert_encoder", "gpt2_decoder", "llama_decoder"}


# --------------------------------------------------------------------------
# Weights and inputs
# --------------------------------------------------------------------------


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Deterministic, non-trivial weights; no norm is an identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (1.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.Embedding):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.5)
            elif isinstance(m, nn.LayerNorm):
                n = m.normalized_shape[0]
                m.weight.copy_(torch.rand(n, generator=g) * 1.0 + 0.5)  # [0.5, 1.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            elif isinstance(m, LlamaRMSNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 1.0 + 0.5)
            elif isinstance(m, ViTEmbeddings):
                m.cls_token.copy_(torch.randn(m.cls_token.shape, generator=g) * 0.5)
                m.position_embeddings.copy_(torch.randn(m.position_embeddings.shape, generator=g) * 0.5)
    return model.eval()


def make_inputs(name: str, batch: int, seq: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    if name == "vit":
        return (torch.randn((batch, 3, IMAGE, IMAGE), generator=g),)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g, dtype=torch.int64)
    if name != "bert_encoder":
        return (ids,)
    # row b > 0 is padded at the end by 2*b tokens (keeping at least 2 real ones)
    mask = torch.ones((batch, seq), dtype=torch.int64)
    for b in range(1, batch):
        mask[b, max(2, seq - 2 * b):] = 0
    return ids, mask


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def file_size(path: str) -> int:
    size = os.path.getsize(path)
    if os.path.exists(path + ".data"):
        size += os.path.getsize(path + ".data")
    return size


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(collections.Counter(n.op_type for n in model.graph.node).items()))


def external_count(model: onnx.ModelProto) -> tuple[int, int]:
    ext = sum(1 for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    return ext, len(model.graph.initializer)


def verify(path: str, name: str, model: nn.Module, seed: int) -> float:
    """ORT vs PyTorch at (batch 1, seq 16) and (batch 3, seq 7); max abs err."""
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    in_names = [i.name for i in sess.get_inputs()]
    g = torch.Generator().manual_seed(seed + 1000)
    worst = 0.0
    for batch, seq in ((1, MAX_POS), (3, 7)):
        xs = make_inputs(name, batch, seq, g)
        with torch.no_grad():
            ref = model(*xs).numpy()
        got = sess.run(None, {n: x.numpy() for n, x in zip(in_names, xs)})[0]
        if got.shape != ref.shape:
            raise AssertionError(f"shape mismatch at batch {batch} seq {seq}: onnx {got.shape} vs torch {ref.shape}")
        worst = max(worst, float(np.max(np.abs(got - ref))))
    if not worst < ATOL:
        raise AssertionError(f"max abs err {worst:.3g} >= {ATOL}")
    return worst


def report(path: str, err: float, note: str = "") -> None:
    m = onnx.load(path, load_external_data=False)
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    ext, total = external_count(m)
    counts = " ".join(f"{k}:{v}" for k, v in op_counts(m).items())
    print(
        f"{os.path.basename(path):28s} opset={opset} size={file_size(path) / 1024:.1f}KB "
        f"ext_init={ext}/{total} nodes={len(m.graph.node)} err={err:.1e}{note}\n    ops: {counts}",
        flush=True,
    )


def axes(name: str) -> dict[int, str]:
    return {0: "batch", 1: "sequence"} if name in DYNAMIC_SEQ else {0: "batch"}


def export_legacy(name, model, xs, path):
    cls = type(model)
    dyn = {n: axes(name) for n in cls.input_names}
    if name == "vit":
        dyn[cls.output_names[0]] = {0: "batch"}
    else:
        dyn[cls.output_names[0]] = {0: "batch", 1: "sequence"}
    torch.onnx.export(
        model, xs, path,
        dynamo=False,
        opset_version=LEGACY_OPSET,
        input_names=cls.input_names,
        output_names=cls.output_names,
        dynamic_axes=dyn,
    )
    onnx.checker.check_model(path)


def _force_external(path: str) -> None:
    """Re-save with every floating-point initializer in <basename>.data;
    integer tensors (shapes, axes, indices) stay inline for onnxruntime."""
    from onnx.external_data_helper import set_external_data

    m = onnx.load(path)
    data_name = os.path.basename(path) + ".data"
    data_path = os.path.join(os.path.dirname(path), data_name)
    if os.path.exists(data_path):
        os.remove(data_path)
    for t in m.graph.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            if not t.HasField("raw_data"):
                t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t), t.name))
            set_external_data(t, location=data_name)
    onnx.save_model(m, path)


def export_dynamo(name, model, xs, path) -> str:
    for f in (path, path + ".data"):
        if os.path.exists(f):
            os.remove(f)
    cls = type(model)
    batch = torch.export.Dim("batch", min=1, max=1024)
    if name in DYNAMIC_SEQ:
        seq = torch.export.Dim("sequence", min=2, max=MAX_POS)
        spec = {0: batch, 1: seq}
    else:
        spec = {0: batch}
    prog = torch.onnx.export(
        model, xs, path,
        dynamo=True,
        external_data=True,
        input_names=cls.input_names,
        output_names=cls.output_names,
        dynamic_shapes=tuple(spec for _ in cls.input_names),
    )
    del prog
    note = " dyn-batch" + ("+seq" if name in DYNAMIC_SEQ else "")
    m = onnx.load(path, load_external_data=False)
    ext, _ = external_count(m)
    if ext == 0 or not os.path.exists(path + ".data"):
        _force_external(path)
        note += " (external data forced)"
    onnx.checker.check_model(path)
    return note


# --------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(MODELS))
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny",
                    help="tiny: the committed test fixtures; base: BERT-base-sized, small: 22 M parameters "
                         "(benchmarks)")
    ap.add_argument("--exporters", default="legacy,dynamo", help="comma-separated subset of: legacy,dynamo")
    args = ap.parse_args(argv)
    configure(args.size)
    os.makedirs(args.out, exist_ok=True)
    names = [n for n in args.only.split(",") if n] or list(MODELS)
    for n in names:
        if n not in MODELS:
            ap.error(f"unknown model {n!r}")

    print(f"torch {torch.__version__}  onnx {onnx.__version__}  onnxruntime {ort.__version__}", flush=True)
    failures = []
    for name in names:
        seed = 4321 + list(MODELS).index(name) * 17
        torch.manual_seed(seed)
        model = randomise(MODELS[name](), seed)
        # trace with batch 2, seq 8 so that neither dim is specialised to 1
        # (nor the sequence to the maximum)
        xs = make_inputs(name, 2, 8, torch.Generator().manual_seed(seed))
        for kind in [k for k in args.exporters.split(",") if k]:
            path = os.path.join(args.out, f"{name}_{kind}.onnx")
            try:
                if kind == "legacy":
                    export_legacy(name, model, xs, path)
                    note = ""
                else:
                    note = export_dynamo(name, model, xs, path)
                err = verify(path, name, model, seed)
                report(path, err, note)
            except Exception as e:
                failures.append(f"{name}_{kind}")
                print(f"FAILED {name}_{kind}: {type(e).__name__}: {e}", flush=True)
                traceback.print_exc()
    for f in os.listdir(args.out):
        if f.endswith((".md", ".sarif")) and f.startswith("onnx_export"):
            os.remove(os.path.join(args.out, f))
    if failures:
        print("FAILURES: " + ", ".join(failures))
        return 1
    print(f"all {len(names) * len([k for k in args.exporters.split(',') if k])} exports verified "
          f"(max abs err < {ATOL})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
