"""The QOperator format, as onnxruntime's quantize_static(..., quant_format=QuantFormat.QOperator)
writes it: integer ops that read int8/uint8 activations, each with one scale and zero point, and
write their output requantized, between a QuantizeLinear at the input and a DequantizeLinear at
the output (those two are quantized.py's).

* QLinearConv, QLinearMatMul and QGemm (com.microsoft) are sources and sinks like Conv, MatMul
  and Gemm.  The weight's integers go with the units, so do its scale and zero point when they
  hold one value per output channel (one value for the whole tensor stays), and so does the
  int32 bias.
* QLinearAdd and QLinearMul (com.microsoft) broadcast like Add and Mul: a constant operand's
  integers are sliced with the units (its scale is one number).
* QLinearConcat (com.microsoft) is Concat over its tensors, which it interleaves with their
  scales and zero points.
* QLinearSigmoid and QLinearLeakyRelu (com.microsoft) are elementwise; QLinearGlobalAveragePool
  and QLinearAveragePool (com.microsoft) pool like their float ops, channels first or last
  (`channels_last`).

An activation's scale and zero point are one number (the ops' specs say so; where one is not,
the units it meets are blocked with the reason), so they never change.

Where units are consumed: a channel removed from an integer activation cannot be masked by a
float Mul, so the integer ops record it on the float tensor before the QuantizeLinear that starts
the integer chain (quantized.consume_quantized), and nowhere when there is none.  Criteria read
the weights dequantized (onnxprune.ir.quant); lossless mode and the data-aware criteria, which
work from those sinks, see no unit that only integer ops consume.
"""
from __future__ import annotations

from onnxprune.analysis.rules.base import register
from onnxprune.analysis.rules.broadcast import Broadcast
from onnxprune.analysis.rules.concat import ConcatRule
from onnxprune.analysis.rules.conv import ConvLike
from onnxprune.analysis.rules.elementwise import Unary
from onnxprune.analysis.rules.linear import GemmRule
from onnxprune.analysis.rules.pooling import SpatialOp
from onnxprune.analysis.rules.quantized import IntegerMatMul, numel, consume_quantized, slice_per_unit

MS = "com.microsoft."
# a weight's scale and zero point, sliced with the output units when they hold one value per unit
WEIGHT_PARAMS = ((4, "quant_scale"), (5, "quant_zero_point"))


@register("QLinearConv")
class QLinearConvRule(ConvLike):
    """x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, B (int32)."""

    weight_index, bias_index = 3, 8

    def consume(self, s, node, tensor, axis):
        consume_quantized(s, node, tensor, axis)

    def propagate(self, node, s):
        super().propagate(node, s)
        slice_per_unit(s, node, s.layout(node.output[0], 1), WEIGHT_PARAMS)


@register("QLinearMatMul")
class QLinearMatMulRule(IntegerMatMul):
    """a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point."""

    weight_index = 3
    column_params = WEIGHT_PARAMS
    row_params = (1, 2)


@register(MS + "QGemm")
class QGemmRule(GemmRule):
    """A, a_scale, a_zero_point, B, b_scale, b_zero_point, C (int32), y_scale, y_zero_point (without
    y_scale the output is float)."""

    weight_index, bias_index = 3, 6

    def consume(self, s, node, tensor, axis):
        consume_quantized(s, node, tensor, axis)

    def propagate(self, node, s):
        super().propagate(node, s)
        if s.view.const_input(node, 3) is not None:
            slice_per_unit(s, node, s.layout(node.output[0], 1), WEIGHT_PARAMS)


@register(MS + "QLinearAdd", MS + "QLinearMul")
class QLinearBinaryRule(Broadcast):
    """A, A_scale, A_zero_point, B, B_scale, B_zero_point, C_scale, C_zero_point: the scales and zero
    points are scalars, which broadcasting skips; A and B couple like Add's and Mul's inputs."""

    def propagate(self, node, s):
        wide = [n for i, n in enumerate(node.input) if n and i not in (0, 3) and numel(s.view.shape(n)) != 1]
        if wide:
            for name in (node.input[0], node.input[3]):
                s.block_tensor(name, f"{node.op_type} '{node.name}': its scale or zero point '{wide[0]}' "
                                     "is not one number")
            return
        super().propagate(node, s)


@register(MS + "QLinearConcat")
class QLinearConcatRule(ConcatRule):
    """Y_scale, Y_zero_point, then (X, X_scale, X_zero_point) for every tensor joined."""

    @staticmethod
    def data_inputs(node) -> list[str]:
        return [n for n in node.input[2::3] if n]

    def zeros(self, node, z):
        z.pass_through(node, inputs=list(range(2, len(node.input), 3)))


@register(MS + "QLinearSigmoid")
class QLinearSigmoidRule(Unary):
    """X, X_scale, X_zero_point, Y_scale, Y_zero_point."""


@register(MS + "QLinearLeakyRelu")
class QLinearLeakyReluRule(Unary):
    """X, X_scale, X_zero_point, Y_scale, Y_zero_point: f(0) = 0, and 0 is the zero point on both sides."""

    preserves_zeros = True

    def zeros(self, node, z):
        z.pass_through(node, inputs=[0])


@register(MS + "QLinearGlobalAveragePool", MS + "QLinearAveragePool")
class QLinearPoolRule(SpatialOp):
    """X, x_scale, x_zero_point, y_scale, y_zero_point; channels on axis 1, or last with channels_last."""

    def kept_axes(self, node, s, rank):
        return {0, rank - 1} if int(s.view.attr(node, "channels_last", 0)) else {0, 1}

    def zeros(self, node, z):
        z.pass_through(node, inputs=[0])

