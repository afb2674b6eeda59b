"""Normalisation layers.

BatchNorm and InstanceNorm act per channel: their parameters are sliced with
the channel's units.  LayerNorm and GroupNorm compute statistics across the
axis they normalise: removing channels there changes every other channel, so
those units are blocked.  LRN mixes neighbouring channels: pruning through it is
valid but not exact (excluded from lossless mode).
"""
from __future__ import annotations

from onnxprune.analysis.rules.base import Rule, identity_map, norm_axis, pass_axes, register


@register("BatchNormalization")
class BatchNormRule(Rule):
    roles = {1: "bn_scale", 2: "bn_bias", 3: "bn_stats", 4: "bn_stats"}

    def propagate(self, node, s):
        x, y = node.input[0], node.output[0]
        pass_axes(s, node, x, y, identity_map(s.view.rank(x)))
        layout = s.layout(x, 1)
        if layout is None:
            return
        for index, role in self.roles.items():
            if s.view.has_input(node, index):
                s.param(node, index, 0, layout, role)
        for extra in node.output[1:]:
            if extra and s.view.consumers.get(extra):
                s.block(layout, f"BatchNormalization '{node.name}' is in training mode")

    def zeros(self, node, z):
        z.batchnorm_zeros(node)


@register("InstanceNormalization")
class InstanceNormRule(Rule):
    def propagate(self, node, s):
        x, y = node.input[0], node.output[0]
        pass_axes(s, node, x, y, identity_map(s.view.rank(x)))
        layout = s.layout(x, 1)
        if layout is not None:
            s.param(node, 1, 0, layout, "bn_scale")
            s.param(node, 2, 0, layout, "bn_bias")

    def zeros(self, node, z):
        z.instancenorm_zeros(node)


class StatisticsOverAxes(Rule):
    """Pass every axis except those the statistics are computed over."""

    def normalised_axes(self, node, s, rank: int) -> set[int]:
        raise NotImplementedError

    def propagate(self, node, s):
        x = node.input[0]
        rank = s.view.rank(x) or 0
        blocked = self.normalised_axes(node, s, rank)
        for axis in sorted(blocked):
            s.block(s.layout(x, axis), f"{node.op_type} '{node.name}' computes its statistics over axis {axis}: "
                                       "removing a channel there would change every other channel")
        layouts = {a: l for a, l in s.layouts_of(x).items() if a not in blocked}
        for axis, layout in layouts.items():
            if axis < rank:
                s.set_layout(node.output[0], axis, layout)
            else:
                s.block(layout, f"{node.op_type} '{node.name}': rank of '{x}' unknown")


@register("LayerNormalization", "SimplifiedLayerNormalization")
class LayerNormRule(StatisticsOverAxes):
    """Over the last axis (the hidden width of a transformer): opt-in, its scale and
    bias sliced with the units; the statistics are then over the kept dims only."""

    def normalised_axes(self, node, s, rank):
        start = norm_axis(int(s.view.attr(node, "axis", -1)), rank)
        return set(range(start, rank))

    def propagate(self, node, s):
        x, y = node.input[0], node.output[0]
        rank = s.view.rank(x) or 0
        layout = s.layout(x, rank - 1) if rank else None
        if layout is None or self.normalised_axes(node, s, rank) != {rank - 1}:
            super().propagate(node, s)
            return
        reason = (f"{node.op_type} '{node.name}' computes its statistics over the hidden axis {rank - 1}: "
                  "removing dims there changes its mean and variance")
        for axis, other in s.layouts_of(x).items():
            if axis != rank - 1:
                s.set_layout(y, axis, other)
        if s.through_statistics(layout, reason):
            s.set_layout(y, rank - 1, layout)
            for index, role in ((1, "norm_scale"), (2, "norm_bias")):
                if s.view.has_input(node, index):
                    s.param(node, index, 0, layout, role)


@register("GroupNormalization")
class GroupNormRule(StatisticsOverAxes):
    def normalised_axes(self, node, s, rank):
        return set(range(1, rank))


@register("LpNormalization")
class LpNormRule(StatisticsOverAxes):
    def normalised_axes(self, node, s, rank):
        return {norm_axis(int(s.view.attr(node, "axis", -1)), rank)}


@register("LRN")
class LRNRule(Rule):
    preserves_zeros = True

    def propagate(self, node, s):
        x, y = node.input[0], node.output[0]
        pass_axes(s, node, x, y, identity_map(s.view.rank(x)))
        s.inexact(s.layout(x, 1), f"LRN '{node.name}' normalises across neighbouring channels")
