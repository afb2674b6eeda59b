"""Integer weights behind DequantizeLinear (QDQ), as the reconstruction passes read and write them.

A QDQ model (onnxruntime's `quantize_static` with `QuantFormat.QDQ`) feeds a Conv, Gemm or MatMul
`DequantizeLinear(q, scale, zero_point)` of int8 (or uint8, int16, uint16) integers, per tensor or
per channel; a Conv's or Gemm's bias is `DequantizeLinear(int32, input_scale * weight_scale, 0)`.
The passes compute on the dequantized float weight and write the result back as integers in the
scheme the tensor had (`ir.quant.IntegerScheme`: same dtype, integer range, axis, symmetric or not),
with the scale recomputed from the new values' range:

* per channel, each row's scale is read by that row alone, and a refit moves rows by different
  amounts (a kept row takes over the removed inputs' share, so it usually grows): kept, the old
  scale would clip a grown row and waste levels on a shrunk one;
* per tensor, the scale is recomputed from the whole tensor's range for the same reason: keeping it
  would clip every refit value past the old range, and the per-layer held-out check judges the
  requantized weights, so a coarser scale is only kept when it does better there.

The int32 bias then follows the new weight scale: its scale is multiplied by new / old weight scale
(so it stays input_scale * weight_scale, which onnxruntime's int8 kernels assume when they fuse the
DequantizeLinear nodes away) and its integers are re-derived from its float values. The graph keeps
its nodes: only initializers change. What cannot be written that way (blocks, a tensor several nodes
read, a bias whose scale cannot follow the weight's, a QDQ consumer with no bias to hold one) is
named by `weight_problem` and `bias_problem`, and the passes skip it with that reason.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnxprune.calibration.features import Consumer
from onnxprune.ir.editor import GraphEditor
from onnxprune.ir.quant import IntegerScheme, quantize_int32

DEQUANTIZE_DOMAINS = ("", "ai.onnx", "com.microsoft")


@dataclass(frozen=True)
class Dequantized:
    """A constant a node reads as DequantizeLinear(data, scale, zero point), each an initializer."""

    node: onnx.NodeProto  # the DequantizeLinear
    data: str
    scale: str
    zero_point: str  # '' when absent (0)
    axis: int | None  # the per-channel axis of `data`, normalised; None: one scale for the tensor
    block_size: int  # > 0: quantized in blocks along `axis`


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
    per_tensor = int(np.prod(edit.initializers[scale].dims, dtype=np.int64)) <= 1
    axis = int(attrs.get("axis", 1))
    return Dequantized(dq, data, scale, zero_point, None if per_tensor else axis % max(rank, 1),
                       int(attrs.get("block_size", 0)))


def real_values(edit: GraphEditor, q: Dequantized) -> np.ndarray:
    """(data - zero point) * scale, as float64."""
    data = edit.value(q.data).astype(np.float64)
    return (data - _param(edit, q, q.zero_point, data)) * _param(edit, q, q.scale, data)


def _param(edit: GraphEditor, q: Dequantized, name: str, data: np.ndarray) -> np.ndarray:
    """A scale or zero point shaped to broadcast against `data` (0 for an absent zero point)."""
    if not name:
        return np.zeros(())
    value = edit.value(name).astype(np.float64)
    if q.axis is None:
        return value.reshape(())
    shape = [1] * data.ndim
    shape[q.axis] = -1
    return value.reshape(shape)


def _scheme(edit: GraphEditor, q: Dequantized) -> IntegerScheme | None:
    data = edit.value(q.data)
    zero = edit.value(q.zero_point) if q.zero_point else np.zeros((), data.dtype)
    return IntegerScheme.of(data, zero, q.axis)


def _dtype_name(edit: GraphEditor, name: str) -> str:
    return onnx.TensorProto.DataType.Name(edit.initializers[name].data_type).lower()


def _private(edit: GraphEditor, q: Dequantized, output: str) -> str | None:
    """Why `q`'s integers cannot change for one reader: they or what dequantizes them are read by others."""
    readers = max(edit.reader_count(q.data), edit.reader_count(output))
    if readers > 1:
        return (f"{_dtype_name(edit, q.data)} '{q.data}' is shared by {readers} readers: requantizing it for one "
                "would change (or copy) it for all")
    return None


def weight_problem(edit: GraphEditor, c: Consumer, out_axis: int) -> str | None:
    """Why a refit of `c`'s weight (read through DequantizeLinear) cannot be written back as integers, or None
    when it can (or the weight is a float initializer)."""
    q = dequantized(edit, c.weight)
    if q is None:
        return None
    where = f"(DequantizeLinear '{q.node.name}')"
    if q.block_size > 0:
        return f"weight '{q.data}' is quantized in blocks of {q.block_size} along axis {q.axis} {where}: not requantized"
    if _scheme(edit, q) is None:
        return f"weight '{q.data}' is {_dtype_name(edit, q.data)} {where}: only 8- and 16-bit integers are requantized"
    shared = _private(edit, q, c.weight)
    if shared:
        return f"{shared} {where}"
    if c.bias is not None and (bq := dequantized(edit, c.bias)) is not None:
        return _bias_layout(edit, c, bq) or _bias_follows(edit, q, bq, out_axis)
    return None


