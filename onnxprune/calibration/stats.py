"""Streaming per-channel activation statistics and consumer Gram matrices.

`collect_statistics` runs a model over calibration data in batches and keeps
only running sums: per (tensor, axis) the count, mean, variance (Chan's
parallel merge in float64), APoZ, mean |a| and mean a^2 of every position
along the axis; per consumer (Conv/Gemm/MatMul) a `GramStats`. Activations
are captured a chunk of tensors at a time under a byte cap (see
`capture.plan_chunks`), so memory does not grow with the sample count.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import onnx

from onnxprune.calibration.capture import DEFAULT_MEMORY_CAP, Capture, plan_chunks, sample_bytes
from onnxprune.runtime.progress import progress_iter
from onnxprune.calibration.data import CalibrationSet
from onnxprune.calibration.padding import real_part
from onnxprune.calibration.features import Consumer, GramStats, gram_for, rows


@dataclass
class ChannelStats:
    """Statistics of each position along one axis of a tensor, over every other axis and every sample.

    apoz: Average Percentage of Zeros, measured as the fraction of values <= 0
    (exactly the zeros after a ReLU; elsewhere the fraction a ReLU would zero).
    """

    count: int  # values per position
    mean: np.ndarray
    var: np.ndarray  # population variance
    apoz: np.ndarray
    mean_abs: np.ndarray
    mean_sq: np.ndarray
    covariance: np.ndarray | None = None  # [C, C] population covariance, when asked for

    @property
    def size(self) -> int:
        return len(self.mean)

    @property
    def rms(self) -> np.ndarray:
        return np.sqrt(self.mean_sq)


COVARIANCE_POSITIONS = 64  # per sample and channel axis (e.g. of a feature map's H x W)


class ChannelAccumulator:
    def __init__(self, axis: int, covariance: bool = False):
        self.axis = axis
        self.n = 0
        self.mean = self.m2 = self.nonpos = self.abs = None
        self.products = np.float64(0.0) if covariance else None  # sum of x xᵀ over the sampled positions
        self.sampled, self.sampled_sum = 0, np.float64(0.0)
        self.rng = np.random.default_rng(0)

    def update(self, x: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Add a batch; `valid` (bool [samples, sequence]): only those token positions count."""
        x, axis = real_part(x, self.axis, valid)
        channels = x.shape[axis]
        v = x.reshape(int(np.prod(x.shape[:axis])), channels, -1)  # (pre, C, post), a view when contiguous
        nb = v.shape[0] * v.shape[2]
        if nb == 0:
            return
        # float32 data, float64 sums (numpy converts on the fly, no float64 copy of the batch)
        s1 = v.sum(axis=(0, 2), dtype=np.float64)
        s2 = np.square(v).sum(axis=(0, 2), dtype=np.float64)
        absum = np.abs(v).sum(axis=(0, 2), dtype=np.float64)
        nonpos = (v <= 0).sum(axis=(0, 2))
        if self.products is not None:
            self._add_products(v, channels)
        mean_b = s1 / nb
        m2_b = np.maximum(s2 - s1 * mean_b, 0.0)
        if self.mean is None:
            self.n, self.mean, self.m2, self.nonpos, self.abs = nb, mean_b, m2_b, nonpos.astype(np.int64), absum
            return
        total = self.n + nb
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (nb / total)
        self.m2 = self.m2 + m2_b + np.square(delta) * (self.n * nb / total)
        self.nonpos = self.nonpos + nonpos
        self.abs = self.abs + absum
        self.n = total

    def _add_products(self, v: np.ndarray, channels: int) -> None:
        """x xᵀ of at most COVARIANCE_POSITIONS positions per row of `v` (pre, C, post): a feature map's
        neighbouring positions say little more, and all of them cost most of a curve's time."""
        if v.shape[2] > COVARIANCE_POSITIONS:
            v = v[:, :, np.sort(self.rng.choice(v.shape[2], COVARIANCE_POSITIONS, replace=False))]
        r = np.moveaxis(v, 1, 2).reshape(-1, channels)
        self.products = self.products + (r.T @ r).astype(np.float64)  # float32 products, float64 sums
        self.sampled += r.shape[0]
        self.sampled_sum = self.sampled_sum + r.sum(axis=0, dtype=np.float64)

    def result(self) -> ChannelStats:
        n = max(self.n, 1)
        var = self.m2 / n
        covariance = None
        if self.products is not None and self.sampled:
            mean = self.sampled_sum / self.sampled
            covariance = (self.products / self.sampled - np.outer(mean, mean)).astype(np.float32)  # held long
        return ChannelStats(self.n, self.mean, var, self.nonpos / n, self.abs / n, var + np.square(self.mean),
                            covariance)


