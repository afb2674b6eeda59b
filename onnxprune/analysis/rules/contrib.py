"""com.microsoft contrib ops, as onnxruntime's transformer optimizer writes them.

`onnxruntime.transformers.optimizer.optimize_model` (and optimum's
ORTOptimizer, which calls it) fuses decomposed attention, norms and
activations into contrib ops.  Their rules:

* Attention (packed QKV weight [in, q + k + v], bias [q + k + v]): a unit is
  one head across the Q, K and V column blocks of the weight and the bias;
  the op's output (v width) carries the same head units, so the output
  projection's input rows are sliced with them; the input hidden axis is
  consumed (a sink).  `num_heads` and `qkv_hidden_sizes` are rewritten.
* MultiHeadAttention (separate Q, K, V inputs, optional packed bias): the
  last axis of each of q, k and v is cut in head_dim blocks and the blocks of
  one head are coupled into one unit; `num_heads` is rewritten.
* GroupQueryAttention (num_heads query heads sharing kv_num_heads KV heads):
  a unit is a whole KV group, the KV head with the num_heads / kv_num_heads
  query heads that read it (query head i reads KV head i // group), so the
  ratio never changes; `num_heads` and `kv_num_heads` are rewritten.  Its
  key-value cache (past_key / past_value graph inputs and present_key /
  present_value outputs, [batch, kv_num_heads, sequence, head_size], as
  onnxruntime-genai's model builder writes them) takes the KV groups on axis 1
  with `prune_cache` (the model's interface changes: runtime/cache.py);
  without it the cache blocks them with a reason naming `--prune-cache`.
* SkipLayerNormalization, SkipSimplifiedLayerNormalization and
  EmbedLayerNormalization normalise over the hidden (residual) axis: units
  reaching it are blocked with a reason. (SimplifiedLayerNormalization, which
  onnxruntime writes in the default domain, is LayerNormalization's rule.)
* BiasGelu, FastGelu, BiasAdd (x + bias [+ skip]) and Gelu, QuickGelu are
  elementwise: units pass, a constant bias is sliced with them.

Anything these rules cannot follow (a past/present key-value cache, whose
head axis is part of the model's interface, unless GroupQueryAttention's with
`prune_cache`; packed or 4-D key/value layouts; per-head biases computed at run
time; quantized KV caches) blocks the heads with a reason naming the node.  A
contrib op with no rule here is blocked by the generic Unsupported rule.
"""
from __future__ import annotations

import numpy as np

from onnxprune.analysis.rules.base import Rule, register
from onnxprune.analysis.rules.broadcast import Additive
from onnxprune.analysis.rules.elementwise import ZeroPreservingUnary

MS = "com.microsoft."


# -- helpers ------------------------------------------------------------------------

def _used(s, name: str) -> bool:
    """An output someone reads: a consumer or a graph output."""
    return bool(name) and (bool(s.view.consumers.get(name)) or name in s.view.graph_outputs)


def _block_inputs(node, s, reason: str, indices=None) -> None:
    for i, name in enumerate(node.input):
        if name and (indices is None or i in indices):
            s.block_tensor(name, reason)


def _block_off_axes(node, s, tensors) -> None:
    """Units on axes other than the feature (last) axis: attention mixes sequence positions."""
    for name in filter(None, tensors):
        rank = s.view.rank(name)
        for axis, layout in s.layouts_of(name).items():
            if rank is None or axis != rank - 1:
                s.block(layout, f"{node.op_type} '{node.name}' mixes axis {axis} of '{name}' "
                                "(batch and sequence positions are not prunable through attention)")


def _couple_features(node, s, tensor: str, expected: np.ndarray, what: str) -> None:
    """Couple the last axis of a run-time q/k/v input with the head layout `expected`."""
    where = f"{node.op_type} '{node.name}'"
    rank = s.view.rank(tensor)
    if not rank:
        s.block(expected, f"{where}: rank of its {what} '{tensor}' unknown")
        return
    layout = s.layout(tensor, rank - 1)
    if layout is None:
        if s.view.is_const(tensor):
            s.param(node, list(node.input).index(tensor), rank - 1, expected, "constant")
        else:
            s.block(expected, f"{where}: its {what} '{tensor}' carries no prunable features (it is a graph "
                              "input or comes through an op without a pruning rule), so heads cannot be cut there")
        return
    if len(layout) != len(expected):
        s.block(expected, f"{where}: {what} '{tensor}' has {len(layout)} features, expected {len(expected)}")
        s.block(layout, f"{where}: {what} '{tensor}' has {len(layout)} features, expected {len(expected)}")
        return
    s.couple([layout, expected], f"{where} ({what})")


