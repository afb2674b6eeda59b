"""The input features of a mixing op (Conv, Gemm, MatMul with a constant weight), as rows.

Least squares and Gram statistics need the consumer's input as a matrix X
with one row per output position and one column per weight entry of an
output channel, so that output = X @ W.reshape(C_out, -1).T + bias.

* Gemm / MatMul: a row is one input vector (a row of A; for MatMul every
  position of the leading axes, subsampled per sample).
* Conv (1d/2d/3d, any stride, dilation, padding, auto_pad): a row is the
  unfolded receptive field (C_in x kernel, channel-major, matching the weight
  layout) of one output position. Im2col of every position would cost
  C_in*K times the activation, so each sample contributes the patches of a
  random subset of `per_sample` output positions (all of them when there are
  fewer). Padding positions are zeros, as in the convolution itself.

The output rows at the same positions come from `rows(..., y=...)`, so the
cross terms X^T Y of a least-squares fit pair exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.calibration.padding import row_mask
from onnx import helper

SUPPORTED = ("Conv", "Gemm", "MatMul")


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


@dataclass(frozen=True)
class Consumer:
    """A node that mixes input features with a constant weight."""

    node: str
    op_type: str
    input: str
    output: str
    weight: str
    weight_shape: tuple[int, ...]
    bias: str | None = None
    feature_axis: int = 1  # axis of `input` that holds the features
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()  # begins then ends, as ONNX writes them
    auto_pad: str = "NOTSET"
    group: int = 1
    trans_a: int = 0
    trans_b: int = 0
    alpha: float = 1.0
    beta: float = 1.0
    # an integer input (a QOperator op's): its real values are (x - input_zero_point) * input_scale
    input_scale: float | None = None
    input_zero_point: float = 0.0

    def real_input(self, x: np.ndarray) -> np.ndarray:
        """The input's real values (its channel means too: the map is affine), float32."""
        if self.input_scale is None:
            return x
        return (np.asarray(x, np.float32) - np.float32(self.input_zero_point)) * np.float32(self.input_scale)

    @property
    def kernel(self) -> tuple[int, ...]:
        return self.weight_shape[2:] if self.op_type == "Conv" else ()

    @property
    def out_channels(self) -> int:
        if self.op_type == "Conv":
            return self.weight_shape[0]
        if self.op_type == "Gemm":
            return self.weight_shape[0] if self.trans_b else self.weight_shape[1]
        return self.weight_shape[1]

    @property
    def in_features(self) -> int:
        """Columns of X (per group for a grouped Conv)."""
        if self.op_type == "Conv":
            return int(np.prod(self.weight_shape[1:]))
        if self.op_type == "Gemm":
            return self.weight_shape[1] if self.trans_b else self.weight_shape[0]
        return self.weight_shape[0]

    @property
    def output_axis(self) -> int:
        return 1 if self.op_type in ("Conv", "Gemm") else -1

    def effective_weight(self, w: np.ndarray) -> np.ndarray:
        """The weight as (C_out, features): output = X @ result.T (+ bias). Gemm's alpha is folded in."""
        if self.op_type == "Conv":
            return w.reshape(w.shape[0], -1)
        if self.op_type == "Gemm":
            m = w if self.trans_b else w.T
            return m * self.alpha
        return w.T

    def weight_from_effective(self, m: np.ndarray) -> np.ndarray:
        """Inverse of `effective_weight` for a weight with m.shape[0] outputs and m.shape[1] features."""
        if self.op_type == "Conv":
            return m.reshape((m.shape[0], -1) + tuple(self.weight_shape[2:]))
        if self.op_type == "Gemm":
            m = m / self.alpha
            return m if self.trans_b else m.T
        return m.T