@dataclass
class GramRequest:
    """A Gram matrix to accumulate for `consumer`, optionally with targets.

    target: the tensor holding Y (the consumer's output by default, read from
    the target model when one is given); target_channels: which of its
    channels (on the consumer's output axis) to keep.
    """

    consumer: Consumer
    target: str | None = None
    target_channels: np.ndarray | None = None
    features: int | None = None  # columns of X; from the consumer's weight when None


@dataclass
class CalibrationStats:
    """What a calibration pass measured; `channels[(tensor, axis)]` and `grams[node]`."""

    samples: int
    channels: dict[tuple[str, int], ChannelStats] = field(default_factory=dict)
    grams: dict[str, GramStats] = field(default_factory=dict)
    passes: int = 0
    batch_size: int = 0
    seconds: float = 0.0

    def channel(self, tensor: str, axis: int) -> ChannelStats:
        try:
            return self.channels[(tensor, axis)]
        except KeyError:
            raise KeyError(f"no calibration statistics for axis {axis} of '{tensor}': collect them with "
                           "collect_statistics(..., tensors=[(tensor, axis)])") from None

    def get(self, tensor: str, axis: int) -> ChannelStats | None:
        return self.channels.get((tensor, axis))


def collect_statistics(
    model: onnx.ModelProto,
    data: Any,
    tensors: Sequence[tuple[str, int]] = (),
    grams: Sequence[GramRequest] = (),
    *,
    target_model: onnx.ModelProto | None = None,
    batch_size: int = 32,
    memory_cap: int = DEFAULT_MEMORY_CAP,
    per_sample: int | None = 64,
    max_samples: int | None = None,
    seed: int = 0,
    threads: int = 0,
    covariance: bool = False,
) -> CalibrationStats:
    """Stream `data` through `model`; per-channel stats for `tensors`, Gram sums for `grams`.

    data: a CalibrationSet or anything `onnxprune.runtime.data.open_data` takes.
    target_model: where the targets Y of Gram requests are read (the dense
    model when the inputs X come from a pruned one); it must take the same inputs.
    per_sample: output positions sampled per sample for Conv (and per-sample
    rows of MatMul) Gram matrices; None = all.
    memory_cap: bytes of captured activations held per batch.
    covariance: also the covariance of the channels of each of `tensors` (a [C, C] matrix each).
    """
    clock = time.perf_counter()
    calib = CalibrationSet.open(data, model, max_samples=max_samples)
    target_model = target_model if target_model is not None else model
    keys = list(dict.fromkeys((str(t), int(a)) for t, a in tensors))
    jobs, job_keys = _jobs(model, target_model, keys, grams, calib.sample_shapes())
    plan = plan_chunks(jobs, batch_size, memory_cap, calib.static_batch())
    stat_acc = {key: ChannelAccumulator(key[1], covariance) for key in keys}
    gram_acc: dict[int, GramStats] = {}
    rngs: dict[int, np.random.Generator] = {}
    for i, r in enumerate(grams):
        targets = 0
        if r.target:
            targets = len(r.target_channels) if r.target_channels is not None else r.consumer.out_channels
        gram_acc[i] = gram_for(r.consumer, targets, r.features)
        rngs[i] = np.random.default_rng([seed, i])
    for chunk in progress_iter(plan.chunks, f"calibration statistics, passes over {len(calib)} samples"):
        kinds = [job_keys[j] for j in chunk]
        for got, got_y, valid in _captured(model, target_model, kinds, grams, calib, plan.batch_size, threads):
            for kind, key in kinds:
                if kind == "stat":
                    stat_acc[key].update(got[key[0]], valid)
                    continue
                r = grams[key]
                y = None
                if r.target:
                    y = got_y[r.target]
                    if r.target_channels is not None:
                        y = np.take(y, r.target_channels, axis=r.consumer.output_axis)
                x_rows, y_rows = rows(r.consumer, got[r.consumer.input], y, per_sample=per_sample, rng=rngs[key],
                                      valid=valid)
                gram_acc[key].update(x_rows, y_rows)
    result = CalibrationStats(len(calib), passes=len(plan.chunks), batch_size=plan.batch_size)
    result.channels = {key: acc.result() for key, acc in stat_acc.items()}
    result.grams = {grams[i].consumer.node: acc for i, acc in gram_acc.items()}
    result.seconds = time.perf_counter() - clock
    return result