def _per_head_input(node, s, index: int, axis: int, head_layout: np.ndarray, what: str) -> None:
    """An optional input with a per-head axis (attention_bias [B, N, S, T], head_sink [N]):
    a constant is sliced with the heads; a run-time one pins them."""
    if not s.view.has_input(node, index):
        return
    name = node.input[index]
    dim = s.view.dim(name, axis)
    if dim == 1:
        return  # broadcast over heads
    if dim != len(head_layout):
        s.block(head_layout, f"{node.op_type} '{node.name}': {what} '{name}' has {dim} positions on its "
                             f"head axis, expected {len(head_layout)}")
        return
    if s.view.is_const(name):
        s.param(node, index, axis, head_layout, "constant")
    else:
        s.block(head_layout, f"{node.op_type} '{node.name}': {what} '{name}' is computed at run time with one "
                             "slice per head; it cannot be cut with the heads")


def _state_reasons(node, s, inputs: dict[int, str], outputs: dict[int, str]) -> list[str]:
    """Reasons from present optional inputs/outputs that the heads cannot follow."""
    where = f"{node.op_type} '{node.name}'"
    reasons = []
    for i, what in inputs.items():
        if s.view.has_input(node, i):
            reasons.append(f"{where} reads {what} '{node.input[i]}': the key-value cache it belongs to has "
                           "a head axis fixed by the model's inputs; heads are kept")
    for i, what in outputs.items():
        if i < len(node.output) and _used(s, node.output[i]):
            reasons.append(f"{where} writes {what} '{node.output[i]}', which is used: its head axis would "
                           "change with the heads; heads are kept")
    return reasons


def _note_heads(s, units: np.ndarray, width: int) -> None:
    """Tell the group report that each unit is a head (or KV group) of `width`-wide heads."""
    s.note_split(units, width)