def consumer_for(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> Consumer | None:
    """The Consumer description of `node`, or None when it is not a supported mixing op
    (run-time weight, weight on the left of a MatMul, batched MatMul weight, transposed A of rank != 2...)."""
    if node.op_type not in SUPPORTED or len(node.input) < 2:
        return None
    w = initializers.get(node.input[1])
    if w is None or node.input[0] in initializers:
        return None
    shape = tuple(int(d) for d in w.dims)
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None and bias not in initializers:
        return None
    if node.op_type == "Conv":
        if len(shape) < 3:
            return None
        nd = len(shape) - 2
        pads = tuple(int(p) for p in _attr(node, "pads", [0] * (2 * nd)))
        auto_pad = _attr(node, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        return Consumer(node.name, "Conv", node.input[0], node.output[0], node.input[1], shape, bias, 1,
                        tuple(int(s) for s in _attr(node, "strides", [1] * nd)),
                        tuple(int(d) for d in _attr(node, "dilations", [1] * nd)),
                        pads, auto_pad or "NOTSET", int(_attr(node, "group", 1)))
    if node.op_type == "Gemm":
        if len(shape) != 2:
            return None
        if bias is not None:
            b = initializers[bias]
            n_out = shape[0] if int(_attr(node, "transB", 0)) else shape[1]
            if int(np.prod(b.dims)) not in (1, n_out) or (len(b.dims) == 2 and b.dims[0] != 1):
                return None  # a per-row bias: not a per-output bias
        trans_a = int(_attr(node, "transA", 0))
        return Consumer(node.name, "Gemm", node.input[0], node.output[0], node.input[1], shape, bias,
                        0 if trans_a else 1, trans_a=trans_a, trans_b=int(_attr(node, "transB", 0)),
                        alpha=float(_attr(node, "alpha", 1.0)), beta=float(_attr(node, "beta", 1.0)))
    if len(shape) != 2:
        return None
    return Consumer(node.name, "MatMul", node.input[0], node.output[0], node.input[1], shape, None, -1)


def consumers_of(model: onnx.ModelProto, through_dequantize: bool = False) -> dict[str, Consumer]:
    """Every supported consumer of `model`, by node name.

    through_dequantize: a weight (or bias) that a DequantizeLinear of constants makes counts too,
    named by that node's output (read its values with GraphView.const); for readers only: a pass
    that writes weights would turn the int8 weight float."""
    inits = {t.name: t for t in model.graph.initializer}
    if through_dequantize:
        for node in model.graph.node:
            if node.op_type == "DequantizeLinear" and all(not i or i in inits for i in node.input):
                data = inits[node.input[0]]  # a header with the weight's shape: its values are dequantized
                inits.setdefault(node.output[0], onnx.TensorProto(name=node.output[0], dims=data.dims))
    out = {}
    for node in model.graph.node:
        c = consumer_for(node, inits)
        if c is not None:
            out[node.name] = c
    return out


# -- rows -------------------------------------------------------------------------------------------
def _conv_geometry(c: Consumer, spatial: tuple[int, ...]):
    nd = len(spatial)
    kernel = c.kernel
    strides = c.strides or (1,) * nd
    dil = c.dilations or (1,) * nd
    if c.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for i in range(nd):
            out = -(-spatial[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - spatial[i])
            small = total // 2
            begin = small if c.auto_pad == "SAME_UPPER" else total - small
            begins.append(begin)
            ends.append(total - begin)
    elif c.auto_pad == "VALID":
        begins, ends = [0] * nd, [0] * nd
    else:
        pads = c.pads or (0,) * (2 * nd)
        begins, ends = list(pads[:nd]), list(pads[nd:])
    out = tuple((spatial[i] + begins[i] + ends[i] - ((kernel[i] - 1) * dil[i] + 1)) // strides[i] + 1
                for i in range(nd))
    return out, begins, strides, dil


def conv_output_shape(c: Consumer, spatial: tuple[int, ...]) -> tuple[int, ...]:
    return _conv_geometry(c, spatial)[0]


def _pick(rng: np.random.Generator | None, batch: int, total: int, per_sample: int | None) -> np.ndarray:
    """(batch, m) position indices: all positions, or a random subset of per_sample of them."""
    if per_sample is None or per_sample >= total:
        return np.broadcast_to(np.arange(total), (batch, total))
    rng = rng or np.random.default_rng(0)
    return np.argpartition(rng.random((batch, total)), per_sample - 1, axis=1)[:, :per_sample]


def output_positions(c: Consumer, out_shape: tuple[int, ...]) -> tuple[int, int]:
    """(samples, positions per sample) of the consumer's output (Gemm: one position per row)."""
    if c.op_type == "Conv":
        return out_shape[0], int(np.prod(out_shape[2:]))
    if c.op_type == "Gemm" or len(out_shape) <= 2:
        return out_shape[0], 1
    return out_shape[0], int(np.prod(out_shape[1:-1]))


def pick_positions(c: Consumer, out_shape: tuple[int, ...], per_sample: int | None,
                   rng: np.random.Generator | None) -> np.ndarray:
    """The sampled output positions, (samples, m); the same picks give the same rows of X and Y."""
    batch, total = output_positions(c, out_shape)
    return _pick(rng, batch, total, per_sample)


def sample_rows(c: Consumer, x: np.ndarray) -> int:
    """How many rows of picks (`pick_positions`' first axis) the consumer's input `x` stands for: its
    samples, or for a Gemm its rows (tokens flattened into rows count as samples of one position)."""
    return output_positions(c, _output_shape(c, x))[0]


def input_rows(c: Consumer, x: np.ndarray, pick: np.ndarray) -> np.ndarray:
    """Rows of X (rows, features) at the picked output positions, in real values (an integer input
    dequantized before a Conv's padding adds its zeros)."""
    x = c.real_input(x)
    if c.op_type == "Conv":
        return _conv_rows(c, x, pick)
    if c.op_type == "Gemm":
        return x.T if c.trans_a else x
    k = x.shape[-1]
    xs = x.reshape(x.shape[0], -1, k) if x.ndim > 2 else x[:, None, :]
    return xs[np.arange(xs.shape[0])[:, None], pick].reshape(-1, k)


def output_rows(c: Consumer, y: np.ndarray, pick: np.ndarray) -> np.ndarray:
    """Rows of Y (rows, channels) at the picked output positions."""
    if c.op_type == "Conv":
        o = np.unravel_index(pick, y.shape[2:])
        return _gather(y, np.arange(y.shape[0])[:, None], list(o)).reshape(-1, y.shape[1])
    if c.op_type == "Gemm":
        return y
    ys = y.reshape(y.shape[0], -1, y.shape[-1]) if y.ndim > 2 else y[:, None, :]
    return ys[np.arange(ys.shape[0])[:, None], pick].reshape(-1, y.shape[-1])


def rows(c: Consumer, x: np.ndarray, y: np.ndarray | None = None, *, per_sample: int | None = 64,
         rng: np.random.Generator | None = None, pick: np.ndarray | None = None, valid: np.ndarray | None = None
         ) -> tuple[np.ndarray, np.ndarray | None]:
    """(X, Y): input feature rows and, if `y` (the op's output) is given, output rows at the same positions.

    X is (rows, features); Y is (rows, y's channels). per_sample=None takes every position;
    `pick` (from `pick_positions`) fixes the positions instead of drawing them; `valid` (bool
    [samples, sequence], onnxprune.calibration.padding) drops the rows of padded token positions.
    """
    if pick is None:
        pick = pick_positions(c, _output_shape(c, x), per_sample, rng)
    xr = input_rows(c, x, pick)
    keep = real_rows(c, x, pick, valid)
    if keep is not None:
        xr = xr[keep]
    if y is None:
        return xr, None
    if c.op_type == "Conv" and tuple(y.shape[2:]) != _output_shape(c, x)[2:]:
        raise ValueError(f"Conv '{c.node}': output spatial shape {tuple(y.shape[2:])} differs from the "
                         f"computed {_output_shape(c, x)[2:]}")
    yr = output_rows(c, y, pick)
    return xr, yr if keep is None else yr[keep]


def real_rows(c: Consumer, x: np.ndarray, pick: np.ndarray, valid: np.ndarray | None) -> np.ndarray | None:
    """Which of the rows `input_rows(c, x, pick)` returns are real tokens (None: all of them, or the
    tensor's layout does not show token positions)."""
    if valid is None or c.op_type == "Conv":
        return None
    if c.op_type == "Gemm":
        return None if c.trans_a else row_mask(x.shape, valid, rows_per_sample=False)
    if x.ndim == 3 and row_mask(x.shape, valid, rows_per_sample=True) is not None:
        return valid[np.arange(valid.shape[0])[:, None], pick].reshape(-1)
    return None


def _output_shape(c: Consumer, x: np.ndarray) -> tuple[int, ...]:
    if c.op_type == "Conv":
        return (x.shape[0], c.out_channels) + _conv_geometry(c, tuple(x.shape[2:]))[0]
    if c.op_type == "Gemm":
        return ((x.shape[1] if c.trans_a else x.shape[0]), c.out_channels)
    return tuple(x.shape[:-1]) + (c.out_channels,)


def _conv_rows(c: Consumer, x: np.ndarray, pick: np.ndarray) -> np.ndarray:
    batch, channels = x.shape[:2]
    spatial = tuple(x.shape[2:])
    nd = len(spatial)
    out, begins, strides, dil = _conv_geometry(c, spatial)
    o = np.unravel_index(pick, out)  # nd arrays of (B, m)
    offsets = np.indices(c.kernel).reshape(nd, -1)  # (nd, K)
    idx, valid = [], np.ones(pick.shape + (offsets.shape[1],), dtype=bool)
    for d in range(nd):
        i = o[d][..., None] * strides[d] + offsets[d][None, None, :] * dil[d] - begins[d]  # (B, m, K)
        valid &= (i >= 0) & (i < spatial[d])
        idx.append(np.clip(i, 0, spatial[d] - 1))
    patches = _gather(x, np.arange(batch)[:, None, None], idx)  # (B, m, K, C)
    if not valid.all():
        patches = patches * valid[..., None]
    m, k = pick.shape[1], offsets.shape[1]
    return patches.transpose(0, 1, 3, 2).reshape(batch * m, channels * k)  # channel-major, as the weight


def _gather(t: np.ndarray, b: np.ndarray, spatial_idx: list[np.ndarray]) -> np.ndarray:
    """t[b, :, i0, i1, ...] with the channel axis last: advanced indices around a slice
    put the broadcast index dims first."""
    moved = np.moveaxis(t, 1, -1)  # (B, *spatial, C), a view
    return moved[(b,) + tuple(spatial_idx)]


# -- accumulation ---------------------------------------------------------------------------------
FLUSH_ROWS = 4096  # rows multiplied at once: a product of a few rows costs little beside its float64 sum


class GramStats:
    """Streaming sums for least squares: X^T X, sum X, n (and X^T Y, sum Y, sum Y^2 with targets).

    Rows are multiplied in float32 (BLAS syrk/gemm) by the few thousand, and the products summed in
    float64: a batch of one sample of 64 tokens would otherwise spend its time converting a
    features x features product to float64, not computing it."""

    def __init__(self, features: int, targets: int = 0):
        self.features, self.targets, self.n = features, targets, 0
        self._xtx = np.zeros((features, features))
        self._xsum = np.zeros(features)
        self._xty = np.zeros((features, targets)) if targets else None
        self._ysum = np.zeros(targets) if targets else None
        self._ysq = np.zeros(targets) if targets else None
        self._pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._pending_rows = 0

    def update(self, x: np.ndarray, y: np.ndarray | None = None) -> None:
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.ascontiguousarray(y, dtype=np.float32) if self.targets else None
        self.n += x.shape[0]
        self._pending.append((x, y))
        self._pending_rows += x.shape[0]
        if self._pending_rows >= FLUSH_ROWS:
            self._flush()

    def add(self, xtx: np.ndarray, xsum: np.ndarray, xty: np.ndarray | None = None,
            ysum: np.ndarray | None = None, ysq: np.ndarray | None = None) -> None:
        """Add sums computed elsewhere (a grouped conv's groups); `n` is the caller's to count."""
        self._xtx += xtx
        self._xsum += xsum
        if self.targets:
            self._xty += xty
            self._ysum += ysum
            self._ysq += ysq

    def _flush(self) -> None:
        if not self._pending:
            return
        x = np.concatenate([p[0] for p in self._pending]) if len(self._pending) > 1 else self._pending[0][0]
        y = None
        if self.targets:
            y = np.concatenate([p[1] for p in self._pending]) if len(self._pending) > 1 else self._pending[0][1]
        self._pending, self._pending_rows = [], 0
        self.add(x.T @ x, x.sum(axis=0, dtype=np.float64), *(
            (x.T @ y, y.sum(axis=0, dtype=np.float64), np.square(y, dtype=np.float64).sum(axis=0))
            if y is not None else ()))

    @property
    def xtx(self) -> np.ndarray:
        self._flush()
        return self._xtx

    @property
    def xsum(self) -> np.ndarray:
        self._flush()
        return self._xsum

    @property
    def xty(self) -> np.ndarray | None:
        self._flush()
        return self._xty

    @property
    def ysum(self) -> np.ndarray | None:
        self._flush()
        return self._ysum

    @property
    def ysq(self) -> np.ndarray | None:
        self._flush()
        return self._ysq

    def augmented(self) -> tuple[np.ndarray, np.ndarray | None]:
        """([X 1]^T [X 1], [X 1]^T Y): the normal equations with a bias column last."""
        f = self.features
        a = np.empty((f + 1, f + 1))
        a[:f, :f] = self.xtx
        a[:f, f] = a[f, :f] = self.xsum
        a[f, f] = self.n
        if not self.targets:
            return a, None
        c = np.vstack([self.xty, self.ysum[None, :]])
        return a, c

    def squared_error(self, w: np.ndarray, bias: np.ndarray) -> float:
        """Sum over rows and targets of (x . w_o + b_o - y_o)^2, for w (targets, features)."""
        a, c = self.augmented()
        wa = np.hstack([w, bias[:, None]]).astype(np.float64)
        quad = float(((wa @ a) * wa).sum())
        return quad - 2.0 * float((wa * c.T).sum()) + float(self.ysq.sum())

    @property
    def target_energy(self) -> float:
        return float(self.ysq.sum()) if self.targets else 0.0


@dataclass
class GroupedGramStats:
    """GramStats of a grouped Conv, one per group: group i's input channels feed only group i's outputs,
    so each group is its own least-squares problem (a depthwise conv: one per channel)."""

    features: int  # per group: (C_in / group) * kernel size
    targets: int  # all groups
    groups: int
    parts: list[GramStats] = field(init=False)

    def __post_init__(self):
        if self.targets % self.groups:
            raise ValueError(f"{self.targets} targets do not split into {self.groups} groups")
        self.parts = [GramStats(self.features, self.targets // self.groups) for _ in range(self.groups)]

    @property
    def n(self) -> int:
        return self.parts[0].n

    def update(self, x: np.ndarray, y: np.ndarray | None = None) -> None:
        g, f = self.groups, self.features
        xg = np.ascontiguousarray(np.asarray(x, np.float32).reshape(len(x), g, f).transpose(1, 0, 2))
        xtx = np.matmul(xg.transpose(0, 2, 1), xg)  # (g, f, f)
        xsum = xg.sum(axis=1, dtype=np.float64)
        yg = xty = None
        if self.targets:
            o = self.targets // g
            yg = np.ascontiguousarray(np.asarray(y, np.float32).reshape(len(y), g, o).transpose(1, 0, 2))
            xty = np.matmul(xg.transpose(0, 2, 1), yg)  # (g, f, o)
        for i, part in enumerate(self.parts):
            part.n += len(x)
            if yg is None:
                part.add(xtx[i], xsum[i])
            else:
                part.add(xtx[i], xsum[i], xty[i], yg[i].sum(axis=0, dtype=np.float64),
                         np.square(yg[i], dtype=np.float64).sum(axis=0))

    def squared_error(self, w: np.ndarray, bias: np.ndarray) -> float:
        o = self.targets // self.groups
        return sum(p.squared_error(w[i * o:(i + 1) * o], bias[i * o:(i + 1) * o]) for i, p in enumerate(self.parts))

    @property
    def target_energy(self) -> float:
        return sum(p.target_energy for p in self.parts)


def gram_for(c: Consumer, targets: int = 0, features: int | None = None) -> GramStats | GroupedGramStats:
    """The accumulator for consumer `c`'s rows: one Gram per group for a grouped Conv (unless
    `features` asks for one over all its input columns)."""
    if c.op_type == "Conv" and c.group > 1 and features is None:
        return GroupedGramStats(c.in_features, targets, c.group)
    return GramStats(features or c.in_features, targets)
