"""Transpose permutes which axis carries the units."""
from __future__ import annotations

from onnxprune.analysis.rules.base import Rule, pass_axes, register


@register("Transpose")
class TransposeRule(Rule):
    preserves_zeros = True
    reads_folded_axes = True

    def propagate(self, node, s):
        x, y = node.input[0], node.output[0]
        rank = s.view.rank(x) or 0
        perm = s.view.attr(node, "perm") or list(reversed(range(rank)))
        pass_axes(s, node, x, y, {int(src): dst for dst, src in enumerate(perm)})