def _rewrite_heads(node, rw, attrs: tuple[str, ...]) -> None:
    """Scale integer head-count attributes by the kept fraction of the output's features."""
    out = node.output[0]
    mask = rw.mask(out, (rw.view.rank(out) or 3) - 1)
    if mask is None:
        return
    kept, total = int(mask.sum()), len(mask)
    for name in attrs:
        value = rw.view.attr(node, name)
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            rw.set_attr(node, name, [int(v) * kept // total for v in value])
        else:
            rw.set_attr(node, name, int(value) * kept // total)


def _head_zeros(node, z, v_tensor: str | None, v_weight=None, v_cols=None, v_bias=None, bias_offset: int = 0,
                v_width: int | None = None) -> None:
    """A head's output is exactly zero when its value features are: softmax(...) @ 0 = 0."""
    out = node.output[0]
    result = set()
    v_zero = z.zero_set(v_tensor) if v_tensor else set()
    bias_values = z.view.const(v_bias) if v_bias else None
    for r, places in z.positions(out).items():
        pos = next((p for a, p in places if a == (z.view.rank(out) or 3) - 1), None)
        if pos is None:
            continue
        if v_weight is not None:
            values = z.view.const(v_weight)
            if values is None or np.take(values, v_cols + pos, axis=1).any():
                continue
        elif r not in v_zero:
            continue
        if bias_values is not None and np.take(bias_values, bias_offset + pos).any():
            continue
        result.add(r)
    z._set(out, result)


# -- attention ----------------------------------------------------------------------

@register(MS + "Attention")
class AttentionRule(Rule):
    """input [B, S, in] x weights [in, q + k + v] (+ bias) -> heads -> output [B, S, v]."""

    @staticmethod
    def sizes(node, view, weight_cols: int) -> list[int] | None:
        sizes = view.attr(node, "qkv_hidden_sizes")
        if sizes is not None and len(sizes) == 3:
            return [int(v) for v in sizes]
        return [weight_cols // 3] * 3 if weight_cols % 3 == 0 else None

    def propagate(self, node, s):
        x, y = node.input[0], node.output[0]
        where = f"Attention '{node.name}'"
        _block_off_axes(node, s, [x])
        _block_inputs(node, s, f"{where} uses it as a mask or sequence length", indices={3, 6})
        heads = int(s.view.attr(node, "num_heads", 0))
        weight_shape = s.view.shape(node.input[1])
        x_rank = s.view.rank(x)
        k_layout = s.layout(x, x_rank - 1) if x_rank else None
        if not s.view.is_const(node.input[1]) or weight_shape is None or len(weight_shape) != 2:
            s.block(k_layout, f"{where}: weights '{node.input[1]}' are computed at run time")
            return
        if k_layout is not None:  # hidden width in: the weight's rows, consumed here
            s.param(node, 1, 0, k_layout, "weight_in")
            s.sink(node, x, x_rank - 1)
        sizes = self.sizes(node, s.view, weight_shape[1])
        if heads < 1 or sizes is None or sum(sizes) != weight_shape[1] or any(v % heads for v in sizes):
            return  # no head structure we can read: the heads stay (the op is left alone)
        dq, dk, dv = (v // heads for v in sizes)
        units = s.fresh(node, y, 2, heads)
        columns = np.concatenate([np.repeat(units, dq), np.repeat(units, dk), np.repeat(units, dv)])
        s.param(node, 1, 1, columns, "weight_out")
        if s.view.has_input(node, 2):
            s.param(node, 2, 0, columns, "bias")
        s.set_layout(y, 2, np.repeat(units, dv))
        _note_heads(s, units, dq)
        _per_head_input(node, s, 5, 1, units, "attention_bias")
        reasons = _state_reasons(node, s, {4: "past state", 6: "past_sequence_length"}, {1: "present state"})
        if int(s.view.attr(node, "do_rotary", 0)):
            # per head and head-independent in principle, but onnxruntime's CPU kernel refuses it,
            # so the validation run could not check the pruned model
            reasons.append(f"{where} applies rotary embeddings (do_rotary), which onnxruntime's CPU kernel "
                           "does not run; heads are kept")
        for reason in reasons:
            s.block(units, reason)

    def rewrite(self, node, rw):
        _rewrite_heads(node, rw, ("num_heads", "qkv_hidden_sizes"))

    def zeros(self, node, z):
        shape = z.view.shape(node.input[1])
        sizes = self.sizes(node, z.view, shape[1]) if shape and len(shape) == 2 else None
        if sizes is None or not z.view.is_const(node.input[1]):
            return
        bias = node.input[2] if z.view.has_input(node, 2) else None
        _head_zeros(node, z, None, v_weight=node.input[1], v_cols=sizes[0] + sizes[1], v_bias=bias,
                    bias_offset=sizes[0] + sizes[1])


@register(MS + "MultiHeadAttention")
class MultiHeadAttentionRule(Rule):
    """query [B, S, D], key [B, L, D], value [B, L, Dv] (+ bias [D + D + Dv]) -> output [B, S, Dv]."""

    def propagate(self, node, s):
        y = node.output[0]
        where = f"MultiHeadAttention '{node.name}'"
        q, k, v = (node.input[i] if s.view.has_input(node, i) else "" for i in range(3))
        _block_off_axes(node, s, [q, k, v])
        _block_inputs(node, s, f"{where} uses it as a mask, sequence length or cache index", indices={4, 8, 9})
        heads = int(s.view.attr(node, "num_heads", 0))
        shapes = [s.view.shape(t) if t else None for t in (q, k, v)]
        if not k or not v or any(sh is None or len(sh) != 3 for sh in shapes):
            reason = (f"{where}: packed QKV/KV or 4-D (BNSH) key/value inputs are not supported; "
                      "its heads are kept")
            _block_inputs(node, s, reason, indices={0, 1, 2, 3})
            return
        widths = [sh[2] for sh in shapes]
        if heads < 1 or any(not isinstance(w, int) or w % heads for w in widths):
            _block_inputs(node, s, f"{where}: feature widths {widths} do not split into {heads} heads",
                          indices={0, 1, 2, 3})
            return
        dq, dk, dv = (w // heads for w in widths)
        units = s.fresh(node, y, 2, heads)
        for tensor, d, what in ((q, dq, "query"), (k, dk, "key"), (v, dv, "value")):
            _couple_features(node, s, tensor, np.repeat(units, d), what)
        if s.view.has_input(node, 3):
            columns = np.concatenate([np.repeat(units, dq), np.repeat(units, dk), np.repeat(units, dv)])
            s.param(node, 3, 0, columns, "bias")
        s.set_layout(y, 2, np.repeat(units, dv))
        _note_heads(s, units, dq)
        _per_head_input(node, s, 5, 1, units, "attention_bias")
        reasons = _state_reasons(node, s, {6: "past_key", 7: "past_value", 9: "cache_indirection"},
                                 {1: "present_key", 2: "present_value", 3: "qk"})
        for reason in reasons:
            s.block(units, reason)

    def rewrite(self, node, rw):
        _rewrite_heads(node, rw, ("num_heads",))

    def zeros(self, node, z):
        widths = [z.view.dim(node.input[i], 2) if z.view.has_input(node, i) else None for i in range(3)]
        if None in widths:
            return
        bias = node.input[3] if z.view.has_input(node, 3) else None
        _head_zeros(node, z, node.input[2], v_bias=bias, bias_offset=widths[0] + widths[1])


@register(MS + "GroupQueryAttention")
class GroupQueryAttentionRule(Rule):
    """query [B, S, N*H] (or packed [B, S, (N + 2 KV) * H]), key/value [B, S, KV*H] -> [B, S, N*H];
    past_key/past_value [B, KV, P, H] -> present_key/present_value [B, KV, P + S, H].

    A unit is one KV group: KV head g and query heads g*r .. g*r + r - 1 (r = N / KV).
    """

    CACHE_INPUTS = {3: "past_key", 4: "past_value"}
    CACHE_OUTPUTS = {1: "present_key", 2: "present_value"}

    @staticmethod
    def head_layout(node, view) -> tuple[int, int, int, bool] | None:
        """(num_heads, kv_num_heads, head_size, packed), or None when the head layout is not understood."""
        heads = int(view.attr(node, "num_heads", 0))
        kv_heads = int(view.attr(node, "kv_num_heads", 0))
        q = node.input[0]
        q_width = view.dim(q, 2) if view.rank(q) == 3 else None
        packed = not view.has_input(node, 1) and not view.has_input(node, 2)
        if heads < 1 or kv_heads < 1 or heads % kv_heads or not isinstance(q_width, int):
            return None
        total = heads + 2 * kv_heads if packed else heads
        return (heads, kv_heads, q_width // total, packed) if q_width % total == 0 else None

    def propagate(self, node, s):
        y = node.output[0]
        where = f"GroupQueryAttention '{node.name}'"
        q = node.input[0]
        k, v = (node.input[i] if s.view.has_input(node, i) else "" for i in (1, 2))
        _block_off_axes(node, s, [q, k, v])
        _block_inputs(node, s, f"{where} uses it as sequence lengths or positions", indices={5, 6, 9})
        layout = self.head_layout(node, s.view)
        if layout is None or (not layout[3] and (not k or not v or s.view.rank(k) != 3 or s.view.rank(v) != 3)):
            heads, kv_heads = (int(s.view.attr(node, a, 0)) for a in ("num_heads", "kv_num_heads"))
            _block_inputs(node, s, f"{where}: head layout not understood (num_heads {heads}, kv_num_heads "
                                   f"{kv_heads}, query '{q}' of shape {s.view.shape(q)}); its heads are kept",
                          indices={0, 1, 2})
            return
        heads, kv_heads, head_dim, packed = layout
        r = heads // kv_heads
        units = s.fresh(node, y, 2, kv_heads)
        q_heads = np.repeat(units, r * head_dim)
        kv_cols = np.repeat(units, head_dim)
        if packed:
            _couple_features(node, s, q, np.concatenate([q_heads, kv_cols, kv_cols]), "packed query/key/value")
        else:
            _couple_features(node, s, q, q_heads, "query")
            _couple_features(node, s, k, kv_cols, "key")
            _couple_features(node, s, v, kv_cols, "value")
        s.set_layout(y, 2, q_heads)
        _note_heads(s, units, head_dim)
        s.unit_heads.update((int(u), (r, 1)) for u in units.tolist())
        per_query_head = np.repeat(units, r)
        _per_head_input(node, s, 10, 1, per_query_head, "attention_bias")
        _per_head_input(node, s, 11, 0, per_query_head, "head_sink")
        reasons = _state_reasons(node, s, {12: "k_scale", 13: "v_scale"}, {3: "output_qk"})  # quantized cache
        if s.prune_cache:
            reasons += self.follow_cache(node, s, units)
        else:
            reasons += [f"{reason} (--prune-cache lets its KV groups go from the cache too)"
                        for reason in _state_reasons(node, s, self.CACHE_INPUTS, self.CACHE_OUTPUTS)]
        for reason in reasons:
            s.block(units, reason)

    def follow_cache(self, node, s, units: np.ndarray) -> list[str]:
        """prune_cache: past_key/past_value graph inputs and present_key/present_value outputs take the KV groups
        on their head axis (1); a caller then feeds and reads only the kept heads. Returns the reasons a
        cache tensor cannot follow (not a graph input, not [batch, kv_num_heads, sequence, head_size])."""
        where = f"GroupQueryAttention '{node.name}'"
        reasons = []
        for i, what in self.CACHE_INPUTS.items():
            if not s.view.has_input(node, i):
                continue
            name = node.input[i]
            if name not in s.view.graph_inputs or s.view.is_const(name):
                reasons.append(f"{where}: its {what} '{name}' is computed in the graph, not fed by the caller, "
                               "so the cache cannot shrink with the KV groups; heads are kept")
            elif s.view.rank(name) != 4 or s.view.dim(name, 1) != len(units):
                reasons.append(f"{where}: its {what} '{name}' is not [batch, {len(units)} kv heads, past, head_size] "
                               f"(shape {s.view.shape(name)}); heads are kept")
            else:
                s.set_layout(name, 1, units)
                s.cache_inputs[name] = 1
        for i in self.CACHE_OUTPUTS:
            name = node.output[i] if i < len(node.output) else ""
            if _used(s, name):  # [batch, kv_num_heads, total, head_size] by the op's definition
                s.set_layout(name, 1, units)
                if name in s.view.graph_outputs:
                    s.cache_outputs[name] = 1
        return reasons

    def rewrite(self, node, rw):
        _rewrite_heads(node, rw, ("num_heads", "kv_num_heads"))

    def zeros(self, node, z):
        """A KV group's output is exactly zero when its new values are: softmax(...) @ 0 = 0. With the cache
        pruned, its cached values are zero too (a cache holds what the model wrote at earlier steps, as for the
        plain layout's Concat), and so are its present values."""
        layout = self.head_layout(node, z.view)
        if layout is None:
            return
        heads, kv_heads, head_dim, packed = layout
        if packed:  # the value columns are the last kv_num_heads * head_size of the packed input
            q = node.input[0]
            mask = z.position_zeros(q, 2)
            first_v = (heads + kv_heads) * head_dim
            dead = set() if mask is None else {
                r for r, places in z.positions(q).items()
                if any(a == 2 and (v := pos[pos >= first_v]).size and mask[v].all() for a, pos in places)}
        elif z.view.has_input(node, 2):
            dead = z.zero_set(node.input[2])
        else:
            return
        z._set(node.output[0], dead & set(z.positions(node.output[0])))
        past = node.input[4] if z.view.has_input(node, 4) else ""
        if past and past not in z.analysis.state.cache_inputs:
            return  # present_value holds that past, whose values the cache layout does not vouch for
        if past:
            z._set(past, dead & set(z.positions(past)))
        if len(node.output) > 2 and node.output[2]:
            z._set(node.output[2], dead & set(z.positions(node.output[2])))


# -- norms over the hidden axis ----------------------------------------------------

@register(MS + "SkipLayerNormalization", MS + "SkipSimplifiedLayerNormalization")
class HiddenNormRule(Rule):
    """(input + skip + bias), normalised over the last (hidden) axis: statistics couple every
    hidden channel, so removing one changes the others.  Hidden-width pruning is opt-in
    (not lossless); here units reaching that axis are blocked."""

    def propagate(self, node, s):
        where = f"{node.op_type} '{node.name}'"
        for index, name in enumerate(node.input):
            if not name:
                continue
            rank = s.view.rank(name)
            for axis, layout in s.layouts_of(name).items():
                if rank is not None and axis == rank - 1:
                    s.block(layout, f"{where} normalises over the hidden axis: removing a channel there would "
                                    "change every other channel (hidden-width pruning is opt-in)")
                else:
                    s.block(layout, f"{where}: units on axis {axis} of '{name}' are not followed through")


@register(MS + "EmbedLayerNormalization")
class EmbedLayerNormRule(Rule):
    """Gathers and sums embeddings, then normalises over the hidden axis: nothing prunable passes."""

    def propagate(self, node, s):
        _block_inputs(node, s, f"EmbedLayerNormalization '{node.name}' gathers embeddings and normalises over "
                               "the hidden axis (hidden-width pruning is opt-in)")


# -- elementwise ----------------------------------------------------------------------

@register(MS + "BiasGelu", MS + "FastGelu", MS + "BiasAdd")
class BiasActivationRule(Additive):
    """act(x + bias [+ skip]): coupled like a broadcasting Add; a constant bias is sliced with
    the units.  f(0) = 0 for these activations, so a unit zero in x and in the bias stays zero."""


@register(MS + "Gelu", MS + "QuickGelu")
class ContribZeroPreservingUnary(ZeroPreservingUnary):
    """x * Phi(x), x * sigmoid(alpha x): elementwise, and 0 stays 0."""