def _jobs(model, target_model, keys, grams, fixed=None) -> tuple[dict[str, int | None], dict[str, tuple]]:
    """One job per channel statistic and per Gram request, with its bytes per sample (for the chunking;
    `fixed`: the inputs' shapes for one sample of the data)."""
    x_names = [t for t, _ in keys] + [r.consumer.input for r in grams]
    y_names = [r.target for r in grams if r.target]
    if target_model is model:
        x_bytes = y_bytes = sample_bytes(model, x_names + y_names, fixed) if x_names else {}
    else:
        x_bytes = sample_bytes(model, x_names, fixed) if x_names else {}
        y_bytes = sample_bytes(target_model, y_names, fixed) if y_names else {}
    jobs: dict[str, int | None] = {}
    job_keys: dict[str, tuple] = {}
    for i, key in enumerate(keys):
        jobs[f"s{i}"] = x_bytes.get(key[0])
        job_keys[f"s{i}"] = ("stat", key)
    for i, r in enumerate(grams):
        parts = [x_bytes.get(r.consumer.input)] + ([y_bytes.get(r.target)] if r.target else [])
        jobs[f"g{i}"] = None if any(p is None for p in parts) else sum(parts)
        job_keys[f"g{i}"] = ("gram", i)
    return jobs, job_keys


def _captured(model, target_model, kinds, grams, calib: CalibrationSet, batch_size: int, threads: int):
    """Per batch: the chunk's tensors of `model`, the Gram targets (of `target_model`, else the same
    dict) and the token positions (onnxprune.calibration.padding)."""
    xs = [key[0] for kind, key in kinds if kind == "stat"] + \
         [grams[i].consumer.input for kind, i in kinds if kind == "gram"]
    ys = [grams[i].target for kind, i in kinds if kind == "gram" and grams[i].target]
    if target_model is model:
        cap_x, cap_y = Capture(model, xs + ys, threads=threads), None
    else:
        cap_x = Capture(model, xs, threads=threads)
        cap_y = Capture(target_model, ys, threads=threads) if ys else None
    for feeds, n in calib.batches(batch_size):
        got = cap_x.run(feeds, n)
        yield got, (cap_y.run(feeds, n) if cap_y is not None else got), calib.real_positions(feeds, n)


def sink_tensors(analysis) -> list[tuple[str, int]]:
    """The (tensor, axis) slots consumed by mixing ops (Conv/Gemm/MatMul inputs) in an analysis."""
    return list(dict.fromkeys((s.tensor, s.axis) for s in analysis.state.sinks))


def calibration_statistics(model: onnx.ModelProto, analysis, data: Any, *, groups=None, **kwargs) -> CalibrationStats:
    """Channel statistics of every sink of `analysis` (optionally only those of `groups`), on `model`
    (the model the analysis was built on). The input data-aware criteria need."""
    keys = sink_tensors(analysis)
    if groups is not None:
        wanted = set()
        for g in groups:
            roots = {int(r) for r in g.roots}
            for t, a in keys:
                layout = analysis.layouts[t][a]
                if any(u >= 0 and int(analysis.root_of[u]) in roots for u in layout.tolist()):
                    wanted.add((t, a))
        keys = [k for k in keys if k in wanted]
    return collect_statistics(model, data, keys, **kwargs)
