"""Conv and ConvTranspose: the main sources and sinks of channels.

Output channels are new units.  Input channels are consumed (their weight
columns are sliced).  Depthwise convs tie each output channel to its input
channel, so they pass units through.  A general grouped conv keeps its group
count: a unit is the same channel index in every group, so each group keeps
the same number of channels.
"""
from __future__ import annotations

import numpy as np

from onnxprune.analysis.rules.base import Rule, register


def _in_channels(s, node, transposed: bool) -> int | None:
    """From the input's shape, or, when inference lost it, from the weight."""
    known = s.view.dim(node.input[0], 1)
    weight = s.view.const_input(node, 1)
    if known is not None or weight is None:
        return known
    return weight.shape[0] if transposed else weight.shape[1] * int(s.view.attr(node, "group", 1))


def _conv_kind(s, node, in_channels: int | None, transposed: bool):
    weight = s.view.const_input(node, 1)
    group = int(s.view.attr(node, "group", 1))
    if weight is None or in_channels is None:
        return None, group
    out_channels = weight.shape[1] * group if transposed else weight.shape[0]
    if group == 1:
        return ("dense", out_channels), group
    if group == in_channels:
        return ("depthwise", out_channels), group
    return ("grouped", out_channels), group


class ConvLike(Rule):
    transposed = False
    bias_index: int | None = 2  # ConvInteger has none (its inputs 2 and 3 are zero points)

    def consume(self, s, node, tensor: str, axis: int) -> None:
        """Record where input channels are consumed (ConvInteger: the float tensor before quantization)."""
        s.sink(node, tensor, axis)

    def propagate(self, node, s):
        x, y = node.input[0], node.output[0]
        where = f"{node.op_type} '{node.name}'"
        for axis, layout in s.layouts_of(x).items():
            if axis == 0:
                s.set_layout(y, 0, layout)
            elif axis != 1:
                s.block(layout, f"{where} mixes spatial positions")
        in_layout = s.layout(x, 1)
        in_channels = _in_channels(s, node, self.transposed)
        kind, group = _conv_kind(s, node, in_channels, self.transposed)
        if kind is None:
            s.block(in_layout, f"{where}: weight is not a constant or input channels unknown")
            return
        kind, out_channels = kind
        w_in_axis, w_out_axis = (0, 1) if self.transposed else (1, 0)
        if kind == "dense":
            if in_layout is not None:
                s.param(node, 1, w_in_axis, in_layout, "weight_in")
                self.consume(s, node, x, 1)
            out_layout = s.fresh(node, y, 1, out_channels)
            s.param(node, 1, w_out_axis, out_layout, "weight_out")
        elif kind == "depthwise":
            if in_layout is None:
                return  # channels tied one-to-one to channels nobody can prune
            multiplier = out_channels // group
            out_layout = np.repeat(in_layout, multiplier)
            # Conv weight (C*m, 1, k..): axis 0 follows the outputs.
            # ConvTranspose weight (C, m, k..): axis 0 follows the inputs.
            s.param(node, 1, 0, in_layout if self.transposed else out_layout, "weight_out")
        else:
            per_group_in, per_group_out = in_channels // group, out_channels // group
            if in_layout is not None:
                s.union_positions(in_layout, np.arange(in_channels) % per_group_in, where)
                if self.transposed:
                    s.param(node, 1, 0, in_layout, "weight_in")
                else:
                    s.param(node, 1, 1, in_layout[:per_group_in], "weight_in")
                self.consume(s, node, x, 1)
            fresh = s.fresh(node, y, 1, per_group_out)
            out_layout = np.tile(fresh, group)
            s.param(node, 1, 1 if self.transposed else 0, fresh if self.transposed else out_layout, "weight_out")
        if self.bias_index is not None and s.view.has_input(node, self.bias_index):
            s.param(node, self.bias_index, 0, out_layout, "bias")
        s.set_layout(y, 1, out_layout)

    def rewrite(self, node, rw):
        x = node.input[0]
        group = int(rw.view.attr(node, "group", 1))
        if group > 1 and group == _in_channels(rw, node, self.transposed) and rw.mask(x, 1) is not None:
            rw.set_attr(node, "group", rw.kept(x, 1))

    def zeros(self, node, z):
        z.source_zeros(node)


@register("Conv")
class ConvRule(ConvLike):
    transposed = False


@register("ConvTranspose")
class ConvTransposeRule(ConvLike):
    transposed = True
