"""Fast FLOP and parameter estimates for a candidate removal.

Targets such as "remove 50% of FLOPs" need many candidate plans evaluated.
Re-running shape inference for each would be slow; instead every node's dense
cost is scaled by the kept fraction of the unit-carrying axes that drive it
(the weight's axes for linear ops, the output's axes otherwise), which is exact
for Conv/Gemm/MatMul, LSTM/GRU/RNN (W's and R's shares apart) and elementwise ops.
"""
from __future__ import annotations

import numpy as np

from onnxprune.analysis import Analysis
from onnxprune.analysis.units import NO_UNIT
from onnxprune.cost import LINEAR_OPS, RECURRENT_OPS, ModelCost, linear_operands


class CostEstimator:
    def __init__(self, analysis: Analysis, cost: ModelCost):
        self.analysis = analysis
        self._slots: dict[tuple[str, int], int] = {}
        self._slot_roots: list[np.ndarray] = []
        self._sentinel = len(analysis.root_of)
        view = analysis.view
        by_node = cost.by_node()
        self.node_terms: list[tuple[float, list[int]]] = []
        for node in view.nodes:
            c = by_node.get(node.name)
            if c is None or c.flops == 0:
                continue
            if node.op_type in RECURRENT_OPS:
                self.node_terms.extend(self._recurrent_terms(node, float(c.flops)))
                continue
            self.node_terms.append((float(c.flops), self._node_slots(node)))
        self.param_terms: list[tuple[float, list[int]]] = []
        for name, t in view.initializers.items():
            numel = float(np.prod(t.dims, dtype=np.float64))
            self.param_terms.append((numel, [self._slot(name, a) for a in analysis.layouts.get(name, {})]))
        self._flat = None  # the slots' roots end to end, built at the first estimate
        self.dense_flops = sum(f for f, _ in self.node_terms)
        self.dense_params = sum(p for p, _ in self.param_terms)

    def _slot(self, tensor: str, axis: int) -> int:
        key = (tensor, axis)
        if key not in self._slots:
            layout = self.analysis.layouts[tensor][axis]
            roots = np.where(layout == NO_UNIT, self._sentinel, self.analysis.root_of[np.maximum(layout, 0)])
            self._slots[key] = len(self._slot_roots)
            self._slot_roots.append(roots)
        return self._slots[key]

    def _recurrent_terms(self, node, flops: float) -> list[tuple[float, list[int]]]:
        """W's and R's shares of an LSTM/GRU/RNN, each scaled by its own axes: W by hidden x input,
        R by hidden x hidden (it shrinks on both)."""
        view, layouts = self.analysis.view, self.analysis.layouts
        weights = [n for n in node.input[1:3] if view.is_const(n)]
        sizes = [float(np.prod(view.initializers[n].dims, dtype=np.float64)) for n in weights]
        total = sum(sizes)
        return [(flops * size / total, [self._slot(n, a) for a in layouts.get(n, {})])
                for n, size in zip(weights, sizes) if total]

    def _node_slots(self, node) -> list[int]:
        layouts = self.analysis.layouts
        view = self.analysis.view
        if node.op_type in LINEAR_OPS:
            weights = [i for i in linear_operands(node) if i and view.is_const(i)]
            if weights:
                return [self._slot(weights[0], a) for a in layouts.get(weights[0], {})]
            slots = [self._slot(node.output[0], a) for a in layouts.get(node.output[0], {})]
            a = node.input[0]
            k = (view.rank(a) or 1) - 1
            if k in layouts.get(a, {}):
                slots.append(self._slot(a, k))
            return slots
        out = node.output[0]
        return [self._slot(out, a) for a in layouts.get(out, {})]

    def _fractions(self, removed: np.ndarray) -> np.ndarray:
        """Kept fraction of every slot: the mean of its positions' keep flags, as a count over a length
        (the same float64 division numpy's mean of booleans does)."""
        if self._flat is None:
            self._prepare()
        keep = ~np.append(removed, False)  # sentinel (NO_UNIT) always kept
        kept = np.concatenate(([0], np.cumsum(keep[self._flat], dtype=np.int64)))
        with np.errstate(invalid="ignore", divide="ignore"):  # an empty slot: nan, as the mean of nothing
            return (kept[self._ends] - kept[self._starts]) / self._lengths

    def _prepare(self) -> None:
        lengths = np.array([len(r) for r in self._slot_roots], dtype=np.int64)
        self._ends = np.cumsum(lengths)
        self._starts = self._ends - lengths
        self._lengths = lengths
        self._flat = np.concatenate(self._slot_roots) if self._slot_roots else np.zeros(0, dtype=np.int64)
        self._flop_products = _Products(self.node_terms)
        self._param_products = _Products(self.param_terms)

    def saving_per_unit(self, group) -> tuple[float, float]:
        """(FLOPs, parameters) one unit of `group` saves when it goes alone, as fractions of the dense model's
        (measured by removing half the group: a group's own terms shrink linearly)."""
        half = max(1, group.size // 2)
        removed = np.zeros(len(self.analysis.root_of), dtype=bool)
        removed[group.roots[:half]] = True
        flops, params = self.estimate(removed)
        return ((1.0 - flops / self.dense_flops) / half if self.dense_flops > 0 else 0.0,
                (1.0 - params / self.dense_params) / half if self.dense_params > 0 else 0.0)

    def estimate(self, removed: np.ndarray) -> tuple[float, float]:
        """(flops, params) after removing the roots flagged in `removed`."""
        frac = self._fractions(removed)
        return self._flop_products.total(frac), self._param_products.total(frac)


class _Products:
    """sum(f * prod(frac[slots]) for f, slots in terms), vectorised over the terms but rounded exactly as
    that loop rounds: each product multiplies its slots' fractions left to right (np.prod's order), is
    then scaled by f, and the terms are added one after another in their order."""

    def __init__(self, terms: list[tuple[float, list[int]]]):
        self.size = len(terms)
        self.factors = np.array([f for f, _ in terms], dtype=np.float64)
        by_length: dict[int, list[int]] = {}
        for i, (_, slots) in enumerate(terms):
            by_length.setdefault(len(slots), []).append(i)
        self.parts = []
        for length, rows in by_length.items():
            rows_arr = np.array(rows, dtype=np.int64)
            slots = np.array([terms[i][1] for i in rows], dtype=np.int64).reshape(len(rows), length)
            self.parts.append((rows_arr, slots))

    def total(self, frac: np.ndarray) -> float:
        values = np.empty(self.size, dtype=np.float64)
        for rows, slots in self.parts:
            if slots.shape[1] == 0:
                values[rows] = self.factors[rows]  # np.prod of nothing is 1.0
                continue
            product = frac[slots[:, 0]]
            for k in range(1, slots.shape[1]):
                product = product * frac[slots[:, k]]
            values[rows] = self.factors[rows] * product
        total = 0.0
        for v in values.tolist():  # one after another: np.sum's pairwise sum would round differently
            total += v
        return total
