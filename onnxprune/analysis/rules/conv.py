"""Conv and ConvTranspose: the main sources and sinks of channels.

Output channels are new units.  Input channels are consumed (their weight
columns are sliced).  Depthwise convs tie each output channel to its input
channel, so they pass units through.  A general grouped conv (several channels
per group) is pruned one of two ways, whichever leaves more units to choose from:

* whole groups (ResNeXt's many narrow groups): a unit is one conv group, its
  input channels (coupled with the producer's) and its output channels; the
  group count shrinks, and a dead group can go.  Like a depthwise conv, the
  conv passes units through and consumes nothing: group k's inputs feed only
  group k's outputs, which go with them.
* the same channel index in every group (few wide groups, and the second
  grouped conv after a channel shuffle, whose groups each hold every unit):
  the group count stays and every group keeps as many channels.
"""
from __future__ import annotations

import numpy as np

from onnxprune.analysis.rules.base import Rule, register
from onnxprune.analysis.units import NO_UNIT


def _in_channels(s, node, transposed: bool, weight_index: int = 1) -> int | None:
    """From the input's shape, or, when inference lost it, from the weight."""
    known = s.view.dim(node.input[0], 1)
    weight = s.view.const_input(node, weight_index)
    if known is not None or weight is None:
        return known
    return weight.shape[0] if transposed else weight.shape[1] * int(s.view.attr(node, "group", 1))


def _conv_kind(s, node, in_channels: int | None, transposed: bool, weight_index: int = 1):
    weight = s.view.const_input(node, weight_index)
    group = int(s.view.attr(node, "group", 1))
    if weight is None or in_channels is None:
        return None, group
    out_channels = weight.shape[1] * group if transposed else weight.shape[0]
    if group == 1:
        return ("dense", out_channels), group
    if group == in_channels:
        return ("depthwise", out_channels), group
    return ("grouped", out_channels), group


def _first_unit(block: np.ndarray) -> int:
    """The unit of a conv group's input channels (one after union_positions), NO_UNIT if none has one."""
    units = block[block != NO_UNIT]
    return int(units[0]) if len(units) else NO_UNIT


def _prunable_classes(s, layout: np.ndarray, classes: np.ndarray) -> int:
    """How many units `layout` would hold if positions with the same class were one unit
    (counting the couplings already made; a class holding an unprunable channel counts none)."""
    parent: dict[tuple[str, int], tuple[str, int]] = {}

    def find(a):
        while parent.setdefault(a, a) != a:
            a = parent[a]
        return a

    pinned: set[int] = set()
    for unit, cls in zip(s.units.roots(layout).tolist(), classes.tolist()):
        if unit == NO_UNIT:
            pinned.add(cls)
        else:
            parent[find(("unit", unit))] = find(("class", cls))
    components = {find(("class", c)) for c in set(classes.tolist())}
    blocked = {find(("class", c)) for c in pinned}
    return len(components - blocked)


def _whole_groups_keep_more(s, in_layout: np.ndarray, group: int, per_group_out: int) -> bool:
    """Removing whole groups leaves `group` units at most, shared by the producer and this conv;
    the same index in every group leaves the producer's index classes plus this conv's own
    C_out/g fresh units.  Ties keep the group count (kernels are tuned for it)."""
    positions = np.arange(len(in_layout))
    per_group_in = len(in_layout) // group
    whole = _prunable_classes(s, in_layout, positions // per_group_in)
    same_index = _prunable_classes(s, in_layout, positions % per_group_in) + per_group_out
    return whole > same_index


class ConvLike(Rule):
    transposed = False
    weight_index = 1  # QLinearConv: 3
    bias_index: int | None = 2  # ConvInteger has none (its inputs 2 and 3 are zero points); QLinearConv: 8

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
        w = self.weight_index
        in_channels = _in_channels(s, node, self.transposed, w)
        kind, group = _conv_kind(s, node, in_channels, self.transposed, w)
        if kind is None:
            s.block(in_layout, f"{where}: weight is not a constant or input channels unknown")
            return
        kind, out_channels = kind
        w_in_axis, w_out_axis = (0, 1) if self.transposed else (1, 0)
        if kind == "dense":
            if in_layout is not None:
                s.param(node, w, w_in_axis, in_layout, "weight_in")
                self.consume(s, node, x, 1)
            out_layout = s.fresh(node, y, 1, out_channels)
            s.param(node, w, w_out_axis, out_layout, "weight_out")
        elif kind == "depthwise":
            if in_layout is None:
                return  # channels tied one-to-one to channels nobody can prune
            multiplier = out_channels // group
            out_layout = np.repeat(in_layout, multiplier)
            # Conv weight (C*m, 1, k..): axis 0 follows the outputs.
            # ConvTranspose weight (C, m, k..): axis 0 follows the inputs.
            s.param(node, w, 0, in_layout if self.transposed else out_layout, "weight_out")
        elif in_layout is not None and _whole_groups_keep_more(s, in_layout, group, out_channels // group):
            per_group_in, per_group_out = in_channels // group, out_channels // group
            s.union_positions(in_layout, np.arange(in_channels) // per_group_in, where)
            group_units = np.array([_first_unit(block) for block in in_layout.reshape(group, per_group_in)])
            out_layout = np.repeat(group_units, per_group_out)
            # Conv weight (C_out, C_in/g, k..): axis 0 follows the outputs.
            # ConvTranspose weight (C_in, C_out/g, k..): axis 0 follows the inputs.
            s.param(node, w, 0, in_layout if self.transposed else out_layout, "weight_out")
        else:
            per_group_in, per_group_out = in_channels // group, out_channels // group
            if in_layout is not None:
                s.union_positions(in_layout, np.arange(in_channels) % per_group_in, where)
                if self.transposed:
                    s.param(node, w, 0, in_layout, "weight_in")
                else:
                    s.param(node, w, 1, in_layout[:per_group_in], "weight_in")
                self.consume(s, node, x, 1)
            fresh = s.fresh(node, y, 1, per_group_out)
            out_layout = np.tile(fresh, group)
            s.param(node, w, 1 if self.transposed else 0, fresh if self.transposed else out_layout, "weight_out")
        if self.bias_index is not None and s.view.has_input(node, self.bias_index):
            s.param(node, self.bias_index, 0, out_layout, "bias")
        s.set_layout(y, 1, out_layout)

    def rewrite(self, node, rw):
        x = node.input[0]
        group = int(rw.view.attr(node, "group", 1))
        mask = rw.mask(x, 1)
        if group == 1 or mask is None:
            return
        in_channels = _in_channels(rw, node, self.transposed, self.weight_index)
        if group == in_channels:
            rw.set_attr(node, "group", rw.kept(x, 1))
            return
        # whole groups removed: every group's input channels are all kept or all gone (the other
        # coupling removes the same index from every group, which never empties one while another stays)
        per_group = mask.reshape(group, -1)
        if (per_group == per_group[:, :1]).all():
            rw.set_attr(node, "group", int(per_group[:, 0].sum()))

    def zeros(self, node, z):
        z.source_zeros(node)


@register("Conv")
class ConvRule(ConvLike):
    transposed = False


@register("ConvTranspose")
class ConvTransposeRule(ConvLike):
    transposed = True
