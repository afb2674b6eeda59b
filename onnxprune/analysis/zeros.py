"""Which units are provably all-zero in which tensors (for lossless elimination).

Tracked per tensor as a set of unit roots whose every position there is an
exact 0 for every possible input.  Value-creating ops (Conv, Gemm, BN, Add,
Mul...) decide from their parameters; unit-preserving ops (Relu, pooling,
Reshape, Concat...) carry zeros through; every other op forgets them.

A unit may be zero at only some of its positions in one tensor and at all of
them in a slice of it: GPT-2's fused QKV projection computes a head's Q, K and
V columns (one unit), and only its V columns are zero.  So sources also record
which positions along their output axis are exactly zero (`zero_positions`);
ops that keep positions (the same layout on an output axis: Reshape, Transpose,
elementwise...) or slice them (Split, Slice) carry those masks, and a unit all
of whose positions in a tensor are zero is zero there.
"""
from __future__ import annotations

import numpy as np
import onnx

from onnxprune.analysis import Analysis
from onnxprune.analysis.rules import rule_for
from onnxprune.analysis.units import NO_UNIT


class ZeroState:
    def __init__(self, analysis: Analysis):
        self.analysis = analysis
        self.view = analysis.view
        self.zeros: dict[str, set[int]] = {}
        self._const_cache: dict[str, set[int]] = {}
        self._positions: dict[str, dict[int, list[tuple[int, np.ndarray]]]] = {}
        self._zero_rows: dict[tuple, np.ndarray] = {}
        #: tensor -> axis -> positions along it that are exactly zero (at every index of the other axes)
        self.zero_positions: dict[str, dict[int, np.ndarray]] = {}
        #: tensors exactly zero everywhere, whether or not units reach them (a dead branch's output
        #: through reshapes whose axes the analysis cannot follow: Swin's window reverse)
        self.all_zero: set[str] = set()

    def run(self) -> "ZeroState":
        for node in self.view.nodes:
            rule_for(node).zeros(node, self)
        return self

    # -- reading ------------------------------------------------------------------
    def positions(self, tensor: str) -> dict[int, list[tuple[int, np.ndarray]]]:
        """root -> [(axis, positions)] over the tensor's unit-carrying axes."""
        if tensor in self._positions:
            return self._positions[tensor]
        out: dict[int, list[tuple[int, np.ndarray]]] = {}
        self._positions[tensor] = out
        for axis, layout in self.analysis.layouts.get(tensor, {}).items():
            roots = np.where(layout == NO_UNIT, -1, self.analysis.root_of[np.maximum(layout, 0)])
            for r in np.unique(roots[roots >= 0]).tolist():
                out.setdefault(r, []).append((axis, np.flatnonzero(roots == r)))
        return out

    def zero_set(self, tensor: str) -> set[int]:
        if self.view.is_const(tensor):
            if tensor not in self._const_cache:
                self._const_cache[tensor] = self._const_zero_roots(tensor)
            return self._const_cache[tensor]
        return self.zeros.get(tensor, set())

    def _const_zero_roots(self, name: str) -> set[int]:
        values = self.view.const(name)
        return {
            r for r, places in self.positions(name).items()
            if any(not np.take(values, pos, axis=axis).any() for axis, pos in places)
        }

    def is_zero_const(self, name: str) -> bool:
        values = self.view.const(name)
        return values is not None and not values.any()

    def is_nonzero_const(self, name: str) -> bool:
        values = self.view.const(name)
        return values is not None and bool(np.all(values != 0))

    def entirely_zero(self, tensor: str) -> bool:
        """Every element is zero: some axis is fully covered by zero units."""
        if self.view.is_const(tensor):
            return self.is_zero_const(tensor)
        if tensor in self.all_zero:
            return True
        zero = self.zero_set(tensor)
        for layout in self.analysis.layouts.get(tensor, {}).values():
            if (layout != NO_UNIT).all() and all(int(self.analysis.root_of[u]) in zero for u in layout.tolist()):
                return True
        return False

    # -- rule helpers ---------------------------------------------------------------
    def _set(self, tensor: str, roots: set[int]) -> None:
        if roots:
            self.zeros[tensor] = self.zeros.get(tensor, set()) | roots

    def _layout(self, tensor: str, axis: int) -> np.ndarray | None:
        return self.analysis.layouts.get(tensor, {}).get(axis)

    def set_zero_positions(self, tensor: str, axis: int, mask: np.ndarray | None) -> None:
        """Record the positions of `tensor` along `axis` that are exactly zero; units all of
        whose positions there are among them become zero in `tensor`."""
        layout = self._layout(tensor, axis)
        if mask is None or layout is None or len(mask) != len(layout) or not np.any(mask):
            return
        mask = np.asarray(mask, dtype=bool)
        axes = self.zero_positions.setdefault(tensor, {})
        axes[axis] = mask | axes[axis] if axis in axes else mask
        roots = {r for r, places in self.positions(tensor).items()
                 if any(a == axis and axes[axis][pos].all() for a, pos in places)}
        self._set(tensor, roots)

    def position_zeros(self, tensor: str, axis: int) -> np.ndarray | None:
        """Which positions of `tensor` along `axis` are known to be exactly zero (None: none known)."""
        if self.view.is_const(tensor):
            values = self.view.const(tensor)
            if values is None or axis >= values.ndim:
                return None
            return ~np.moveaxis(values != 0, axis, 0).reshape(values.shape[axis], -1).any(axis=1)
        known = self.zero_positions.get(tensor, {}).get(axis)
        if known is not None:
            return known
        layout = self._layout(tensor, axis)
        zero = self.zero_set(tensor)
        if layout is None or not zero:
            return None
        roots = np.where(layout == NO_UNIT, -1, self.analysis.root_of[np.maximum(layout, 0)])
        return np.isin(roots, list(zero))

    def carry_positions(self, src: str, src_axis: int, dst: str, dst_axis: int, index=None) -> None:
        """dst's positions along dst_axis are src's along src_axis (picked by `index`, a slice or
        an index array, when dst holds a part of them: Split, Slice)."""
        mask = self.position_zeros(src, src_axis)
        if mask is not None:
            self.set_zero_positions(dst, dst_axis, mask if index is None else mask[index])

    def _same_positions(self, node: onnx.NodeProto, names: list[str]) -> None:
        """Carry position masks to every output axis whose layout is the one an input has
        (the positions are the same ones: Reshape of other axes, Transpose, Relu...)."""
        for out in node.output:
            for axis, layout in self.analysis.layouts.get(out, {}).items():
                masks = [self.position_zeros(n, a) for n in names
                         for a, l in self.analysis.layouts.get(n, {}).items()
                         if len(l) == len(layout) and np.array_equal(l, layout)]
                if masks and all(m is not None for m in masks):
                    self.set_zero_positions(out, axis, np.logical_and.reduce(masks))

    def pass_through(self, node: onnx.NodeProto, inputs: list[int] | None = None) -> None:
        """Zero in the output where zero in every (selected) input carrying the unit."""
        names = [node.input[i] for i in (inputs if inputs is not None else range(len(node.input)))
                 if i < len(node.input) and node.input[i]]
        carried = [(set(self.positions(n)), self.zero_set(n)) for n in names if self.analysis.layouts.get(n)]
        for out in node.output:
            if not out:
                continue
            result = set()
            for r in self.positions(out):
                having = [zeros for roots, zeros in carried if r in roots]
                if having and all(r in zeros for zeros in having):
                    result.add(r)
            self._set(out, result)
        self._same_positions(node, names)
        # float inputs computed at run time (a constant is a Clip bound or Resize scales), Concat's all
        data = [n for n in names if self._is_float(n) and (node.op_type == "Concat" or not self.view.is_const(n))]
        if data and all(self.entirely_zero(n) for n in data):
            self.all_zero.update(o for o in node.output if o)

    def _is_float(self, tensor: str) -> bool:
        """Data, not a shape, an index or a mask."""
        entry = self.view.shapes.get(tensor)
        if entry is None or not entry[0]:
            return False
        return onnx.helper.tensor_dtype_to_np_dtype(entry[0]).kind in "fc"

    def combine(self, node: onnx.NodeProto, need_all: bool) -> None:
        """Add-like (zero where every input is zero) or Mul-like (where any is)."""
        out = node.output[0]
        names = [n for n in node.input if n]
        info = [(n, set(self.positions(n)), self.zero_set(n), self.is_zero_const(n)) for n in names]
        result = set()
        for r in self.positions(out):
            zero_here = [allzero or (r in roots and r in zeros) for _, roots, zeros, allzero in info]
            if (all(zero_here) if need_all else any(zero_here)):
                result.add(r)
        self._set(out, result)
        self._combine_positions(node, names, need_all)
        whole = [self.entirely_zero(n) for n in names]
        if whole and (all(whole) if need_all else any(whole)):
            self.all_zero.add(out)

    def _combine_positions(self, node: onnx.NodeProto, names: list[str], need_all: bool) -> None:
        """Position masks through a broadcasting Add (zero where every input is) or Mul (where any
        is): a fused projection's bias Add keeps the zero columns of its weight."""
        out = node.output[0]
        rank = self.view.rank(out)
        if rank is None:
            return
        for axis in self.analysis.layouts.get(out, {}):
            masks = []
            for n in names:
                n_rank = self.view.rank(n)
                n_axis = axis - (rank - n_rank) if n_rank is not None else -1
                size = self.view.dim(n, n_axis) if n_axis >= 0 else 1
                if size == 1:  # broadcast along the axis: zero everywhere or nowhere
                    whole = self.entirely_zero(n)
                    masks.append(np.full(len(self.analysis.layouts[out][axis]), whole))
                else:
                    masks.append(self.position_zeros(n, n_axis))
            if need_all and all(m is not None for m in masks):
                self.set_zero_positions(out, axis, np.logical_and.reduce(masks))
            elif not need_all and any(m is not None for m in masks):
                self.set_zero_positions(out, axis, np.logical_or.reduce([m for m in masks if m is not None]))

    def product_zeros(self, node: onnx.NodeProto, contracted: dict[str, int]) -> None:
        """A product of two run-time tensors (MatMul): an output unit is zero where it is
        zero in either operand on an axis that is not summed over."""
        out = node.output[0]
        result = set()
        for r in self.positions(out):
            for name, k_axis in contracted.items():
                places = self.positions(name).get(r, [])
                if places and r in self.zero_set(name) and all(axis != k_axis for axis, _ in places):
                    result.add(r)
                    break
        self._set(out, result)

    def clip_keeps_zero(self, node: onnx.NodeProto) -> bool:
        lo = self.view.attr(node, "min")
        hi = self.view.attr(node, "max")
        if lo is None and self.view.has_input(node, 1):
            v = self.view.const_input(node, 1)
            lo = None if v is None else float(v)
            if v is None:
                return False
        if hi is None and self.view.has_input(node, 2):
            v = self.view.const_input(node, 2)
            hi = None if v is None else float(v)
            if v is None:
                return False
        return (lo is None or lo <= 0.0) and (hi is None or hi >= 0.0)

    def _slices(self, node, roles):
        return [p for p in self.analysis.state.params if p.node == node.name and p.role in roles]

    def _live_columns(self, node) -> dict[str, tuple[int, np.ndarray]]:
        """weight tensor -> (input axis, mask of input positions that are not provably zero)."""
        live = {}
        uses = [s for s in self.analysis.state.sinks if s.node == node.name]
        for p in self._slices(node, {"weight_in"}):
            for use in uses:
                layout = self.analysis.layouts[use.tensor][use.axis]
                if len(layout) != len(self.analysis.layouts[p.tensor][p.axis]):
                    continue  # grouped conv: columns are per group, keep it simple
                roots = np.where(layout == NO_UNIT, -1, self.analysis.root_of[np.maximum(layout, 0)])
                live[p.tensor] = (p.axis, ~np.isin(roots, list(self.zero_set(use.tensor))))
        return live

    def _zero_positions(self, tensor: str, axis: int, live: tuple[int, np.ndarray] | None) -> np.ndarray:
        """Per position along `axis`: is its whole slice zero (ignoring dead input columns)?

        Computed once per weight: decoding a large weight per unit would be quadratic.
        """
        key = (tensor, axis, None if live is None else (live[0], live[1].tobytes()))
        if key not in self._zero_rows:
            values = self.view.weight(tensor)  # integers are zero where they equal the zero point
            if live is not None:
                values = np.compress(live[1], values, axis=live[0])
            nonzero = np.moveaxis(values != 0, axis, 0).reshape(values.shape[axis], -1).any(axis=1)
            self._zero_rows[key] = ~nonzero
        return self._zero_rows[key]

    def _all_zero_at(self, slices, root: int, live=None) -> bool:
        """Every position of `root` in every slice is zero (ignoring dead input columns)."""
        for p in slices:
            places = [pos for axis, pos in self.positions(p.tensor).get(root, []) if axis == p.axis]
            if not places:
                return False
            zero = self._zero_positions(p.tensor, p.axis, (live or {}).get(p.tensor))
            if not zero[places[0]].all():
                return False
        return True

    def source_zeros(self, node: onnx.NodeProto, alpha_beta: bool = False) -> None:
        """An output unit is zero if its weights (over non-zero inputs) and its bias are zero,
        or, for units passed through (depthwise), if its input and bias are zero."""
        out = node.output[0]
        weights = self._slices(node, {"weight_out"})
        biases = self._slices(node, {"bias"})
        if alpha_beta and float(self.view.attr(node, "beta", 1.0)) == 0.0:
            biases = []
        x = next((i for i in node.input[:2] if i and not self.view.is_const(i)), node.input[0])
        x_zero = self.zero_set(x)
        live = self._live_columns(node)
        result = set()
        for r in self.positions(out):
            produced_zero = r in x_zero or (bool(weights) and self._all_zero_at(weights, r, live))
            if produced_zero and (not biases or self._all_zero_at(biases, r)):
                result.add(r)
        self._set(out, result)
        self._source_positions(out, weights, biases, live)

    def _source_positions(self, out: str, weights, biases, live) -> None:
        """Output positions whose weights (over live inputs) and bias are zero, along the axis whose
        layout the weight's output axis shares position for position."""
        if not weights:
            return
        for axis, layout in self.analysis.layouts.get(out, {}).items():
            masks = []
            for p in list(weights) + list(biases):
                p_layout = self._layout(p.tensor, p.axis)
                if p_layout is None or len(p_layout) != len(layout) or not np.array_equal(p_layout, layout):
                    break
                masks.append(self._zero_positions(p.tensor, p.axis, (live or {}).get(p.tensor)
                                                  if p in weights else None))
            else:
                self.set_zero_positions(out, axis, np.logical_and.reduce(masks))

    def batchnorm_zeros(self, node: onnx.NodeProto) -> None:
        """y = gamma (x - mean) / sqrt(var + eps) + beta is exactly 0 when
        beta = 0 and either gamma = 0, or x = 0 and mean = 0."""
        self._affine_norm_zeros(node, scale=1, bias=2, mean=3)

    def instancenorm_zeros(self, node: onnx.NodeProto) -> None:
        self._affine_norm_zeros(node, scale=1, bias=2, mean=None)

    def _affine_norm_zeros(self, node, scale: int, bias: int, mean: int | None) -> None:
        x, y = node.input[0], node.output[0]
        x_zero = self.zero_set(x)
        result = set()
        for r, places in self.positions(y).items():
            pos = next((p for a, p in places if a == 1), None)
            if pos is None:
                continue

            def zero(index):
                values = self.view.const_input(node, index)
                return values is not None and not np.take(values, pos).any()

            if not zero(bias):
                continue
            if zero(scale) or (r in x_zero and (mean is None or zero(mean))):
                result.add(r)
        self._set(y, result)
