"""Quantized weights: which op reads an integer initializer as a weight, with which scale
and zero point, and what its real values are.

A quantized model stores a weight as integers q and reads it as (q - zero_point) * scale,
in one of three places: a DequantizeLinear in front of a float op (QDQ), an integer op with
no scale of its own (ConvInteger, MatMulInteger: dynamic quantization, whose scale is applied
by a Mul after the op, only the zero point sitting on it), or an integer op that takes the
weight's scale and zero point as inputs (the QOperator format: QLinearConv, QLinearMatMul,
QGemm; and onnxruntime's int8 DynamicQuantizeLSTM, for W and for R). The scale and zero point
are one value for the whole tensor (per-tensor), one per position along `axis` (per-channel),
one per `block_size` positions along `axis` and per position along the others (blocked, opset
21), or, for DynamicQuantizeLSTM, one per direction or one per direction and gate row.

Pruning slices the integers and, along a per-channel axis, the scale and zero point with
them; importance criteria and lossless dead-unit detection read the real values.

The com.microsoft QOperator ops and DynamicQuantizeLSTM have no ONNX shape inference:
`contrib_output_shapes` gives their outputs' types and shapes from their inputs' (the shape
inference fallback, onnxprune.ir.shapes, asks it).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

# the weight's per-channel axis, where it is not a fixed axis of the weight
OP_AXIS = "axis"  # (De)QuantizeLinear: the op's `axis` attribute (default 1)
TRANS_B = "transB"  # QGemm: B's output features, axis 0 when transB else 1
GATE_ROWS = "gate rows"  # DynamicQuantizeLSTM: the scale runs along directions (and gate rows, the last axis)

# op -> for each constant weight it reads as integers: (weight input, scale input or None, zero point input,
# per-channel axis of the weight, or one of the markers above), for the ops that have a pruning rule
_READERS: dict[tuple[str, str], tuple[tuple[int, int | None, int, int | str], ...]] = {
    ("", "DequantizeLinear"): ((0, 1, 2, OP_AXIS),),
    ("com.microsoft", "DequantizeLinear"): ((0, 1, 2, OP_AXIS),),
    ("", "MatMulInteger"): ((1, None, 3, -1),),  # the scale is applied after the op (a Mul)
    ("", "ConvInteger"): ((1, None, 3, 0),),
    ("", "QLinearConv"): ((3, 4, 5, 0),),
    ("", "QLinearMatMul"): ((3, 4, 5, -1),),
    ("com.microsoft", "QGemm"): ((3, 4, 5, TRANS_B),),
    ("com.microsoft", "DynamicQuantizeLSTM"): ((1, 8, 9, GATE_ROWS), (2, 10, 11, GATE_ROWS)),  # W, R
}
# ops that write integers with a scale and zero point of the same geometry (their input is float)
_WRITERS = {("", "QuantizeLinear"): ((0, 1, 2, OP_AXIS),), ("com.microsoft", "QuantizeLinear"): ((0, 1, 2, OP_AXIS),)}


def _domain(node: onnx.NodeProto) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def reads_quantized_weight(node: onnx.NodeProto) -> int | None:
    """The (first) input index at which `node` reads integers it dequantizes, or None."""
    specs = _READERS.get((_domain(node), node.op_type))
    return None if specs is None else specs[0][0]


@dataclass(frozen=True)
class Quantization:
    """A tensor as one node dequantizes it, (data - zero_point) * scale, or quantizes it."""

    node: onnx.NodeProto
    data: str
    scale: str  # '' when the reader applies no scale (MatMulInteger, ConvInteger)
    zero_point: str  # '' when absent (0)
    axis: int  # the per-channel (or blocked) axis of `data`, normalised; meaningless when per-tensor
    block_size: int  # > 0: blocked quantization along `axis`
    shape: tuple  # of data (an activation's may hold symbolic dims)
    #: when set, the axes of `data` that the scale's dims run along, one each (DynamicQuantizeLSTM's
    #: [directions] or [directions, 4 x hidden]); otherwise its shape says (see `kind`)
    param_axes: tuple[int, ...] = ()

    def kind(self, param_shape: tuple[int, ...]) -> str:
        """'tensor', 'channel' or 'block', from the shape of the scale (or zero point)."""
        if int(np.prod(param_shape, dtype=np.int64)) <= 1:
            return "tensor"
        if self.block_size > 0 or len(param_shape) == len(self.shape) > 1:
            return "block"
        return "channel"

    def sliced_with(self, view, axis: int) -> tuple[list[tuple[str, int]], str | None]:
        """The (scale or zero point, its axis) to slice with positions of `axis` of the data,
        or why positions of that axis cannot go (they share a quantization block)."""
        out: list[tuple[str, int]] = []
        for name in (self.scale, self.zero_point):
            if not name:
                continue
            shape = _dims(view, name)
            if shape is None:
                return [], f"the shape of its quantization parameter '{name}' is unknown"
            kind = self.kind(shape)
            if kind == "channel" and axis == self.axis:
                out.append((name, 0))
            elif kind == "block":
                if axis == self.axis and self.block_size != 1:
                    return [], (f"'{self.data}' is quantized in blocks of {self.block_size} along axis {axis}: "
                                "removing positions would shift every block after them")
                out.append((name, axis))
        return out, None


def quantized_weight(view, node: onnx.NodeProto) -> Quantization | None:
    """How `node` reads its (first) integer weight, when it reads one and its data is a constant."""
    index = reads_quantized_weight(node)
    return None if index is None else weight_quantization(view, node, index)


def weight_quantization(view, node: onnx.NodeProto, index: int) -> Quantization | None:
    """How `node` reads the constant integers at input `index` as a weight, or None when it does not."""
    spec = next((s for s in _READERS.get((_domain(node), node.op_type), ()) if s[0] == index), None)
    q = _quantization(view, node, spec) if spec is not None else None
    return q if q is not None and q.data in view.initializers else None


def quantization(view, node: onnx.NodeProto) -> Quantization | None:
    """The scale, zero point and axis with which `node` (de)quantizes its data input, if its shape is known."""
    key = (_domain(node), node.op_type)
    specs = _READERS.get(key) or _WRITERS.get(key)
    return None if specs is None else _quantization(view, node, specs[0])


def _quantization(view, node: onnx.NodeProto, spec) -> Quantization | None:
    data_index, scale_index, zp_index, axis = spec
    data = node.input[data_index] if data_index < len(node.input) else ""
    shape = _dims(view, data) if data in view.initializers else (view.shape(data) if data else None)
    if shape is None:
        return None

    def optional(index: int | None) -> str:
        return node.input[index] if index is not None and index < len(node.input) else ""

    scale, zero_point = optional(scale_index), optional(zp_index)
    rank = len(shape)
    param_axes: tuple[int, ...] = ()
    if axis == OP_AXIS:  # (De)QuantizeLinear: the axis attribute (default 1), for per-channel and blocked
        axis = int(view.attr(node, "axis", 1))
    elif axis == TRANS_B:
        axis = 0 if int(view.attr(node, "transB", 0)) else 1
    elif axis == GATE_ROWS:
        axis = rank - 1
        param = _dims(view, scale or zero_point) if scale or zero_point else None
        param_axes = (0, axis)[:len(param)] if param is not None and len(param) in (1, 2) else ()
    axis = axis + rank if axis < 0 else axis
    block_size = int(view.attr(node, "block_size", 0)) if node.op_type in ("QuantizeLinear", "DequantizeLinear") else 0
    return Quantization(node, data, scale, zero_point, axis, block_size, shape, param_axes)


def _dims(view, name: str) -> tuple[int, ...] | None:
    if name in view.initializers:
        return tuple(int(d) for d in view.initializers[name].dims)
    shape = view.shape(name)
    return None if shape is None or not all(isinstance(d, int) for d in shape) else tuple(shape)


def dequantize(q: Quantization, values: np.ndarray, scale: np.ndarray | None,
               zero_point: np.ndarray | None) -> np.ndarray:
    """(values - zero_point) * scale as float32, broadcast per tensor, channel or block."""
    out = values.astype(np.float32)
    for param, subtract in ((zero_point, True), (scale, False)):
        if param is None:
            continue
        param = _broadcastable(q, np.asarray(param).astype(np.float32))
        out = out - param if subtract else out * param
    return out


def _broadcastable(q: Quantization, param: np.ndarray) -> np.ndarray:
    if q.param_axes and param.ndim == len(q.param_axes) and param.size > 1:
        shape = [1] * len(q.shape)
        for size, axis in zip(param.shape, q.param_axes):
            shape[axis] = size
        return param.reshape(shape)
    kind = q.kind(param.shape)
    if kind == "tensor":
        return param.reshape(())
    if kind == "channel":
        shape = [1] * len(q.shape)
        shape[q.axis] = -1
        return param.reshape(shape)
    size = max(q.block_size, 1)
    return np.repeat(param, size, axis=q.axis).take(np.arange(q.shape[q.axis]), axis=q.axis)


# -- the QOperator format's mixing ops, as the float op they compute ---------------------------------------

@dataclass(frozen=True)
class QLinearMixing:
    """Where a QOperator mixing op reads its operands, and the float op it computes on their real values:
    input x (integers, scale, zero point: one value each), weight w (the same, per tensor or per output
    channel), an optional int32 bias whose scale is x's scale x w's, and y's scale and zero point, with
    which it writes its output as integers."""

    computes: str  # "Conv", "MatMul" or "Gemm"
    bias: int | None  # the int32 bias's input index; None: the op has no bias input
    attributes: tuple[str, ...]  # the attributes it shares with the float op
    bias_times_alpha: bool = False  # QGemm: Y = alpha * x_scale * w_scale * (x w + bias)
    x: tuple[int, int, int] = (0, 1, 2)  # inputs: integers, scale, zero point
    w: tuple[int, int, int] = (3, 4, 5)


_CONV_ATTRIBUTES = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")
QLINEAR_MIXING: dict[tuple[str, str], QLinearMixing] = {
    ("", "QLinearConv"): QLinearMixing("Conv", bias=8, attributes=_CONV_ATTRIBUTES),
    ("", "QLinearMatMul"): QLinearMixing("MatMul", bias=None, attributes=()),
    ("com.microsoft", "QGemm"): QLinearMixing("Gemm", bias=6, attributes=("alpha", "transA", "transB"),
                                              bias_times_alpha=True),
}


def qlinear_mixing(node: onnx.NodeProto) -> QLinearMixing | None:
    """How `node` mixes integer activations with an integer weight, when it is a QOperator mixing op."""
    return QLINEAR_MIXING.get((_domain(node), node.op_type))


# -- requantizing a refit weight -------------------------------------------------------------------------

# the integer ranges onnxruntime's quantizer writes weights in, narrowest first: reduced (7-bit, for x86
# kernels that add pairs of 8-bit products in int16), symmetric, full
_RANGES: dict[np.dtype, tuple[tuple[int, int], ...]] = {
    np.dtype(np.int8): ((-64, 64), (-127, 127), (-128, 127)),
    np.dtype(np.uint8): ((0, 127), (0, 255)),
    np.dtype(np.int16): ((-16384, 16384), (-32767, 32767), (-32768, 32767)),
    np.dtype(np.uint16): ((0, 32767), (0, 65535)),
}


@dataclass(frozen=True)
class IntegerScheme:
    """How a weight's integers were made from its real values, read back from the integers themselves:
    their dtype, the range they use, whether the zero point sits at the middle of the type (symmetric:
    0 for signed, 128 for uint8) and the per-channel axis (None: one scale for the tensor)."""

    dtype: np.dtype
    qmin: int
    qmax: int
    symmetric: bool
    axis: int | None

    @classmethod
    def of(cls, q: np.ndarray, zero_point: np.ndarray, axis: int | None) -> "IntegerScheme | None":
        """The scheme of integers `q` with `zero_point`, or None for a dtype it does not know (int4, floats)."""
        ranges = _RANGES.get(np.dtype(q.dtype))
        if ranges is None:
            return None
        info = np.iinfo(q.dtype)
        middle = 0 if info.min < 0 else (int(info.max) + 1) // 2
        symmetric = bool(np.all(zero_point == middle))
        used = [int(q.min()), int(q.max())] if q.size else [middle, middle]
        lo, hi = min(used + [int(zero_point.min())]), max(used + [int(zero_point.max())])
        # the narrowest standard range holding every integer: a tensor sliced by pruning may no longer reach
        # its range's ends, but the range it was quantized in is the one to keep (7-bit stays 7-bit)
        qmin, qmax = next(((a, b) for a, b in ranges if a <= lo and hi <= b), ranges[-1])
        if symmetric and middle == 0:
            qmin = max(qmin, -qmax)  # symmetric signed integers stay symmetric: -127..127, not -128
        return cls(np.dtype(q.dtype), qmin, qmax, symmetric, axis)

    def quantize(self, real: np.ndarray, old_scale: np.ndarray, old_zero_point: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(integers, scale, zero point) of `real` in this scheme, the scale and zero point shaped and typed like
        the old ones. A scale follows its slice's range as the quantizer computed it (min and max, 0 included);
        an all-zero slice keeps its old scale and zero point (any scale stores zeros exactly)."""
        real = np.asarray(real, np.float64)
        over = tuple(i for i in range(real.ndim) if i != self.axis) if self.axis is not None else None
        rmin = np.minimum(real.min(axis=over, keepdims=True), 0.0)
        rmax = np.maximum(real.max(axis=over, keepdims=True), 0.0)
        old_s = self._like(old_scale, rmin).astype(np.float64)
        old_z = self._like(old_zero_point, rmin).astype(np.float64)
        if self.symmetric:
            scale = np.maximum(-rmin, rmax) / ((self.qmax - self.qmin) / 2.0)
            zero = old_z
        else:
            scale = (rmax - rmin) / float(self.qmax - self.qmin)
            zero = np.clip(np.round(self.qmin - rmin / np.where(scale > 0, scale, 1.0)), self.qmin, self.qmax)
        flat = ~(scale > 0)
        scale, zero = np.where(flat, old_s, scale), np.where(flat, old_z, zero)
        stored = scale.astype(old_scale.dtype)  # the integers are made with the scale as it will be read
        q = np.clip(np.round(real / stored.astype(np.float64)) + zero, self.qmin, self.qmax).astype(self.dtype)
        return (q, stored.reshape(old_scale.shape),
                zero.astype(old_zero_point.dtype).reshape(old_zero_point.shape))

    def _like(self, param: np.ndarray, target: np.ndarray) -> np.ndarray:
        """A scale or zero point (one value, or one per position of `axis`) broadcast like `target`."""
        param = np.asarray(param)
        return param.reshape(()) * np.ones_like(target) if param.size == 1 else param.reshape(target.shape)


