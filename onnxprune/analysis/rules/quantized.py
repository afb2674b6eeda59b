"""Quantized graphs: QDQ (QuantizeLinear/DequantizeLinear around float ops), dynamic
quantization (DynamicQuantizeLinear + MatMulInteger/ConvInteger) and weight-only MatMulNBits.
(The QOperator format's integer ops are qoperator.py's; the int8 DynamicQuantizeLSTM, recurrent.py's.)

Weights stay integers.  A DequantizeLinear of constants is a weight (GraphView.dequantized):
the float op after it slices it like any weight, and AnalysisState.param slices the integers
and, when per-channel along the sliced axis, the scale and zero point.  Activation
QuantizeLinear/DequantizeLinear are elementwise: units pass, a per-channel scale and zero
point are sliced with them.

Integer ops (MatMulInteger, ConvInteger) read their input as integers, where a removed
channel cannot be masked by a float Mul; they record the channels as consumed on the float
tensor before its QuantizeLinear or DynamicQuantizeLinear.  A zero there quantizes to the
zero point exactly, and DynamicQuantizeLinear's range always includes 0, so masking it
leaves every other value bit-identical, which is what removal does.
"""
from __future__ import annotations

import numpy as np

from onnxprune.analysis.context import SinkUse
from onnxprune.analysis.rules.base import Rule, identity_map, pass_axes, register
from onnxprune.analysis.rules.conv import ConvLike
from onnxprune.ir.quant import NBitsLayout, nbits_layout, quantization

# quantizers whose float input is where an integer op's channels are masked (see the module docstring)
QUANTIZERS = ("QuantizeLinear", "DynamicQuantizeLinear")


def consume_quantized(s, node, tensor: str, axis: int) -> None:
    """Record (tensor, axis), read as integers by `node`, as consumed on the float tensor its
    quantizer reads; without a quantizer in front (integers from elsewhere) there is nothing to
    mask and no statistic to read, so no sink is recorded (removal stays valid)."""
    producer = s.view.producer.get(tensor)
    if producer is None or producer.op_type not in QUANTIZERS or producer.output[0] != tensor:
        return
    use = SinkUse(producer.input[0], axis, producer.name)
    if use not in s.sinks:  # one DynamicQuantizeLinear often feeds Q, K and V
        s.sinks.append(use)


@register("QuantizeLinear", "DequantizeLinear", "com.microsoft.QuantizeLinear", "com.microsoft.DequantizeLinear")
class QuantizeDequantizeRule(Rule):
    """Elementwise on activations; 0 quantizes to the zero point and the zero point dequantizes
    to 0, so a dead channel stays dead through a Q/DQ pair."""

    preserves_zeros = True

    def propagate(self, node, s):
        x, y = node.input[0], node.output[0]
        if s.view.is_const(x):
            return  # a stored weight: its reader slices it, and the integers with it (AnalysisState.param)
        q = quantization(s.view, node)
        if q is None:
            s.block_tensor(x, f"{node.op_type} '{node.name}': the shape of '{x}' is unknown")
            return
        for axis, layout in s.layouts_of(x).items():
            extra, why = q.sliced_with(s.view, axis)
            if why is not None:
                s.block(layout, f"{node.op_type} '{node.name}': {why}")
                continue
            for tensor, tensor_axis in extra:  # per-channel activation quantization: one scale per channel
                index = list(node.input).index(tensor)
                s.param(node, index, tensor_axis, layout, "quant_scale" if index == 1 else "quant_zero_point")
            s.set_layout(y, axis, layout)

    def zeros(self, node, z):
        if not z.view.is_const(node.input[0]):
            z.pass_through(node, inputs=[0])


@register("DynamicQuantizeLinear")
class DynamicQuantizeRule(Rule):
    """Elementwise into its integer output; the scale and zero point (scalars) carry no units."""

    preserves_zeros = True

    def propagate(self, node, s):
        pass_axes(s, node, node.input[0], node.output[0], identity_map(s.view.rank(node.input[0])))

    def zeros(self, node, z):
        z.pass_through(node, inputs=[0])


