"""Next-layer reconstruction error of removing input channels (ThiNet, He et al. 2017), from Gram matrices.

A consumer (Conv/Gemm/MatMul with a constant weight) computes Y = X W^T + b
with X its input rows (`features.rows`: the unfolded receptive fields of a
Conv, channel-major) and W its effective weight (C_out x C_in*K).  Removing a
set S of its input channels removes X_S W_S^T from Y; summed over rows and
outputs, the squared error is

    err(S) = sum_{c, c' in S} M[c, c'],   M[c, c'] = < G[c, c'], (W^T W)[c, c'] >

where G = X^T X and [c, c'] is the K x K block of channels c and c'.  The
channel matrix M (C_in x C_in) is all a greedy selection needs: err(S + u) =
err(S) + 2 sum_{v in S} M[u, v] + M[u, u].

G is centred (X^T X - n mean mean^T): with calibration data the pipeline
compensates the mean of what it removes (bias compensation, or the bias
column of the least-squares refit), so a channel that only carries a
constant costs nothing, and the error that remains is the fluctuation the
next layer loses.  M is divided by its total (the consumer's output
variance without bias), so the errors of consumers of different scale add up
as relative errors.

Memory: one consumer needs its F x F Gram matrix (F = C_in x K), about 3 F^2
doubles while M is formed; consumers are collected a chunk at a time under
`memory_cap`, each chunk one pass over the calibration data, and only M is
kept.  A consumer whose Gram matrix alone exceeds the cap is skipped (and said).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import onnx

from onnxprune.analysis.units import NO_UNIT
from onnxprune.calibration.data import CalibrationSet
from onnxprune.calibration.features import Consumer, GramStats, consumers_of
from onnxprune.calibration.stats import GramRequest, collect_statistics

DEFAULT_GRAM_CAP = 1 << 28  # bytes of Gram matrices held at once (256 MiB)


@dataclass
class RemovalErrors:
    """`matrices[(tensor, axis, node)]`: the channel matrix M of each measured sink (see the module docstring)."""

    matrices: dict[tuple[str, int, str], np.ndarray] = field(default_factory=dict)
    samples: int = 0
    passes: int = 0
    seconds: float = 0.0
    skipped: dict[str, str] = field(default_factory=dict)  # consumer node -> why it has no matrix

    @property
    def notes(self) -> list[str]:
        return [f"thinet: no next-layer error for '{node}': {why}" for node, why in self.skipped.items()]


def _feature_axis_matches(c: Consumer, axis: int, rank: int | None) -> bool:
    if rank is None:
        return axis == -1 and c.op_type == "MatMul"
    axis %= rank
    if c.op_type == "Conv":
        return axis == 1
    if c.op_type == "Gemm":
        return axis == (0 if c.trans_a else 1)
    return axis == rank - 1


def _dense_weight(c: Consumer, w: np.ndarray) -> tuple[np.ndarray, int]:
    """(C_out, C_in * K) with a grouped convolution's blocks spread out, and K."""
    if c.op_type != "Conv":
        return c.effective_weight(w), 1
    k = int(np.prod(w.shape[2:], dtype=np.int64))
    cout, cg = w.shape[0], w.shape[1]
    if c.group == 1:
        return w.reshape(cout, cg * k), k
    dense = np.zeros((cout, c.group * cg, k))
    per = cout // c.group
    for i in range(c.group):
        dense[i * per:(i + 1) * per, i * cg:(i + 1) * cg] = w[i * per:(i + 1) * per].reshape(per, cg, k)
    return dense.reshape(cout, -1), k


def channel_matrix(c: Consumer, w: np.ndarray, gram: GramStats, centred: bool = True) -> np.ndarray:
    """M (C_in x C_in) of one consumer from its Gram sums (normalised to sum 1 when the output varies)."""
    wd, k = _dense_weight(c, np.asarray(w, dtype=np.float64))
    g = gram.xtx.copy()
    if centred and gram.n:
        g -= np.outer(gram.xsum, gram.xsum) / gram.n
    g *= wd.T @ wd
    channels = g.shape[0] // k
    m = g.reshape(channels, k, channels, k).sum(axis=(1, 3))
    total = float(m.sum())
    return m / total if total > 0 else m


def removal_errors(model: onnx.ModelProto, analysis, data: Any, *, groups: Sequence | None = None,
                   centred: bool = True, memory_cap: int = DEFAULT_GRAM_CAP, per_sample: int | None = 64,
                   max_samples: int | None = None, batch_size: int = 32, seed: int = 0,
                   threads: int = 0) -> RemovalErrors:
    """Channel matrices of every sink carrying units of `groups` (default: the prunable ones), on `model`
    (the model `analysis` was built on)."""
    clock = time.perf_counter()
    groups = list(analysis.prunable_groups() if groups is None else groups)
    roots = {int(r) for g in groups for r in g.roots.tolist()}
    consumers = consumers_of(model, through_dequantize=True)  # a QDQ weight is read dequantized
    result = RemovalErrors()
    wanted: dict[str, tuple[Consumer, int, list]] = {}  # node -> consumer, features, sinks
    for s in analysis.state.sinks:
        layout = analysis.layouts[s.tensor][s.axis]
        if not any(u != NO_UNIT and int(analysis.root_of[u]) in roots for u in layout.tolist()):
            continue
        c = consumers.get(s.node)
        if c is None or c.input != s.tensor:
            result.skipped[s.node] = "not a Conv/Gemm/MatMul whose constant weight multiplies this input"
            continue
        if not _feature_axis_matches(c, s.axis, analysis.view.rank(s.tensor)):
            result.skipped[s.node] = f"axis {s.axis} of '{s.tensor}' is not the features the weight multiplies"
            continue
        features = len(layout) * (int(np.prod(c.kernel, dtype=np.int64)) if c.op_type == "Conv" else 1)
        if 3 * features * features * 8 > memory_cap:
            result.skipped[s.node] = (f"its Gram matrix ({features} features, {3 * features * features * 8 >> 20} "
                                      f"MiB to reduce) is over the memory cap of {memory_cap >> 20} MiB")
            continue
        if s.node in wanted:
            wanted[s.node][2].append(s)
        else:
            wanted[s.node] = (c, features, [s])
    calib = CalibrationSet.open(data, model, max_samples=max_samples)
    result.samples = len(calib)
    chunk: list[str] = []
    used = 0

    def flush():
        nonlocal chunk, used
        if not chunk:
            return
        requests = [GramRequest(wanted[n][0], features=wanted[n][1]) for n in chunk]
        stats = collect_statistics(model, calib, grams=requests, per_sample=per_sample, batch_size=batch_size,
                                   seed=seed, threads=threads)
        result.passes += stats.passes
        for n in chunk:
            c, _, sinks = wanted[n]
            m = channel_matrix(c, analysis.view.const(c.weight), stats.grams[n], centred)
            for s in sinks:
                result.matrices[(s.tensor, s.axis, s.node)] = m
        chunk, used = [], 0

    for node, (_, features, _) in wanted.items():
        cost = 3 * features * features * 8
        if chunk and used + cost > memory_cap:
            flush()
        chunk.append(node)
        used += cost
    flush()
    result.seconds = time.perf_counter() - clock
    return result