def bias_problem(edit: GraphEditor, c: Consumer) -> str | None:
    """Why a new bias for `c` cannot be written, or None: a QDQ consumer without a bias has no int32 tensor
    to hold one (a float bias would keep onnxruntime from fusing it into an int8 kernel; an int32 one
    needs a DequantizeLinear node), and a QDQ bias must be int32 and read by `c` alone."""
    if c.bias is not None:
        bq = dequantized(edit, c.bias)
        return None if bq is None else _bias_layout(edit, c, bq)
    if dequantized(edit, c.weight) is not None:
        return (f"{c.op_type} '{c.node}' reads a QDQ weight and has no bias: adding one would add nodes "
                "(a DequantizeLinear, or an Add for MatMul) to the int8 graph")
    return None


def _bias_layout(edit: GraphEditor, c: Consumer, bq: Dequantized) -> str | None:
    if edit.initializers[bq.data].data_type != onnx.TensorProto.INT32 or bq.block_size > 0:
        return f"bias '{bq.data}' is not an int32 tensor with one scale per tensor or output channel"
    return _private(edit, bq, c.bias)


def _bias_follows(edit: GraphEditor, q: Dequantized, bq: Dequantized, out_axis: int) -> str | None:
    """Why the bias scale cannot follow the weight scale (input scale x weight scale, per output channel)."""
    if q.axis is None or (q.axis == out_axis and bq.axis is not None):
        return None
    return (f"bias '{bq.data}' has one scale per {'tensor' if bq.axis is None else 'channel'} while weight "
            f"'{q.data}' has one per position of axis {q.axis}: its scale cannot follow the weight's")


@dataclass(frozen=True)
class Requantized:
    """The integers, scale and zero point a refit weight is written as, and the int32 bias's new scale."""

    data: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    bias_scale: np.ndarray | None  # None: no QDQ bias

    def real(self, axis: int | None) -> np.ndarray:
        """The weight as the model will read it."""
        zero = 0.0 if self.zero_point is None else self.zero_point.astype(np.float64)
        scale = self.scale.astype(np.float64)
        if axis is not None:
            shape = [1] * self.data.ndim
            shape[axis] = -1
            zero, scale = (p if np.ndim(p) == 0 else p.reshape(shape) for p in (zero, scale))
        return (self.data.astype(np.float64) - zero) * scale


def requantize(edit: GraphEditor, c: Consumer, raw: np.ndarray) -> Requantized:
    """`raw` (c's weight, in its own layout) as integers in the scheme the weight has now."""
    q = dequantized(edit, c.weight)
    old_scale = edit.value(q.scale)
    old_zero = edit.value(q.zero_point) if q.zero_point else np.zeros(old_scale.shape, edit.value(q.data).dtype)
    data, scale, zero = _scheme(edit, q).quantize(raw, old_scale, old_zero)
    bias_scale = None
    bq = dequantized(edit, c.bias) if c.bias is not None else None
    if bq is not None:
        # the bias scale is input scale x weight scale: it moves with the weight scale, channel by channel
        ratio = scale.astype(np.float64) / np.where(old_scale == 0, 1.0, old_scale.astype(np.float64))
        old_bias_scale = edit.value(bq.scale)
        bias_scale = (old_bias_scale.astype(np.float64) * ratio.reshape(-1) if ratio.size > 1
                      else old_bias_scale * float(ratio.reshape(()))).astype(old_bias_scale.dtype)
        bias_scale = bias_scale.reshape(old_bias_scale.shape)
    return Requantized(data, scale, zero if q.zero_point else None, bias_scale)


def write_weight(edit: GraphEditor, c: Consumer, new: Requantized) -> None:
    """Write `new` into the weight's DequantizeLinear and, with a QDQ bias, its new scale, with the bias's
    integers re-derived so that its float values stay what they were (`write_bias` then changes them)."""
    q = dequantized(edit, c.weight)
    bq = dequantized(edit, c.bias) if c.bias is not None else None
    bias = real_values(edit, bq) if bq is not None else None  # read before its scale changes
    edit.write_const(q.node, 0, new.data)
    edit.write_const(q.node, 1, new.scale)
    if q.zero_point:
        edit.write_const(q.node, 2, new.zero_point)
    if bq is not None:
        edit.write_const(bq.node, 1, new.bias_scale)
        write_bias(edit, c, bias)


def bias_integers(edit: GraphEditor, bq: Dequantized, bias: np.ndarray, scale: np.ndarray | None = None
                  ) -> np.ndarray:
    """The int32 values of float `bias` (shape of bq's data) with `scale` (default: bq's current scale)."""
    scale = edit.value(bq.scale) if scale is None else scale
    zero = edit.value(bq.zero_point) if bq.zero_point else None
    shape = edit.value(bq.data).shape
    return quantize_int32(np.asarray(bias).reshape(shape), np.asarray(scale).reshape(-1) if np.size(scale) > 1
                          else scale, zero)


def write_bias(edit: GraphEditor, c: Consumer, bias: np.ndarray) -> None:
    """Write float `bias` (shape of c's bias tensor) as the int32 values of its DequantizeLinear."""
    bq = dequantized(edit, c.bias)
    edit.write_const(bq.node, 0, bias_integers(edit, bq, bias))


def stored_bias(edit: GraphEditor, c: Consumer, bias: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """Float `bias` (shape of c's bias tensor) as the model reads it once written as int32 with `scale`."""
    bq = dequantized(edit, c.bias)
    scale = edit.value(bq.scale) if scale is None else scale
    zero = edit.value(bq.zero_point).astype(np.float64) if bq.zero_point else 0.0
    q = bias_integers(edit, bq, bias, scale).astype(np.float64)
    return (q - zero) * np.asarray(scale, np.float64).reshape(-1 if np.size(scale) > 1 else ())
