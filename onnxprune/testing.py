"""Helpers for tests and benchmarks: realistic fixtures and the masking oracle.

* `materialize_zoo_model` turns the weight-less model-zoo graphs shipped with the
  onnx package (weights produced by ConstantOfShape) into models with seeded
  random weights and plausible BatchNorm statistics.
* `masked_reference` builds the oracle for a pruning plan: the dense model with
  a Mul-by-mask inserted wherever removed units would have been consumed (and,
  inside LSTM/GRU/RNN, the recurrent weight columns that read them zeroed).  A
  pruned model must produce the same outputs as this masked dense model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

ZOO_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def zoo_models() -> list[Path]:
    return sorted(ZOO_DIR.glob("light_*.onnx"))


def materialize_zoo_model(path: str | Path, seed: int = 0) -> onnx.ModelProto:
    """Replace ConstantOfShape-generated weights by seeded random initializers."""
    model = onnx.load(str(path))
    rng = np.random.default_rng(seed)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    bn_roles = _batchnorm_roles(graph)
    kept = []
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in inits:
            shape = numpy_helper.to_array(inits[node.input[0]]).astype(np.int64)
            name = node.output[0]
            role = bn_roles.get(name)
            if role == "scale":
                value = rng.uniform(0.5, 1.5, shape)
            elif role == "var":
                value = rng.uniform(0.5, 1.5, shape)
            elif role in ("bias", "mean"):
                value = rng.normal(0, 0.1, shape)
            else:
                fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
                value = rng.normal(0, 1.0 / np.sqrt(max(fan_in, 1)), shape)
            graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
            continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    used = {i for n in graph.node for i in n.input}
    live = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)
    names = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in names and i.name in used]
    del graph.input[:]
    graph.input.extend(inputs)
    model.ir_version = max(model.ir_version, 4)
    return model


def _batchnorm_roles(graph) -> dict[str, str]:
    roles = {}
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            for name, role in zip(node.input[1:], ("scale", "bias", "mean", "var")):
                roles[name] = role
    return roles


def masked_reference(model: onnx.ModelProto, analysis, removed_roots) -> onnx.ModelProto:
    """The dense model with removed units zeroed where they are consumed."""
    masks = analysis.keep_masks(removed_roots)
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    del ref.graph.value_info[:]
    new_nodes = []
    rename: dict[tuple[str, str], str] = {}
    sink_nodes: dict[str, list] = {}
    for use in analysis.state.sinks:
        if (use.tensor, use.axis) in masks:
            sink_nodes.setdefault(use.node, []).append(use)
    for node in ref.graph.node:
        for use in sink_nodes.get(node.name, []):
            rank = analysis.view.rank(use.tensor)
            shape = [1] * rank
            shape[use.axis] = -1
            mask = masks[(use.tensor, use.axis)].astype(np.float32).reshape(shape)
            mask_name = f"{use.tensor}__mask_{node.name}_{use.axis}"
            out_name = f"{use.tensor}__masked_{node.name}_{use.axis}"
            current = rename.get((node.name, use.tensor), use.tensor)
            ref.graph.initializer.append(numpy_helper.from_array(mask, mask_name))
            new_nodes.append(helper.make_node("Mul", [current, mask_name], [out_name], name=out_name))
            rename[(node.name, use.tensor)] = out_name
        for i, name in enumerate(node.input):
            if (node.name, name) in rename:
                node.input[i] = rename[(node.name, name)]
        new_nodes.append(node)
    del ref.graph.node[:]
    ref.graph.node.extend(new_nodes)
    _mask_recurrent_weights(ref, analysis, masks)
    return ref


def _mask_recurrent_weights(ref: onnx.ModelProto, analysis, masks) -> None:
    """A recurrent op consumes its own hidden units at every step, inside the op: zero the
    columns of R that read the removed ones (role 'recurrent_in'), where no Mul can go."""
    cuts: dict[str, list[tuple[int, np.ndarray]]] = {}
    for p in analysis.state.params:
        if p.role == "recurrent_in" and (p.tensor, p.axis) in masks:
            cuts.setdefault(p.tensor, []).append((p.axis, masks[(p.tensor, p.axis)]))
    for t in ref.graph.initializer:
        if t.name not in cuts:
            continue
        values = np.array(analysis.view.const(t.name), copy=True)
        for axis, keep in cuts[t.name]:
            index = [slice(None)] * values.ndim
            index[axis] = np.flatnonzero(~keep)
            values[tuple(index)] = 0
        t.CopyFrom(numpy_helper.from_array(values, t.name))


def plant_dead_units(model: onnx.ModelProto, analysis, group, unit_indices) -> None:
    """Zero everything that produces the given units of `group`, in place.

    Source weights and biases, and BatchNorm gamma and beta, are set to zero:
    what structured-sparse training exports.  `model` must be the model the
    analysis was built on.
    """
    produced_by = {"weight_out", "bias", "bn_scale", "bn_bias"}
    roots = {int(group.roots[i]) for i in unit_indices}
    inits = {t.name: t for t in model.graph.initializer}
    source_nodes = {s.node for s in group.sources}
    op_of = {n.name: n.op_type for n in model.graph.node}
    for p in group.params:
        per_channel_shift = p.role == "constant" and op_of.get(p.node) in ("Add", "Sub", "Mul")
        if not (p.role in produced_by or per_channel_shift):
            continue
        if p.role in ("weight_out", "bias") and p.node not in source_nodes:
            continue
        layout = analysis.layouts[p.tensor][p.axis]
        positions = [i for i, u in enumerate(layout.tolist()) if u >= 0 and int(analysis.root_of[u]) in roots]
        values = numpy_helper.to_array(inits[p.tensor]).copy()
        index = [slice(None)] * values.ndim
        index[p.axis] = positions
        values[tuple(index)] = 0
        inits[p.tensor].CopyFrom(numpy_helper.from_array(values, p.tensor))


# -- a LLaMA-architecture decoder, written straight to disk ------------------------------------------------

@dataclass(frozen=True)
class LlamaShape:
    """Sizes of a LLaMA-architecture decoder (defaults: TinyLlama-1.1B, 4.4 GB in float32)."""

    vocab: int = 32000
    hidden: int = 2048
    layers: int = 22
    heads: int = 32
    kv_heads: int = 4
    intermediate: int = 5632

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def params(self) -> int:
        d, kv = self.hidden, self.kv_heads * self.head_dim
        layer = 2 * d * d + 2 * d * kv + 3 * d * self.intermediate + 2 * d
        return 2 * self.vocab * d + self.layers * layer + d


def write_llama_decoder(path: str | Path, shape: LlamaShape = LlamaShape(), *, seed: int = 0,
                        per_tensor_files: bool = True) -> Path:
    """Write a random-weight LLaMA-style decoder (RMSNorm, grouped-query attention
    without rotary embeddings or a causal mask, SwiGLU) as the legacy exporter lays
    it out, with external data: one file per tensor (as some exporters write
    models over 2 GB) or one `<name>.data` file. Weights are generated and written
    one tensor at a time, so a 4.4 GB model never sits in memory."""
    path = Path(path)
    w = _DecoderWriter(path, shape, seed, per_tensor_files)
    try:
        x = w.node("Gather", [w.tensor("embed_tokens.weight", shape.vocab, shape.hidden), "input_ids"], "embed")
        for i in range(shape.layers):
            x = w.mlp(w.attention(x, f"layers.{i}"), f"layers.{i}")
        w.node("MatMul", [w.rms_norm(x, "norm"), w.tensor("lm_head.weight", shape.hidden, shape.vocab)], "logits")
    finally:
        w.close()
    graph = helper.make_graph(
        w.nodes, "llama_decoder",
        [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", "sequence", shape.vocab])],
        w.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save_model(model, str(path))  # the header: every weight already lies in its file
    return path


class _DecoderWriter:
    """write_llama_decoder's builder: nodes and initializers in order, weights straight to their files."""

    def __init__(self, path: Path, shape: LlamaShape, seed: int, per_tensor_files: bool):
        self.shape, self.rng, self.folder = shape, np.random.default_rng(seed), path.parent
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.data_name = path.name + ".data"
        self.shared = None if per_tensor_files else open(self.folder / self.data_name, "wb")
        self.offset = 0
        hd, heads, kv = shape.head_dim, shape.heads, shape.kv_heads
        self.const("two", 2.0, np.float32), self.const("eps", 1e-6, np.float32), self.const("last_axis", [-1])
        self.const("scale", np.sqrt(hd), np.float32)
        self.const("q_shape", [0, 0, heads, hd]), self.const("kv_shape", [0, 0, kv, hd])
        self.const("merge", [0, 0, heads * hd])
        self.const("unsqueeze_axis", [2]), self.const("repeat", [1, 1, heads // kv, 1, 1])
        self.const("fold", [0, heads, -1, hd])

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()

    def tensor(self, name: str, *dims: int, scale: float = 0.02, value: float | None = None) -> str:
        data = (np.full(dims, value, np.float32) if value is not None
                else (self.rng.standard_normal(dims, dtype=np.float32) * scale))
        ref = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT, dims=list(dims))
        ref.data_location = onnx.TensorProto.EXTERNAL
        if self.shared is None:
            location, start = name.replace("/", "_") + ".bin", 0
            data.tofile(self.folder / location)
        else:
            location, start = self.data_name, self.offset
            self.shared.write(data.tobytes())
            self.offset += data.nbytes
        for key, val in (("location", location), ("offset", str(start)), ("length", str(data.nbytes))):
            ref.external_data.add(key=key, value=val)
        self.inits.append(ref)
        return name

    def const(self, name: str, values, dtype=np.int64) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def rms_norm(self, x: str, prefix: str) -> str:
        node = self.node
        sq = node("Pow", [x, "two"], f"{prefix}/pow")
        mean = node("ReduceMean", [sq, "last_axis"], f"{prefix}/mean", keepdims=1)
        std = node("Sqrt", [node("Add", [mean, "eps"], f"{prefix}/add_eps")], f"{prefix}/sqrt")
        return node("Mul", [node("Div", [x, std], f"{prefix}/div"),
                            self.tensor(f"{prefix}.weight", self.shape.hidden, value=1.0)], f"{prefix}/scale")

    def attention(self, x: str, p: str) -> str:
        node, tensor = self.node, self.tensor
        d, hd, heads, kv = self.shape.hidden, self.shape.head_dim, self.shape.heads, self.shape.kv_heads
        h = self.rms_norm(x, f"{p}.input_layernorm")
        q = node("Reshape", [node("MatMul", [h, tensor(f"{p}.q_proj", d, heads * hd)], f"{p}/q"), "q_shape"],
                 f"{p}/q_heads")
        q = node("Transpose", [q], f"{p}/q_t", perm=[0, 2, 1, 3])
        kv_out = {}
        for name in ("k", "v"):
            t = node("Reshape", [node("MatMul", [h, tensor(f"{p}.{name}_proj", d, kv * hd)], f"{p}/{name}"),
                                 "kv_shape"], f"{p}/{name}_heads")
            t = node("Transpose", [t], f"{p}/{name}_t", perm=[0, 2, 1, 3])
            t = node("Unsqueeze", [t, "unsqueeze_axis"], f"{p}/{name}_5d")  # repeat_kv
            t = node("Expand", [t, "repeat"], f"{p}/{name}_rep")
            kv_out[name] = node("Reshape", [t, "fold"], f"{p}/{name}_all")
        k_t = node("Transpose", [kv_out["k"]], f"{p}/k_tt", perm=[0, 1, 3, 2])
        scores = node("Div", [node("MatMul", [q, k_t], f"{p}/qk"), "scale"], f"{p}/scaled")
        probs = node("Softmax", [scores], f"{p}/softmax", axis=-1)
        ctx = node("Transpose", [node("MatMul", [probs, kv_out["v"]], f"{p}/ctx")], f"{p}/ctx_t",
                   perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, "merge"], f"{p}/ctx_merged")
        return node("Add", [x, node("MatMul", [ctx, tensor(f"{p}.o_proj", heads * hd, d)], f"{p}/o")],
                    f"{p}/residual1")

    def mlp(self, x: str, p: str) -> str:
        node, tensor, d, inner = self.node, self.tensor, self.shape.hidden, self.shape.intermediate
        h = self.rms_norm(x, f"{p}.post_attention_layernorm")
        gate = node("MatMul", [h, tensor(f"{p}.gate_proj", d, inner)], f"{p}/gate")
        up = node("MatMul", [h, tensor(f"{p}.up_proj", d, inner)], f"{p}/up")
        act = node("Mul", [gate, node("Sigmoid", [gate], f"{p}/sigmoid")], f"{p}/silu")
        down = node("MatMul", [node("Mul", [act, up], f"{p}/gated"), tensor(f"{p}.down_proj", inner, d)],
                    f"{p}/down")
        return node("Add", [x, down], f"{p}/residual2")


