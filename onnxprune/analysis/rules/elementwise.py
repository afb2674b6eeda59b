"""Unary elementwise ops: every axis passes unchanged."""
from __future__ import annotations

from onnxprune.analysis.rules.base import Rule, identity_map, pass_axes, register

# f(0) == 0: a dead channel stays dead through these.
ZERO_PRESERVING = (
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Tanh", "Erf", "Gelu", "Softsign", "Mish",
    "HardSwish", "Abs", "Neg", "Sqrt", "Sign", "Sin", "Identity", "Dropout", "Cast", "CastLike",
    "Floor", "Ceil", "Round", "ThresholdedRelu", "Shrink", "Clip", "Atan", "Asin", "Sinh", "Tan",
)
# f(0) != 0 (or undefined): still channel-wise, but a zero channel becomes non-zero.
NOT_ZERO_PRESERVING = (
    "Sigmoid", "HardSigmoid", "Softplus", "Exp", "Log", "Cos", "Cosh", "Reciprocal", "Not",
    "IsNaN", "IsInf", "Acos", "Asinh", "Acosh", "Atanh",
)


class Unary(Rule):
    def propagate(self, node, s):
        x, y = node.input[0], node.output[0]
        pass_axes(s, node, x, y, identity_map(s.view.rank(x)))
        for extra in node.output[1:]:  # Dropout's mask has the same shape
            if extra:
                pass_axes(s, node, x, extra, identity_map(s.view.rank(x)))


@register(*ZERO_PRESERVING)
class ZeroPreservingUnary(Unary):
    preserves_zeros = True

    def zeros(self, node, z):
        if node.op_type == "Clip" and not z.clip_keeps_zero(node):
            return
        z.pass_through(node)


@register(*NOT_ZERO_PRESERVING)
class OtherUnary(Unary):
    pass
