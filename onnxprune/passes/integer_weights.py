"""Integer weights as the reconstruction passes read and write them: behind a DequantizeLinear (QDQ) or
read by a QOperator op (QLinearConv, QLinearMatMul, QGemm).

A QDQ model (onnxruntime's `quantize_static` with `QuantFormat.QDQ`) feeds a Conv, Gemm or MatMul
`DequantizeLinear(q, scale, zero_point)` of int8 (or uint8, int16, uint16) integers, per tensor or
per channel; a Conv's or Gemm's bias is `DequantizeLinear(int32, input_scale * weight_scale, 0)`.
A QOperator op takes the same integers, scale and zero point as inputs of its own (`ir.quant.QLinearMixing`
says which), and its int32 bias has no scale input: the op reads it at input scale x weight scale.
Either way the weight (and bias) of a consumer is a `Dequantized`: the node that reads the integers,
and which of its inputs hold them and their scale and zero point (`integer_weights`).

The passes compute on the dequantized float weight and write the result back as integers in the
scheme the tensor had (`ir.quant.IntegerScheme`: same dtype, integer range, axis, symmetric or not),
with the scale recomputed from the new values' range:

* per channel, each row's scale is read by that row alone, and a refit moves rows by different
  amounts (a kept row takes over the removed inputs' share, so it usually grows): kept, the old
  scale would clip a grown row and waste levels on a shrunk one;
* per tensor, the scale is recomputed from the whole tensor's range for the same reason: keeping it
  would clip every refit value past the old range, and the per-layer held-out check judges the
  requantized weights, so a coarser scale is only kept when it does better there.

The int32 bias then follows the new weight scale: a QDQ bias's scale is multiplied by new / old weight
scale (so it stays input_scale * weight_scale, which onnxruntime's int8 kernels assume when they fuse
the DequantizeLinear nodes away), a QOperator bias's follows by itself, and its integers are re-derived
from its float values. The graph keeps its nodes: only initializers change (a scale or zero point other
nodes read too is copied for this one: `GraphEditor.write_const`). What cannot be written that way
(blocks, integers several nodes read, a bias whose scale cannot follow the weight's, a consumer with no
int32 bias to hold a new one) is named by `weight_problem` and `bias_problem`, and the passes skip it
with that reason.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnxprune.calibration.features import Consumer
from onnxprune.ir.editor import GraphEditor
from onnxprune.ir.quant import IntegerScheme, qlinear_mixing, quantize_int32

DEQUANTIZE_DOMAINS = ("", "ai.onnx", "com.microsoft")


@dataclass(frozen=True)
class Dequantized:
    """A constant a node reads as (data - zero point) * scale, each an initializer."""

    node: onnx.NodeProto  # the node reading the integers: a DequantizeLinear, or the QOperator op itself
    data: str
    scale: str  # '' when implied: the product of the `implied` scales (a QOperator bias)
    zero_point: str  # '' when absent (0)
    axis: int | None  # the per-channel axis of `data`, normalised; None: one scale for the tensor
    block_size: int = 0  # > 0: quantized in blocks along `axis`
    slots: tuple[int, int, int] = (0, 1, 2)  # the inputs of `node` holding data, scale and zero point
    value: str = ""  # the float tensor a DequantizeLinear makes; '' when the op dequantizes by itself
    implied: tuple[str, ...] = ()  # a QOperator bias: its scale is input scale x weight scale (these two)


@dataclass(frozen=True)
class IntegerWeights:
    """A consumer's weight and bias as integers; None where it is a float tensor (or there is no bias)."""

    weight: Dequantized | None
    bias: Dequantized | None


def dequantized(edit: GraphEditor, tensor: str) -> Dequantized | None:
    """How `tensor` is made by a DequantizeLinear of initializers, or None when it is not."""
    dq = edit.producer(tensor) if tensor else None
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in DEQUANTIZE_DOMAINS:
        return None
    if len(dq.input) < 2 or not all(edit.is_initializer(i) for i in dq.input if i):
        return None
    data, scale = dq.input[0], dq.input[1]
    zero_point = dq.input[2] if len(dq.input) > 2 else ""
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    rank = len(edit.initializers[data].dims)
    per_tensor = _size(edit, scale) <= 1
    axis = int(attrs.get("axis", 1))
    return Dequantized(dq, data, scale, zero_point, None if per_tensor else axis % max(rank, 1),
                       int(attrs.get("block_size", 0)), value=tensor)


def integer_weights(edit: GraphEditor, c: Consumer, out_axis: int) -> IntegerWeights:
    """Where `c`'s weight and bias are integers, and how they are read (`out_axis`: the weight's
    output axis, along which a QOperator weight has its per-channel scales)."""
    node = edit.get_node(c.node)
    rule = qlinear_mixing(node) if node is not None else None
    if rule is None:  # QDQ, or float
        return IntegerWeights(dequantized(edit, c.weight), dequantized(edit, c.bias) if c.bias else None)
    data, scale, zero_point = (_input(node, i) for i in rule.w)
    per_channel = _size(edit, scale) > 1
    weight = Dequantized(node, data, scale, zero_point, out_axis if per_channel else None, slots=rule.w)
    bias = None
    if c.bias is not None:
        rank = len(edit.initializers[c.bias].dims)
        bias = Dequantized(node, c.bias, "", "", rank - 1 if per_channel else None, slots=(rule.bias, -1, -1),
                           implied=(_input(node, rule.x[1]), scale))
    return IntegerWeights(weight, bias)


