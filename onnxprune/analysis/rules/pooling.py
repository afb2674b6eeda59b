"""Ops that work on spatial axes only: pooling, Resize/Upsample, Pad.

Channel (and batch) axes pass unchanged; a unit on an axis the op resizes or
pads is blocked.
"""
from __future__ import annotations

import numpy as np

from onnxprune.analysis.rules.base import Rule, const_ints, register
from onnxprune.analysis.shape_expr import DimOf, shape_elements


class SpatialOp(Rule):
    preserves_zeros = True

    def kept_axes(self, node, s, rank: int) -> set[int]:
        """Axes whose size and contents the op leaves alone."""
        x, y = node.input[0], node.output[0]
        return {a for a in range(rank) if s.view.dim(x, a) is not None and s.view.dim(x, a) == s.view.dim(y, a)}

    def propagate(self, node, s):
        x, y = node.input[0], node.output[0]
        rank = s.view.rank(x) or 0
        kept = self.kept_axes(node, s, rank)
        for axis, layout in s.layouts_of(x).items():
            if axis in kept:
                s.set_layout(y, axis, layout)
            else:
                s.block(layout, f"{node.op_type} '{node.name}' resizes or mixes axis {axis}")
        for extra in node.output[1:]:  # MaxPool indices encode channel positions
            if extra and s.view.consumers.get(extra):
                s.block_tensor(x, f"{node.op_type} '{node.name}': its indices output is used")


@register("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "MaxRoiPool")
class PoolRule(SpatialOp):
    def kept_axes(self, node, s, rank):
        return {0, 1}


@register("Resize", "Upsample")
class ResizeRule(SpatialOp):
    def rewrite(self, node, rw):
        # explicit output sizes include the channel count
        if node.op_type == "Resize" and rw.view.has_input(node, 3):
            sizes = rw.view.const_input(node, 3)
            if sizes is not None:
                axes = rw.view.attr(node, "axes")
                y = node.output[0]
                new = rw.new_shape(y)
                positions = [int(a) for a in axes] if axes is not None else list(range(len(new)))
                rw.replace_const_input(node, 3, np.array([new[a] for a in positions], dtype=sizes.dtype))


@register("Pad")
class PadRule(SpatialOp):
    def kept_axes(self, node, s, rank):
        pads = const_ints(s, node, "pads", 1)
        if pads is None:
            pads = self._run_time_pads(node, s)
        if pads is None:
            return set()
        axes_input = s.view.const_input(node, 3) if s.view.has_input(node, 3) else np.arange(rank)
        if axes_input is None:
            return set()
        axes = [int(a) + rank if a < 0 else int(a) for a in axes_input]
        n = len(axes)
        padded = {axes[i] for i in range(n) if pads[i] != 0 or pads[i + n] != 0}
        return set(range(rank)) - padded

    @staticmethod
    def _run_time_pads(node, s):
        """Pads from a Shape -> Gather -> Concat subgraph: usable if every amount is a constant
        or a dimension no unit lives on (one that pruning changes would move the padding)."""
        if not s.view.has_input(node, 1):
            return None
        elements = shape_elements(s.view, node.input[1])
        if elements is None:
            return None
        for e in elements:
            if e is None or (isinstance(e, DimOf) and s.layout(e.tensor, e.axis) is not None):
                return None
        return elements

    def zeros(self, node, z):
        mode = z.view.attr(node, "mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        value = z.view.const_input(node, 2) if z.view.has_input(node, 2) else None
        if value is None:
            value = z.view.attr(node, "value", 0.0)
        if mode != "constant" or float(np.asarray(value).ravel()[0] if np.size(value) else 0.0) == 0.0:
            z.pass_through(node, inputs=[0])
