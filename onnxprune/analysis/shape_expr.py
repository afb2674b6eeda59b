"""Symbolic evaluation of run-time shape tensors (Shape -> Gather -> Concat ...).

Exporters compute Reshape targets from the input's own shape.  Each element of
such a tensor is described as a constant, or as "dimension `axis` of tensor
`t`" times a constant ratio (`c // groups` in a channel shuffle); an element
that follows a pruned dimension at run time needs no rewrite.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from onnxprune.ir.graph_view import GraphView, tensor_values


@dataclass(frozen=True)
class DimOf:
    """dim(tensor, axis) * num / den.

    scale: (node, input index) of the constant `num` came from when it is a Mul's own
    one-element constant input, so the rewrite can change it (the legacy exporter's repeat_kv
    reshape: Mul(Gather(Shape(k), 1), n_rep))."""

    tensor: str
    axis: int
    num: int = 1
    den: int = 1
    scale: tuple[str, int] | None = None

    def scaled(self, num: int, den: int) -> "DimOf":
        return DimOf(self.tensor, self.axis, self.num * num, self.den * den)


class ConstElement(int):
    """A constant element that sits in a Concat's constant input, so it can be rewritten
    (the head count in Concat(batch, seq, [4], [16]) -> Reshape)."""

    def __new__(cls, value: int, node: str, index: int, offset: int):
        obj = int.__new__(cls, value)
        obj.node, obj.index, obj.offset = node, index, offset
        return obj


Element = int | DimOf | None  # None: unknown


def shape_elements(view: GraphView, name: str, depth: int = 0) -> list[Element] | None:
    """Elements of a 1-D int tensor, or None if its length is unknown."""
    value = view.const(name)
    if value is not None:
        return [int(v) for v in np.atleast_1d(value)]
    node = view.producer.get(name)
    if node is None or depth > 16:
        return None
    op = node.op_type
    if op == "Shape":
        rank = view.rank(node.input[0])
        if rank is None:
            return None
        start = int(view.attr(node, "start", 0))
        end = view.attr(node, "end")
        axes = list(range(rank))[slice(start, None if end is None else int(end))]
        return [DimOf(node.input[0], a) for a in axes]
    if op in ("Cast", "Identity", "Squeeze", "Unsqueeze"):
        return shape_elements(view, node.input[0], depth + 1)
    if op == "Concat":
        out: list[Element] = []
        for index, part in enumerate(node.input):
            if view.is_const(part):
                out.extend(ConstElement(int(v), node.name, index, k)
                           for k, v in enumerate(np.atleast_1d(view.const(part))))
                continue
            elems = shape_elements(view, part, depth + 1)
            if elems is None:
                return None
            out.extend(elems)
        return out
    if op == "Gather":
        src = shape_elements(view, node.input[0], depth + 1)
        idx = view.const(node.input[1])
        if src is None or idx is None:
            return None
        return [src[int(i)] for i in np.atleast_1d(idx)]
    if op == "Slice":
        src = shape_elements(view, node.input[0], depth + 1)
        starts, ends = view.const_input(node, 1), view.const_input(node, 2)
        if src is None or starts is None or ends is None:
            return None
        return src[slice(int(starts[0]), int(ends[0]))]
    if op == "Reshape" and view.rank(name) == 1:  # a shape vector reshaped to [-1]: same elements
        return shape_elements(view, node.input[0], depth + 1)
    if op == "ConstantOfShape":
        return _constant_of_shape(view, node, depth)
    if op in ("Mul", "Div", "Equal"):
        a, b = (shape_elements(view, i, depth + 1) for i in node.input[:2])
        if a is not None and b is not None and (len(a) == len(b) or 1 in (len(a), len(b))):
            n = max(len(a), len(b))
            combine = _equal if op == "Equal" else lambda x, y: _arith(op, x, y)
            out = [combine(a[i % len(a)], b[i % len(b)]) for i in range(n)]
            if op == "Mul" and n == 1 and isinstance(out[0], DimOf) and out[0].den == 1:
                index = 1 if isinstance(a[0], DimOf) else 0
                const = view.const(node.input[index])
                if const is not None and const.size == 1:
                    out[0] = DimOf(out[0].tensor, out[0].axis, out[0].num, 1, (node.name, index))
            return out
    if op == "Where":
        # torch's expand() writes Where(shape == -1, 1, shape): pick per element where the test is known
        cond, a, b = (shape_elements(view, i, depth + 1) for i in node.input[:3])
        if cond is not None and a is not None and b is not None:
            n = max(len(cond), len(a), len(b))
            if all(len(v) in (1, n) for v in (cond, a, b)):
                picked = [None if cond[i % len(cond)] is None else
                          (a[i % len(a)] if cond[i % len(cond)] else b[i % len(b)]) for i in range(n)]
                return picked
    length = view.dim(name, 0) if view.rank(name) != 0 else 1
    return None if length is None else [None] * length


def _constant_of_shape(view: GraphView, node, depth: int) -> list[Element] | None:
    """A filled 1-D tensor whose length is known statically."""
    dims = shape_elements(view, node.input[0], depth + 1)
    if dims is None or len(dims) != 1:
        return None
    length = dims[0]
    if isinstance(length, DimOf) and length.num == length.den == 1:
        length = view.dim(length.tensor, length.axis)
    value = view.attr(node, "value")
    fill = 0 if value is None else tensor_values(value).ravel()[0]
    if not isinstance(length, int) or fill != int(fill):
        return None
    return [int(fill)] * length


def _equal(a: Element, b: Element) -> bool | None:
    """Elementwise Equal of two shape elements: a dimension is never negative."""
    if isinstance(a, int) and isinstance(b, int):
        return int(a) == int(b)
    if isinstance(a, DimOf) and isinstance(b, int) and b < 0 or isinstance(b, DimOf) and isinstance(a, int) and a < 0:
        return False
    return None


def _arith(op: str, a: Element, b: Element) -> Element:
    """a * b or a / b (integer division) where at most one side is a dimension."""
    if isinstance(a, int) and isinstance(b, int):
        if op == "Mul":
            return a * b
        return int(a / b) if b else None  # ONNX integer Div truncates
    if isinstance(a, DimOf) and isinstance(b, int) and b > 0:
        return a.scaled(b, 1) if op == "Mul" else a.scaled(1, b)
    if op == "Mul" and isinstance(b, DimOf) and isinstance(a, int) and a > 0:
        return b.scaled(a, 1)
    return None


def is_rewritable(e: Element) -> bool:
    """A constant size the rewrite can set to the kept count (not a -1 or 0 wildcard)."""
    return isinstance(e, ConstElement) and int(e) > 0


def match_dim(state, e: Element, layout: np.ndarray, where: str) -> bool:
    """Does run-time element `e` equal the kept size of an axis with `layout`, whatever is removed?

    True when `e` reads a dimension whose units are the same ones (in the same
    proportion: c // groups); a dimension of the same size with other units is
    coupled with `layout` to make it so (x.view_as(other), g.expand_as(other)).
    """
    if not isinstance(e, DimOf):
        return False
    source = state.layout(e.tensor, e.axis)
    if source is None:
        return False
    src = Counter(state.units.roots(np.asarray(source)).tolist())
    dst = Counter(state.units.roots(np.asarray(layout)).tolist())
    if src.keys() == dst.keys() and all(src[r] * e.num == dst[r] * e.den for r in src):
        return True
    if e.num == e.den == 1 and len(source) == len(layout):
        state.couple([source, layout], where)
        return True
    return False


def rewrite_const_elements(rw, elements: list[Element], tensor: str, consumer, shift: int = 0,
                           shape_input: int = 1) -> None:
    """Set each rewritable constant element on a pruned axis of `tensor` to the kept size.

    `consumer` is the node reading the shape from its input `shape_input`: a shape Concat
    it shares with other nodes (exporters reuse one per model) gets a copy of its own.
    A dimension times a Mul's constant (see DimOf.scale) gets the constant that makes it
    the kept size (the dimension itself does not change: see scaled_dim_follows).
    """
    new_shape = None
    for k, e in enumerate(elements):
        if rw.mask(tensor, k + shift) is None:
            continue
        if is_rewritable(e):
            new_shape = new_shape or rw.new_shape(tensor)
            rw.set_const_element(e.node, e.index, e.offset, int(new_shape[k + shift]), reader=(consumer, shape_input))
        elif isinstance(e, DimOf) and e.scale is not None and rw.mask(e.tensor, e.axis) is None:
            new_shape = new_shape or rw.new_shape(tensor)  # (a pruned dimension follows by itself)
            dim = rw.view.dim(e.tensor, e.axis)
            rw.set_const_element(e.scale[0], e.scale[1], 0, int(new_shape[k + shift]) // dim)


def scaled_dim_follows(state, e: Element, layout: np.ndarray) -> bool:
    """dim(t, a) * c, with c a constant the rewrite can set, equals the kept size of an axis with
    `layout` whatever is removed: dim(t, a) is static and never pruned (no units there, or only
    blocked ones) and every unit covers a multiple of it (repeat_kv: kv heads x kept slots)."""
    if not isinstance(e, DimOf) or e.scale is None:
        return False
    dim = state.view.dim(e.tensor, e.axis)
    if not isinstance(dim, int) or dim < 1:
        return False
    source = state.layout(e.tensor, e.axis)
    if source is not None and any(int(u) not in state.block_reasons for u in np.asarray(source).tolist() if u >= 0):
        return False
    counts = Counter(state.units.roots(np.asarray(layout)).tolist())
    return all(n % dim == 0 for n in counts.values())


_STATIC_ARITH = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}


def static_values(view: GraphView, name: str) -> np.ndarray | None:
    """The value of a small integer tensor computed at run time from static dimensions only
    (chunk()'s bounds: Shape -> Gather(1) -> Add(1) -> Div(2) on a channel axis a weight fixes).
    Every run computes the same value, so it may stand as a constant; None when it reads a
    dynamic dimension or an op that is not one of the few shape ops followed here."""
    return _known(_static(view, name, 0))


def _known(a: np.ndarray | None) -> np.ndarray | None:
    """`a` without dynamic dims (None entries of a Shape's output), as integers where it held some."""
    if a is None:
        return None
    a = np.asarray(a)  # np.take of one element returns a bare Python scalar
    if a.dtype != object:
        return a
    return None if any(v is None for v in a.ravel()) else a.astype(np.int64)


def _static(view: GraphView, name: str, depth: int) -> np.ndarray | None:
    value = view.const(name)
    if value is not None:
        return np.asarray(value)
    node = view.producer.get(name)
    if node is None or depth > 16:
        return None
    op = node.op_type
    if op == "Shape":  # dynamic dims are None: only an element that is used must be static
        shape = view.shape(node.input[0])
        if shape is None:
            return None
        start, end = int(view.attr(node, "start", 0)), view.attr(node, "end")
        dims = list(shape)[slice(start, None if end is None else int(end))]
        return np.array([d if isinstance(d, int) and d > 0 else None for d in dims], dtype=object)
    args = [_static(view, i, depth + 1) if i else None for i in node.input]
    if op in ("Cast", "Identity"):
        return args[0]
    if op in ("Unsqueeze", "Squeeze", "Reshape", "Flatten"):
        out = view.shape(name)
        if args[0] is None or out is None or not all(isinstance(d, int) for d in out):
            return None
        return args[0].reshape(out) if int(np.prod(out, dtype=np.int64)) == args[0].size else None
    if any(a is None for a in args[:2]):
        return None
    if op == "Gather":
        return np.asarray(np.take(args[0], _known(args[1]), axis=int(view.attr(node, "axis", 0))))
    if op == "Concat":
        return np.concatenate([np.atleast_1d(a) for a in args], axis=int(view.attr(node, "axis", 0)))
    args = [_known(a) for a in args]
    if any(a is None for a in args):
        return None
    if op in _STATIC_ARITH:
        return _STATIC_ARITH[op](args[0], args[1])
    if op == "Div" and args[0].dtype.kind in "iu" and np.all(args[1] != 0):
        a, b = np.broadcast_arrays(args[0], args[1])
        return (np.sign(a) * np.sign(b) * (np.abs(a) // np.abs(b))).astype(args[0].dtype)  # ONNX truncates
    if op in ("Min", "Max"):
        return (np.minimum if op == "Min" else np.maximum).reduce(np.broadcast_arrays(*args))
    return None
