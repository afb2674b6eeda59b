"""Ops that read only shapes, or create tensors without channel inputs.

Shape/Size outputs follow the pruned shapes at run time, so they block nothing.
A tensor created from such a shape (ConstantOfShape(Shape(x)), torch's
zeros_like) or like another one (RandomNormalLike) has one position per
position of x: it takes x's units on the axes it copies.

A ConstantOfShape axis whose size is a constant element of a run-time shape
(the zero state [batch, 100] of an unrolled LSTM) is the same value at every
position, so it may shrink with whatever it meets: it opens passive units
(never a group of their own) and the rewrite sets that element to the kept size.
"""
from __future__ import annotations

from onnxprune.analysis.rules.base import Rule, identity_map, pass_axes, register
from onnxprune.analysis.shape_expr import DimOf, is_rewritable, rewrite_const_elements, shape_elements


@register("Shape", "Size", "Range")
class ShapeOnlyRule(Rule):
    def propagate(self, node, s):
        pass


@register("RandomNormalLike", "RandomUniformLike")
class LikeRule(Rule):
    def propagate(self, node, s):
        x = node.input[0]
        pass_axes(s, node, x, node.output[0], identity_map(s.view.rank(x)))


@register("EyeLike")
class EyeLikeRule(Rule):
    def propagate(self, node, s):
        s.block_tensor(node.input[0], f"EyeLike '{node.name}': removing rows or columns moves its diagonal")


@register("ConstantOfShape")
class ConstantOfShapeRule(Rule):
    def propagate(self, node, s):
        y = node.output[0]
        elements = shape_elements(s.view, node.input[0]) or []
        for k, e in enumerate(elements):
            if is_rewritable(e) and int(e) > 1:
                s.set_layout(y, k, s.fresh(node, y, k, int(e), passive=True))
                continue
            layout = s.layout(e.tensor, e.axis) if isinstance(e, DimOf) else None
            if layout is None:
                continue
            if e.num == e.den == 1:
                s.set_layout(y, k, layout)
            else:
                s.block(layout, f"ConstantOfShape '{node.name}': a size derived from a pruned axis")

    def rewrite(self, node, rw):
        if rw.changed(node.output[0]):
            rewrite_const_elements(rw, shape_elements(rw.view, node.input[0]) or [], node.output[0], node,
                                   shape_input=0)