def _input(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if index < len(node.input) else ""


def _size(edit: GraphEditor, name: str) -> int:
    return int(np.prod(edit.initializers[name].dims, dtype=np.int64))


def scale_of(edit: GraphEditor, q: Dequantized, weight_scale: np.ndarray | None = None) -> np.ndarray:
    """q's scale; an implied one (input scale x weight scale) with `weight_scale` if given, else the current."""
    if q.scale:
        return edit.value(q.scale)
    input_scale, current = (edit.value(name) for name in q.implied)
    w = current if weight_scale is None else np.asarray(weight_scale)
    return (input_scale.reshape(()) * w).astype(w.dtype)  # in float32, as the kernels multiply them


def real_values(edit: GraphEditor, q: Dequantized) -> np.ndarray:
    """(data - zero point) * scale, as float64."""
    data = edit.value(q.data).astype(np.float64)
    zero = _along(q, edit.value(q.zero_point), data.ndim) if q.zero_point else 0.0
    return (data - zero) * _along(q, scale_of(edit, q), data.ndim)


def _along(q: Dequantized, param: np.ndarray, ndim: int) -> np.ndarray:
    """A scale or zero point shaped to broadcast against q's data (one value, or one per position of q.axis)."""
    param = np.asarray(param, np.float64)
    if q.axis is None:
        return param.reshape(())
    shape = [1] * ndim
    shape[q.axis] = -1
    return param.reshape(shape)


def _scheme(edit: GraphEditor, q: Dequantized) -> IntegerScheme | None:
    data = edit.value(q.data)
    zero = edit.value(q.zero_point) if q.zero_point else np.zeros((), data.dtype)
    return IntegerScheme.of(data, zero, q.axis)


def _dtype_name(edit: GraphEditor, name: str) -> str:
    return onnx.TensorProto.DataType.Name(edit.initializers[name].data_type).lower()


def _where(q: Dequantized) -> str:
    return f"({q.node.op_type} '{q.node.name}')"


def _private(edit: GraphEditor, q: Dequantized) -> str | None:
    """Why `q`'s integers cannot change for one reader: they or what dequantizes them are read by others."""
    readers = max(edit.reader_count(name) for name in (q.data, q.value) if name)
    if readers > 1:
        return (f"{_dtype_name(edit, q.data)} '{q.data}' is shared by {readers} readers: requantizing it for one "
                "would change (or copy) it for all")
    return None


def weight_problem(edit: GraphEditor, c: Consumer, ints: IntegerWeights, out_axis: int) -> str | None:
    """Why a refit of `c`'s integer weight cannot be written back as integers, or None when it can (or
    the weight is a float initializer)."""
    q = ints.weight
    if q is None:
        return None
    if q.block_size > 0:
        return (f"weight '{q.data}' is quantized in blocks of {q.block_size} along axis {q.axis} {_where(q)}: "
                "not requantized")
    if _scheme(edit, q) is None:
        return (f"weight '{q.data}' is {_dtype_name(edit, q.data)} {_where(q)}: only 8- and 16-bit integers are "
                "requantized")
    shared = _private(edit, q)
    if shared:
        return f"{shared} {_where(q)}"
    if ints.bias is not None:
        return _bias_layout(edit, ints.bias) or _bias_follows(q, ints.bias, out_axis)
    return None


def bias_problem(edit: GraphEditor, c: Consumer, ints: IntegerWeights) -> str | None:
    """Why a new bias for `c` cannot be written, or None. An integer consumer without a bias has no int32
    tensor to hold one: a QDQ one would need nodes (a DequantizeLinear, or an Add for MatMul; a float bias
    would keep onnxruntime from fusing it into an int8 kernel), and QLinearMatMul has no bias input. A
    bias must be int32 and read by `c` alone."""
    if ints.bias is not None:
        return _bias_layout(edit, ints.bias)
    if c.bias is not None or ints.weight is None:
        return None  # a float bias
    if ints.weight.value:
        return (f"{c.op_type} '{c.node}' reads a QDQ weight and has no bias: adding one would add nodes "
                "(a DequantizeLinear, or an Add for MatMul) to the int8 graph")
    return f"{ints.weight.node.op_type} '{c.node}' has no int32 bias to hold one"


def _bias_layout(edit: GraphEditor, bq: Dequantized) -> str | None:
    if edit.initializers[bq.data].data_type != onnx.TensorProto.INT32 or bq.block_size > 0:
        return f"bias '{bq.data}' is not an int32 tensor with one scale per tensor or output channel"
    return _private(edit, bq)


def _bias_follows(q: Dequantized, bq: Dequantized, out_axis: int) -> str | None:
    """Why the bias scale cannot follow the weight scale (input scale x weight scale, per output channel)."""
    if bq.implied or q.axis is None or (q.axis == out_axis and bq.axis is not None):
        return None  # an implied scale follows the weight scale by itself
    return (f"bias '{bq.data}' has one scale per {'tensor' if bq.axis is None else 'channel'} while weight "
            f"'{q.data}' has one per position of axis {q.axis}: its scale cannot follow the weight's")


@dataclass(frozen=True)
class Requantized:
    """The integers, scale and zero point a refit weight is written as, and the int32 bias's new scale."""

    data: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    bias_scale: np.ndarray | None  # None: no int32 bias

    def real(self, axis: int | None) -> np.ndarray:
        """The weight as the model will read it."""
        zero = 0.0 if self.zero_point is None else self.zero_point.astype(np.float64)
        scale = self.scale.astype(np.float64)
        if axis is not None:
            shape = [1] * self.data.ndim
            shape[axis] = -1
            zero, scale = (p if np.ndim(p) == 0 else p.reshape(shape) for p in (zero, scale))
        return (self.data.astype(np.float64) - zero) * scale


def requantize(edit: GraphEditor, ints: IntegerWeights, raw: np.ndarray) -> Requantized:
    """`raw` (the weight, in its own layout) as integers in the scheme the weight has now."""
    q = ints.weight
    old_scale = edit.value(q.scale)
    old_zero = edit.value(q.zero_point) if q.zero_point else np.zeros(old_scale.shape, edit.value(q.data).dtype)
    data, scale, zero = _scheme(edit, q).quantize(raw, old_scale, old_zero)
    bq = ints.bias
    bias_scale = None
    if bq is not None and bq.implied:
        bias_scale = scale_of(edit, bq, weight_scale=scale)
    elif bq is not None:
        # the bias scale is input scale x weight scale: it moves with the weight scale, channel by channel
        ratio = scale.astype(np.float64) / np.where(old_scale == 0, 1.0, old_scale.astype(np.float64))
        old_bias_scale = edit.value(bq.scale)
        bias_scale = (old_bias_scale.astype(np.float64) * ratio.reshape(-1) if ratio.size > 1
                      else old_bias_scale * float(ratio.reshape(()))).astype(old_bias_scale.dtype)
        bias_scale = bias_scale.reshape(old_bias_scale.shape)
    return Requantized(data, scale, zero if q.zero_point else None, bias_scale)


def write_weight(edit: GraphEditor, ints: IntegerWeights, new: Requantized) -> None:
    """Write `new` as the weight's integers, scale and zero point and, with an int32 bias, its new scale (a
    QDQ one; a QOperator one follows the weight's), with the bias's integers re-derived so that its float
    values stay what they were (`write_bias` then changes them)."""
    q, bq = ints.weight, ints.bias
    bias = real_values(edit, bq) if bq is not None else None  # read before its scale changes
    data_slot, scale_slot, zero_slot = q.slots
    edit.write_const(q.node, data_slot, new.data)
    edit.write_const(q.node, scale_slot, new.scale)
    if q.zero_point:
        edit.write_const(q.node, zero_slot, new.zero_point)
    if bq is not None:
        if bq.scale:
            edit.write_const(bq.node, bq.slots[1], new.bias_scale)
        write_bias(edit, bq, bias, new.bias_scale)


def bias_integers(edit: GraphEditor, bq: Dequantized, bias: np.ndarray, scale: np.ndarray | None = None
                  ) -> np.ndarray:
    """The int32 values of float `bias` (shape of bq's data) with `scale` (default: bq's current scale)."""
    scale = scale_of(edit, bq) if scale is None else scale
    zero = edit.value(bq.zero_point) if bq.zero_point else None
    shape = edit.value(bq.data).shape
    return quantize_int32(np.asarray(bias).reshape(shape), np.asarray(scale).reshape(-1) if np.size(scale) > 1
                          else scale, zero)


def write_bias(edit: GraphEditor, bq: Dequantized, bias: np.ndarray, scale: np.ndarray | None = None) -> None:
    """Write float `bias` (shape of the bias tensor) as its int32 values, at `scale` (default: the current
    one; a writer that just moved the scale passes it, as the scale's name may have changed: copy-on-write)."""
    edit.write_const(bq.node, bq.slots[0], bias_integers(edit, bq, bias, scale))


def stored_bias(edit: GraphEditor, bq: Dequantized, bias: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """Float `bias` (shape of the bias tensor) as the model reads it once written as int32 with `scale`."""
    scale = scale_of(edit, bq) if scale is None else scale
    zero = edit.value(bq.zero_point).astype(np.float64) if bq.zero_point else 0.0
    q = bias_integers(edit, bq, bias, scale).astype(np.float64)
    return (q - zero) * np.asarray(scale, np.float64).reshape(-1 if np.size(scale) > 1 else ())
