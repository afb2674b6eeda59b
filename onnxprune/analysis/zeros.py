"""Which units are provably all-zero in which tensors (for lossless elimination).

Tracked per tensor as a set of unit roots whose every position there is an
exact 0 for every possible input.  Value-creating ops (Conv, Gemm, BN, Add,
Mul...) decide from their parameters; unit-preserving ops (Relu, pooling,
Reshape, Concat...) carry zeros through; every other op forgets them.
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
        zero = self.zero_set(tensor)
        for layout in self.analysis.layouts.get(tensor, {}).values():
            if (layout != NO_UNIT).all() and all(int(self.analysis.root_of[u]) in zero for u in layout.tolist()):
                return True
        return False

    # -- rule helpers ---------------------------------------------------------------
    def _set(self, tensor: str, roots: set[int]) -> None:
        if roots:
            self.zeros[tensor] = roots

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
