"""Reshape and Flatten: carry unit layouts across merged and split axes.

Axes are matched in runs whose sizes multiply to the same number.  Merging
axes repeats a layout as blocks (channel c of a (C, H, W) map becomes features
c*H*W .. c*H*W + H*W - 1 of the flattened vector).  Splitting an axis into
several (hidden -> heads x head_dim; C -> groups x C/g for a channel shuffle)
needs one output axis to carry the units: the units inside each slice of that
axis are merged into one (a head becomes one unit).  The carrier is the outer
axis, except in the channel-shuffle pattern (Reshape-Transpose-Reshape), where
it is the inner one so that a unit is one channel index in every group.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from onnxprune.analysis.rules.base import Rule, norm_axis, register
from onnxprune.analysis.shape_expr import DimOf, is_rewritable, match_dim, rewrite_const_elements, \
    scaled_dim_follows, shape_elements


def dim_factors(d) -> tuple[int, tuple[str, ...]]:
    """A dimension as coefficient x symbols: 8 -> (8, ()), '4*batch' -> (4, ('batch',)).

    An expression that is not a plain product ('sequence+1', or an unknown
    dim) is one opaque symbol.
    """
    if isinstance(d, int):
        return d, ()
    if d is None:
        return 1, (f"?{id(object())}",)  # unknown: equal to nothing else
    coef, symbols = 1, []
    for part in str(d).replace(" ", "").split("*"):
        if part.isdigit():
            coef *= int(part)
        elif part.isidentifier():
            symbols.append(part)
        else:
            return 1, (str(d),)
    return coef, tuple(sorted(symbols))


def _times(a, b):
    return a[0] * b[0], tuple(sorted(a[1] + b[1]))


def _is_plain_symbol(f) -> bool:
    return f[0] == 1 and len(f[1]) == 1


def _extend_input_side(p, q) -> bool | None:
    """Which side of a run to grow next: True = input, False = output, None = sizes never meet."""
    if not p[1] and not q[1]:
        return p[0] < q[0]
    if Counter(p[1]) <= Counter(q[1]) and q[0] % p[0] == 0:
        return True
    if Counter(q[1]) <= Counter(p[1]) and p[0] % q[0] == 0:
        return False
    return None


def axis_runs(in_shape, out_shape):
    """Pair runs of input axes with runs of output axes of equal total size.

    Symbolic sizes take part as products ('batch' x 4 = '4*batch', as
    onnxruntime's symbolic inference names a merged axis); two plain unknown
    symbols (the batch axis under different names) pair one to one.  Returns
    [(in_axes, out_axes)] or None when the sizes cannot be matched.
    """
    fin, fout = [dim_factors(d) for d in in_shape], [dim_factors(d) for d in out_shape]
    runs, i, j = [], 0, 0
    while i < len(fin) or j < len(fout):
        if i < len(fin) and j < len(fout) and (
            fin[i] == fout[j] or (_is_plain_symbol(fin[i]) and _is_plain_symbol(fout[j]))
        ):
            runs.append(((i,), (j,)))
            i, j = i + 1, j + 1
            continue
        if i < len(fin) and fin[i] == (1, ()):
            runs.append(((i,), ()))
            i += 1
            continue
        if j < len(fout) and fout[j] == (1, ()):
            runs.append(((), (j,)))
            j += 1
            continue
        if i >= len(fin) or j >= len(fout):
            return None
        ins, outs = [i], [j]
        p, q = fin[i], fout[j]
        i, j = i + 1, j + 1
        while p != q:
            grow_input = _extend_input_side(p, q)
            if grow_input is None:
                return None
            if grow_input:
                if i >= len(fin):
                    return None
                p = _times(p, fin[i])
                ins.append(i)
                i += 1
            else:
                if j >= len(fout):
                    return None
                q = _times(q, fout[j])
                outs.append(j)
                j += 1
        runs.append((tuple(ins), tuple(outs)))
    return runs


def _run_layout(s, tensor, in_axes, in_shape):
    """Unit id of every element of the run (as an N-d array), or None if no units."""
    with_units = [a for a in in_axes if s.layout(tensor, a) is not None]
    if not with_units:
        return None, None
    if len(with_units) > 1:
        return None, f"units on several merged axes {with_units}"
    a = with_units[0]
    dims = [in_shape[k] for k in in_axes]
    view_shape = [1] * len(dims)
    view_shape[in_axes.index(a)] = dims[in_axes.index(a)]
    return np.broadcast_to(s.layout(tensor, a).reshape(view_shape), dims), None


def map_layouts(node, s, x, y, in_shape, out_shape, prefer_inner=False):
    where = f"{node.op_type} '{node.name}'"
    if in_shape is None or out_shape is None:
        s.block_tensor(x, f"{where}: static shapes unknown")
        return
    runs = axis_runs(list(in_shape), list(out_shape))
    if runs is None:
        s.block_tensor(x, f"{where}: cannot match input and output axes {in_shape} -> {out_shape}")
        return
    for in_axes, out_axes in runs:
        if not in_axes or all(s.layout(x, a) is None for a in in_axes):
            continue
        if not all(isinstance(d, int) for d in [in_shape[k] for k in in_axes] + [out_shape[k] for k in out_axes]):
            _map_folded(s, x, y, in_shape, out_shape, in_axes, out_axes, where)
            continue
        elements, problem = _run_layout(s, x, in_axes, in_shape)
        if problem:
            for a in in_axes:
                s.block(s.layout(x, a), f"{where}: {problem}")
            continue
        if elements is None:
            continue
        if not out_axes:
            s.block(np.unique(elements), f"{where} drops the axis")
            continue
        out_dims = [out_shape[k] for k in out_axes]
        grid = np.ascontiguousarray(elements).reshape(out_dims)
        carrier = _choose_carrier(out_dims, prefer_inner, grid)
        _carry(s, y, out_axes[carrier], np.moveaxis(grid, carrier, 0).reshape(out_dims[carrier], -1), where)


def _map_folded(s, x, y, in_shape, out_shape, in_axes, out_axes, where) -> None:
    """A run with a dynamic size: (batch, heads) -> (heads*batch) and back, as SDPA exports write.

    The flat index of the run is periodic in the units: with the unit axis and
    every axis inside it static, unit ids repeat with period P over the dynamic
    outer axes.  The output keeps them on the innermost static axes spanning a
    multiple of P, or else on the dynamic axis that holds the period: a folded
    axis, whose layout is one period and whose size stays dynamic.
    """
    with_units = [a for a in in_axes if s.layout(x, a) is not None]
    if len(with_units) > 1 or not out_axes:
        s.block_tensor(x, f"{where}: units on a dynamic axis it merges or drops")
        return
    a = with_units[0]
    inner = [in_shape[k] for k in in_axes if k > a]
    if not all(isinstance(d, int) for d in inner):
        s.block(s.layout(x, a), f"{where}: merges units of axis {a} with a dynamic inner axis")
        return
    period = np.repeat(s.layout(x, a), int(np.prod(inner, dtype=np.int64)))
    suffix: list[int] = []
    for k in reversed(out_axes):
        if not isinstance(out_shape[k], int):
            break
        suffix.insert(0, k)
        dims = [out_shape[q] for q in suffix]
        size = int(np.prod(dims, dtype=np.int64))
        if size % len(period) == 0:
            grid = np.tile(period, size // len(period)).reshape(dims)
            carrier = _choose_carrier(dims, False)
            _carry(s, y, suffix[carrier], np.moveaxis(grid, carrier, 0).reshape(dims[carrier], -1), where)
            return
    size = int(np.prod([out_shape[q] for q in suffix], dtype=np.int64))
    boundary = out_axes[len(out_axes) - len(suffix) - 1] if len(suffix) < len(out_axes) else None
    if boundary is None or len(period) % size:
        s.block(s.layout(x, a), f"{where}: cannot follow units of axis {a} through dynamic sizes "
                                f"{tuple(in_shape)} -> {tuple(out_shape)}")
        return
    _carry(s, y, boundary, period.reshape(len(period) // size, size), where)


def _carry(s, y, axis: int, moved: np.ndarray, where: str) -> None:
    """Put one unit per row of `moved` on `axis`, merging the units a row holds."""
    if not (moved == moved[:, :1]).all():
        classes = np.repeat(np.arange(moved.shape[0]), moved.shape[1])
        s.union_positions(moved.ravel(), classes, where)
        s.note_split(moved[:, 0], moved.shape[1])
    s.set_layout(y, axis, moved[:, 0].copy())


def _choose_carrier(out_dims, prefer_inner, grid: np.ndarray | None = None):
    candidates = [k for k, d in enumerate(out_dims) if d != 1] or [0]
    if grid is not None:
        # an axis whose every slice already holds one unit carries them without merging any
        # (a shuffle after a grouped conv that loses whole groups: one unit per group)
        uniform = [k for k in candidates if _one_unit_per_slice(grid, k)]
        if uniform:
            candidates = uniform
    return candidates[-1] if prefer_inner else candidates[0]


def _one_unit_per_slice(grid: np.ndarray, axis: int) -> bool:
    moved = np.moveaxis(grid, axis, 0).reshape(grid.shape[axis], -1)
    return bool((moved == moved[:, :1]).all())


def _is_channel_shuffle(node, s) -> bool:
    """Reshape splitting one axis in two -> Transpose swapping those two -> Reshape back to the
    input's shape.  (Attention's head split followed by a swap of sequence and heads and a fold
    of (batch, heads) is not one: the swapped axes come from two input axes.)"""
    y = node.output[0]
    users = s.view.consumers.get(y, [])
    if len(users) != 1 or users[0][0].op_type != "Transpose":
        return False
    transpose = users[0][0]
    perm = list(s.view.attr(transpose, "perm", []))
    swapped = [i for i, p in enumerate(perm) if p != i]
    if len(swapped) != 2 or abs(swapped[0] - swapped[1]) != 1:
        return False
    after = s.view.consumers.get(transpose.output[0], [])
    if len(after) != 1 or after[0][0].op_type != "Reshape":
        return False
    in_shape, out_shape = s.view.shape(node.input[0]), s.view.shape(y)
    if in_shape is None or out_shape is None or s.view.rank(after[0][0].output[0]) != len(in_shape):
        return False
    back = s.view.shape(after[0][0].output[0])
    static = back is not None and all(isinstance(d, int) for d in list(back) + list(in_shape))
    if static and tuple(back) != tuple(in_shape):
        return False
    runs = axis_runs(list(in_shape), list(out_shape)) or []
    return any(len(ins) == 1 and set(swapped) <= set(outs) for ins, outs in runs)


@register("Reshape")
class ReshapeRule(Rule):
    preserves_zeros = True
    reads_folded_axes = True

    def propagate(self, node, s):
        x, y = node.input[0], node.output[0]
        if s.layouts_of(x):
            out_shape = _resolved_out_shape(node, s)
            map_layouts(node, s, x, y, s.view.shape(x), out_shape, prefer_inner=_is_channel_shuffle(node, s))
        if not s.view.is_const(node.input[1]):
            _check_run_time_target(node, s)

    def rewrite(self, node, rw):
        y = node.output[0]
        if not rw.changed(y):
            return
        target = rw.view.const_input(node, 1)
        if target is None:
            # run-time target: constant pieces on pruned axes are set to the kept size
            rewrite_const_elements(rw, shape_elements(rw.view, node.input[1]) or [], y, node)
            return
        new_out = rw.new_shape(y)
        new_target = [
            int(t) if t in (0, -1) or rw.mask(y, i) is None else int(new_out[i]) for i, t in enumerate(target)
        ]
        if new_target != [int(t) for t in target]:
            rw.replace_const_input(node, 1, np.array(new_target, dtype=target.dtype))


def _resolved_out_shape(node, s):
    """The output shape, with dims shape inference left unknown filled in from the target.

    Shape inference gives up on Concat(batch, seq, [-1], [16]) targets; the
    target itself says: constants are sizes, Shape reads are the read dims,
    and a single -1 is what is left of the input's size.
    """
    x, y = node.input[0], node.output[0]
    in_shape, out_shape = s.view.shape(x), s.view.shape(y)
    if in_shape is None or out_shape is None or all(isinstance(d, int) for d in out_shape):
        return out_shape
    elements = shape_elements(s.view, node.input[1])
    if elements is None or len(elements) != len(out_shape):
        return out_shape
    out = list(out_shape)
    wildcard = None
    for k, e in enumerate(elements):
        if isinstance(e, DimOf) and e.num == e.den == 1:
            out[k] = (s.view.shape(e.tensor) or [None] * (e.axis + 1))[e.axis]
        elif isinstance(e, int) and e > 0:
            out[k] = int(e)
        elif isinstance(e, int) and e == -1:
            wildcard = k
    if wildcard is not None:
        rest = [d for k, d in enumerate(out) if k != wildcard]
        ints_in = [d for d in in_shape if isinstance(d, int)]
        ints_rest = [d for d in rest if isinstance(d, int)]
        symbols_in = sorted(str(d) for d in in_shape if not isinstance(d, int))
        symbols_rest = sorted(str(d) for d in rest if not isinstance(d, int))
        total, known = int(np.prod(ints_in)), int(np.prod(ints_rest))
        if symbols_in == symbols_rest and known and total % known == 0:
            out[wildcard] = total // known
    return tuple(out)


def _check_run_time_target(node, s) -> None:
    """A target computed at run time (Shape -> Gather -> Concat) cannot be rewritten:
    each element must come out right by itself once units are gone.  That holds for
    -1; a constant on an axis no unit lives on; a dimension of a tensor that loses
    the same units (torch's x.view(x.size(0), -1), or c // groups in a channel
    shuffle).  A dimension of another tensor of the same size is coupled with the
    axis (x.view_as(other)).  Anything else keeps every unit involved."""
    x, y = node.input[0], node.output[0]
    elements = shape_elements(s.view, node.input[1])
    out_shape = s.view.shape(y)
    if elements is None or out_shape is None or len(elements) != len(out_shape):
        s.block_tensor(x, f"Reshape '{node.name}': target shape computed at run time")
        return
    runs = axis_runs(list(s.view.shape(x) or ()), list(out_shape)) or []
    carrying = {k for ins, outs in runs if any(s.layout(x, a) is not None for a in ins) for k in outs}
    where = f"Reshape '{node.name}' to a run-time shape"
    problems = [k for k, e in enumerate(elements) if not _element_follows(s, e, s.layout(y, k), k in carrying, where)]
    if not problems:
        return
    reason = (f"Reshape '{node.name}': target shape computed at run time; element(s) {problems} "
              "would not follow the pruned sizes")
    s.block_tensor(x, reason)
    s.block_tensor(y, reason)
    for e in elements:
        if isinstance(e, DimOf):
            s.block(s.layout(e.tensor, e.axis), reason)


def _element_follows(s, e, y_layout, in_unit_run: bool, where: str) -> bool:
    e_layout = s.layout(e.tensor, e.axis) if isinstance(e, DimOf) else None
    if isinstance(e, int) and e == -1:
        return True
    if y_layout is None:
        if isinstance(e, int) or (isinstance(e, DimOf) and e_layout is None):
            return True  # a size pruning does not change, on an axis it does not change
        return e is None and not in_unit_run  # unknown arithmetic on untouched axes (h * w)
    return is_rewritable(e) or scaled_dim_follows(s, e, y_layout) or match_dim(s, e, y_layout, where)


@register("Flatten")
class FlattenRule(Rule):
    preserves_zeros = True

    def propagate(self, node, s):
        x, y = node.input[0], node.output[0]
        in_shape = s.view.shape(x)
        if not s.layouts_of(x):
            return
        if in_shape is None:
            s.block_tensor(x, f"Flatten '{node.name}': input shape unknown")
            return
        axis = norm_axis(int(s.view.attr(node, "axis", 1)), len(in_shape))
        head, tail = in_shape[:axis], in_shape[axis:]
        out_shape = (_product(head), _product(tail))
        map_layouts(node, s, x, y, in_shape, out_shape)


def _product(dims):
    p = 1
    for d in dims:
        if not isinstance(d, int):
            return None
        p *= d
    return p