def quantize_int32(real: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None) -> np.ndarray:
    """An int32 bias for `real` with the given scale (and zero point, 0 when None), saturated to int32."""
    zero = 0.0 if zero_point is None else np.asarray(zero_point, np.float64)
    q = np.round(np.asarray(real, np.float64) / np.asarray(scale, np.float64)) + zero
    info = np.iinfo(np.int32)
    return np.clip(q, info.min, info.max).astype(np.int32)


# -- MatMulNBits (com.microsoft): weight-only 2/4/8-bit, quantized in blocks along K ------------------

@dataclass(frozen=True)
class NBitsLayout:
    """B [N, blocks, bytes per block]; scales [N * blocks] (or [N, blocks]); zero points packed
    `per_byte` blocks to a byte per row ([N * ceil(blocks / per_byte)] uint8), or float like the scales."""

    k: int
    n: int
    bits: int
    block_size: int

    @property
    def blocks(self) -> int:
        return -(-self.k // self.block_size)

    @property
    def per_byte(self) -> int:
        return 8 // self.bits

    @property
    def zero_point_bytes(self) -> int:
        return -(-self.blocks // self.per_byte)


def nbits_layout(view, node: onnx.NodeProto) -> NBitsLayout | None:
    if node.op_type != "MatMulNBits" or _domain(node) != "com.microsoft":
        return None
    k, n = view.attr(node, "K"), view.attr(node, "N")
    bits, block = int(view.attr(node, "bits", 4)), view.attr(node, "block_size")
    if k is None or n is None or block is None or bits not in (2, 4, 8):
        return None
    return NBitsLayout(int(k), int(n), bits, int(block))


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 bytes holding 8 // bits values each, lowest bits first, along the last axis."""
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    values = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], -1)


