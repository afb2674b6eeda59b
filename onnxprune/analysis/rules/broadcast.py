"""Broadcasting n-ary ops couple their inputs axis by axis.

Residual Add, squeeze-excite Mul gates, Where, PRelu slopes: wherever two
inputs meet on an axis of equal size, their units become one.  A constant on
that axis (a per-channel scale or bias) is sliced with them; a run-time tensor
that carries no units there (a graph input, say) pins them: blocked, unless every value it
has along that axis comes from constants (Swin's relative position bias plus its shifted-window
mask: see rules/constant_axis.py), which are then sliced with them.
"""
from __future__ import annotations

from onnxprune.analysis.rules.base import Rule, register
from onnxprune.analysis.rules.constant_axis import follow_constant

ADDITIVE = ("Add", "Sub", "Sum", "Mean", "Max", "Min")
MULTIPLICATIVE = ("Mul", "And")
OTHER = ("Div", "Pow", "Where", "PRelu", "Equal", "Greater", "Less", "GreaterOrEqual",
         "LessOrEqual", "Or", "Xor", "Mod", "BitShift")


class Broadcast(Rule):
    def propagate(self, node, s):
        out = node.output[0]
        rank = s.view.rank(out)
        where = f"{node.op_type} '{node.name}'"
        if rank is None:
            for name in node.input:
                s.block_tensor(name, f"{where}: output shape unknown")
            return
        for axis in range(rank):
            layouts, consts, pinned = [], [], []
            for index, name in enumerate(node.input):
                in_rank = s.view.rank(name) if name else None
                if in_rank is None:
                    continue
                in_axis = axis - (rank - in_rank)
                if in_axis < 0 or s.view.dim(name, in_axis) == 1:
                    continue  # broadcast along this axis: not coupled
                layout = s.layout(name, in_axis)
                if layout is not None:
                    layouts.append(layout)
                elif s.view.is_const(name):
                    consts.append((index, in_axis))
                else:
                    pinned.append((name, in_axis))
            if not layouts:
                continue
            merged = s.couple(layouts, where)
            for name, in_axis in pinned:
                if not follow_constant(s, name, in_axis, merged):
                    s.block(merged, f"{where} combines it with '{name}', whose channels cannot be pruned")
            for index, in_axis in consts:
                s.param(node, index, in_axis, merged, "constant")
            s.set_layout(out, axis, merged)


@register(*ADDITIVE)
class Additive(Broadcast):
    def zeros(self, node, z):
        z.combine(node, need_all=True)


@register(*MULTIPLICATIVE)
class Multiplicative(Broadcast):
    def zeros(self, node, z):
        z.combine(node, need_all=False)


@register(*OTHER)
class OtherBroadcast(Broadcast):
    def zeros(self, node, z):
        if node.op_type == "PRelu":
            z.pass_through(node, inputs=[0])
        elif node.op_type == "Div" and z.is_nonzero_const(node.input[1]):
            z.pass_through(node, inputs=[0])
