"""Squeeze and Unsqueeze shift axes; units never live on a size-1 axis."""
from __future__ import annotations

import numpy as np

from onnxprune.analysis.rules.base import Rule, const_ints, pass_axes, register


@register("Squeeze")
class SqueezeRule(Rule):
    preserves_zeros = True

    def propagate(self, node, s):
        x, y = node.input[0], node.output[0]
        rank = s.view.rank(x)
        if rank is None:
            s.block_tensor(x, f"Squeeze '{node.name}': rank unknown")
            return
        axes = const_ints(s, node, "axes", 1)
        if axes is None:
            axes = [a for a in range(rank) if s.view.dim(x, a) == 1]
        removed = {a + rank if a < 0 else a for a in axes}
        kept = [a for a in range(rank) if a not in removed]
        pass_axes(s, node, x, y, {a: i for i, a in enumerate(kept)})

    def rewrite(self, node, rw):
        """Without axes, Squeeze would also drop an axis pruned down to one position: name them."""
        x = node.input[0]
        rank = rw.view.rank(x)
        if rank is None or rw.view.attr(node, "axes") is not None or rw.view.has_input(node, 1):
            return
        if not any(rw.kept(x, a) == 1 and rw.view.dim(x, a) != 1 for a in range(rank) if rw.mask(x, a) is not None):
            return
        axes = [a for a in range(rank) if rw.view.dim(x, a) == 1]
        if rw.view.opset >= 13:
            rw.set_const_input(node, 1, np.array(axes, dtype=np.int64))
        else:
            rw.set_attr(node, "axes", axes)


@register("Unsqueeze")
class UnsqueezeRule(Rule):
    preserves_zeros = True

    def propagate(self, node, s):
        x, y = node.input[0], node.output[0]
        rank, out_rank = s.view.rank(x), s.view.rank(y)
        axes = const_ints(s, node, "axes", 1)
        if rank is None or out_rank is None or axes is None:
            s.block_tensor(x, f"Unsqueeze '{node.name}': axes or rank unknown")
            return
        inserted = {a + out_rank if a < 0 else a for a in axes}
        kept = [a for a in range(out_rank) if a not in inserted]
        pass_axes(s, node, x, y, {i: a for i, a in enumerate(kept)})