def dequantize_nbits(layout: NBitsLayout, b: np.ndarray, scales: np.ndarray,
                     zero_points: np.ndarray | None) -> np.ndarray:
    """B's real values as [N, blocks, block_size] (the padding of a last partial block included)."""
    n, blocks = layout.n, layout.blocks
    q = _unpack(np.asarray(b, dtype=np.uint8), layout.bits)[..., :layout.block_size].astype(np.float32)
    scales = np.asarray(scales, dtype=np.float32).reshape(n, blocks, 1)
    if zero_points is None:
        zero = np.float32(1 << (layout.bits - 1))
    elif zero_points.dtype == np.uint8:
        zero = _unpack(zero_points.reshape(n, -1), layout.bits)[:, :blocks, None].astype(np.float32)
    else:  # float zero points, one per block like the scales
        zero = np.asarray(zero_points, dtype=np.float32).reshape(n, blocks, 1)
    return (q - zero) * scales



# -- shapes of the com.microsoft quantized ops (no ONNX shape inference) -----------------------------------

CONTRIB_SHAPE_OPS = ("QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearGlobalAveragePool",
                     "QLinearAveragePool", "QLinearConcat", "QGemm", "DynamicQuantizeLSTM")


def contrib_output_shapes(node: onnx.NodeProto, shapes: list, types: list[int]) -> list[tuple[int, list]] | None:
    """(element type, shape) of each output of a com.microsoft QOperator op or DynamicQuantizeLSTM, from
    its inputs' shapes and types (a dim may be symbolic, a str); None when it is not one of them or an
    input it needs is unknown."""
    op = node.op_type if _domain(node) == "com.microsoft" else ""
    if op in ("QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax"):
        return None if shapes[0] is None else [(types[0], list(shapes[0]))]
    if op == "QLinearGlobalAveragePool":
        return _global_pool_shape(node, shapes[0], types[0])
    if op == "QLinearAveragePool":
        return _pool_shape(node, shapes[0], types[0])
    if op == "QLinearConcat":
        return _concat_shape(node, shapes[2::3], types[2])
    if op == "QGemm":
        return _qgemm_shape(node, shapes, types)
    if op == "DynamicQuantizeLSTM":
        return _lstm_shapes(node, shapes[0])
    return None


