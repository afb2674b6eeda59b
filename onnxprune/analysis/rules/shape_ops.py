"""Ops that read only shapes, or create tensors without channel inputs.

Shape/Size outputs follow the pruned shapes at run time, so they block nothing.
"""
from __future__ import annotations

from onnxprune.analysis.rules.base import Rule, register


@register("Shape", "Size", "ConstantOfShape", "Range", "EyeLike", "RandomNormalLike", "RandomUniformLike")
class ShapeOnlyRule(Rule):
    def propagate(self, node, s):
        pass
