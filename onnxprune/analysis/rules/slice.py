"""Slice: the output keeps the slice of the input's layout.

Bounds are rewritten to count only kept positions.  Steps other than 1 on a
pruned axis, or bounds computed at run time from dynamic dimensions, block the
units there.

Bounds computed at run time from static dimensions only (the legacy exporter's
chunk(): Shape -> Gather(1) -> Add(1) -> Div(2) -> Slice on the channel axis)
are the same on every run: they are read as constants and rewritten as
constants (the kept count before each bound).  That is exact for any removal,
so both halves of a chunk stay free.  Keeping the run-time arithmetic instead
would need both halves to keep equal counts (the division must still land on
the boundary), a coupling the analysis cannot state as "equal counts", only as
"channel i with channel i + C/2", which would halve the choices for nothing.
"""
from __future__ import annotations

import numpy as np

from onnxprune.analysis.rules.base import Rule, norm_axis, register
from onnxprune.analysis.shape_expr import static_values


def _bound_input(node, view, index: int):
    """A bound input's value: a constant, or computed at run time from static dims only."""
    if not view.has_input(node, index):
        return None
    value = view.const_input(node, index)
    return value if value is not None else static_values(view, node.input[index])


def slice_params(node, view, rank: int):
    """{axis: (start, stop, step)} normalised to the static input shape, or None."""
    x = node.input[0]
    if view.opset < 10 or view.attr(node, "starts") is not None:
        starts, ends = view.attr(node, "starts"), view.attr(node, "ends")
        axes, steps = view.attr(node, "axes"), None
    else:
        starts, ends = _bound_input(node, view, 1), _bound_input(node, view, 2)
        axes, steps = _bound_input(node, view, 3), _bound_input(node, view, 4)
        if starts is None or ends is None or (view.has_input(node, 3) and axes is None) or (
            view.has_input(node, 4) and steps is None
        ):
            return None
    starts, ends = list(np.atleast_1d(starts)), list(np.atleast_1d(ends))
    axes = list(range(len(starts))) if axes is None else [norm_axis(int(a), rank) for a in np.atleast_1d(axes)]
    steps = [1] * len(starts) if steps is None else list(np.atleast_1d(steps))
    out = {}
    for a, start, stop, step in zip(axes, starts, ends, steps):
        size = view.dim(x, a)
        if size is None:
            out[a] = None
            continue
        out[a] = slice(int(start), int(stop), int(step)).indices(size)
    return out


def sliced_axes(node, view, rank: int) -> set[int] | None:
    """The axes a Slice touches, when known even though its bounds are not."""
    if view.opset >= 10 and view.attr(node, "starts") is None and view.has_input(node, 3):
        axes = view.const_input(node, 3)
        return None if axes is None else {norm_axis(int(a), rank) for a in np.atleast_1d(axes)}
    return None


@register("Slice")
class SliceRule(Rule):
    preserves_zeros = True

    def propagate(self, node, s):
        x, y = node.input[0], node.output[0]
        rank = s.view.rank(x)
        params = slice_params(node, s.view, rank) if rank is not None else None
        sliced = sliced_axes(node, s.view, rank) if params is None and rank is not None else None
        for axis, layout in s.layouts_of(x).items():
            if params is None and sliced is not None and axis not in sliced:
                s.set_layout(y, axis, layout)  # run-time bounds, but on other axes
            elif params is None:
                s.block(layout, f"Slice '{node.name}': bounds computed at run time from dimensions "
                                f"that are not static, on the axis {axis} that carries channels")
            elif axis not in params:
                s.set_layout(y, axis, layout)
            elif params[axis] is None or params[axis][2] != 1:
                s.block(layout, f"Slice '{node.name}': step other than 1 or unknown size on axis {axis}")
            else:
                start, stop, _ = params[axis]
                s.set_layout(y, axis, layout[start:stop])

    def zeros(self, node, z):
        """The output keeps the zero positions of the range it takes."""
        z.pass_through(node)
        x, y = node.input[0], node.output[0]
        rank = z.view.rank(x)
        params = slice_params(node, z.view, rank) if rank is not None else None
        for axis, p in (params or {}).items():
            if p is not None and p[2] == 1:
                z.carry_positions(x, axis, y, axis, slice(p[0], p[1]))

    def rewrite(self, node, rw):
        x = node.input[0]
        rank = rw.view.rank(x)
        if not rw.changed(x):
            return
        params = slice_params(node, rw.view, rank)
        if params is None:
            return  # run-time bounds: propagate allowed them only on axes that keep every position
        changed = {a: p for a, p in params.items() if rw.mask(x, a) is not None}
        if not changed:
            return
        attr_form = rw.view.attr(node, "starts") is not None
        starts = list(np.atleast_1d(rw.view.attr(node, "starts") if attr_form else _bound_input(node, rw.view, 1)))
        ends = list(np.atleast_1d(rw.view.attr(node, "ends") if attr_form else _bound_input(node, rw.view, 2)))
        axes_raw = rw.view.attr(node, "axes") if attr_form else _bound_input(node, rw.view, 3)
        axes = list(range(len(starts))) if axes_raw is None else [norm_axis(int(a), rank) for a in np.atleast_1d(axes_raw)]
        for i, a in enumerate(axes):
            if a in changed:
                start, stop, _ = changed[a]
                mask = rw.mask(x, a)
                starts[i] = int(mask[:start].sum())
                ends[i] = int(mask[:stop].sum())
        if attr_form:
            rw.set_attr(node, "starts", [int(v) for v in starts])
            rw.set_attr(node, "ends", [int(v) for v in ends])
        else:
            # run-time bounds become constants here (static_values: the same on every run)
            dtype = _bound_input(node, rw.view, 1).dtype
            rw.replace_const_input(node, 1, np.array(starts, dtype=dtype))
            rw.replace_const_input(node, 2, np.array(ends, dtype=dtype))
            for index in (3, 4):
                if rw.view.has_input(node, index) and rw.view.const_input(node, index) is None:
                    rw.replace_const_input(node, index, _bound_input(node, rw.view, index))
