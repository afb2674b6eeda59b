"""Gather on an axis without units passes them (shifted past the index dims)."""
from __future__ import annotations

from onnxprune.analysis.rules.base import Rule, norm_axis, register


@register("Gather")
class GatherRule(Rule):
    preserves_zeros = True

    def propagate(self, node, s):
        data, indices, y = node.input[0], node.input[1], node.output[0]
        rank, idx_rank = s.view.rank(data), s.view.rank(indices)
        s.block_tensor(indices, f"Gather '{node.name}' uses it as indices")
        if rank is None or idx_rank is None:
            s.block_tensor(data, f"Gather '{node.name}': rank unknown")
            return
        axis = norm_axis(int(s.view.attr(node, "axis", 0)), rank)
        if s.hidden_width and rank == 2 and axis == 0 and s.view.is_const(data):
            # an embedding lookup starts the residual stream: its width is the hidden units
            s.set_layout(y, idx_rank, s.fresh(node, y, idx_rank, s.view.dim(data, 1)))
            s.param(node, 0, 1, s.layout(y, idx_rank), "embedding")
            return
        mapping = {a: a for a in range(axis)}
        mapping.update({a: a + idx_rank - 1 for a in range(axis + 1, rank)})
        for a, layout in s.layouts_of(data).items():
            if a == axis:
                s.block(layout, f"Gather '{node.name}' picks positions along the pruned axis")
            else:
                s.set_layout(y, mapping[a], layout)