class IntegerMatMul(Rule):
    """A [.., K] x B [K, N] with B constant integers: K consumed, N new units.  Subclasses give the
    input index of B, of the parameters that may run along its columns (one per column: sliced with
    N), and of A's parameters, which may run along A's rows (those rows then cannot move)."""

    weight_index = 1
    column_params: tuple[tuple[int, str], ...] = ()  # (input index, role)
    row_params: tuple[int, ...] = ()

    def propagate(self, node, s):
        a, b, y = node.input[0], node.input[self.weight_index], node.output[0]
        where = f"{node.op_type} '{node.name}'"
        ra, rb, ry = s.view.rank(a), s.view.rank(b), s.view.rank(y)
        if not s.view.is_const(b):
            why = "its weight is computed at run time"
        elif ra is None or ry is None:
            why = "the rank of its input or output is unknown (shape inference stopped before it)"
        elif rb != 2 or ra < 2:
            why = "only a 2-D constant weight and an input of rank 2 or more are handled"
        else:
            why = None
        if why is not None:
            s.block_tensor(a, f"{where}: {why}")
            return
        for axis, layout in s.layouts_of(a).items():
            if axis < ra - 2 or (axis == ra - 2 and self._scalar_row_params(node, s)):
                s.set_layout(y, axis + ry - ra, layout)
            elif axis == ra - 2:
                s.block(layout, f"{where}: the scale or zero point of '{a}' runs along these rows")
        k_layout = s.layout(a, ra - 1)
        if k_layout is not None:
            s.param(node, self.weight_index, 0, k_layout, "weight_in")
            consume_quantized(s, node, a, ra - 1)
        n = s.view.dim(b, 1)
        out = s.fresh(node, y, ry - 1, n)
        s.param(node, self.weight_index, 1, out, "weight_out")
        slice_per_unit(s, node, out, self.column_params)
        s.set_layout(y, ry - 1, out)
        self.follow_column_scale(node, s, out)

    def follow_column_scale(self, node, s, out) -> None:
        """Where the op applies no scale of its own."""

    def _scalar_row_params(self, node, s) -> bool:
        """A may have one zero point (QLinearMatMul: and scale) per row: rows cannot then move without it."""
        return all(numel(s.view.shape(node.input[i])) == 1 for i in self.row_params if s.view.has_input(node, i))

    def zeros(self, node, z):
        z.source_zeros(node)


@register("MatMulInteger")
class MatMulIntegerRule(IntegerMatMul):
    column_params = ((3, "quant_zero_point"),)
    row_params = (2,)

    def follow_column_scale(self, node, s, out):
        """Dynamic quantization applies B's scale after the op: Cast, then Mul by (A's scale x B's
        scale).  Per column, that product [N] is made before the op, where no units were open yet:
        its layout (and the constant column scales') is attached here, so the Mul couples them."""
        for cast, _ in s.view.consumers.get(node.output[0], ()):
            if cast.op_type != "Cast":
                continue
            for mul, _ in s.view.consumers.get(cast.output[0], ()):
                other = next((i for i in mul.input if i != cast.output[0]), "")
                product = s.view.producer.get(other)
                if mul.op_type != "Mul" or product is None or product.op_type != "Mul" \
                        or numel(s.view.shape(other)) != len(out):
                    continue
                for index, name in enumerate(product.input):
                    if s.view.is_const(name) and numel(s.view.shape(name)) == len(out) > 1:
                        s.param(product, index, 0, out, "quant_scale")
                        s.set_layout(other, 0, out)


@register("ConvInteger")
class ConvIntegerRule(ConvLike):
    """Conv on integers: like Conv, with no bias and a per-output-channel weight zero point."""

    bias_index = None

    def consume(self, s, node, tensor, axis):
        consume_quantized(s, node, tensor, axis)

    def propagate(self, node, s):
        super().propagate(node, s)
        slice_per_unit(s, node, s.layout(node.output[0], 1), ((3, "quant_zero_point"),))


