"""Importing this package registers every rule (one module per op family)."""
from onnxprune.analysis.rules import (  # noqa: F401
    broadcast,
    concat,
    contrib,
    control_flow,
    conv,
    elementwise,
    expand,
    gather,
    linear,
    normalization,
    pooling,
    qoperator,
    quantized,
    recurrent,
    reduce,
    reshape,
    shape_ops,
    slice,
    split,
    squeeze,
    transpose,
)
from onnxprune.analysis.rules.base import RULES, Rule, register, rule_for

__all__ = ["RULES", "Rule", "register", "rule_for"]
