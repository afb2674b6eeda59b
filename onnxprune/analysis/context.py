"""The state rules write into while the graph is walked in topological order.

Rules call the small vocabulary below (`layout`, `set_layout`, `fresh`, `param`,
`sink`, `couple`, `block`, `inexact`); they never touch the union-find directly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.analysis.units import NO_UNIT, UnitTable
from onnxprune.ir.graph_view import GraphView
from onnxprune.ir.quant import Quantization


@dataclass(frozen=True)
class Source:
    """A node output axis that opens new units (Conv output channels...)."""

    node: str
    op_type: str
    tensor: str
    axis: int
    #: a fill (ConstantOfShape) whose units only follow what they meet: never a group, never a group's name
    passive: bool = False


@dataclass(frozen=True)
class ParamSlice:
    """An initializer axis sliced together with some units."""

    tensor: str
    axis: int
    node: str
    role: str  # weight_out, weight_in, recurrent_in, bias, bn_scale, bn_bias, bn_stats, constant, quant_scale,
    #            quant_zero_point (of a weight or activation quantized per channel)


@dataclass(frozen=True)
class SinkUse:
    """An activation axis consumed by an op that mixes positions (Conv input channels...)."""

    tensor: str
    axis: int
    node: str


@dataclass
class AnalysisState:
    view: GraphView
    units: UnitTable = field(default_factory=UnitTable)
    layouts: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    sources: list[Source] = field(default_factory=list)
    source_units: list[np.ndarray] = field(default_factory=list)
    params: list[ParamSlice] = field(default_factory=list)
    sinks: list[SinkUse] = field(default_factory=list)
    block_reasons: dict[int, list[str]] = field(default_factory=dict)
    inexact_reasons: dict[int, list[str]] = field(default_factory=dict)
    #: (unit, width): a Reshape made `width` positions one unit (hidden -> heads x head_dim)
    splits: list[tuple[int, int]] = field(default_factory=list)
    #: opt-in: let heads reach key-value cache inputs and outputs (past_key_values.* -> present.*): the
    #: model's interface changes (a caller feeds and reads fewer heads), so the pipeline must know
    prune_cache: bool = False
    #: cache graph inputs and outputs that carry units: tensor -> the axis (the heads')
    cache_inputs: dict[str, int] = field(default_factory=dict)
    cache_outputs: dict[str, int] = field(default_factory=dict)
    #: grouped-query attention by slot: unit -> the kv groups each of its query heads is one of
    query_slots: dict[int, int] = field(default_factory=dict)
    #: grouped-query attention by slot: units of the KV heads, which stay (counted with the slots' group)
    slot_kv_units: set[int] = field(default_factory=set)
    #: attention ops that state what a unit holds: unit -> (query heads, KV heads) in it (GroupQueryAttention's
    #: KV group: counting head_dim blocks per source would take a packed QKV projection's q+k+v for query heads)
    unit_heads: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: opt-in: prune the hidden (residual-stream) width through norms and reductions (not lossless)
    hidden_width: bool = False
    hidden_units: set[int] = field(default_factory=set)
    #: tensor -> why its channels cannot change (read inside a subgraph); later layouts on it block too
    frozen: dict[str, str] = field(default_factory=dict)

    #: initializers several nodes read (analysis/shared.py), and while a rule runs (`reader`),
    #: (tensor, axis) -> the nodes whose rule read or sliced that axis of one of them
    shared_constants: set[str] = field(default_factory=set)
    shared_uses: dict[tuple[str, int], set[str]] = field(default_factory=dict)
    reader: str | None = None

    # -- reading -------------------------------------------------------------
    def layouts_of(self, tensor: str) -> dict[int, np.ndarray]:
        axes = self.layouts.get(tensor, {})
        if tensor in self.shared_constants:
            for axis in axes:
                self._took(tensor, axis)
        return axes

    def layout(self, tensor: str, axis: int) -> np.ndarray | None:
        found = self.layouts.get(tensor, {}).get(axis)
        if found is not None and tensor in self.shared_constants:
            self._took(tensor, axis)
        return found

    def _took(self, tensor: str, axis: int) -> None:
        if self.reader is not None:
            self.shared_uses.setdefault((tensor, axis), set()).add(self.reader)

    # -- writing -------------------------------------------------------------
    def fresh(self, node: onnx.NodeProto, tensor: str, axis: int, count: int, passive: bool = False) -> np.ndarray:
        """Open `count` new units for (tensor, axis), created by `node` (passive: see Source)."""
        self.sources.append(Source(node.name, node.op_type, tensor, axis, passive))
        units = self.units.new(count, len(self.sources) - 1)
        self.source_units.append(units)
        return units

    def set_layout(self, tensor: str, axis: int, layout: np.ndarray) -> None:
        """Attach a layout; a second layout on the same axis couples position-wise."""
        if tensor in self.frozen:  # e.g. a weight sliced by a node after the If whose branch reads it
            self.block(layout, self.frozen[tensor])
        if tensor in self.shared_constants:
            self._took(tensor, axis)
        axes = self.layouts.setdefault(tensor, {})
        if axis in axes:
            layout = self.couple([axes[axis], layout], f"tensor '{tensor}'")
        axes[axis] = np.asarray(layout, dtype=np.int64)

    def couple(self, layouts: list[np.ndarray], where: str) -> np.ndarray:
        """Union equal positions of several layouts of the same length.

        A position that is a unit in one layout but NO_UNIT in another cannot be
        removed (the other side has no way to drop it): that unit is blocked.
        """
        layouts = [np.asarray(l, dtype=np.int64) for l in layouts]
        lengths = {len(l) for l in layouts}
        if len(lengths) != 1:
            for l in layouts:
                self.block(l, f"{where}: coupled axes have different sizes {sorted(lengths)}")
            return layouts[0]
        merged = layouts[0].copy()
        for other in layouts[1:]:
            for i, (a, b) in enumerate(zip(merged.tolist(), other.tolist())):
                if a == b:
                    continue
                if a == NO_UNIT or b == NO_UNIT:
                    unit = b if a == NO_UNIT else a
                    self._block_unit(unit, f"{where}: a channel it is coupled with cannot be pruned")
                    merged[i] = unit
                else:
                    self.units.union(a, b)
        return merged

    def union_positions(self, layout: np.ndarray, classes: np.ndarray, where: str) -> np.ndarray:
        """Coarsen: positions with the same class id must share one unit."""
        first: dict[int, int] = {}
        for u, c in zip(layout.tolist(), classes.tolist()):
            if c in first:
                a = first[c]
                if (a == NO_UNIT) != (u == NO_UNIT):
                    unit = a if u == NO_UNIT else u
                    self._block_unit(unit, f"{where}: coarsened together with an unprunable channel")
                elif u != NO_UNIT:
                    self.units.union(a, u)
            else:
                first[c] = u
        return layout

    def through_statistics(self, layout: np.ndarray | None, reason: str) -> bool:
        """Units on an axis a norm or reduction computes statistics over: with hidden_width
        they may go (inexact, their group is the hidden width), otherwise they are blocked."""
        if layout is None:
            return False
        if not self.hidden_width:
            self.block(layout, reason + " (hidden width is opt-in: --prune-hidden; not lossless)")
            return False
        self.inexact(layout, reason)
        self.hidden_units.update(int(u) for u in np.asarray(layout).tolist() if u != NO_UNIT)
        return True

    def note_split(self, units: np.ndarray, width: int) -> None:
        """Record that each of `units` now stands for a block of `width` positions (a head)."""
        self.splits.extend((int(u), width) for u in np.asarray(units).tolist() if u != NO_UNIT)

    def param(self, node: onnx.NodeProto, index: int, axis: int, layout: np.ndarray, role: str) -> bool:
        """Slice input `index` of `node` (must be an initializer) with `layout` on `axis`."""
        name = node.input[index] if index < len(node.input) else ""
        if not name:
            return True
        if not self.view.is_const(name):
            self.block(layout, f"{node.op_type} '{node.name}': input '{name}' is computed at run time, not a constant weight")
            return False
        quantized = self.view.dequantized.get(name)
        if quantized is not None:
            return self._param_quantized(node, name, quantized, axis, layout, role)
        self.set_layout(name, axis, layout)
        self.params.append(ParamSlice(name, axis, node.name, role))
        return True

    def _param_quantized(self, node: onnx.NodeProto, name: str, q: Quantization, axis: int,
                         layout: np.ndarray, role: str) -> bool:
        """A weight stored as integers behind a DequantizeLinear (QDQ): the integers are sliced in
        its place (they keep the role: criteria read them dequantized), and so are the scale and
        zero point when they run along `axis` (per-channel); a per-tensor scale stays."""
        extra, why = q.sliced_with(self.view, axis)
        if why is not None:
            self.block(layout, f"{node.op_type} '{node.name}' reads its weight through DequantizeLinear "
                               f"'{q.node.name}': {why}")
            return False
        self.set_layout(name, axis, layout)
        reader, self.reader = self.reader, q.node.name  # the DequantizeLinear is what reads the integers
        try:
            self.set_layout(q.data, axis, layout)
            for tensor, tensor_axis in extra:
                self.set_layout(tensor, tensor_axis, layout)
        finally:
            self.reader = reader
        self.params.append(ParamSlice(q.data, axis, node.name, role))
        self.params.extend(ParamSlice(t, a, q.node.name, "quant_scale" if t == q.scale else "quant_zero_point")
                           for t, a in extra)
        return True

    def sink(self, node: onnx.NodeProto, tensor: str, axis: int) -> None:
        self.sinks.append(SinkUse(tensor, axis, node.name))

    def block(self, layout: np.ndarray | None, reason: str) -> None:
        if layout is None:
            return
        for u in set(np.asarray(layout).tolist()):
            if u != NO_UNIT:
                self._block_unit(u, reason)

    def block_tensor(self, tensor: str, reason: str) -> None:
        for layout in self.layouts_of(tensor).values():
            self.block(layout, reason)

    def freeze(self, tensor: str, reason: str) -> None:
        """No channel of `tensor` may go, whenever its layouts are attached (now or later in the walk)."""
        self.frozen.setdefault(tensor, reason)
        self.block_tensor(tensor, reason)

    def _block_unit(self, unit: int, reason: str) -> None:
        reasons = self.block_reasons.setdefault(unit, [])
        if reason not in reasons:
            reasons.append(reason)

    def inexact(self, layout: np.ndarray | None, reason: str) -> None:
        """Pruning these units is valid but changes other channels' values (LRN...)."""
        if layout is None:
            return
        for u in set(np.asarray(layout).tolist()):
            if u != NO_UNIT:
                self.inexact_reasons.setdefault(u, [])
                if reason not in self.inexact_reasons[u]:
                    self.inexact_reasons[u].append(reason)
