"""Reductions and ops that normalise along an axis.

Reducing over an axis that carries units would change every output value when
a unit goes (the mean is over fewer channels): those units are blocked.  Other
axes pass (and shift when keepdims=0).
"""
from __future__ import annotations

from onnxprune.analysis.rules.base import Rule, const_ints, norm_axis, pass_axes, register


@register("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
class ReduceRule(Rule):
    def propagate(self, node, s):
        x, y = node.input[0], node.output[0]
        rank = s.view.rank(x)
        if rank is None:
            s.block_tensor(x, f"{node.op_type} '{node.name}': rank unknown")
            return
        axes = const_ints(s, node, "axes", 1)
        if axes is None:
            if s.view.has_input(node, 1):
                s.block_tensor(x, f"{node.op_type} '{node.name}': axes computed at run time")
                return
            noop = int(s.view.attr(node, "noop_with_empty_axes", 0))
            axes = [] if noop else list(range(rank))
        reduced = {norm_axis(a, rank) for a in axes}
        keepdims = int(s.view.attr(node, "keepdims", 1))
        kept = [a for a in range(rank) if a not in reduced]
        mapping = {a: a for a in kept} if keepdims else {a: i for i, a in enumerate(kept)}
        for axis, layout in s.layouts_of(x).items():
            if axis in mapping:
                s.set_layout(y, mapping[axis], layout)
            else:  # RMSNorm's mean(x^2) over the hidden width: opt-in
                s.through_statistics(layout, f"{node.op_type} '{node.name}' reduces over axis {axis} of "
                                             f"'{x}': removing a channel there changes the result")

    def zeros(self, node, z):
        if node.op_type in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceSumSquare"):
            z.pass_through(node, inputs=[0])


@register("ArgMax", "ArgMin")
class ArgReduceRule(Rule):
    def propagate(self, node, s):
        x, y = node.input[0], node.output[0]
        rank = s.view.rank(x) or 0
        axis = norm_axis(int(s.view.attr(node, "axis", 0)), rank)
        keepdims = int(s.view.attr(node, "keepdims", 1))
        kept = [a for a in range(rank) if a != axis]
        pass_axes(s, node, x, y, {a: a for a in kept} if keepdims else {a: i for i, a in enumerate(kept)})


@register("Softmax", "LogSoftmax", "Hardmax")
class SoftmaxRule(Rule):
    def propagate(self, node, s):
        x, y = node.input[0], node.output[0]
        rank = s.view.rank(x) or 0
        default = -1 if s.view.opset >= 13 else 1
        axis = norm_axis(int(s.view.attr(node, "axis", default)), rank)
        # before opset 13 the input is coerced to 2-D at `axis`: all later axes mix
        mixed = {axis} if s.view.opset >= 13 else set(range(axis, rank))
        pass_axes(s, node, x, y, {a: a for a in range(rank) if a not in mixed})


@register("TopK")
class TopKRule(Rule):
    def propagate(self, node, s):
        x = node.input[0]
        rank = s.view.rank(x) or 0
        axis = norm_axis(int(s.view.attr(node, "axis", -1)), rank)
        for out in node.output:
            if out:
                pass_axes(s, node, x, out, {a: a for a in range(rank) if a != axis})
