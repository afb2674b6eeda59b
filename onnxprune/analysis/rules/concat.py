"""Concat: units keep their offsets along the concatenation axis.

The output layout is the inputs' layouts side by side (NO_UNIT where an input
carries none, e.g. the network input).  On every other axis the inputs are
coupled like a broadcasting op; a constant input is sliced with them, and so is
a constant behind an Expand (ViT's class token, concatenated along the sequence:
its hidden axis follows the patch embeddings').  Nested concats compose naturally.
"""
from __future__ import annotations

import numpy as np

from onnxprune.analysis.rules.base import Rule, norm_axis, register
from onnxprune.analysis.rules.expand import follow_expanded_constant
from onnxprune.analysis.units import NO_UNIT


@register("Concat")
class ConcatRule(Rule):
    preserves_zeros = True

    def propagate(self, node, s):
        y = node.output[0]
        rank = s.view.rank(y)
        where = f"Concat '{node.name}'"
        if rank is None:
            for name in node.input:
                s.block_tensor(name, f"{where}: output shape unknown")
            return
        axis = norm_axis(int(s.view.attr(node, "axis", 1)), rank)
        inputs = [n for n in node.input if n]
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
                    else:
                        s.block(merged, f"{where} joins it with '{name}', whose channels cannot be pruned")
            s.set_layout(y, other_axis, merged)
