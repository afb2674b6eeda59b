"""Expand and Tile: units pass on axes the op does not grow."""
from __future__ import annotations

import numpy as np

from onnxprune.analysis.rules.base import Rule, register


class GrowOp(Rule):
    preserves_zeros = True

    def propagate(self, node, s):
        x, y = node.input[0], node.output[0]
        rank, out_rank = s.view.rank(x), s.view.rank(y)
        if rank is None or out_rank is None:
            s.block_tensor(x, f"{node.op_type} '{node.name}': rank unknown")
            return
        shift = out_rank - rank
        for axis, layout in s.layouts_of(x).items():
            if s.view.dim(x, axis) is not None and s.view.dim(x, axis) == s.view.dim(y, axis + shift):
                s.set_layout(y, axis + shift, layout)
            else:
                s.block(layout, f"{node.op_type} '{node.name}' repeats axis {axis}")


@register("Expand")
class ExpandRule(GrowOp):
    def rewrite(self, node, rw):
        y = node.output[0]
        target = rw.view.const_input(node, 1)
        if target is None or not rw.changed(y):
            return
        new_out = rw.new_shape(y)
        shift = len(new_out) - len(target)
        new_target = [int(new_out[i + shift]) if t != 1 and rw.mask(y, i + shift) is not None else int(t)
                      for i, t in enumerate(target)]
        if new_target != [int(t) for t in target]:
            rw.replace_const_input(node, 1, np.array(new_target, dtype=target.dtype))


@register("Tile")
class TileRule(GrowOp):
    pass
