"""Expand and Tile: units pass on axes the op does not grow.

Expand to a shape read at run time (g.expand_as(x)) needs no rewrite, but each
element must follow the pruned sizes: an axis that carries units must be
broadcast (1) or read from a dimension with the same units; an axis of size 1
expanded to such a dimension takes that dimension's units.

Grouped-query attention's repeat_kv (k[:, :, None].expand(b, kv, rep, s, d).reshape(b, kv*rep,
s, d)) lets each KV head serve `rep` query heads.  Query heads can go two ways, whichever
leaves more units (as for grouped convs, rules/conv.py; a tie keeps KV groups):

* whole KV groups (kv >= rep: LLaMA-3's 8 KV heads of 4): the KV head's units pass, and the
  query heads that read it join them through the scores;
* the same query head of every group (rep > kv: Qwen2's 2 KV heads of 7): the Expand opens
  one unit per repeat slot, query head j of every group joins slot j, and the KV heads are
  kept; the repeat count in the Expand and Reshape shapes shrinks.
"""
from __future__ import annotations

import numpy as np

from onnxprune.analysis.rules.base import Rule, register
from onnxprune.analysis.shape_expr import DimOf, is_rewritable, match_dim, rewrite_const_elements, shape_elements


class GrowOp(Rule):
    preserves_zeros = True

    def propagate(self, node, s):
        x, y = node.input[0], node.output[0]
        rank, out_rank = s.view.rank(x), s.view.rank(y)
        if rank is None or out_rank is None:
            s.block_tensor(x, f"{node.op_type} '{node.name}': rank unknown")
            return
        shift = out_rank - rank
        out_dims = self.output_dims(node, s, out_rank)
        slots = self.query_slots(node, s, out_dims) if shift == 0 else None
        for axis, layout in s.layouts_of(x).items():
            if slots is not None and axis == slots - 1:
                s.block(layout, f"Expand '{node.name}' repeats each KV head for {out_dims[slots]} query heads "
                                f"(repeat_kv), more than there are KV heads: the same query head of every "
                                f"group goes together, and the KV heads are kept")
                s.slot_kv_units.update(int(u) for u in layout.tolist() if u >= 0)
            elif s.view.dim(x, axis) is not None and s.view.dim(x, axis) == out_dims[axis + shift]:
                s.set_layout(y, axis + shift, layout)
            else:
                s.block(layout, f"{node.op_type} '{node.name}' repeats axis {axis}")
        if slots is not None:
            units = s.fresh(node, y, slots, out_dims[slots], passive=True)
            s.set_layout(y, slots, units)
            kv = len(s.layout(x, slots - 1))
            s.query_slots.update((int(u), kv) for u in units.tolist())

    def output_dims(self, node, s, out_rank: int) -> list:
        return [s.view.dim(node.output[0], k) for k in range(out_rank)]

    def query_slots(self, node, s, out_dims) -> int | None:
        """The repeat axis of repeat_kv when query heads go by slot (see the module docstring)."""
        return None


@register("Expand")
class ExpandRule(GrowOp):
    def output_dims(self, node, s, out_rank):
        """Where inference lost a dim, the target's own constant (or a broadcast 1) says it."""
        dims = super().output_dims(node, s, out_rank)
        elements = shape_elements(s.view, node.input[1]) or []
        x_rank = s.view.rank(node.input[0]) or 0
        for k, d in enumerate(dims):
            e = elements[k - (out_rank - len(elements))] if k >= out_rank - len(elements) else 1
            if d is None and isinstance(e, int) and not isinstance(e, bool):
                xa = k - (out_rank - x_rank)
                x_dim = s.view.dim(node.input[0], xa) if xa >= 0 else 1
                dims[k] = x_dim if e == 1 else int(e)
        return dims

    def propagate(self, node, s):
        super().propagate(node, s)
        if not s.view.is_const(node.input[1]):
            _check_run_time_shape(node, s)

    def query_slots(self, node, s, out_dims):
        """repeat_kv: x (b, kv, 1, s, d) -> (b, kv, rep, s, d), read by one Reshape merging the kv and
        rep axes into one; slots when rep is more than the KV heads' units."""
        x, y = node.input[0], node.output[0]
        rank = s.view.rank(x)
        users = s.view.consumers.get(y, [])
        if rank is None or len(users) != 1 or users[0][0].op_type != "Reshape" or y in s.view.graph_outputs:
            return None
        from onnxprune.analysis.rules.reshape import axis_runs
        for axis in range(1, rank):
            rep, kv = out_dims[axis], s.layout(x, axis - 1)
            if s.view.dim(x, axis) != 1 or not isinstance(rep, int) or rep < 2 or kv is None:
                continue
            in_shape, out_shape = s.view.shape(y), s.view.shape(users[0][0].output[0])
            runs = axis_runs(list(in_shape), list(out_shape)) if in_shape and out_shape else None
            if not runs or not any({axis - 1, axis} <= set(ins) and len(outs) == 1 for ins, outs in runs):
                return None  # (b, kv, rep, s, d) -> (b, kv*rep, s, d), or (b*kv*rep, s, d) in a static fold
            target = s.view.const(node.input[1])
            if target is None:  # the repeat count must be a constant the rewrite can set
                elements = shape_elements(s.view, node.input[1]) or []
                shift = len(out_dims) - len(elements)
                if axis - shift < 0 or not is_rewritable(elements[axis - shift]):
                    return None
            kv_units = {int(u) for u in s.units.roots(kv).tolist() if u >= 0}
            return axis if rep > len(kv_units) else None
        return None

    def rewrite(self, node, rw):
        y = node.output[0]
        target = rw.view.const_input(node, 1)
        if not rw.changed(y):
            return
        if target is None:  # run-time shape: constant pieces on pruned axes get the kept size
            elements = shape_elements(rw.view, node.input[1]) or []
            rewrite_const_elements(rw, elements, y, node, shift=len(rw.new_shape(y)) - len(elements))
            return
        new_out = rw.new_shape(y)
        shift = len(new_out) - len(target)
        new_target = [int(new_out[i + shift]) if t != 1 and rw.mask(y, i + shift) is not None else int(t)
                      for i, t in enumerate(target)]
        if new_target != [int(t) for t in target]:
            rw.replace_const_input(node, 1, np.array(new_target, dtype=target.dtype))


