"""Concat: units keep their offsets along the concatenation axis.

The output layout is the inputs' layouts side by side (NO_UNIT where an input
carries none, e.g. the network input).  On every other axis the inputs are
coupled like a broadcasting op; a constant input is sliced with them, and so is
a constant behind an Expand (ViT's class token, concatenated along the sequence:
its hidden axis follows the patch embeddings').  Nested concats compose naturally.

A decoder's key-value cache is a Concat along the sequence of a graph input (past_key_values.i.key,
maybe through a one-input Concat or an Identity, as the legacy exporter writes DynamicCache) and
the new keys, whose output is a graph output (present.i.key).  Its head axis is the model's
interface, so by default the heads that reach it are blocked; with `prune_cache` (opt-in) the
input and the output take the heads and are recorded (`cache_inputs`, `cache_outputs`): the
pruned model reads and writes only the kept heads (fewer KV heads, or fewer query heads in a
plain multi-head cache).
"""
from __future__ import annotations

import numpy as np

from onnxprune.analysis.rules.base import Rule, norm_axis, register
from onnxprune.analysis.rules.expand import follow_expanded_constant
from onnxprune.analysis.units import NO_UNIT


@register("Concat")
class ConcatRule(Rule):
    preserves_zeros = True

    def zeros(self, node, z):
        """A cache input holds what this Concat output earlier (the caller feeds a step's presents
        back), so a head whose new keys or values are exactly zero is zero in the cache too."""
        state = z.analysis.state
        if node.output[0] in state.cache_outputs:
            inputs = [n for n in node.input if n]
            cached = [n for n in inputs if _cache_source(z.view, n) in state.cache_inputs]
            fresh = [z.zero_set(n) for n in inputs if n not in cached]
            if cached and fresh:
                for n in cached:
                    z._set(n, set.intersection(*fresh))
        z.pass_through(node)

    @staticmethod
    def data_inputs(node) -> list[str]:
        """The tensors joined (QLinearConcat interleaves them with their scales and zero points)."""
        return [n for n in node.input if n]

    def propagate(self, node, s):
        y = node.output[0]
        rank = s.view.rank(y)
        where = f"{node.op_type} '{node.name}'"
        if rank is None:
            for name in node.input:
                s.block_tensor(name, f"{where}: output shape unknown")
            return
        axis = norm_axis(int(s.view.attr(node, "axis", 1)), rank)
        inputs = self.data_inputs(node)
        pieces, any_units, unknown = [], False, None
        for name in inputs:
            layout = s.layout(name, axis)
            if layout is None:
                size = s.view.dim(name, axis)
                if size is None:
                    unknown = name
                    continue
                layout = np.full(size, NO_UNIT, dtype=np.int64)
            else:
                any_units = True
            pieces.append(layout)
        if unknown is not None:  # no offsets along the axis; the other axes still pass (a KV-cache Concat)
            for other in inputs:
                s.block(s.layout(other, axis), f"{where}: size of '{unknown}' along axis {axis} unknown")
        elif any_units:
            s.set_layout(y, axis, np.concatenate(pieces))
        for other_axis in range(rank):
            if other_axis == axis:
                continue
            layouts = [s.layout(n, other_axis) for n in inputs]
            present = [l for l in layouts if l is not None]
            if not present:
                continue
            merged = s.couple(present, where)
            for name, layout in zip(inputs, layouts):
                if layout is None:
                    if s.view.is_const(name):
                        s.param(node, list(node.input).index(name), other_axis, merged, "constant")
                    elif follow_expanded_constant(s, name, other_axis, merged):
                        pass  # a class token: the constant behind the Expand is sliced
                    elif s.prune_cache and _follow_cache(s, node, name, other_axis, merged):
                        pass  # a KV cache input: it takes the heads (the interface changes)
                    elif y in s.view.graph_outputs and (source := _cache_source(s.view, name)) is not None \
                            and not s.view.is_const(source):
                        s.block(merged, f"{where} appends to the key-value cache '{source}', which the caller "
                                        "feeds and reads with this many heads")
                    else:
                        s.block(merged, f"{where} joins it with '{name}', whose channels cannot be pruned")
            s.set_layout(y, other_axis, merged)


def _cache_source(view, name: str) -> str | None:
    """The graph input `name` reads through one-input Concats and Identities, if any."""
    current = name
    while current not in view.graph_inputs:
        producer = view.producer.get(current)
        live = [i for i in producer.input if i] if producer is not None else []
        if producer is None or producer.op_type not in ("Concat", "Identity") or len(live) != 1:
            return None
        current = live[0]
    return current


def _follow_cache(s, node, name: str, axis: int, layout: np.ndarray) -> bool:
    """`name` is a key-value cache read from a graph input (through one-input Concats and Identities)
    and this Concat's output is a graph output: the chain and the output take `layout` on `axis`."""
    y = node.output[0]
    if y not in s.view.graph_outputs:
        return False
    chain, current = [], name
    while current not in s.view.graph_inputs:
        producer = s.view.producer.get(current)
        live = [i for i in producer.input if i] if producer is not None else []
        if producer is None or producer.op_type not in ("Concat", "Identity") or len(live) != 1:
            return False
        chain.append(current)
        current = live[0]
    if s.view.is_const(current) or s.view.dim(current, axis) != len(layout):
        return False
    for tensor in [current] + chain:
        s.set_layout(tensor, axis, layout)
    s.cache_inputs[current] = axis
    s.cache_outputs[y] = axis
    return True
