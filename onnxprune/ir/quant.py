"""Quantized weights: which op reads an integer initializer as a weight, with which scale
and zero point, and what its real values are.

A quantized model stores a weight as integers q and reads it as (q - zero_point) * scale,
in one of two places: a DequantizeLinear in front of a float op (QDQ), or the integer op
itself (ConvInteger, MatMulInteger: dynamic quantization, whose scale is applied by a Mul
after the op, only the zero point sitting on it). The scale and zero point are one value for
the whole tensor (per-tensor), one per position along `axis` (per-channel), or one per
`block_size` positions along `axis` and per position along the others (blocked, opset 21).

Pruning slices the integers and, along a per-channel axis, the scale and zero point with
them; importance criteria and lossless dead-unit detection read the real values.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

# op -> (weight input, scale input or None, zero point input, per-channel axis of the weight; None: the
# op's `axis` attribute), for the ops that read a constant weight as integers and have a pruning rule
_READERS: dict[tuple[str, str], tuple[int, int | None, int, int | None]] = {
    ("", "DequantizeLinear"): (0, 1, 2, None),
    ("com.microsoft", "DequantizeLinear"): (0, 1, 2, None),
    ("", "MatMulInteger"): (1, None, 3, -1),  # the scale is applied after the op (a Mul)
    ("", "ConvInteger"): (1, None, 3, 0),
}
# ops that write integers with a scale and zero point of the same geometry (their input is float)
_WRITERS = {("", "QuantizeLinear"): (0, 1, 2, None), ("com.microsoft", "QuantizeLinear"): (0, 1, 2, None)}


def _domain(node: onnx.NodeProto) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def reads_quantized_weight(node: onnx.NodeProto) -> int | None:
    """The input index at which `node` reads integers it dequantizes, or None."""
    spec = _READERS.get((_domain(node), node.op_type))
    return None if spec is None else spec[0]


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
    """How `node` reads its integer weight, when it reads one and its data is a constant."""
    q = quantization(view, node) if reads_quantized_weight(node) is not None else None
    return q if q is not None and q.data in view.initializers else None


def quantization(view, node: onnx.NodeProto) -> Quantization | None:
    """The scale, zero point and axis with which `node` (de)quantizes its data input, if its shape is known."""
    key = (_domain(node), node.op_type)
    spec = _READERS.get(key) or _WRITERS.get(key)
    if spec is None:
        return None
    data_index, scale_index, zp_index, axis = spec
    data = node.input[data_index] if data_index < len(node.input) else ""
    shape = _dims(view, data) if data in view.initializers else (view.shape(data) if data else None)
    if shape is None:
        return None

    def optional(index: int | None) -> str:
        return node.input[index] if index is not None and index < len(node.input) else ""

    scale, zero_point = optional(scale_index), optional(zp_index)
    rank = len(shape)
    if axis is None:  # (De)QuantizeLinear: the axis attribute (default 1), for per-channel and blocked
        axis = int(view.attr(node, "axis", 1))
    axis = axis + rank if axis < 0 else axis
    block_size = int(view.attr(node, "block_size", 0)) if node.op_type in ("QuantizeLinear", "DequantizeLinear") else 0
    return Quantization(node, data, scale, zero_point, axis, block_size, shape)


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
    kind = q.kind(param.shape)
    if kind == "tensor":
        return param.reshape(())
    if kind == "channel":
        shape = [1] * len(q.shape)
        shape[q.axis] = -1
        return param.reshape(shape)
    size = max(q.block_size, 1)
    return np.repeat(param, size, axis=q.axis).take(np.arange(q.shape[q.axis]), axis=q.axis)


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