# -- decoders with a key-value cache ------------------------------------------------------------------------

def greedy_generate(model: onnx.ModelProto, prompt: np.ndarray, new_tokens: int, cache_inputs: list[str], *,
                    chunk: int | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Greedy decoding, as a generation loop runs a decoder exported with a key-value cache (inputs
    input_ids, attention_mask, position_ids and `cache_inputs`; outputs the logits, then the presents
    in the same order). The cache starts empty, shaped as the model declares it (batch, heads, 0,
    head_dim): a model pruned with `prune_cache` gets its fewer heads. The prompt (batch, length) goes
    first (`chunk` tokens a step for a model that takes a fixed number, e.g. 1 for a decode-step
    export), then one token a step, the argmax of the last logits; each step's presents are the
    next step's past. Returns the new tokens (batch, new_tokens) and every step's logits."""
    from onnxprune.runtime.session import make_session

    session = make_session(model)
    batch = prompt.shape[0]
    declared = {vi.name: vi.type.tensor_type.shape.dim for vi in model.graph.input}
    past = {n: np.zeros((batch, declared[n][1].dim_value, 0, declared[n][3].dim_value), np.float32)
            for n in cache_inputs}
    steps = [prompt[:, i:i + (chunk or prompt.shape[1])] for i in range(0, prompt.shape[1], chunk or prompt.shape[1])]
    start, tokens, logits = 0, [], []
    while len(tokens) < new_tokens:
        ids = steps.pop(0) if steps else tokens[-1]
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((batch, start + ids.shape[1]), np.int64),
                 "position_ids": np.tile(np.arange(start, start + ids.shape[1]), (batch, 1)).astype(np.int64), **past}
        out = session.run(None, feeds)
        logits.append(out[0])
        past = dict(zip(cache_inputs, out[1:]))
        start += ids.shape[1]
        if not steps:  # the prompt is in: every step from here on adds the token it predicts
            tokens.append(out[0][:, -1:].argmax(axis=-1))
    return np.concatenate(tokens, axis=1), logits