def _check_run_time_shape(node, s) -> None:
    x, y = node.input[0], node.output[0]
    rank, out_rank = s.view.rank(x), s.view.rank(y)
    if rank is None or out_rank is None:
        return  # blocked by GrowOp
    where = f"Expand '{node.name}' to a run-time shape"
    elements = shape_elements(s.view, node.input[1])
    if elements is None:
        s.block_tensor(x, f"{where} it cannot read")
        return
    for k in range(out_rank):
        xa = k - (out_rank - rank)
        ea = k - (out_rank - len(elements))
        e = elements[ea] if ea >= 0 else 1
        x_dim = s.view.dim(x, xa) if xa >= 0 else 1
        x_layout = s.layout(x, xa) if xa >= 0 and x_dim != 1 else None
        e_layout = s.layout(e.tensor, e.axis) if isinstance(e, DimOf) else None
        if isinstance(e, DimOf) and e_layout is None and s.view.dim(e.tensor, e.axis) == 1:
            e = 1
        if x_layout is not None:
            if e != 1 and not is_rewritable(e) and not match_dim(s, e, x_layout, where):
                reason = f"{where}: element {ea} would not follow the pruned axis {xa} of '{x}'"
                s.block(x_layout, reason)
                s.block(e_layout, reason)
        elif e_layout is not None:
            if x_dim == 1 and e.num == e.den == 1:
                s.set_layout(y, k, e_layout)  # broadcast copies: the axis follows that dimension
            else:
                s.block(e_layout, f"{where}: axis {k} would change size while '{x}' keeps its own")


def follow_expanded_constant(s, name: str, axis: int, layout: np.ndarray) -> bool:
    """Let units reach `name` on `axis` when it is a constant broadcast by Expand and read only by
    the caller (ViT's class token: Expand(cls_token [1, 1, hidden], [batch, 1, hidden]) concatenated
    with the patch embeddings along the sequence): the constant is sliced with the units and the
    Expand's shape follows (its rewrite sets a constant element on that axis to the kept size).
    False (nothing recorded) for any other producer."""
    expand = s.view.producer.get(name)
    if expand is None or expand.op_type != "Expand" or not s.view.is_const(expand.input[0]):
        return False
    if len(s.view.consumers.get(name, [])) != 1 or name in s.view.graph_outputs:
        return False
    constant, out_rank = expand.input[0], s.view.rank(name)
    c_rank = s.view.rank(constant)
    if out_rank is None or c_rank is None:
        return False
    c_axis = axis - (out_rank - c_rank)
    if c_axis < 0 or s.view.dim(constant, c_axis) != len(layout):
        return False  # broadcast along the axis: every position is the same value (not handled)
    reader, s.reader = s.reader, expand.name
    try:
        if not s.param(expand, 0, c_axis, layout, "constant"):
            return False
        s.set_layout(name, axis, layout)
        if not s.view.is_const(expand.input[1]):
            _check_run_time_shape(expand, s)  # the shape's element there must be 1 or rewritable
    finally:
        s.reader = reader
    return True


@register("Tile")
class TileRule(GrowOp):
    pass