def _attr(node: onnx.NodeProto, name: str, default=None):
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else onnx.helper.get_attribute_value(found)


def _global_pool_shape(node, x, elem) -> list[tuple[int, list]] | None:
    if x is None or len(x) < 3:
        return None
    if int(_attr(node, "channels_last", 0)):
        return [(elem, [x[0]] + [1] * (len(x) - 2) + [x[-1]])]
    return [(elem, [x[0], x[1]] + [1] * (len(x) - 2))]


def _pool_shape(node, x, elem) -> list[tuple[int, list]] | None:
    """AveragePool's output size along each spatial axis (auto_pad, pads, strides, dilations, ceil_mode)."""
    kernel = _attr(node, "kernel_shape")
    if x is None or kernel is None or len(x) != len(kernel) + 2:
        return None
    channels_last = int(_attr(node, "channels_last", 0))
    spatial = list(x[1:-1] if channels_last else x[2:])
    n = len(kernel)
    strides, dilations = _attr(node, "strides", [1] * n), _attr(node, "dilations", [1] * n)
    pads, auto_pad = _attr(node, "pads", [0] * 2 * n), _attr(node, "auto_pad", b"NOTSET")
    round_up = int(_attr(node, "ceil_mode", 0))
    out = []
    for i, size in enumerate(spatial):
        if not isinstance(size, int):
            out.append(f"{node.output[0]}_pool_{i}")
        elif auto_pad in (b"SAME_UPPER", b"SAME_LOWER"):
            out.append(-(-size // strides[i]))
        else:
            span = (kernel[i] - 1) * dilations[i] + 1
            padded = size - span + (0 if auto_pad == b"VALID" else pads[i] + pads[i + n])
            out.append((-(-padded // strides[i]) if round_up else padded // strides[i]) + 1)
    return [(elem, [x[0]] + out + [x[-1]] if channels_last else [x[0], x[1]] + out)]


def _concat_shape(node, inputs: list, elem) -> list[tuple[int, list]] | None:
    if not inputs or any(s is None for s in inputs) or len({len(s) for s in inputs}) != 1:
        return None
    rank = len(inputs[0])
    axis = int(_attr(node, "axis", 0))
    axis = axis + rank if axis < 0 else axis
    out = list(inputs[0])
    sizes = [s[axis] for s in inputs]
    out[axis] = sum(sizes) if all(isinstance(d, int) for d in sizes) else f"{node.output[0]}_concat_{axis}"
    return [(elem, out)]


def _qgemm_shape(node, shapes: list, types: list[int]) -> list[tuple[int, list]] | None:
    a, b = shapes[0], shapes[3] if len(shapes) > 3 else None
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return None
    m = a[1] if int(_attr(node, "transA", 0)) else a[0]
    n = b[0] if int(_attr(node, "transB", 0)) else b[1]
    if len(node.input) <= 7 or not node.input[7]:
        elem = TensorProto.FLOAT  # no y_scale: the output is float
    elif len(node.input) > 8 and node.input[8]:
        elem = types[8]
    else:
        elem = TensorProto.UINT8
    return [(elem, [m, n])]


def _lstm_shapes(node, x) -> list[tuple[int, list]] | None:
    """Y [seq, directions, batch, hidden], Y_h and Y_c [directions, batch, hidden], float (X is)."""
    hidden = _attr(node, "hidden_size")
    if x is None or len(x) != 3 or hidden is None:
        return None
    direction = _attr(node, "direction", b"forward")
    directions = 2 if direction in (b"bidirectional", "bidirectional") else 1
    state = [directions, x[1], int(hidden)]
    return [(TensorProto.FLOAT, [x[0]] + state)] + [(TensorProto.FLOAT, list(state))] * (len(node.output) - 1)
