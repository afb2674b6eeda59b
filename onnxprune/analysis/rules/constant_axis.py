"""Units reaching a run-time tensor whose values along their axis all come from constants.

Swin's shifted windows add a per-head relative position bias (a constant [1, heads, N, N])
to the cyclic-shift mask (computed at run time, [windows*batch, 1, N, N], broadcast over the
heads) before the sum meets the attention scores.  The sum is a run-time tensor without units,
so the Add with the scores would pin the heads; but along the head axis every value comes from
the constant, and the mask is the same for every head.  `follow_constant` walks back from
such a tensor through ops that keep the axis (broadcasting arithmetic, Cast, Neg, Unsqueeze,
Transpose, Expand, Gather on another axis) to the constants that vary along it, slices them
with the units and gives the tensors on the way the units' layout, so that the rewrite shrinks
them too.  It only follows tensors read once (by the next op on the way): a tensor read
elsewhere would have to shrink there as well.
"""
from __future__ import annotations

import numpy as np

from onnxprune.analysis.rules.base import norm_axis

BROADCASTING = {"Add", "Sub", "Mul", "Div", "Where", "Max", "Min", "Pow"}
UNARY = {"Cast", "Identity", "Neg", "Relu", "Exp", "Sigmoid", "Tanh", "Abs", "Sqrt", "Reciprocal", "Softplus"}
MAX_DEPTH = 12


def follow_constant(s, name: str, axis: int, layout: np.ndarray) -> bool:
    """Let `layout` reach run-time tensor `name` on `axis` (and slice the constants behind it).
    False, with nothing recorded, when some value along the axis is not a constant's."""
    steps: list[tuple] = []
    if not _plan(s, name, axis, len(layout), steps, 0):
        return False
    reader = s.reader
    try:
        for step in steps:
            if step[0] == "param":
                _, node, index, in_axis = step
                s.reader = node.name
                if not s.param(node, index, in_axis, layout, "constant"):
                    return False
            elif step[0] == "expand":
                from onnxprune.analysis.rules.expand import _check_run_time_shape
                s.reader = step[1].name
                _check_run_time_shape(step[1], s)
            else:
                _, tensor, tensor_axis = step
                s.set_layout(tensor, tensor_axis, layout)
    finally:
        s.reader = reader
    return True


def _read_once(s, name: str) -> bool:
    return len(s.view.consumers.get(name, [])) == 1 and name not in s.view.graph_outputs


def _plan(s, name: str, axis: int, size: int, steps: list, depth: int) -> bool:
    """Append the steps that give run-time `name` units on `axis`; False if it cannot."""
    view = s.view
    node = view.producer.get(name)
    if node is None or depth > MAX_DEPTH or not _read_once(s, name) or view.dim(name, axis) != size:
        return False
    if s.layout(name, axis) is not None:
        return False
    op = node.op_type
    rank = view.rank(name)
    if rank is None:
        return False
    if op in BROADCASTING:
        varying = 0
        for index, x in enumerate(node.input):
            x_rank = view.rank(x) if x else None
            if x_rank is None:
                return False
            x_axis = axis - (rank - x_rank)
            if x_axis < 0 or view.dim(x, x_axis) == 1:
                continue  # the same value for every position along the axis
            varying += 1
            if view.is_const(x):
                steps.append(("param", node, index, x_axis))
            elif not _plan(s, x, x_axis, size, steps, depth + 1):
                return False
        if not varying:
            return False
    elif op in UNARY:
        if not _plan_input(s, node, 0, axis, size, steps, depth):
            return False
    elif op == "Unsqueeze":
        axes = _unsqueeze_axes(s, node, rank)
        if axes is None or axis in axes:
            return False
        in_axis = axis - sum(1 for a in axes if a < axis)
        if not _plan_input(s, node, 0, in_axis, size, steps, depth):
            return False
    elif op == "Transpose":
        perm = view.attr(node, "perm") or list(reversed(range(rank)))
        if not _plan_input(s, node, 0, int(perm[axis]), size, steps, depth):
            return False
    elif op == "Expand":
        x = node.input[0]
        x_rank = view.rank(x)
        x_axis = axis - (rank - x_rank) if x_rank is not None else -1
        if x_axis < 0 or view.dim(x, x_axis) != size:
            return False  # the axis is made by the Expand: every position is the same value
        if not _plan_input(s, node, 0, x_axis, size, steps, depth):
            return False
        if not view.is_const(node.input[1]):
            steps.append(("expand", node))
    elif op == "Gather":
        data, indices = node.input[0], node.input[1]
        data_rank, idx_rank = view.rank(data), view.rank(indices)
        if data_rank is None or idx_rank is None:
            return False
        g_axis = norm_axis(int(view.attr(node, "axis", 0)), data_rank)
        if g_axis <= axis < g_axis + idx_rank:
            return False  # the axis is the indices'
        data_axis = axis if axis < g_axis else axis - idx_rank + 1
        if not _plan_input(s, node, 0, data_axis, size, steps, depth):
            return False
    else:
        return False
    steps.append(("layout", name, axis))
    return True


def _plan_input(s, node, index: int, axis: int, size: int, steps: list, depth: int) -> bool:
    x = node.input[index]
    if s.view.is_const(x):
        if s.view.dim(x, axis) != size:
            return False
        steps.append(("param", node, index, axis))
        return True
    return _plan(s, x, axis, size, steps, depth + 1)


def _unsqueeze_axes(s, node, out_rank: int) -> list[int] | None:
    value = s.view.attr(node, "axes")
    if value is None and s.view.has_input(node, 1):
        value = s.view.const_input(node, 1)
    if value is None:
        return None
    return [norm_axis(int(a), out_rank) for a in np.atleast_1d(value)]
