"""Split: each output takes a contiguous range of the input's layout.

The split sizes are rewritten to the kept counts of each piece.
"""
from __future__ import annotations

import numpy as np

from onnxprune.analysis.rules.base import Rule, norm_axis, register


def split_sizes(node, view, rank: int) -> list[int] | None:
    axis = norm_axis(int(view.attr(node, "axis", 0)), rank)
    sizes = view.attr(node, "split")
    if sizes is None and view.has_input(node, 1):
        arr = view.const_input(node, 1)
        if arr is None:
            return None
        sizes = arr.tolist()
    if sizes is not None:
        return [int(v) for v in sizes]
    total = view.dim(node.input[0], axis)
    if total is None:
        return None
    n = len(node.output)
    chunk = -(-total // n)  # opset 18 num_outputs: ceil, last one smaller
    return [min(chunk, total - i * chunk) for i in range(n)]


@register("Split")
class SplitRule(Rule):
    preserves_zeros = True

    def propagate(self, node, s):
        x = node.input[0]
        rank = s.view.rank(x)
        if rank is None:
            s.block_tensor(x, f"Split '{node.name}': input rank unknown")
            return
        axis = norm_axis(int(s.view.attr(node, "axis", 0)), rank)
        sizes = split_sizes(node, s.view, rank)
        for a, layout in s.layouts_of(x).items():
            if a != axis:
                for out in node.output:
                    if out:
                        s.set_layout(out, a, layout)
            elif sizes is None:
                s.block(layout, f"Split '{node.name}': split sizes computed at run time")
            else:
                offsets = np.cumsum([0] + sizes)
                for out, start, stop in zip(node.output, offsets[:-1], offsets[1:]):
                    if out:
                        s.set_layout(out, a, layout[start:stop])

    def zeros(self, node, z):
        """Each piece keeps the zero positions of its range (a fused QKV's zero V columns)."""
        z.pass_through(node)
        x = node.input[0]
        rank = z.view.rank(x)
        if rank is None:
            return
        axis = norm_axis(int(z.view.attr(node, "axis", 0)), rank)
        sizes = split_sizes(node, z.view, rank)
        if sizes is None:
            return
        offsets = np.cumsum([0] + sizes)
        for out, start, stop in zip(node.output, offsets[:-1], offsets[1:]):
            if out:
                z.carry_positions(x, axis, out, axis, slice(int(start), int(stop)))

    def rewrite(self, node, rw):
        x = node.input[0]
        rank = rw.view.rank(x)
        axis = norm_axis(int(rw.view.attr(node, "axis", 0)), rank)
        if rw.mask(x, axis) is None:
            return
        new_sizes = np.array([rw.kept(out, axis) for out in node.output], dtype=np.int64)
        if rw.view.attr(node, "split") is not None:
            rw.set_attr(node, "split", new_sizes.tolist())
        elif rw.view.has_input(node, 1):
            rw.replace_const_input(node, 1, new_sizes)
        elif rw.view.opset >= 13:
            rw.remove_attr(node, "num_outputs")
            rw.set_const_input(node, 1, new_sizes)
        else:
            rw.set_attr(node, "split", new_sizes.tolist())