def slice_per_unit(s, node, units, params: tuple[tuple[int, str], ...]) -> None:
    """Slice the parameters that hold one value per output unit (a weight's per-channel scale and zero
    point: (input index, role)) with `units`; one value for the whole tensor stays."""
    if units is None:
        return
    for index, role in params:
        if s.view.has_input(node, index) and numel(s.view.shape(node.input[index])) == len(units) > 1:
            s.param(node, index, 0, units, role)


def numel(shape) -> int | None:
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


@register("com.microsoft.MatMulNBits")
class MatMulNBitsRule(Rule):
    """Weight-only low-bit MatMul (B packed [N, blocks, bytes], quantized in blocks of `block_size`
    input features).  Output features are new units: a row of B goes with its scales, zero points
    and bias.  Input features go a whole block at a time (a block shares its scale), and, when
    several blocks share a byte of packed zero points, a whole byte of blocks at a time."""

    def propagate(self, node, s):
        a, y = node.input[0], node.output[0]
        where = f"MatMulNBits '{node.name}'"
        layout = nbits_layout(s.view, node)
        ra, ry = s.view.rank(a), s.view.rank(y)
        why = None
        if layout is None:
            why = "its K, N, bits or block_size attribute is missing or unsupported"
        elif not all(s.view.is_const(i) for i in node.input[1:4] if i) or \
                (s.view.has_input(node, 5) and not s.view.is_const(node.input[5])):
            why = "its packed weight, scales, zero points or bias are computed at run time"
        elif ra is None or ry is None:
            why = "the rank of its input or output is unknown"
        if why is not None:
            s.block_tensor(a, f"{where}: {why}")
            return
        for axis, units in s.layouts_of(a).items():
            if axis < ra - 1:
                s.set_layout(y, axis + ry - ra, units)
        k_units = s.layout(a, ra - 1)
        if k_units is not None:
            if s.view.has_input(node, 4):
                s.block(k_units, f"{where}: its g_idx input reorders the input features across blocks "
                                 "(act-order): a removed feature would leave a hole in a block")
            else:
                per_unit = layout.block_size * self._blocks_per_zero_point_byte(node, s, layout)
                s.union_positions(k_units, np.arange(layout.k) // per_unit, where)
                s.param(node, 1, 1, k_units[::layout.block_size], "weight_in")
                s.sink(node, a, ra - 1)
        out = s.fresh(node, y, ry - 1, layout.n)
        s.param(node, 1, 0, out, "weight_out")
        if s.view.has_input(node, 5):
            s.param(node, 5, 0, out, "bias")
        s.set_layout(y, ry - 1, out)

    @staticmethod
    def _blocks_per_zero_point_byte(node, s, layout: NBitsLayout) -> int:
        zero_points = s.view.const_input(node, 3)
        return layout.per_byte if zero_points is not None and zero_points.dtype == np.uint8 else 1

    def rewrite(self, node, rw):
        """Scales and zero points hold [N, blocks] flattened: sliced here along both; K and N follow."""
        layout = nbits_layout(rw.view, node)
        rows, blocks = rw.mask(node.input[1], 0), rw.mask(node.input[1], 1)
        if layout is None or (rows is None and blocks is None):
            return
        rows = np.ones(layout.n, bool) if rows is None else rows
        blocks = np.ones(layout.blocks, bool) if blocks is None else blocks
        scales = rw.view.const_input(node, 2)
        rw.replace_const_input(node, 2, scales.reshape(layout.n, -1)[rows][:, blocks].reshape(
            (-1,) if scales.ndim == 1 else (int(rows.sum()), -1)))
        zero_points = rw.view.const_input(node, 3)
        if zero_points is not None:
            per_byte = layout.per_byte if zero_points.dtype == np.uint8 else 1
            kept = zero_points.reshape(layout.n, -1)[rows][:, blocks[::per_byte]]  # whole bytes: see propagate
            rw.replace_const_input(node, 3, kept.reshape((-1,) if zero_points.ndim == 1 else (int(rows.sum()), -1)))
        a = node.input[0]
        k_mask = rw.mask(a, rw.view.rank(a) - 1)
        rw.set_attr(node, "K", int(k_mask.sum()) if k_mask is not None else layout.k)
        rw.set_attr(node, "N", int(rows.sum()))

    def zeros(self, node, z):
        z.source_zeros(node)
